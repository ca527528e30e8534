"""The bundled Gemma 3 270M GGUF against transformers' own GGUF loader."""

import pytest
import torch
from paged_harness import PagedHarness

from tokenmill.models import gguf_cache, load_model
from tokenmill.models.loader import default_model_path

PROMPTS = [
    "The capital of France is",
    "<start_of_turn>user\nWrite a haiku about the sea.<end_of_turn>\n<start_of_turn>model\n",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loaded(default_model):
    return default_model


def test_info(loaded):
    info = loaded.info
    assert info.architecture == "Gemma3ForCausalLM"
    assert (info.num_layers, info.num_kv_heads, info.head_dim, info.hidden_size) == (18, 1, 256, 640)
    assert info.vocab_size == 262144
    assert info.bos_token_id == 2
    assert info.eos_token_ids == (1, 106)
    assert loaded.hf_config.layer_types.count("full_attention") == 3


def test_second_load_is_served_from_cache(loaded, monkeypatch):
    entry = gguf_cache.gguf_cache_dir(default_model_path(), gguf_cache.cache_root())
    assert (entry / "model.safetensors").is_file()

    def no_conversion(*args):
        raise AssertionError("the GGUF file was converted again")

    monkeypatch.setattr(gguf_cache, "convert_gguf", no_conversion)
    again = load_model(None)
    assert again.info == loaded.info


def test_tokenizer_matches_transformers(loaded, hf_default_tokenizer):
    tokenizer = hf_default_tokenizer
    for text in PROMPTS:
        assert loaded.tokenizer(text).input_ids == tokenizer(text).input_ids
    ids = tokenizer(PROMPTS[1]).input_ids
    assert loaded.tokenizer.decode(ids) == tokenizer.decode(ids)


def test_logits_and_greedy_match_transformers(loaded, hf_default_model):
    model, tokenizer = hf_default_model, loaded.tokenizer
    info = loaded.info
    h = PagedHarness(loaded.model, info.num_layers, info.num_kv_heads, info.head_dim, block_size=16, num_blocks=64)
    for seq_id, text in enumerate(PROMPTS):
        ids = tokenizer(text).input_ids
        ours = h.step([(seq_id, ids)])
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0].float()
        torch.testing.assert_close(ours, expected, atol=2e-3, rtol=0)

    ids = tokenizer(PROMPTS[1]).input_ids
    with torch.no_grad():
        hf_tokens = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :].tolist()
    h = PagedHarness(loaded.model, info.num_layers, info.num_kv_heads, info.head_dim, block_size=16, num_blocks=64)
    tokens = [int(h.step([(0, ids)])[-1].argmax())]
    while len(tokens) < len(hf_tokens):
        tokens.append(int(h.step([(0, tokens[-1:])])[-1].argmax()))
    assert tokens == hf_tokens
