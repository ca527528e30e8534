"""`tokenmill plan --calibrate RESULTS`: fit a device's efficiency factors to a
measured concurrency sweep and report predicted against measured.

Accepted inputs (JSON):
1. A `tokenmill bench --out` document: closed-loop runs under `runs[*]` with
   `load.concurrency` and a `summary` holding `output_throughput` (tokens/s),
   `ttft_ms.p50`, `tpot_ms.p50`, `prompt_tokens.mean` and `output_tokens.mean`.
   Open-loop runs (`load.request_rate`) and runs without completed requests are skipped.
2. A list of points, or `{"points": [...]}`, each
   `{"concurrency": 8, "output_tokens_per_s": 41.5, "input_tokens": 128,
     "output_tokens": 64, "ttft_p50_s": 0.9, "tpot_p50_s": 0.16}`
   (`ttft_p50_s` and `tpot_p50_s` optional).

The fit minimizes the squared log error of aggregate output tokens/s (and, at
half weight, of TPOT where measured) over the four factors of `Efficiency`, by
Nelder-Mead from a few starting points; a faint pull toward the defaults keeps
the factors identifiable when the sweep cannot tell them apart.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenmill.planner.catalog import Device, ModelSpec, Precision
from tokenmill.planner.efficiency import Efficiency
from tokenmill.planner.errors import PlanError
from tokenmill.planner.performance import Workload, build_roofline, load_point

POINT_FORMAT = ('a tokenmill bench --out document, or a JSON list of {"concurrency", "output_tokens_per_s", '
                '"input_tokens", "output_tokens", "ttft_p50_s", "tpot_p50_s"} objects')


@dataclass(frozen=True)
class MeasuredPoint:
    concurrency: int
    output_tokens_per_s: float
    input_tokens: float
    output_tokens: float
    ttft_p50_s: float | None = None
    tpot_p50_s: float | None = None


def _number(value, where: str, key: str, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise PlanError(f"{where}: {key} must be a positive number, got {value!r} (expected {POINT_FORMAT})")
    return float(value)


def _stat(summary: dict, key: str, stat: str) -> float | None:
    values = summary.get(key)
    return values.get(stat) if isinstance(values, dict) else None


def points_from_bench(document: dict, origin: str) -> tuple[list[MeasuredPoint], list[str]]:
    """Closed-loop runs of a `tokenmill bench` document, and why others were skipped."""
    points, skipped = [], []
    for index, run in enumerate(document.get("runs") or []):
        load, summary = run.get("load") or {}, run.get("summary") or {}
        where = f"{origin}: runs[{index}]"
        if load.get("request_rate") is not None or "concurrency" not in load:
            skipped.append(f"runs[{index}] is open-loop (request rate), not a concurrency point")
            continue
        if not summary.get("completed"):
            skipped.append(f"runs[{index}] (concurrency {load.get('concurrency')}) completed no request")
            continue
        ttft, tpot = _stat(summary, "ttft_ms", "p50"), _stat(summary, "tpot_ms", "p50")
        completed = summary["completed"]
        # Means per request; the totals stand in when a server reported no per-request counts.
        prompt = _stat(summary, "prompt_tokens", "mean") or (summary.get("total_prompt_tokens") or 0) / completed
        output = _stat(summary, "output_tokens", "mean") or (summary.get("total_output_tokens") or 0) / completed
        points.append(MeasuredPoint(
            concurrency=int(_number(load["concurrency"], where, "load.concurrency")),
            output_tokens_per_s=_number(summary.get("output_throughput"), where, "summary.output_throughput"),
            input_tokens=_number(prompt, where, "summary.prompt_tokens.mean"),
            output_tokens=_number(output, where, "summary.output_tokens.mean"),
            ttft_p50_s=None if ttft is None else ttft / 1e3, tpot_p50_s=None if tpot is None else tpot / 1e3))
    return points, skipped


def points_from_list(items: list, origin: str) -> list[MeasuredPoint]:
    points = []
    for index, item in enumerate(items):
        where = f"{origin}: point {index}"
        if not isinstance(item, dict):
            raise PlanError(f"{where}: expected an object ({POINT_FORMAT})")
        points.append(MeasuredPoint(
            concurrency=int(_number(item.get("concurrency"), where, "concurrency")),
            output_tokens_per_s=_number(item.get("output_tokens_per_s"), where, "output_tokens_per_s"),
            input_tokens=_number(item.get("input_tokens"), where, "input_tokens"),
            output_tokens=_number(item.get("output_tokens"), where, "output_tokens"),
            ttft_p50_s=_number(item.get("ttft_p50_s"), where, "ttft_p50_s", optional=True),
            tpot_p50_s=_number(item.get("tpot_p50_s"), where, "tpot_p50_s", optional=True)))
    return points


def read_measurements(path: str | Path) -> tuple[list[MeasuredPoint], list[str]]:
    """The sweep points of a results file (either format), sorted by concurrency."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise PlanError(f"cannot read {path}: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise PlanError(f"{path}: not valid JSON ({error.msg}); expected {POINT_FORMAT}") from None
    skipped: list[str] = []
    if isinstance(document, dict) and "runs" in document:
        points, skipped = points_from_bench(document, str(path))
    elif isinstance(document, dict) and isinstance(document.get("points"), list):
        points = points_from_list(document["points"], str(path))
    elif isinstance(document, list):
        points = points_from_list(document, str(path))
    else:
        raise PlanError(f"{path}: expected {POINT_FORMAT}")
    if not points:
        raise PlanError(f"{path}: no usable concurrency points ({'; '.join(skipped) or 'empty'})")
    return sorted(points, key=lambda point: point.concurrency), skipped


@dataclass(frozen=True)
class CalibrationRow:
    concurrency: int
    measured_tokens_per_s: float
    predicted_tokens_per_s: float
    measured_ttft_s: float | None
    predicted_ttft_s: float
    measured_tpot_s: float | None
    predicted_tpot_s: float

    @property
    def tokens_per_s_error(self) -> float:
        """(predicted - measured) / measured."""
        return self.predicted_tokens_per_s / self.measured_tokens_per_s - 1

    @property
    def ttft_error(self) -> float | None:
        return None if self.measured_ttft_s is None else self.predicted_ttft_s / self.measured_ttft_s - 1

    @property
    def tpot_error(self) -> float | None:
        return None if self.measured_tpot_s is None else self.predicted_tpot_s / self.measured_tpot_s - 1


@dataclass(frozen=True)
class Calibration:
    efficiency: Efficiency
    rows: tuple[CalibrationRow, ...]
    skipped: tuple[str, ...] = ()

    @property
    def worst_tokens_per_s_error(self) -> float:
        return max(abs(row.tokens_per_s_error) for row in self.rows)

    @property
    def at_bound(self) -> bool:
        """True when a factor ended at its ceiling: the device measured faster than its profile allows."""
        return max(self.efficiency.bandwidth, self.efficiency.compute) >= _EFFICIENCY_CEILING * 0.999


def predict_rows(model: ModelSpec, precision: Precision, device: Device, tensor_parallel: int, kv_bytes: int,
                 efficiency: Efficiency, points: Sequence[MeasuredPoint]) -> tuple[CalibrationRow, ...]:
    roofline = build_roofline(model, precision, device, tensor_parallel, kv_bytes, efficiency)
    rows = []
    for point in points:
        workload = Workload(max(round(point.input_tokens), 0), max(round(point.output_tokens), 1))
        predicted = load_point(roofline, workload, point.concurrency)
        rows.append(CalibrationRow(point.concurrency, point.output_tokens_per_s, predicted.output_tokens_per_s,
                                   point.ttft_p50_s, predicted.ttft_seconds, point.tpot_p50_s,
                                   predicted.tpot_seconds))
    return tuple(rows)


def nelder_mead(objective: Callable[[list[float]], float], start: Sequence[float], step: float = 0.5,
                iterations: int = 400, tolerance: float = 1e-10) -> tuple[list[float], float]:
    """Minimize `objective` from `start` (the textbook simplex method; deterministic)."""
    simplex = [list(start)] + [[value + (step if i == j else 0.0) for j, value in enumerate(start)]
                               for i in range(len(start))]
    scores = [objective(vertex) for vertex in simplex]
    for _ in range(iterations):
        order = sorted(range(len(simplex)), key=scores.__getitem__)
        simplex, scores = [simplex[i] for i in order], [scores[i] for i in order]
        if scores[-1] - scores[0] < tolerance:
            break
        centroid = [sum(vertex[j] for vertex in simplex[:-1]) / (len(simplex) - 1) for j in range(len(start))]
        worst = simplex[-1]

        def toward(factor: float, centroid=centroid, worst=worst) -> list[float]:
            """The point `factor` of the way from the centroid to the worst vertex (negative: past the centroid)."""
            return [c + factor * (w - c) for c, w in zip(centroid, worst)]

        reflected = toward(-1.0)
        reflected_score = objective(reflected)
        if reflected_score < scores[0]:
            expanded = toward(-2.0)
            expanded_score = objective(expanded)
            simplex[-1], scores[-1] = (expanded, expanded_score) if expanded_score < reflected_score else (
                reflected, reflected_score)
        elif reflected_score < scores[-2]:
            simplex[-1], scores[-1] = reflected, reflected_score
        else:
            contracted = toward(0.5)
            contracted_score = objective(contracted)
            if contracted_score < scores[-1]:
                simplex[-1], scores[-1] = contracted, contracted_score
            else:
                best = simplex[0]
                simplex = [best] + [[b + 0.5 * (v - b) for b, v in zip(best, vertex)] for vertex in simplex[1:]]
                scores = [scores[0]] + [objective(vertex) for vertex in simplex[1:]]
    best = min(range(len(simplex)), key=scores.__getitem__)
    return simplex[best], scores[best]


# Parameters are searched as logarithms: efficiencies and overheads stay positive.
_EFFICIENCY_CEILING = 1.5
_OVERHEAD_FLOOR_S = 1e-7
_PRIOR_WEIGHT = 1e-3


def _efficiency(parameters: Sequence[float]) -> Efficiency | None:
    bandwidth, compute = math.exp(parameters[0]), math.exp(parameters[1])
    if bandwidth > _EFFICIENCY_CEILING or compute > _EFFICIENCY_CEILING:
        return None
    return Efficiency(bandwidth, compute, max(math.exp(parameters[2]) - _OVERHEAD_FLOOR_S, 0.0),
                      max(math.exp(parameters[3]) - _OVERHEAD_FLOOR_S, 0.0))


def calibrate(model: ModelSpec, precision: Precision, device: Device, tensor_parallel: int, kv_bytes: int,
              points: Sequence[MeasuredPoint], skipped: Sequence[str] = ()) -> Calibration:
    """Fit `Efficiency` to `points`; rows compare the fitted predictions with the measurements."""
    if not points:
        raise PlanError("calibration needs at least one measured point")
    default = Efficiency()

    def objective(parameters: list[float]) -> float:
        efficiency = _efficiency(parameters)
        if efficiency is None:
            return 1e9
        rows = predict_rows(model, precision, device, tensor_parallel, kv_bytes, efficiency, points)
        error = sum(math.log(row.predicted_tokens_per_s / row.measured_tokens_per_s) ** 2 for row in rows)
        error += 0.5 * sum(math.log(row.predicted_tpot_s / row.measured_tpot_s) ** 2
                           for row in rows if row.measured_tpot_s is not None)
        prior = (math.log(efficiency.bandwidth / default.bandwidth) ** 2
                 + math.log(efficiency.compute / default.compute) ** 2)
        return error + _PRIOR_WEIGHT * prior

    best, best_score = None, float("inf")
    floor = math.log(_OVERHEAD_FLOOR_S)
    # A few starts, because the max() of the rooflines makes the error surface kinked.
    for bandwidth in (0.7, 0.1):
        for compute in (0.5, 0.1):
            for overhead in (floor, math.log(1e-2)):
                start = [math.log(bandwidth), math.log(compute), overhead, floor]
                parameters, score = nelder_mead(objective, start)
                parameters, score = nelder_mead(objective, parameters, step=0.1)
                if score < best_score:
                    best, best_score = parameters, score
    efficiency = _efficiency(best)
    rows = predict_rows(model, precision, device, tensor_parallel, kv_bytes, efficiency, points)
    return Calibration(efficiency, rows, tuple(skipped))


def render_calibration(calibration: Calibration, title: str) -> str:
    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value * 1e3:,.0f}"

    def error(value: float | None) -> str:
        return "-" if value is None else f"{value:+.0%}"

    header = ("concurrency", "measured tok/s", "predicted", "error", "TTFT p50 ms", "predicted", "error",
              "TPOT p50 ms", "predicted", "error")
    rows = [(str(row.concurrency), f"{row.measured_tokens_per_s:,.1f}", f"{row.predicted_tokens_per_s:,.1f}",
             error(row.tokens_per_s_error), seconds(row.measured_ttft_s), seconds(row.predicted_ttft_s),
             error(row.ttft_error), seconds(row.measured_tpot_s), seconds(row.predicted_tpot_s), error(row.tpot_error))
            for row in calibration.rows]
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]
    lines = [title, f"fitted efficiency: {calibration.efficiency.describe()}", "",
             "  ".join(cell.rjust(width) for cell, width in zip(header, widths))]
    lines += ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.append("")
    lines.append(f"largest aggregate tokens/s error: {calibration.worst_tokens_per_s_error:.1%}")
    if calibration.at_bound:
        lines.append("warning: a factor reached its ceiling (1.5): the sweep is faster than this device, model and "
                     "precision allow; check --gpu, --model and --precision")
    lines += [f"skipped: {reason}" for reason in calibration.skipped]
    return "\n".join(lines)


def calibration_to_dict(calibration: Calibration) -> dict:
    return {"efficiency": calibration.efficiency.as_dict(),
            "worst_tokens_per_s_error": calibration.worst_tokens_per_s_error, "at_bound": calibration.at_bound,
            "points": [{"concurrency": row.concurrency, "measured_tokens_per_s": row.measured_tokens_per_s,
                        "predicted_tokens_per_s": row.predicted_tokens_per_s,
                        "tokens_per_s_error": row.tokens_per_s_error, "measured_ttft_s": row.measured_ttft_s,
                        "predicted_ttft_s": row.predicted_ttft_s, "ttft_error": row.ttft_error,
                        "measured_tpot_s": row.measured_tpot_s, "predicted_tpot_s": row.predicted_tpot_s,
                        "tpot_error": row.tpot_error} for row in calibration.rows],
            "skipped": list(calibration.skipped)}
