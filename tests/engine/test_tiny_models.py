"""Every supported architecture, tiny and random, through the whole engine vs transformers."""
import random

import pytest
import torch
import transformers

from tokenmill import LLM, SamplingParams
from tests.engine.conftest import assert_all_blocks_free, check_every_step

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)

ARCHITECTURES = {
    "llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
               dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                    rope_theta=500000.0)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=24, head_dim=16)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=32)),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
               dict(head_dim=32, sliding_window=16, query_pre_attn_scalar=32,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def tiny_model(request, tmp_path_factory):
    config_cls, model_cls, extra = ARCHITECTURES[request.param]
    torch.manual_seed(0)
    config = config_cls(**{**COMMON, **extra})
    model = model_cls(config).eval()
    # Random init is too uniform for greedy ties to be rare; sharpen the output layer.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(4.0 if parameter.dim() > 1 else 1.0)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return path, model


def test_greedy_matches_transformers_in_a_mixed_batch(tiny_model):
    path, hf_model = tiny_model
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 256) for _ in range(length)] for length in (5, 17, 40, 33, 9, 61)]
    llm = LLM(str(path), dtype="float32", block_size=4, num_kv_blocks=64, max_num_batched_tokens=24,
              max_model_len=128)
    check_every_step(llm)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        with torch.no_grad():
            expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20,
                                         do_sample=False)[0, len(prompt):].tolist()
        assert output.outputs[0].token_ids == expected
    assert_all_blocks_free(llm)


def test_abort_mid_generation_frees_every_block(tiny_model):
    path, _ = tiny_model
    llm = LLM(str(path), dtype="float32", block_size=4, num_kv_blocks=64, max_model_len=128)
    engine = llm.engine
    for i in range(4):
        engine.add_request(f"r{i}", list(range(3, 30 + i)), SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(5):
        engine.step()
        engine.check_integrity()
    assert engine.kv_manager.pool.num_free_blocks < engine.kv_manager.num_blocks
    for i in range(4):
        engine.abort_request(f"r{i}")
        engine.check_integrity()
    assert_all_blocks_free(llm)


def test_bad_requests_are_rejected_without_trace(tiny_model):
    path, _ = tiny_model
    llm = LLM(str(path), dtype="float32", block_size=4, num_kv_blocks=64, max_model_len=128)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate({"prompt_token_ids": [5] * 120}, SamplingParams(max_tokens=20), use_tqdm=False)
    with pytest.raises(ValueError, match="token ids"):
        llm.generate({"prompt_token_ids": [5, 999]}, SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("text needs a tokenizer", use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(str(path), dtype="float32", block_size=4, num_kv_blocks=8, max_model_len=128)
    assert_all_blocks_free(llm)


def test_a_preloaded_model_must_match_the_asked_dtype(tiny_model):
    from tokenmill.models.loader import load_model
    path, _ = tiny_model
    loaded = load_model(str(path), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        LLM(loaded_model=loaded, dtype="float32", num_kv_blocks=16)
    assert LLM(loaded_model=loaded, dtype="auto", num_kv_blocks=16).engine.dtype == torch.bfloat16
