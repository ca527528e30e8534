"""The engine loop in a background thread, and async streams for the server.

One thread owns the `EngineCore` and is fed commands (add, abort) through a
queue; asyncio code never touches engine state. Each step's results are copied
into immutable `StreamDelta`s and handed to the event loop in one callback.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

from tokenmill.engine.core import EngineCore, EngineOverloadedError, RequestUpdate
from tokenmill.engine.outputs import SampleLogprobs
from tokenmill.engine.request import Request, SamplingParams

__all__ = ["AsyncEngine", "RequestHandle", "EngineDeadError", "EngineOverloadedError", "EngineStats", "RequestFailedError",
           "RequestTimes", "StreamDelta"]

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; no request can be served."""


class RequestFailedError(RuntimeError):
    """The engine failed while running this request; the engine itself goes on."""


@dataclass(frozen=True)
class RequestTimes:
    arrival: float
    first_scheduled: float | None
    first_token: float | None
    finished: float
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    num_preemptions: int


@dataclass(frozen=True)
class StreamDelta:
    """What one step added to one completion (`index` of the request's n)."""
    index: int
    token_id: int | None
    text: str
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    times: RequestTimes | None = None   # set on the completion's last delta


def _delta(update: RequestUpdate) -> StreamDelta:
    request = update.request
    finished = request.is_finished
    return StreamDelta(
        index=request.sample_index, token_id=update.new_token_id, text=update.text_delta,
        logprobs=update.logprobs,
        finish_reason=request.finish_reason.value if finished else None,
        stop_reason=request.stop_reason if finished else None,
        times=_times(request) if finished else None)


def _times(request: Request) -> RequestTimes:
    return RequestTimes(
        arrival=request.arrival_time, first_scheduled=request.first_scheduled_time,
        first_token=request.first_token_time, finished=time.monotonic(),
        num_prompt_tokens=request.num_prompt_tokens, num_cached_tokens=max(request.num_cached_tokens, 0),
        num_output_tokens=len(request.output_token_ids), num_preemptions=request.num_preemptions)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot published by the engine thread after every step."""
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_steps: int = 0


@dataclass
class _Stream:
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    num_open: int = 1  # completions not finished yet


class AsyncEngine:
    """Contracts: `submit()` raises ValueError (invalid request) or
    EngineOverloadedError (queue full) and leaves nothing behind; an accepted
    request yields lists of `StreamDelta` until every completion has finished.
    Closing it early (client gone, timeout, cancellation) aborts the request and
    frees its blocks at once."""

    def __init__(self, core: EngineCore, max_waiting_requests: int | None = None) -> None:
        self.core = core
        self.max_waiting_requests = max_waiting_requests
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.stats = EngineStats()
        self.error: BaseException | None = None

    # ---- lifecycle -----------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="tokenmill-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._commands.put(("wake", None, None))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def num_active_requests(self) -> int:
        return len(self._streams)

    # ---- requests ------------------------------------------------------------
    async def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> RequestHandle:
        """Queue a request and wait until the engine has accepted it. Raises
        ValueError (invalid), EngineOverloadedError (queue full) or EngineDeadError.
        The caller must `close()` the handle when done with it (idempotent)."""
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        if self.max_waiting_requests is not None and 0 < self.max_waiting_requests < params.n:
            # Its n completions wait together: a full queue is not the reason, retrying never helps.
            raise ValueError(f"n={params.n} completions cannot fit the waiting queue "
                             f"(max_waiting_requests {self.max_waiting_requests})")
        stream = _Stream(num_open=params.n)
        self._streams[request_id] = stream
        accepted: Future = Future()
        self._commands.put(("add", (request_id, prompt_token_ids, params), accepted))
        try:
            await asyncio.wrap_future(accepted)
        except BaseException:
            self._streams.pop(request_id, None)
            rejected = accepted.done() and not accepted.cancelled() and accepted.exception() is not None
            if not rejected:  # cancelled while queued: the add may still run, so undo it
                self._commands.put(("abort", request_id, None))
            raise
        return RequestHandle(self, request_id, stream)

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[list[StreamDelta]]:
        """`submit()` and iterate; leaving the loop early aborts the request."""
        handle = await self.submit(request_id, prompt_token_ids, params)
        try:
            async for deltas in handle:
                yield deltas
        finally:
            handle.close()

    def _close(self, request_id: str, finished: bool) -> None:
        if self._streams.pop(request_id, None) is not None and not finished:
            self._commands.put(("abort", request_id, None))

    # ---- the engine thread -----------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._drain_commands(block=not self.core.has_unfinished_requests())
                if not self.core.has_unfinished_requests():
                    continue
                try:
                    updates = self.core.step()
                except Exception as error:  # one bad step fails its requests, not the engine
                    logger.exception("engine step failed; failing the requests it ran")
                    self._fail_all_running(error)
                    continue
                self._publish_stats()
                self._deliver(updates)
        except BaseException as error:
            self.error = error
            logger.exception("engine thread died")
            self._loop.call_soon_threadsafe(self._fail_all_streams, EngineDeadError(str(error)))

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.1) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._execute(*command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _execute(self, kind: str, payload, future: Future | None) -> None:
        if kind == "add":
            request_id, prompt_token_ids, params = payload
            try:
                self.core.add_request(request_id, prompt_token_ids, params, self.max_waiting_requests)
            except Exception as error:
                _settle(future, error)
            else:
                _settle(future, None)
            self._publish_stats()
        elif kind == "abort":
            self.core.abort_request(payload)
            self._publish_stats()

    def _publish_stats(self) -> None:
        scheduler = self.core.scheduler
        kv = self.core.kv_manager
        self.stats = EngineStats(
            num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
            kv_cache_usage=kv.usage, num_preemptions=scheduler.num_preemptions,
            prefix_cache_queries=kv.num_prefix_queries, prefix_cache_hits=kv.num_prefix_hits,
            num_steps=self.stats.num_steps + 1)

    def _deliver(self, updates: list[RequestUpdate]) -> None:
        batch: dict[str, list[StreamDelta]] = {}
        for update in updates:
            batch.setdefault(update.request.parent_id, []).append(_delta(update))
        if batch:
            self._loop.call_soon_threadsafe(self._put_batch, batch)

    def _put_batch(self, batch: dict[str, list[StreamDelta]]) -> None:
        for request_id, deltas in batch.items():
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.queue.put_nowait(deltas)

    def _fail_all_running(self, error: Exception) -> None:
        failed = {request.parent_id for request in list(self.core.scheduler.running)}
        for request_id in failed:
            self.core.abort_request(request_id)
        self._publish_stats()
        message = RequestFailedError(f"the engine failed while running this request: {error}")
        self._loop.call_soon_threadsafe(self._fail_streams, failed, message)

    def _fail_streams(self, request_ids, error: BaseException) -> None:
        for request_id in request_ids:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.queue.put_nowait(error)

    def _fail_all_streams(self, error: BaseException) -> None:
        self._fail_streams(list(self._streams), error)


def _settle(future: Future, error: Exception | None) -> None:
    """Resolve a submit future unless the submitter has given up on it."""
    try:
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
    except InvalidStateError:
        pass  # cancelled by the submitter; its abort command follows


class RequestHandle:
    """An accepted request: iterate it for lists of `StreamDelta` until every
    completion has finished; `close()` aborts it if it has not (freeing its
    blocks at once) and is safe to call more than once."""

    def __init__(self, engine: AsyncEngine, request_id: str, stream: _Stream) -> None:
        self.engine = engine
        self.request_id = request_id
        self._stream = stream
        self._finished = False

    async def __aiter__(self) -> AsyncIterator[list[StreamDelta]]:
        while not self._finished:
            item = await self._stream.queue.get()
            if isinstance(item, BaseException):
                self.close()
                raise item
            self._stream.num_open -= sum(1 for delta in item if delta.finish_reason is not None)
            if self._stream.num_open <= 0:
                self._finished = True
                self.engine._close(self.request_id, finished=True)
            yield item

    def close(self) -> None:
        self.engine._close(self.request_id, self._finished)
        self._finished = True
