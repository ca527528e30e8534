"""The pool of KV-cache blocks: the only code that changes reference counts,
the free queue and the prefix-hash map.

A block is *in use* while its ref count is > 0. A block with ref count 0 sits in
the free queue, ordered least-recently-freed first; it may still carry a prefix
hash, in which case it is a *cached* block that a later request can revive with
`touch()` until `allocate()` evicts it (LRU). Holders see block ids only.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


class NoFreeBlocksError(RuntimeError):
    """Raised by `allocate()` when asked for more blocks than `num_free_blocks`.
    Callers are expected to check `num_free_blocks` first, so this means a bug."""


@dataclass
class _BlockState:
    ref_count: int = 0
    block_hash: bytes | None = None


class BlockPool:
    """Fixed set of `num_blocks` blocks.

    Contracts:
    - `allocate(n)` returns n distinct block ids with ref count 1 and no hash;
      it evicts the least recently freed blocks, dropping their hashes.
    - `touch(ids)` takes one more reference on each block (reviving cached free blocks).
    - `free(ids)` drops one reference each; blocks reaching 0 join the tail of the
      free queue in the order given (so pass a request's blocks tail-first to have
      its last blocks evicted first).
    - `cache_block(id, hash)` registers a full block's content hash; a hash that is
      already registered keeps its first block.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self._blocks = [_BlockState() for _ in range(num_blocks)]
        # Ordered dict used as an O(1) LRU queue: first key is evicted first.
        self._free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._hash_to_block: dict[bytes, int] = {}
        self.num_evictions = 0

    # ---- queries -------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that `allocate()` can hand out now (free, cached or not)."""
        return len(self._free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free_queue) / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_count

    def lookup(self, block_hash: bytes) -> int | None:
        """Block id holding the content with this hash, or None."""
        return self._hash_to_block.get(block_hash)

    # ---- mutations -----------------------------------------------------------
    def allocate(self, num: int) -> list[int]:
        if num > len(self._free_queue):
            raise NoFreeBlocksError(f"asked for {num} blocks, {len(self._free_queue)} free")
        block_ids = []
        for _ in range(num):
            block_id, _ = self._free_queue.popitem(last=False)
            state = self._blocks[block_id]
            if state.block_hash is not None:
                # Evicting a cached block: its content is about to be overwritten.
                if self._hash_to_block.get(state.block_hash) == block_id:
                    del self._hash_to_block[state.block_hash]
                state.block_hash = None
                self.num_evictions += 1
            state.ref_count = 1
            block_ids.append(block_id)
        return block_ids

    def touch(self, block_ids: list[int]) -> None:
        for block_id in block_ids:
            state = self._blocks[block_id]
            if state.ref_count == 0:
                del self._free_queue[block_id]
            state.ref_count += 1

    def free(self, block_ids: list[int]) -> None:
        for block_id in block_ids:
            state = self._blocks[block_id]
            if state.ref_count <= 0:
                raise RuntimeError(f"block {block_id} freed more times than referenced")
            state.ref_count -= 1
            if state.ref_count == 0:
                self._free_queue[block_id] = None

    def cache_block(self, block_id: int, block_hash: bytes) -> None:
        if not self.enable_caching:
            return
        state = self._blocks[block_id]
        if state.block_hash is not None or block_hash in self._hash_to_block:
            return
        state.block_hash = block_hash
        self._hash_to_block[block_hash] = block_id

    def reset_prefix_cache(self) -> int:
        """Forget every cached hash of unreferenced blocks; returns how many were dropped."""
        dropped = 0
        for block_id in self._free_queue:
            state = self._blocks[block_id]
            if state.block_hash is not None:
                del self._hash_to_block[state.block_hash]
                state.block_hash = None
                dropped += 1
        return dropped

    # ---- invariants ----------------------------------------------------------
    def check_integrity(self, expected_refs: dict[int, int] | None = None) -> None:
        """Raise AssertionError if any invariant is broken.

        - ref counts are >= 0; a block is in the free queue iff its ref count is 0;
        - the hash map and the blocks' hashes agree one to one;
        - if `expected_refs` (block id -> number of holders, from the KV manager)
          is given, every ref count equals it.
        """
        free_ids = set(self._free_queue)
        assert len(free_ids) == len(self._free_queue)
        for block_id, state in enumerate(self._blocks):
            assert state.ref_count >= 0, f"block {block_id} has ref count {state.ref_count}"
            assert (state.ref_count == 0) == (block_id in free_ids), (
                f"block {block_id}: ref count {state.ref_count} but in free queue: {block_id in free_ids}")
            if expected_refs is not None:
                assert state.ref_count == expected_refs.get(block_id, 0), (
                    f"block {block_id}: ref count {state.ref_count}, holders {expected_refs.get(block_id, 0)}")
            if state.block_hash is not None:
                assert self._hash_to_block.get(state.block_hash) == block_id, (
                    f"block {block_id} carries a hash that maps elsewhere")
        for block_hash, block_id in self._hash_to_block.items():
            assert self._blocks[block_id].block_hash == block_hash, f"hash map entry for block {block_id} is stale"
        if not self.enable_caching:
            assert not self._hash_to_block
