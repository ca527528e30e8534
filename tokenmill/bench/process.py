"""Servers run as child processes by the benchmark scripts and tests: a free port
to give one, wait until it answers `/health` with 200, stop it without leaving it
behind, and its command line as the docs show it."""
from __future__ import annotations

import shlex
import socket
import subprocess
import time
from pathlib import Path

import httpx


def unused_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the moment of asking."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shell_line(argv: list[str]) -> str:
    """argv as a shell line; arguments holding `$` (placeholders such as $PORT) stay expandable."""
    return " ".join(arg if "$" in arg else shlex.quote(arg) for arg in argv)


def wait_until_healthy(process: subprocess.Popen, base_url: str, deadline_s: float,
                       log: Path | None = None, interval_s: float = 0.2) -> float:
    """Poll `{base_url}/health` until 200; returns the seconds waited. Raises
    RuntimeError (with the tail of `log`) if the process exits or the deadline passes."""
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log is not None else ""
            raise RuntimeError(f"the server exited with status {process.returncode}: {tail}")
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(interval_s)
    raise RuntimeError(f"the server was not healthy within {deadline_s:.0f} s")


def stop_process(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout_s`; harmless if already gone."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
