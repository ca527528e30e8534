"""Rotary position embeddings (rotate-half convention) with Llama 3 / linear scaling."""

import math

import torch
from torch import nn

from tokenmill.kernels import cpu_kernels_for

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(
    config, layer_type: str | None = None, legacy_theta_attr: str = "rope_theta", default_theta: float = 10000.0
) -> dict:
    """Return ``{"rope_type", "rope_theta", ...scaling keys}`` for one layer type.

    Accepts both the transformers 5.x layout (``config.rope_parameters``, flat or
    keyed by layer type) and the older ``rope_theta`` + ``rope_scaling`` one, where
    ``legacy_theta_attr`` names the base (Gemma 3 keeps its local base in
    ``rope_local_base_freq``, and only its global layers are scaled).
    """
    legacy_theta = getattr(config, legacy_theta_attr, None) or default_theta
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        if layer_type is not None and isinstance(params.get(layer_type), dict):
            params = params[layer_type]
        if not any(isinstance(v, dict) for v in params.values()):
            params = dict(params)
            params["rope_type"] = params.pop("type", params.get("rope_type", "default"))
            params.setdefault("rope_theta", legacy_theta)
            return params
    params = {"rope_type": "default", "rope_theta": float(legacy_theta)}
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict) and legacy_theta_attr == "rope_theta":
        params.update(scaling)
        params["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
        params.pop("type", None)
    return params


def rope_inv_freq(head_dim: int, params: dict) -> torch.Tensor:
    """Float32 CPU inverse frequencies ``[head_dim // 2]`` for ``params`` (see :func:`rope_parameters`)."""
    rope_type = params.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial rotary embeddings are not supported")
    base = float(params["rope_theta"])
    # Explicit CPU/float32 so the frequencies stay exact even when the model is
    # built on the meta device or later cast to a low-precision dtype.
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (base**exponent)  # [head_dim // 2]
    if rope_type == "linear":
        return inv_freq / float(params["factor"])
    if rope_type == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_ctx = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths (beyond the original context) are slowed by `factor`,
        # short ones kept, and the band in between blends the two smoothly.
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        in_band = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return torch.where(in_band, blended, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Produces per-token ``cos``/``sin`` tables; apply them with :func:`apply_rotary`."""

    def __init__(self, head_dim: int, params: dict):
        super().__init__()
        self.head_dim = head_dim
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, params), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions [num_tokens]`` -> ``(cos, sin)``, each ``[num_tokens, 1, head_dim]`` in ``dtype``."""
        # Angles in float32: bf16 positions * frequencies would lose whole radians.
        freqs = positions[:, None].float() * self.inv_freq.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [num_tokens, 1, head_dim]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [num_tokens, num_heads, head_dim]`` by the per-token angles."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


def split_qk_rotary(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, cos: torch.Tensor,
                    sin: torch.Tensor, q_norm: nn.Module | None = None, k_norm: nn.Module | None = None):
    """The fused q/k/v projection ``[num_tokens, (H + 2 KV) * D]`` -> q ``[num_tokens, H, D]``
    and k ``[num_tokens, KV, D]``, each RMS-normalized per head by `q_norm` / `k_norm`
    when given and then rotated, and v ``[num_tokens, KV, D]``. One fused kernel on CPU."""
    num_tokens = qkv.shape[0]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    v = qkv[:, q_size + kv_size:].view(num_tokens, num_kv_heads, head_dim)
    if (cpu_kernels_for(qkv) and qkv.is_contiguous() and cos.dtype == qkv.dtype
            and (q_norm is None or q_norm.weight.dtype == qkv.dtype)):
        q, k = torch.ops.tokenmill.qk_norm_rope(
            qkv, None if q_norm is None else q_norm.weight, None if k_norm is None else k_norm.weight,
            cos.contiguous(), sin.contiguous(), num_heads, num_kv_heads, head_dim,
            q_norm.eps if q_norm is not None else 0.0, bool(getattr(q_norm, "gemma", False)))
        return q, k, v
    q = qkv[:, :q_size].view(num_tokens, num_heads, head_dim)
    k = qkv[:, q_size:q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v
