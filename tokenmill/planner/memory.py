"""Memory of one deployment: weights, KV cache per token, KV capacity, how many
sequences fit, and why a combination does not fit. Formulas: docs/planner.md.

Units: bytes unless a name says GB (10^9 bytes, as GPU memory is quoted).
One replica is `tensor_parallel` devices holding one copy of the model; weights
and KV heads are split across them, so capacities below are per replica.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from tokenmill.planner.catalog import Device, ModelSpec, Precision
from tokenmill.planner.errors import PlanError

GB = 1e9


def weight_bytes_for(parameters: float, head_parameters: float, precision: Precision) -> float:
    """Stored weights: the quantized body at the effective bits per weight, the embedding and
    LM head (`head_parameters`) at `precision.embedding_bits` when the format keeps them wider."""
    if precision.embedding_bits is None:
        return parameters * precision.effective_bits / 8
    body = parameters - head_parameters
    return body * precision.effective_bits / 8 + head_parameters * precision.embedding_bits / 8


def weight_bytes(model: ModelSpec, precision: Precision) -> float:
    """Bytes of the model's weights at `precision` (GGUF files: the stored tensors, exact)."""
    if precision.from_file:
        if model.file_weight_bytes is None:
            raise PlanError(f"precision {precision.name!r} needs a .gguf file as --model, "
                            f"{model.name!r} is not one")
        return float(model.file_weight_bytes)
    return weight_bytes_for(model.parameters, model.head_parameters, precision)


def weight_bytes_read_per_step(model: ModelSpec, precision: Precision) -> float:
    """Weights streamed from memory by one decode step: all of them except an untied input
    embedding table, of which a step reads only the rows of its tokens."""
    total = weight_bytes(model, precision)
    if model.tie_word_embeddings:
        return total
    if precision.from_file:
        return total - float(model.file_embedding_bytes or 0)
    bits = precision.embedding_bits if precision.embedding_bits is not None else precision.effective_bits
    return total - model.embedding_parameters * bits / 8


def kv_bytes_per_token(model: ModelSpec, kv_bytes: int) -> int:
    """2 (K and V) x layers x KV heads x head dim x bytes per element."""
    return 2 * model.layers * model.kv_heads * model.head_dim * kv_bytes


@dataclass(frozen=True)
class MemoryOptions:
    """How memory is budgeted on each device of a replica.

    gpu_memory_utilization: share of device memory the engine may use (vLLM's flag).
    runtime_reserve_gb: per device, for activations, CUDA context and graphs.
    kv_cache_gb: a fixed KV pool per replica instead (tokenmill's --kv-cache-memory).
    block_size: tokens per KV block; a sequence holds whole blocks.
    max_num_seqs: the engine's cap on running sequences.
    """

    gpu_memory_utilization: float = 0.90
    runtime_reserve_gb: float = 1.0
    kv_cache_gb: float | None = None
    block_size: int = 16
    max_num_seqs: int = 256

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise PlanError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.runtime_reserve_gb < 0:
            raise PlanError(f"--runtime-reserve-gb must be >= 0, got {self.runtime_reserve_gb}")
        if self.kv_cache_gb is not None and self.kv_cache_gb <= 0:
            raise PlanError(f"--kv-cache-gb must be positive, got {self.kv_cache_gb}")
        if self.block_size < 1 or self.max_num_seqs < 1:
            raise PlanError("--block-size and --max-num-seqs must be positive")


@dataclass(frozen=True)
class MemoryPlan:
    """The memory side of one replica at one context length."""

    weights_bytes: float
    usable_bytes: float          # tp x memory x utilization - tp x reserve
    kv_capacity_bytes: float     # what is left for the KV cache (the fixed pool when given)
    kv_bytes_per_token: int
    kv_capacity_tokens: int
    tokens_per_sequence: int     # the context rounded up to whole blocks
    max_concurrent_sequences: int

    @property
    def weights_fit(self) -> bool:
        return self.weights_bytes <= self.usable_bytes

    @property
    def fits(self) -> bool:
        return self.weights_fit and self.max_concurrent_sequences >= 1


def plan_memory(model: ModelSpec, precision: Precision, device: Device, tensor_parallel: int, context_tokens: int,
                kv_bytes: int, options: MemoryOptions) -> MemoryPlan:
    """Weights, KV capacity and the sequences of `context_tokens` that fit one replica."""
    weights = weight_bytes(model, precision)
    usable = tensor_parallel * (device.memory_gb * options.gpu_memory_utilization - options.runtime_reserve_gb) * GB
    left = max(usable - weights, 0.0)
    kv_capacity = left if options.kv_cache_gb is None else (
        options.kv_cache_gb * GB if options.kv_cache_gb * GB <= left else 0.0)
    per_token = kv_bytes_per_token(model, kv_bytes)
    capacity_tokens = int(kv_capacity // per_token)
    per_sequence = math.ceil(context_tokens / options.block_size) * options.block_size
    # Blocks are whole: a replica holds floor(capacity / block) blocks, a sequence needs per_sequence / block.
    blocks = capacity_tokens // options.block_size
    sequences = min(blocks // (per_sequence // options.block_size), options.max_num_seqs)
    return MemoryPlan(weights, usable, kv_capacity, per_token, capacity_tokens, per_sequence, sequences)


def smallest_fitting_tensor_parallel(model: ModelSpec, precision: Precision, device: Device, context_tokens: int,
                                     kv_bytes: int, options: MemoryOptions, limit: int = 8) -> int | None:
    """The smallest power of two (up to `limit`) whose replica holds the weights and one sequence."""
    size = 1
    while size <= limit:
        if size <= model.kv_heads and plan_memory(model, precision, device, size, context_tokens, kv_bytes,
                                                  options).fits:
            return size
        size *= 2
    return None
