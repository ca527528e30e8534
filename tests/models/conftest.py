"""Fixtures shared by the model tests."""
import pytest
import torch
import transformers


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny-llama-q")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return str(path)
