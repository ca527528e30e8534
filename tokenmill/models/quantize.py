"""Weight-only quantization, applied to a loaded model by replacing its modules.

The model files know nothing of it: `quantize_model` walks the decoder and swaps
each projection (`nn.Linear`, including packed q/k/v and gate/up) for a
quantized one:

- ``int8``: symmetric, one scale per output channel (absmax / 127).
- ``int4``: asymmetric 4-bit in groups of 32 input channels (a scale and a zero
  point per group, as llama.cpp's Q4 formats), the grid searched per group.

Activations stay in the model dtype. On CPU the matmuls use PyTorch's
weight-only kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`),
which read the small weights directly; their cost grows with the number of
rows, so a step of more than `dense_above` rows (a prefill chunk, a large
decode batch) dequantizes the weight once and runs one dense matmul instead.
Other devices always take the dequantize path.

The embedding and the output layer stay in the model dtype. The output layer
(168M of Gemma 3 270M's 268M parameters) is where quantization would save the
most memory, but no CPU kernel multiplies an int8 weight by a batch of bf16
rows faster than the dense bf16 one: at 32 rows PyTorch's int8 kernel took
154 ms for it and dequantizing it every step 300 ms, against 17-20 ms dense.
So a decode batch would pay for the memory saved with most of its speed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.kernels import cpu_kernels_for

QUANTIZATION_METHODS = ("int8", "int4")
INT4_GROUP_SIZE = 32
INT8_FUSED_MAX_IN = 8192  # kInt8MaxK in kernels/cpu_ops.cpp


def _cpu_kernel_ok(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16, torch.float32)


class Int8WeightOnlyLinear(nn.Module):
    """y = x @ (weight_int8 * scale)^T + bias, activations kept in their dtype.

    `fused_rows`: up to this many rows, tokenmill's own AVX-512 kernel
    (`torch.ops.tokenmill.int8_linear`: activations quantized per row to int16,
    integer dot products) when the fused CPU kernels are loaded; it read the 100 MB
    of Gemma 3 270M's int8 decoder weights in 5.7-6 ms at 1 row against 7.3 ms for
    PyTorch's int8 kernel, and 16.7 against 28.7 ms at 16 rows.
    `dense_above`: above this many rows, dequantize and run a dense matmul. The
    PyTorch int8 kernel's cost is proportional to the rows (0.09 ms at 1 row, 1.3 ms
    at 32 for a 4096 x 640 weight on a 2-core AVX-512 CPU); dequantizing costs about
    the same whatever the rows. In the engine, Gemma 3 270M's decode step at 32
    rows took 97 ms with that kernel and 85 ms dequantizing, hence 24."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, dense_above: int = 24,
                 shard_sizes: list[int] | None = None, fused_rows: int = 16) -> None:
        super().__init__()
        weight = weight.detach().float()                           # [out, in]
        scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # [out]
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight_int8", torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales)  # float32 (PyTorch's int8 kernel gets a cached cast)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.dense_above = dense_above
        self.fused_rows = fused_rows
        # The fused kernel's int32 sums are exact for inputs of up to 8192 columns, in steps of 32.
        self._fused_width = self.in_features % 32 == 0 and self.in_features <= INT8_FUSED_MAX_IN
        self._cast_scales: torch.Tensor | None = None
        # Packed projections (q/k/v, gate/up) keep their shard layout for `split`.
        self.shard_sizes = shard_sizes

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8WeightOnlyLinear:
        return cls(linear.weight, linear.bias, shard_sizes=getattr(linear, "shard_sizes", None))

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight ``[out, in]`` as the kernels see it, in `dtype`."""
        return self.weight_int8.to(dtype) * self.scales.to(dtype)[:, None]

    def _scales_as(self, dtype: torch.dtype) -> torch.Tensor:
        cached = self._cast_scales
        if cached is None or cached.dtype != dtype or cached.device != self.scales.device:
            self._cast_scales = self.scales.to(dtype)
        return self._cast_scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, self.in_features)                      # [num_tokens, in]
        rows = x2d.shape[0]
        if rows <= self.fused_rows and self._fused_width and cpu_kernels_for(x2d) and (
                self.bias is None or self.bias.dtype == x.dtype):
            out = torch.ops.tokenmill.int8_linear(x2d.contiguous(), self.weight_int8, self.scales, self.bias)
        elif rows <= self.dense_above and _cpu_kernel_ok(x2d):
            out = torch.ops.aten._weight_int8pack_mm(x2d.contiguous(), self.weight_int8, self._scales_as(x.dtype))
            if self.bias is not None:
                out = out + self.bias
        else:
            out = F.linear(x2d, self.dequantized(x.dtype), self.bias)
        return out.reshape(*shape[:-1], self.out_features)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return out.split(self.shard_sizes, dim=-1)


def _unpack_int4_cpu(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Invert `_convert_weight_to_int4pack_for_cpu`: ``[out, in/2]`` uint8 -> ``[out, in]`` values 0..15.

    The kernel's layout (torch 2.13): output channels in blocks of 64; within a
    block, byte ``[k // 2, (n % 32) + 32 * (k % 2)]`` holds channel ``n < 32`` in
    its low nibble and ``n + 32`` in its high one. `Int4WeightOnlyLinear` checks
    this round trip on a test matrix before relying on it.
    """
    blocks = packed.view(out_features // 64, in_features // 2, 2, 32)  # [block, k // 2, k % 2, n % 32]
    nibbles = torch.stack([blocks & 15, blocks >> 4], dim=-1)           # [..., n // 32 within the block]
    return nibbles.permute(0, 4, 3, 1, 2).reshape(out_features, in_features)


def _int4_layout_understood() -> bool:
    values = torch.arange(64 * 128, dtype=torch.int32).view(64, 128) % 16
    values = values.roll(shifts=(3, 5), dims=(0, 1))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)
    return torch.equal(_unpack_int4_cpu(packed, 64, 128).to(torch.int32), values)


def _int4_quantize_groups(groups: torch.Tensor, steps: int = 16,
                          refinements: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit codes for ``groups [out, num_groups, group]`` (float32).

    Each group's grid is ``low + q * scale``, q in 0..15. Spanning exactly
    [min, max] wastes levels on outliers, so the range is also tried shrunk
    (both ends toward the middle, by up to 30% in `steps` steps) and each group
    keeps the grid with the least squared error, as llama.cpp's quantizers search;
    then the grid is refitted by least squares to the chosen codes and the codes
    re-rounded, `refinements` times, keeping any improvement.
    Returns (codes uint8, scale, low), the last two ``[out, num_groups]``."""
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    best_error = best_codes = best_scale = best_low = None
    for shrink in torch.linspace(0.0, 0.3, steps).tolist():
        margin = (high - low) * shrink / 2
        trial_low, trial_high = low + margin, high - margin
        scale = ((trial_high - trial_low) / 15.0).clamp(min=1e-8)
        codes = torch.round((groups - trial_low[..., None]) / scale[..., None]).clamp(0, 15)
        error = ((codes * scale[..., None] + trial_low[..., None] - groups) ** 2).sum(dim=-1)
        if best_error is None:
            best_error, best_codes, best_scale, best_low = error, codes, scale, trial_low
            continue
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_codes = torch.where(better[..., None], codes, best_codes)
        best_scale = torch.where(better, scale, best_scale)
        best_low = torch.where(better, trial_low, best_low)
    for _ in range(refinements):
        # Least-squares grid for the chosen codes (2x2 normal equations per group), then re-round.
        n = groups.shape[-1]
        sum_q, sum_w = best_codes.sum(-1), groups.sum(-1)
        sum_qq, sum_qw = (best_codes * best_codes).sum(-1), (best_codes * groups).sum(-1)
        det = n * sum_qq - sum_q * sum_q
        solvable = det > 0
        scale = torch.where(solvable, (n * sum_qw - sum_q * sum_w) / det.clamp(min=1e-12), best_scale).clamp(min=1e-8)
        trial_low = torch.where(solvable, (sum_w - scale * sum_q) / n, best_low)
        codes = torch.round((groups - trial_low[..., None]) / scale[..., None]).clamp(0, 15)
        error = ((codes * scale[..., None] + trial_low[..., None] - groups) ** 2).sum(dim=-1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_codes = torch.where(better[..., None], codes, best_codes)
        best_scale = torch.where(better, scale, best_scale)
        best_low = torch.where(better, trial_low, best_low)
    return best_codes.to(torch.uint8), best_scale, best_low


class Int4WeightOnlyLinear(nn.Module):
    """y = x @ W^T + bias with W stored as 4-bit codes q (0..15) per group of
    `group_size` input channels: ``W = (q - 8) * scale + zero``.

    On CPU the codes are kept only in the packed layout of PyTorch's int4 kernel
    (half a byte per weight); rows beyond `dense_above` unpack them once for a
    dense matmul. Unpacking is slow, so the kernel wins up to about 200 rows of
    a 4096 x 640 weight (1.1 ms at 32 rows against 8.5 ms; Gemma 3 270M's decode
    step at 32 rows: 86 ms with the kernel, 203 ms unpacking). Elsewhere the
    codes are kept two per byte and dequantized."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = INT4_GROUP_SIZE,
                 dense_above: int = 160, shard_sizes: list[int] | None = None) -> None:
        super().__init__()
        weight = weight.detach().float()
        self.out_features, self.in_features = weight.shape
        if self.in_features % group_size:
            raise ValueError(f"in_features {self.in_features} is not a multiple of the int4 group size {group_size}")
        self.group_size = group_size
        codes, scale, low = _int4_quantize_groups(weight.view(self.out_features, -1, group_size))
        codes = codes.view(self.out_features, self.in_features).to(torch.int32)
        zero = low + 8.0 * scale                                       # so that W = (q - 8) * scale + zero
        self.register_buffer("scales_and_zeros", torch.stack([scale.t(), zero.t()], dim=-1).contiguous())
        self.cpu_layout = (weight.device.type == "cpu" and self.out_features % 64 == 0
                           and self.in_features % 2 == 0 and _int4_layout_understood())
        if self.cpu_layout:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        else:
            pairs = codes.to(torch.uint8).view(self.out_features, -1, 2)
            packed = pairs[..., 0] | (pairs[..., 1] << 4)
        self.register_buffer("weight_int4", packed)                    # [out, in / 2] uint8
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.dense_above = dense_above
        self.shard_sizes = shard_sizes

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int4WeightOnlyLinear:
        return cls(linear.weight, linear.bias, shard_sizes=getattr(linear, "shard_sizes", None))

    def codes(self) -> torch.Tensor:
        """The 4-bit codes ``[out, in]`` (uint8, 0..15)."""
        if self.cpu_layout:
            return _unpack_int4_cpu(self.weight_int4, self.out_features, self.in_features)
        return torch.stack([self.weight_int4 & 15, self.weight_int4 >> 4], dim=-1).view(
            self.out_features, self.in_features)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        groups = self.codes().to(dtype).sub_(8).view(self.out_features, -1, self.group_size)
        scale = self.scales_and_zeros[..., 0].t().to(dtype)[..., None]  # [out, in / group, 1]
        zero = self.scales_and_zeros[..., 1].t().to(dtype)[..., None]
        return (groups * scale + zero).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, self.in_features)
        if self.cpu_layout and x2d.shape[0] <= self.dense_above and _cpu_kernel_ok(x2d):
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2d.contiguous(), self.weight_int4, self.group_size, self.scales_and_zeros.to(x.dtype))
            if self.bias is not None:
                out = out + self.bias
        else:
            out = F.linear(x2d, self.dequantized(x.dtype), self.bias)
        return out.reshape(*shape[:-1], self.out_features)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return out.split(self.shard_sizes, dim=-1)


_PROJECTIONS = {"int8": Int8WeightOnlyLinear, "int4": Int4WeightOnlyLinear}


def quantize_model(model: nn.Module, method: str) -> nn.Module:
    """Quantize every linear projection of `model.model.layers` (a `PagedCausalLM`)
    in place; returns the model. Raises ValueError for an unknown method."""
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"unknown quantization {method!r}; choose from: {', '.join(QUANTIZATION_METHODS)}")
    projection = _PROJECTIONS[method]
    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, projection.from_linear(child))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (weights, scales), each counted once."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())
