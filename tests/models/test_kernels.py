"""The fused CPU kernels compute what the plain PyTorch path computes."""
import pytest
import torch

from tokenmill.kernels import cpu_kernels_for, load_cpu_kernels, set_cpu_kernels_enabled
from tokenmill.models.layers.attention import build_attention_metadata, paged_attention
from tokenmill.models.layers.mlp import GatedMLP
from tokenmill.models.layers.norm import GemmaRMSNorm, RMSNorm
from tokenmill.models.layers.rotary import split_qk_rotary

pytestmark = pytest.mark.skipif(not load_cpu_kernels(), reason="the fused CPU kernels cannot be built here")
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture
def plain_path():
    """Run a block of code on the plain PyTorch path."""
    class Switch:
        def __enter__(self):
            set_cpu_kernels_enabled(False)

        def __exit__(self, *exc):
            set_cpu_kernels_enabled(True)
    yield Switch()
    set_cpu_kernels_enabled(True)


def assert_same(fused, plain, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(fused, plain, atol=2e-5, rtol=2e-5)
    else:  # a different summation order may flip the rounding of a few values by one bf16 step
        difference = (fused.float() - plain.float()).abs()
        assert (difference > 0).float().mean() < 0.02
        assert bool((difference <= plain.float().abs() * 2**-7 + 1e-6).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_class", [RMSNorm, GemmaRMSNorm])
@pytest.mark.parametrize("dim", [640, 100])  # a multiple of the vector width and not
def test_norms_with_and_without_residual(plain_path, dtype, norm_class, dim):
    torch.manual_seed(0)
    norm = norm_class(dim, eps=1e-6).to(dtype)
    norm.weight.data.normal_(0, 0.2)
    x, residual = torch.randn(7, dim, dtype=dtype), torch.randn(7, dim, dtype=dtype)
    assert cpu_kernels_for(x)
    fused_out, fused_residual = norm(x, residual.clone())
    with plain_path:
        plain_out, plain_residual = norm(x, residual.clone())
        plain_alone = norm(x)
    assert_same(norm(x), plain_alone, dtype)
    assert_same(fused_out, plain_out, dtype)
    torch.testing.assert_close(fused_residual, plain_residual, atol=0, rtol=0)  # one rounding of one sum


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_norms", [True, False])
def test_qk_norm_and_rotary(plain_path, dtype, with_norms):
    from tokenmill.models.layers.rotary import RotaryEmbedding
    torch.manual_seed(1)
    heads, kv_heads, head_dim, tokens = 4, 2, 64, 9
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    cos, sin = RotaryEmbedding(head_dim, {"rope_type": "default", "rope_theta": 10000.0})(
        torch.arange(100, 100 + tokens), dtype)
    norms = (None, None)
    if with_norms:
        norms = tuple(GemmaRMSNorm(head_dim).to(dtype) for _ in range(2))
        for norm in norms:
            norm.weight.data.normal_(0, 0.2)
    fused = split_qk_rotary(qkv, heads, kv_heads, head_dim, cos, sin, *norms)
    with plain_path:
        plain = split_qk_rotary(qkv, heads, kv_heads, head_dim, cos, sin, *norms)
    for a, b in zip(fused, plain):
        assert a.shape == b.shape
        assert_same(a, b, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["gelu_pytorch_tanh", "silu"])
def test_gated_activation(plain_path, dtype, activation):
    torch.manual_seed(2)
    mlp = GatedMLP(48, 200, activation).to(dtype)
    x = torch.randn(5, 48, dtype=dtype) * 3
    fused = mlp(x)
    with plain_path:
        plain = mlp(x)
    assert_same(fused, plain, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("block_size", [4, 32])  # inside one 16-key tile, and tiles inside a block
@pytest.mark.parametrize("heads", [8, 14, 2])  # query heads per KV head: 4, 7 (4 + 3), 1
def test_decode_attention_reads_the_paged_cache_in_place(plain_path, dtype, window, block_size, heads):
    torch.manual_seed(3)
    kv_heads, head_dim = 2, 64
    shape = (40, block_size, kv_heads, head_dim)
    # NaN in every unused slot: attention must never read another sequence's or an empty slot.
    caches = [(torch.full(shape, float("nan"), dtype=dtype), torch.full(shape, float("nan"), dtype=dtype))
              for _ in range(2)]
    contexts = [1, 7, 13, 4] if block_size == 4 else [1, 40, 70, 17]  # tokens already cached, per sequence
    tables = [[3, 9, 1, 4], [0, 2], [5, 6, 7, 8], [10, 11]]
    # Fill each sequence's cached keys/values with a prefill through the plain path.
    for cache in caches:
        md = build_attention_metadata(contexts, [0] * 4, tables, block_size, "cpu")
        k = torch.randn(sum(contexts), kv_heads, head_dim, dtype=dtype)
        with plain_path:
            paged_attention(torch.randn(sum(contexts), heads, head_dim, dtype=dtype), k, torch.randn_like(k), cache,
                            md, 0.125, window)
    caches[1][0].copy_(caches[0][0])
    caches[1][1].copy_(caches[0][1])
    md = build_attention_metadata([1] * 4, contexts, tables, block_size, "cpu")
    q = torch.randn(4, heads, head_dim, dtype=dtype)
    k, v = torch.randn(4, kv_heads, head_dim, dtype=dtype), torch.randn(4, kv_heads, head_dim, dtype=dtype)
    reference_cache = tuple(c.float() for c in caches[1])
    fused = paged_attention(q, k, v, caches[0], md, 0.125, window)
    with plain_path:
        plain = paged_attention(q, k, v, caches[1], md, 0.125, window)
        reference = paged_attention(q.float(), k.float(), v.float(), reference_cache, md, 0.125, window)
    assert not fused.isnan().any()
    if dtype == torch.float32:
        assert_same(fused, plain, dtype)
    else:  # SDPA rounds its probabilities to bf16; the kernel keeps them in float32: no less accurate
        fused_error = (fused.float() - reference).abs().max()
        plain_error = (plain.float() - reference).abs().max()
        assert fused_error <= plain_error * 1.01 + 1e-6, (fused_error, plain_error)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_linear_matches_the_dequantized_matmul(dtype, rows, with_bias):
    from tokenmill.models.quantize import Int8WeightOnlyLinear

    torch.manual_seed(rows)
    out_features, in_features = 203, 640  # a tail after the blocks of 8 output rows
    linear = Int8WeightOnlyLinear(torch.randn(out_features, in_features),
                                  torch.randn(out_features) if with_bias else None)
    if with_bias:
        linear.bias.data = linear.bias.data.to(dtype)
    x = torch.randn(rows, in_features).to(dtype)
    x[0, :] = 0.0  # an all-zero row has no scale of its own
    reference = x.double() @ linear.dequantized(torch.float64).T
    if with_bias:
        reference += linear.bias.double()
    out = torch.ops.tokenmill.int8_linear(x, linear.weight_int8, linear.scales, linear.bias)
    assert out.dtype == dtype and out.shape == (rows, out_features)
    # Quantizing each activation row to int16 costs at most 1/65534 of its largest value
    # per element: on the sum, about 1e-5 of the largest output here, on top of the
    # bf16 rounding of the output in bf16.
    rounding = 2**-8 if dtype == torch.bfloat16 else 0.0
    error = (out.double() - reference).abs()
    assert bool((error <= reference.abs() * rounding + 1e-4 * reference.abs().max()).all())
    assert bool((out[0] == (linear.bias if with_bias else 0)).all())  # the zero row: the bias alone
    if rows <= linear.fused_rows:
        assert torch.equal(linear(x), out)


def test_int8_linear_rejects_bad_inputs():
    weight = torch.zeros(8, 640, dtype=torch.int8)
    scales = torch.ones(8)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch.ops.tokenmill.int8_linear(torch.zeros(1, 48), torch.zeros(8, 48, dtype=torch.int8), scales, None)
    with pytest.raises(RuntimeError, match="int8"):
        torch.ops.tokenmill.int8_linear(torch.zeros(1, 640), weight.float(), scales, None)
    with pytest.raises(RuntimeError, match="scale"):
        torch.ops.tokenmill.int8_linear(torch.zeros(1, 640), weight, torch.ones(7), None)


def test_int8_layer_falls_back_for_inputs_wider_than_the_kernel_sums(plain_path):
    from tokenmill.models.quantize import INT8_FUSED_MAX_IN, Int8WeightOnlyLinear

    linear = Int8WeightOnlyLinear(torch.randn(16, INT8_FUSED_MAX_IN + 32))
    x = torch.randn(1, INT8_FUSED_MAX_IN + 32)
    with plain_path:
        expected = linear(x)
    assert torch.equal(linear(x), expected)  # PyTorch's kernel, not a failed check in the fused one


def test_int8_layer_uses_the_kernel_only_for_few_rows(plain_path):
    from tokenmill.models.quantize import Int8WeightOnlyLinear

    torch.manual_seed(0)
    linear = Int8WeightOnlyLinear(torch.randn(64, 640))
    x = torch.randn(4, 640).bfloat16()
    fused = linear(x)
    with plain_path:
        plain = linear(x)  # PyTorch's int8 kernel
    error = (fused.float() - plain.float()).abs()
    assert bool((error <= plain.float().abs() * 2**-7 + 1e-4 * plain.float().abs().max()).all())
    many = torch.randn(linear.fused_rows + 1, 640).bfloat16()
    with plain_path:
        expected = linear(many)
    assert torch.equal(linear(many), expected)  # above fused_rows: the same path either way


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_writes_strided_rows_into_their_slots(dtype):
    qkv = torch.randn(5, 3 * 2 * 8, dtype=dtype)  # k and v as strided views of a fused projection
    k = qkv[:, 16:32].view(5, 2, 8)
    v = qkv[:, 32:48].view(5, 2, 8)
    caches = [torch.zeros(4, 4, 2, 8, dtype=dtype) for _ in range(2)]
    slots = torch.tensor([0, 5, 6, 15, 9])
    torch.ops.tokenmill.store_kv(k, v, caches[0], caches[1], slots)
    expected = [torch.zeros(16, 2, 8, dtype=dtype) for _ in range(2)]
    expected[0][slots] = k
    expected[1][slots] = v
    assert torch.equal(caches[0].view(16, 2, 8), expected[0])
    assert torch.equal(caches[1].view(16, 2, 8), expected[1])
    with pytest.raises(RuntimeError, match="slot out of range"):
        torch.ops.tokenmill.store_kv(k, v, caches[0], caches[1], torch.tensor([0, 1, 2, 3, 16]))
