"""`tokenmill plan`: flags and the command.

Modes: one scenario (`--gpu`), a comparison (`--compare`), `--calibrate RESULTS`,
`--measure-device`, `--list`. Output: terminal text (default), `--json`,
`--markdown`, and `--plot DIR` alongside any of them. Every input problem is a
`PlanError` (a ValueError): the command line prints it as one line and exits 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tokenmill.planner.errors import PlanError

DEFAULT_MODEL = "gemma-3-270m"


def _one_line_error(prog: str):
    """argparse prints the whole usage before its message; the planner's errors are one line."""
    def error(message: str):
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)

    return error


def _names(text: str | None) -> list[str] | None:
    return [name.strip() for name in text.split(",") if name.strip()] if text else None


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.error = _one_line_error("tokenmill plan")
    mode = parser.add_argument_group("mode (default: one scenario on --gpu)")
    mode.add_argument("--compare", action="store_true",
                      help="compare every priced GPU and precision (or those in --gpu / --precision), "
                           "cheapest first: which GPU should I pick?")
    mode.add_argument("--calibrate", metavar="RESULTS",
                      help="fit the efficiency factors of --gpu (default cpu) to a tokenmill bench sweep "
                           "(its --out JSON) and report predicted vs measured")
    mode.add_argument("--measure-device", action="store_true",
                      help="measure this machine's CPU (memory bandwidth, fp32/bf16 matmul peak) and save it "
                           "as the 'cpu' device profile")
    mode.add_argument("--list", action="store_true", help="print the catalogs (devices, models, precisions, APIs)")

    deployment = parser.add_argument_group("deployment")
    deployment.add_argument("--model", default=DEFAULT_MODEL,
                            help="catalog model, Hugging Face directory / config.json, or .gguf file "
                                 f"(default {DEFAULT_MODEL}, tokenmill's default model)")
    deployment.add_argument("--precision", default=None,
                            help="weight precision (default: fp32 on cpu, bf16 on GPUs; with --compare a comma "
                                 "list, default all)")
    deployment.add_argument("--gpu", default=None,
                            help="device name (see --list); with --compare a comma list, default all priced GPUs")
    deployment.add_argument("--tensor-parallel", default="1",
                            help="devices per replica: 1, 2, 4, 8 or auto (smallest that fits); default 1")
    deployment.add_argument("--tokens-per-s-per-user", type=float, default=20.0,
                            help="decode speed each user must keep; also the speed Little's law assumes (default 20)")
    deployment.add_argument("--redundancy", action="store_true", help="add one spare replica (N+1)")
    deployment.add_argument("--gpu-memory-utilization", type=float, default=0.90,
                            help="share of device memory the engine uses (default 0.90)")
    deployment.add_argument("--runtime-reserve-gb", type=float, default=1.0,
                            help="memory per device for activations and runtime (default 1.0)")
    deployment.add_argument("--kv-cache-gb", type=float, default=None,
                            help="fixed KV pool per replica instead of what memory leaves "
                                 "(tokenmill's --kv-cache-memory; 2.147 for its 2 GiB default)")
    deployment.add_argument("--kv-cache-dtype", default="auto",
                            help="KV element type: auto (the precision's), fp32, bf16, fp16, fp8, int8")
    deployment.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    deployment.add_argument("--max-num-seqs", type=int, default=256, help="engine cap on running sequences (256)")
    deployment.add_argument("--efficiency", default=None,
                            help="roofline factors, e.g. bandwidth=0.7,compute=0.5,step_overhead_ms=0,"
                                 "sequence_overhead_ms=0 (default: the device profile's, else these)")

    traffic = parser.add_argument_group("traffic (defaults: the seeds' worked example)")
    traffic.add_argument("--dau", type=float, default=1000, help="daily active users (default 1000)")
    traffic.add_argument("--requests-per-user", type=float, default=3, help="requests per user per day (default 3)")
    traffic.add_argument("--input-tokens", type=int, default=500, help="prompt tokens per request (default 500)")
    traffic.add_argument("--output-tokens", type=int, default=200, help="generated tokens per request (default 200)")
    traffic.add_argument("--peak-share", type=float, default=0.70,
                         help="share of daily requests in the peak window (default 0.70)")
    traffic.add_argument("--peak-hours", type=float, default=8, help="length of the peak window (default 8)")
    traffic.add_argument("--hours-per-month", type=float, default=720, help="billed hours per month (default 720)")

    money = parser.add_argument_group("prices")
    money.add_argument("--provider", default=None,
                       help="price to use: a provider of the device (see --list) or 'cheapest'; default the first "
                            "listed")
    money.add_argument("--price-point", default="mid", help="where in a price range: low, mid or high (default mid)")
    money.add_argument("--usd-per-hour", type=float, default=None, help="your own price per device-hour")
    money.add_argument("--api", default=None, help="APIs to compare with, comma list (default all in the catalog)")
    money.add_argument("--catalog", action="append", default=[], metavar="FILE",
                       help="your own catalog (YAML/JSON: devices, models, precisions, apis); entries replace "
                            "built-in ones of the same name; repeatable")
    money.add_argument("--device-profile", action="append", default=[], metavar="FILE",
                       help="a device profile written by --measure-device or --calibrate --out; repeatable")

    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print JSON (stable keys, docs/planner.md)")
    output.add_argument("--markdown", action="store_true", help="print Markdown")
    output.add_argument("--plot", metavar="DIR", default=None,
                        help="write monthly_cost_vs_dau.png and breakeven.png into DIR")
    output.add_argument("--out", metavar="FILE", default=None,
                        help="where --measure-device / --calibrate write the device profile "
                             "(default for --measure-device: the cache, used automatically)")


def _tensor_parallel(text: str) -> int | None:
    if text.strip().lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise PlanError(f"--tensor-parallel must be 1, 2, 4, 8 or auto, got {text!r}") from None


def _options(args: argparse.Namespace, efficiency_base=None):
    from tokenmill.planner.efficiency import parse_efficiency
    from tokenmill.planner.memory import MemoryOptions
    from tokenmill.planner.plan import DeploymentOptions

    memory = MemoryOptions(gpu_memory_utilization=args.gpu_memory_utilization,
                           runtime_reserve_gb=args.runtime_reserve_gb, kv_cache_gb=args.kv_cache_gb,
                           block_size=args.block_size, max_num_seqs=args.max_num_seqs)
    efficiency = parse_efficiency(args.efficiency, efficiency_base) if args.efficiency else None
    return DeploymentOptions(tensor_parallel=_tensor_parallel(args.tensor_parallel), memory=memory,
                             kv_cache_dtype=args.kv_cache_dtype.lower(), efficiency=efficiency,
                             tokens_per_s_per_user=args.tokens_per_s_per_user, redundancy=args.redundancy,
                             provider=args.provider, price_point=args.price_point.lower(),
                             usd_per_hour=args.usd_per_hour)


def _traffic(args: argparse.Namespace):
    from tokenmill.planner.traffic import Traffic

    return Traffic(daily_active_users=args.dau, requests_per_user_per_day=args.requests_per_user,
                   input_tokens=args.input_tokens, output_tokens=args.output_tokens, peak_share=args.peak_share,
                   peak_hours=args.peak_hours, hours_per_month=args.hours_per_month)


def _auto_precision(catalog, device, text: str | None):
    if text and text.lower() != "auto":
        return catalog.precision(text)
    return catalog.precision("fp32" if device.kind == "cpu" else "bf16")


def _print_catalog(catalog) -> None:
    print("Devices:")
    for device in catalog.devices:
        tflops = ", ".join(f"{key} {value:g}" for key, value in device.dense_tflops.items())
        flags = ", ".join(flag for flag, on in (("ECC", device.ecc), ("MIG", device.mig)) if on) or "no ECC/MIG"
        prices = "; ".join(price.describe() for price in device.prices) or "no price"
        print(f"  {device.name:<10} {device.label}: {device.memory_gb:g} GB, {device.memory_bandwidth_gb_per_s:,g} GB/s, "
              f"TFLOP/s {tflops}, {flags}; {prices} [{device.source}, {device.date}]")
    print("Models:")
    for model in catalog.models:
        print(f"  {model.name:<13} {model.label}: {model.parameters:,} parameters, {model.layers} layers, "
              f"{model.kv_heads} KV heads x {model.head_dim}, context {model.max_context:,} [{model.source}]")
    print("Precisions:")
    for precision in catalog.precisions:
        print(f"  {precision.name:<10} {precision.label}: {precision.effective_bits:.4g} bits/weight, "
              f"compute {precision.compute} [{precision.source}]")
    print("APIs ($ per 1M input / output tokens):")
    for api in catalog.apis:
        print(f"  {api.name:<14} {api.label}: ${api.usd_per_million_input:g} / ${api.usd_per_million_output:g} "
              f"[{api.source}, {api.date}]")


def _measure(args: argparse.Namespace) -> int:
    from tokenmill.planner.measure import measure_cpu, write_profile

    device = measure_cpu()
    path = write_profile(device, Path(args.out) if args.out else None)
    if args.json:
        print(json.dumps({"device": device.name, "label": device.label, "memory_gb": device.memory_gb,
                          "memory_bandwidth_gb_per_s": device.memory_bandwidth_gb_per_s,
                          "dense_tflops": dict(device.dense_tflops), "profile": str(path)}))
    else:
        tflops = ", ".join(f"{key} {value * 1e3:,.1f} GFLOP/s" for key, value in device.dense_tflops.items())
        print(f"{device.label}: memory {device.memory_gb:g} GB, bandwidth {device.memory_bandwidth_gb_per_s:g} GB/s, "
              f"matmul {tflops}")
        print(f"wrote {path}" + ("" if args.out else " (used for --gpu cpu from now on)"))
    return 0


def _calibrate(args: argparse.Namespace, catalog, model) -> int:
    from tokenmill.planner.calibration import calibrate, calibration_to_dict, read_measurements, render_calibration
    from tokenmill.planner.measure import write_profile
    from tokenmill.planner.plan import KV_CACHE_DTYPES

    device = catalog.device(args.gpu or "cpu")
    precision = _auto_precision(catalog, device, args.precision)
    options = _options(args)
    tensor_parallel = options.tensor_parallel or 1
    kv_bytes = KV_CACHE_DTYPES[options.kv_cache_dtype] or precision.kv_bytes
    points, skipped = read_measurements(args.calibrate)
    calibration = calibrate(model, precision, device, tensor_parallel, kv_bytes, points, skipped)
    title = f"{model.label} at {precision.name} on {device.label}: calibration on {args.calibrate}"
    if args.json:
        print(json.dumps({"tool": "tokenmill plan --calibrate", "model": model.name, "precision": precision.name,
                          "gpu": device.name, **calibration_to_dict(calibration)}, indent=2))
    else:
        print(render_calibration(calibration, title))
        print(f"use: --gpu {device.name} --efficiency {calibration.efficiency.describe()}")
    if args.out:
        path = write_profile(device, Path(args.out), calibration.efficiency)
        print(f"wrote {path} (pass it as --device-profile)", file=sys.stderr)
    return 0


def run_plan(args: argparse.Namespace) -> int:
    if args.measure_device:
        return _measure(args)
    from tokenmill.planner.architecture import resolve_model
    from tokenmill.planner.catalog import load_catalog
    from tokenmill.planner.plan import compare_deployments, comparison_devices, comparison_precisions, plan_deployment
    from tokenmill.planner.render import (
        comparison_document,
        render_comparison_markdown,
        render_comparison_text,
        render_markdown,
        render_text,
        single_document,
    )

    catalog = load_catalog([*args.catalog, *args.device_profile])
    if args.list:
        _print_catalog(catalog)
        return 0
    model = resolve_model(catalog, args.model)
    if args.calibrate:
        return _calibrate(args, catalog, model)
    traffic = _traffic(args)
    options = _options(args)
    apis = [catalog.api(name) for name in _names(args.api)] if args.api else list(catalog.apis)

    if args.compare:
        devices = comparison_devices(catalog, _names(args.gpu))
        precisions = comparison_precisions(catalog, _names(args.precision), model)
        plans = compare_deployments(model, devices, precisions, traffic, options, apis,
                                    [p for p in catalog.precisions if not p.from_file])
        if args.json:
            print(json.dumps(comparison_document(plans, traffic), indent=2))
        elif args.markdown:
            print(render_comparison_markdown(plans, traffic))
        else:
            print(render_comparison_text(plans, traffic))
        headline = next((plan for plan in plans if plan.feasible), plans[0])
    else:
        if not args.gpu:
            choices = ", ".join(device.name for device in catalog.devices)
            raise PlanError(f"give --gpu NAME (choose from: {choices}) or --compare")
        device = catalog.device(args.gpu)
        precision = _auto_precision(catalog, device, args.precision)
        headline = plan_deployment(model, precision, device, traffic, options, apis,
                                   [p for p in catalog.precisions if not p.from_file])
        if args.json:
            print(json.dumps(single_document(headline), indent=2))
        elif args.markdown:
            print(render_markdown(headline))
        else:
            print(render_text(headline))
        devices = comparison_devices(catalog, None)
        precisions = [precision]
    if args.plot:
        from tokenmill.planner.plots import write_plots

        written = write_plots(headline, devices, precisions, apis, args.plot)
        print("wrote " + ", ".join(str(path) for path in written), file=sys.stderr)
    return 0
