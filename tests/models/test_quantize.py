"""Weight-only int8: applied from outside the model files, close to the unquantized model."""
import random

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.models.loader import load_model
from tokenmill.models.quantize import Int8WeightOnlyLinear, quantize_model, weight_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_layer_matches_dequantized_weights(dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96, bias=True).to(dtype)
    quantized = Int8WeightOnlyLinear(linear)
    x = torch.randn(5, 64, dtype=dtype)
    dequantized = quantized.weight_int8.float() * quantized.scales.float()[:, None]
    expected = x.float() @ dequantized.T + linear.bias.float()
    torch.testing.assert_close(quantized(x).float(), expected, atol=0.05 if dtype == torch.bfloat16 else 1e-4,
                               rtol=0.02 if dtype == torch.bfloat16 else 1e-4)
    # Rounding error of the weights themselves is at most half a step.
    assert (dequantized - linear.weight.float()).abs().max() <= quantized.scales.float().max() / 2 + 1e-6


def test_quantized_model_is_smaller_and_close(tiny_llama):
    reference = load_model(tiny_llama).model
    quantized = quantize_model(load_model(tiny_llama).model, "int8")
    assert sum(isinstance(m, Int8WeightOnlyLinear) for m in quantized.modules()) == 2 * 4  # qkv, o, gate_up, down
    projection_bytes = sum(m.weight.numel() * 4 for m in reference.model.layers.modules()
                           if isinstance(m, torch.nn.Linear))
    assert weight_bytes(reference) - weight_bytes(quantized) > 0.7 * projection_bytes
    with pytest.raises(ValueError, match="int8"):
        quantize_model(reference, "int3")


def test_engine_serves_int8_and_agrees_with_float(tiny_llama):
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 256) for _ in range(12)]} for _ in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    full = LLM(tiny_llama, dtype="float32", num_kv_blocks=64).generate(prompts, params, use_tqdm=False)
    int8 = LLM(tiny_llama, dtype="float32", num_kv_blocks=64, quantization="int8").generate(prompts, params,
                                                                                             use_tqdm=False)
    first_tokens_equal = sum(a.outputs[0].token_ids[0] == b.outputs[0].token_ids[0] for a, b in zip(full, int8))
    assert first_tokens_equal >= 5
    with pytest.raises(ValueError, match="quantization"):
        LLM(loaded_model=load_model(tiny_llama), quantization="int8")
