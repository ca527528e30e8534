"""Fused CPU kernels (`cpu_ops.cpp`), compiled once per machine and loaded as
`torch.ops.tokenmill.*`.

The first `load_cpu_kernels()` builds the extension with PyTorch's own
toolchain helper (a C++ compiler and ninja are needed; about 15 s) into the
cache directory, keyed by the source, the torch version and the CPU's features;
later processes load the built library at once. The kernels use AVX-512; on
other CPUs, where the build fails, or with ``TOKENMILL_CPU_KERNELS=0``, the
engine keeps its plain PyTorch path: the same results, more operator dispatches.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_ops.cpp")
# -fopenmp: at::parallel_for then runs on torch's OpenMP runtime (the libgomp.so.1
# torch has already loaded; the extension links the same soname).
_FLAGS = ["-O3", "-march=native", "-std=c++17", "-fopenmp"]
_REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw")


def _build_key(torch_version: str) -> str:
    from tokenmill.engine.platform import cpu_flags

    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch_version.encode(), " ".join(_FLAGS).encode(),
                 " ".join(sorted(cpu_flags())).encode(), platform.machine().encode()):
        digest.update(part)
    return digest.hexdigest()[:16]


def kernels_disabled() -> bool:
    return os.environ.get("TOKENMILL_CPU_KERNELS", "1").strip().lower() in ("0", "false", "off", "no")


@functools.cache
def load_cpu_kernels() -> bool:
    """Build (once) and load the fused CPU kernels; True when `torch.ops.tokenmill`
    has them. Never raises: a failed build is logged and the plain path is used."""
    if kernels_disabled():
        return False
    from tokenmill.engine.platform import cpu_flags

    missing = [flag for flag in _REQUIRED_CPU_FLAGS if flag not in cpu_flags()]
    if missing:
        logger.info("fused CPU kernels need %s, which this CPU lacks; using the plain PyTorch path",
                    " and ".join(missing))
        return False
    import torch

    try:
        torch.ops.tokenmill.rms_norm  # already registered in this process
        return True
    except (AttributeError, RuntimeError):
        pass
    from torch.utils import cpp_extension

    from tokenmill.models.gguf_cache import cache_root

    key = _build_key(torch.__version__)
    root = cache_root(None) / "kernels"
    library = root / f"tokenmill_cpu_ops-{key}.so"
    try:
        if library.is_file():
            torch.ops.load_library(str(library))
            return True
        # Build in a private folder, then move the library into place in one step: a
        # process starting meanwhile finds either no library or a whole one.
        build_dir = root / f"build-{key}-{os.getpid()}"
        build_dir.mkdir(parents=True, exist_ok=True)
        logger.info("building the fused CPU kernels once into %s (about 15 s)", root)
        cpp_extension.load(name="tokenmill_cpu_ops", sources=[str(SOURCE)], extra_cflags=_FLAGS,
                           extra_ldflags=["-fopenmp"], build_directory=str(build_dir), is_python_module=False,
                           verbose=False)
        os.replace(build_dir / "tokenmill_cpu_ops.so", library)
        shutil.rmtree(build_dir, ignore_errors=True)
        return True
    except Exception as error:  # noqa: BLE001 - any build or load failure means: use the plain path
        lines = [line for line in str(error).splitlines() if "error" in line.lower()] or [type(error).__name__]
        logger.warning("fused CPU kernels unavailable (%s); using the plain PyTorch path", lines[0].strip())
        logger.debug("kernel build failure", exc_info=error)
        return False


_enabled = True


def set_cpu_kernels_enabled(enabled: bool) -> None:
    """Switch the fused kernels off (or back on) in this process, e.g. to compare paths."""
    global _enabled
    _enabled = enabled


def cpu_kernels_for(tensor) -> bool:
    """Whether the fused kernels serve an operation on `tensor` (CPU, float32 or bfloat16)."""
    import torch

    return (_enabled and tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.bfloat16)
            and load_cpu_kernels())
