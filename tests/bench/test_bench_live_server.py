"""Against a live `tokenmill serve`: the bench's token counts equal the server's own counters."""
import json
import os
import subprocess
import sys

import httpx
import pytest

from tokenmill.bench.process import stop_process, unused_port, wait_until_healthy

COUNTERS = ("tokenmill_prompt_tokens_total", "tokenmill_generation_tokens_total")


def counters(base: str) -> dict[str, float]:
    totals = dict.fromkeys(COUNTERS, 0.0)
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    port = unused_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    # One intra-op thread: on a shared two-core machine, spinning OpenMP workers slow decoding several-fold,
    # and this test is about counting, not speed.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "serve", "--port", str(port),
                                    "--max-model-len", "512"], stdout=log_file, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_healthy(process, base, deadline_s=180, log=log)
        except RuntimeError as error:
            pytest.fail(f"tokenmill serve did not start: {error}")
        yield base
    finally:
        stop_process(process)


@pytest.mark.slow
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_token_counts_equal_the_servers_counters(live_server, tmp_path, endpoint):
    before = counters(live_server)
    out = tmp_path / "results.json"
    result = subprocess.run([sys.executable, "-m", "tokenmill.cli", "bench", "--base-url", live_server,
                             "--endpoint", endpoint, "--num-requests", "8", "--concurrency", "4",
                             "--input-len", "24", "--output-len", "16", "--ignore-eos", "--warmup", "2",
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    after = counters(live_server)
    document = json.loads(out.read_text())
    summary = document["runs"][0]["summary"]
    unmeasured = document["unmeasured"]
    assert summary["completed"] == 8 and summary["total_output_tokens"] == 8 * 16
    assert summary["token_counts"]["output"] == {"usage": 8}
    assert summary["token_counts"]["chunks"] == {"logprobs": 8}
    assert after["tokenmill_prompt_tokens_total"] - before["tokenmill_prompt_tokens_total"] == \
        summary["total_prompt_tokens"] + unmeasured["prompt_tokens"]
    assert after["tokenmill_generation_tokens_total"] - before["tokenmill_generation_tokens_total"] == \
        summary["total_output_tokens"] + unmeasured["output_tokens"]
    for request in document["runs"][0]["requests"]:
        assert sum(request["chunk_tokens"]) == request["output_tokens"] == 16
        assert len(request["itl_ms"]) == 15
