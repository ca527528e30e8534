"""Read llama.cpp GGUF files: the Hugging Face config they describe and their weights.

Weights come out dequantized to float32 under Hugging Face names, with
llama.cpp's storage conventions undone (Gemma norms stored as 1 + weight,
Llama q/k rows permuted for interleaved rotary).
"""

import re

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from transformers import AutoConfig

from tokenmill.models.layers.rotary import rope_inv_freq

_ARCHITECTURES = {
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}

_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}
# Gemma norms around both sublayers; llama.cpp's "ffn_norm" is the pre-MLP one.
_GEMMA3_LAYER_TENSORS = {
    **_LAYER_TENSORS,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def _field(reader: GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader: GGUFReader):
    """Build the Hugging Face config a GGUF file describes."""
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        supported = ", ".join(sorted(_ARCHITECTURES))
        raise ValueError(f"GGUF architecture {arch!r} is not supported (supported: {supported})")
    model_type, hf_arch = _ARCHITECTURES[arch]

    def meta(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    tensors = {t.name: t for t in reader.tensors}
    hidden, heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    kv_heads = meta("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        if len(set(kv_heads)) != 1:
            raise ValueError("GGUF files with a per-layer number of KV heads are not supported")
        kv_heads = kv_heads[0]
    head_dim = int(meta("attention.key_length") or meta("rope.dimension_count") or hidden // heads)
    num_layers = int(meta("block_count"))
    cfg = {
        "architectures": [hf_arch],
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": head_dim,
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(meta("context_length", 4096)),
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }
    theta = float(meta("rope.freq_base", 1_000_000.0 if arch == "gemma3" else 10_000.0))
    rope = {"rope_type": "default", "rope_theta": theta}
    if meta("rope.scaling.type") == "linear":
        rope = {"rope_type": "linear", "rope_theta": theta, "factor": float(meta("rope.scaling.factor"))}

    if arch == "gemma3":
        # llama.cpp scales queries by 1/sqrt(head_dim), except for the 62-layer
        # 27B model whose query_pre_attn_scalar is hidden_size / num_heads.
        scalar = hidden // heads if num_layers == 62 else head_dim
        cfg.update(
            query_pre_attn_scalar=scalar,
            sliding_window=int(meta("attention.sliding_window", 4096)),
            # Every sixth layer is global: the pattern of all Gemma 3 checkpoints.
            layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(num_layers)],
            rope_parameters={"full_attention": rope, "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
            hidden_activation="gelu_pytorch_tanh",
            final_logit_softcapping=meta("final_logit_softcapping"),
        )
    else:
        if "rope_freqs.weight" in tensors:
            factors = torch.from_numpy(_dequantize(tensors["rope_freqs.weight"]).copy()).flatten()
            rope = _llama3_rope_from_factors(factors, theta, head_dim)
        cfg["rope_parameters"] = rope
        if arch == "llama":
            cfg["attention_bias"] = "blk.0.attn_q.bias" in tensors
    return AutoConfig.for_model(model_type, **cfg)


def _llama3_rope_from_factors(factors: torch.Tensor, theta: float, head_dim: int) -> dict:
    """llama.cpp stores Llama 3 rope scaling as per-frequency divisors; recover the parameters.

    All Llama 3.x releases use low/high frequency factors 1 and 4 around an 8192
    original context; only the overall factor varies, and it is the largest divisor.
    """
    params = {
        "rope_type": "llama3",
        "rope_theta": theta,
        "factor": float(factors.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    base = rope_inv_freq(head_dim, {"rope_type": "default", "rope_theta": theta})
    if not torch.allclose(base / rope_inv_freq(head_dim, params), factors, rtol=1e-3):
        raise ValueError("the GGUF rope_freqs tensor does not match Llama 3 rope scaling; unsupported rope variant")
    return params


def _dequantize(tensor) -> np.ndarray:
    """Float32 array in PyTorch layout ``[rows, cols]`` (GGUF lists dims innermost first)."""
    array = dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return array.reshape(shape)


def _unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation for interleaved rotary.

    llama.cpp reorders each head's rows from [first half, second half] to
    pairs (i, i + head_dim/2) adjacent; rotate-half rope needs the original order.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(reader: GGUFReader, config):
    """Yield ``(hugging_face_name, float32 tensor)`` for every weight of the model."""
    arch = _field(reader, "general.architecture")
    layer_map = _GEMMA3_LAYER_TENSORS if arch == "gemma3" else _LAYER_TENSORS
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue  # folded into the config's rope parameters
        base, _, suffix = t.name.rpartition(".")
        if base in _GLOBAL_TENSORS:
            name = f"{_GLOBAL_TENSORS[base]}.{suffix}"
        elif (m := _LAYER_NAME.fullmatch(t.name)) and m.group(2) in layer_map:
            name = f"model.layers.{m.group(1)}.{layer_map[m.group(2)]}.{m.group(3)}"
        else:
            raise ValueError(f"unexpected tensor {t.name!r} in {arch} GGUF file")
        array = _dequantize(t)
        if array.dtype != np.float32 or not array.flags.writeable:
            array = array.astype(np.float32)  # F32 tensors are read-only views of the mmapped file
        w = torch.from_numpy(array)
        if arch == "gemma3" and name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma's (1 + weight) norm scale pre-added
        elif arch == "llama" and base.endswith(".attn_q"):
            w = _unpermute_rotary(w, config.num_attention_heads)
        elif arch == "llama" and base.endswith(".attn_k"):
            w = _unpermute_rotary(w, config.num_key_value_heads)
        yield name, w
