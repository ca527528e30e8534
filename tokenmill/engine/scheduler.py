"""Continuous batching: which tokens of which requests run in the next step.

Imports no torch. The runner is fed `SchedulerOutput`; results come back through
`update_from_output`. Blocks are obtained from and returned to the KV manager.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from tokenmill.engine.kv_manager import KVCacheManager, cdiv
from tokenmill.engine.outputs import NewRequestData, RunnerOutput, ScheduledRequest, SchedulerOutput
from tokenmill.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192
    # While other requests are decoding, the most tokens one request computes in a
    # step (0: no cap but the step budget). A long prompt then takes several steps
    # and the running streams keep decoding in each of them instead of stalling
    # behind one huge prefill; with nothing decoding, prompts take the whole budget.
    long_prefill_token_threshold: int = 0

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be >= 0, got {self.long_prefill_token_threshold}")

    def chunk(self, num_tokens: int, budget: int, decoding: bool) -> int:
        """Tokens of a request with `num_tokens` left to compute that run this step
        (`decoding`: whether other requests decode in it)."""
        limit = self.long_prefill_token_threshold
        return min(num_tokens, budget, limit) if limit and decoding else min(num_tokens, budget)


class Scheduler:
    """Owns the waiting queue and the running list.

    Contracts:
    - `add_request` raises ValueError for a request that could never run.
    - `schedule()` never over-commits blocks: every scheduled token has a slot.
    - `update_from_output` appends sampled tokens and finishes requests that hit
      EOS, a stop token, max_tokens or max_model_len; it returns the requests that
      received a token, in schedule order.
    """

    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager) -> None:
        self.config = config
        self.kv = kv_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_ids: set[str] = set()
        self.num_preemptions = 0

    # ---- admission -----------------------------------------------------------
    def check_request(self, request: Request) -> None:
        """Raise ValueError if the request can never be served by this engine."""
        max_tokens = request.sampling_params.max_tokens or 0
        num_prompt = request.num_prompt_tokens
        limit = self.config.max_model_len
        if num_prompt == 0:
            raise ValueError("the prompt is empty")
        if num_prompt + max_tokens > limit:
            raise ValueError(
                f"this request needs {num_prompt} prompt tokens + {max_tokens} max_tokens = "
                f"{num_prompt + max_tokens} tokens, more than max_model_len ({limit})")
        needed_blocks = cdiv(num_prompt + max_tokens, self.kv.block_size)
        if needed_blocks > self.kv.num_blocks:
            raise ValueError(
                f"this request needs {needed_blocks} KV blocks but the cache has only "
                f"{self.kv.num_blocks} ({self.kv.num_blocks * self.kv.block_size} tokens)")

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.check_request(request)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """Remove a request (finished or aborted) and free its blocks. Unknown ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
        self.kv.free(request)
        self.kv.forget(request)
        self._finished_ids.add(request_id)
        return request

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    # ---- the step ------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        # The rule: there are no prefill or decode phases. Each request's computed
        # tokens catch up with its known tokens (prompt + generated), within one
        # step's token budget; running requests go first, in admission order, then
        # waiting ones join while budget, sequence slots and blocks remain. When
        # blocks run out, the most recently admitted running request is preempted
        # (its blocks freed, recomputed later) and no new request joins this step.
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: set[str] = set()
        # Whether some running request decodes (has exactly its last token to compute).
        decoding = bool(self.config.long_prefill_token_threshold) and any(
            r.num_tokens - r.num_computed_tokens == 1 for r in self.running)

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = self.config.chunk(request.num_tokens - request.num_computed_tokens, budget, decoding)
            while self.kv.allocate_slots(request, num_new) is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted.add(victim.request_id)
                if victim is request:
                    break
            if request.request_id in preempted:
                break
            scheduled.append(self._schedule_tokens(request, num_new, is_new=False))
            budget -= num_new
            index += 1

        if not preempted:
            budget = self._admit_waiting(budget, scheduled, decoding)

        output = SchedulerOutput(
            scheduled=scheduled,
            num_batched_tokens=self.config.max_num_batched_tokens - budget,
            finished_request_ids=self._finished_ids,
            preempted_request_ids=preempted,
        )
        self._finished_ids = set()
        return output

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledRequest], decoding: bool) -> int:
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if self._sibling_is_prefilling(request):
                # Let the sibling fill the prefix cache first, then share its blocks.
                skipped.append(self.waiting.popleft())
                continue
            cached_blocks, num_cached = self.kv.get_computed_blocks(request)
            num_new = self.config.chunk(request.num_tokens - num_cached, budget, decoding)
            if self.kv.allocate_slots(request, num_new, cached_blocks) is None:
                break
            self.waiting.popleft()
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            scheduled.append(self._schedule_tokens(request, num_new, is_new=True))
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))
        return budget

    def _sibling_is_prefilling(self, request: Request) -> bool:
        if request.group_id is None:
            return False
        return any(other.group_id == request.group_id and other.num_computed_tokens < other.num_prompt_tokens
                   for other in self.running)

    def _schedule_tokens(self, request: Request, num_new: int, is_new: bool) -> ScheduledRequest:
        start = request.num_computed_tokens
        end = start + num_new
        self.kv.cache_full_blocks(request, end)
        new_data = None
        if is_new:
            new_data = NewRequestData(
                request_id=request.request_id,
                prompt_token_ids=request.prompt_token_ids,
                output_token_ids=list(request.output_token_ids),
                sampling_params=request.sampling_params,
                seed=request.sampling_params.seed,
            )
        request.num_computed_tokens = end
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=request.token_ids_slice(start, end),
            num_computed_tokens=start,
            block_table=list(self.kv.block_table(request.request_id)),
            sample=end == request.num_tokens,
            new_request=new_data,
        )

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: RunnerOutput) -> list[tuple[Request, int]]:
        updates: list[tuple[Request, int]] = []
        now = time.monotonic()
        for item in scheduler_output.scheduled:
            token_id = runner_output.sampled_token_ids.get(item.request_id)
            request = self.requests.get(item.request_id)
            if token_id is None or request is None or request.status != RequestStatus.RUNNING:
                continue
            request.output_token_ids.append(token_id)
            if request.first_token_time is None:
                request.first_token_time = now
            updates.append((request, token_id))
            status = self._stop_status(request, token_id)
            if status is not None:
                self.finish_request(request.request_id, status)
        return updates

    def _stop_status(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        num_output = len(request.output_token_ids)
        if num_output >= params.min_tokens:
            if not params.ignore_eos and token_id in request.eos_token_ids:
                request.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                request.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and num_output >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    # ---- invariants ----------------------------------------------------------
    def check_integrity(self) -> None:
        """Scheduler and KV-manager invariants; cheap enough to call after every step."""
        self.kv.check_integrity()
        assert len(self.running) <= self.config.max_num_seqs
        seen = set()
        for request in self.running:
            assert request.status == RequestStatus.RUNNING, request.status
            table = self.kv.block_table(request.request_id)
            assert len(table) * self.kv.block_size >= request.num_computed_tokens
            assert request.num_computed_tokens <= request.num_tokens
            seen.add(request.request_id)
        for request in self.waiting:
            assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED), request.status
            assert not self.kv.block_table(request.request_id), "a waiting request holds blocks"
            seen.add(request.request_id)
        assert seen == set(self.requests), "requests map and queues disagree"
