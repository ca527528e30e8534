#!/usr/bin/env python
"""Online serving: `tokenmill serve` vs. `transformers serve`, one workload, one sweep, side by side.

Each server runs in turn, alone, on the default model (Gemma 3 270M, Q4_K_M
GGUF, dequantized to float32 by each) and is measured by the same
`tokenmill bench` command line: the same prompts (same seed), the same
concurrency sweep, exactly --output-len tokens per request, greedy.

  tokenmill      `tokenmill serve` on the GGUF file.
  transformers   `transformers serve --continuous-batching` (its paged-attention
                 continuous batching) on the same weights. It cannot open this
                 GGUF itself (the GGUF-derived config names no architecture) and
                 `save_pretrained` refuses a GGUF-loaded model, so the script
                 loads the GGUF with transformers' own GGUF loader once, drops
                 the quantizer marker and saves a float32 Hugging Face
                 directory (a temporary one, or --hf-dir to keep and reuse it).

Exactly N output tokens: tokenmill gets `ignore_eos`; transformers serve
rejects unknown fields, so it gets a request `generation_config` without an
EOS token, which its continuous batching honours. Neither run asks for
logprobs (transformers serve does not return them); both count each chunk's
tokens with the same local tokenizer (the exported directory's). Each server
gets --threads intra-op threads (OMP_NUM_THREADS) and its own warm-up requests.

    python benchmarks/serving_vs_peers.py                       # a few minutes
    python benchmarks/serving_vs_peers.py --write-docs          # and update docs/benchmarks.md
    python benchmarks/serving_vs_peers.py --sweep 1,2 --output-len 8 --requests-per-user 1   # smoke test
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tokenmill.bench.config import MaxUsersSearch  # noqa: E402
from tokenmill.bench.machine import CpuShares, cpu_model  # noqa: E402
from tokenmill.bench.markdown import markdown_table, write_marked_section  # noqa: E402
from tokenmill.bench.sizing import judge  # noqa: E402
from tokenmill.bench.process import shell_line, stop_process, unused_port, wait_until_healthy  # noqa: E402

SERVERS = ("tokenmill", "transformers")
SECTION = "serving_vs_peers"
TOKENMILL_MODEL_NAME = "gemma-3-270m"


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class ServerRun:
    name: str
    command: list[str] = field(default_factory=list)  # as shown in the docs: `tokenmill serve ...`
    bench_command: list[str] = field(default_factory=list)  # `tokenmill bench ...`
    document: dict | None = None
    error: str | None = None
    load_seconds: float | None = None
    cpu: dict = field(default_factory=dict)

    def runs_by_concurrency(self) -> dict[int, dict]:
        if self.document is None:
            return {}
        return {run["load"]["concurrency"]: run["summary"] for run in self.document["runs"]}


def export_hf_directory(target: Path) -> Path:
    """The default GGUF as a float32 Hugging Face directory that `transformers serve` can load."""
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        _log(f"reusing the Hugging Face export in {target}")
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from tokenmill.models.loader import default_model_path

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    gguf = default_model_path()
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain float32 tensors by now; only the GGUF marker blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(target)
    _log(f"exported {gguf.name} to {target} in {time.perf_counter() - started:.0f}s")
    return target


def server_command(name: str, port: str, hf_dir: str, args) -> list[str]:
    """The server's command line, starting with the command's own name (`tokenmill` or `transformers`)."""
    if name == "tokenmill":
        return ["tokenmill", "serve", "--host", "127.0.0.1", "--port", port, "--max-model-len",
                str(args.max_model_len)]
    return ["transformers", "serve", "--continuous-batching", "--device", "cpu", "--dtype", "float32",
            "--host", "127.0.0.1", "--port", port, hf_dir]


def executable(command: list[str]) -> list[str]:
    """`tokenmill ...` / `transformers ...` run with this interpreter, whatever is on PATH."""
    if command[0] == "tokenmill":
        return [sys.executable, "-m", "tokenmill.cli", *command[1:]]
    return [sys.executable, "-c", "from transformers.cli.transformers import main; main()", *command[1:]]


def bench_command(name: str, port: str, hf_dir: str, out: str, args) -> list[str]:
    model = TOKENMILL_MODEL_NAME if name == "tokenmill" else hf_dir
    command = ["tokenmill", "bench", "--base-url", f"http://127.0.0.1:{port}", "--model", model,
               "--endpoint", "completions", "--sweep", "concurrency=" + ",".join(map(str, args.sweep)),
               "--num-requests", f"{args.requests_per_user}x", "--input-len", str(args.input_len),
               "--output-len", str(args.output_len), "--warmup", str(args.warmup), "--seed", str(args.seed),
               "--no-logprobs", "--tokenizer", hf_dir, "--timeout", f"{args.request_timeout:g}s",
               "--no-progress", "--out", out]
    if name == "tokenmill":
        command.append("--ignore-eos")
    else:
        command += ["--extra-body", json.dumps({"generation_config": json.dumps({"do_sample": False})})]
    return command


def run_server(name: str, hf_dir: Path, workdir: Path, args) -> ServerRun:
    port = unused_port()
    out = workdir / f"{name}.json"
    # The docs show placeholders; the processes get the real port and paths.
    run = ServerRun(name, command=server_command(name, "$PORT", "$HF_DIR", args),
                    bench_command=bench_command(name, "$PORT", "$HF_DIR", f"{name}.json", args))
    server_argv = executable(server_command(name, str(port), str(hf_dir), args))
    bench_argv = executable(bench_command(name, str(port), str(hf_dir), str(out), args))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    log = workdir / f"{name}.log"
    _log(f"{name}: starting {shlex.join(server_argv)}")
    started = time.perf_counter()
    with log.open("w") as log_file:
        process = subprocess.Popen(server_argv, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    try:
        wait_until_healthy(process, f"http://127.0.0.1:{port}", args.start_timeout, log)
        run.load_seconds = time.perf_counter() - started
        _log(f"{name}: ready after {run.load_seconds:.0f}s; benching")
        with CpuShares({"server": process.pid}) as cpu:
            result = subprocess.run(bench_argv, capture_output=True, text=True, env=env, timeout=args.bench_timeout,
                                    check=False)
        run.cpu = cpu.shares
        if result.returncode != 0:
            raise RuntimeError(f"tokenmill bench failed: {result.stderr.strip()[-500:]}")
        run.document = json.loads(out.read_text())
        print(result.stdout, flush=True)
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as error:
        run.error = " ".join(str(error).split())
        _log(f"{name}: {run.error}")
    finally:
        stop_process(process)
    return run


def _fmt(summary: dict | None, key: str, stat: str | None = None, digits: int = 0) -> str:
    if summary is None:
        return "-"
    value = summary[key] if stat is None else (summary[key] or {}).get(stat)
    return "-" if value is None else f"{value:,.{digits}f}"


def results_table(runs: list[ServerRun], sweep: list[int]) -> str:
    rows = []
    for concurrency in sweep:
        for run in runs:
            s = run.runs_by_concurrency().get(concurrency)
            failed = "-" if s is None else str(s["failed"])
            rows.append([str(concurrency), run.name, _fmt(s, "output_throughput", digits=1),
                         _fmt(s, "request_throughput", digits=2), _fmt(s, "ttft_ms", "p50"),
                         _fmt(s, "ttft_ms", "p95"), _fmt(s, "itl_ms", "p50", 1), _fmt(s, "itl_ms", "p95", 1),
                         _fmt(s, "tpot_ms", "p50", 1), _fmt(s, "decode_tps_per_user", "p95", 1),
                         _fmt(s, "e2e_ms", "p95"), failed])
    return markdown_table(["concurrency", "server", "output tok/s", "req/s", "TTFT p50 ms", "TTFT p95 ms",
                           "ITL p50 ms", "ITL p95 ms", "TPOT p50 ms", "decode tok/s/user p95", "E2E p95 ms",
                           "failed"], rows)


def speedups(runs: list[ServerRun], sweep: list[int]) -> str:
    by_name = {run.name: run.runs_by_concurrency() for run in runs}
    if "tokenmill" not in by_name or "transformers" not in by_name:
        return ""
    parts = []
    for concurrency in sweep:
        ours, theirs = by_name["tokenmill"].get(concurrency), by_name["transformers"].get(concurrency)
        if ours and theirs and theirs["output_throughput"] > 0:
            parts.append(f"{ours['output_throughput'] / theirs['output_throughput']:.1f}× at {concurrency}")
    return ("tokenmill's output throughput relative to transformers serve: " + ", ".join(parts) + ".") if parts \
        else ""


def users_within_target(run: ServerRun, target: MaxUsersSearch) -> str:
    passing = [c for c, summary in run.runs_by_concurrency().items() if judge(summary, target).passed]
    return str(max(passing)) if passing else "none of the swept"


def render_section(args, runs: list[ServerRun], started: str) -> str:
    import torch
    import transformers

    target = MaxUsersSearch(per_user_tps=args.per_user_tps, ttft_p95=args.ttft_p95_ms / 1e3)
    threads = (f"{args.threads} intra-op thread{'s' if args.threads > 1 else ''} (`OMP_NUM_THREADS`)"
               if args.threads else "torch's default intra-op threads")
    lines = [
        "## Online serving: tokenmill serve vs. transformers serve",
        "",
        f"Written by `benchmarks/serving_vs_peers.py` on {started}:",
        "",
        "```bash",
        "python benchmarks/serving_vs_peers.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "```",
        "",
        (f"Machine: {cpu_model()} ({os.cpu_count()} cores), torch {torch.__version__}, transformers "
         f"{transformers.__version__}, Python {platform.python_version()}. Each server runs alone (one after the "
         f"other), float32, {threads}, on the default model (Gemma 3 270M Q4_K_M GGUF, dequantized by each)."),
        "",
        (f"Workload, identical for both: the completions endpoint, synthetic prompts of about {args.input_len} "
         f"tokens (seed {args.seed}), exactly {args.output_len} output tokens per request (tokenmill "
         "`ignore_eos`; transformers a request `generation_config` without EOS), greedy; a sweep over "
         f"concurrency {', '.join(map(str, args.sweep))} with {args.requests_per_user} request(s) per concurrent "
         f"user at each point, after {args.warmup} warm-up request(s). No logprobs requested; output counts from "
         "each server's `usage`, per-chunk token counts from the same local tokenizer. Metric definitions: "
         "[metrics.md](metrics.md#benchmark-metrics)."),
        "",
        ("`transformers serve` cannot open the GGUF file itself (it reads `config.architectures`, which a "
         "GGUF-derived config lacks), and `save_pretrained` refuses a GGUF-loaded model; so the script loads the "
         "GGUF once with transformers' own GGUF loader (float32), drops the quantizer marker and saves a Hugging "
         "Face directory, `$HF_DIR`, which `transformers serve` loads with continuous batching on."),
        "",
        "Commands (`$PORT` is a free port, `$HF_DIR` the exported directory):",
        "",
        "```bash",
    ]
    for run in runs:
        lines += [shell_line(run.command), shell_line(run.bench_command)]
    lines += ["```", "", results_table(runs, args.sweep), ""]
    notes = []
    ratio = speedups(runs, args.sweep)
    if ratio:
        notes.append(ratio)
    for run in runs:
        if run.error is not None:
            notes.append(f"{run.name} produced no numbers: {run.error}")
            continue
        verdict = users_within_target(run, target)
        notes.append(f"{run.name}: ready {run.load_seconds:.0f} s after start; largest swept concurrency keeping "
                     f"p95 decode >= {args.per_user_tps:g} tok/s per user and p95 TTFT <= {args.ttft_p95_ms:g} ms "
                     f"with no failure: {verdict}. Other processes used "
                     f"{'-' if run.cpu.get('other') is None else format(run.cpu['other'], '.0%')} of the CPU "
                     "during its bench.")
        outputs = {round(run_doc["summary"]["output_tokens"]["mean"], 2) for run_doc in run.document["runs"]
                   if run_doc["summary"]["output_tokens"]}
        if outputs != {float(args.output_len)}:
            notes.append(f"{run.name} returned on average {sorted(outputs)} output tokens, not {args.output_len}.")
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated, from tokenmill,transformers")
    parser.add_argument("--sweep", default="1,2,4,8", help="concurrencies (default 1,2,4,8)")
    parser.add_argument("--requests-per-user", type=int, default=3,
                        help="requests per unit of concurrency at each point (default 3)")
    parser.add_argument("--input-len", type=int, default=64, help="prompt tokens (default 64)")
    parser.add_argument("--output-len", type=int, default=32, help="output tokens per request (default 32)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up requests per server (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of each server; 0 leaves torch's default (default 1)")
    parser.add_argument("--max-model-len", type=int, default=1024, help="tokenmill --max-model-len (default 1024)")
    parser.add_argument("--per-user-tps", type=float, default=10.0,
                        help="per-user decode target for the 'users within target' line (default 10)")
    parser.add_argument("--ttft-p95-ms", type=float, default=500.0, help="p95 TTFT target in ms (default 500)")
    parser.add_argument("--hf-dir", type=Path, default=None,
                        help="where to keep the Hugging Face export for transformers serve (default: a temporary "
                             "directory, deleted at the end)")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds a server may take to load")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="bench --timeout in seconds")
    parser.add_argument("--bench-timeout", type=float, default=1800.0, help="seconds one server's bench may take")
    parser.add_argument("--write-docs", action="store_true", help="write this benchmark's section of the docs")
    parser.add_argument("--docs-path", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md",
                        help="docs file for --write-docs (default docs/benchmarks.md)")
    args = parser.parse_args(argv)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not args.servers or any(s not in SERVERS for s in args.servers):
        parser.error(f"--servers takes names from {', '.join(SERVERS)}")
    try:
        args.sweep = [int(c) for c in args.sweep.split(",")]
    except ValueError:
        parser.error("--sweep takes comma-separated integers")
    if min(args.sweep + [args.requests_per_user, args.input_len, args.output_len]) < 1:
        parser.error("--sweep, --requests-per-user, --input-len and --output-len must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = _dt.date.today().isoformat()
    workdir = Path(tempfile.mkdtemp(prefix="serving_vs_peers."))
    hf_dir = args.hf_dir or workdir / "hf-export"
    try:
        os.environ["HF_HUB_OFFLINE"] = "1"
        export_hf_directory(hf_dir)
        runs = [run_server(name, hf_dir, workdir, args) for name in args.servers]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    section = render_section(args, runs, started)
    print(section)
    if args.write_docs:
        write_marked_section(args.docs_path, SECTION, section)
        _log(f"wrote the {SECTION} section of {args.docs_path}")
    return 0 if all(run.error is None for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
