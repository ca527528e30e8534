"""The admission queue: fair across keys, predicted waits, overflow and 503 decisions."""
import asyncio
import time

import pytest

from tokenmill.gateway.admission import AdmissionQueue, Overflow, Ticket
from tokenmill.gateway.config import PoolConfig
from tokenmill.gateway.upstreams import UpstreamPool
from tokenmill.server.errors import APIError


def make_queue(slots=1, upstreams=1, **fields) -> AdmissionQueue:
    config = PoolConfig.model_validate({
        "tier": "self_hosted", "model": "m",
        "upstreams": [{"base_url": f"http://10.0.0.{i}:8000/v1"} for i in range(upstreams)],
        "queue": {"max_concurrent_per_upstream": slots, **fields.pop("queue", {})}, **fields})
    return AdmissionQueue(UpstreamPool("small", config, {}))


def test_a_burst_from_one_key_does_not_starve_another():
    async def scenario():
        queue = make_queue(slots=1)
        first = await queue.admit("A", False)
        order = []

        async def request(key, n):
            ticket = await queue.admit(key, False)
            order.append(f"{key}{n}")
            await asyncio.sleep(0)
            ticket.release()

        tasks = [asyncio.create_task(request("A", n)) for n in range(1, 9)]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(request("B", n)) for n in range(1, 3)]
        await asyncio.sleep(0)
        assert queue.num_queued == 10
        first.release()
        await asyncio.gather(*tasks)
        return order

    order = asyncio.run(scenario())
    # B's two requests arrived after eight of A's, yet are served in turn with A's
    assert order[:5] == ["A1", "B1", "A2", "B2", "A3"]
    assert order[5:] == [f"A{n}" for n in range(4, 9)]


def test_predicted_wait_follows_the_queue_ahead_and_the_completion_rate():
    async def scenario():
        queue = make_queue(slots=2)
        pool = queue.pool
        assert queue.predicted_wait("A") == 0.0  # free slots, nobody queued
        tickets = [await queue.admit("A", False) for _ in range(2)]
        assert queue.predicted_wait("A") > 0  # no completion yet: the oldest request's age is the service time
        pool.observe_completion(2.0)  # requests hold a slot 2 s: 2 slots -> 1 completion per second
        assert queue.predicted_wait("A") == pytest.approx(1.0)  # no slot free: wait for the next completion
        waiting = [asyncio.create_task(queue.admit("A", False)) for _ in range(3)]
        await asyncio.sleep(0)
        assert queue.num_queued == 3
        assert queue.predicted_wait("A") == pytest.approx(4.0)  # 3 of its own ahead, then itself
        # another key is served in turn: only one of A's queued requests is ahead of B's first
        assert queue.predicted_wait("B") == pytest.approx(2.0)
        pool.upstreams[0].scraped_waiting, pool.upstreams[0].scraped_at = 2, time.monotonic()
        assert queue.predicted_wait("B") == pytest.approx(4.0)  # two more inside the replica's own queue
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        for ticket in tickets:
            ticket.release()
        assert queue.num_queued == 0 and queue.num_granted == 0

    asyncio.run(scenario())


def test_overflow_when_the_predicted_wait_exceeds_the_sla_and_only_then():
    async def scenario():
        queue = make_queue(slots=1, sla_wait_s=2.0)
        busy = await queue.admit("A", True)
        queue.pool.observe_completion(1.5)
        # the next request waits ~1.5 s: within the SLA, so it queues (and is granted on release)
        waiter = asyncio.create_task(queue.admit("A", True))
        await asyncio.sleep(0)
        assert queue.num_queued == 1
        # the one after would wait ~3 s: it overflows at once
        decision = await queue.admit("B", True)
        assert isinstance(decision, Overflow) and decision.reason == "predicted_wait"
        assert decision.predicted_wait_s == pytest.approx(3.0)
        # a key that may not overflow queues instead
        no_overflow = asyncio.create_task(queue.admit("C", False))
        await asyncio.sleep(0)
        assert queue.num_queued == 2
        busy.release()
        granted = await waiter
        assert isinstance(granted, Ticket)
        granted.release()
        (await no_overflow).release()

    asyncio.run(scenario())


def test_a_full_queue_answers_503_with_retry_after_or_overflows():
    async def scenario():
        queue = make_queue(slots=1, queue={"max_queue": 1})
        busy = await queue.admit("A", False)
        queued = asyncio.create_task(queue.admit("A", False))
        await asyncio.sleep(0)
        with pytest.raises(APIError) as refused:
            await queue.admit("B", False)
        assert refused.value.status == 503 and refused.value.code == "queue_full"
        assert int(refused.value.headers["Retry-After"]) >= 1
        decision = await queue.admit("B", True)
        assert isinstance(decision, Overflow) and decision.reason == "queue_full"
        busy.release()
        (await queued).release()

    asyncio.run(scenario())


def test_no_admitted_upstream_answers_503_or_overflows():
    async def scenario():
        queue = make_queue()
        queue.pool.upstreams[0].healthy = False
        with pytest.raises(APIError) as refused:
            await queue.admit("A", False)
        assert refused.value.status == 503 and refused.value.code == "no_upstream"
        assert (await queue.admit("A", True)).reason == "no_upstream"

    asyncio.run(scenario())


def test_a_request_not_served_within_the_sla_overflows_and_without_overflow_times_out():
    async def scenario():
        queue = make_queue(slots=1, sla_wait_s=0.2, queue={"max_wait_s": 0.3})
        busy = await queue.admit("A", False)  # nothing has completed: the predicted wait starts small
        decision = await queue.admit("B", True)
        assert isinstance(decision, Overflow) and decision.reason in ("sla_timeout", "predicted_wait")
        with pytest.raises(APIError) as refused:
            await queue.admit("C", False)
        assert refused.value.status == 503 and refused.value.code == "queue_timeout"
        assert queue.num_queued == 0
        busy.release()
        assert queue.num_granted == 0

    asyncio.run(scenario())


def test_a_request_cancelled_while_queued_leaves_no_trace():
    async def scenario():
        queue = make_queue(slots=1)
        busy = await queue.admit("A", False)
        waiting = asyncio.create_task(queue.admit("B", False))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert queue.num_queued == 0
        busy.release()
        busy.release()  # idempotent
        assert queue.num_granted == 0
        again = await queue.admit("C", False)
        assert queue.num_granted == 1
        again.release()

    asyncio.run(scenario())


def test_capacity_coming_back_grants_queued_requests():
    async def scenario():
        queue = make_queue(slots=1, upstreams=2)
        pool = queue.pool
        first = await queue.admit("A", False)
        pool.upstreams[1].healthy = False
        pool._capacity_changed()
        waiting = asyncio.create_task(queue.admit("A", False))
        await asyncio.sleep(0)
        assert queue.num_queued == 1
        pool.upstreams[1].readmit(probation=False)
        pool._capacity_changed()
        ticket = await asyncio.wait_for(waiting, 1)
        assert queue.num_granted == 2
        ticket.release(), first.release()

    asyncio.run(scenario())
