"""`tokenmill plan --measure-device`: measure this machine's CPU as a device profile.

Measured with torch (imported here, never at planner import time), using the
threads torch uses by default, which are the threads tokenmill's engine uses:
  memory bandwidth = bytes of a 512 MiB float32 tensor / fastest of 7 full sums
  fp32 / bf16 peak = 2 x 2048^3 / fastest of 4 matmuls of 2048 x 2048 matrices
Takes a few seconds. The profile is a catalog file with one `devices` entry
named `cpu`; written to `$TOKENMILL_CACHE_DIR/planner/devices/cpu.yaml` by
default, where `load_catalog` picks it up so that `--gpu cpu` means this machine.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import time
from pathlib import Path

import yaml

from tokenmill.planner.architecture import planner_cache_dir
from tokenmill.planner.catalog import CATALOG_VERSION, Device
from tokenmill.planner.efficiency import Efficiency

BANDWIDTH_BUFFER_BYTES = 512 * 2**20
MATMUL_SIZE = 2048


def profiles_dir() -> Path:
    return planner_cache_dir() / "devices"


def cached_profile_paths() -> list[Path]:
    """Measured profiles in the cache, in name order (none when the cache does not exist)."""
    folder = profiles_dir()
    return sorted(folder.glob("*.yaml")) if folder.is_dir() else []


def _fastest(run, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def _memory_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return 0.0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_cpu() -> Device:
    """Bandwidth and matmul peaks of this machine's CPU, as a `cpu` device."""
    import torch

    threads = torch.get_num_threads()
    buffer = torch.ones(BANDWIDTH_BUFFER_BYTES // 4, dtype=torch.float32)
    buffer.sum()  # first touch maps the pages; not timed
    bandwidth = BANDWIDTH_BUFFER_BYTES / _fastest(buffer.sum, 7) / 1e9
    del buffer
    tflops = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        left = torch.randn(MATMUL_SIZE, MATMUL_SIZE).to(dtype)
        right = torch.randn(MATMUL_SIZE, MATMUL_SIZE).to(dtype)
        torch.mm(left, right)  # warm-up: kernel selection, packing buffers
        seconds = _fastest(lambda left=left, right=right: torch.mm(left, right), 4)
        tflops[name] = 2 * MATMUL_SIZE**3 / seconds / 1e12
    memory = _memory_gb()
    return Device(
        name="cpu", label=f"{_cpu_name()} ({threads} threads)", kind="cpu", memory_gb=round(memory, 1),
        memory_bandwidth_gb_per_s=round(bandwidth, 2),
        dense_tflops={name: round(value, 4) for name, value in tflops.items()}, ecc=False, mig=False,
        source=(f"measured by tokenmill plan --measure-device with torch {torch.__version__}, {threads} threads: "
                f"sum over {BANDWIDTH_BUFFER_BYTES // 2**20} MiB, {MATMUL_SIZE}x{MATMUL_SIZE} matmuls"),
        date=_dt.date.today().isoformat())


def device_to_document(device: Device, efficiency: Efficiency | None = None) -> dict:
    """A catalog document holding `device` (with `efficiency` when given)."""
    entry = {"name": device.name, "label": device.label, "kind": device.kind, "memory_gb": device.memory_gb,
             "memory_bandwidth_gb_per_s": device.memory_bandwidth_gb_per_s,
             "dense_tflops": dict(device.dense_tflops), "ecc": device.ecc, "mig": device.mig,
             "source": device.source, "date": device.date}
    if device.aliases:
        entry["aliases"] = list(device.aliases)
    if device.prices:
        entry["prices"] = [{"provider": price.provider,
                            f"usd_per_{price.per}": price.low if price.low == price.high else [price.low, price.high],
                            "source": price.source, "date": price.date} for price in device.prices]
    if device.serverless_prices:
        entry["serverless_prices"] = [{"provider": price.provider, "usd_per_second": price.usd_per_second,
                                       "source": price.source, "date": price.date}
                                      for price in device.serverless_prices]
    chosen = efficiency or device.efficiency
    if chosen is not None:
        entry["efficiency"] = {key: round(value, 6) for key, value in chosen.as_dict().items()}
    return {"version": CATALOG_VERSION, "devices": [entry]}


def write_profile(device: Device, path: Path | None = None, efficiency: Efficiency | None = None) -> Path:
    """Write `device` as a catalog file (default: the cache, where plans pick it up)."""
    path = path or profiles_dir() / f"{device.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(device_to_document(device, efficiency), sort_keys=False), encoding="utf-8")
    return path
