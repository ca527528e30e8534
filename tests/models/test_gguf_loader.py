"""GGUF loading: tiny files written the way llama.cpp's converter writes them."""

import os

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from paged_harness import PagedHarness
from tiny_models import VOCAB, random_model, tiny_model
from transformers import Gemma3TextConfig, LlamaConfig

from tokenmill.models import gguf_cache, load_model
from tokenmill.models.layers.rotary import rope_inv_freq

_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LLAMA_LAYER = {**_LAYER, "post_attention_layernorm": "ffn_norm"}
_GEMMA_LAYER = {
    **_LAYER,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's reordering of q/k rows for its interleaved rotary kernel."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str, layer_map: dict[str, str]) -> str:
    base, suffix = hf_name.rsplit(".", 1)
    glob = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    if base in glob:
        return f"{glob[base]}.{suffix}"
    _, _, layer, module = base.split(".", 3)
    return f"blk.{layer}.{layer_map[module]}.{suffix}"


def write_gguf(path, arch: str, ref, rope_freqs: np.ndarray | None = None) -> None:
    """Write ``ref`` as llama.cpp would, and round ``ref``'s weights to the stored precision.

    Attention weights are stored as F16 and MLP weights as Q8_0, so the file
    exercises dequantization; norms stay F32.
    """
    cfg = ref.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch == "gemma3":
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_sliding_window(cfg.sliding_window)
        writer.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
        layer_map = _GEMMA_LAYER
    else:
        writer.add_rope_dimension_count(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        layer_map = _LLAMA_LAYER
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))

    with torch.no_grad():
        for name, param in ref.named_parameters():
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            w = param.detach().float().numpy()
            if "norm" in name:
                stored, qtype = w + 1.0 if arch == "gemma3" else w, None
            elif "mlp." in name:
                stored, qtype = gguf.quants.quantize(w, Q.Q8_0), Q.Q8_0
                w = gguf.quants.dequantize(stored, Q.Q8_0)
            else:
                w = w.astype(np.float16).astype(np.float32)
                stored, qtype = w.astype(np.float16), None
            param.copy_(torch.from_numpy(np.ascontiguousarray(w)))
            if arch == "llama" and ".q_proj." in name:
                stored = llama_cpp_permute(stored, cfg.num_attention_heads)
            elif arch == "llama" and ".k_proj." in name:
                stored = llama_cpp_permute(stored, cfg.num_key_value_heads)
            writer.add_tensor(gguf_name(name, layer_map), stored, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tiny_gguf_llama(path):
    """Llama 3 style: permuted q/k, untied head, rope scaling carried by rope_freqs."""
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500_000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rope_parameters=rope, tie_word_embeddings=False,
    )
    ref = random_model(config)
    factors = rope_inv_freq(16, {"rope_type": "default", "rope_theta": 500_000.0}) / rope_inv_freq(16, rope)
    write_gguf(path, "llama", ref, rope_freqs=factors.numpy())
    return ref


def tiny_gguf_gemma3(path):
    """Gemma 3: norms stored with +1, tied embeddings, 5 sliding + 1 global layers."""
    config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
        max_position_embeddings=512, tie_word_embeddings=True,
    )
    ref = random_model(config)
    write_gguf(path, "gemma3", ref)
    return ref


def tiny_gguf_qwen(arch):
    """Qwen 2 (q/k/v biases) and Qwen 3 (q/k norms): no q/k permutation in llama.cpp."""

    def make(path):
        ref = tiny_model(arch)
        write_gguf(path, arch, ref)
        return ref

    return make


@pytest.mark.parametrize(
    "make",
    [tiny_gguf_llama, tiny_gguf_gemma3, tiny_gguf_qwen("qwen2"), tiny_gguf_qwen("qwen3")],
    ids=["llama", "gemma3", "qwen2", "qwen3"],
)
def test_gguf_matches_hf(make, tmp_path):
    path = tmp_path / "tiny.gguf"
    ref = make(path)
    cache = tmp_path / "cache"
    loaded = load_model(str(path), cache_dir=cache)
    assert loaded.tokenizer is None  # the file has no tokenizer.ggml.tokens
    assert loaded.info.name == "tiny"
    assert loaded.info.num_layers == ref.config.num_hidden_layers

    ids = torch.randint(0, VOCAB, (37,), generator=torch.Generator().manual_seed(3)).tolist()
    info = loaded.info
    h = PagedHarness(loaded.model, info.num_layers, info.num_kv_heads, info.head_dim, block_size=4, num_blocks=32)
    logits = torch.cat([h.step([(0, ids[:20])]), h.step([(0, ids[20:])])])
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_second_load_reads_cache(tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    tiny_gguf_gemma3(path)
    cache = tmp_path / "cache"
    first = load_model(str(path), cache_dir=cache)
    entry = gguf_cache.gguf_cache_dir(path, cache)
    assert (entry / "model.safetensors").is_file() and (entry / "config.json").is_file()

    def no_conversion(*args):
        raise AssertionError("the GGUF file was converted again")

    monkeypatch.setattr(gguf_cache, "convert_gguf", no_conversion)
    second = load_model(str(path), cache_dir=cache, dtype=torch.bfloat16)
    assert second.info == first.info
    assert next(second.model.parameters()).dtype == torch.bfloat16

    os.utime(path, ns=(0, 12345))  # a modified file gets a fresh entry
    assert gguf_cache.gguf_cache_dir(path, cache) != entry


def test_cache_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMILL_CACHE_DIR", str(tmp_path / "env-cache"))
    assert gguf_cache.cache_root() == tmp_path / "env-cache"
    assert gguf_cache.cache_root(tmp_path / "explicit") == tmp_path / "explicit"


def test_failed_conversion_leaves_no_cache(tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    tiny_gguf_gemma3(path)
    cache = tmp_path / "cache"

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_cache, "save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        load_model(str(path), cache_dir=cache)
    assert list((cache / "gguf").iterdir()) == []


def test_unsupported_gguf_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="not supported"):
        load_model(str(path), cache_dir=tmp_path / "cache")
