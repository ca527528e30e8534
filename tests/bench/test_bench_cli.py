"""`tokenmill bench` as a command: one-line errors, tables, and the files it writes."""
import csv
import json
import subprocess
import sys

import pytest

from tokenmill.bench.fake_server import FakeScript
from tokenmill.bench.process import unused_port


def bench(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "tokenmill.cli", "bench", *args], capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    message = result.stderr.strip()
    assert "\n" not in message and "Traceback" not in message, message
    assert message.startswith("tokenmill bench: error: ")
    for fragment in fragments:
        assert fragment in message


def test_unreachable_url():
    result = bench("--base-url", f"http://127.0.0.1:{unused_port()}", "--num-requests", "1")
    assert_one_line_error(result, "cannot reach", "could not connect")


def test_unknown_model(serve_script):
    server = serve_script(FakeScript(model="served"))
    result = bench("--base-url", server.base_url, "--model", "missing", "--num-requests", "1")
    assert_one_line_error(result, "unknown model 'missing'", "served")


@pytest.mark.parametrize("args, fragment", [
    (["--slo", "ttft:500ms"], "invalid SLO"),
    (["--slo", "ttft=soon"], "invalid SLO"),
    (["--base-url", "localhost:8000"], "invalid --base-url"),
    (["--input-len", "0"], "length distribution"),
    (["--dataset", "no/such/prompts.jsonl"], "cannot read the dataset"),
])
def test_invalid_arguments(args, fragment):
    assert_one_line_error(bench(*args), fragment)


def test_wrong_api_key(serve_script):
    server = serve_script(FakeScript(api_key="right"))
    assert_one_line_error(bench("--base-url", server.base_url, "--api-key", "wrong"), "check --api-key")


def test_sweep_writes_json_csv_and_plots(serve_script, tmp_path):
    server = serve_script(FakeScript(ttft=0.01, itl=0.002, chunk_pattern=(1, 2)))
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text('{"prompt": "alpha beta gamma"}\n{"prompt": "delta epsilon", "max_tokens": 3}\n')
    out, table, plots = tmp_path / "results.json", tmp_path / "results.csv", tmp_path / "plots"
    result = bench("--base-url", server.base_url, "--sweep", "concurrency=1,2", "--num-requests", "6",
                   "--dataset", str(dataset), "--output-len", "8", "--slo", "ttft=1s,itl=100ms", "--warmup", "2",
                   "--out", str(out), "--csv", str(table), "--plot", str(plots))
    assert result.returncode == 0, result.stderr
    assert "concurrency 1" in result.stdout and "concurrency 2" in result.stdout and "TTFT p50" in result.stdout

    document = json.loads(out.read_text())
    assert document["unmeasured"]["requests"] == 3  # the probe and two warm-up requests
    assert [run["load"] for run in document["runs"]] == [{"concurrency": 1}, {"concurrency": 2}]
    summary = document["runs"][0]["summary"]
    for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms", "decode_tps_per_user"):
        assert set(summary[key]) >= {"mean", "std", "p50", "p90", "p95", "p99"}
    for key in ("request_throughput", "output_throughput", "goodput", "failures", "token_counts"):
        assert key in summary
    requests = document["runs"][0]["requests"]
    assert len(requests) == 6 and {r["max_tokens"] for r in requests} == {3, 8}
    assert all(r["ok"] and r["chunk_tokens_source"] == "logprobs" and len(r["itl_ms"]) == r["output_tokens"] - 1
               for r in requests)

    rows = list(csv.DictReader(table.open()))
    assert [row["concurrency"] for row in rows] == ["1", "2"] and float(rows[0]["ttft_ms_p95"]) > 0
    names = sorted(path.name for path in plots.iterdir())
    assert names == ["itl_over_time.png", "latency_percentiles.png", "throughput.png", "ttft_cdf.png"]
    assert all((plots / name).read_bytes()[:4] == b"\x89PNG" for name in names)


def test_json_output_is_the_summary(serve_script):
    server = serve_script(FakeScript(output_tokens=4))
    result = bench("--base-url", server.base_url, "--endpoint", "chat", "--num-requests", "5", "--json",
                   "--no-logprobs", "--output-len", "4")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    run = document["runs"][0]
    assert "requests" not in run and run["summary"]["completed"] == 5
    assert document["config"]["logprobs_requested"] is False
    assert run["summary"]["token_counts"]["chunks"] == {"one_per_chunk": 5}
