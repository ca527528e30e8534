import pytest

from tokenmill.engine.block_pool import BlockPool, NoFreeBlocksError
from tokenmill.engine.kv_manager import KVCacheManager, hash_block
from tokenmill.engine.request import Request, SamplingParams


def test_allocate_free_reuses_blocks_in_lru_order():
    pool = BlockPool(4)
    first = pool.allocate(2)
    second = pool.allocate(2)
    assert sorted(first + second) == [0, 1, 2, 3]
    assert pool.num_free_blocks == 0
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(1)
    pool.free(second[::-1])
    pool.free(first[::-1])
    pool.check_integrity()
    # Freed second's tail first, so it is reused first.
    assert pool.allocate(1) == [second[1]]


def test_cached_block_survives_free_until_evicted():
    pool = BlockPool(2)
    [block] = pool.allocate(1)
    digest = hash_block(None, [1, 2, 3, 4])
    pool.cache_block(block, digest)
    pool.free([block])
    assert pool.lookup(digest) == block
    pool.touch([block])          # revived by a prefix hit
    assert pool.ref_count(block) == 1 and pool.num_free_blocks == 1
    pool.free([block])
    pool.allocate(2)             # needs every block: the cached one is evicted
    assert pool.lookup(digest) is None
    assert pool.num_evictions == 1
    pool.check_integrity()


def test_double_free_is_an_error():
    pool = BlockPool(2)
    [block] = pool.allocate(1)
    pool.free([block])
    with pytest.raises(RuntimeError):
        pool.free([block])


def test_hash_chains_over_parent():
    a = hash_block(None, [1, 2])
    assert hash_block(a, [3, 4]) != hash_block(None, [3, 4])
    assert hash_block(a, [3, 4]) == hash_block(hash_block(None, [1, 2]), [3, 4])


def _request(rid, tokens, max_tokens=4):
    return Request(request_id=rid, prompt_token_ids=tokens, sampling_params=SamplingParams(max_tokens=max_tokens))


def test_prefix_lookup_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    first = _request("a", list(range(8)))
    assert kv.allocate_slots(first, 8) is not None
    kv.cache_full_blocks(first, 8)
    kv.free(first)
    # Same 8 tokens: only the first block may be reused, the last token must run.
    same = _request("b", list(range(8)))
    blocks, num_cached = kv.get_computed_blocks(same)
    assert num_cached == 4 and len(blocks) == 1
    longer = _request("c", list(range(8)) + [99])
    blocks, num_cached = kv.get_computed_blocks(longer)
    assert num_cached == 8
    assert kv.allocate_slots(longer, 1, blocks) is not None
    kv.check_integrity()
    kv.free(longer)
    kv.check_integrity()
    assert kv.pool.num_free_blocks == 8
