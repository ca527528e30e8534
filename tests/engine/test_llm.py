"""The offline engine end to end: outputs against transformers, invariants after every step."""
import pytest
import torch

from tokenmill import LLM, SamplingParams
from tests.engine.conftest import assert_all_blocks_free, check_every_step

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three laws of thermodynamics state that",
]
GREEDY_24 = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def hf_greedy(hf_model, prompt_ids, max_new_tokens):
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                min_new_tokens=max_new_tokens)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.slow
def test_default_model_matches_transformers_token_for_token(default_model, hf_default_model):
    llm = LLM(loaded_model=default_model, dtype="float32")
    stats = check_every_step(llm)
    outputs = llm.generate(PROMPTS, GREEDY_24, use_tqdm=False)
    for output in outputs:
        expected = hf_greedy(hf_default_model, output.prompt_token_ids, 24)
        assert output.outputs[0].token_ids == expected, output.prompt
        assert output.outputs[0].text == default_model.tokenizer.decode(expected, skip_special_tokens=True)
    assert stats["steps"] > 0
    assert_all_blocks_free(llm)


@pytest.mark.slow
def test_batch_invariance_with_chunked_prefill_and_preemption(default_model):
    tokenizer = default_model.tokenizer
    words = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma "
             "tau upsilon phi chi psi omega").split()
    prompts = [f"Item {i}: " + " ".join(words[(i * 7 + j) % len(words)] for j in range(3 + 5 * i))
               for i in range(24)]
    lengths = {len(tokenizer(p).input_ids) for p in prompts}
    assert len(lengths) > 10, "prompts must have different lengths"
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)

    alone = LLM(loaded_model=default_model, dtype="float32")
    expected = [alone.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]

    # Few blocks and a small step budget: long prompts are chunked and requests get preempted.
    together = LLM(loaded_model=default_model, dtype="float32", num_kv_blocks=24, block_size=16,
                   max_num_batched_tokens=128, max_num_seqs=24, max_model_len=256)
    stats = check_every_step(together)
    outputs = together.generate(prompts, params, use_tqdm=False)
    assert together.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert stats["steps"] > 0
    assert_all_blocks_free(together)


@pytest.mark.slow
def test_prefix_cache_computes_only_new_tokens_and_keeps_output(default_model):
    tokenizer = default_model.tokenizer
    shared = tokenizer("You are a careful assistant. " * 60).input_ids[:200]
    first = shared + tokenizer(" First question: what is two plus two?", add_special_tokens=False).input_ids
    second = shared + tokenizer(" Second question: name a prime number.", add_special_tokens=False).input_ids
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    cached = LLM(loaded_model=default_model, dtype="float32", block_size=16)
    stats = check_every_step(cached)
    cached.generate({"prompt_token_ids": first}, params, use_tqdm=False)
    before = stats["batched_tokens"]
    result = cached.generate({"prompt_token_ids": second}, params, use_tqdm=False)[0]
    reused = (200 // 16) * 16
    assert result.num_cached_tokens == reused
    # Only the tokens past the cached blocks run, then one token per decode step.
    assert stats["batched_tokens"] - before == (len(second) - reused) + (8 - 1)

    uncached = LLM(loaded_model=default_model, dtype="float32", enable_prefix_caching=False)
    reference = uncached.generate({"prompt_token_ids": second}, params, use_tqdm=False)[0]
    assert reference.num_cached_tokens == 0
    assert result.outputs[0].token_ids == reference.outputs[0].token_ids
    assert_all_blocks_free(cached)


@pytest.mark.slow
def test_sampling_controls(default_model):
    llm = LLM(loaded_model=default_model, dtype="float32")
    check_every_step(llm)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=12, ignore_eos=True)
    a = llm.generate(PROMPTS[:2], seeded, use_tqdm=False)
    # The same seed gives the same text, whatever else is in the batch.
    b = llm.generate(PROMPTS[1:2] + PROMPTS[2:], seeded, use_tqdm=False)
    assert a[1].outputs[0].token_ids == b[0].outputs[0].token_ids

    exact = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0]
    assert len(exact.token_ids) == 5 and exact.finish_reason == "length"

    full = llm.generate(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].text
    stop = full.split()[3]
    stopped = llm.generate(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=24, stop=[stop]),
                           use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
    assert stopped.text == full[:full.index(stop)]
    assert stop not in stopped.text

    several = llm.generate(PROMPTS[0], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=6, logprobs=2),
                           use_tqdm=False)[0]
    assert len(several.outputs) == 3
    assert several.num_cached_tokens >= 0
    for completion in several.outputs:
        assert len(completion.logprobs) == len(completion.token_ids)
        for (chosen, top), token_id in zip(completion.logprobs, completion.token_ids):
            assert chosen.token_id == token_id and len(top) == 2 and chosen.logprob <= 0
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("kwargs", [
    dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2), dict(min_p=2),
    dict(max_tokens=0), dict(n=0), dict(min_tokens=5, max_tokens=2), dict(presence_penalty=3),
    dict(repetition_penalty=0), dict(logprobs=-1), dict(stop=[""]), dict(stop_token_ids=[-1]),
])
def test_invalid_sampling_params_raise_value_error(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


def test_long_prefill_threshold_defaults_by_device_and_rejects_bad_values():
    from tokenmill.config import CPU_LONG_PREFILL_TOKENS, EngineConfig

    assert EngineConfig().resolved_long_prefill_token_threshold == CPU_LONG_PREFILL_TOKENS
    assert EngineConfig(device="cuda:0").resolved_long_prefill_token_threshold == 0
    assert EngineConfig(long_prefill_token_threshold=0).resolved_long_prefill_token_threshold == 0
    assert EngineConfig(device="cuda", long_prefill_token_threshold=64).resolved_long_prefill_token_threshold == 64
    for bad in (-1, 2.5, "256"):
        with pytest.raises(ValueError, match="long_prefill_token_threshold"):
            EngineConfig(long_prefill_token_threshold=bad)
