"""Quality checks of a loaded model through the engine's own forward path:
perplexity of a text, and where two greedy continuations first differ.

Used to compare precisions and quantization methods (benchmarks/quantization.py,
tests/models/test_quantize.py). The forward runs over a private paged KV cache,
chunk by chunk exactly as chunked prefill does, so what is measured is the
model as the engine runs it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tokenmill.models.layers.attention import build_attention_metadata


@dataclass(frozen=True)
class Perplexity:
    num_tokens: int        # tokens scored (each window's first token has no context and is not)
    mean_nll: float        # nats per token

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


@torch.inference_mode()
def perplexity(model: torch.nn.Module, num_layers: int, num_kv_heads: int, head_dim: int,
               token_ids: Sequence[int], window: int = 1024, chunk: int = 256, block_size: int = 16,
               bos_token_id: int | None = None) -> Perplexity:
    """Perplexity of `token_ids` under `model` (a `PagedCausalLM`), in
    non-overlapping windows of `window` tokens, each started afresh and fed
    `chunk` tokens per forward. Every token with context is scored: with
    `bos_token_id`, each window starts after it and all its tokens count; without,
    a window's first token only serves as context.
    Raises ValueError for fewer than two tokens or non-positive sizes."""
    if len(token_ids) < 2:
        raise ValueError("perplexity needs at least two tokens")
    if min(window, chunk, block_size) < 1:
        raise ValueError("window, chunk and block_size must be positive")
    reference = model.model.norm.weight
    device, dtype = reference.device, reference.dtype
    num_blocks = -(-(window + 1) // block_size)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    kv_caches = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                 for _ in range(num_layers)]
    block_table = list(range(num_blocks))
    total_nll, scored = 0.0, 0
    for start in range(0, len(token_ids), window):
        sequence = list(token_ids[start:start + window])
        if bos_token_id is not None:
            sequence = [bos_token_id] + sequence
        for begin in range(0, len(sequence) - 1, chunk):
            end = min(begin + chunk, len(sequence) - 1)  # inputs [begin, end) predict [begin + 1, end + 1)
            metadata = build_attention_metadata([end - begin], [begin], [block_table], block_size, device)
            inputs = torch.tensor(sequence[begin:end], dtype=torch.long, device=device)
            hidden = model(inputs, metadata.positions, kv_caches, metadata)
            logits = model.compute_logits(hidden).float()  # [chunk, vocab]
            targets = torch.tensor(sequence[begin + 1:end + 1], dtype=torch.long, device=device)
            nll = -logits.log_softmax(dim=-1).gather(1, targets[:, None]).squeeze(1)
            total_nll += float(nll.sum())
            scored += end - begin
    return Perplexity(num_tokens=scored, mean_nll=total_nll / scored)


def agreement_length(reference: Sequence[int], candidate: Sequence[int]) -> int:
    """How many leading tokens two continuations share."""
    length = 0
    for a, b in zip(reference, candidate):
        if a != b:
            break
        length += 1
    return length
