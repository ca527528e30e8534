"""One `tokenmill bench` invocation: preflight, warm-up, then a run, a sweep or a max-users search.

All runs share one `StreamingClient` (one connection pool sized to the largest
concurrency of the invocation). Probe and warm-up requests are never measured;
their token counts are kept apart (`BenchResult.unmeasured`) so that the
measured counts plus those equal what the server itself counted.
"""
from __future__ import annotations

import datetime as _dt
import sys
from dataclasses import dataclass, field, replace

from tokenmill.bench.client import RequestRecord, StreamingClient
from tokenmill.bench.config import BenchConfig, LoadShape
from tokenmill.bench.metrics import measure, summarize
from tokenmill.bench.preflight import ServerInfo, preflight
from tokenmill.bench.runner import run_load
from tokenmill.bench.sizing import Verdict, judge, search_max_users
from tokenmill.bench.tokens import load_tokenizer, resolve_token_counts
from tokenmill.bench.workload import Workload


@dataclass
class RunResult:
    load: LoadShape
    records: list[RequestRecord]
    summary: dict
    verdict: Verdict | None = None  # max-users probes only


@dataclass
class BenchResult:
    config: BenchConfig
    server: ServerInfo
    workload: str
    logprobs_requested: bool
    runs: list[RunResult]
    started_at: str
    max_users: int | None = None
    unmeasured: dict = field(default_factory=dict)


def _unmeasured(records: list[RequestRecord]) -> dict:
    return {"requests": len(records),
            "prompt_tokens": sum(r.usage_prompt_tokens or 0 for r in records),
            "output_tokens": sum(r.usage_completion_tokens or 0 for r in records)}


async def execute(config: BenchConfig) -> BenchResult:
    started_at = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    workload = Workload(config)  # local problems (dataset, tokenizer) first, before contacting the server
    tokenizer = load_tokenizer(config.tokenizer) if config.tokenizer else None
    server = await preflight(config)
    logprobs = server.logprobs if config.logprobs is None else config.logprobs
    client = StreamingClient(config.base_url, config.endpoint, server.model, api_key=config.api_key,
                             timeout=config.timeout, max_connections=config.max_connections,
                             temperature=config.temperature, ignore_eos=config.ignore_eos, logprobs=logprobs,
                             extra_body=config.extra_body)
    unmeasured = list(server.probes)
    runs: list[RunResult] = []
    max_users = None
    try:
        if config.warmup:
            first = _points(config)[0] if config.max_users is None else replace(config.load, concurrency=1)
            warm = LoadShape(concurrency=first.concurrency or config.warmup, num_requests=config.warmup)
            warm_records = await run_load(client, workload.warmup_request, warm, config.seed,
                                          progress=config.progress, label="warm-up")
            unmeasured += warm_records.records

        async def run(load: LoadShape) -> RunResult:
            label = ", ".join(f"{key}={value:g}" for key, value in load.label().items())
            outcome = await run_load(client, workload.request, load, config.seed, progress=config.progress,
                                     label=label)
            resolve_token_counts(outcome.records, tokenizer)
            for record in outcome.records:
                measure(record, config.slo)
            result = RunResult(load, outcome.records, summarize(outcome.records, config.slo, outcome.peak_in_flight))
            runs.append(result)
            return result

        if config.max_users is not None:
            target = config.max_users

            async def probe(concurrency: int) -> Verdict:
                result = await run(replace(config.load, concurrency=concurrency, request_rate=None))
                result.verdict = judge(result.summary, target)
                if config.progress:
                    print(f"concurrency {concurrency}: {result.verdict.describe()}", file=sys.stderr, flush=True)
                return result.verdict

            max_users = await search_max_users(probe, target.limit)
            runs.sort(key=lambda result: result.load.concurrency)
        else:
            for load in _points(config):
                await run(load)
    finally:
        await client.aclose()
    return BenchResult(config=config, server=server, workload=workload.describe(), logprobs_requested=logprobs,
                       runs=runs, started_at=started_at, max_users=max_users, unmeasured=_unmeasured(unmeasured))


def _points(config: BenchConfig) -> list[LoadShape]:
    if config.sweep is None:
        return [config.load]
    return [replace(config.load, **{config.sweep.parameter: value}) for value in config.sweep.values]
