"""Gemma 3 text decoder (Hugging Face ``Gemma3ForCausalLM``, model_type ``gemma3_text``).

Differences from Llama that matter here: embeddings scaled by sqrt(hidden_size),
(1 + weight) RMSNorms, q/k norms, norms after attention and MLP as well as
before, gelu-tanh MLP, ``query_pre_attn_scalar`` softmax scale, and interleaved
sliding-window / global layers with their own rope bases.
"""

import torch
from torch import nn

from tokenmill.models.base import PagedCausalLM
from tokenmill.models.layers.attention import AttentionMetadata, paged_attention
from tokenmill.models.layers.linear import PackedLinear
from tokenmill.models.layers.mlp import GatedMLP
from tokenmill.models.layers.norm import GemmaRMSNorm
from tokenmill.models.layers.rotary import RotaryEmbedding, rope_parameters, split_qk_rotary

SLIDING, FULL = "sliding_attention", "full_attention"

# Checkpoint prefixes of the multimodal Gemma3ForConditionalGeneration, in the
# layouts written by transformers 4.x and 5.x, mapped to the text-only layout.
_MULTIMODAL_PREFIXES = {
    "language_model.model.": "model.",
    "language_model.lm_head.": "lm_head.",
    "model.language_model.": "model.",
}
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def layer_types(config) -> list[str]:
    """Per-layer attention kind; older configs only give the sliding pattern period."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    period = getattr(config, "sliding_window_pattern", None) or getattr(config, "_sliding_window_pattern", 6)
    return [SLIDING if (i + 1) % period else FULL for i in range(config.num_hidden_layers)]


class Gemma3Attention(nn.Module):
    def __init__(self, config, layer_type: str):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.qkv_proj = PackedLinear(
            config.hidden_size,
            {
                "q": self.num_heads * self.head_dim,
                "k": self.num_kv_heads * self.head_dim,
                "v": self.num_kv_heads * self.head_dim,
            },
            bias=bool(getattr(config, "attention_bias", False)),
        )
        self.o_proj = nn.Linear(
            self.num_heads * self.head_dim, config.hidden_size, bias=bool(getattr(config, "attention_bias", False))
        )
        self.q_norm = GemmaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.scale = config.query_pre_attn_scalar**-0.5
        self.sliding_window = config.sliding_window if layer_type == SLIDING else None

    def forward(self, x, cos, sin, kv_cache, attn_metadata: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        # q [num_tokens, num_heads, head_dim], k and v [num_tokens, kv_heads, head_dim]; q and k normed, rotated.
        q, k, v = split_qk_rotary(self.qkv_proj(x), self.num_heads, self.num_kv_heads, self.head_dim, cos, sin,
                                  self.q_norm, self.k_norm)
        o = paged_attention(q, k, v, kv_cache, attn_metadata, self.scale, self.sliding_window)
        return self.o_proj(o.reshape(num_tokens, self.num_heads * self.head_dim))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        self.self_attn = Gemma3Attention(config, layer_type)
        activation = getattr(config, "hidden_activation", None) or config.hidden_act
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, activation)
        eps = config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps=eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps=eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps=eps)

    def forward(self, h, residual, cos, sin, kv_cache, attn_metadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's output not yet added to the residual stream, the stream):
        the next layer (or the final norm) adds them as it normalizes."""
        if residual is None:
            residual, h = h, self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.post_attention_layernorm(self.self_attn(h, cos, sin, kv_cache, attn_metadata))
        h, residual = self.pre_feedforward_layernorm(h, residual)
        return self.post_feedforward_layernorm(self.mlp(h)), residual


class Gemma3Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.hidden_size = config.hidden_size
        # Weights always come from a checkpoint: passing storage skips the
        # random init, which is slow for large vocabularies.
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size)
        )
        types = layer_types(config)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, t) for t in types)
        self.norm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary = nn.ModuleDict(
            {
                FULL: RotaryEmbedding(config.head_dim, rope_parameters(config, FULL, "rope_theta", 1_000_000.0)),
                SLIDING: RotaryEmbedding(
                    config.head_dim, rope_parameters(config, SLIDING, "rope_local_base_freq", 10_000.0)
                ),
            }
        )

    def forward(self, input_ids, positions, kv_caches, attn_metadata) -> torch.Tensor:
        h = self.embed_tokens(input_ids)  # [num_tokens, hidden]
        # The normalizer is rounded to the activation dtype first, as the
        # reference implementation does (sqrt(640) is 25.25 in bf16, not 25.298).
        h = h * torch.tensor(self.hidden_size**0.5, dtype=h.dtype).item()
        rope = {kind: emb(positions, h.dtype) for kind, emb in self.rotary.items()}
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            cos, sin = rope[layer.layer_type]
            h, residual = layer(h, residual, cos, sin, kv_cache, attn_metadata)
        return self.norm(h, residual)[0]


class Gemma3ForCausalLM(PagedCausalLM):
    """Gemma 3 text model over a paged KV cache (one cache pair per layer)."""

    def __init__(self, config):
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise ValueError("attention logit softcapping is not supported (Gemma 3 checkpoints do not use it)")
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("bidirectional Gemma 3 variants are encoders, not causal language models")
        super().__init__(config, Gemma3Model(config), tied=getattr(config, "tie_word_embeddings", True),
                         final_logit_softcapping=getattr(config, "final_logit_softcapping", None))

    def remap_checkpoint_name(self, name: str) -> str | None:
        """Map a checkpoint tensor name to this model's naming; None skips it."""
        if name.startswith(_VISION_PREFIXES):
            return None
        for old, new in _MULTIMODAL_PREFIXES.items():
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        if name.startswith("lm_head.") and self.lm_head is None:
            return None
        return name
