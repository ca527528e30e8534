"""A bounded admission queue per pool, fair across keys, with a predicted wait and overflow.

A pool holds `capacity` requests at once: `queue.max_concurrent_per_upstream`
for each admitted upstream. A request that finds a free slot and nobody queued
goes at once; otherwise it queues. Queued requests are granted slots round-robin
across keys (each key's own requests in arrival order), so a burst from one key
waits behind its own requests, not in front of everybody else's.

Overflow rule (`AdmissionQueue.admit`), for a request whose key allows overflow
and whose model has an overflow pool:
- no upstream of the pool is admitted                   -> overflow ("no_upstream");
- its predicted wait exceeds the pool's `sla_wait_s`      -> overflow ("predicted_wait");
- the queue is full (`queue.max_queue`)                   -> overflow ("queue_full");
- it queued and was not granted within `sla_wait_s`       -> overflow ("sla_timeout").
Without overflow the same cases answer 503 with Retry-After (the last one after
`queue.max_wait_s`), and the request is never lost silently.

Predicted wait: positions ahead ÷ the pool's completion rate. Positions ahead =
the queued requests that round-robin serves before this one (the key's own
queued requests, plus for every other key as many of its queued requests as
there will be rounds), plus one when no slot is free, plus the requests waiting
inside the upstreams' own queues (their last `/metrics` scrape). Completion rate
= requests in service ÷ their smoothed service time (Little's law), in service
being the larger of this gateway's granted slots and the upstreams' scraped
running count; before any request has completed, the age of the oldest one in
service stands in for the service time (a lower bound, so the prediction only
grows as evidence comes in). With nothing in service the predicted wait is 0.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass

from tokenmill.gateway.upstreams import UpstreamPool
from tokenmill.server.errors import APIError


class Ticket:
    """A granted slot of a pool; `release()` (idempotent) gives it back."""

    __slots__ = ("queue", "granted_at", "waited_s", "_released")

    def __init__(self, queue: AdmissionQueue, waited_s: float) -> None:
        self.queue = queue
        self.granted_at = time.monotonic()
        self.waited_s = waited_s
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.queue._release(self)


@dataclass(frozen=True)
class Overflow:
    """Admission declined in favour of the overflow pool, and why."""
    reason: str
    predicted_wait_s: float


class _Waiter:
    __slots__ = ("key", "future", "enqueued_at")

    def __init__(self, key: str, future: asyncio.Future) -> None:
        self.key = key
        self.future = future
        self.enqueued_at = time.monotonic()


class AdmissionQueue:
    """The queue of one pool. Event-loop only; it owns its waiters and granted count."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.config = pool.config
        self._queues: dict[str, deque[_Waiter]] = {}
        self._ring: deque[str] = deque()   # keys with queued requests, in round-robin order
        self.num_queued = 0
        self._granted: dict[Ticket, None] = {}  # insertion-ordered: the oldest first
        self.on_grant = None                 # callback(waited_s) for metrics
        pool.on_capacity_change = self._dispatch

    @property
    def num_granted(self) -> int:
        return len(self._granted)

    # ---- prediction ----------------------------------------------------------------------
    def _rounds_ahead(self, key: str) -> int:
        own = len(self._queues.get(key, ()))
        rounds = own + 1
        return own + sum(min(len(queue), rounds) for other, queue in self._queues.items() if other != key)

    def completion_rate(self) -> float | None:
        """Requests completed per second now (Little's law); None with nothing in service."""
        busy = max(float(self.num_granted), self.pool.upstream_busy())
        if busy <= 0:
            return None
        service_s = self.pool.service_time_s
        if service_s is None:
            if not self._granted:
                return None
            service_s = time.monotonic() - next(iter(self._granted)).granted_at
        return busy / max(service_s, 1e-3)

    def predicted_wait(self, key: str) -> float:
        """Seconds a request of `key` arriving now would wait for a slot (rule above)."""
        capacity = self.pool.capacity()
        if capacity == 0:
            return math.inf
        positions = self._rounds_ahead(key) if self.num_queued else 0
        if self.num_queued or self.num_granted >= capacity:
            positions += 1
        positions += self.pool.upstream_waiting()
        if positions <= 0:
            return 0.0
        rate = self.completion_rate()
        return 0.0 if rate is None else positions / rate

    # ---- admission -----------------------------------------------------------------------
    def _retry_after(self, predicted: float) -> dict:
        seconds = 1 if not math.isfinite(predicted) else max(1, math.ceil(predicted))
        return {"Retry-After": str(min(seconds, 600))}

    async def admit(self, key: str, may_overflow: bool) -> Ticket | Overflow:
        """A slot for a request of `key`, or an `Overflow` (only when `may_overflow`).

        Raises APIError 503 (with Retry-After) when the request can be neither
        served nor overflowed. Cancellation while queued leaves no trace."""
        pool = self.pool
        capacity = pool.capacity()
        sla = self.config.sla_wait_s
        if capacity == 0:
            if may_overflow:
                return Overflow("no_upstream", math.inf)
            raise APIError(503, f"no upstream of pool {pool.name!r} is available; retry later",
                           "service_unavailable", code="no_upstream", headers={"Retry-After": "2"})
        if not self.num_queued and self.num_granted < capacity:
            return self._grant(0.0)
        predicted = self.predicted_wait(key)
        if may_overflow and sla is not None and predicted > sla:
            return Overflow("predicted_wait", predicted)
        if self.num_queued >= self.config.queue.max_queue:
            if may_overflow:
                return Overflow("queue_full", predicted)
            raise APIError(503, f"the queue of pool {pool.name!r} is full ({self.num_queued} requests); "
                                "retry later", "service_unavailable", code="queue_full",
                           headers=self._retry_after(predicted))
        waiter = _Waiter(key, asyncio.get_running_loop().create_future())
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
            self._ring.append(key)
        queue.append(waiter)
        self.num_queued += 1
        limit = sla if may_overflow and sla is not None else self.config.queue.max_wait_s
        try:
            async with asyncio.timeout(limit):
                return await waiter.future
        except TimeoutError:
            if waiter.future.done() and not waiter.future.cancelled():
                return waiter.future.result()
            self._remove(waiter)
            if may_overflow:
                return Overflow("sla_timeout", predicted)
            raise APIError(503, f"no slot of pool {pool.name!r} within {limit:g} s in its queue; retry later",
                           "service_unavailable", code="queue_timeout",
                           headers=self._retry_after(self.predicted_wait(key))) from None
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                waiter.future.result().release()
            else:
                self._remove(waiter)
            raise

    def _grant(self, waited_s: float) -> Ticket:
        ticket = Ticket(self, waited_s)
        self._granted[ticket] = None
        if self.on_grant is not None:
            self.on_grant(waited_s)
        return ticket

    def _remove(self, waiter: _Waiter) -> None:
        queue = self._queues.get(waiter.key)
        if queue is None:
            return
        try:
            queue.remove(waiter)
        except ValueError:
            return
        self.num_queued -= 1
        if not queue:
            del self._queues[waiter.key]
            self._ring.remove(waiter.key)

    def _release(self, ticket: Ticket) -> None:
        self._granted.pop(ticket, None)
        self._dispatch()

    def _dispatch(self) -> None:
        """Grant free slots to queued requests, one key at a time in turn."""
        capacity = self.pool.capacity()
        now = time.monotonic()
        while self.num_queued and self.num_granted < capacity:
            key = self._ring[0]
            queue = self._queues[key]
            waiter = queue.popleft()
            self.num_queued -= 1
            if queue:
                self._ring.rotate(-1)
            else:
                self._ring.popleft()
                del self._queues[key]
            if not waiter.future.done():
                waiter.future.set_result(self._grant(now - waiter.enqueued_at))
