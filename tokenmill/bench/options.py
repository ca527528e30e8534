"""The `tokenmill bench` flags, and their translation into a validated `BenchConfig`.

Flags are parsed as plain strings where they have a syntax of their own, so that
every mistake surfaces as one `BenchError` line from `config_from_args`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from urllib.parse import urlsplit

from tokenmill.bench.config import (
    SLO,
    BenchConfig,
    BenchError,
    LoadShape,
    MaxUsersSearch,
    parse_duration,
    parse_length,
    parse_slo,
    parse_sweep,
)

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target")
    target.add_argument("--base-url", default=DEFAULT_BASE_URL,
                        help="OpenAI-compatible API root; /v1 is added when the URL has no path "
                             f"(default {DEFAULT_BASE_URL})")
    target.add_argument("--model", default=None, help="model name to request (default: the first of /v1/models)")
    target.add_argument("--api-key", default=None,
                        help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY when set)")
    target.add_argument("--endpoint", default="completions", choices=["completions", "chat"],
                        help="/v1/completions or /v1/chat/completions (default completions)")

    load = parser.add_argument_group("load shape")
    load.add_argument("--concurrency", type=int, default=None,
                      help="requests kept in flight (closed loop; default 1); with --request-rate, the most in flight")
    load.add_argument("--request-rate", default=None,
                      help="open loop: requests per second, Poisson arrivals; 'inf' sends all at once")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="shape of the gamma-distributed gaps between arrivals: 1 = Poisson, <1 burstier, "
                           ">1 more regular (default 1)")
    load.add_argument("--num-requests", default=None,
                      help="requests per run, or Kx for K per unit of concurrency (e.g. 4x); default 4x, at "
                           "least 16; 100 with --request-rate")
    load.add_argument("--duration", default=None,
                      help="stop sending new requests after this long per run, e.g. 60s or 5m")

    workload = parser.add_argument_group("workload")
    workload.add_argument("--input-len", default="128",
                          help="prompt tokens: N, LOW-HIGH (uniform) or normal:MEAN,STD (default 128)")
    workload.add_argument("--output-len", default="128",
                          help="max_tokens per request, same forms as --input-len (default 128)")
    workload.add_argument("--prefix-len", type=int, default=0,
                          help="synthetic prompts all start with the same prefix of about N tokens (a shared "
                               "system prompt; chat: a system message), to measure prefix caching (default 0)")
    workload.add_argument("--dataset", type=Path, default=None,
                          help='JSONL prompts, one {"prompt": ...} or {"messages": [...]} per line, '
                               'optionally with "max_tokens"')
    workload.add_argument("--ignore-eos", action="store_true",
                          help="ask the server to generate max_tokens tokens regardless of EOS (vLLM/tokenmill)")
    workload.add_argument("--temperature", type=float, default=0.0,
                          help="sampling temperature sent with each request (default 0 = greedy)")
    workload.add_argument("--extra-body", default=None,
                          help="JSON object merged into every request body, e.g. '{\"top_k\": 1}'")
    workload.add_argument("--seed", type=int, default=0, help="seed of prompts, lengths and arrivals (default 0)")

    measure = parser.add_argument_group("measurement")
    measure.add_argument("--slo", default=None,
                         help="per-request objectives for goodput, e.g. ttft=500ms,itl=50ms,tpot=40ms,e2e=10s")
    measure.add_argument("--warmup", type=int, default=0, help="unmeasured requests sent first (default 0)")
    measure.add_argument("--timeout", default="300s", help="limit per request (default 300s)")
    measure.add_argument("--logprobs", action=argparse.BooleanOptionalAction, default=None,
                         help="ask for logprobs to count the tokens of each chunk exactly (default: when the "
                              "server returns them)")
    measure.add_argument("--tokenizer", default=None,
                         help="count tokens locally when the server does not: a Hugging Face directory, a .gguf "
                              "file, or 'default' (the bundled model's)")

    sizing = parser.add_argument_group("sweeps and sizing")
    sizing.add_argument("--sweep", default=None,
                        help="run once per value and print one table, e.g. concurrency=1,2,4,8,16,32")
    sizing.add_argument("--max-users", action="store_true",
                        help="find the largest concurrency meeting --per-user-tps and --ttft-p95")
    sizing.add_argument("--per-user-tps", type=float, default=20.0,
                        help="decode tokens/s each user must keep at p95 (default 20)")
    sizing.add_argument("--ttft-p95", default="500ms", help="p95 time to first token allowed (default 500ms)")
    sizing.add_argument("--max-users-limit", type=int, default=256,
                        help="largest concurrency the search tries (default 256)")

    output = parser.add_argument_group("output")
    output.add_argument("--out", type=Path, default=None,
                        help="write every summary field and per-request record to this JSON file")
    output.add_argument("--csv", type=Path, default=None, help="write one summary row per run to this CSV file")
    output.add_argument("--plot", type=Path, default=None, metavar="DIR", help="write PNG charts into DIR")
    output.add_argument("--json", action="store_true",
                        help="print the results as JSON (without per-request records) instead of tables")
    output.add_argument("--no-progress", action="store_true", help="no progress bar")


def normalize_base_url(url: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BenchError(f"invalid --base-url {url!r}: expected http(s)://HOST[:PORT][/PATH]")
    url = url.strip().rstrip("/")
    return url + "/v1" if parts.path in ("", "/") else url


def _positive(name: str, value, allow_none: bool = True):
    if value is None and allow_none:
        return value
    if value is None or value < 1:
        raise BenchError(f"{name} must be a positive integer, not {value}")
    return value


def _num_requests(text: str | None, open_loop: bool) -> tuple[int | None, int | None]:
    """'--num-requests' -> (num_requests, requests_per_user)."""
    if text is None:
        return None, None
    per_user = text.strip().lower().endswith("x")
    try:
        count = int(text.strip()[:-1] if per_user else text)
    except ValueError:
        raise BenchError(f"--num-requests must be a positive integer or Kx (e.g. 4x), not {text!r}") from None
    if count < 1:
        raise BenchError(f"--num-requests must be positive, not {text!r}")
    if per_user and open_loop:
        raise BenchError("--num-requests Kx counts per unit of concurrency; with --request-rate give a number")
    return (None, count) if per_user else (count, None)


def _request_rate(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        rate = float(text)
    except ValueError:
        raise BenchError(f"--request-rate must be a number or 'inf', not {text!r}") from None
    if not rate > 0:
        raise BenchError(f"--request-rate must be positive, not {text!r}")
    return rate


def config_from_args(args: argparse.Namespace, progress_allowed: bool) -> BenchConfig:
    """A validated BenchConfig; `progress_allowed` is whether stdout is a terminal."""
    rate = _request_rate(args.request_rate)
    concurrency = _positive("--concurrency", args.concurrency)
    if rate is None and concurrency is None:
        concurrency = 1
    if not args.burstiness > 0 or math.isinf(args.burstiness):
        raise BenchError(f"--burstiness must be a positive number, not {args.burstiness}")
    if args.warmup < 0:
        raise BenchError("--warmup must be 0 or more")
    num_requests, requests_per_user = _num_requests(args.num_requests, open_loop=rate is not None)
    load = LoadShape(concurrency=concurrency, request_rate=rate, burstiness=args.burstiness,
                     num_requests=num_requests, requests_per_user=requests_per_user,
                     duration=parse_duration(args.duration) if args.duration is not None else None)
    sweep = parse_sweep(args.sweep) if args.sweep else None
    max_users = None
    if args.max_users:
        if sweep is not None:
            raise BenchError("--max-users runs its own search; drop --sweep")
        if rate is not None:
            raise BenchError("--max-users searches over concurrency; drop --request-rate")
        if not args.per_user_tps > 0:
            raise BenchError("--per-user-tps must be positive")
        max_users = MaxUsersSearch(per_user_tps=args.per_user_tps, ttft_p95=parse_duration(args.ttft_p95),
                                   limit=_positive("--max-users-limit", args.max_users_limit, allow_none=False))
    extra_body = {}
    if args.extra_body:
        try:
            extra_body = json.loads(args.extra_body)
        except json.JSONDecodeError as error:
            raise BenchError(f"--extra-body is not valid JSON: {error.msg}") from None
        if not isinstance(extra_body, dict):
            raise BenchError("--extra-body must be a JSON object")
    if args.temperature < 0:
        raise BenchError("--temperature must be 0 or more")
    if args.prefix_len < 0:
        raise BenchError("--prefix-len must be 0 or more")
    if args.prefix_len and args.dataset is not None:
        raise BenchError("--prefix-len applies to synthetic prompts, not to a --dataset")
    return BenchConfig(
        base_url=normalize_base_url(args.base_url), model=args.model,
        api_key=args.api_key if args.api_key is not None else os.environ.get("OPENAI_API_KEY"),
        endpoint=args.endpoint, load=load, sweep=sweep, max_users=max_users,
        input_len=parse_length(args.input_len), output_len=parse_length(args.output_len), dataset=args.dataset,
        prefix_len=args.prefix_len,
        ignore_eos=args.ignore_eos, temperature=args.temperature, extra_body=extra_body, seed=args.seed,
        slo=parse_slo(args.slo) if args.slo else SLO(), warmup=args.warmup, timeout=parse_duration(args.timeout),
        logprobs=args.logprobs, tokenizer=args.tokenizer, out=args.out, csv=args.csv, plot_dir=args.plot,
        progress=progress_allowed and not args.no_progress and not args.json, json_output=args.json)
