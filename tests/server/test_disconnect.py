"""A client that leaves early gets its request aborted and its KV blocks freed at once."""
import time

import httpx
import pytest
from server_harness import IDLE_DEADLINE, MODEL, metric

LONG = 200  # tokens: ten seconds or more here, far longer than the deadline to free the blocks


def aborted_count(server) -> float:
    return metric(server.metrics(), "tokenmill_request_success_total", finished_reason="abort")


def wait_until_running(server, deadline: float = 60.0) -> None:
    end = time.monotonic() + deadline
    while server.metrics()[("tokenmill_num_requests_running", ())] < 1:
        assert time.monotonic() < end, "the request never started running"
        time.sleep(0.02)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": LONG, "ignore_eos": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": LONG,
                              "ignore_eos": True}),
])
def test_closing_a_stream_early_frees_its_blocks(server, path, body):
    server.wait_idle()
    aborted = aborted_count(server)
    request = {**body, "model": MODEL, "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{server.base_url}{path}", json=request) as response:
        assert response.status_code == 200
        events, busy = 0, None
        for line in response.iter_lines():
            events += line.startswith("data: ")
            if events == 3:
                busy = server.metrics()  # still reading: leaving the loop closes the connection
                break
        assert busy[("tokenmill_num_requests_running", ())] == 1
        assert busy[("tokenmill_kv_cache_usage_perc", ())] > 0
    # The client is gone, long before the 200 tokens could be generated.
    server.wait_idle(IDLE_DEADLINE)
    assert aborted_count(server) == aborted + 1


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": LONG, "ignore_eos": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": LONG,
                              "ignore_eos": True}),
])
def test_client_giving_up_on_a_non_streaming_request_frees_its_blocks(server, path, body):
    server.wait_idle()
    aborted = aborted_count(server)
    with pytest.raises(httpx.ReadTimeout):
        # The client waits only a moment for an answer that takes many seconds.
        httpx.post(f"{server.base_url}{path}", json={**body, "model": MODEL},
                   timeout=httpx.Timeout(10.0, read=1.5))
    server.wait_idle(IDLE_DEADLINE)
    assert aborted_count(server) == aborted + 1


def test_server_serves_normally_after_disconnects(client):
    response = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, extra_body={"ignore_eos": True})
    assert response.usage.completion_tokens == 3 and response.choices[0].finish_reason == "length"
