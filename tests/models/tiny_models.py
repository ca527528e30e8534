"""Tiny random-weight Hugging Face models, one per supported architecture."""

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 256
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=None,
    eos_token_id=None,  # greedy generation must never stop early
    pad_token_id=None,
)


def tiny_config(arch: str):
    if arch == "gemma3":
        return Gemma3TextConfig(
            **_COMMON,
            num_hidden_layers=4,
            head_dim=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            sliding_window=8,
            query_pre_attn_scalar=24,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            },
            final_logit_softcapping=5.0,
            tie_word_embeddings=True,
        )
    if arch == "llama":
        return LlamaConfig(
            **_COMMON,
            num_hidden_layers=3,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500_000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            tie_word_embeddings=False,
        )
    if arch == "mistral":
        return MistralConfig(**_COMMON, num_hidden_layers=2, sliding_window=8, tie_word_embeddings=False)
    if arch == "qwen2":
        return Qwen2Config(**_COMMON, num_hidden_layers=2, rope_theta=1_000_000.0, tie_word_embeddings=True)
    if arch == "qwen3":
        return Qwen3Config(**_COMMON, num_hidden_layers=2, head_dim=32, tie_word_embeddings=False)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0):
    """Eager-attention HF model with weights large enough to give decisive logits."""
    return random_model(tiny_config(arch), seed)


def random_model(config, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))  # around 1 for Llama norms, around 0 for Gemma's
            else:
                p.normal_(0.0, 0.1)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model
