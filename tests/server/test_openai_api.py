"""Completions and chat through the official `openai` client against the default server."""
import time

import httpx
import pytest
from server_harness import MAX_MODEL_LEN, MODEL

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
NO_EOS = {"ignore_eos": True}  # the completion runs to max_tokens, so token counts are known


def tokenize(server, **body) -> list[int]:
    response = httpx.post(f"{server.base_url}/tokenize", json=body, timeout=30)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["count"] == len(payload["tokens"])
    assert payload["max_model_len"] == MAX_MODEL_LEN
    return payload["tokens"]


def detokenize(server, tokens) -> str:
    response = httpx.post(f"{server.base_url}/detokenize", json={"tokens": tokens}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["prompt"]


def stream_completion(client, **kwargs):
    """(text per choice index, finish reason per index, usage, chunks) of a streamed completion."""
    texts, reasons, usage, chunks = {}, {}, None, []
    for chunk in client.completions.create(model=MODEL, stream=True, **kwargs):
        chunks.append(chunk)
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason is not None:
                reasons[choice.index] = choice.finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
    return texts, reasons, usage, chunks


def stream_chat(client, **kwargs):
    """(text per choice index, finish reason per index, usage, role per index) of a streamed chat completion."""
    texts, reasons, usage, roles = {}, {}, None, {}
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **kwargs):
        for choice in chunk.choices:
            if choice.delta.role is not None:
                roles[choice.index] = choice.delta.role
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason is not None:
                reasons[choice.index] = choice.finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
    return texts, reasons, usage, roles


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [model.id for model in models] == [MODEL]
    assert models[0].owned_by == "tokenmill"


def test_tokenize_and_detokenize_round_trip(server):
    tokens = tokenize(server, prompt=PROMPT)
    assert detokenize(server, tokens) == "<bos>" + PROMPT
    assert tokenize(server, prompt=PROMPT, add_special_tokens=False) == tokens[1:]


def test_chat_prompt_follows_the_gemma_turn_format(server):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    rendered = detokenize(server, tokenize(server, messages=conversation))
    assert rendered == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
                        "<start_of_turn>model\nHello!<end_of_turn>\n"
                        "<start_of_turn>user\nBye<end_of_turn>\n"
                        "<start_of_turn>model\n")


def test_completion_usage_counts_prompt_and_generated_tokens(server, client):
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=7, temperature=0, extra_body=NO_EOS)
    assert response.model == MODEL and response.object == "text_completion"
    [choice] = response.choices
    assert choice.finish_reason == "length" and choice.text
    assert response.usage.prompt_tokens == len(tokenize(server, prompt=PROMPT))
    assert response.usage.completion_tokens == 7
    assert response.usage.total_tokens == response.usage.prompt_tokens + 7


def test_generated_text_is_the_detokenized_tokens(client):
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0,
                                         extra_body=NO_EOS)
    [choice] = response.choices
    assert len(choice.logprobs.tokens) == response.usage.completion_tokens == 6
    assert "".join(choice.logprobs.tokens) == choice.text


def test_chat_usage_and_message(server, client):
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0,
                                              extra_body=NO_EOS)
    assert response.object == "chat.completion"
    [choice] = response.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert response.usage.prompt_tokens == len(tokenize(server, messages=MESSAGES))
    assert response.usage.completion_tokens == 5


def test_max_completion_tokens_is_honoured(client):
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=3,
                                              temperature=0, extra_body=NO_EOS)
    assert response.usage.completion_tokens == 3 and response.choices[0].finish_reason == "length"


def test_n_completions_share_one_prompt(server, client):
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=11, n=3,
                                         extra_body=NO_EOS)
    assert sorted(choice.index for choice in response.choices) == [0, 1, 2]
    assert all(choice.finish_reason == "length" for choice in response.choices)
    assert len({choice.text for choice in response.choices}) > 1  # independent samples
    assert response.usage.prompt_tokens == len(tokenize(server, prompt=PROMPT))
    assert response.usage.completion_tokens == 3 * 6

    texts, reasons, usage, _ = stream_completion(client, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=11, n=3,
                                                 stream_options={"include_usage": True}, extra_body=NO_EOS)
    assert texts == {choice.index: choice.text for choice in response.choices}
    assert reasons == {0: "length", 1: "length", 2: "length"}
    assert usage.completion_tokens == 18 and usage.prompt_tokens == response.usage.prompt_tokens


def test_chat_n_completions(client):
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=1.0, seed=5,
                                              n=2, extra_body=NO_EOS)
    assert sorted(choice.index for choice in response.choices) == [0, 1]
    assert response.usage.completion_tokens == 8
    texts, reasons, usage, roles = stream_chat(client, messages=MESSAGES, max_tokens=4, temperature=1.0, seed=5, n=2,
                                               stream_options={"include_usage": True}, extra_body=NO_EOS)
    assert texts == {choice.index: choice.message.content for choice in response.choices}
    assert reasons == {0: "length", 1: "length"} and roles == {0: "assistant", 1: "assistant"}
    assert usage.completion_tokens == 8 and usage.prompt_tokens == response.usage.prompt_tokens


def test_several_prompts_in_one_request(server, client):
    prompts = [PROMPT, "Water boils at"]
    response = client.completions.create(model=MODEL, prompt=prompts, max_tokens=3, temperature=0, extra_body=NO_EOS)
    assert sorted(choice.index for choice in response.choices) == [0, 1]
    assert response.usage.prompt_tokens == sum(len(tokenize(server, prompt=p)) for p in prompts)
    assert response.usage.completion_tokens == 6
    alone = client.completions.create(model=MODEL, prompt=prompts[1], max_tokens=3, temperature=0, extra_body=NO_EOS)
    assert response.choices[1].text == alone.choices[0].text


def pick_stop(tokens: list[str], kind: str) -> str | list[str]:
    """A stop string taken from a greedy completion's own tokens."""
    words = [i for i, token in enumerate(tokens) if i >= 2 and token.strip()]
    if kind == "whole token":
        return tokens[words[0]]
    if kind == "across tokens":  # the end of one token and the start of the next
        i = words[0]
        return tokens[i][-2:] + tokens[i + 1][:2]
    # Several (two-token spans), listed latest first: the earliest match in the text wins.
    return [tokens[words[2]] + tokens[words[2] + 1], tokens[words[1]] + tokens[words[1] + 1]]


@pytest.mark.parametrize("kind", ["whole token", "across tokens", "earliest of several"])
def test_stop_strings_end_the_text_and_never_leak(client, kind):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=0,
                                     extra_body=NO_EOS).choices[0]
    tokens = full.logprobs.tokens
    stop = pick_stop(tokens, kind)
    stops = [stop] if isinstance(stop, str) else stop
    cut = min(full.text.find(s) for s in stops)
    # Generation stops at the token that completes the earliest stop string.
    needed = next(k for k in range(1, len(tokens) + 1) if any(s in "".join(tokens[:k]) for s in stops))

    stopped = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=stop)
    [choice] = stopped.choices
    assert choice.text == full.text[:cut], (stop, full.text)
    assert choice.finish_reason == "stop"
    assert stopped.usage.completion_tokens == needed

    texts, reasons, _, _ = stream_completion(client, prompt=PROMPT, max_tokens=12, temperature=0, stop=stop)
    assert texts == {0: full.text[:cut]} and reasons == {0: "stop"}


def test_chat_stop_string(client):
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0, logprobs=True,
                                          extra_body=NO_EOS).choices[0]
    stop = pick_stop([entry.token for entry in full.logprobs.content], "whole token")
    expected = full.message.content[:full.message.content.find(stop)]
    stopped = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0, stop=[stop])
    assert stopped.choices[0].message.content == expected and stopped.choices[0].finish_reason == "stop"
    texts, reasons, _, _ = stream_chat(client, messages=MESSAGES, max_tokens=10, temperature=0, stop=[stop])
    assert texts == {0: expected} and reasons == {0: "stop"}


def test_same_seed_same_text_and_stream_matches(client):
    def sample(seed):
        return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=seed,
                                         extra_body=NO_EOS).choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first
    texts, reasons, _, _ = stream_completion(client, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=1234,
                                             extra_body=NO_EOS)
    assert texts == {0: first} and reasons == {0: "length"}


def test_chat_seed_and_greedy_stream_match_non_streaming(client):
    for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 99}):
        whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, extra_body=NO_EOS,
                                               **sampling)
        again = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, extra_body=NO_EOS,
                                               **sampling)
        assert again.choices[0].message.content == whole.choices[0].message.content
        texts, reasons, usage, roles = stream_chat(client, messages=MESSAGES, max_tokens=8, extra_body=NO_EOS,
                                                   stream_options={"include_usage": True}, **sampling)
        assert texts == {0: whole.choices[0].message.content}
        assert reasons == {0: "length"} and roles == {0: "assistant"}
        assert usage.model_dump() == whole.usage.model_dump()


def test_greedy_stream_matches_non_streaming_with_usage(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, extra_body=NO_EOS)
    texts, reasons, usage, chunks = stream_completion(client, prompt=PROMPT, max_tokens=12, temperature=0,
                                                      stream_options={"include_usage": True}, extra_body=NO_EOS)
    assert texts == {0: whole.choices[0].text} and reasons == {0: "length"}
    assert usage.model_dump() == whole.usage.model_dump()
    assert chunks[-1].choices == [] and chunks[-1].usage is not None  # usage comes last, on its own
    assert all(chunk.id == chunks[0].id for chunk in chunks)


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_first_content_chunk_arrives_before_generation_ends(client, kind):
    start = time.monotonic()
    arrivals = []  # arrival time of every chunk that carries text
    if kind == "completion":
        stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
                                           extra_body=NO_EOS)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                arrivals.append(time.monotonic())
    else:
        stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0,
                                                stream=True, extra_body=NO_EOS)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.monotonic())
    end = time.monotonic()
    assert len(arrivals) >= 12, "text should arrive token by token"
    # Generation takes ~24 engine steps; the first text must come after about one of
    # them, not with the rest at the end.
    assert arrivals[0] - start < 0.5 * (end - start), (arrivals[0] - start, end - start)
    assert arrivals[-1] - arrivals[0] > 0.4 * (end - start)
