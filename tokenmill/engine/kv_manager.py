"""Per-request block tables on top of the block pool.

The manager knows which blocks each request holds, computes the chained
content hashes of a request's full blocks, finds the longest cached prefix of a
new request and hands the pool the blocks to free. It never changes ref counts
itself: it asks the pool.
"""
from __future__ import annotations

import hashlib
from array import array

from tokenmill.engine.block_pool import BlockPool
from tokenmill.engine.request import Request


def hash_block(parent_hash: bytes | None, token_ids: list[int]) -> bytes:
    """Content hash of a full block, chained over its parent so that equal
    blocks at different prefixes never collide."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(parent_hash or b"root")
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Allocates blocks as requests grow and frees them when they stop.

    Contracts:
    - `get_computed_blocks(req)` has no side effects; its result is valid until the
      next `allocate_slots`/`free` call.
    - `allocate_slots(req, n, cached)` either reserves room for `n` more tokens (plus
      the cached blocks given) and returns the new block ids, or returns None and
      changes nothing.
    - `free(req)` releases every block the request holds; calling it twice is harmless.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self._req_blocks: dict[str, list[int]] = {}
        self._req_hashes: dict[str, list[bytes]] = {}
        # Prefix-cache statistics (tokens), for metrics.
        self.num_prefix_queries = 0
        self.num_prefix_hits = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def block_table(self, request_id: str) -> list[int]:
        return self._req_blocks.get(request_id, [])

    def _block_hashes(self, request: Request, num_tokens: int) -> list[bytes]:
        """Hashes of the request's full blocks among its first `num_tokens` tokens (memoised)."""
        hashes = self._req_hashes.setdefault(request.request_id, [])
        num_full = num_tokens // self.block_size
        while len(hashes) < num_full:
            start = len(hashes) * self.block_size
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, request.token_ids_slice(start, start + self.block_size)))
        return hashes[:num_full]

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest run of cached blocks that prefixes the request's tokens.

        At least one token is always left to compute, because sampling needs the
        last position's logits. Returns (block ids, number of tokens they cover).
        """
        if not self.enable_caching:
            return [], 0
        hashes = self._block_hashes(request, request.num_tokens - 1)
        blocks = []
        for block_hash in hashes:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            blocks.append(block_id)
        self.num_prefix_queries += request.num_tokens
        self.num_prefix_hits += len(blocks) * self.block_size
        return blocks, len(blocks) * self.block_size

    def num_blocks_needed(self, request: Request, num_new_tokens: int, num_cached_blocks: int = 0) -> int:
        held = len(self._req_blocks.get(request.request_id, ())) + num_cached_blocks
        total_tokens = request.num_computed_tokens + num_cached_blocks * self.block_size + num_new_tokens
        return max(0, cdiv(total_tokens, self.block_size) - held)

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       cached_blocks: list[int] | None = None) -> list[int] | None:
        cached_blocks = cached_blocks or []
        num_needed = self.num_blocks_needed(request, num_new_tokens, len(cached_blocks))
        # Cached blocks sitting in the free queue stop being allocatable once touched.
        num_revived = sum(1 for b in cached_blocks if self.pool.ref_count(b) == 0)
        if num_needed + num_revived > self.pool.num_free_blocks:
            return None
        self.pool.touch(cached_blocks)
        new_blocks = self.pool.allocate(num_needed)
        self._req_blocks.setdefault(request.request_id, []).extend(cached_blocks + new_blocks)
        return new_blocks

    def cache_full_blocks(self, request: Request, num_tokens_after_step: int) -> None:
        """Register the hashes of blocks that are full once this step has run.

        Within one forward pass every layer writes all new K/V before any
        attention reads, so a block filled this step may already serve a request
        scheduled later in the same step.
        """
        if not self.enable_caching:
            return
        blocks = self._req_blocks.get(request.request_id, [])
        for block_id, block_hash in zip(blocks, self._block_hashes(request, num_tokens_after_step)):
            self.pool.cache_block(block_id, block_hash)

    def free(self, request: Request) -> None:
        blocks = self._req_blocks.pop(request.request_id, [])
        # Tail first: a request's last blocks are the least likely to be shared,
        # so they should be evicted before its prefix.
        self.pool.free(list(reversed(blocks)))

    def forget(self, request: Request) -> None:
        """Drop memoised hashes of a finished request (its blocks must be freed)."""
        self._req_hashes.pop(request.request_id, None)

    def check_integrity(self) -> None:
        holders: dict[int, int] = {}
        for request_id, blocks in self._req_blocks.items():
            assert len(blocks) == len(set(blocks)), f"request {request_id} holds a block twice"
            for block_id in blocks:
                holders[block_id] = holders.get(block_id, 0) + 1
        self.pool.check_integrity(holders)
