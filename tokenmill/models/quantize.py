"""Weight-only quantization, applied to a loaded model by replacing its modules.

The model files know nothing of it: `quantize_model` walks the decoder and swaps
each projection (`nn.Linear`, including packed q/k/v and gate/up) for an int8
version with one scale per output channel (symmetric, absmax / 127). Embeddings
and the output layer stay in the model dtype: the tied embedding is also the
lookup table, and the logits are the most precision-sensitive product.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZATION_METHODS = ("int8",)


class Int8WeightOnlyLinear(nn.Module):
    """y = x @ (weight_int8 * scale)^T + bias, activations kept in their dtype.

    On CPU with 16-bit activations it uses PyTorch's int8 weight-pack kernel;
    otherwise it dequantizes on the fly (that kernel's float32 path measured ~10x
    slower than dequantize + dense matmul here).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()                    # [out, in]
        scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # [out]
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales)  # float32; cast to the activation dtype per call (tiny)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        # Packed projections (q/k/v, gate/up) keep their shard layout for `split`.
        self.shard_sizes = getattr(linear, "shard_sizes", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, self.in_features)                      # [num_tokens, in]
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
            out = torch.ops.aten._weight_int8pack_mm(x2d, self.weight_int8, self.scales.to(x.dtype))
        else:
            out = F.linear(x2d, self.weight_int8.to(x.dtype)) * self.scales.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return out.split(self.shard_sizes, dim=-1)


def quantize_model(model: nn.Module, method: str) -> nn.Module:
    """Quantize every linear projection of `model.model.layers` in place; returns the model.
    Raises ValueError for an unknown method."""
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"unknown quantization {method!r}; choose from: {', '.join(QUANTIZATION_METHODS)}")
    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8WeightOnlyLinear(child))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (weights, scales)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
