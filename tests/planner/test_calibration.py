"""Calibration: reading sweeps (tokenmill bench documents and plain point lists) and fitting the factors."""
import json

import pytest

from tokenmill.planner.calibration import (
    MeasuredPoint,
    calibrate,
    nelder_mead,
    predict_rows,
    read_measurements,
    render_calibration,
)
from tokenmill.planner.catalog import builtin_catalog
from tokenmill.planner.efficiency import Efficiency
from tokenmill.planner.errors import PlanError

CATALOG = builtin_catalog()
GEMMA, FP32, CPU = CATALOG.model("gemma-3-270m"), CATALOG.precision("fp32"), CATALOG.device("cpu")
CONCURRENCIES = (1, 2, 4, 8, 16, 32)


def synthetic_points(efficiency: Efficiency, input_tokens=128, output_tokens=64):
    """A sweep the model itself predicts for `efficiency`: a fit must recover its numbers."""
    blank = [MeasuredPoint(c, 1.0, input_tokens, output_tokens) for c in CONCURRENCIES]
    rows = predict_rows(GEMMA, FP32, CPU, 1, 4, efficiency, blank)
    return [MeasuredPoint(row.concurrency, row.predicted_tokens_per_s, input_tokens, output_tokens,
                          row.predicted_ttft_s, row.predicted_tpot_s) for row in rows]


def bench_document(points, extra_runs=()):
    """The shape `tokenmill bench --out` writes: runs[*].load and runs[*].summary (latencies in ms)."""
    runs = [{"load": {"concurrency": p.concurrency},
             "summary": {"completed": 10, "output_throughput": p.output_tokens_per_s,
                         "ttft_ms": {"p50": p.ttft_p50_s * 1e3}, "tpot_ms": {"p50": p.tpot_p50_s * 1e3},
                         "prompt_tokens": {"mean": p.input_tokens}, "output_tokens": {"mean": p.output_tokens},
                         "decode_tps_per_user": {"p50": 1 / p.tpot_p50_s}}} for p in points]
    return {"tool": "tokenmill bench", "config": {}, "runs": runs + list(extra_runs)}


def test_nelder_mead_finds_a_quadratic_minimum():
    best, score = nelder_mead(lambda x: (x[0] - 1) ** 2 + 10 * (x[1] + 2) ** 2, [0.0, 0.0])
    assert best == pytest.approx([1, -2], abs=1e-3) and score < 1e-6


@pytest.mark.parametrize("truth", [Efficiency(0.4, 0.3, 0.02, 0.001), Efficiency(0.9, 0.6, 0.0, 0.0),
                                   Efficiency(0.2, 0.1, 0.3, 0.0)])
def test_fit_recovers_a_sweep_the_model_made(truth):
    points = synthetic_points(truth)
    calibration = calibrate(GEMMA, FP32, CPU, 1, 4, points)
    assert calibration.worst_tokens_per_s_error < 0.02
    for row in calibration.rows:
        assert row.tpot_error == pytest.approx(0, abs=0.03)
    assert not calibration.at_bound


def test_bench_document(tmp_path):
    points = synthetic_points(Efficiency(0.5, 0.3, 0.01, 0.0))
    open_loop = {"load": {"request_rate": 2.0}, "summary": {"completed": 5}}
    empty = {"load": {"concurrency": 64}, "summary": {"completed": 0}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(bench_document(points, [open_loop, empty])))
    read, skipped = read_measurements(path)
    assert [p.concurrency for p in read] == list(CONCURRENCIES)
    assert read[0].ttft_p50_s == pytest.approx(points[0].ttft_p50_s)
    assert read[0].input_tokens == 128 and read[0].output_tokens == 64
    assert len(skipped) == 2 and "open-loop" in skipped[0] and "completed no request" in skipped[1]


@pytest.mark.parametrize("wrap", [lambda items: items, lambda items: {"points": items}])
def test_point_list(tmp_path, wrap):
    items = [{"concurrency": 4, "output_tokens_per_s": 20.0, "input_tokens": 100, "output_tokens": 50},
             {"concurrency": 1, "output_tokens_per_s": 8.0, "input_tokens": 100, "output_tokens": 50,
              "ttft_p50_s": 0.5, "tpot_p50_s": 0.1}]
    path = tmp_path / "points.json"
    path.write_text(json.dumps(wrap(items)))
    points, skipped = read_measurements(path)
    assert [p.concurrency for p in points] == [1, 4] and not skipped
    assert points[1].tpot_p50_s is None


@pytest.mark.parametrize("content, message", [
    ("not json", "not valid JSON"),
    ('{"something": 1}', "expected a tokenmill bench --out document"),
    ('[{"concurrency": 1}]', "output_tokens_per_s must be a positive number"),
    ('{"runs": []}', "no usable concurrency points"),
])
def test_bad_measurement_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(PlanError, match=message):
        read_measurements(path)


def test_report_flags_a_sweep_faster_than_the_device():
    impossible = [MeasuredPoint(c, 1e6 * c, 128, 64) for c in (1, 2, 4)]
    calibration = calibrate(GEMMA, FP32, CPU, 1, 4, impossible)
    assert calibration.at_bound
    text = render_calibration(calibration, "title")
    assert "warning: a factor reached its ceiling" in text and "largest aggregate tokens/s error" in text
