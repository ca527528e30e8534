"""Engine configuration: one frozen dataclass, validated on construction.

Every CLI flag and `LLM(...)` keyword maps to one field here; defaults live here only.
"""
from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("auto", "float32", "bfloat16", "float16")


# On a CPU a step costs about as much per prompt token as per decoding sequence: a
# 2,048-token prefill would hold every stream for seconds, while 128 prompt tokens
# add about what a step of 32 decodes costs on two cores (docs/benchmarks.md,
# cpu_performance, compares 0, 64 and this default).
CPU_LONG_PREFILL_TOKENS = 128


@dataclass(frozen=True)
class EngineConfig:
    """What the engine is asked for. Values derived from the model (such as the
    final max_model_len) are resolved by the engine core at start-up."""
    model: str | None = None              # HF directory or .gguf file; None: the default Gemma 3 270M
    dtype: str = "auto"                   # auto: bfloat16 on CUDA and native-bf16 CPUs, else float32
    device: str = "cpu"
    max_model_len: int | None = None      # None: the model's context, capped by what the KV cache holds
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    # Prompt tokens per step while others decode; None: 128 on CPU, 0 (off) elsewhere.
    long_prefill_token_threshold: int | None = None
    block_size: int = 16
    kv_cache_memory: int | None = None    # bytes for the KV cache; None: 2 GiB
    num_kv_blocks: int | None = None      # exact block count; overrides kv_cache_memory
    enable_prefix_caching: bool = True
    quantization: str | None = None       # weight-only: "int8" or "int4" (see models/quantize.py); None: the dtype
    seed: int = 0
    cache_dir: str | None = None          # converted-model cache; None: $TOKENMILL_CACHE_DIR or ~/.cache/tokenmill

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.quantization not in (None, "int8", "int4"):
            raise ValueError(f"quantization must be int8, int4 or None, got {self.quantization!r}")
        threshold = self.long_prefill_token_threshold
        if threshold is not None and (not isinstance(threshold, int) or threshold < 0):
            raise ValueError(f"long_prefill_token_threshold must be a non-negative integer, got {threshold!r}")
        for name in ("max_model_len", "kv_cache_memory", "num_kv_blocks"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @property
    def resolved_long_prefill_token_threshold(self) -> int:
        if self.long_prefill_token_threshold is not None:
            return self.long_prefill_token_threshold
        return CPU_LONG_PREFILL_TOKENS if self.device.split(":", 1)[0] == "cpu" else 0

    @property
    def resolved_kv_cache_memory(self) -> int:
        return self.kv_cache_memory if self.kv_cache_memory is not None else 2 * 1024**3
