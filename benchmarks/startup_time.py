"""Startup time of `tokenmill serve` for the default model: seconds from process
start to the first `/health` 200, cold (empty conversion cache: the GGUF is
dequantized and the tokenizer converted) and warm (served from the cache).

    python benchmarks/startup_time.py --runs 3 --write-docs
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tokenmill.bench.markdown import markdown_table, write_marked_section
from tokenmill.bench.process import stop_process, wait_until_healthy
from tokenmill.bench.process import unused_port as free_port

ROOT = Path(__file__).resolve().parent.parent
TARGET_WARM_S = 8.0


def time_to_ready(cache_dir: str, timeout_s: float = 300.0) -> float:
    """Start a server with this conversion cache; return seconds until /health is 200."""
    port = free_port()
    env = {**os.environ, "TOKENMILL_CACHE_DIR": cache_dir}
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "serve", "--port", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_healthy(process, f"http://127.0.0.1:{port}", timeout_s, interval_s=0.05)
        return time.perf_counter() - start
    finally:
        stop_process(process, timeout_s=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="measurements of each kind (cold and warm)")
    parser.add_argument("--write-docs", action="store_true", help="write the section of docs/benchmarks.md")
    args = parser.parse_args()

    cold, warm = [], []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="tokenmill-cache-") as cache_dir:
            cold.append(time_to_ready(cache_dir))
            warm.append(time_to_ready(cache_dir))
        print(f"run {run + 1}: cold {cold[-1]:.1f} s, warm {warm[-1]:.1f} s", flush=True)

    rows = [[kind, f"{min(values):.1f}", f"{statistics.median(values):.1f}", f"{max(values):.1f}"]
            for kind, values in (("cold (first conversion)", cold), ("warm (cached)", warm))]
    table = markdown_table(["start", "min s", "median s", "max s"], rows)
    print(table)
    verdict = "meets" if statistics.median(warm) < TARGET_WARM_S else "misses"
    if args.write_docs:
        body = f"""## Server startup: process start to `/health` 200

Written by `benchmarks/startup_time.py` on {time.strftime('%Y-%m-%d')}:

```bash
python benchmarks/startup_time.py --runs {args.runs} --write-docs
```

Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}.
Default model (Gemma 3 270M GGUF), float32. Cold: an empty `TOKENMILL_CACHE_DIR`, so the GGUF is
dequantized, the tokenizer converted and both written to the cache. Warm: the same cache again.
Each figure includes Python and torch start-up; {args.runs} runs of each.

{table}

The warm start {verdict} the {TARGET_WARM_S:.0f} s target (median {statistics.median(warm):.1f} s)."""
        write_marked_section(ROOT / "docs" / "benchmarks.md", "startup_time", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
