"""Servers with limits: a bounded waiting queue (503 + Retry-After), an API key,
a request timeout and a strict user-given chat template."""
import asyncio
import json
import time

import httpx
import openai
import pytest
from server_harness import COMMON_ARGS, IDLE_DEADLINE, MODEL, assert_error_shape, metric, start_server

API_KEY = "test-key-123"
REQUEST_TIMEOUT = 1.5
# Like Gemma's own template: roles must alternate user/assistant, else it raises.
STRICT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    """Two sequences at a time, two waiting at most."""
    template = tmp_path_factory.mktemp("template") / "strict.jinja"
    template.write_text(STRICT_TEMPLATE)
    server = start_server(tmp_path_factory, *COMMON_ARGS, "--max-num-seqs", "2", "--max-waiting-requests", "2",
                          "--chat-template", str(template))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory):
    server = start_server(tmp_path_factory, *COMMON_ARGS, "--api-key", API_KEY,
                          "--request-timeout", str(REQUEST_TIMEOUT))
    yield server
    server.stop()


AUTH = {"Authorization": f"Bearer {API_KEY}"}


# ---- flooding the waiting queue ---------------------------------------------------------
def parse_sse(text: str) -> list:
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", text[-500:]
    return [json.loads(event) for event in events[:-1]]


async def flood(server, count: int, max_tokens: int) -> list[tuple[bool, httpx.Response]]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as http:
        async def one(i: int):
            stream = i % 2 == 1
            body = {"model": MODEL, "prompt": f"Request {i}:", "max_tokens": max_tokens, "ignore_eos": True,
                    "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})}
            return stream, await http.post("/v1/completions", json=body)

        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(count))), timeout=300)


def test_flood_beyond_the_waiting_queue_gets_503_and_accepted_requests_complete(small_server):
    results = asyncio.run(flood(small_server, count=12, max_tokens=6))
    accepted = [(stream, response) for stream, response in results if response.status_code == 200]
    refused = [response for _, response in results if response.status_code != 200]
    assert len(accepted) >= 2 and refused, [response.status_code for _, response in results]
    for response in refused:
        error = assert_error_shape(response, 503)
        assert error["code"] == "overloaded"
        assert int(response.headers["Retry-After"]) >= 1
    for stream, response in accepted:
        if stream:
            chunks = parse_sse(response.text)
            text = "".join(choice["text"] for chunk in chunks for choice in chunk["choices"])
            reasons = [choice["finish_reason"] for chunk in chunks for choice in chunk["choices"]]
            assert reasons[-1] == "length" and text
            assert chunks[-1]["usage"]["completion_tokens"] == 6
        else:
            body = response.json()
            assert body["choices"][0]["finish_reason"] == "length" and body["choices"][0]["text"]
            assert body["usage"]["completion_tokens"] == 6
    small_server.wait_idle()
    # The server recovers: a request after the flood is served.
    response = httpx.post(f"{small_server.base_url}/v1/completions", timeout=60,
                          json={"prompt": "Hello", "max_tokens": 2, "ignore_eos": True})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2
    # Refusals are routine: the server answers them without logging tracebacks.
    assert "Traceback" not in small_server.log(tail=None)


def test_more_completions_than_the_queue_holds_is_a_client_error(small_server):
    small_server.wait_idle()
    # n = 3 can never fit a waiting queue of 2: retrying would not help, so not a 503.
    response = httpx.post(f"{small_server.base_url}/v1/completions", timeout=60,
                          json={"prompt": "Hello", "max_tokens": 2, "n": 3})
    error = assert_error_shape(response, 400)
    assert "n=3" in error["message"] and "2" in error["message"]
    response = httpx.post(f"{small_server.base_url}/v1/completions", timeout=60,
                          json={"prompt": "Hello", "max_tokens": 2, "n": 2, "ignore_eos": True})
    assert response.status_code == 200 and len(response.json()["choices"]) == 2


def test_template_errors_are_client_errors(small_server):
    bad_order = [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hi again"}]
    for path in ("/v1/chat/completions", "/tokenize"):
        response = httpx.post(f"{small_server.base_url}{path}", json={"messages": bad_order, "max_tokens": 2},
                              timeout=60)
        error = assert_error_shape(response, 400)
        assert "alternate" in error["message"] and error["param"] == "messages"
    good = [{"role": "user", "content": "Hi"}]
    tokens = httpx.post(f"{small_server.base_url}/tokenize", json={"messages": good}, timeout=60).json()["tokens"]
    text = httpx.post(f"{small_server.base_url}/detokenize", json={"tokens": tokens}, timeout=60).json()["prompt"]
    assert text == "user: Hi\nassistant:"  # the user's template is the one in use


# ---- API key ------------------------------------------------------------------------------
@pytest.mark.parametrize("method, path, body", [
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
    ("POST", "/tokenize", {"prompt": "hi"}),
    ("POST", "/detokenize", {"tokens": [2]}),
])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                                     {"Authorization": f"Basic {API_KEY}"}, {"Authorization": f"Bearer {API_KEY}x"}],
                         ids=["none", "wrong", "no-scheme", "basic", "longer"])
def test_requests_without_the_right_key_get_401(guarded_server, method, path, body, headers):
    response = httpx.request(method, f"{guarded_server.base_url}{path}", json=body, headers=headers, timeout=30)
    error = assert_error_shape(response, 401)
    assert error["code"] == "invalid_api_key"


def test_the_official_client_with_a_wrong_key_gets_an_authentication_error(guarded_server):
    with pytest.raises(openai.AuthenticationError):
        guarded_server.client(api_key="wrong").models.list()


def test_requests_with_the_key_are_served(guarded_server):
    client = guarded_server.client(api_key=API_KEY, timeout=60)
    assert [model.id for model in client.models.list().data] == [MODEL]
    response = client.completions.create(model=MODEL, prompt="Hi", max_tokens=1)
    assert response.choices[0].finish_reason in ("length", "stop", "timeout")
    tokens = httpx.post(f"{guarded_server.base_url}/tokenize", json={"prompt": "Hi"}, headers=AUTH, timeout=30)
    assert tokens.status_code == 200 and tokens.json()["count"] == 2


def test_health_and_metrics_stay_open(guarded_server):
    assert httpx.get(f"{guarded_server.base_url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{guarded_server.base_url}/metrics", timeout=10).status_code == 200


# ---- request timeout ----------------------------------------------------------------------------
def timeouts(server) -> float:
    return metric(server.metrics(), "tokenmill_request_success_total", finished_reason="timeout")


def test_non_streaming_request_past_the_timeout_ends_with_timeout(guarded_server):
    guarded_server.wait_idle()
    before = timeouts(guarded_server)
    client = guarded_server.client(api_key=API_KEY, timeout=60)
    start = time.monotonic()
    response = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=200,
                                         extra_body={"ignore_eos": True})
    elapsed = time.monotonic() - start
    [choice] = response.choices
    assert choice.finish_reason == "timeout"
    assert REQUEST_TIMEOUT <= elapsed < REQUEST_TIMEOUT + 10
    assert response.usage.completion_tokens < 200
    guarded_server.wait_idle(IDLE_DEADLINE)
    assert timeouts(guarded_server) == before + 1


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_streaming_request_past_the_timeout_ends_with_timeout(guarded_server, kind):
    guarded_server.wait_idle()
    before = timeouts(guarded_server)
    if kind == "completion":
        path, body = "/v1/completions", {"prompt": "Once upon a time"}
    else:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me a story."}]}
    body.update(model=MODEL, max_tokens=200, ignore_eos=True, stream=True, stream_options={"include_usage": True})
    start = time.monotonic()
    response = httpx.post(f"{guarded_server.base_url}{path}", json=body, headers=AUTH, timeout=60)
    elapsed = time.monotonic() - start
    assert response.status_code == 200
    chunks = parse_sse(response.text)
    reasons = [choice["finish_reason"] for chunk in chunks for choice in chunk["choices"] if choice["finish_reason"]]
    assert reasons == ["timeout"]
    assert chunks[-1]["usage"]["completion_tokens"] < 200
    assert REQUEST_TIMEOUT <= elapsed < REQUEST_TIMEOUT + 10
    guarded_server.wait_idle(IDLE_DEADLINE)
    assert timeouts(guarded_server) == before + 1
