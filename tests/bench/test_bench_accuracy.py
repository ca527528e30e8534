"""The bench against a fake server with known timings: every metric within 5% of its known value.

Script: first token 200 ms after the request, then one token every 20 ms; chunks
carry 1, 2, 1, 2, ... tokens, so 16 tokens arrive in 11 chunks and every
two-token chunk comes 40 ms after the previous one. Known values: TTFT 200 ms,
ITL 20 ms for every token, TPOT (500 - 200) / 15 = 20 ms, E2E 500 ms.
"""
import pytest

from tokenmill.bench.config import SLO, LengthDistribution, LoadShape
from tokenmill.bench.fake_server import FakeScript

TTFT, ITL, TOKENS = 0.200, 0.020, 16
E2E = TTFT + (TOKENS - 1) * ITL
SCRIPT = FakeScript(ttft=TTFT, itl=ITL, output_tokens=TOKENS, chunk_pattern=(1, 2))
WITHIN = 0.05


def close(measured: float, known: float) -> bool:
    return abs(measured - known) <= WITHIN * known


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_latencies_match_the_script(serve_script, run_bench, quick_gil_handoff, endpoint):
    server = serve_script(SCRIPT)
    result = run_bench(server.base_url, endpoint=endpoint, load=LoadShape(concurrency=4, num_requests=12),
                       warmup=4, output_len=LengthDistribution("fixed", TOKENS),
                       slo=SLO(ttft=0.3, itl=0.03, e2e=0.6))
    summary = result.runs[0].summary
    assert summary["completed"] == 12 and summary["failed"] == 0
    assert result.server.logprobs and summary["token_counts"]["chunks"] == {"logprobs": 12}
    for key, known in (("ttft_ms", TTFT), ("itl_ms", ITL), ("tpot_ms", ITL), ("e2e_ms", E2E)):
        assert close(summary[key]["mean"] / 1e3, known), (key, summary[key])
        assert close(summary[key]["p50"] / 1e3, known), (key, summary[key])
    # Per token: the 40 ms gap before a two-token chunk is two 20 ms samples. Counted per chunk,
    # half the gaps would be 40 ms (mean 30 ms, p90 40 ms); per token, p90 stays near 20 ms.
    assert summary["itl_ms"]["p90"] / 1e3 < 1.5 * ITL, summary["itl_ms"]
    assert summary["itl_ms"]["count"] == 12 * (TOKENS - 1)
    two_token_gaps = []
    for record in result.runs[0].records:
        assert record.chunk_tokens == [1, 2] * 5 + [1] and record.output_tokens == TOKENS
        gaps = [later - earlier for earlier, later in zip(record.chunk_times, record.chunk_times[1:])]
        two_token_gaps += gaps[0::2]  # chunks 2, 4, ... carry two tokens
        assert record.itl[:2] == [gaps[0] / 2] * 2 and record.itl[2] == gaps[1]
    assert close(sum(two_token_gaps) / len(two_token_gaps), 2 * ITL)
    assert close(summary["decode_tps_per_user"]["p50"], 1 / ITL)
    # Three waves of four 500 ms requests, all within the SLO: 12 / 1.5 s.
    assert summary["slo_met"] == 12
    assert close(summary["goodput"], 12 / (3 * E2E)), summary["goodput"]
    assert summary["total_output_tokens"] == 12 * TOKENS


def test_goodput_counts_only_requests_within_every_slo(serve_script, run_bench, quick_gil_handoff):
    server = serve_script(SCRIPT)
    result = run_bench(server.base_url, load=LoadShape(concurrency=4, num_requests=8),
                       output_len=LengthDistribution("fixed", TOKENS), slo=SLO(ttft=0.3, e2e=0.45))
    summary = result.runs[0].summary
    assert summary["failed"] == 0
    assert summary["slo_met"] == 0 and summary["goodput"] == 0.0  # every E2E is 500 ms > 450 ms
    assert summary["request_throughput"] > 0


@pytest.mark.parametrize("cleanly", [False, True], ids=["connection-dropped", "body-ended-early"])
def test_a_stream_cut_midway_is_a_failure(serve_script, run_bench, quick_gil_handoff, cleanly):
    script = FakeScript(ttft=0.05, itl=0.01, output_tokens=TOKENS, chunk_pattern=(1, 2), cut_every=4,
                        cut_cleanly=cleanly)
    server = serve_script(script)
    result = run_bench(server.base_url, load=LoadShape(concurrency=4, num_requests=12),
                       output_len=LengthDistribution("fixed", TOKENS), slo=SLO(ttft=0.3))
    run = result.runs[0]
    measured_arrivals = range(server.server.num_requests - 12 + 1, server.server.num_requests + 1)
    cut = sum(1 for number in measured_arrivals if number % 4 == 0)
    assert cut == 3
    assert run.summary["failures"] == {"truncated": cut}
    assert run.summary["completed"] == 12 - cut
    assert run.summary["slo_met"] == 12 - cut
    truncated = [r for r in run.records if r.failure == "truncated"]
    assert all(0 < len(r.chunk_times) < 11 and r.finish_reason is None for r in truncated)
    assert run.summary["output_tokens"]["count"] == 12 - cut  # cut streams add no latency samples


def test_rejected_requests_are_failures_by_status(serve_script, run_bench):
    server = serve_script(FakeScript(output_tokens=4, reject_every=3))
    result = run_bench(server.base_url, load=LoadShape(concurrency=2, num_requests=9),
                       output_len=LengthDistribution("fixed", 4))
    summary = result.runs[0].summary
    assert summary["failures"] == {"http_503": 3} and summary["completed"] == 6
    assert all(r.failure_detail == "overloaded" for r in result.runs[0].records if not r.ok)
