"""Balancing with prefix affinity, health checks, ejection and re-admission of upstreams."""
import asyncio
import time
from collections import Counter

import httpx

from tokenmill.bench.fake_server import FakeScript, FakeServerThread
from tokenmill.gateway.config import PoolConfig
from tokenmill.gateway.upstreams import UpstreamPool, affinity_digest, parse_queue_metrics


def make_pool(urls, **fields) -> UpstreamPool:
    config = PoolConfig.model_validate({"tier": "self_hosted", "model": "m",
                                        "upstreams": [{"base_url": url} for url in urls], **fields})
    return UpstreamPool("small", config, {})


def three() -> UpstreamPool:
    return make_pool([f"http://10.0.0.{i}:8000/v1" for i in range(1, 4)])


def test_a_shared_prefix_always_lands_on_the_same_replica_and_prefixes_spread():
    pool = three()
    placement = {}
    for n in range(300):
        digest = affinity_digest(f"You are assistant number {n}. Answer briefly.")
        chosen = {pool.choose(digest).index for _ in range(5)}
        assert len(chosen) == 1  # same prefix, same replica, every time
        placement[n] = chosen.pop()
    shares = Counter(placement.values())
    assert set(shares) == {0, 1, 2}
    assert all(60 <= count <= 140 for count in shares.values()), shares


def test_only_the_prefixes_of_an_ejected_replica_move():
    pool = three()
    digests = [affinity_digest(f"system prompt {n}") for n in range(200)]
    before = [pool.choose(d).index for d in digests]
    pool.upstreams[1].healthy = False
    after = [pool.choose(d).index for d in digests]
    for old, new in zip(before, after):
        if old != 1:
            assert new == old
        else:
            assert new in (0, 2)


def test_a_much_busier_preferred_replica_gives_way_to_the_least_loaded():
    pool = three()  # max_imbalance 4 by default
    digest = affinity_digest("a long shared system prompt")
    preferred = pool.choose(digest)
    others = [u for u in pool.upstreams if u is not preferred]
    tokens = [preferred.begin() for _ in range(4)]
    assert pool.choose(digest) is preferred           # 4 more than the others: still within the rule
    tokens.append(preferred.begin())
    chosen = pool.choose(digest)
    assert chosen in others and chosen.outstanding == 0  # 5 more: least outstanding wins
    for token in tokens:
        preferred.end(token)
    assert pool.choose(digest) is preferred


def test_without_affinity_the_least_outstanding_replica_is_chosen_and_full_ones_skipped():
    pool = make_pool(["http://a:1/v1", "http://b:1/v1"], queue={"max_concurrent_per_upstream": 2})
    a, b = pool.upstreams
    a.begin()
    assert pool.choose(None) is b
    b.begin(), b.begin()
    assert pool.choose(None) is a  # b is full
    assert pool.choose(None, exclude={0}) is b  # every other one full: least loaded anyway
    assert pool.capacity() == 4


def test_consecutive_failures_eject_and_a_passing_check_after_the_cool_down_readmits():
    async def scenario():
        with FakeServerThread(FakeScript()) as server:
            pool = make_pool([server.base_url, "http://127.0.0.1:9/v1"],
                             health={"eject_after_failures": 2, "readmit_after_s": 0.3, "metrics_path": None})
            changes = []
            pool.on_capacity_change = lambda: changes.append(pool.capacity())
            live, dead = pool.upstreams
            async with httpx.AsyncClient() as client:
                pool.bind(client)
                pool.record_failure(live, "connect error")
                assert live.healthy  # one failure is not enough
                live.record_success()
                pool.record_failure(live, "connect error")
                assert live.healthy  # the success in between reset the count
                pool.record_failure(live, "connect error")
                assert not live.healthy and changes == [64]
                await pool.check_now()            # passes, but the cool-down has not passed yet
                assert not live.healthy
                await asyncio.sleep(0.35)
                await pool.check_now()            # passes after the cool-down: back
                assert live.healthy
                # meanwhile the dead address failed its two checks and was ejected by them alone
                assert not dead.healthy and dead.num_ejections == 1
                assert changes == [64, 0, 64]
                assert pool.choose(None) is live

    asyncio.run(scenario())


def test_a_replica_whose_health_check_fails_is_ejected_by_checks():
    async def scenario():
        with FakeServerThread(FakeScript(health_status=503)) as server:
            pool = make_pool([server.base_url], health={"eject_after_failures": 3})
            async with httpx.AsyncClient() as client:
                pool.bind(client)
                for _ in range(2):
                    await pool.check_now()
                assert pool.upstreams[0].healthy
                await pool.check_now()
                assert not pool.upstreams[0].healthy and pool.capacity() == 0
                assert pool.choose(None) is None

    asyncio.run(scenario())


def test_without_a_health_path_an_ejected_api_returns_on_probation():
    async def scenario():
        pool = make_pool(["https://api.example/v1"], tier="external",
                         health={"eject_after_failures": 1, "readmit_after_s": 0.05})
        api = pool.upstreams[0]
        pool.record_failure(api, "503")
        assert not api.healthy
        await asyncio.sleep(0.06)
        await pool.check_now()  # no request is made: the cool-down alone re-admits
        assert api.healthy and api.probation
        pool.record_failure(api, "503 again")  # one failure on probation ejects again
        assert not api.healthy and api.num_ejections == 2

    asyncio.run(scenario())


def test_live_queue_state_is_scraped_from_metrics():
    async def scenario():
        with FakeServerThread(FakeScript(ttft=1.0)) as server:
            pool = make_pool([server.base_url])
            async with httpx.AsyncClient() as client:
                pool.bind(client)
                streams = [asyncio.create_task(client.post(f"{server.base_url}/completions", json={
                    "model": "fake-model", "prompt": "hi", "stream": True, "max_tokens": 1}, timeout=10))
                    for _ in range(3)]
                await asyncio.sleep(0.3)
                await pool.check_now()
                upstream = pool.upstreams[0]
                assert upstream.scraped_running == 3 and upstream.scraped_waiting == 0
                assert pool.upstream_busy() == 3
                # three requests of another gateway count towards this replica's load
                assert upstream.others_in_flight(time.monotonic(), 10) == 3
                await asyncio.gather(*streams)

    asyncio.run(scenario())


def test_queue_metrics_are_read_in_tokenmill_and_vllm_spelling():
    text = ("# HELP tokenmill_num_requests_waiting Requests waiting.\n"
            "# TYPE tokenmill_num_requests_waiting gauge\n"
            'tokenmill_num_requests_waiting{model_name="gemma-3-270m"} 4.0\n'
            'tokenmill_num_requests_running{model_name="gemma-3-270m"} 7.0\n'
            'tokenmill_num_requests_waiting_other{x="y"} 100\n')
    assert parse_queue_metrics(text) == {"waiting": 4.0, "running": 7.0}
    vllm = 'vllm:num_requests_running{model_name="a"} 2\nvllm:num_requests_running{model_name="b"} 3 1700000000\n'
    assert parse_queue_metrics(vllm) == {"running": 5.0}
