#!/usr/bin/env python
"""CPU performance of tokenmill on this machine, each figure a ratio measured in one run.

Parts (--parts picks some; default all):

  peak      bf16 / fp32 matmul peak and memory read bandwidth of this machine
            (the planner's `--measure-device` measurement), for the rooflines.
  served    `tokenmill serve` (default dtype: auto) measured by `tokenmill bench`
            at 32 concurrent requests, ~40-token prompts, 128 output tokens,
            ignore_eos; and the same figure as a fraction of the compute roofline
            (tok/s x FLOPs per token / bf16 peak) and of the memory roofline
            (the tok/s at which each step's weight and KV reads take exactly the
            measured bandwidth).
  peers     transformers on the same work offline, each in float32 and
            bfloat16: continuous batching (`generate_batch`) and one static
            batch (`generate`), from benchmarks/engine_throughput.py.
  single    single-stream decode: tokenmill `LLM.generate` of one request vs a
            plain transformers `generate` loop, 128 tokens each.
  itl       streaming smoothness: `tokenmill bench` with Poisson arrivals at
            most 32 in flight; inter-token latency p95 / median.
  chunking  the same with one request in 8 bringing a ~1,500-token prompt,
            served with --long-prefill-token-threshold 0 (a prompt is read in one
            step), the default and 64: how much a long prefill freezes the streams.
  prefix    prefix caching: a shared ~500-token system prompt, TTFT p50 with
            `--enable-prefix-caching` vs `--no-enable-prefix-caching`.
  quant     bf16, int8 and int4 weights: bytes in memory, tok/s at batch 32 and
            1, perplexity on benchmarks/data/quality_text.txt, greedy agreement
            with bf16 over the first 32 tokens of 20 prompts.
  profile   where a decode step's time goes at batch 32 and 1
            (`tokenmill.engine.profiler.profile_steps`); also printed by --profile.

    python benchmarks/cpu_performance.py                    # everything (~15 min on 2 cores)
    python benchmarks/cpu_performance.py --write-docs       # and update docs/benchmarks.md
    python benchmarks/cpu_performance.py --parts served,peak --profile
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
for folder in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import engine_throughput as et  # noqa: E402  (the peers' runners and the workload)

from tokenmill.bench.machine import CpuShares, cpu_model  # noqa: E402
from tokenmill.bench.markdown import markdown_table, write_marked_section  # noqa: E402
from tokenmill.bench.process import shell_line, stop_process, unused_port, wait_until_healthy  # noqa: E402

PARTS = ("peak", "served", "peers", "single", "itl", "chunking", "prefix", "quant", "profile")
SECTION = "cpu_performance"
MODEL_NAME = "gemma-3-270m"
QUALITY_TEXT = REPO_ROOT / "benchmarks" / "data" / "quality_text.txt"
METHODS = ("bf16", "int8", "int4", "fp32")  # fp32: an unquantized reference row, not a quantization
TARGETS = {"vs_hf_cb": 6.0, "vs_hf_static": 4.0, "roofline": 0.40, "single": 2.5, "itl_ratio": 2.5,
           "prefix": 3.0, "int8_ppl": 0.01}


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- results
@dataclass
class Results:
    peak: dict | None = None
    model: dict | None = None
    served: dict | None = None
    peers: list = field(default_factory=list)          # engine_throughput.RunResult
    single: dict = field(default_factory=dict)          # name -> {"tokens_per_s", "seconds", "other"}
    itl: dict | None = None
    chunking: dict = field(default_factory=dict)         # threshold label -> served record
    prefix: dict = field(default_factory=dict)          # "on"/"off" -> bench summary
    quant: dict = field(default_factory=dict)           # method -> row
    profiles: dict = field(default_factory=dict)        # label -> StepProfile
    errors: list = field(default_factory=list)


# --------------------------------------------------------------------------- machine and model
def measure_peak() -> dict:
    from tokenmill.planner.measure import measure_cpu

    et.wait_for_idle(0.15, 120)
    device = measure_cpu()
    return {"bf16_tflops": device.dense_tflops["bf16"], "fp32_tflops": device.dense_tflops["fp32"],
            "bandwidth_gb_s": device.memory_bandwidth_gb_per_s, "label": device.label}


def model_facts() -> dict:
    """FLOPs per generated token and bytes read per decode step, from the model's shape."""
    from tokenmill.models.loader import default_model_path
    from tokenmill.planner.architecture import model_from_gguf

    spec = model_from_gguf(default_model_path())
    return {"parameters": spec.parameters, "matmul_flops_per_token": 2.0 * spec.matmul_parameters,
            "attention_flops_per_context_token": 4.0 * spec.layers * spec.attention_heads * spec.head_dim,
            "kv_bytes_per_token_bf16": 2 * spec.layers * spec.kv_heads * spec.head_dim * 2,
            "weight_bytes_bf16": 2 * spec.parameters, "layers": spec.layers, "label": spec.label}


def source_formats() -> str:
    """How the bundled GGUF stores its decoder projections, e.g. 'Q5_0 90, Q4_K 27, ...' (by tensor count)."""
    from collections import Counter

    import gguf

    from tokenmill.models.loader import default_model_path

    counts = Counter(t.tensor_type.name for t in gguf.GGUFReader(str(default_model_path())).tensors
                     if t.name.startswith("blk.") and t.name.endswith(".weight") and t.tensor_type.name != "F32")
    return ", ".join(f"{name} {count}" for name, count in counts.most_common())


def rooflines(tokens_per_s: float, batch: int, mean_context: float, peak: dict, model: dict) -> dict:
    """Achieved fraction of the compute and the memory roofline for decode at `batch` rows."""
    flops_per_token = model["matmul_flops_per_token"] + model["attention_flops_per_context_token"] * mean_context
    compute = tokens_per_s * flops_per_token / (peak["bf16_tflops"] * 1e12)
    # One decode step reads every weight once and each row's KV once.
    step_bytes = model["weight_bytes_bf16"] + batch * mean_context * model["kv_bytes_per_token_bf16"]
    memory_bound_tps = batch * peak["bandwidth_gb_s"] * 1e9 / step_bytes
    return {"flops_per_token": flops_per_token, "compute_fraction": compute,
            "compute_bound_tps": peak["bf16_tflops"] * 1e12 / flops_per_token,
            "memory_bound_tps": memory_bound_tps, "memory_fraction": tokens_per_s / memory_bound_tps}


# --------------------------------------------------------------------------- served runs
def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tokenmill.cli", *args]


def served_bench(label: str, serve_args: list[str], bench_args: list[str], workdir: Path, args) -> dict:
    """Start `tokenmill serve SERVE_ARGS`, run `tokenmill bench BENCH_ARGS` against it,
    stop it; returns {"serve", "bench", "summary", "cpu"} (commands as shown in the docs)."""
    port = unused_port()
    out = workdir / f"{label}.json"
    log = workdir / f"{label}.log"
    serve = ["serve", "--host", "127.0.0.1", "--port", "$PORT", *serve_args]
    bench = ["bench", "--base-url", "http://127.0.0.1:$PORT", "--model", MODEL_NAME, "--no-progress",
             *bench_args]
    record = {"serve": "tokenmill " + shell_line(serve), "bench": "tokenmill " + shell_line(bench)}
    env = {**os.environ, "TQDM_DISABLE": "1"}
    real = [a.replace("$PORT", str(port)) for a in serve]
    with log.open("w") as log_file:
        process = subprocess.Popen(cli(*real), stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    try:
        wait_until_healthy(process, f"http://127.0.0.1:{port}", args.start_timeout, log)
        et.wait_for_idle(args.idle_threshold, args.idle_wait)
        _log(f"{label}: server ready; {record['bench']}")
        argv = cli(*[a.replace("$PORT", str(port)) for a in bench], "--out", str(out))
        with CpuShares({"server": process.pid}) as cpu:
            result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=args.bench_timeout,
                                    check=False, cwd=workdir)
        if result.returncode != 0:
            raise RuntimeError(f"tokenmill bench failed: {(result.stderr or result.stdout).strip()[-600:]}")
        document = json.loads(out.read_text())
        record["summary"] = document["runs"][0]["summary"]
        record["cpu"] = cpu.shares
        s = record["summary"]
        _log(f"{label}: {s['output_throughput']:.1f} output tok/s, TTFT p50 {s['ttft_ms']['p50']:.0f} ms, "
             f"ITL p50 {s['itl_ms']['p50']:.1f} ms p95 {s['itl_ms']['p95']:.1f} ms, failed {s['failed']}")
    finally:
        stop_process(process)
    return record


def bench_load(concurrency: int, num_requests: int, input_len: int, output_len: int, seed: int) -> list[str]:
    return ["--concurrency", str(concurrency), "--num-requests", str(num_requests), "--input-len", str(input_len),
            "--output-len", str(output_len), "--ignore-eos", "--no-logprobs", "--tokenizer", "default",
            "--seed", str(seed)]


def run_served(args, workdir: Path) -> dict:
    serve_args = ["--dtype", args.dtype, "--max-model-len", "2048"]
    bench_args = bench_load(args.concurrency, args.concurrency * args.requests_per_user, args.prompt_len,
                            args.output_len, args.seed) + ["--warmup", str(args.warmup)]
    return served_bench("served", serve_args, bench_args, workdir, args)


def run_itl(args, workdir: Path, served: dict | None) -> dict:
    # Arrivals at the rate that keeps about `concurrency` requests in flight (Little's law,
    # from the closed-loop run's mean request time when there is one).
    e2e_s = (served["summary"]["e2e_ms"]["mean"] / 1e3) if served else 128 * 0.06
    rate = args.itl_rate or round(args.concurrency / e2e_s, 2)
    serve_args = ["--dtype", args.dtype, "--max-model-len", "2048"]
    bench_args = bench_load(args.concurrency, args.itl_requests, args.prompt_len, args.output_len, args.seed + 1)
    bench_args += ["--request-rate", f"{rate:g}", "--warmup", str(args.warmup)]
    record = served_bench("itl", serve_args, bench_args, workdir, args)
    record["rate"] = rate
    return record


def long_prompt_dataset(path: Path, count: int, short: int, long: int, output_len: int, seed: int) -> Path:
    """A JSONL dataset of `count` requests, one in 8 with a `long`-word prompt, the others `short`."""
    import random

    from tokenmill.bench.workload import WORDS

    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for i in range(count):
            words = " ".join(rng.choices(WORDS, k=long if i % 8 == 0 else short))
            f.write(json.dumps({"prompt": words, "max_tokens": output_len}) + "\n")
    return path


def run_chunking(args, workdir: Path, served: dict | None) -> dict:
    dataset = long_prompt_dataset(workdir / "long_prompts.jsonl", args.itl_requests, args.prompt_len, 1500,
                                  args.output_len, args.seed)
    e2e_s = (served["summary"]["e2e_ms"]["mean"] / 1e3) if served else 128 * 0.06
    rate = args.itl_rate or round(args.concurrency / e2e_s, 2)
    out = {}
    for label, threshold in (("0 (off)", "0"), ("default", None), ("64", "64")):
        serve_args = ["--dtype", args.dtype, "--max-model-len", "2048"]
        if threshold is not None:
            serve_args += ["--long-prefill-token-threshold", threshold]
        bench_args = ["--concurrency", str(args.concurrency), "--num-requests", str(args.itl_requests),
                      "--dataset", "long_prompts.jsonl", "--ignore-eos", "--no-logprobs", "--tokenizer", "default",
                      "--seed", str(args.seed + 3), "--request-rate", f"{rate:g}", "--warmup", str(args.warmup)]
        record = served_bench(f"chunking-{threshold or 'default'}", serve_args, bench_args, workdir, args)
        record["rate"] = rate
        out[label] = record
    return out


def run_prefix(args, workdir: Path) -> dict:
    out = {}
    for state, flag in (("on", "--enable-prefix-caching"), ("off", "--no-enable-prefix-caching")):
        serve_args = ["--dtype", args.dtype, "--max-model-len", "2048", flag]
        bench_args = bench_load(args.prefix_concurrency, args.prefix_requests, args.prompt_len, 32, args.seed + 2)
        bench_args += ["--prefix-len", str(args.prefix_len), "--warmup", str(args.warmup)]
        out[state] = served_bench(f"prefix-{state}", serve_args, bench_args, workdir, args)
    return out


# --------------------------------------------------------------------------- offline runs
def peer_args(args) -> argparse.Namespace:
    ns = et.parse_args(["--num-requests", str(args.concurrency), "--prompt-len", str(args.prompt_len),
                        "--output-len", str(args.output_len)])
    ns.idle_threshold, ns.idle_wait, ns.attempts = args.idle_threshold, args.idle_wait, args.attempts
    return ns


def run_peers(args, tokenizer, workload, warm, model_path: Path) -> list:
    ns = peer_args(args)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results = []
    for dtype in args.peer_dtypes:
        model = et.load_hf_model(dtype, model_path)
        for engine in ("hf-cb", "hf-static"):
            r = (et.run_hf_static(model, dtype, workload, warm, pad_id, ns) if engine == "hf-static"
                 else et.run_hf_cb(model, dtype, workload, warm, ns))
            _log(f"{engine} {dtype}: {r.tokens_per_s or float('nan'):.1f} tok/s")
            results.append(r)
        del model
        gc.collect()
    return results


def hf_single(args, tokenizer, prompt: list[int], model_path: Path) -> dict:
    import torch
    from transformers import GenerationConfig

    out = {}
    n = args.output_len
    for dtype in args.peer_dtypes:
        model = et.load_hf_model(dtype, model_path)
        config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id or 0)
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            model.generate(input_ids=ids, generation_config=GenerationConfig(
                max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id or 0))
            generated, seconds, other = et.timed(args, lambda: model.generate(input_ids=ids,
                                                                                generation_config=config))
        tokens = generated.shape[1] - ids.shape[1]
        out[f"transformers generate {dtype}"] = {"tokens_per_s": tokens / seconds, "seconds": seconds,
                                                 "other": other, "tokens": tokens}
        _log(f"transformers generate {dtype}, one stream: {tokens / seconds:.1f} tok/s")
        del model
        gc.collect()
    return out


def tokenmill_llm(method: str, dtype: str):
    """An offline engine with `method`'s weights: bf16 / fp32 dense, int8 / int4 quantized in `dtype`."""
    from tokenmill import LLM

    if method in ("bf16", "fp32"):
        dtype, quantization = ("bfloat16" if method == "bf16" else "float32"), None
    else:
        quantization = method
    return LLM(dtype=dtype, quantization=quantization, max_model_len=2048, enable_prefix_caching=False)


def timed_generate(args, llm, prompts: list[list[int]], n: int) -> tuple[float, float | None, list]:
    from tokenmill import SamplingParams

    llm.generate([{"prompt_token_ids": p[:8]} for p in prompts[:2]],
                 SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    outs, seconds, other = et.timed(args, lambda: llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                               use_tqdm=False))
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return tokens / seconds, other, outs


def agreement_prompts(tokenizer, count: int) -> list[list[int]]:
    """`count` prompts of 20-40 tokens, each opening with a different sentence."""
    return et.build_workload(tokenizer, count, 30, 32).prompts


def run_quant(args, tokenizer, workload, results: Results) -> None:
    """bf16 / int8 / int4: memory, speed at batch 32 and 1, perplexity, greedy agreement."""
    from tokenmill import SamplingParams
    from tokenmill.engine.evaluate import agreement_length, perplexity
    from tokenmill.models.quantize import weight_bytes

    text_ids = tokenizer(QUALITY_TEXT.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    bos = tokenizer.bos_token_id
    prompts = agreement_prompts(tokenizer, 20)
    reference = None
    methods = [m for m in METHODS if m in args.methods]
    for method in methods:
        llm = tokenmill_llm(method, args.quant_dtype)
        engine = llm.engine
        model = engine.runner.model
        row = {"weight_bytes": weight_bytes(model)}
        row["batch_tps"], row["batch_other"], _ = timed_generate(args, llm, workload.prompts, args.output_len)
        row["single_tps"], row["single_other"], _ = timed_generate(args, llm, workload.prompts[:1], args.output_len)
        config = model.config
        row["perplexity"] = perplexity(model, config.num_hidden_layers, config.num_key_value_heads,
                                       config.head_dim, text_ids, bos_token_id=bos).perplexity
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True), use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        if reference is None:
            reference = tokens
        lengths = [agreement_length(a, b) for a, b in zip(reference, tokens)]
        row["agree_all"] = sum(1 for n in lengths if n >= 32)
        row["agree_mean"] = sum(lengths) / len(lengths)
        row["num_prompts"] = len(prompts)
        row["text_tokens"] = len(text_ids)
        results.quant[method] = row
        _log(f"{method}: {row['weight_bytes'] / 2**20:.0f} MiB, batch {len(workload.prompts)} "
             f"{row['batch_tps']:.1f} tok/s, single {row['single_tps']:.1f} tok/s, perplexity "
             f"{row['perplexity']:.3f}, agreement {row['agree_all']}/{len(prompts)}")
        if "single" in args.parts:
            results.single[f"tokenmill {method}"] = {"tokens_per_s": row["single_tps"], "other": row["single_other"]}
        del llm, engine, model
        gc.collect()


def run_profiles(args, workload, results: Results) -> None:
    from tokenmill import SamplingParams
    from tokenmill.engine.profiler import profile_steps

    llm = tokenmill_llm("bf16", "bfloat16")
    engine = llm.engine
    # Enough decode steps for the warm-up and the two timed passes of profile_steps.
    params = SamplingParams(temperature=0.0, max_tokens=max(args.output_len, 64), ignore_eos=True)
    for batch in (len(workload.prompts), 1):
        for i, prompt in enumerate(workload.prompts[:batch]):
            engine.add_request(f"profile-{batch}-{i}", prompt, params)
        for _ in range(4):  # prefill out of the way: decode steps only
            engine.step()
        et.wait_for_idle(args.idle_threshold, args.idle_wait)
        profile = profile_steps(engine, num_steps=20)
        results.profiles[f"batch {batch}"] = profile
        _log(f"decode step profile at batch {batch}:\n{profile.table()}")
        while engine.has_unfinished_requests():
            engine.step()
    del llm, engine
    gc.collect()


# --------------------------------------------------------------------------- report
def shown_arguments(argv: list[str]) -> list[str]:
    """The command line as the docs show it: without `--json PATH`, which only adds a raw-figures file."""
    shown, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--json":
            skip = True
        elif not arg.startswith("--json="):
            shown.append(arg)
    return shown


def fmt(value, digits: int = 1, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}{suffix}"


def verdict(value: float | None, target: float, higher_is_better: bool = True) -> str:
    if value is None:
        return "not measured"
    met = value >= target if higher_is_better else value <= target
    return "met" if met else "**not met**"


def best_peer(results: Results, engine: str):
    runs = [r for r in results.peers if r.engine == engine and r.tokens_per_s is not None]
    return max(runs, key=lambda r: r.tokens_per_s) if runs else None


def load_note(share) -> str:
    return "n/a" if share is None else f"{share:.0%}"


def targets_table(results: Results, args) -> tuple[str, list[str]]:
    rows, notes = [], []
    served_tps = results.served["summary"]["output_throughput"] if results.served else None
    for engine, key, label in (("hf-cb", "vs_hf_cb", "transformers continuous batching"),
                               ("hf-static", "vs_hf_static", "transformers static-batch `generate`")):
        peer = best_peer(results, engine)
        ratio = served_tps / peer.tokens_per_s if served_tps and peer else None
        detail = (f"{served_tps:.1f} vs {peer.tokens_per_s:.1f} tok/s ({peer.dtype})" if ratio else "")
        rows.append([f"Served tok/s at {args.concurrency} concurrent ÷ {label}", f"≥ {TARGETS[key]:g}×",
                     fmt(ratio, 2, "×"), detail, verdict(ratio, TARGETS[key])])
    roof = None
    if served_tps and results.peak and results.model:
        roof = rooflines(served_tps, args.concurrency, args.prompt_len + args.output_len / 2, results.peak,
                         results.model)
        rows.append(["Served tok/s × FLOPs/token ÷ bf16 matmul peak", "≥ 40%", f"{roof['compute_fraction']:.1%}",
                     f"{roof['flops_per_token'] / 1e9:.3f} GFLOP/token, peak {results.peak['bf16_tflops']:.2f} "
                     f"TFLOP/s", verdict(roof["compute_fraction"], TARGETS["roofline"])])
        rows.append([f"Served tok/s ÷ memory roofline at batch {args.concurrency} (not a target)", "—",
                     f"{roof['memory_fraction']:.1%}",
                     f"{roof['memory_bound_tps']:.0f} tok/s if each step only read weights + KV at "
                     f"{results.peak['bandwidth_gb_s']:.1f} GB/s", "—"])
    tm = results.single.get("tokenmill bf16")
    best_tm_single = max(((k, v) for k, v in results.single.items() if k.startswith("tokenmill")),
                         key=lambda kv: kv[1]["tokens_per_s"], default=None)
    hf = max(((k, v) for k, v in results.single.items() if k.startswith("transformers")),
             key=lambda kv: kv[1]["tokens_per_s"], default=None)
    if hf:
        for name, entry in ((("tokenmill bf16", tm),) + ((best_tm_single,) if best_tm_single and
                                                          best_tm_single[0] != "tokenmill bf16" else ())):
            if entry is None:
                continue
            ratio = entry["tokens_per_s"] / hf[1]["tokens_per_s"]
            rows.append([f"Single stream: {name} ÷ best {hf[0].rsplit(' ', 1)[0]}", "≥ 2.5×", f"{ratio:.2f}×",
                         f"{entry['tokens_per_s']:.1f} vs {hf[1]['tokens_per_s']:.1f} tok/s "
                         f"({hf[0].rsplit(' ', 1)[1]})",
                         verdict(ratio, TARGETS["single"])])
    if results.itl:
        itl = results.itl["summary"]["itl_ms"]
        ratio = itl["p95"] / itl["p50"] if itl.get("p50") else None
        rows.append(["ITL p95 ÷ median, Poisson arrivals, ≤ 32 streams", "≤ 2.5×", fmt(ratio, 2, "×"),
                     f"p50 {itl['p50']:.1f} ms, p95 {itl['p95']:.1f} ms at {results.itl['rate']:g} req/s",
                     verdict(ratio, TARGETS["itl_ratio"], higher_is_better=False)])
    for label, record in results.chunking.items():
        itl = record["summary"]["itl_ms"]
        ratio = itl["p95"] / itl["p50"] if itl.get("p50") else None
        rows.append([f"ITL p95 ÷ median, 1 in 8 prompts ~1,500 tokens, threshold {label}",
                     "≤ 2.5×" if label == "default" else "—", fmt(ratio, 2, "×"),
                     f"p50 {itl['p50']:.1f} ms, p95 {itl['p95']:.1f} ms, p99 {itl['p99']:.1f} ms",
                     verdict(ratio, TARGETS["itl_ratio"], higher_is_better=False) if label == "default" else "—"])
    if "on" in results.prefix and "off" in results.prefix:
        on, off = (results.prefix[k]["summary"]["ttft_ms"]["p50"] for k in ("on", "off"))
        ratio = off / on if on else None
        rows.append([f"TTFT p50, caching off ÷ on, shared {args.prefix_len}-token prefix", "≥ 3×",
                     fmt(ratio, 2, "×"), f"off {off:.0f} ms, on {on:.0f} ms", verdict(ratio, TARGETS["prefix"])])
    if "bf16" in results.quant and "int8" in results.quant:
        delta = results.quant["int8"]["perplexity"] / results.quant["bf16"]["perplexity"] - 1
        rows.append(["int8 perplexity vs bf16", "within 1%", f"{delta:+.2%}",
                     f"{results.quant['int8']['perplexity']:.3f} vs {results.quant['bf16']['perplexity']:.3f}",
                     verdict(abs(delta), TARGETS["int8_ppl"], higher_is_better=False)])
    table = markdown_table(["Target", "Wanted", "Measured", "Figures", "Verdict"], rows)
    if roof is not None:
        notes.append(
            f"Rooflines at batch {args.concurrency}: the compute roofline allows {roof['compute_bound_tps']:,.0f} "
            f"tok/s, the memory roofline {roof['memory_bound_tps']:,.0f} tok/s (a decode step reads all "
            f"{results.model['weight_bytes_bf16'] / 1e6:.0f} MB of bf16 weights once, whatever the batch). "
            + ("The memory roofline is the lower: at this batch a step is bound by memory reads, not by matmul "
               "throughput." if roof["memory_bound_tps"] < roof["compute_bound_tps"] else
               "The compute roofline is the lower: at this batch a step is bound by matmul throughput."))
        ceiling = min(roof["compute_bound_tps"], roof["memory_bound_tps"])
        for engine, key, label in (("hf-cb", "vs_hf_cb", "continuous batching"),
                                   ("hf-static", "vs_hf_static", "static batching")):
            peer = best_peer(results, engine)
            if peer is None:
                continue
            wanted = TARGETS[key] * peer.tokens_per_s
            notes.append(f"{TARGETS[key]:g}× transformers {label} ({peer.dtype}, {peer.tokens_per_s:.1f} tok/s) would "
                         f"be {wanted:,.0f} tok/s: {wanted / ceiling:.0%} of the lower roofline on this machine"
                         + (", more than the hardware allows." if wanted > ceiling else "."))
    return table, notes


def peers_table(results: Results, args) -> str:
    rows = []
    for r in results.peers:
        rows.append([et.ENGINE_LABELS[r.engine], r.dtype, fmt(r.tokens_per_s), fmt(r.seconds),
                     "ok" if r.complete else (r.error or "incomplete"), load_note(r.other_load)])
    if results.served:
        s = results.served["summary"]
        rows.insert(0, ["tokenmill serve + tokenmill bench", args.dtype, fmt(s["output_throughput"]),
                        fmt(s["duration_s"]), f"{s['failed']} failed",
                        f"server {load_note(results.served['cpu'].get('server'))}, bench client and others "
                        f"{load_note(results.served['cpu'].get('other'))}"])
    return markdown_table(["Engine", "dtype", "Output tok/s", "Wall s", "Status", "CPU"], rows)


def served_table(records: list[tuple[str, dict]]) -> str:
    rows = []
    for label, record in records:
        s = record["summary"]
        rows.append([label, fmt(s["output_throughput"]), fmt(s["ttft_ms"]["p50"], 0), fmt(s["ttft_ms"]["p95"], 0),
                     fmt(s["itl_ms"]["p50"]), fmt(s["itl_ms"]["p95"]), fmt(s["itl_ms"].get("p99")),
                     fmt(s["e2e_ms"]["p50"], 0), str(s["completed"] if "completed" in s else "-"),
                     str(s["failed"])])
    return markdown_table(["Run", "Output tok/s", "TTFT p50 ms", "TTFT p95 ms", "ITL p50 ms", "ITL p95 ms",
                           "ITL p99 ms", "E2E p50 ms", "Completed", "Failed"], rows)


def single_table(results: Results) -> str:
    rows = [[name, fmt(v["tokens_per_s"]), fmt(1000 / v["tokens_per_s"]), load_note(v.get("other"))]
            for name, v in sorted(results.single.items(), key=lambda kv: -kv[1]["tokens_per_s"])]
    return markdown_table(["Single stream", "tok/s", "ms/token", "Other CPU load"], rows)


def quant_table(results: Results, args) -> str:
    base = results.quant.get("bf16")
    rows = []
    for method, row in results.quant.items():
        ppl_delta = "" if base is None or method == "bf16" else f" ({row['perplexity'] / base['perplexity'] - 1:+.2%})"
        rows.append([method, f"{row['weight_bytes'] / 2**20:,.0f} MiB", fmt(row["batch_tps"]), fmt(row["single_tps"]),
                     f"{row['perplexity']:.3f}{ppl_delta}",
                     f"{row['agree_all']}/{row['num_prompts']} (mean {row['agree_mean']:.1f} tokens)"])
    return markdown_table(["Weights", "Bytes in memory", f"tok/s at batch {args.concurrency}", "tok/s at batch 1",
                           "Perplexity", "Greedy agreement with bf16, first 32 tokens"], rows)


def profile_table(results: Results) -> str:
    labels = list(results.profiles)
    if not labels:
        return ""
    rows = []
    for i, category in enumerate(results.profiles[labels[0]].rows()):
        row = [category[0]]
        for label in labels:
            name, ms, share = results.profiles[label].rows()[i]
            row.append(f"{ms:.2f} ({share:.0%})")
        rows.append(row)
    rows.append(["profiled step"] + [f"{results.profiles[lb].profiled_ms_per_step:.2f}" for lb in labels])
    rows.append(["unprofiled step"] + [f"{results.profiles[lb].wall_ms_per_step:.2f}" for lb in labels])
    return markdown_table(["Decode step, bf16 (ms, share)"] + labels, rows)


STREAMING_TEXT = (
    "Poisson arrivals at the rate that keeps about 32 requests in flight (32 / the closed-loop run's mean request "
    "time). `long_prompts.jsonl` is written by the script: the same ~40-word prompts, but one request in 8 brings "
    "~1,500 words, read while the other streams decode; `default` is the CPU default of "
    "`--long-prefill-token-threshold` (128). Reading a long prompt in one step freezes every stream for over a "
    "second now and then (ITL p99) and makes the short requests behind it wait (TTFT); in chunks, the freezes are "
    "short but many (ITL p95). Prefix caching: 8 streams, prompts behind a shared ~500-token prefix.")


def render(results: Results, args, started: str) -> str:
    import torch
    import transformers

    lines = [
        "## CPU performance: served throughput, rooflines, single stream, streaming, prefix caching, quantization",
        "",
        f"Written by `benchmarks/cpu_performance.py` on {started}:",
        "",
        "```bash",
        "python benchmarks/cpu_performance.py " + " ".join(shlex.quote(a) for a in shown_arguments(sys.argv[1:])),
        "```",
        "",
        (f"Machine: {cpu_model()} ({os.cpu_count()} cores), torch {torch.__version__}, transformers "
         f"{transformers.__version__}, Python {platform.python_version()}. Default model: Gemma 3 270M (Q4_K_M GGUF, "
         "dequantized). Before each timed call the script waits for other processes to leave the CPU."),
        "",
    ]
    if results.peak:
        p = results.peak
        lines += [(f"Machine peaks measured in this run (`tokenmill plan --measure-device`): bf16 matmul "
                   f"{p['bf16_tflops']:.2f} TFLOP/s, fp32 {p['fp32_tflops']:.2f} TFLOP/s, memory read "
                   f"{p['bandwidth_gb_s']:.1f} GB/s."), ""]
    table, notes = targets_table(results, args)
    lines += ["### Targets", "", table, ""] + [f"- {n}" for n in notes] + [""]
    if results.served or results.peers:
        lines += [f"### Throughput at {args.concurrency} concurrent requests", "",
                  (f"tokenmill through `tokenmill serve` and `tokenmill bench` ({args.concurrency} in flight, "
                   f"{args.concurrency * args.requests_per_user} requests, ~{args.prompt_len}-token synthetic prompts, "
                   f"{args.output_len} output tokens, `--ignore-eos`, no logprobs); the transformers peers offline "
                   f"on {args.concurrency} prompts of {args.prompt_len}±2 tokens cut from English sentences, "
                   f"{args.output_len} tokens each, EOS never chosen (benchmarks/engine_throughput.py's runners): "
                   "a peer without the HTTP layer has the easier task."), ""]
        if results.served:
            lines += ["```bash", results.served["serve"], results.served["bench"], "```", ""]
        lines += [peers_table(results, args), ""]
    if results.single:
        lines += ["### Single stream", "",
                  (f"One request, {args.output_len} output tokens after a ~{args.prompt_len}-token prompt: tokenmill "
                   "`LLM.generate`, transformers `model.generate` (greedy, `min_new_tokens = max_new_tokens`)."), "",
                  single_table(results), ""]
    served_records = []
    if results.itl:
        served_records.append((f"Poisson arrivals at {results.itl['rate']:g} req/s, ≤ {args.concurrency} in flight",
                               results.itl))
    for label, record in results.chunking.items():
        served_records.append((f"1 in 8 prompts ~1,500 tokens, `--long-prefill-token-threshold` {label}", record))
    for state in ("on", "off"):
        if state in results.prefix:
            served_records.append((f"shared {args.prefix_len}-token prefix, prefix caching {state}",
                                   results.prefix[state]))
    if served_records:
        lines += ["### Streaming and prefix caching, served", "", STREAMING_TEXT, "", "```bash"]
        for _, record in served_records:
            lines += [record["serve"], record["bench"]]
        lines += ["```", "", served_table(served_records), ""]
    if results.quant:
        lines += ["### Quantized weights", "",
                  (f"Weight-only quantization of the decoder projections (`--quantization int8|int4`); the tied "
                   "embedding / output layer stays in bf16 (it is 168M of the 268M parameters; quantizing it cost more "
                   "quality and, at batch 32, more time than it saved). Bytes in memory: every parameter and buffer "
                   "of the loaded model, including the output layer's pre-packed copy. Perplexity: "
                   f"`benchmarks/data/quality_text.txt` ({next(iter(results.quant.values()))['text_tokens']:,} "
                   "tokens) in windows of 1024 through the engine's own forward path. Agreement: greedy, 32 tokens of "
                   "20 prompts, the number of prompts whose 32 tokens all equal bf16's, and the mean length of the "
                   "common start. The bundled file already stores its decoder projections quantized (tensors by "
                   f"format: {results.model.get('formats', 'unknown')}); int4 puts 5-, 6- and 8-bit weights on a "
                   "4-bit grid, which is where its perplexity goes, while 255 levels per output channel keep them "
                   "nearly intact."),
                  "", quant_table(results, args), ""]
    if results.profiles:
        lines += ["### Where a decode step's time goes", "",
                  ("`tokenmill.engine.profiler.profile_steps` over 20 decode steps (also printed by `--profile`); "
                   "the profiler adds a little time per operator, hence both step times."), "",
                  profile_table(results), ""]
    if results.errors:
        lines += [f"- Failed: {e}" for e in results.errors] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)} (default all)")
    p.add_argument("--profile", action="store_true", help="print the per-step time breakdown (adds the profile part)")
    p.add_argument("--dtype", default="auto", help="tokenmill serve --dtype (default auto)")
    p.add_argument("--quant-dtype", default="bfloat16",
                   help="compute dtype of the quantization runs (default bfloat16)")
    p.add_argument("--methods", default="bf16,int8,int4,fp32",
                   help="weight rows of the quant part, bf16 first (the reference) (default bf16,int8,int4,fp32)")
    p.add_argument("--peer-dtypes", default="float32,bfloat16", help="dtypes the transformers peers run in")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent requests (default 32)")
    p.add_argument("--requests-per-user", type=int, default=2, help="served requests per unit of concurrency")
    p.add_argument("--prompt-len", type=int, default=40, help="prompt tokens (default 40)")
    p.add_argument("--output-len", type=int, default=128, help="output tokens per request (default 128)")
    p.add_argument("--warmup", type=int, default=4, help="warm-up requests per served run (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--itl-rate", type=float, default=None,
                   help="Poisson arrival rate of the streaming run (default: concurrency / mean E2E of the served run)")
    p.add_argument("--itl-requests", type=int, default=96, help="requests of the streaming run (default 96)")
    p.add_argument("--prefix-len", type=int, default=500, help="shared prefix tokens (default 500)")
    p.add_argument("--prefix-concurrency", type=int, default=8, help="concurrency of the prefix runs (default 8)")
    p.add_argument("--prefix-requests", type=int, default=32, help="requests per prefix run (default 32)")
    p.add_argument("--idle-threshold", type=float, default=0.15)
    p.add_argument("--idle-wait", type=float, default=120.0)
    p.add_argument("--attempts", type=int, default=2, help="peer runs repeated when disturbed (default 2)")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--bench-timeout", type=float, default=1200.0)
    p.add_argument("--json", type=Path, default=None, help="also write the raw figures to this JSON file")
    p.add_argument("--write-docs", action="store_true", help="write this benchmark's section of the docs")
    p.add_argument("--docs-path", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md")
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if args.profile and "profile" not in args.parts:
        args.parts.append("profile")
    unknown = [x for x in args.parts if x not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.peer_dtypes = [d.strip() for d in args.peer_dtypes.split(",") if d.strip()]
    if any(m not in METHODS for m in args.methods):
        p.error(f"--methods takes names from {', '.join(METHODS)}")
    if any(d not in ("float32", "bfloat16") for d in args.peer_dtypes):
        p.error("--peer-dtypes takes float32 and/or bfloat16")
    if min(args.concurrency, args.prompt_len, args.output_len, args.requests_per_user) < 1:
        p.error("--concurrency, --prompt-len, --output-len and --requests-per-user must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from tokenmill.models.loader import default_model_path

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)
    started = _dt.date.today().isoformat()
    model_path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path.parent, gguf_file=model_path.name)
    workload = et.build_workload(tokenizer, args.concurrency, args.prompt_len, args.output_len)
    warm = et.warmup_prompts(tokenizer)
    results = Results(model=model_facts())
    try:
        results.model["formats"] = source_formats()
    except Exception as error:  # noqa: BLE001 - a description only
        results.model["formats"] = f"unreadable ({type(error).__name__})"
    workdir = Path(tempfile.mkdtemp(prefix="cpu_performance."))

    def attempt(name: str, fn):
        if name not in args.parts:
            return None
        _log(f"part {name}")
        try:
            return fn()
        except Exception as error:  # noqa: BLE001 - report it, go on with the other parts
            results.errors.append(f"{name}: {type(error).__name__}: {' '.join(str(error).split())[:400]}")
            _log(results.errors[-1])
            return None

    results.peak = attempt("peak", measure_peak)
    results.served = attempt("served", lambda: run_served(args, workdir))
    results.peers = attempt("peers", lambda: run_peers(args, tokenizer, workload, warm, model_path)) or []
    single_hf = attempt("single", lambda: hf_single(args, tokenizer, workload.prompts[0], model_path))
    results.single.update(single_hf or {})
    if "single" in args.parts and "quant" not in args.parts:
        def tokenmill_single():
            llm = tokenmill_llm("bf16", args.quant_dtype)
            tps, other, _ = timed_generate(args, llm, workload.prompts[:1], args.output_len)
            results.single["tokenmill bf16"] = {"tokens_per_s": tps, "other": other}
        attempt("single", tokenmill_single)
    results.itl = attempt("itl", lambda: run_itl(args, workdir, results.served))
    results.chunking = attempt("chunking", lambda: run_chunking(args, workdir, results.served)) or {}
    results.prefix = attempt("prefix", lambda: run_prefix(args, workdir)) or {}
    attempt("quant", lambda: run_quant(args, tokenizer, workload, results))
    attempt("profile", lambda: run_profiles(args, workload, results))

    section = render(results, args, started)
    print(section)
    if args.json:
        raw = {"peak": results.peak, "model": results.model, "served": results.served, "single": results.single,
               "itl": results.itl, "chunking": results.chunking, "prefix": results.prefix, "quant": results.quant,
               "errors": results.errors,
               "peers": [{"engine": r.engine, "dtype": r.dtype, "tokens_per_s": r.tokens_per_s,
                          "seconds": r.seconds, "other_load": r.other_load} for r in results.peers],
               "profiles": {k: {"ms_per_step": v.ms_per_step, "profiled_ms": v.profiled_ms_per_step,
                                "wall_ms": v.wall_ms_per_step} for k, v in results.profiles.items()}}
        args.json.write_text(json.dumps(raw, indent=2, default=str))
    if args.write_docs:
        write_marked_section(args.docs_path, SECTION, section)
        _log(f"wrote the {SECTION} section of {args.docs_path}")
    return 1 if results.errors else 0


if __name__ == "__main__":
    sys.exit(main())
