"""Building blocks shared by the model implementations."""

from tokenmill.models.layers.attention import AttentionMetadata, build_attention_metadata, paged_attention
from tokenmill.models.layers.linear import PackedLinear
from tokenmill.models.layers.mlp import GatedMLP
from tokenmill.models.layers.norm import GemmaRMSNorm, RMSNorm
from tokenmill.models.layers.rotary import RotaryEmbedding, apply_rotary

__all__ = [
    "AttentionMetadata",
    "GatedMLP",
    "GemmaRMSNorm",
    "PackedLinear",
    "RMSNorm",
    "RotaryEmbedding",
    "apply_rotary",
    "build_attention_metadata",
    "paged_attention",
]
