"""Model definitions and loading: Gemma 3 and the Llama family over a paged KV cache."""

from tokenmill.models.layers.attention import AttentionMetadata, build_attention_metadata, paged_attention
from tokenmill.models.loader import LoadedModel, ModelInfo, load_model

__all__ = [
    "AttentionMetadata",
    "LoadedModel",
    "ModelInfo",
    "build_attention_metadata",
    "load_model",
    "paged_attention",
]
