"""A model without a tokenizer (a Hugging Face folder with weights only): token-id
prompts are served, everything that needs text is a 400, never a 500."""
import httpx
import pytest
import torch
import transformers
from server_harness import assert_error_shape, start_server


@pytest.fixture(scope="module")
def bare_server(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    path = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    server = start_server(tmp_path_factory, "--model", str(path), "--max-model-len", "128",
                          "--kv-cache-tokens", "1024")
    yield server
    server.stop()


def post(server, path, body) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=60)


def test_token_id_prompts_are_served(bare_server):
    response = post(bare_server, "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 4, "ignore_eos": True})
    assert response.status_code == 200, response.text
    assert response.json()["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "hello", "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": ["hello"], "max_tokens": 2, "stream": True}, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 2, "echo": True}, "echo"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}, None),
    ("/tokenize", {"prompt": "hello"}, None),
    ("/detokenize", {"tokens": [1, 2]}, None),
])
def test_text_endpoints_say_there_is_no_tokenizer(bare_server, path, body, param):
    error = assert_error_shape(post(bare_server, path, body), 400)
    assert "tokenizer" in error["message"] and error["param"] == param
