"""Results as text tables, a JSON document and CSV rows.

JSON (`to_document`): `config`, `server` (models, whether streams carried usage
and logprobs), `unmeasured` (probe and warm-up requests and their tokens),
`runs` (per run: `load`, `summary`, for max-users probes `verdict`, and with
`include_requests` the per-request `requests`) and `max_users`. Latencies are
in milliseconds, per-request `start_s` in seconds from the run's first request;
a run's `load` is `{"concurrency": C}` for a closed loop and has a
`request_rate` (a number, or "inf" for all at once) for an open loop.

CSV (`write_csv`): one row per run, the summary flattened to
`<metric>_<stat>` columns (e.g. `ttft_ms_p95`).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import orjson

from tokenmill.bench.client import RequestRecord
from tokenmill.bench.execute import BenchResult, RunResult

DISTRIBUTIONS = (("ttft_ms", "TTFT (ms)"), ("itl_ms", "ITL per token (ms)"), ("tpot_ms", "TPOT (ms)"),
                 ("e2e_ms", "E2E (ms)"), ("decode_tps_per_user", "Decode tok/s per user"),
                 ("prompt_tokens", "Prompt tokens"), ("output_tokens", "Output tokens"))
STATS = ("mean", "std", "p50", "p90", "p95", "p99")
SCALARS = ("num_requests", "completed", "failed", "duration_s", "peak_in_flight", "request_throughput",
           "output_throughput", "total_token_throughput", "goodput", "slo_met", "slo_attainment",
           "total_prompt_tokens", "total_output_tokens")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def record_to_dict(record: RequestRecord, run_start: float) -> dict:
    return {
        "index": record.index,
        "start_s": record.start - run_start,
        "ok": record.ok,
        "failure": record.failure,
        "failure_detail": record.failure_detail,
        "finish_reason": record.finish_reason,
        "max_tokens": record.spec.max_tokens,
        "prompt_tokens": record.prompt_tokens,
        "prompt_tokens_source": record.prompt_tokens_source,
        "output_tokens": record.output_tokens,
        "output_tokens_source": record.output_tokens_source,
        "ttft_ms": _ms(record.ttft),
        "e2e_ms": _ms(record.e2e),
        "tpot_ms": _ms(record.tpot),
        "meets_slo": record.meets_slo,
        "chunk_tokens_source": record.chunk_tokens_source,
        "chunk_offsets_ms": [(t - record.start) * 1e3 for t in record.chunk_times],
        "chunk_tokens": record.chunk_tokens,
        "itl_ms": [gap * 1e3 for gap in record.itl] if record.itl is not None else None,
    }


def _config_to_dict(result: BenchResult) -> dict:
    config = result.config
    load = config.load
    return {
        "base_url": config.base_url, "endpoint": config.endpoint, "model": result.server.model,
        "load": {"concurrency": load.concurrency, "request_rate": load.request_rate, "burstiness": load.burstiness,
                 "num_requests": load.num_requests, "requests_per_user": load.requests_per_user,
                 "duration_s": load.duration},
        "sweep": {"parameter": config.sweep.parameter, "values": list(config.sweep.values)} if config.sweep else None,
        "max_users": {"per_user_tps": config.max_users.per_user_tps, "ttft_p95_ms": config.max_users.ttft_p95 * 1e3,
                      "limit": config.max_users.limit} if config.max_users else None,
        "workload": result.workload, "dataset": str(config.dataset) if config.dataset else None,
        "input_len": config.input_len.describe(), "output_len": config.output_len.describe(),
        "ignore_eos": config.ignore_eos, "temperature": config.temperature, "extra_body": config.extra_body,
        "seed": config.seed, "slo_ms": config.slo.as_ms() or None, "warmup": config.warmup,
        "timeout_s": config.timeout, "logprobs_requested": result.logprobs_requested,
        "tokenizer": config.tokenizer,
    }


def _run_to_dict(run: RunResult, include_requests: bool) -> dict:
    document = {"load": run.load.label(), "summary": run.summary}
    if run.verdict is not None:
        document["verdict"] = {"passed": run.verdict.passed, "reasons": list(run.verdict.reasons)}
    if include_requests:
        start = min((r.start for r in run.records), default=0.0)
        document["requests"] = [record_to_dict(r, start) for r in run.records]
    return document


def to_document(result: BenchResult, include_requests: bool = True) -> dict:
    config = result.config
    document = {
        "tool": "tokenmill bench",
        "started_at": result.started_at,
        "config": _config_to_dict(result),
        "server": {"models": result.server.served_models, "usage": result.server.usage,
                   "logprobs": result.server.logprobs},
        "unmeasured": result.unmeasured,
        "runs": [_run_to_dict(run, include_requests) for run in result.runs],
        "max_users": None,
    }
    if config.max_users is not None:
        document["max_users"] = {"concurrency": result.max_users, "per_user_tps": config.max_users.per_user_tps,
                                 "ttft_p95_ms": config.max_users.ttft_p95 * 1e3, "limit": config.max_users.limit}
    return document


def _json_safe(value):
    """JSON has no infinity: an all-at-once request rate is written as the string "inf"."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def dumps_document(result: BenchResult, include_requests: bool = True) -> bytes:
    return orjson.dumps(_json_safe(to_document(result, include_requests)), option=orjson.OPT_INDENT_2)


def write_json(result: BenchResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(dumps_document(result))


def csv_row(run: RunResult) -> dict:
    row: dict = {"concurrency": run.load.concurrency, "request_rate": run.load.request_rate}
    summary = run.summary
    row.update({key: summary[key] for key in SCALARS})
    for key, _ in DISTRIBUTIONS:
        stats = summary[key] or {}
        for stat in STATS:
            row[f"{key}_{stat}"] = stats.get(stat)
    row["failures"] = ";".join(f"{reason}:{count}" for reason, count in sorted(summary["failures"].items()))
    row["verdict"] = run.verdict.describe() if run.verdict is not None else ""
    return row


def write_csv(result: BenchResult, path: Path) -> None:
    rows = [csv_row(run) for run in result.runs]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["concurrency"])
        writer.writeheader()
        writer.writerows(rows)


# ---- text ---------------------------------------------------------------------------------------
def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
             for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _failures(summary: dict) -> str:
    if not summary["failures"]:
        return ""
    return " (" + ", ".join(f"{reason}: {count}" for reason, count in sorted(summary["failures"].items())) + ")"


def _sources(summary: dict) -> str:
    counts = summary["token_counts"]

    def one(kind: str) -> str:
        return "/".join(f"{source} ({count})" for source, count in counts[kind].items())

    return f"output from {one('output')}, prompt from {one('prompt')}, per chunk from {one('chunks')}"


def run_table(run: RunResult) -> str:
    """The detailed view of one run."""
    s = run.summary
    lines = [
        (f"Requests       {s['completed']} completed, {s['failed']} failed{_failures(s)}, "
         f"peak {s['peak_in_flight']} in flight"),
        f"Duration       {s['duration_s']:.2f} s",
        (f"Throughput     {s['request_throughput']:.2f} req/s, {s['output_throughput']:.1f} output tok/s, "
         f"{s['total_token_throughput']:.1f} total tok/s"),
    ]
    if s["goodput"] is not None:
        lines.append(f"Goodput        {s['goodput']:.2f} req/s ({s['slo_met']}/{s['num_requests']} requests met "
                     f"{', '.join(f'{k} <= {v:g} ms' for k, v in s['slo'].items())})")
    lines.append(f"Token counts   {_sources(s)}")
    rows = []
    for key, title in DISTRIBUTIONS:
        stats = s[key]
        rows.append([title] + [_fmt(stats[stat] if stats else None, 2 if key.endswith("_ms") else 1)
                               for stat in STATS])
    return "\n".join(lines) + "\n\n" + _table(["Metric", *STATS], rows)


def runs_table(runs: list[RunResult]) -> str:
    """One row per run: the sweep view."""
    header = ["load", "req/s", "out tok/s", "goodput", "TTFT p50", "p95", "p99", "ITL p50", "p95", "p99",
              "TPOT p50", "p95", "E2E p95", "user tok/s p50", "p95", "failed"]
    verdicts = any(run.verdict is not None for run in runs)
    if verdicts:
        header.append("verdict")
    rows = []
    for run in runs:
        s = run.summary

        def stat(key: str, name: str, s: dict = s) -> str:
            return _fmt(s[key][name] if s[key] else None)

        load = ", ".join(f"{'rate' if k == 'request_rate' else k} {_fmt(v, 2) if k == 'request_rate' else v}"
                         for k, v in run.load.label().items())
        row = [load, _fmt(s["request_throughput"], 2), _fmt(s["output_throughput"]), _fmt(s["goodput"], 2),
               stat("ttft_ms", "p50"), stat("ttft_ms", "p95"), stat("ttft_ms", "p99"),
               stat("itl_ms", "p50"), stat("itl_ms", "p95"), stat("itl_ms", "p99"),
               stat("tpot_ms", "p50"), stat("tpot_ms", "p95"), stat("e2e_ms", "p95"),
               stat("decode_tps_per_user", "p50"), stat("decode_tps_per_user", "p95"), str(s["failed"])]
        if verdicts:
            row.append(run.verdict.describe() if run.verdict is not None else "")
        rows.append(row)
    return _table(header, rows) + "\n(latencies in ms; user tok/s p95 = the speed 95% of requests reach or beat)"


def render_text(result: BenchResult) -> str:
    config = result.config
    server = result.server
    eos = ", EOS ignored" if config.ignore_eos else ""
    requested = "" if result.logprobs_requested else " (not requested)"
    head = [f"tokenmill bench: {config.endpoint} at {config.base_url}, model {server.model}",
            f"Workload: {result.workload}{eos}; seed {config.seed}",
            (f"Server stream: usage {'yes' if server.usage else 'no'}, "
             f"logprobs {'yes' if server.logprobs else 'no'}{requested}")]
    if result.unmeasured["requests"]:
        head.append(f"Not measured: {result.unmeasured['requests']} probe/warm-up requests")
    body: list[str] = []
    if len(result.runs) == 1 and config.max_users is None:
        run = result.runs[0]
        body.append(f"Load: {run.load.describe()}\n")
        body.append(run_table(run))
    else:
        body.append(runs_table(result.runs))
        if len(result.runs) > 0:
            body.append(f"Token counts: {_sources(result.runs[-1].summary)}")
    if config.max_users is not None:
        target = config.max_users
        criteria = (f"p95 decode >= {target.per_user_tps:g} tok/s per user, p95 TTFT <= {target.ttft_p95 * 1e3:g} ms, "
                    "no failures")
        if result.max_users:
            body.append(f"Max concurrent users: {result.max_users} ({criteria}; searched up to {target.limit})")
        else:
            body.append(f"Max concurrent users: 0 (even one user misses {criteria})")
    return "\n".join(head) + "\n\n" + "\n\n".join(body)
