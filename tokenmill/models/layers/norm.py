"""RMSNorm variants. Both normalize in float32 whatever the activation dtype.

`forward(x)` returns the norm of x; `forward(x, residual)` first adds x to the
residual stream and returns ``(norm(residual + x), residual + x)`` — the fused
add-and-norm between decoder layers. On CPU both run as one fused kernel
(tokenmill/kernels), which updates `residual` in place.
"""

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.kernels import cpu_kernels_for


class RMSNorm(nn.Module):
    """Llama-style RMSNorm: ``weight * normalize(x)``, cast back before scaling."""

    gemma = False  # the kernels' flag for (1 + weight) scaling in float32

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        h = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps)
        return self.weight * h.to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if cpu_kernels_for(x) and x.is_contiguous() and self.weight.dtype == x.dtype:
            if residual is None:
                return torch.ops.tokenmill.rms_norm(x, self.weight, self.eps, self.gemma)
            if residual.is_contiguous():
                return torch.ops.tokenmill.add_rms_norm(x, residual, self.weight, self.eps, self.gemma), residual
        if residual is None:
            return self._norm(x)
        residual = residual + x
        return self._norm(residual), residual


class GemmaRMSNorm(RMSNorm):
    """Gemma RMSNorm: ``normalize(x) * (1 + weight)``, scaled in float32 then cast.

    The stored weight is the offset from one, as in Hugging Face checkpoints.
    """

    gemma = True

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__(dim, eps)
        self.weight = nn.Parameter(torch.zeros(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), x.shape[-1:], 1.0 + self.weight.float(), self.eps).to(x.dtype)
