"""PNG charts of a bench result (matplotlib, Agg backend), one file per chart:

- `throughput.png`: output tokens/s, requests/s and goodput against the swept
  parameter (concurrency, or request rate for rate sweeps);
- `latency_percentiles.png`: p50/p95/p99 of TTFT, ITL, TPOT and E2E against it;
- `ttft_cdf.png`: the TTFT distribution of every run;
- `itl_over_time.png`: every per-token ITL sample at its arrival time in its run.
"""
from __future__ import annotations

import math
from pathlib import Path

from tokenmill.bench.execute import BenchResult, RunResult


def _x_axis(runs: list[RunResult]) -> tuple[str, list[float]]:
    if runs and all(run.load.request_rate is not None for run in runs):
        return "request rate (req/s)", [run.load.request_rate for run in runs]
    return "concurrency", [run.load.concurrency for run in runs]


def _label(run: RunResult) -> str:
    return ", ".join(f"{key}={value:g}" for key, value in run.load.label().items())


def _legend(axis, **options) -> None:
    if axis.get_legend_handles_labels()[0]:  # an empty legend only earns a warning
        axis.legend(**options)


def write_plots(result: BenchResult, directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    runs = list(result.runs)
    if runs and all(run.load.request_rate is None for run in runs):
        runs.sort(key=lambda run: run.load.concurrency)
    x_name, xs = _x_axis(runs)
    xs = [x if not math.isinf(x) else float("nan") for x in xs]
    title = f"{result.server.model} at {result.config.base_url} ({result.config.endpoint})"
    written = []

    def save(figure, name: str) -> None:
        figure.suptitle(title, fontsize=9)
        figure.tight_layout()
        path = directory / name
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)

    finite = [x for x in xs if x == x and x > 0]
    spread_out = len(finite) > 2 and max(finite) / min(finite) >= 8

    def x_scale(axis) -> None:
        if spread_out:  # sweeps usually double: 1, 2, 4, ... reads best on a log axis
            axis.set_xscale("log", base=2)

    def series(key: str, stat: str) -> list[float]:
        return [run.summary[key][stat] if run.summary[key] else float("nan") for run in runs]

    figure, (tokens_axis, requests_axis) = plt.subplots(1, 2, figsize=(10, 4))
    tokens_axis.plot(xs, [run.summary["output_throughput"] for run in runs], marker="o")
    tokens_axis.set(xlabel=x_name, ylabel="output tokens/s", title="Output throughput")
    x_scale(tokens_axis)
    requests_axis.plot(xs, [run.summary["request_throughput"] for run in runs], marker="o", label="requests/s")
    if any(run.summary["goodput"] is not None for run in runs):
        requests_axis.plot(xs, [run.summary["goodput"] if run.summary["goodput"] is not None else float("nan")
                                for run in runs], marker="s", label="goodput (met every SLO)")
    requests_axis.set(xlabel=x_name, ylabel="requests/s", title="Requests")
    x_scale(requests_axis)
    _legend(requests_axis)
    save(figure, "throughput.png")

    figure, axes = plt.subplots(2, 2, figsize=(10, 7))
    for axis, (key, name) in zip(axes.flat, (("ttft_ms", "TTFT"), ("itl_ms", "ITL per token"),
                                             ("tpot_ms", "TPOT"), ("e2e_ms", "E2E latency"))):
        for stat in ("p50", "p95", "p99"):
            axis.plot(xs, series(key, stat), marker="o", label=stat)
        axis.set(xlabel=x_name, ylabel="ms", title=name)
        x_scale(axis)
        _legend(axis)
    save(figure, "latency_percentiles.png")

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        ttfts = sorted(r.ttft * 1e3 for r in run.records if r.ttft is not None)
        if ttfts:
            axis.step(ttfts, [(i + 1) / len(ttfts) for i in range(len(ttfts))], where="post", label=_label(run))
    axis.set(xlabel="TTFT (ms)", ylabel="fraction of requests", title="TTFT CDF", ylim=(0, 1.02))
    _legend(axis, fontsize=8)
    save(figure, "ttft_cdf.png")

    figure, axis = plt.subplots(figsize=(9, 4.5))
    for run in runs:
        run_start = min((r.start for r in run.records), default=0.0)
        times, gaps = [], []
        for record in run.records:
            if not record.itl:
                continue
            arrivals = [t for t, n in zip(record.chunk_times, record.chunk_tokens) if n > 0][1:]
            carried = [n for n in record.chunk_tokens if n > 0][1:]
            position = 0
            for arrival, tokens in zip(arrivals, carried):
                times.extend([arrival - run_start] * tokens)
                gaps.extend(record.itl[position:position + tokens])
                position += tokens
        axis.scatter(times, [gap * 1e3 for gap in gaps], s=4, alpha=0.5, label=_label(run))
    axis.set(xlabel="time since the run's first request (s)", ylabel="ITL per token (ms)", title="ITL over time")
    _legend(axis, fontsize=8, markerscale=3)
    save(figure, "itl_over_time.png")
    return written
