"""Speed of one replica from rooflines: decode steps, prefill, per-user speed under
load and the largest concurrency that keeps a per-user speed. docs/planner.md
derives each formula.

A decode step of B sequences at average context c reads the weights once and
the KV of every sequence, and multiplies every token through the weights:

    memory time  = (weights read + B x c x KV bytes per token) / (bandwidth x e_bw)
    compute time = B x (2 x matmul params + 4 x layers x heads x head dim x c) / (peak x e_c)
    step time    = max(memory time, compute time) + step overhead + B x sequence overhead

Prefill of I prompt tokens rides on decode steps (chunked prefill) and adds its
compute: 2 x matmul params x I / (peak x e_c). With B streams each asking for I
input and O output tokens in a closed loop, one round of B requests takes

    round time = O x step time(B) + B x prefill time(I)

so aggregate output = B x O / round time, and each stream's time per output token
(TPOT, what `tokenmill bench` reports) = step time(B) + (B - 1) x prefill time(I) / O.
"""
from __future__ import annotations

from dataclasses import dataclass

from tokenmill.planner.catalog import Device, ModelSpec, Precision
from tokenmill.planner.efficiency import Efficiency
from tokenmill.planner.memory import GB, weight_bytes_read_per_step

TFLOPS = 1e12


def compute_type(precision: Precision, device: Device) -> str:
    """The matmul type used: the precision's own when the device has it, else bf16
    (weight-only kernels dequantize to bf16), else fp32 (CPUs without bf16)."""
    for candidate in (precision.compute, "bf16", "fp32"):
        if device.tflops(candidate) is not None:
            return candidate
    return next(iter(device.dense_tflops))


@dataclass(frozen=True)
class Roofline:
    """The device-side constants of one replica; all times in seconds."""

    weight_read_bytes: float       # per decode step, whole replica
    kv_bytes_per_token: int
    matmul_flops_per_token: float  # 2 x matmul parameters
    attention_flops_per_context_token: float  # 4 x layers x heads x head dim
    bandwidth_bytes_per_s: float   # achieved: peak x tp x e_bw
    flops_per_s: float             # achieved: peak x tp x e_c
    step_overhead_s: float
    sequence_overhead_s: float
    compute: str                   # the tensor-core type used

    def memory_seconds(self, batch: float, context: float) -> float:
        return (self.weight_read_bytes + batch * context * self.kv_bytes_per_token) / self.bandwidth_bytes_per_s

    def compute_seconds(self, batch: float, context: float) -> float:
        per_token = self.matmul_flops_per_token + self.attention_flops_per_context_token * context
        return batch * per_token / self.flops_per_s

    def step_seconds(self, batch: float, context: float) -> float:
        """One decode step for `batch` sequences at average context `context`."""
        return (max(self.memory_seconds(batch, context), self.compute_seconds(batch, context))
                + self.step_overhead_s + batch * self.sequence_overhead_s)

    def bound(self, batch: float, context: float) -> str:
        memory = self.memory_seconds(batch, context)
        return "memory bandwidth" if memory >= self.compute_seconds(batch, context) else "compute"

    def prefill_seconds(self, input_tokens: float) -> float:
        """Extra compute a prompt of `input_tokens` adds to the steps it rides on."""
        per_token = self.matmul_flops_per_token + self.attention_flops_per_context_token * input_tokens / 2
        return input_tokens * per_token / self.flops_per_s

    def ttft_seconds(self, batch: float, input_tokens: float, context: float) -> float:
        """First token of a new request while `batch` others decode: its prefill plus the step it joins."""
        return self.prefill_seconds(input_tokens) + self.step_seconds(max(batch, 1), context)


def build_roofline(model: ModelSpec, precision: Precision, device: Device, tensor_parallel: int, kv_bytes: int,
                   efficiency: Efficiency) -> Roofline:
    compute = compute_type(precision, device)
    return Roofline(
        weight_read_bytes=weight_bytes_read_per_step(model, precision),
        kv_bytes_per_token=2 * model.layers * model.kv_heads * model.head_dim * kv_bytes,
        matmul_flops_per_token=2.0 * model.matmul_parameters,
        attention_flops_per_context_token=4.0 * model.layers * model.attention_heads * model.head_dim,
        bandwidth_bytes_per_s=device.memory_bandwidth_gb_per_s * GB * tensor_parallel * efficiency.bandwidth,
        flops_per_s=device.tflops(compute) * TFLOPS * tensor_parallel * efficiency.compute,
        step_overhead_s=efficiency.step_overhead_s, sequence_overhead_s=efficiency.sequence_overhead_s,
        compute=compute)


@dataclass(frozen=True)
class Workload:
    """Tokens of one request; decode runs at the average context input + output / 2."""

    input_tokens: int
    output_tokens: int

    @property
    def context_tokens(self) -> int:
        """The longest a sequence gets: what its KV blocks must hold at the end."""
        return self.input_tokens + self.output_tokens

    @property
    def average_context(self) -> float:
        return self.input_tokens + self.output_tokens / 2


@dataclass(frozen=True)
class LoadPoint:
    """Predicted steady state of B concurrent streams (closed loop)."""

    concurrency: int
    step_seconds: float
    tpot_seconds: float
    per_user_tokens_per_s: float
    output_tokens_per_s: float
    ttft_seconds: float
    bound: str


def load_point(roofline: Roofline, workload: Workload, concurrency: int) -> LoadPoint:
    context = workload.average_context
    step = roofline.step_seconds(concurrency, context)
    prefill = roofline.prefill_seconds(workload.input_tokens)
    output = max(workload.output_tokens, 1)
    round_seconds = output * step + concurrency * prefill
    tpot = step + (concurrency - 1) * prefill / output
    return LoadPoint(concurrency=concurrency, step_seconds=step, tpot_seconds=tpot, per_user_tokens_per_s=1 / tpot,
                     output_tokens_per_s=concurrency * output / round_seconds,
                     ttft_seconds=roofline.ttft_seconds(concurrency, workload.input_tokens, context),
                     bound=roofline.bound(concurrency, context))


def single_stream_tokens_per_s(roofline: Roofline, workload: Workload) -> float:
    """Decode speed of one sequence alone: bandwidth-bound on GPUs, 1 / step time(1)."""
    return 1 / roofline.step_seconds(1, workload.average_context)


def max_concurrency_at_speed(roofline: Roofline, workload: Workload, tokens_per_s_per_user: float,
                             limit: int) -> int:
    """The largest B <= limit whose per-user speed (1 / TPOT) is at least the target; 0 if none.
    TPOT grows with B, so a binary search finds it."""
    def meets(batch: int) -> bool:
        return load_point(roofline, workload, batch).per_user_tokens_per_s >= tokens_per_s_per_user

    if limit < 1 or not meets(1):
        return 0
    low, high = 1, limit
    while low < high:
        middle = (low + high + 1) // 2
        if meets(middle):
            low = middle
        else:
            high = middle - 1
    return low
