"""Start and stop: /health is 503 while the model loads, then 200; SIGTERM lets a
running stream finish, refuses new connections and exits within the drain timeout."""
import json
import signal
import subprocess
import threading
import time

import httpx
import pytest
from server_harness import COMMON_ARGS, MODEL, STARTUP_DEADLINE, ServerProcess

DRAIN_TIMEOUT = 60
MAX_TOKENS = 32  # seconds of streaming: SIGTERM lands well inside it


@pytest.fixture(scope="module")
def sigterm_run(tmp_path_factory):
    """Start a server watching /health, stream a request, SIGTERM mid-stream; record what happened."""
    server = ServerProcess(tmp_path_factory.mktemp("server"), *COMMON_ARGS, "--drain-timeout", str(DRAIN_TIMEOUT))
    try:
        run = {"health": []}
        end = time.monotonic() + STARTUP_DEADLINE
        while time.monotonic() < end and server.process.poll() is None:
            try:
                response = httpx.get(f"{server.base_url}/health", timeout=2)
            except httpx.TransportError:
                time.sleep(0.01)
                continue
            run["health"].append((response.status_code, response.json()))
            if response.status_code == 200:
                break
            if "models_while_loading" not in run:
                run["models_while_loading"] = httpx.get(f"{server.base_url}/v1/models", timeout=2)
            time.sleep(0.01)
        assert run["health"] and run["health"][-1][0] == 200, server.log()

        lines, first_text, done = [], threading.Event(), threading.Event()

        def read_stream():
            try:
                body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": MAX_TOKENS, "temperature": 0,
                        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
                with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=120) as response:
                    run["stream_status"] = response.status_code
                    for line in response.iter_lines():
                        lines.append(line)
                        if '"text": "' in line and '"text": ""' not in line:
                            first_text.set()
            except httpx.HTTPError as error:
                run["stream_error"] = repr(error)
            finally:
                first_text.set()
                done.set()

        reader = threading.Thread(target=read_stream, daemon=True)
        reader.start()
        assert first_text.wait(120), server.log()
        server.process.send_signal(signal.SIGTERM)
        run["signalled"] = time.monotonic()

        # New connections are refused while the stream is still being served.
        refused_at = None
        while time.monotonic() - run["signalled"] < 10 and not done.is_set():
            try:
                httpx.get(f"{server.base_url}/health", timeout=1)
            except httpx.ConnectError:
                refused_at = time.monotonic()
                break
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        run["refused_while_streaming"] = refused_at is not None and not done.is_set()

        reader.join(120)
        run["stream_lines"] = [line for line in lines if line.startswith("data: ")]
        try:
            run["returncode"] = server.process.wait(DRAIN_TIMEOUT + 15)
        except subprocess.TimeoutExpired:
            run["returncode"] = None
        run["exited"] = time.monotonic()
        run["log"] = server.log()
        yield run
    finally:
        server.stop()


def test_health_is_503_while_loading_then_200(sigterm_run):
    statuses = [status for status, _ in sigterm_run["health"]]
    assert statuses[0] == 503 and statuses[-1] == 200, statuses
    assert set(statuses) == {503, 200}
    loading = [body for status, body in sigterm_run["health"] if status == 503]
    assert all(body == {"status": "loading"} for body in loading), loading
    assert sigterm_run["health"][-1][1] == {"status": "ok"}
    # The API itself answers 503 with Retry-After until the model is loaded.
    models = sigterm_run["models_while_loading"]
    assert models.status_code == 503 and int(models.headers["Retry-After"]) >= 1
    assert models.json()["error"]["code"] == "not_ready"


def test_sigterm_lets_the_running_stream_finish(sigterm_run):
    assert sigterm_run.get("stream_status") == 200 and "stream_error" not in sigterm_run, sigterm_run["log"]
    events = sigterm_run["stream_lines"]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in events[:-1]]
    reasons = [choice["finish_reason"] for chunk in chunks for choice in chunk["choices"] if choice["finish_reason"]]
    assert reasons == ["length"]
    assert chunks[-1]["usage"]["completion_tokens"] == MAX_TOKENS


def test_sigterm_refuses_new_connections_and_exits_within_the_drain_timeout(sigterm_run):
    assert sigterm_run["refused_while_streaming"]
    assert sigterm_run["returncode"] is not None, sigterm_run["log"]
    assert sigterm_run["exited"] - sigterm_run["signalled"] < DRAIN_TIMEOUT


def test_sigterm_exit_status_is_zero(sigterm_run):
    assert sigterm_run["returncode"] == 0, sigterm_run["log"]
