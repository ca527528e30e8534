"""Llama-family decoder: Llama 2/3, Mistral, Qwen2 and Qwen3.

The variants differ only in small switches read from the Hugging Face config:
Qwen2 always has q/k/v biases, Qwen3 RMS-normalizes each q/k head before rope,
Mistral (and Qwen2 sliding layers) restrict attention to a window, and Llama 3
scales its rope frequencies.
"""

import torch
from torch import nn

from tokenmill.models.base import PagedCausalLM
from tokenmill.models.layers.attention import AttentionMetadata, paged_attention
from tokenmill.models.layers.linear import PackedLinear
from tokenmill.models.layers.mlp import GatedMLP
from tokenmill.models.layers.norm import RMSNorm
from tokenmill.models.layers.rotary import RotaryEmbedding, rope_parameters, split_qk_rotary


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_windows(config) -> list[int | None]:
    """Window of each layer: per ``layer_types`` when given (Qwen2), else one for all (Mistral)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        return [window if t == "sliding_attention" else None for t in types]
    return [window] * config.num_hidden_layers


class LlamaAttention(nn.Module):
    def __init__(self, config, sliding_window: int | None):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim(config)
        attention_bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = attention_bias or config.model_type == "qwen2"
        self.qkv_proj = PackedLinear(
            config.hidden_size,
            {
                "q": self.num_heads * self.head_dim,
                "k": self.num_kv_heads * self.head_dim,
                "v": self.num_kv_heads * self.head_dim,
            },
            bias=qkv_bias,
        )
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=attention_bias)
        self.qk_norm = config.model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.scale = self.head_dim**-0.5
        self.sliding_window = sliding_window

    def forward(self, x, cos, sin, kv_cache, attn_metadata: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        # q [num_tokens, num_heads, head_dim], k and v [num_tokens, kv_heads, head_dim]; q and k rotated.
        q, k, v = split_qk_rotary(self.qkv_proj(x), self.num_heads, self.num_kv_heads, self.head_dim, cos, sin,
                                  self.q_norm if self.qk_norm else None, self.k_norm if self.qk_norm else None)
        o = paged_attention(q, k, v, kv_cache, attn_metadata, self.scale, self.sliding_window)
        return self.o_proj(o.reshape(num_tokens, self.num_heads * self.head_dim))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, sliding_window: int | None):
        super().__init__()
        self.self_attn = LlamaAttention(config, sliding_window)
        self.mlp = GatedMLP(
            config.hidden_size,
            config.intermediate_size,
            getattr(config, "hidden_act", "silu"),
            bias=bool(getattr(config, "mlp_bias", False)),
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, h, residual, cos, sin, kv_cache, attn_metadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it): the next
        layer (or the final norm) adds them as it normalizes."""
        if residual is None:
            residual, h = h, self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(h, cos, sin, kv_cache, attn_metadata)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        # Weights always come from a checkpoint: passing storage skips the
        # random init, which is slow for large vocabularies.
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size)
        )
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, w) for w in sliding_windows(config))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary = RotaryEmbedding(head_dim(config), rope_parameters(config))

    def forward(self, input_ids, positions, kv_caches, attn_metadata) -> torch.Tensor:
        h = self.embed_tokens(input_ids)  # [num_tokens, hidden]
        cos, sin = self.rotary(positions, h.dtype)  # shared by every layer
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            h, residual = layer(h, residual, cos, sin, kv_cache, attn_metadata)
        return self.norm(h, residual)[0]


class LlamaForCausalLM(PagedCausalLM):
    """Llama-family causal LM over a paged KV cache (one cache pair per layer)."""

    def __init__(self, config):
        super().__init__(config, LlamaModel(config), tied=getattr(config, "tie_word_embeddings", False))

    def remap_checkpoint_name(self, name: str) -> str | None:
        """Map a checkpoint tensor name to this model's naming; None skips it."""
        if "rotary_emb.inv_freq" in name:
            return None  # precomputed buffer stored by old checkpoints
        if name.startswith("lm_head.") and self.lm_head is None:
            return None
        return name
