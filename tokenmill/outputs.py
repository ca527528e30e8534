"""What `LLM.generate` and the async engine hand to users (shaped like vLLM's)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    token_id: int
    logprob: float


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None        # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None    # the stop string or stop token id that ended it
    cumulative_logprob: float | None = None
    # Per generated token: the sampled token's logprob and the top-n alternatives.
    logprobs: list[tuple[Logprob, list[Logprob]]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
