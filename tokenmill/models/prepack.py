"""Projection weights pre-packed once for the CPU's matmul library (oneDNN).

`torch.nn.functional.linear` on CPU hands oneDNN a plain row-major weight, which
oneDNN reorders into its blocked layout on *every* call. For a decode step that
reorder costs more than the multiply itself: the 262,144 x 640 output layer of
Gemma 3 270M took 26 ms per bf16 call at 32 rows against 17 ms pre-packed, and
the decoder's projections run about twice as fast pre-packed at 1-32 rows. So,
like quantization, `prepack_model` rewrites a loaded model from outside: every
decoder `nn.Linear` (packed q/k/v and gate/up included) becomes a
`PrepackedLinear`, and the output layer gets a pre-packed copy of its weight.

The packed layout is opaque and CPU-only; on other devices, or where oneDNN is
missing, the model is left as it is. Results equal `F.linear` up to the
summation order of the blocked kernel (no change of precision).
"""
from __future__ import annotations

import torch
from torch import nn


def prepack_supported(device: torch.device | str, dtype: torch.dtype) -> bool:
    """True when pre-packed oneDNN linears exist for `dtype` on `device`."""
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return dtype == torch.float32


class PrepackedLinear(nn.Module):
    """``y = x @ weight^T + bias`` with `weight` held in oneDNN's blocked layout.

    `batch_hint` is the row count the packing is tuned for; any row count works.
    Keeps `shard_sizes` of a packed projection so `split` still works.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int = 32,
                 shard_sizes: list[int] | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        weight = weight.detach().contiguous()
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint))
        self.register_buffer("bias", None if bias is None else bias.detach().to(weight.dtype).contiguous())
        self.shard_sizes = shard_sizes

    @classmethod
    def from_linear(cls, linear: nn.Linear, batch_hint: int = 32) -> PrepackedLinear:
        return cls(linear.weight, linear.bias, batch_hint, getattr(linear, "shard_sizes", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, self.in_features)  # [num_tokens, in]
        if not x2d.is_contiguous():
            x2d = x2d.contiguous()
        out = torch.ops.mkldnn._linear_pointwise(x2d, self.packed_weight, self.bias, "none", [], "")
        return out.view(*shape[:-1], self.out_features)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return out.split(self.shard_sizes, dim=-1)


def prepack_model(model: nn.Module, dtype: torch.dtype, device: torch.device | str, batch_hint: int = 32) -> bool:
    """Pre-pack the decoder projections and the output layer of a loaded
    `PagedCausalLM` computing in `dtype` on `device`, in place. Returns False
    (and changes nothing) where pre-packing does not apply. Idempotent; modules
    that are not plain dense linears (quantized ones, an output head already
    set) are left alone."""
    if not prepack_supported(device, dtype):
        return False
    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, PrepackedLinear.from_linear(child, batch_hint))
    if model.output_head is None:
        # The plain weight stays too: tied models look embeddings up in it.
        model.output_head = PrepackedLinear(model.output_weight(), None, batch_hint)
    return True
