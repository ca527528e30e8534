"""Per-key limits: the same rule in-process and through Redis, shared by limiters and processes."""
import asyncio
import json
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tokenmill.gateway.keys import ApiKey, KeyLimits
from tokenmill.gateway.ledger import Ledger, UsageRecord
from tokenmill.gateway.limits import (InProcessLimiter, LimiterUnavailableError, RedisLimiter, Rejection,
                                      Reservation, build_limiter, format_duration, seconds_to_next_month)
from tokenmill.gateway.store import open_database

ROOT = Path(__file__).resolve().parents[2]


def api_key(key_id: str = "key1", **limits) -> ApiKey:
    return ApiKey(key_id=key_id, name="test", prefix=f"tm-{key_id}-abcd", allowed_models=(),
                  limits=KeyLimits(**limits), allow_overflow=True, created_at=datetime.now(timezone.utc))


@pytest.fixture(params=["in-process", "redis"])
def make_limiter(request):
    """make_limiter(**options) -> a limiter of the parametrized kind; Redis ones share this test's key prefix."""
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix")
        return lambda **options: build_limiter(url, key_prefix=prefix, **options)
    return lambda **options: build_limiter(None, **options)


def run(coroutine):
    return asyncio.run(coroutine)


def test_requests_per_window(make_limiter):
    async def main():
        limiter = make_limiter(window_s=1.0)
        key = api_key(requests_per_minute=3)
        admitted = [await limiter.acquire(key, f"r{i}", 0) for i in range(3)]
        assert all(isinstance(result, Reservation) for result in admitted)
        assert limiter.headers(admitted[0])["x-ratelimit-remaining-requests"] == "2"
        assert limiter.headers(admitted[2])["x-ratelimit-remaining-requests"] == "0"
        rejected = await limiter.acquire(key, "r3", 0)
        assert isinstance(rejected, Rejection) and rejected.reason == "requests_per_minute"
        assert "3 requests per 1 s" in rejected.message
        assert 0 < rejected.retry_after_s <= 1.0
        assert rejected.headers["retry-after"] == "1"
        assert rejected.headers["x-ratelimit-limit-requests"] == "3"
        assert rejected.headers["x-ratelimit-remaining-requests"] == "0"
        for reservation in admitted:  # settling does not give back a request: it happened
            await limiter.settle(reservation, 0)
        assert isinstance(await limiter.acquire(key, "r4", 0), Rejection)
        await asyncio.sleep(rejected.retry_after_s + 0.05)
        assert isinstance(await limiter.acquire(key, "r5", 0), Reservation)
        await limiter.close()

    run(main())


def test_tokens_are_reserved_at_admission_and_refunded_at_settle(make_limiter):
    async def main():
        limiter = make_limiter(window_s=30)
        key = api_key(tokens_per_minute=100)
        first = await limiter.acquire(key, "a", 60)
        assert isinstance(first, Reservation)
        headers = limiter.headers(first)
        assert headers["x-ratelimit-limit-tokens"] == "100" and headers["x-ratelimit-remaining-tokens"] == "40"
        too_many = await limiter.acquire(key, "b", 50)
        assert isinstance(too_many, Rejection) and too_many.reason == "tokens_per_minute"
        assert "60 of 100 tokens per 30 s are in use" in too_many.message
        exactly = await limiter.acquire(key, "c", 40)  # 60 + 40 = the limit: admitted
        assert isinstance(exactly, Reservation)
        assert limiter.headers(exactly)["x-ratelimit-remaining-tokens"] == "0"
        await limiter.settle(first, 10)  # used 10 of its 60: 50 come back
        after_refund = await limiter.acquire(key, "d", 50)
        assert isinstance(after_refund, Reservation)
        assert limiter.headers(after_refund)["x-ratelimit-remaining-tokens"] == "0"
        assert isinstance(await limiter.acquire(key, "e", 1), Rejection)
        await limiter.settle(exactly, 0)  # a failed request gives back all it reserved
        assert isinstance(await limiter.acquire(key, "f", 40), Reservation)
        await limiter.close()

    run(main())


def test_a_reservation_larger_than_the_limit_is_refused_with_advice(make_limiter):
    async def main():
        limiter = make_limiter()
        rejected = await limiter.acquire(api_key(tokens_per_minute=100), "big", 101)
        assert isinstance(rejected, Rejection) and rejected.reason == "tokens_per_minute"
        assert "reserves 101 tokens" in rejected.message and "lower max_tokens" in rejected.message
        await limiter.close()

    run(main())


def test_tokens_leave_the_window_after_window_s(make_limiter):
    async def main():
        limiter = make_limiter(window_s=1.0)
        key = api_key(tokens_per_minute=100)
        reservation = await limiter.acquire(key, "a", 100)
        await limiter.settle(reservation, 100)
        rejected = await limiter.acquire(key, "b", 30)
        assert isinstance(rejected, Rejection) and 0 < rejected.retry_after_s <= 1.0
        await asyncio.sleep(rejected.retry_after_s + 0.05)
        assert isinstance(await limiter.acquire(key, "c", 100), Reservation)
        await limiter.close()

    run(main())


def test_concurrency_slots_are_freed_by_settle(make_limiter):
    async def main():
        limiter = make_limiter()
        key = api_key(max_concurrent=2)
        first = await limiter.acquire(key, "a", 10)
        second = await limiter.acquire(key, "b", 10)
        rejected = await limiter.acquire(key, "c", 10)
        assert isinstance(rejected, Rejection) and rejected.reason == "max_concurrent"
        assert "2 at once" in rejected.message and rejected.headers["retry-after"] == "1"
        await limiter.settle(first, 3)
        third = await limiter.acquire(key, "d", 10)
        assert isinstance(third, Reservation)
        assert isinstance(await limiter.acquire(key, "e", 10), Rejection)
        await limiter.settle(second, 0)
        await limiter.settle(third, 0)
        assert limiter.outstanding == 0
        await limiter.close()

    run(main())


def test_a_crashed_gateways_slots_come_back_after_the_lease(make_limiter):
    async def main():
        crashed = make_limiter(concurrency_lease_s=1.0)
        key = api_key(max_concurrent=1)
        assert isinstance(await crashed.acquire(key, "a", 1), Reservation)  # never settled
        survivor = make_limiter(concurrency_lease_s=1.0)
        limiter = survivor if isinstance(survivor, RedisLimiter) else crashed  # in-process: one process
        assert isinstance(await limiter.acquire(key, "b", 1), Rejection)
        await asyncio.sleep(1.1)
        assert isinstance(await limiter.acquire(key, "c", 1), Reservation)
        await crashed.close()
        await survivor.close()

    run(main())


def test_budget_is_checked_against_month_to_date_spend(make_limiter):
    async def main():
        limiter = make_limiter(spend_source=lambda key_id: 4.0)  # the ledger says 4 USD so far
        key = api_key(monthly_budget_usd=5.0)
        first = await limiter.acquire(key, "a", 10)
        assert isinstance(first, Reservation)
        second = await limiter.acquire(key, "b", 10)
        await limiter.settle(first, 10, cost_usd=0.75)
        assert await limiter.month_to_date_spend(key.key_id) == pytest.approx(4.75)
        assert isinstance(await limiter.acquire(key, "c", 10), Reservation)  # 4.75 < 5
        await limiter.settle(second, 10, cost_usd=0.5)
        rejected = await limiter.acquire(key, "d", 10)
        assert isinstance(rejected, Rejection) and rejected.reason == "monthly_budget"
        assert "$5.00" in rejected.message and "$5.25" in rejected.message
        assert rejected.retry_after_s == pytest.approx(seconds_to_next_month(time.time()), abs=5)
        await limiter.close()

    run(main())


def test_a_restart_does_not_reset_the_budget(make_limiter, sqlite_url):
    database = open_database(sqlite_url)
    ledger = Ledger(database)
    key = api_key("spender", monthly_budget_usd=1.0)

    async def first_life():
        limiter = make_limiter(spend_source=ledger.month_to_date_spend)
        for index in range(3):
            reservation = await limiter.acquire(key, f"r{index}", 10)
            assert isinstance(reservation, Reservation)
            await limiter.settle(reservation, 10, cost_usd=0.4)
            ledger.record(UsageRecord(f"r{index}", key.key_id, "m", "direct", "u", "self", 200, 5, 5, 0.1, 0.2, 0.4))
        assert isinstance(await limiter.acquire(key, "r3", 10), Rejection)
        await limiter.close()

    run(first_life())
    ledger.close()  # the gateway's shutdown flush

    async def second_life():  # a new process; for Redis, a Redis that lost its data
        limiter = build_limiter(None, spend_source=Ledger(database).month_to_date_spend)
        rejected = await limiter.acquire(key, "r4", 10)
        assert isinstance(rejected, Rejection) and rejected.reason == "monthly_budget"
        assert await limiter.month_to_date_spend(key.key_id) == pytest.approx(1.2)

    run(second_life())


def test_an_unreadable_ledger_makes_the_limiter_unavailable(make_limiter):
    def broken_ledger(key_id):
        raise OSError("disk I/O error")

    async def main():
        limiter = make_limiter(spend_source=broken_ledger)
        with pytest.raises(LimiterUnavailableError, match="month-to-date spend of key key1.*disk I/O error"):
            await limiter.acquire(api_key(monthly_budget_usd=1.0), "r", 1)
        await limiter.close()

    run(main())


def test_a_second_settle_is_ignored(make_limiter, caplog):
    async def main():
        limiter = make_limiter(spend_source=lambda key_id: 0.0)
        key = api_key(tokens_per_minute=100, max_concurrent=1)
        reservation = await limiter.acquire(key, "a", 100)
        await limiter.settle(reservation, 100, cost_usd=1.0)
        await limiter.settle(reservation, 0, cost_usd=1.0)
        assert "settled twice" in caplog.text
        assert await limiter.month_to_date_spend(key.key_id) == pytest.approx(1.0)
        assert isinstance(await limiter.acquire(key, "b", 1), Rejection)  # the first settle's 100 tokens stand
        await limiter.close()

    run(main())


def test_a_key_without_limits_is_admitted_without_headers(make_limiter):
    async def main():
        limiter = make_limiter()
        key = api_key()
        reservations = [await limiter.acquire(key, f"r{i}", 10_000) for i in range(50)]
        assert all(isinstance(result, Reservation) for result in reservations)
        assert limiter.headers(reservations[0]) == {}
        for reservation in reservations:
            await limiter.settle(reservation, 10)
        await limiter.close()

    run(main())


def test_two_redis_limiters_share_one_keys_limits(redis_url, redis_prefix):
    async def main():
        gateways = [build_limiter(redis_url, key_prefix=redis_prefix) for _ in range(2)]
        key = api_key(tokens_per_minute=1000, requests_per_minute=15, max_concurrent=8)
        results = await asyncio.gather(*(gateways[i % 2].acquire(key, f"r{i}", 100) for i in range(40)))
        admitted = [result for result in results if isinstance(result, Reservation)]
        reasons = {result.reason for result in results if isinstance(result, Rejection)}
        assert len(admitted) == 8 and reasons == {"max_concurrent"}
        for reservation in admitted:  # each settled by the limiter that acquired it
            await gateways[int(reservation.request_id[1:]) % 2].settle(reservation, 50)
        assert sum(gateway.outstanding for gateway in gateways) == 0
        results = await asyncio.gather(*(gateways[i % 2].acquire(key, f"s{i}", 100) for i in range(40)))
        admitted_again = [result for result in results if isinstance(result, Reservation)]
        # 8 x 50 tokens settled: 600 left -> 6 more; requests: 15 - 8 = 7 left
        assert len(admitted_again) == 6
        for gateway in gateways:
            await gateway.close()

    run(main())


_WORKER = textwrap.dedent("""
    import asyncio, json, random, sys, time
    from datetime import datetime, timezone
    from tokenmill.gateway.keys import ApiKey, KeyLimits
    from tokenmill.gateway.limits import Reservation, build_limiter

    url, prefix = sys.argv[1], sys.argv[2]
    worker, duration, start_at = int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
    key = ApiKey("shared", "t", "tm-shared-", (), KeyLimits(tokens_per_minute=1000, requests_per_minute=40), True,
                 datetime.now(timezone.utc))

    async def main():
        limiter = build_limiter(url, window_s=0.5, key_prefix=prefix)
        rng = random.Random(worker)
        admitted, rejected = [], 0
        while time.time() < start_at:
            await asyncio.sleep(0.005)
        async def one(index):
            nonlocal rejected
            tokens = rng.randint(20, 200)
            result = await limiter.acquire(key, f"w{worker}-{index}", tokens)
            if isinstance(result, Reservation):
                admitted.append([result.acquired_at, tokens])
                await asyncio.sleep(rng.uniform(0, 0.05))
                await limiter.settle(result, tokens)
            else:
                rejected += 1
                await asyncio.sleep(0.005)
        index = 0
        tasks = set()
        deadline = time.time() + duration
        while time.time() < deadline:
            while len(tasks) < 4:
                tasks.add(asyncio.ensure_future(one(index)))
                index += 1
            done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.gather(*tasks)
        await limiter.close()
        print(json.dumps({"admitted": admitted, "rejected": rejected}))

    asyncio.run(main())
""")


def test_two_gateway_processes_never_admit_more_tokens_than_the_limit(redis_url, redis_prefix):
    start_at = time.time() + 1.5  # both processes start their load together, after importing
    workers = [subprocess.Popen([sys.executable, "-c", _WORKER, redis_url, redis_prefix, str(worker), "2.0",
                                 str(start_at)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
               for worker in range(2)]
    outputs = []
    for worker in workers:
        stdout, stderr = worker.communicate(timeout=60)
        assert worker.returncode == 0, stderr
        outputs.append(json.loads(stdout))
    admissions = sorted(entry for output in outputs for entry in output["admitted"])
    assert all(output["admitted"] for output in outputs)       # both processes got some ...
    assert sum(output["rejected"] for output in outputs) > 0   # ... and the limit was really pressed
    window = 0.5
    for index, (at, _) in enumerate(admissions):
        in_window = [tokens for other_at, tokens in admissions[:index + 1] if other_at > at - window]
        assert sum(in_window) <= 1000, f"{sum(in_window)} tokens admitted within {window} s"
        assert len(in_window) <= 40


def test_an_unreachable_redis_is_reported(redis_prefix):
    async def main():
        limiter = build_limiter("redis://127.0.0.1:1/0", key_prefix=redis_prefix)
        with pytest.raises(LimiterUnavailableError, match="127.0.0.1:1/0 is unreachable"):
            await limiter.acquire(api_key(requests_per_minute=1), "r", 1)
        await limiter.close()

    run(main())


def test_redis_state_expires_when_a_key_goes_idle(redis_url, redis_prefix):
    import redis

    async def main():
        limiter = build_limiter(redis_url, window_s=0.5, key_prefix=redis_prefix)
        reservation = await limiter.acquire(api_key(requests_per_minute=5, tokens_per_minute=100), "r", 10)
        await limiter.settle(reservation, 5)
        await limiter.close()

    run(main())
    client = redis.Redis.from_url(redis_url)
    keys = [key.decode() for key in client.scan_iter(match=redis_prefix + "*")]
    window_keys = [key for key in keys if ":spend:" not in key]
    assert window_keys
    assert all(0 < client.pttl(key) <= 1500 for key in window_keys)
    client.close()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="not a Redis URL"):
        build_limiter("http://127.0.0.1:6379")
    with pytest.raises(ValueError, match="window_s must be a positive"):
        build_limiter(None, window_s=0)
    assert isinstance(build_limiter(None), InProcessLimiter)

    async def main():
        limiter = build_limiter(None)
        with pytest.raises(ValueError, match="reserve_tokens"):
            await limiter.acquire(api_key(), "r", -1)
        reservation = await limiter.acquire(api_key(), "r", 1)
        with pytest.raises(ValueError, match="actual_tokens"):
            await limiter.settle(reservation, -3)

    run(main())


def test_reset_durations_use_openai_style():
    assert format_duration(0.25) == "250ms"
    assert format_duration(12.5) == "12.5s"
    assert format_duration(59.9999) == "1m0s"
    assert format_duration(360) == "6m0s"
