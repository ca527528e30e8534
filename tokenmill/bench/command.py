"""`tokenmill bench`: parse the flags, run, print the tables, write the requested files.

Exit status 0 when the runs completed, even if requests failed (failures are
results: they are counted and reported); problems with the arguments, the
server or the dataset raise `BenchError`, which the command line prints as one
line before exiting with status 2.
"""
from __future__ import annotations

import argparse
import asyncio
import sys

from tokenmill.bench.execute import execute
from tokenmill.bench.options import config_from_args
from tokenmill.bench.report import dumps_document, render_text, write_csv, write_json


def run_bench(args: argparse.Namespace) -> int:
    config = config_from_args(args, progress_allowed=sys.stdout.isatty())
    result = asyncio.run(execute(config))
    if config.json_output:
        sys.stdout.write(dumps_document(result, include_requests=False).decode() + "\n")
    else:
        print(render_text(result))
    written = []
    if config.out is not None:
        write_json(result, config.out)
        written.append(str(config.out))
    if config.csv is not None:
        write_csv(result, config.csv)
        written.append(str(config.csv))
    if config.plot_dir is not None:
        from tokenmill.bench.plots import write_plots

        written += [str(path) for path in write_plots(result, config.plot_dir)]
    if written:
        print("wrote " + ", ".join(written), file=sys.stderr)
    return 0
