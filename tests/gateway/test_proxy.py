"""The gateway's proxying against scripted upstreams: what a client receives and what is recorded."""
import asyncio
import threading
import time

import httpx
import pytest
from gateway_harness import (GatewayThread, config_dict, create_key, fast_pool, ledger_rows, sse_data,
                             stream_text)
from prometheus_client.parser import text_string_to_metric_families

from tokenmill.bench.fake_server import WORDS, FakeScript, FakeServerThread

CHAT = {"model": "small", "messages": [{"role": "user", "content": "say something"}], "max_tokens": 6}


@pytest.fixture
def fake():
    """`fake(FakeScript(...))` starts a fake upstream in a thread; all stop at teardown."""
    servers = []

    def start(script=FakeScript()):
        server = FakeServerThread(script).__enter__()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.__exit__(None, None, None)


def one_pool(sqlite_url, urls, **pool_fields) -> dict:
    return config_dict(sqlite_url, {"small": fast_pool(urls, **pool_fields)}, {"small": {"pool": "small"}})


def metric_values(text: str) -> dict:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def expected_words(n: int) -> str:
    return "".join(" " + WORDS[j % len(WORDS)] for j in range(n))


def test_a_stream_passes_through_with_usage_only_when_asked_and_is_recorded(fake, sqlite_url):
    upstream = fake(FakeScript(chunk_pattern=(1, 2)))
    _, secret = create_key(sqlite_url)
    with GatewayThread(one_pool(sqlite_url, [upstream.base_url], cost={"gpu_hourly_usd": 3.6})) as gateway, \
            gateway.client(secret) as client:
        plain = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert plain.status_code == 200, plain.text
        assert plain.headers["content-type"].startswith("text/event-stream")
        events = sse_data(plain.text)
        assert events[-1] == "[DONE]"
        assert stream_text(events) == expected_words(6)
        assert not any(isinstance(e, dict) and "usage" in e for e in events)  # the client did not ask
        with_usage = client.post("/v1/chat/completions", json={
            **CHAT, "stream": True, "stream_options": {"include_usage": True}})
        usage_events = [e for e in sse_data(with_usage.text) if isinstance(e, dict) and e.get("usage")]
        assert usage_events[0]["usage"]["completion_tokens"] == 6
        assert plain.headers["x-request-id"] != with_usage.headers["x-request-id"]
        assert plain.headers["x-tokenmill-route"] == "small" and plain.headers["x-tokenmill-tier"] == "self_hosted"
        gateway.flush_ledger()
    rows = {row.request_id: row for row in ledger_rows(sqlite_url)}
    row = rows[plain.headers["x-request-id"]]
    assert (row.status_code, row.prompt_tokens, row.completion_tokens, row.route) == (200, 2, 6, "small")
    assert row.ttft_s is not None and row.latency_s >= row.ttft_s and row.error is None
    assert row.tier == "self_hosted" and row.upstream.startswith("small/")
    assert row.cost_usd > 0  # GPU-seconds x $/h, the replica's busy time split among its requests


def test_non_streamed_answers_are_forwarded_and_max_tokens_is_capped(fake, sqlite_url):
    upstream = fake()
    _, secret = create_key(sqlite_url)
    with GatewayThread(one_pool(sqlite_url, [upstream.base_url], max_tokens=5)) as gateway, \
            gateway.client(secret) as client:
        answer = client.post("/v1/completions", json={"model": "small", "prompt": "one two three",
                                                      "max_tokens": 1000})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["choices"][0]["text"] == expected_words(5)  # capped from 1000 to the pool's 5
        assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
        uncapped = client.post("/v1/completions", json={"model": "small", "prompt": "x"})
        assert uncapped.json()["usage"]["completion_tokens"] == 5  # absent: the cap is sent
        gateway.flush_ledger()
    row = next(r for r in ledger_rows(sqlite_url) if r.request_id == answer.headers["x-request-id"])
    assert (row.prompt_tokens, row.completion_tokens, row.ttft_s) == (3, 5, None)


def test_failures_before_the_first_byte_are_retried_on_another_replica(fake, sqlite_url):
    broken = fake(FakeScript(fail_first=1000))
    healthy = fake()
    dead = "http://127.0.0.1:9/v1"  # nothing listens: connection refused
    _, secret = create_key(sqlite_url)
    config = one_pool(sqlite_url, [broken.base_url, dead, healthy.base_url],
                      health={"interval_s": 30, "eject_after_failures": 3}, affinity={"prefix_chars": 0})
    with GatewayThread(config) as gateway, gateway.client(secret) as client:
        for n in range(12):
            stream = n % 2 == 0
            response = client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
            assert response.status_code == 200, response.text
            text = stream_text(sse_data(response.text)) if stream else response.json()["choices"][0]["message"][
                "content"]
            assert text == expected_words(6)
        pool = gateway.gateway.pools["small"]
        assert [u.healthy for u in pool.upstreams] == [False, False, True]  # both bad ones ejected
        assert pool.num_retries >= 3
        metrics = metric_values(client.get("/metrics").text)
        assert metrics[("tokenmill_gateway_upstream_healthy", (("pool", "small"), ("upstream", "127.0.0.1:9")))] == 0
        assert metrics[("tokenmill_gateway_retries_total", (("pool", "small"),))] == pool.num_retries


def test_when_every_attempt_fails_the_client_gets_a_clear_error(fake, sqlite_url):
    slow = fake(FakeScript(header_delay=3.0))
    broken = fake(FakeScript(fail_first=1000))
    _, secret = create_key(sqlite_url)
    with GatewayThread(one_pool(sqlite_url, [slow.base_url], timeouts={"first_token_s": 0.5})) as gateway, \
            gateway.client(secret) as client:
        started = time.monotonic()
        response = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert time.monotonic() - started < 2.5  # the first-token timeout, not the upstream's 3 s
        assert response.status_code == 504
        error = response.json()["error"]
        assert "no first token within 0.5 s" in error["message"] and error["code"] == "first_token_timeout"
    with GatewayThread(one_pool(sqlite_url, [broken.base_url])) as gateway, gateway.client(secret) as client:
        response = client.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 502
        assert "answered 500: scripted failure" in response.json()["error"]["message"]
        assert response.headers["x-request-id"]


def test_a_slow_replica_is_abandoned_for_a_fast_one_before_the_first_byte(fake, sqlite_url):
    slow = fake(FakeScript(ttft=5.0))
    fast = fake()
    _, secret = create_key(sqlite_url)
    config = one_pool(sqlite_url, [slow.base_url, fast.base_url], timeouts={"first_token_s": 0.5},
                      affinity={"prefix_chars": 0})
    with GatewayThread(config) as gateway, gateway.client(secret) as client:
        for _ in range(3):
            response = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
            assert response.status_code == 200
            assert stream_text(sse_data(response.text)) == expected_words(6)


@pytest.mark.parametrize("cleanly", [False, True])
def test_a_stream_cut_after_its_first_byte_ends_with_an_error_event(fake, sqlite_url, cleanly):
    upstream = fake(FakeScript(cut_every=1, cut_cleanly=cleanly, itl=0.01))
    _, secret = create_key(sqlite_url)
    with GatewayThread(one_pool(sqlite_url, [upstream.base_url])) as gateway, gateway.client(secret) as client:
        response = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 10, "stream": True})
        assert response.status_code == 200
        events = sse_data(response.text)
        assert stream_text(events) == expected_words(5)  # half the content arrived
        assert events[-1] == "[DONE]"
        error = events[-2]["error"]
        assert error["code"] == "stream_truncated" if cleanly else error["code"] in ("stream_interrupted",
                                                                                      "stream_truncated")
        assert "before it was complete" in error["message"] or "broke mid-stream" in error["message"]
        gateway.flush_ledger()
        metrics = metric_values(client.get("/metrics").text)
    row = ledger_rows(sqlite_url)[-1]
    assert row.status_code == 200 and row.error and row.completion_tokens == 5
    assert sum(v for (name, _), v in metrics.items() if name == "tokenmill_gateway_stream_errors_total") == 1


def test_the_total_timeout_ends_a_stream_with_an_error_event(fake, sqlite_url):
    upstream = fake(FakeScript(itl=0.3))
    _, secret = create_key(sqlite_url)
    config = one_pool(sqlite_url, [upstream.base_url], timeouts={"first_token_s": 1, "total_s": 1})
    with GatewayThread(config) as gateway, gateway.client(secret) as client:
        started = time.monotonic()
        response = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 20, "stream": True})
        assert time.monotonic() - started < 2.5
        events = sse_data(response.text)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "timeout"
        assert 1 <= len(stream_text(events).split()) < 20


def test_a_client_that_leaves_mid_stream_cancels_the_upstream_request(fake, sqlite_url):
    upstream = fake(FakeScript(itl=0.1))
    _, secret = create_key(sqlite_url)
    with GatewayThread(one_pool(sqlite_url, [upstream.base_url])) as gateway:
        with httpx.Client(base_url=gateway.base_url, timeout=10) as client:
            with client.stream("POST", "/v1/chat/completions", headers={"authorization": f"Bearer {secret}"},
                               json={**CHAT, "max_tokens": 200, "stream": True}) as response:
                for line in response.iter_lines():
                    if "content" in line:
                        break
            request_id = response.headers["x-request-id"]
        deadline = time.monotonic() + 5
        while upstream.server.open_streams and time.monotonic() < deadline:
            time.sleep(0.05)
        assert upstream.server.open_streams == 0  # the upstream stream was closed, not left running 20 s
        pool = gateway.gateway.pools["small"]
        assert pool.upstreams[0].outstanding == 0 and gateway.gateway.queues["small"].num_granted == 0
        gateway.flush_ledger()
    row = next(r for r in ledger_rows(sqlite_url) if r.request_id == request_id)
    assert row.status_code == 499 and row.error == "the client disconnected"


def test_upstream_client_errors_pass_through_unchanged(fake, sqlite_url):
    upstream = fake(FakeScript(model="other-name"))  # answers 404 for the pool's model name
    _, secret = create_key(sqlite_url)
    with GatewayThread(one_pool(sqlite_url, [upstream.base_url])) as gateway, gateway.client(secret) as client:
        response = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert response.status_code == 404
        assert "does not exist" in response.json()["error"]["message"]
        assert gateway.gateway.pools["small"].upstreams[0].healthy  # the request's fault, not the replica's


@pytest.mark.parametrize("answer, ok", [('{"name": "Ada", "age": 36}', True), ('{"name": "Ada"}', False),
                                        ("Sure! Here is the JSON", False)])
def test_response_format_compliance_is_checked_and_exported(fake, sqlite_url, answer, ok):
    upstream = fake(FakeScript(answer=answer))
    _, secret = create_key(sqlite_url)
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    with GatewayThread(one_pool(sqlite_url, [upstream.base_url])) as gateway, gateway.client(secret) as client:
        for stream in (True, False):
            response = client.post("/v1/chat/completions", json={
                **CHAT, "max_tokens": 100, "stream": stream,
                "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}})
            assert response.status_code == 200
        metrics = metric_values(client.get("/metrics").text)
        gateway.flush_ledger()
    assert metrics[("tokenmill_gateway_format_compliance_ratio", (("model", "fake-model"),))] == (1.0 if ok else 0.0)
    rows = ledger_rows(sqlite_url)
    assert [(r.format_checked, r.format_ok) for r in rows] == [(True, ok), (True, ok)]


def test_an_invalid_schema_is_refused_before_forwarding(fake, sqlite_url):
    upstream = fake()
    _, secret = create_key(sqlite_url)
    with GatewayThread(one_pool(sqlite_url, [upstream.base_url])) as gateway, gateway.client(secret) as client:
        response = client.post("/v1/chat/completions", json={
            **CHAT, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}})
        assert response.status_code == 400
        assert "not a valid JSON schema" in response.json()["error"]["message"]
        assert upstream.server.num_requests == 0


class _OneAnswerPerConnection:
    """An upstream that answers the first request of each connection (keeping it open, as
    keep-alive allows) and closes the connection, unanswered, when a second request comes on it:
    what a replica does when its keep-alive timeout passes just as the gateway reuses the connection."""

    EVENTS = b"".join(b'data: {"choices": [{"index": 0, "delta": {"content": " %s"}}]}\n\n' % word.encode()
                      for word in WORDS[:3]) + b"data: [DONE]\n\n"

    def __init__(self) -> None:
        self.connections = 0
        self.answered = 0
        self._loop = asyncio.new_event_loop()
        self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1"
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    async def _serve(self, reader, writer) -> None:
        self.connections += 1
        for number in range(2):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            if number == 1:
                writer.close()
                return
            self.answered += 1
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n"
                         % len(self.EVENTS) + self.EVENTS)
            await writer.drain()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


def test_an_idle_connection_the_upstream_closed_on_reuse_is_replaced_without_a_failure(sqlite_url):
    upstream = _OneAnswerPerConnection()
    _, secret = create_key(sqlite_url)
    config = one_pool(sqlite_url, [upstream.base_url], health={"path": None, "metrics_path": None},
                      max_attempts=1)
    try:
        with GatewayThread(config) as gateway, gateway.client(secret) as client:
            for _ in range(4):
                response = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
                assert response.status_code == 200, response.text
                assert stream_text(sse_data(response.text)) == expected_words(3)
            upstream_state = gateway.gateway.pools["small"].upstreams[0]
            assert upstream_state.healthy and upstream_state.consecutive_failures == 0
            assert gateway.gateway.pools["small"].num_retries == 0
    finally:
        upstream.close()
    assert upstream.answered == 4 and upstream.connections >= 4
