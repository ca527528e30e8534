"""Token counts of each request, and of each of its chunks, with where they came from.

Output tokens of a request, first available of:
  `usage`      the server's `usage.completion_tokens` (asked for with
               `stream_options.include_usage`);
  `logprobs`   the number of logprobs entries received (one per token);
  `tokenizer`  the local tokenizer (--tokenizer) on the whole output text;
  `chunks`     the number of content chunks (a lower bound, said as such).
Prompt tokens: `usage.prompt_tokens`, else the tokenizer on the prompt text
(`tokenizer`; chat templates add a few tokens it cannot see), else unknown.

Tokens carried by each content chunk (what per-token ITL needs), first of:
  `logprobs`       the chunk's logprobs entries: exact;
  `one_per_chunk`  the output count equals the number of chunks: one each;
  `tokenizer`      the tokenizer on the chunk's text (at least 1);
  `by_characters`  the output count spread over the chunks in proportion to
                   their text length, each chunk at least 1 (largest remainder).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from tokenmill.bench.client import RequestRecord
from tokenmill.bench.config import BenchError


def load_tokenizer(spec: str):
    """`default` (the bundled model's), a .gguf file, a Hugging Face directory or a cached hub name."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # counting tokens must never download
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        if spec == "default":
            from tokenmill.models.gguf_cache import cache_root, gguf_cache_dir, load_cached_tokenizer
            from tokenmill.models.loader import default_model_path

            path = default_model_path()
            cached = gguf_cache_dir(path, cache_root())
            tokenizer = load_cached_tokenizer(cached) if cached.is_dir() else None
            return tokenizer or AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        path = Path(spec).expanduser()
        if path.suffix.lower() == ".gguf":
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(str(path) if path.exists() else spec)
    except Exception as error:  # transformers raises many kinds; the user only needs to know it failed
        message = " ".join(str(error).split())[:200]
        raise BenchError(f"cannot load the tokenizer {spec!r}: {message}") from None


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def _spread_by_characters(total: int, texts: list[str]) -> list[int]:
    counts = [1] * len(texts)
    spare = total - len(texts)
    lengths = [len(text) for text in texts]
    length_sum = sum(lengths)
    if spare <= 0 or length_sum == 0:
        return counts
    shares = [spare * length / length_sum for length in lengths]
    for i, share in enumerate(shares):
        counts[i] += int(share)
    left = spare - sum(int(share) for share in shares)
    by_remainder = sorted(range(len(texts)), key=lambda i: shares[i] - int(shares[i]), reverse=True)
    for i in by_remainder[:left]:
        counts[i] += 1
    return counts


def resolve_token_counts(records: list[RequestRecord], tokenizer=None) -> None:
    """Fill prompt_tokens, output_tokens and chunk_tokens (with their sources) of every record."""
    for record in records:
        if record.usage_prompt_tokens is not None:
            record.prompt_tokens, record.prompt_tokens_source = record.usage_prompt_tokens, "usage"
        elif tokenizer is not None:
            record.prompt_tokens = _count(tokenizer, record.spec.prompt_text)
            record.prompt_tokens_source = "tokenizer"

        chunks = len(record.chunk_times)
        if record.usage_completion_tokens is not None:
            record.output_tokens, record.output_tokens_source = record.usage_completion_tokens, "usage"
        elif record.saw_logprobs:
            record.output_tokens, record.output_tokens_source = sum(record.chunk_logprob_tokens), "logprobs"
        elif tokenizer is not None:
            record.output_tokens = _count(tokenizer, "".join(record.chunk_texts))
            record.output_tokens_source = "tokenizer"
        else:
            record.output_tokens, record.output_tokens_source = chunks, "chunks"

        if chunks == 0:
            record.chunk_tokens, record.chunk_tokens_source = [], None
        elif record.saw_logprobs:
            record.chunk_tokens, record.chunk_tokens_source = list(record.chunk_logprob_tokens), "logprobs"
        elif record.output_tokens == chunks:
            record.chunk_tokens, record.chunk_tokens_source = [1] * chunks, "one_per_chunk"
        elif tokenizer is not None:
            record.chunk_tokens = [max(1, _count(tokenizer, text)) for text in record.chunk_texts]
            record.chunk_tokens_source = "tokenizer"
        else:
            record.chunk_tokens = _spread_by_characters(record.output_tokens, record.chunk_texts)
            record.chunk_tokens_source = "by_characters"


def count_sources(records: list[RequestRecord]) -> dict[str, dict[str, int]]:
    """How many requests took each count from each source, e.g. {"output": {"usage": 32}}."""
    def tally(attribute: str) -> dict[str, int]:
        return dict(Counter(getattr(r, attribute) or "unknown" for r in records))

    return {"prompt": tally("prompt_tokens_source"), "output": tally("output_tokens_source"),
            "chunks": tally("chunk_tokens_source")}
