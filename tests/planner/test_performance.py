"""Rooflines: single-stream decode, batched throughput, per-user speed, capacity at a target speed."""
import pytest

from tokenmill.planner.catalog import builtin_catalog
from tokenmill.planner.efficiency import Efficiency, parse_efficiency
from tokenmill.planner.errors import PlanError
from tokenmill.planner.memory import GB
from tokenmill.planner.performance import (
    Workload,
    build_roofline,
    compute_type,
    load_point,
    max_concurrency_at_speed,
    single_stream_tokens_per_s,
)

CATALOG = builtin_catalog()
MISTRAL, BF16, RTX4090 = CATALOG.model("mistral-7b"), CATALOG.precision("bf16"), CATALOG.device("rtx-4090")
WORKLOAD = Workload(500, 200)


def roofline(efficiency=None, device=RTX4090, precision=BF16, tensor_parallel=1):
    return build_roofline(MISTRAL, precision, device, tensor_parallel, 2, efficiency or Efficiency())


def test_single_stream_is_bandwidth_over_bytes_per_step():
    line = roofline(Efficiency(bandwidth=0.7))
    read = (MISTRAL.parameters - MISTRAL.embedding_parameters) * 2 + 600 * 131072
    assert single_stream_tokens_per_s(line, WORKLOAD) == pytest.approx(0.7 * 1008 * GB / read)


def test_batched_decode_is_the_minimum_of_the_two_rooflines():
    line = roofline()
    for batch in (1, 8, 64, 256):
        bandwidth_bound = batch / line.memory_seconds(batch, 600)
        compute_bound = batch / line.compute_seconds(batch, 600)
        assert batch / line.step_seconds(batch, 600) == pytest.approx(min(bandwidth_bound, compute_bound))
    assert line.bound(1, 600) == "memory bandwidth"
    assert line.bound(4096, 600) == "compute"


def test_overheads_add_to_every_step():
    plain = roofline()
    slow = roofline(Efficiency(step_overhead_s=0.01, sequence_overhead_s=0.001))
    assert slow.step_seconds(8, 600) == pytest.approx(plain.step_seconds(8, 600) + 0.01 + 8 * 0.001)


def test_tensor_parallel_multiplies_bandwidth_and_compute():
    one, two = roofline(), roofline(tensor_parallel=2)
    assert two.bandwidth_bytes_per_s == 2 * one.bandwidth_bytes_per_s
    assert two.flops_per_s == 2 * one.flops_per_s


def test_closed_loop_round():
    """B streams, each I in and O out: a round is O steps plus B prefills."""
    line = roofline()
    point = load_point(line, WORKLOAD, 16)
    step, prefill = line.step_seconds(16, WORKLOAD.average_context), line.prefill_seconds(500)
    assert point.output_tokens_per_s == pytest.approx(16 * 200 / (200 * step + 16 * prefill))
    assert point.tpot_seconds == pytest.approx(step + 15 * prefill / 200)
    assert point.per_user_tokens_per_s == pytest.approx(1 / point.tpot_seconds)


def test_per_user_speed_falls_and_throughput_rises_with_concurrency():
    line = roofline()
    points = [load_point(line, WORKLOAD, batch) for batch in (1, 2, 4, 8, 16, 32, 64)]
    speeds = [point.per_user_tokens_per_s for point in points]
    totals = [point.output_tokens_per_s for point in points]
    assert speeds == sorted(speeds, reverse=True)
    assert totals == sorted(totals)


def test_capacity_search_matches_brute_force():
    line = roofline()
    for target in (10, 20, 40, 45):
        expected = max((batch for batch in range(1, 257)
                        if load_point(line, WORKLOAD, batch).per_user_tokens_per_s >= target), default=0)
        assert max_concurrency_at_speed(line, WORKLOAD, target, 256) == expected
    assert max_concurrency_at_speed(line, WORKLOAD, 1000, 256) == 0


def test_compute_type_falls_back_to_bf16_without_fp8():
    fp8 = CATALOG.precision("fp8")
    assert compute_type(fp8, CATALOG.device("h100")) == "fp8"
    assert compute_type(fp8, CATALOG.device("a100")) == "bf16"
    assert compute_type(CATALOG.precision("fp32"), CATALOG.device("cpu")) == "fp32"


def test_efficiency_text_round_trips():
    efficiency = parse_efficiency("bandwidth=0.8,compute=0.3,step_overhead_ms=2,sequence_overhead_ms=0.5")
    assert efficiency == Efficiency(0.8, 0.3, 0.002, 0.0005)
    assert parse_efficiency(efficiency.describe()) == efficiency
    assert parse_efficiency("compute=0.2").bandwidth == Efficiency().bandwidth


@pytest.mark.parametrize("text", ["bandwidth", "speed=2", "bandwidth=0", "bandwidth=2", "step_overhead_ms=-1",
                                  "compute=fast"])
def test_bad_efficiency_text(text):
    with pytest.raises(PlanError):
        parse_efficiency(text)
