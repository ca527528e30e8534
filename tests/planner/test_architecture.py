"""Architectures from the catalog, Hugging Face config.json files and GGUF files."""
import json

import numpy as np
import pytest

from tokenmill.planner import architecture
from tokenmill.planner.architecture import model_from_gguf, model_from_hf_config, parameter_count, resolve_model
from tokenmill.planner.catalog import builtin_catalog
from tokenmill.planner.errors import PlanError
from tokenmill.planner.memory import weight_bytes

CATALOG = builtin_catalog()
# Block details the formula needs beyond the catalog fields.
BLOCK_DETAILS = {"qwen2.5-7b": dict(qkv_bias=True), "qwen2.5-32b": dict(qkv_bias=True),
                 "gemma-3-270m": dict(norms_per_layer=4, qk_norm=True)}

LLAMA_3_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 8192, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


@pytest.mark.parametrize("model", [model.name for model in CATALOG.models])
def test_formula_reproduces_every_catalog_count(model):
    spec = CATALOG.model(model)
    count = parameter_count(layers=spec.layers, hidden_size=spec.hidden_size, attention_heads=spec.attention_heads,
                            kv_heads=spec.kv_heads, head_dim=spec.head_dim, intermediate_size=spec.intermediate_size,
                            vocab_size=spec.vocab_size, tie_word_embeddings=spec.tie_word_embeddings,
                            **BLOCK_DETAILS.get(model, {}))
    assert count == spec.parameters


def test_hf_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_3_8B_CONFIG))
    spec = model_from_hf_config(tmp_path)
    reference = CATALOG.model("llama-3-8b")
    assert spec.parameters == reference.parameters
    assert (spec.layers, spec.kv_heads, spec.head_dim, spec.max_context) == (32, 8, 128, 8192)
    assert not spec.tie_word_embeddings
    assert "architecture formula" in spec.source


def test_hf_config_counts_safetensors_headers(tmp_path):
    from safetensors.numpy import save_file

    config = {"model_type": "llama", "hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2,
              "num_hidden_layers": 1, "vocab_size": 10}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({"a": np.zeros((3, 4), np.float16), "b": np.zeros(5, np.float32)}, str(tmp_path / "model.safetensors"))
    spec = model_from_hf_config(tmp_path / "config.json")
    assert spec.parameters == 17
    assert spec.kv_heads == 2 and spec.head_dim == 4  # defaults: all heads, hidden / heads
    assert "safetensors headers" in spec.source


def test_gemma_3_multimodal_config_uses_its_text_config(tmp_path):
    text = {"model_type": "gemma3_text", "hidden_size": 640, "intermediate_size": 2048, "num_attention_heads": 4,
            "num_key_value_heads": 1, "head_dim": 256, "num_hidden_layers": 18, "vocab_size": 262144,
            "max_position_embeddings": 32768}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text}))
    spec = model_from_hf_config(tmp_path)
    assert spec.tie_word_embeddings  # Gemma ties by default
    assert spec.parameters == CATALOG.model("gemma-3-270m").parameters


@pytest.mark.parametrize("config, message", [
    ({**LLAMA_3_8B_CONFIG, "num_local_experts": 8}, "mixture-of-experts"),
    ({"model_type": "llama"}, "missing or invalid"),
])
def test_hf_config_errors(tmp_path, config, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(PlanError, match=message):
        model_from_hf_config(tmp_path)


def write_tiny_gguf(path, tied: bool):
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_key_length(16)
    writer.add_context_length(256)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tensors = {"token_embd.weight": (32, 64)}
    for layer in range(2):
        tensors |= {f"blk.{layer}.attn_q.weight": (64, 64), f"blk.{layer}.attn_k.weight": (32, 64),
                    f"blk.{layer}.attn_v.weight": (32, 64), f"blk.{layer}.attn_output.weight": (64, 64),
                    f"blk.{layer}.ffn_gate.weight": (128, 64), f"blk.{layer}.ffn_up.weight": (128, 64),
                    f"blk.{layer}.ffn_down.weight": (64, 128), f"blk.{layer}.attn_norm.weight": (64,)}
    if not tied:
        tensors["output.weight"] = (32, 64)
    for name, shape in tensors.items():
        writer.add_tensor(name, np.zeros(shape, np.float16 if len(shape) == 2 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


@pytest.mark.parametrize("tied", [True, False])
def test_gguf(tmp_path, monkeypatch, tied):
    monkeypatch.setenv("TOKENMILL_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    tensors = write_tiny_gguf(path, tied)
    spec = model_from_gguf(path)
    elements = sum(int(np.prod(shape)) for shape in tensors.values())
    assert spec.parameters == elements
    assert (spec.layers, spec.hidden_size, spec.attention_heads, spec.kv_heads, spec.head_dim) == (2, 64, 4, 2, 16)
    assert spec.vocab_size == 32 and spec.max_context == 256 and spec.tie_word_embeddings == tied
    bytes_stored = sum(int(np.prod(shape)) * (2 if len(shape) == 2 else 4) for shape in tensors.values())
    assert spec.file_weight_bytes == bytes_stored
    assert spec.file_embedding_bytes == 32 * 64 * 2
    assert spec.file_quantization == "F16"
    assert weight_bytes(spec, CATALOG.precision("gguf-file")) == bytes_stored
    assert resolve_model(CATALOG, str(path)) == spec


def test_gguf_result_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMILL_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tied=True)
    first = model_from_gguf(path)
    assert list((tmp_path / "cache" / "planner" / "gguf").glob("*.json"))

    def refuse(_path):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(architecture, "_read_gguf", refuse)
    assert model_from_gguf(path) == first


def test_missing_gguf(tmp_path):
    with pytest.raises(PlanError, match="GGUF file not found"):
        model_from_gguf(tmp_path / "nope.gguf")


def test_resolve_model():
    assert resolve_model(CATALOG, "llama3-8b").name == "llama-3-8b"
    with pytest.raises(PlanError, match=r"unknown model 'gpt-5' \(choose from: .*\); or give a Hugging Face"):
        resolve_model(CATALOG, "gpt-5")
