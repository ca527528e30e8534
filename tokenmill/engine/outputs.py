"""The only contract between the scheduler and the runner: two plain dataclasses.

The scheduler says which tokens of which requests run this step; the runner
returns the tokens it sampled. Neither holds a tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.engine.request import SamplingParams


@dataclass
class NewRequestData:
    """Sent the first time a request is scheduled (and again after a preemption):
    what the runner needs to sample for it (penalties need the token history)."""
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    # Seed of the request's own random generator (None: the engine's shared one).
    seed: int | None


@dataclass
class ScheduledRequest:
    request_id: str
    # Tokens computed this step; token_ids[0] sits at position num_computed_tokens.
    token_ids: list[int]
    num_computed_tokens: int
    # Every block the request holds, in position order (covers this step's tokens).
    block_table: list[int]
    # True when this step computes the request's last known token, so it samples.
    sample: bool
    new_request: NewRequestData | None = None


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    num_batched_tokens: int
    # Requests that left since the previous step: the runner drops their state.
    finished_request_ids: set[str] = field(default_factory=set)
    preempted_request_ids: set[str] = field(default_factory=set)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class SampleLogprobs:
    """Log-probability of the sampled token and the top-n alternatives (raw model distribution)."""
    token_logprob: float
    top: list[tuple[int, float]]


@dataclass
class RunnerOutput:
    sampled_token_ids: dict[str, int]
    logprobs: dict[str, SampleLogprobs] = field(default_factory=dict)
