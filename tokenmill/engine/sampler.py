"""Turns the logits of the rows that sample into tokens.

Greedy, temperature, top-k, top-p, min-p, presence/frequency/repetition
penalties, min_tokens (stop tokens masked until reached), per-request seeded
generators, and top-n logprobs of the raw model distribution. One batched pass
for the whole step; per-row Python work only for seeded rows and logprobs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.engine.outputs import SampleLogprobs
from tokenmill.engine.request import SamplingParams


@dataclass
class SamplingRow:
    """One row of the step's logits and everything needed to sample it."""
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None  # a seeded request's own generator
    stop_token_ids: tuple[int, ...]    # EOS (unless ignore_eos) + stop_token_ids, masked before min_tokens


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """In place: OpenAI-style presence/frequency penalties over generated tokens and
    the CTRL-style repetition penalty over prompt + generated tokens."""
    vocab_size = logits.shape[-1]
    for i, row in enumerate(rows):
        params = row.params
        if not params.has_penalties:
            continue
        if row.output_token_ids and (params.presence_penalty or params.frequency_penalty):
            outputs = torch.tensor(row.output_token_ids, device=logits.device)
            counts = torch.bincount(outputs, minlength=vocab_size).to(logits.dtype)
            logits[i] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(row.prompt_token_ids) | set(row.output_token_ids)), device=logits.device)
            values = logits[i, seen]
            logits[i, seen] = torch.where(values > 0, values / params.repetition_penalty,
                                          values * params.repetition_penalty)


def _filter(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Temperature, then top-k / top-p / min-p as -inf masks. Returns probabilities."""
    device = logits.device
    temperature = torch.tensor([max(row.params.temperature, 1e-5) for row in rows], device=device)
    logits = logits / temperature.unsqueeze(1)
    vocab_size = logits.shape[-1]
    top_k = [min(row.params.top_k, vocab_size) if row.params.top_k > 0 else vocab_size for row in rows]
    top_p = [row.params.top_p for row in rows]
    if any(k < logits.shape[-1] for k in top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, sorted_index = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(logits.shape[-1], device=device).unsqueeze(0)
        remove = ranks >= torch.tensor(top_k, device=device).unsqueeze(1)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        remove |= mass_before > torch.tensor(top_p, device=device).unsqueeze(1)
        remove[:, 0] = False  # the most likely token always survives
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, sorted_index, sorted_logits)
    probs = logits.softmax(dim=-1)
    min_p = torch.tensor([row.params.min_p for row in rows], device=device)
    if bool((min_p > 0).any()):
        threshold = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
        probs = probs.masked_fill(probs < threshold, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def _draw(probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Exponential-race sampling: argmax(p / E) with E ~ Exp(1) picks token t with
    probability p_t; seeded rows draw E from their own generator so their samples do
    not depend on what else is in the batch."""
    noise = torch.empty_like(probs).exponential_()
    for i, row in enumerate(rows):
        if row.generator is not None:
            noise[i].exponential_(generator=row.generator)
    return (probs / noise).argmax(dim=-1)


def _first_argmax(logits: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Index of the largest logit of each row, the first one on ties (as argmax).

    CPU reductions that also track indices (argmax, max with indices) are several
    times slower than a plain max over a 262k vocabulary. So: the max of each
    chunk of `chunk` logits, the first chunk holding the row's max, then the
    first index inside that chunk — the same answer as argmax.
    """
    num_rows, vocab = logits.shape
    if vocab % chunk or vocab <= chunk:
        return logits.max(dim=-1).indices
    chunks = logits.view(num_rows, vocab // chunk, chunk)
    best_chunk = chunks.amax(dim=-1).max(dim=-1).indices  # [num_rows]
    rows = torch.arange(num_rows, device=logits.device)
    return best_chunk * chunk + chunks[rows, best_chunk].max(dim=-1).indices


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[list[int], list[SampleLogprobs | None]]:
    """logits: [num_rows, vocab] in any float dtype, one row per request that
    samples this step. Does not modify `logits`. Returns the sampled token ids and,
    per row, the logprobs asked for (None when not asked). Probabilities and
    logprobs are computed in float32; a greedy pick needs no upcast (it is exact)."""
    needs_processing = any(row.params.has_penalties or len(row.output_token_ids) < row.params.min_tokens
                           for row in rows)
    greedy = [row.params.greedy for row in rows]
    if all(greedy) and not needs_processing:
        token_ids = _first_argmax(logits)
    else:
        processed = logits.float()  # a copy when logits are 16-bit; cloned below otherwise
        if needs_processing:
            if processed is logits:
                processed = processed.clone()
            _apply_penalties(processed, rows)
            for i, row in enumerate(rows):
                if len(row.output_token_ids) < row.params.min_tokens and row.stop_token_ids:
                    processed[i, list(row.stop_token_ids)] = float("-inf")
        token_ids = _first_argmax(processed)
        if not all(greedy):
            random_index = [i for i, is_greedy in enumerate(greedy) if not is_greedy]
            random_rows = [rows[i] for i in random_index]
            probs = _filter(processed[random_index], random_rows)
            token_ids[random_index] = _draw(probs, random_rows)
    token_list = token_ids.tolist()
    return token_list, _logprobs(logits, rows, token_list)


def _logprobs(logits: torch.Tensor, rows: list[SamplingRow], token_ids: list[int]) -> list[SampleLogprobs | None]:
    """Logprobs of the raw model distribution for the rows that ask: logit - logsumexp,
    with the top-n picked on the raw logits (same order), never a full log_softmax."""
    result: list[SampleLogprobs | None] = [None] * len(rows)
    wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    if not wanted:
        return result
    index = torch.tensor(wanted, device=logits.device)
    subset = logits.index_select(0, index)                           # [num_wanted, vocab]
    log_normalizer = torch.logsumexp(subset.float(), dim=-1).tolist()
    chosen = subset.gather(1, torch.tensor([[token_ids[i]] for i in wanted], device=logits.device))
    chosen = chosen.float().flatten().tolist()
    most = max(rows[i].params.logprobs for i in wanted)
    if most:
        top_values, top_indices = subset.topk(most, dim=-1)
        top_values, top_indices = top_values.float().tolist(), top_indices.tolist()
    for position, i in enumerate(wanted):
        count = rows[i].params.logprobs
        top = []
        if count:
            top = [(token, value - log_normalizer[position])
                   for token, value in zip(top_indices[position][:count], top_values[position][:count])]
        result[i] = SampleLogprobs(token_logprob=chosen[position] - log_normalizer[position], top=top)
    return result
