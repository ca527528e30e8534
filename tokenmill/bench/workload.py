"""The requests a run sends: synthetic prompts of chosen lengths, or a JSONL dataset.

`Workload.request(i)` is a pure function of (seed, i): the same seed gives the
same prompts and output lengths in the same order, whatever the timing, so two
servers benched with one seed see an identical workload.

Synthetic prompts are random sequences of common English words, about one token
each in the usual BPE and SentencePiece vocabularies, so a prompt of N words is
close to N tokens; the exact count comes from the server's `usage` and is
reported. Each prompt draws its own words, so prompts share no prefix to cache,
unless `--prefix-len N` puts the same N words (drawn from the seed alone) in
front of every prompt: a shared system prompt (chat: a system message).

A dataset is a JSONL file, one request per line: {"prompt": "..."} or
{"messages": [{"role": "user", "content": "..."}]}, optionally with
"max_tokens" (else --output-len decides). Lines are used in an order shuffled
by the seed, cycling when the run needs more requests than the file has.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from tokenmill.bench.config import BenchConfig, BenchError, LengthDistribution

WORDS = (
    "time", "people", "year", "way", "day", "man", "thing", "woman", "life", "child", "world", "school",
    "state", "family", "student", "group", "country", "problem", "hand", "part", "place", "case", "week",
    "company", "system", "program", "question", "work", "number", "night", "point", "home", "water", "room",
    "mother", "area", "money", "story", "fact", "month", "right", "study", "book", "eye", "job", "word",
    "business", "issue", "side", "kind", "head", "house", "service", "friend", "father", "power", "hour",
    "game", "line", "end", "member", "law", "car", "city", "name", "team", "minute", "idea", "body", "back",
    "face", "level", "office", "door", "health", "person", "art", "war", "history", "party", "result",
    "change", "morning", "reason", "research", "girl", "moment", "air", "teacher", "force", "river", "music",
    "market", "food", "paper", "table", "light", "voice", "road", "field", "garden", "window", "stone",
)

# Warm-up requests draw from their own stream so that they never repeat a measured prompt.
_WARMUP_STREAM = 1 << 40
_PREFIX_STREAM = 1 << 41


@dataclass(frozen=True)
class RequestSpec:
    """One request's content: a prompt (completions) or messages (chat), and its output budget."""

    max_tokens: int
    prompt: str | None = None
    messages: tuple[dict, ...] | None = None

    @property
    def prompt_text(self) -> str:
        """The text a tokenizer would count when the server reports no usage."""
        if self.prompt is not None:
            return self.prompt
        return "\n".join(str(message.get("content") or "") for message in self.messages or ())


class Workload:
    def __init__(self, config: BenchConfig) -> None:
        self.endpoint = config.endpoint
        self.seed = config.seed
        self.input_len = config.input_len
        self.output_len: LengthDistribution = config.output_len
        self.dataset = _load_dataset(config.dataset, config.endpoint) if config.dataset else None
        prefix_rng = random.Random(config.seed * 1_000_003 + _PREFIX_STREAM)
        self.prefix = " ".join(prefix_rng.choices(WORDS, k=config.prefix_len)) if config.prefix_len else ""
        if self.dataset is not None:
            self.order = list(range(len(self.dataset)))
            random.Random(config.seed).shuffle(self.order)

    def describe(self) -> str:
        outputs = f"output length {self.output_len.describe()} tokens"
        if self.dataset is not None:
            return f"{len(self.dataset)} dataset prompts, {outputs} unless a line sets max_tokens"
        shared = f" after a shared prefix of about {len(self.prefix.split())} tokens" if self.prefix else ""
        return f"synthetic prompts of about {self.input_len.describe()} tokens{shared}, {outputs}"

    def request(self, index: int) -> RequestSpec:
        rng = random.Random(self.seed * 1_000_003 + index)
        if self.dataset is not None:
            entry = self.dataset[self.order[index % len(self.dataset)]]
            max_tokens = entry.get("max_tokens") or self.output_len.sample(rng)
            if self.endpoint == "chat":
                messages = entry.get("messages") or ({"role": "user", "content": entry["prompt"]},)
                return RequestSpec(max_tokens=max_tokens, messages=tuple(messages))
            return RequestSpec(max_tokens=max_tokens, prompt=entry["prompt"])
        words = " ".join(rng.choices(WORDS, k=self.input_len.sample(rng)))
        max_tokens = self.output_len.sample(rng)
        if self.endpoint == "chat":
            user = {"role": "user", "content": words}
            messages = ({"role": "system", "content": self.prefix}, user) if self.prefix else (user,)
            return RequestSpec(max_tokens=max_tokens, messages=messages)
        return RequestSpec(max_tokens=max_tokens, prompt=f"{self.prefix} {words}" if self.prefix else words)

    def warmup_request(self, index: int) -> RequestSpec:
        return self.request(_WARMUP_STREAM + index)


def _load_dataset(path: Path, endpoint: str) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise BenchError(f"cannot read the dataset {str(path)!r}: {error.strerror or error}") from None
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise BenchError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(entry, dict) or not (isinstance(entry.get("prompt"), str)
                                               or isinstance(entry.get("messages"), list)):
            raise BenchError(f"{path}:{number}: each line needs a \"prompt\" string or a \"messages\" list")
        if endpoint == "completions" and not isinstance(entry.get("prompt"), str):
            raise BenchError(f"{path}:{number}: the completions endpoint needs a \"prompt\" "
                             "(use --endpoint chat for \"messages\")")
        max_tokens = entry.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise BenchError(f"{path}:{number}: max_tokens must be a positive integer")
        entries.append(entry)
    if not entries:
        raise BenchError(f"the dataset {str(path)!r} has no requests")
    return entries
