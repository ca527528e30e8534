"""Weight-only int8 / int4: applied from outside the model files, close to the unquantized model."""
import random

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.models.loader import load_model
from tokenmill.models.quantize import (
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    _int4_layout_understood,
    quantize_model,
    weight_bytes,
)

LAYERS = {"int8": Int8WeightOnlyLinear, "int4": Int4WeightOnlyLinear}


def _tolerance(dtype):
    return dict(atol=0.05, rtol=0.02) if dtype != torch.float32 else dict(atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_rows", [1, 5, 200])  # the kernel path and the dequantize path
def test_layer_computes_with_its_dequantized_weight(method, dtype, num_rows):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 192, bias=True).to(dtype)
    quantized = LAYERS[method].from_linear(linear)
    x = torch.randn(num_rows, 128, dtype=dtype)
    weight = quantized.dequantized(torch.float32)
    expected = x.float() @ weight.T + linear.bias.float()
    torch.testing.assert_close(quantized(x).float(), expected, **_tolerance(dtype))
    original = linear.weight.float()
    if method == "int8":  # round to nearest: half a step of the grid at most
        assert (weight - original).abs().max() <= quantized.scales.float().max() / 2 + 1e-3
    else:  # the searched grid may clip outliers, but beats spanning [min, max] in squared error
        groups = original.view(192, -1, 32)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        step = (high - low) / 15
        plain = ((torch.round((groups - low) / step) * step + low - groups) ** 2).sum()
        assert ((weight - original) ** 2).sum() <= plain + 1e-6
        assert (weight - original).norm() / original.norm() < 0.1


def test_int4_codes_survive_the_cpu_kernel_layout():
    assert _int4_layout_understood()
    torch.manual_seed(1)
    linear = torch.nn.Linear(128, 128, bias=False)
    quantized = Int4WeightOnlyLinear.from_linear(linear)
    assert quantized.cpu_layout
    assert quantized.weight_int4.numel() == 128 * 128 // 2  # half a byte per weight, stored once
    codes = quantized.codes()
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15 and codes.unique().numel() > 8


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_model_is_smaller_and_close(tiny_llama, method):
    reference = load_model(tiny_llama).model
    quantized = quantize_model(load_model(tiny_llama).model, method)
    assert sum(isinstance(m, LAYERS[method]) for m in quantized.model.layers.modules()) == 2 * 4  # qkv, o, gate_up, down
    assert quantized.model.embed_tokens.weight.dtype == torch.float32  # embedding and output layer untouched
    # float32 projections -> int8 is a quarter of their bytes, int4 (with group scales) about a sixth.
    projection_bytes = sum(m.weight.numel() * 4 for m in reference.model.layers.modules()
                           if isinstance(m, torch.nn.Linear))
    saved = weight_bytes(reference) - weight_bytes(quantized)
    assert saved > (0.7 if method == "int8" else 0.8) * projection_bytes, saved / projection_bytes
    hidden = torch.randn(4, reference.config.hidden_size)
    expected = reference.compute_logits(hidden)
    got = quantized.compute_logits(hidden)
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    with pytest.raises(ValueError, match="int8"):
        quantize_model(reference, "int3")


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_engine_serves_quantized_and_agrees_with_float(tiny_llama, method):
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 256) for _ in range(12)]} for _ in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    full = LLM(tiny_llama, dtype="float32", num_kv_blocks=64).generate(prompts, params, use_tqdm=False)
    quantized = LLM(tiny_llama, dtype="float32", num_kv_blocks=64, quantization=method).generate(
        prompts, params, use_tqdm=False)
    first_tokens_equal = sum(a.outputs[0].token_ids[0] == b.outputs[0].token_ids[0]
                             for a, b in zip(full, quantized))
    assert first_tokens_equal >= 5
    assert all(len(output.outputs[0].token_ids) == 8 for output in quantized)
    with pytest.raises(ValueError, match="quantization"):
        LLM(loaded_model=load_model(tiny_llama), quantization=method)
