"""Each architecture against Hugging Face transformers: chunked prefill, mixed and batched decode."""

import pytest
import torch
from paged_harness import PagedHarness
from tiny_models import VOCAB, tiny_model

from tokenmill.models import load_model

ARCHS = ["gemma3", "llama", "mistral", "qwen2", "qwen3"]
ATOL = 1e-4


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory):
    ref = tiny_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    return ref, load_model(str(path))


def test_loaded_info(pair):
    ref, loaded = pair
    info = loaded.info
    assert loaded.tokenizer is None
    assert info.num_layers == ref.config.num_hidden_layers
    assert info.num_kv_heads == ref.config.num_key_value_heads
    assert info.vocab_size == VOCAB
    assert info.eos_token_ids == ()


def test_chunked_prefill_then_batched_decode(pair):
    ref, loaded = pair
    info = loaded.info
    gen = torch.Generator().manual_seed(1)
    prompt_a = torch.randint(0, VOCAB, (41,), generator=gen).tolist()
    prompt_b = torch.randint(0, VOCAB, (13,), generator=gen).tolist()
    steps = 8

    h = PagedHarness(loaded.model, info.num_layers, info.num_kv_heads, info.head_dim, block_size=4, num_blocks=64)
    # Step 1: two fresh prefills (A's first chunk ends mid-block).
    logits = h.step([(0, prompt_a[:23]), (1, prompt_b)])
    a_logits, b_logits = [logits[:23]], logits[23:]
    seq_b = prompt_b + [int(b_logits[-1].argmax())]
    # Step 2: A's second chunk attends to the cached first one, next to B's first decode.
    logits = h.step([(0, prompt_a[23:]), (1, seq_b[-1:])])
    a_logits.append(logits[:-1])
    b_decode = [logits[-1]]
    seq_a = prompt_a + [int(logits[-2].argmax())]
    seq_b.append(int(logits[-1].argmax()))
    # Then both sequences decode together.
    a_decode = []
    for _ in range(steps - 1):
        logits = h.step([(0, seq_a[-1:]), (1, seq_b[-1:])])
        a_decode.append(logits[0])
        b_decode.append(logits[1])
        seq_a.append(int(logits[0].argmax()))
        seq_b.append(int(logits[1].argmax()))

    torch.testing.assert_close(torch.cat(a_logits), hf_logits(ref, prompt_a), atol=ATOL, rtol=0)
    torch.testing.assert_close(b_logits, hf_logits(ref, prompt_b), atol=ATOL, rtol=0)
    # Decode logits against a teacher-forced forward over the generated text.
    full_a = hf_logits(ref, seq_a[:-1])[len(prompt_a) :]
    full_b = hf_logits(ref, seq_b[:-1])[len(prompt_b) :]
    torch.testing.assert_close(torch.stack(a_decode), full_a, atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.stack(b_decode), full_b, atol=ATOL, rtol=0)

    assert seq_a[len(prompt_a) :] == hf_greedy(ref, prompt_a, steps)
    assert seq_b[len(prompt_b) :] == hf_greedy(ref, prompt_b, steps + 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_float32(pair, dtype, tmp_path):
    ref, loaded = pair
    path = tmp_path / "m"
    ref.save_pretrained(path)
    low = load_model(str(path), dtype=dtype)
    assert all(p.dtype == dtype for p in low.model.parameters())
    info = low.info
    ids = torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    h = PagedHarness(low.model, info.num_layers, info.num_kv_heads, info.head_dim, block_size=4, num_blocks=32)
    logits = torch.cat([h.step([(0, ids[:17])]), h.step([(0, ids[17:])])])
    # Logits come out in the compute dtype, as the reference computes them (float32 once softcapped).
    logits_dtype = torch.float32 if low.model.final_logit_softcapping is not None else dtype
    assert low.model.compute_logits(torch.zeros(1, low.info.hidden_size, dtype=dtype)).dtype == logits_dtype
    expected = hf_logits(ref, ids)
    assert (logits - expected).abs().max() < 0.05 * expected.abs().max()
