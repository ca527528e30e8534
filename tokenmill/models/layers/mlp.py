"""Gated feed-forward block shared by the Llama and Gemma families."""

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.kernels import cpu_kernels_for
from tokenmill.models.layers.linear import PackedLinear

ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


# Activations the fused CPU kernel computes, by the kernel's name for them.
_KERNEL_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def get_activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with gate and up fused into one projection."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, bias: bool = False):
        super().__init__()
        self.gate_up_proj = PackedLinear(hidden_size, {"gate": intermediate_size, "up": intermediate_size}, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = get_activation(activation)
        self.kernel_activation = _KERNEL_ACTIVATIONS.get(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [num_tokens, 2 * intermediate]
        if self.kernel_activation is not None and cpu_kernels_for(gate_up) and gate_up.is_contiguous():
            return self.down_proj(torch.ops.tokenmill.gated_activation(gate_up, self.kernel_activation))
        gate, up = self.gate_up_proj.split(gate_up)  # each [num_tokens, intermediate]
        return self.down_proj(self.act(gate) * up)
