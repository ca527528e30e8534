"""Load shapes (closed loop, Poisson/gamma arrivals, duration bound), sweeps and the max-users search."""
import asyncio
import json

import pytest

from tokenmill.bench.config import LengthDistribution, LoadShape, MaxUsersSearch, Sweep
from tokenmill.bench.fake_server import FakeScript
from tokenmill.bench.report import dumps_document
from tokenmill.bench.sizing import Verdict, judge, search_max_users


def search(passing_up_to: int, limit: int) -> tuple[int, list[int]]:
    probed = []

    async def probe(concurrency):
        probed.append(concurrency)
        return Verdict(concurrency <= passing_up_to, ())

    return asyncio.run(search_max_users(probe, limit)), probed


@pytest.mark.parametrize("passing_up_to, limit, probes", [
    (5, 64, [1, 2, 4, 8, 6, 5]),
    (0, 64, [1]),
    (64, 64, [1, 2, 4, 8, 16, 32, 64]),
    (100, 48, [1, 2, 4, 8, 16, 32, 48]),
    (40, 48, [1, 2, 4, 8, 16, 32, 48, 40, 44, 42, 41]),
])
def test_search_is_exponential_then_binary(passing_up_to, limit, probes):
    best, probed = search(passing_up_to, limit)
    assert best == min(passing_up_to, limit)
    assert probed == probes


def test_judge_names_every_missed_target():
    summary = {"failed": 1, "ttft_ms": {"p95": 800.0}, "decode_tps_per_user": {"p95": 12.0}}
    verdict = judge(summary, MaxUsersSearch(per_user_tps=20, ttft_p95=0.5))
    assert not verdict.passed and len(verdict.reasons) == 3
    assert "TTFT p95 800 ms > 500 ms" in verdict.describe()
    ok = {"failed": 0, "ttft_ms": {"p95": 100.0}, "decode_tps_per_user": {"p95": 25.0}}
    assert judge(ok, MaxUsersSearch(per_user_tps=20, ttft_p95=0.5)) == Verdict(True, ())


def test_max_users_finds_where_a_slowing_server_drops_below_target(serve_script, run_bench):
    # Each token gap is 10 ms plus 10 ms per other open stream: C users decode at 100 / C tok/s,
    # so at 22 tok/s per user the answer is 4 (25 tok/s), and 5 (20 tok/s) fails.
    server = serve_script(FakeScript(ttft=0.02, itl=0.01, itl_growth=0.01))
    result = run_bench(server.base_url, load=LoadShape(concurrency=1, num_requests=8),
                       output_len=LengthDistribution("fixed", 8), input_len=LengthDistribution("fixed", 8),
                       max_users=MaxUsersSearch(per_user_tps=22, ttft_p95=0.5, limit=64))
    assert result.max_users == 4
    probed = [run.load.concurrency for run in result.runs]
    assert probed == sorted(probed) and {1, 2, 4, 8, 5} <= set(probed)
    for run in result.runs:
        assert run.verdict.passed == (run.load.concurrency <= 4), (run.load.concurrency, run.verdict)


def test_sweep_runs_each_point_with_the_same_workload(serve_script, run_bench):
    server = serve_script(FakeScript(output_tokens=4))
    result = run_bench(server.base_url, sweep=Sweep("concurrency", (1, 2, 4)), load=LoadShape(num_requests=12),
                       output_len=LengthDistribution("fixed", 4))
    assert [run.load.concurrency for run in result.runs] == [1, 2, 4]
    assert [run.summary["peak_in_flight"] for run in result.runs] == [1, 2, 4]
    prompts = [[r.spec.prompt for r in run.records] for run in result.runs]
    assert prompts[0] == prompts[1] == prompts[2] and len(set(prompts[0])) == 12


def test_poisson_arrivals_spread_requests_at_the_rate(serve_script, run_bench):
    server = serve_script(FakeScript(output_tokens=2))
    result = run_bench(server.base_url, load=LoadShape(concurrency=None, request_rate=40.0, num_requests=40),
                       output_len=LengthDistribution("fixed", 2), seed=3)
    starts = [r.start for r in result.runs[0].records]
    span = max(starts) - min(starts)
    assert result.runs[0].summary["completed"] == 40
    assert 0.4 < span < 2.5  # 39 gaps of mean 25 ms: about 1 s


def test_all_at_once_and_the_concurrency_cap(serve_script, run_bench):
    server = serve_script(FakeScript(ttft=0.05, itl=0.005, output_tokens=4))
    burst = run_bench(server.base_url, load=LoadShape(concurrency=None, request_rate=float("inf"), num_requests=12),
                      output_len=LengthDistribution("fixed", 4))
    assert burst.runs[0].summary["peak_in_flight"] == 12
    assert json.loads(dumps_document(burst))["runs"][0]["load"] == {"request_rate": "inf"}  # JSON has no infinity
    capped = run_bench(server.base_url, load=LoadShape(concurrency=3, request_rate=float("inf"), num_requests=12),
                       output_len=LengthDistribution("fixed", 4))
    assert capped.runs[0].summary["peak_in_flight"] == 3 and capped.runs[0].summary["completed"] == 12


def test_duration_bounds_a_closed_loop(serve_script, run_bench):
    server = serve_script(FakeScript(ttft=0.05, itl=0.01, output_tokens=6))  # 100 ms per request
    result = run_bench(server.base_url, load=LoadShape(concurrency=2, duration=0.45),
                       output_len=LengthDistribution("fixed", 6))
    summary = result.runs[0].summary
    assert 6 <= summary["num_requests"] <= 12 and summary["failed"] == 0
    assert summary["duration_s"] < 0.8


def test_no_request_waits_for_a_connection_across_pool_shards(serve_script, run_bench):
    # 20 users over pools of at most 8 connections: 3 pools of 7; each request takes the least busy one.
    server = serve_script(FakeScript(ttft=0.1, itl=0.005, output_tokens=4))
    result = run_bench(server.base_url, load=LoadShape(concurrency=20, num_requests=60),
                       output_len=LengthDistribution("fixed", 4), warmup=20)
    summary = result.runs[0].summary
    assert summary["peak_in_flight"] == 20 and summary["failed"] == 0
    assert summary["ttft_ms"]["max"] < 150  # a request queued behind a busy pool would wait ~115 ms more
