"""Gateways for the tests: in this process (a uvicorn thread) or as `tokenmill gateway` processes,
plus keys, configs, SSE reading and ledger rows."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import orjson
import yaml
from sqlalchemy import select

from tokenmill.bench.process import stop_process, wait_until_healthy
from tokenmill.bench.process import unused_port as free_port
from tokenmill.gateway.config import parse_config
from tokenmill.gateway.keys import KeyLimits, KeyStore
from tokenmill.gateway.store import api_keys, feedback, open_database, usage


def fast_pool(base_urls, tier="self_hosted", model="fake-model", **fields) -> dict:
    """A pool config over fake servers, with checks frequent enough for tests."""
    pool = {"tier": tier, "model": model, "upstreams": [{"base_url": url} for url in base_urls],
            "timeouts": {"connect_s": 2, "first_token_s": 10, "total_s": 30}}
    if tier == "self_hosted":
        pool["health"] = {"interval_s": 0.2, "timeout_s": 1, "eject_after_failures": 2, "readmit_after_s": 1}
    for name, value in fields.items():
        if isinstance(value, dict) and isinstance(pool.get(name), dict):
            pool[name] = {**pool[name], **value}
        else:
            pool[name] = value
    return pool


def config_dict(database_url: str, pools: dict, models: dict, **extra) -> dict:
    return {"database_url": database_url, "admin_key_env": None, "pools": pools, "models": models, **extra}


def create_key(database_url: str, name: str = "test", allowed_models=(), allow_overflow: bool = True,
               **limits) -> tuple[str, str]:
    """(key_id, secret) of a new key in the gateway database."""
    record, secret = KeyStore(open_database(database_url)).create(
        name, allowed_models=allowed_models, limits=KeyLimits(**limits), allow_overflow=allow_overflow)
    return record.key_id, secret


def ledger_rows(database_url: str) -> list:
    with open_database(database_url).read() as connection:
        return list(connection.execute(select(usage)))


def database_text(database_url: str) -> str:
    """Every row of every gateway table (keys, usage, feedback), each column as text."""
    lines = []
    with open_database(database_url).read() as connection:
        for table in (api_keys, usage, feedback):
            for row in connection.execute(select(table)):
                lines.append(" ".join("" if value is None else str(value) for value in row))
    return "\n".join(lines)


def sse_data(text: str) -> list:
    """The `data:` payloads of an SSE body, JSON-decoded except `[DONE]`."""
    events = []
    for block in text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                payload = line[6:]
                events.append(payload if payload == "[DONE]" else orjson.loads(payload))
    return events


def stream_text(events: list) -> str:
    parts = []
    for event in events:
        if isinstance(event, dict):
            for choice in event.get("choices", []):
                parts.append((choice.get("delta") or {}).get("content") or choice.get("text") or "")
    return "".join(parts)


class GatewayThread:
    """The gateway app served by uvicorn in a thread of this process; a context manager."""

    def __init__(self, config: dict) -> None:
        import uvicorn

        from tokenmill.gateway.app import build_gateway_app

        self.config = parse_config(config)
        self.app = build_gateway_app(self.config)
        self.gateway = self.app.state.gateway
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False, lifespan="on", timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self.server.run, name="gateway", daemon=True)

    def __enter__(self) -> GatewayThread:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)

    def client(self, secret: str | None = None, **kwargs) -> httpx.Client:
        headers = {"authorization": f"Bearer {secret}"} if secret else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60, **kwargs)

    def flush_ledger(self) -> None:
        assert self.gateway.ledger.flush(timeout_s=10)


class GatewayProcess:
    """`tokenmill gateway --config FILE` as a child process, output in a log file."""

    def __init__(self, tmp_path: Path, config: dict, name: str = "gateway") -> None:
        self.port = free_port()
        config = {**config, "listen": {"host": "127.0.0.1", "port": self.port}}
        self.config_path = tmp_path / f"{name}-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"{name}-{self.port}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "gateway", "--config",
                                             str(self.config_path)], stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, deadline_s: float = 60) -> GatewayProcess:
        wait_until_healthy(self.process, self.base_url, deadline_s, self.log_path, interval_s=0.1)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self, timeout_s: float = 30) -> None:
        stop_process(self.process, timeout_s=timeout_s)
