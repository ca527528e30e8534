"""What this machine computes fast, for the defaults that depend on it."""
from __future__ import annotations

import functools
from pathlib import Path

# CPU flags (Linux /proc/cpuinfo names) of native bf16 matmul instructions:
# AVX-512 BF16 (Cooper Lake, Zen 4 and later) and AMX (Sapphire Rapids and later).
_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags; empty where /proc/cpuinfo is not readable (non-Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True when bf16 matmuls run on dedicated instructions (several times float32's
    speed), not emulated; `--dtype auto` then means bfloat16 on CPU."""
    return any(flag in cpu_flags() for flag in _NATIVE_BF16_FLAGS)
