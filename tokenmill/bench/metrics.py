"""Per-request latencies and the run summary; the formulas are in docs/metrics.md.

Per successful request (times on the client's `perf_counter`; "sent" is when
the request is handed to the HTTP client):
  TTFT  = arrival of the first content chunk - sent
  E2E   = end of the response - sent
  ITL   = for each content chunk k > 1 carrying n_k tokens, n_k samples of
          (t_k - t_{k-1}) / n_k: per token, not per chunk
  TPOT  = (E2E - TTFT) / (output tokens - 1), for requests with >= 2 tokens
  per-user decode speed = 1 / TPOT tokens/s
Chunks that carry no token (by logprobs) are skipped when taking gaps.

Summary statistics: mean, std (population), p50/p90/p95/p99 (linear
interpolation). Latency percentiles are the usual ones (p99 = slow tail); for
speeds, pXX is the speed XX% of requests reach or beat, so p95 and p99 also
describe the slow tail. Throughputs divide by the run's wall time, from the
first request sent to the last response ended; they count successful requests
only.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from tokenmill.bench.client import RequestRecord
from tokenmill.bench.config import SLO
from tokenmill.bench.tokens import count_sources

PERCENTILES = (50, 90, 95, 99)


def measure(record: RequestRecord, slo: SLO) -> None:
    """Fill ttft, e2e, tpot, itl and meets_slo of a record whose token counts are resolved."""
    record.e2e = record.end - record.start
    if not record.ok:
        record.meets_slo = False
        return
    times, carried = record.chunk_times, record.chunk_tokens
    record.ttft = times[0] - record.start
    itl: list[float] = []
    previous = None
    for time_k, tokens_k in zip(times, carried):
        if tokens_k <= 0:
            continue
        if previous is not None:
            itl.extend([(time_k - previous) / tokens_k] * tokens_k)
        previous = time_k
    record.itl = itl
    if record.output_tokens is not None and record.output_tokens >= 2:
        record.tpot = (record.e2e - record.ttft) / (record.output_tokens - 1)
    record.meets_slo = (
        (slo.ttft is None or record.ttft <= slo.ttft)
        and (slo.itl is None or not itl or max(itl) <= slo.itl)
        and (slo.tpot is None or record.tpot is None or record.tpot <= slo.tpot)
        and (slo.e2e is None or record.e2e <= slo.e2e))


def distribution(values, scale: float = 1.0, higher_is_better: bool = False) -> dict | None:
    """count, mean, std, min, max and percentiles of `values` times `scale`; None when empty."""
    if len(values) == 0:
        return None
    array = np.asarray(values, dtype=np.float64) * scale
    summary = {"count": int(array.size), "mean": float(array.mean()), "std": float(array.std()),
               "min": float(array.min()), "max": float(array.max())}
    levels = [100 - p for p in PERCENTILES] if higher_is_better else list(PERCENTILES)
    for name, value in zip(PERCENTILES, np.percentile(array, levels)):
        summary[f"p{name}"] = float(value)
    return summary


def summarize(records: list[RequestRecord], slo: SLO, peak_in_flight: int) -> dict:
    """The summary of one run (all of whose records are measured)."""
    ok = [r for r in records if r.ok]
    started = min((r.start for r in records), default=0.0)
    ended = max((r.end for r in records), default=0.0)
    duration = max(ended - started, 1e-9)
    output_tokens = sum(r.output_tokens or 0 for r in ok)
    prompt_tokens = sum(r.prompt_tokens or 0 for r in ok)
    itl = [gap for r in ok for gap in r.itl]
    tpots = [r.tpot for r in ok if r.tpot is not None]
    met = sum(1 for r in ok if r.meets_slo) if slo.is_set else None
    return {
        "num_requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "failures": dict(Counter(r.failure for r in records if not r.ok)),
        "duration_s": duration,
        "peak_in_flight": peak_in_flight,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (output_tokens + prompt_tokens) / duration,
        "goodput": met / duration if met is not None else None,
        "slo": slo.as_ms() or None,
        "slo_met": met,
        "slo_attainment": met / len(records) if met is not None and records else None,
        "total_prompt_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "ttft_ms": distribution([r.ttft for r in ok], 1e3),
        "itl_ms": distribution(itl, 1e3),
        "tpot_ms": distribution(tpots, 1e3),
        "e2e_ms": distribution([r.e2e for r in ok], 1e3),
        "decode_tps_per_user": distribution([1.0 / t for t in tpots if t > 0], higher_is_better=True),
        "prompt_tokens": distribution([r.prompt_tokens for r in ok if r.prompt_tokens is not None]),
        "output_tokens": distribution([r.output_tokens for r in ok]),
        "token_counts": count_sources(records),
    }
