"""Servers run as child processes by the benchmark scripts and tests: wait until
one answers `/health` with 200, and stop it without leaving it behind."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx


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
