"""paged_attention against a dense reference on hand-built caches."""

import random

import pytest
import torch

from tokenmill.models import build_attention_metadata, paged_attention


def reference_attention(q, k_hist, v_hist, positions, scale, window):
    """q [n, H, D] at absolute ``positions``; k/v_hist [ctx, KVH, D] of the whole sequence."""
    group = q.shape[1] // k_hist.shape[1]
    k = k_hist.float().repeat_interleave(group, dim=1)  # [ctx, H, D]
    v = v_hist.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,khd->hnk", q.float(), k) * scale
    key_pos = torch.arange(k.shape[0])[None, :]
    visible = key_pos <= positions[:, None]
    if window is not None:
        visible &= key_pos > positions[:, None] - window
    scores = scores.masked_fill(~visible[None], float("-inf"))
    return torch.einsum("hnk,khd->nhd", scores.softmax(-1), v)


def run_case(seqs, *, heads, kv_heads, head_dim, block_size, window, dtype, seed=0):
    """``seqs``: list of (num_computed, query_len). Returns (ours, reference) [num_tokens, H, D]."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    num_blocks = sum((c + q) // block_size + 2 for c, q in seqs) + 3
    free = list(range(num_blocks))
    rng.shuffle(free)
    key_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype)
    value_cache = torch.full_like(key_cache, float("nan"))

    tables, qs, ks, vs, histories = [], [], [], [], []
    for computed, q_len in seqs:
        ctx = computed + q_len
        table = [free.pop() for _ in range((ctx + block_size - 1) // block_size)]
        k_hist = torch.randn(ctx, kv_heads, head_dim, generator=gen).to(dtype)
        v_hist = torch.randn(ctx, kv_heads, head_dim, generator=gen).to(dtype)
        for pos in range(computed):  # earlier steps already cached these
            key_cache[table[pos // block_size], pos % block_size] = k_hist[pos]
            value_cache[table[pos // block_size], pos % block_size] = v_hist[pos]
        tables.append(table)
        qs.append(torch.randn(q_len, heads, head_dim, generator=gen).to(dtype))
        ks.append(k_hist[computed:])
        vs.append(v_hist[computed:])
        histories.append((k_hist, v_hist))

    md = build_attention_metadata([q for _, q in seqs], [c for c, _ in seqs], tables, block_size, "cpu")
    scale = head_dim**-0.5
    ours = paged_attention(
        torch.cat(qs), torch.cat(ks), torch.cat(vs), (key_cache, value_cache), md, scale, window
    )
    refs = []
    for (computed, q_len), q, (k_hist, v_hist) in zip(seqs, qs, histories):
        positions = torch.arange(computed, computed + q_len)
        refs.append(reference_attention(q, k_hist, v_hist, positions, scale, window))
    return ours, torch.cat(refs), md


MIXED = [(0, 7), (13, 1), (5, 6), (0, 1), (30, 1), (22, 9), (3, 1)]


@pytest.mark.parametrize("window", [None, 5, 64])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_mixed_batch_matches_reference(window, block_size, heads, kv_heads):
    ours, ref, _ = run_case(
        MIXED, heads=heads, kv_heads=kv_heads, head_dim=8, block_size=block_size, window=window, dtype=torch.float32
    )
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seqs", [[(9, 1), (17, 1), (2, 1)], [(0, 12)], [(0, 5), (0, 8)], [(11, 4)]])
@pytest.mark.parametrize("window", [None, 3])
def test_pure_decode_and_pure_prefill(seqs, window):
    ours, ref, _ = run_case(seqs, heads=4, kv_heads=2, head_dim=16, block_size=4, window=window, dtype=torch.float32)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    ours, ref, _ = run_case(MIXED, heads=4, kv_heads=2, head_dim=32, block_size=4, window=6, dtype=dtype)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours.float(), ref, atol=3e-2, rtol=3e-2)


def test_writes_new_tokens_to_their_slots():
    _, _, md = run_case(
        [(6, 3), (2, 1)], heads=2, kv_heads=1, head_dim=4, block_size=4, window=None, dtype=torch.float32
    )
    assert md.positions.tolist() == [6, 7, 8, 2]
    tables = md.block_tables.tolist()
    expected = [tables[0][p // 4] * 4 + p % 4 for p in (6, 7, 8)] + [tables[1][0] * 4 + 2]
    assert md.slot_mapping.tolist() == expected
    assert md.context_lens.tolist() == [9, 3]


def test_plans_are_cached_per_window():
    _, _, md = run_case(MIXED, heads=2, kv_heads=1, head_dim=4, block_size=4, window=5, dtype=torch.float32)
    assert md.window_plan(5) is md.window_plan(5)
    assert md.window_plan(None) is not md.window_plan(5)


def test_rejects_short_block_table():
    with pytest.raises(ValueError, match="block table"):
        build_attention_metadata([3], [6], [[0, 1]], 4, "cpu")
