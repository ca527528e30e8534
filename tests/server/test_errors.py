"""Bad requests get an OpenAI-shaped 4xx error, never a 500, on the default server."""
import json

import httpx
import openai
import pytest
from server_harness import MAX_MODEL_LEN, MODEL, assert_error_shape

CHAT = [{"role": "user", "content": "Hi"}]
LONG_PROMPT = "word " * 300  # about 300 tokens, more than max_model_len (256)


def post(server, path, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", timeout=60, **kwargs)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])
@pytest.mark.parametrize("content", [b"{bad", b"", b"\xff\xfe", b'{"prompt": "hi",}'])
def test_malformed_json_is_400(server, path, content):
    error = assert_error_shape(post(server, path, content=content, headers={"Content-Type": "application/json"}),
                               400)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", [], None),
    ("/v1/completions", "hi", None),
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "stop": 3}, "stop"),
    ("/v1/completions", {"prompt": "hi", "stream": {"yes": 1}}, "stream"),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt"),
    ("/v1/completions", {"prompt": [-1]}, "prompt"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/detokenize", {"tokens": ["a"]}, "tokens"),
])
def test_wrong_types_are_400(server, path, body, param):
    error = assert_error_shape(post(server, path, json=body), 400)
    assert error["code"] == "invalid_value"
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param), error


@pytest.mark.parametrize("field, value", [
    ("temperature", 5), ("temperature", -0.5), ("top_p", 0), ("top_p", 1.5), ("n", 0), ("n", 1000),
    ("max_tokens", 0), ("max_tokens", -3), ("min_p", 2), ("presence_penalty", 3), ("frequency_penalty", -3),
    ("repetition_penalty", 0), ("top_k", -2), ("seed", 2**64), ("min_tokens", -1),
])
@pytest.mark.parametrize("kind", ["completion", "chat"])
@pytest.mark.parametrize("stream", [False, True])
def test_out_of_range_sampling_values_are_400(server, field, value, kind, stream):
    body = {"prompt": "hi"} if kind == "completion" else {"messages": CHAT}
    body.update({field: value, "stream": stream})
    path = "/v1/completions" if kind == "completion" else "/v1/chat/completions"
    error = assert_error_shape(post(server, path, json=body), 400)
    assert error["param"] == field


@pytest.mark.parametrize("body", [
    {"prompt": "hi", "max_tokens": 4, "min_tokens": 5},
    {"prompt": "hi", "max_tokens": 2, "stop": [""]},
    {"prompt": "hi", "max_tokens": 2, "stop": [f"s{i}" for i in range(17)]},
    {"prompt": "hi", "max_tokens": 2, "best_of": 2},
    {"prompt": "hi", "max_tokens": 2, "logprobs": 21},
    {"prompt": [], "max_tokens": 2},
    {"prompt": [[]], "max_tokens": 2},
    {"prompt": [10**9], "max_tokens": 2},
])
def test_invalid_combinations_are_400(server, body):
    assert_error_shape(post(server, "/v1/completions", json=body), 400)


def test_empty_messages_is_400(server, client):
    error = assert_error_shape(post(server, "/v1/chat/completions", json={"messages": []}), 400)
    assert error["param"] == "messages"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])
    assert_error_shape(post(server, "/tokenize", json={"messages": []}), 400)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "hi"}),
    ("/v1/completions", {"prompt": "hi", "stream": True}),
    ("/v1/chat/completions", {"messages": CHAT}),
    ("/v1/chat/completions", {"messages": CHAT, "stream": True}),
    ("/tokenize", {"prompt": "hi"}),
    ("/detokenize", {"tokens": [2]}),
])
def test_unknown_model_is_404(server, path, body):
    error = assert_error_shape(post(server, path, json={**body, "model": "gpt-17"}), 404)
    assert error["param"] == "model" and error["code"] == "model_not_found"
    assert "gpt-17" in error["message"] and MODEL in error["message"]


def test_unknown_model_through_the_client(client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.completions.create(model="gpt-17", prompt="hi", max_tokens=2)
    assert raised.value.body["code"] == "model_not_found"


def prompt_length(server, **body) -> int:
    return post(server, "/tokenize", json=body).json()["count"]


@pytest.mark.parametrize("extra", [{}, {"max_tokens": 4}, {"stream": True}])
def test_completion_prompt_longer_than_max_model_len_is_400(server, extra):
    count = prompt_length(server, prompt=LONG_PROMPT)
    assert count > MAX_MODEL_LEN
    error = assert_error_shape(post(server, "/v1/completions", json={"prompt": LONG_PROMPT, **extra}), 400)
    assert error["code"] == "context_length_exceeded"
    assert str(MAX_MODEL_LEN) in error["message"] and str(count) in error["message"], error["message"]


@pytest.mark.parametrize("extra", [{}, {"max_tokens": 4}, {"stream": True}])
def test_chat_prompt_longer_than_max_model_len_is_400(server, extra):
    messages = [{"role": "user", "content": LONG_PROMPT}]
    count = prompt_length(server, messages=messages)
    error = assert_error_shape(post(server, "/v1/chat/completions", json={"messages": messages, **extra}), 400)
    assert error["code"] == "context_length_exceeded"
    assert str(MAX_MODEL_LEN) in error["message"] and str(count) in error["message"], error["message"]


def test_prompt_plus_max_tokens_beyond_the_context_is_400(server, client):
    count = prompt_length(server, prompt="hi")
    max_tokens = MAX_MODEL_LEN - count + 1
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=max_tokens)
    message = raised.value.body["message"]
    assert str(MAX_MODEL_LEN) in message and str(MAX_MODEL_LEN + 1) in message
    # Exactly at the limit is fine.
    response = client.completions.create(model=MODEL, prompt="hi", max_tokens=max_tokens - 1, temperature=0,
                                         stop=["\n", " "])
    assert response.choices[0].finish_reason in ("stop", "length")


def test_unknown_route_and_wrong_method(server):
    error = assert_error_shape(httpx.get(f"{server.base_url}/v1/nothing", timeout=10), 404)
    assert error["type"] == "not_found_error"
    assert_error_shape(httpx.get(f"{server.base_url}/v1/completions", timeout=10), 405)


def test_detokenize_rejects_ids_beyond_the_vocabulary(server):
    error = assert_error_shape(post(server, "/detokenize", json={"tokens": [2, 10**9]}), 400)
    assert error["param"] == "tokens"


def test_tokenize_needs_exactly_one_input(server):
    assert_error_shape(post(server, "/tokenize", json={}), 400)
    assert_error_shape(post(server, "/tokenize", json={"prompt": "hi", "messages": CHAT}), 400)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "a\ud800b", "max_tokens": 2}),
    ("/v1/completions", {"prompt": ["ok", "\udfff"], "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}], "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}],
                              "max_tokens": 2}),
    ("/tokenize", {"prompt": "a\ud800b"}),
    ("/tokenize", {"messages": [{"role": "user", "content": "a\ud800b"}]}),
])
def test_lone_surrogates_are_400(server, path, body):
    # "\ud800" is a valid JSON escape but not text: nothing can tokenize it.
    content = json.dumps(body).encode()  # ASCII with \u escapes, as a client would send it
    error = assert_error_shape(post(server, path, content=content, headers={"Content-Type": "application/json"}), 400)
    assert "surrogate" in error["message"]


@pytest.mark.parametrize("prompt", [[10**30], [[5], [2**64]], [262144]])
def test_out_of_vocabulary_prompt_ids_are_400_also_with_echo(server, prompt):
    for echo in (False, True):
        error = assert_error_shape(post(server, "/v1/completions", json={"prompt": prompt, "echo": echo,
                                                                         "max_tokens": 2}), 400)
        assert "vocabulary" in error["message"] or "262144" in error["message"], error


def test_huge_top_k_is_400_and_the_largest_allowed_one_works(server):
    body = {"prompt": "hi", "max_tokens": 2, "top_p": 0.5}
    error = assert_error_shape(post(server, "/v1/completions", json={**body, "top_k": 2**63}), 400)
    assert error["param"] == "top_k"
    response = post(server, "/v1/completions", json={**body, "top_k": 2**63 - 1})
    assert response.status_code == 200, response.text
    assert 1 <= response.json()["usage"]["completion_tokens"] <= 2


def test_rejected_requests_leave_no_traceback_in_the_log(server):
    for body in ({"prompt": "hi", "max_tokens": 2, "min_tokens": 3}, {"prompt": [10**6], "max_tokens": 2},
                 {"prompt": "hi", "stop": [""], "max_tokens": 2}):
        assert_error_shape(post(server, "/v1/completions", json=body), 400)
    # Client errors are answered, not logged as failures of the server.
    assert "Traceback" not in server.log(tail=None)


def test_null_sampling_fields_mean_not_set(server):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "temperature": None, "top_p": None, "n": None,
            "stop": None, "seed": None}
    response = post(server, "/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 1
