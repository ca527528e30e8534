"""Pre-packed oneDNN projections: same results as the plain model, applied from outside."""
import pytest
import torch

from tokenmill.engine.sampler import _first_argmax
from tokenmill.models.loader import load_model
from tokenmill.models.prepack import PrepackedLinear, prepack_model, prepack_supported


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_rows", [1, 7, 32, 300])
def test_prepacked_linear_matches_dense(dtype, num_rows):
    if not prepack_supported("cpu", dtype):
        pytest.skip(f"oneDNN has no {dtype} linear on this CPU")
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 200, bias=True).to(dtype)
    packed = PrepackedLinear.from_linear(linear)
    x = torch.randn(num_rows, 96, dtype=dtype)
    tolerance = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    torch.testing.assert_close(packed(x).float(), linear(x).float(), **tolerance)
    assert packed(x.view(num_rows, 1, 96)).shape == (num_rows, 1, 200)


def test_prepack_model_replaces_every_projection_and_keeps_outputs(tiny_llama):
    reference = load_model(tiny_llama).model
    model = load_model(tiny_llama).model
    assert prepack_model(model, torch.float32, "cpu")
    assert prepack_model(model, torch.float32, "cpu")  # idempotent: a shared model is packed once
    assert not any(type(m) is torch.nn.Linear for m in model.model.layers.modules())
    assert sum(isinstance(m, PrepackedLinear) for m in model.model.layers.modules()) == 2 * 4
    hidden = torch.randn(5, reference.config.hidden_size)
    torch.testing.assert_close(model.compute_logits(hidden), reference.compute_logits(hidden), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_argmax_is_argmax_with_ties(dtype):
    generator = torch.Generator().manual_seed(0)
    for shape in [(32, 262144), (3, 1000), (4, 1024), (1, 512)]:
        few_values = torch.randint(0, 4, shape, generator=generator).to(dtype)  # many ties
        assert torch.equal(_first_argmax(few_values), few_values.float().argmax(dim=-1))
        spread = torch.randn(shape, generator=generator).to(dtype)
        assert torch.equal(_first_argmax(spread), spread.float().argmax(dim=-1))
