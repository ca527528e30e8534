"""The flag syntaxes: durations, SLOs, sweeps, length distributions, base URLs."""
import argparse
import random

import pytest

from tokenmill.bench.config import (
    SLO,
    BenchError,
    LengthDistribution,
    LoadShape,
    parse_duration,
    parse_length,
    parse_slo,
    parse_sweep,
)
from tokenmill.bench.options import add_bench_arguments, config_from_args, normalize_base_url


@pytest.mark.parametrize("text, seconds", [("500ms", 0.5), ("10s", 10.0), ("2m", 120.0), ("1h", 3600.0),
                                           ("0.25", 0.25), (" 1.5S ", 1.5), ("1e-3s", 0.001)])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "fast", "10 parsecs", "-1s", "0ms", "ms"])
def test_bad_durations(text):
    with pytest.raises(BenchError):
        parse_duration(text)


def test_slo():
    assert parse_slo("ttft=500ms,itl=50ms,e2e=10s") == SLO(ttft=0.5, itl=0.05, e2e=10.0)
    assert parse_slo("tpot=40ms") == SLO(tpot=0.04)
    assert parse_slo("ttft=500ms").describe() == "ttft <= 500 ms"


@pytest.mark.parametrize("text", ["ttft", "ttft=", "ttft=fast", "latency=5ms", "ttft=1s,ttft=2s", "ttft=1s;itl=2s"])
def test_bad_slo_is_one_clear_error(text):
    with pytest.raises(BenchError, match="invalid SLO"):
        parse_slo(text)


def test_sweeps():
    assert parse_sweep("concurrency=1,2,4").values == (1, 2, 4)
    sweep = parse_sweep("request-rate=0.5,2")
    assert sweep.parameter == "request_rate" and sweep.values == (0.5, 2.0)
    for bad in ("concurrency", "users=1,2", "concurrency=1,x", "concurrency=1.5", "concurrency=0"):
        with pytest.raises(BenchError):
            parse_sweep(bad)


def test_length_distributions():
    rng = random.Random(0)
    assert parse_length("128") == LengthDistribution("fixed", 128)
    uniform = parse_length("64-256")
    assert all(64 <= uniform.sample(rng) <= 256 for _ in range(200))
    normal = parse_length("normal:128,32")
    samples = [normal.sample(rng) for _ in range(2000)]
    assert min(samples) >= 1 and abs(sum(samples) / len(samples) - 128) < 5
    for bad in ("0", "x", "256-64", "normal:5", "normal:-1,2"):
        with pytest.raises(BenchError):
            parse_length(bad)


def test_default_request_counts():
    assert LoadShape(concurrency=2).request_limit == 16
    assert LoadShape(concurrency=32).request_limit == 128
    assert LoadShape(concurrency=None, request_rate=5.0).request_limit == 100
    assert LoadShape(concurrency=4, duration=10.0).request_limit is None
    assert LoadShape(concurrency=4, num_requests=7, duration=10.0).request_limit == 7
    assert LoadShape(concurrency=8, requests_per_user=2).request_limit == 16


def test_base_url_gets_v1_only_without_a_path():
    assert normalize_base_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert normalize_base_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000/v1"
    assert normalize_base_url("https://host/openai/v1") == "https://host/openai/v1"
    with pytest.raises(BenchError):
        normalize_base_url("127.0.0.1:8000")


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)), progress_allowed=False)


def test_flags_become_a_config():
    config = parse("--base-url", "http://127.0.0.1:1", "--request-rate", "inf", "--slo", "ttft=1s",
                   "--extra-body", '{"top_k": 1}', "--timeout", "30")
    assert config.load.request_rate == float("inf") and config.load.concurrency is None
    assert config.max_connections is None and config.slo == SLO(ttft=1.0)
    assert config.extra_body == {"top_k": 1} and config.timeout == 30.0
    assert parse("--sweep", "concurrency=1,8,4").max_connections == 8
    assert parse("--max-users", "--max-users-limit", "64").max_connections == 64
    assert parse().load == LoadShape(concurrency=1)
    assert parse("--num-requests", "3x", "--concurrency", "4").load.request_limit == 12


@pytest.mark.parametrize("argv, message", [
    (["--max-users", "--sweep", "concurrency=1,2"], "drop --sweep"),
    (["--max-users", "--request-rate", "5"], "drop --request-rate"),
    (["--request-rate", "-1"], "--request-rate"),
    (["--concurrency", "0"], "--concurrency"),
    (["--num-requests", "0"], "--num-requests"),
    (["--num-requests", "lots"], "--num-requests"),
    (["--num-requests", "2x", "--request-rate", "4"], "with --request-rate"),
    (["--extra-body", "[1]"], "JSON object"),
    (["--extra-body", "{"], "not valid JSON"),
    (["--burstiness", "0"], "--burstiness"),
    (["--prefix-len", "-1"], "--prefix-len"),
    (["--prefix-len", "5", "--dataset", "x.jsonl"], "synthetic prompts"),
])
def test_inconsistent_flags_are_errors(argv, message):
    with pytest.raises(BenchError, match=message):
        parse(*argv)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_prefix_len_shares_one_prefix_across_prompts(endpoint):
    from tokenmill.bench.workload import Workload

    workload = Workload(parse("--prefix-len", "50", "--input-len", "10", "--endpoint", endpoint))
    first, second = workload.request(0), workload.request(1)
    if endpoint == "chat":
        assert first.messages[0]["role"] == "system" and first.messages[0] == second.messages[0]
        assert len(first.messages[0]["content"].split()) == 50 and first.messages[1] != second.messages[1]
    else:
        assert first.prompt.split()[:50] == second.prompt.split()[:50]
        assert len(first.prompt.split()) == 60 and first.prompt != second.prompt
    assert "shared prefix of about 50 tokens" in workload.describe()
