"""Real `tokenmill serve` processes for the server tests, and helpers to read them.

Each server is a subprocess on a free port of 127.0.0.1: `start_server` waits for
`/health` with a deadline; fixtures stop it in teardown, whatever happened.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tokenmill.bench.process import stop_process
from tokenmill.bench.process import unused_port as free_port

MODEL = "gemma-3-270m"
MAX_MODEL_LEN = 256
STARTUP_DEADLINE = 180.0   # seconds; loading takes a few seconds, more on a busy machine
IDLE_DEADLINE = 5.0        # seconds for an aborted or finished request to give back its blocks
# Small KV caches keep several servers cheap; the usage gauge moves visibly.
COMMON_ARGS = ("--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-tokens", "4096")


class ServerProcess:
    """One `tokenmill serve` subprocess; its output goes to a log file shown on failure."""

    def __init__(self, log_dir: Path, *args: str) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{self.port}.log"
        command = [sys.executable, "-m", "tokenmill.cli", "serve", "--host", "127.0.0.1",
                   "--port", str(self.port), *args]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self.started_at = time.monotonic()

    def log(self, tail: int | None = 4000) -> str:
        """The server's output (its last `tail` characters; None: all of it)."""
        text = self.log_path.read_text(errors="replace")
        return text if tail is None else text[-tail:]

    def health_status(self, timeout: float = 2.0) -> int | None:
        """Status of GET /health, or None while nothing listens."""
        try:
            return httpx.get(f"{self.base_url}/health", timeout=timeout).status_code
        except httpx.TransportError:
            return None

    def wait_ready(self, deadline: float = STARTUP_DEADLINE, interval: float = 0.05) -> list[int | None]:
        """Poll /health until 200; returns every status seen (None: not listening yet)."""
        seen = []
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode} while starting:\n{self.log()}")
            status = self.health_status()
            seen.append(status)
            if status == 200:
                return seen
            time.sleep(interval)
        pytest.fail(f"the server was not healthy within {deadline} s:\n{self.log()}")

    def stop(self) -> None:
        stop_process(self.process, timeout_s=15)

    def client(self, api_key: str = "unused", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0, **kwargs)

    def metrics(self) -> dict:
        return parse_metrics(httpx.get(f"{self.base_url}/metrics", timeout=10).text)

    def wait_idle(self, deadline: float = IDLE_DEADLINE) -> float:
        """Wait until nothing runs or waits and no KV block is in use; returns the seconds it took."""
        start = time.monotonic()
        while True:
            values = self.metrics()
            busy = (values[("tokenmill_num_requests_running", ())], values[("tokenmill_num_requests_waiting", ())],
                    values[("tokenmill_kv_cache_usage_perc", ())])
            if busy == (0, 0, 0):
                return time.monotonic() - start
            if time.monotonic() - start > deadline:
                raise AssertionError(f"still busy after {deadline} s (running, waiting, kv usage) = {busy}")
            time.sleep(0.05)


def parse_metrics(text: str) -> dict:
    """{(sample name, sorted labels without model_name): value} from a Prometheus scrape."""
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "model_name"))
            values[(sample.name, labels)] = sample.value
    return values


def metric(values: dict, name: str, **labels) -> float:
    """A sample's value; 0 for a labelled counter that has not been created yet."""
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def start_server(tmp_path_factory, *args: str) -> ServerProcess:
    server = ServerProcess(tmp_path_factory.mktemp("server"), *args)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server



def assert_error_shape(response: httpx.Response, status: int) -> dict:
    """An OpenAI-shaped error with this status; returns its `error` object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    return error
