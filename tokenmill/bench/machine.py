"""What the benchmark scripts say about the machine: its CPU, and who used it during a run.

Linux only for CPU accounting (read from /proc); elsewhere the functions return
None and reports print "-". `CpuShares` measures, over a block of code, the
share of all cores used by given processes and by everything else, so that a
result taken on a busy, shared machine says so.
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float | None:
    """CPU seconds all cores spent busy since boot."""
    try:
        values = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    return (sum(values[:8]) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


class CpuShares:
    """Context manager: `shares[name]` is the share of all cores the process `pids[name]`
    used during the block; `shares["other"]` what every other process used
    (`own_seconds`, e.g. CPU of waited-for children, is subtracted too)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.own_seconds = 0.0
        self.shares: dict[str, float | None] = {}
        self.seconds: dict[str, float | None] = {}  # CPU seconds each of `pids` used during the block

    def __enter__(self) -> CpuShares:
        self._start = {name: process_cpu_seconds(pid) for name, pid in self.pids.items()}
        self._busy = machine_busy_seconds()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        capacity = (time.perf_counter() - self._wall) * (os.cpu_count() or 1)
        used = 0.0
        for name, pid in self.pids.items():
            before, after = self._start[name], process_cpu_seconds(pid)
            self.seconds[name] = None if before is None or after is None else after - before
            self.shares[name] = None if self.seconds[name] is None else self.seconds[name] / capacity
            used += 0.0 if self.shares[name] is None else after - before
        busy = machine_busy_seconds()
        self.shares["other"] = None if self._busy is None or busy is None else \
            max(0.0, (busy - self._busy - used - self.own_seconds) / capacity)
