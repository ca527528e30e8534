"""Weights, KV bytes, KV capacity and the sequences that fit: the formulas of docs/planner.md."""
import pytest

from tokenmill.planner.catalog import builtin_catalog
from tokenmill.planner.errors import PlanError
from tokenmill.planner.memory import (
    GB,
    MemoryOptions,
    kv_bytes_per_token,
    plan_memory,
    smallest_fitting_tensor_parallel,
    weight_bytes,
    weight_bytes_for,
    weight_bytes_read_per_step,
)

CATALOG = builtin_catalog()
MISTRAL = CATALOG.model("mistral-7b")
GEMMA = CATALOG.model("gemma-3-270m")


def test_effective_bits_include_group_scales():
    awq = CATALOG.precision("int4-awq")
    assert awq.effective_bits == pytest.approx(4 + 20 / 128)
    assert CATALOG.precision("bf16").effective_bits == 16


def test_quantized_formats_keep_embedding_and_head_at_16_bits():
    awq = CATALOG.precision("int4-awq")
    head = MISTRAL.head_parameters
    assert head == 2 * 32768 * 4096  # untied: embedding and LM head
    expected = (MISTRAL.parameters - head) * (4 + 20 / 128) / 8 + head * 2
    assert weight_bytes(MISTRAL, awq) == pytest.approx(expected)


def test_tied_embeddings_are_stored_once():
    assert GEMMA.head_parameters == 262144 * 640
    assert weight_bytes(GEMMA, CATALOG.precision("fp32")) == GEMMA.parameters * 4


def test_weight_bytes_for_without_embeddings_is_plain_bits():
    assert weight_bytes_for(1e9, 0, CATALOG.precision("fp8")) == pytest.approx(1e9)


def test_gguf_precision_needs_a_gguf_model():
    with pytest.raises(PlanError, match="needs a .gguf file"):
        weight_bytes(MISTRAL, CATALOG.precision("gguf-file"))


def test_decode_reads_all_weights_but_the_untied_embedding_table():
    bf16 = CATALOG.precision("bf16")
    assert weight_bytes_read_per_step(MISTRAL, bf16) == pytest.approx(
        weight_bytes(MISTRAL, bf16) - MISTRAL.embedding_parameters * 2)
    # Tied: the one matrix is the LM head too, read every step.
    assert weight_bytes_read_per_step(GEMMA, bf16) == weight_bytes(GEMMA, bf16)


@pytest.mark.parametrize("model, kv_bytes, expected", [
    ("mistral-7b", 2, 2 * 32 * 8 * 128 * 2),
    ("llama-2-7b", 2, 2 * 32 * 32 * 128 * 2),
    ("llama-3-70b", 2, 2 * 80 * 8 * 128 * 2),
    ("gemma-3-270m", 4, 2 * 18 * 1 * 256 * 4),
])
def test_kv_bytes_per_token(model, kv_bytes, expected):
    assert kv_bytes_per_token(CATALOG.model(model), kv_bytes) == expected


def test_kv_capacity_and_sequences():
    options = MemoryOptions()
    memory = plan_memory(MISTRAL, CATALOG.precision("bf16"), CATALOG.device("rtx-4090"), 1, 700, 2, options)
    weights = MISTRAL.parameters * 2
    assert memory.usable_bytes == pytest.approx((24 * 0.9 - 1.0) * GB)
    assert memory.kv_capacity_bytes == pytest.approx((24 * 0.9 - 1.0) * GB - weights)
    assert memory.kv_capacity_tokens == int(memory.kv_capacity_bytes // 131072)
    assert memory.tokens_per_sequence == 704  # 700 in whole 16-token blocks
    assert memory.max_concurrent_sequences == (memory.kv_capacity_tokens // 16) // 44
    assert memory.fits


def test_max_num_seqs_caps_sequences():
    memory = plan_memory(MISTRAL, CATALOG.precision("int4-awq"), CATALOG.device("h200"), 1, 700, 2,
                         MemoryOptions(max_num_seqs=64))
    assert memory.max_concurrent_sequences == 64


def test_fixed_kv_pool():
    memory = plan_memory(GEMMA, CATALOG.precision("fp32"), CATALOG.device("cpu"), 1, 256, 4,
                         MemoryOptions(kv_cache_gb=2 * 2**30 / GB))
    assert memory.kv_capacity_bytes == pytest.approx(2 * 2**30)
    assert memory.kv_capacity_tokens == 2 * 2**30 // (2 * 18 * 256 * 4)


def test_tensor_parallel_splits_weights_over_devices():
    seventy, bf16, h100 = CATALOG.model("llama-3-70b"), CATALOG.precision("bf16"), CATALOG.device("h100")
    assert not plan_memory(seventy, bf16, h100, 1, 700, 2, MemoryOptions()).fits
    two = plan_memory(seventy, bf16, h100, 2, 700, 2, MemoryOptions())
    assert two.fits and two.usable_bytes == pytest.approx(2 * 71 * GB)
    assert smallest_fitting_tensor_parallel(seventy, bf16, h100, 700, 2, MemoryOptions()) == 2
    assert smallest_fitting_tensor_parallel(seventy, bf16, CATALOG.device("rtx-4090"), 700, 2,
                                            MemoryOptions()) == 8


@pytest.mark.parametrize("options", [dict(gpu_memory_utilization=0), dict(gpu_memory_utilization=1.2),
                                     dict(runtime_reserve_gb=-1), dict(kv_cache_gb=0), dict(block_size=0)])
def test_memory_options_are_validated(options):
    with pytest.raises(PlanError):
        MemoryOptions(**options)
