"""A minimal stand-in for the engine runner: drives a model over a paged KV cache."""

import random

import torch

from tokenmill.models import build_attention_metadata


class PagedHarness:
    """Feeds chunks of several sequences through ``model`` one engine step at a time.

    Blocks are handed out in shuffled order so block tables are non-contiguous.
    """

    def __init__(self, model, num_layers, num_kv_heads, head_dim, *, block_size=4, num_blocks=128, dtype=None, seed=0):
        param = next(model.parameters())
        dtype = dtype or param.dtype
        self.model = model
        self.block_size = block_size
        self.device = param.device
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        # NaN-filled so that reading a slot that was never written poisons the output.
        self.kv_caches = [
            (torch.full(shape, float("nan"), dtype=dtype, device=self.device),
             torch.full(shape, float("nan"), dtype=dtype, device=self.device))
            for _ in range(num_layers)
        ]
        self.free_blocks = list(range(num_blocks))
        random.Random(seed).shuffle(self.free_blocks)
        self.block_tables: dict[int, list[int]] = {}
        self.num_computed: dict[int, int] = {}

    def step(self, batch: list[tuple[int, list[int]]]) -> torch.Tensor:
        """Run one step over ``[(seq_id, new_token_ids), ...]``; float32 logits ``[num_tokens, vocab]``."""
        query_lens, computed, tables, ids = [], [], [], []
        for seq_id, tokens in batch:
            table = self.block_tables.setdefault(seq_id, [])
            done = self.num_computed.setdefault(seq_id, 0)
            while len(table) * self.block_size < done + len(tokens):
                table.append(self.free_blocks.pop())
            query_lens.append(len(tokens))
            computed.append(done)
            tables.append(list(table))
            ids.extend(tokens)
        md = build_attention_metadata(query_lens, computed, tables, self.block_size, self.device)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            hidden = self.model(input_ids, md.positions, self.kv_caches, md)
            logits = self.model.compute_logits(hidden).float()
        for seq_id, tokens in batch:
            self.num_computed[seq_id] += len(tokens)
        return logits
