"""Command line: `tokenmill serve | generate | bench | gateway | plan`."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from tokenmill.bench.options import add_bench_arguments
from tokenmill.gateway.keys_command import add_keys_arguments
from tokenmill.gateway.command import add_gateway_arguments
from tokenmill.planner.command import add_plan_arguments


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--model", default=None,
                       help="Hugging Face model directory or .gguf file (default: the bundled Gemma 3 270M)")
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="compute dtype; auto = bfloat16 on CUDA and on CPUs with native bf16 "
                            "(AVX-512 BF16 or AMX), else float32")
    group.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    group.add_argument("--max-model-len", type=int, default=None,
                       help="longest sequence (prompt + output) accepted; default: the model's context, "
                            "capped by the KV cache")
    group.add_argument("--max-num-seqs", type=int, default=256, help="most sequences running at once")
    group.add_argument("--max-num-batched-tokens", type=int, default=2048,
                       help="token budget of one engine step (long prompts are chunked to fit)")
    group.add_argument("--long-prefill-token-threshold", type=int, default=None,
                       help="while other requests decode, most tokens of one prompt computed per step, so "
                            "running streams keep going while a long prompt is read; 0 = only the step budget "
                            "(default: 128 on CPU, 0 on GPU)")
    group.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    group.add_argument("--kv-cache-memory", type=parse_size, default=None,
                       help="memory reserved for the KV cache, e.g. 2GiB, 512MB or bytes (default 2GiB); "
                            "the CPU counterpart of vLLM's --gpu-memory-utilization")
    group.add_argument("--kv-cache-tokens", type=int, default=None,
                       help="size the KV cache in tokens instead (rounded up to whole blocks)")
    group.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                       help="reuse the KV blocks of shared prompt prefixes")
    group.add_argument("--seed", type=int, default=0, help="seed of the engine's shared random generator")
    group.add_argument("--quantization", default=None, choices=["int8", "int4"],
                       help="weight-only quantization of the decoder projections at load time (activations, "
                            "embedding and output layer stay in --dtype). int8: one scale per output channel; "
                            "int4: 4-bit in groups of 32")


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'2GiB', '512MB', '1e9' or plain bytes -> bytes."""
    value = text.strip().lower()
    number = value.rstrip("kmgib")
    unit = value[len(number):]
    try:
        size = int(float(number) * _SIZE_UNITS[unit])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 2GiB, 512MB or bytes)") from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return size


def _engine_kwargs(args: argparse.Namespace) -> dict:
    num_kv_blocks = None
    if args.kv_cache_tokens is not None:
        if args.kv_cache_tokens < 1:
            raise ValueError("--kv-cache-tokens must be positive")
        num_kv_blocks = -(-args.kv_cache_tokens // args.block_size)
    return dict(model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                long_prefill_token_threshold=args.long_prefill_token_threshold, block_size=args.block_size,
                kv_cache_memory=args.kv_cache_memory, num_kv_blocks=num_kv_blocks,
                enable_prefix_caching=args.enable_prefix_caching, seed=args.seed,
                quantization=args.quantization)


def _cmd_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    import uvicorn

    from tokenmill.config import EngineConfig
    from tokenmill.server.app import ServerConfig, build_app

    if args.model is not None and not Path(args.model).exists():
        raise FileNotFoundError(f"model not found: {args.model}")
    config = ServerConfig(
        engine=EngineConfig(**_engine_kwargs(args)), served_model_name=args.served_model_name, host=args.host,
        port=args.port, api_key=args.api_key, chat_template=args.chat_template,
        max_waiting_requests=args.max_waiting_requests, request_timeout=args.request_timeout,
        max_tokens_cap=args.max_tokens_cap, drain_timeout=args.drain_timeout)
    failure: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_load_failure(error: BaseException) -> None:
        failure.append(error)
        if server is not None:
            server.should_exit = True

    app = build_app(config, on_load_failure=on_load_failure)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=args.drain_timeout, access_log=False))
    print(f"tokenmill: loading {config.model_name} ...", flush=True)
    # uvicorn drains on SIGTERM, then re-raises the signal under the handler that
    # was installed before it started; a no-op one lets a drained server exit 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    if failure:
        raise ValueError(f"could not load the model: {failure[0]}")
    if not server.started:
        return 1
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from tokenmill import LLM, SamplingParams

    prompts = list(args.prompt or [])
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as handle:
            prompts += [line.rstrip("\n") for line in handle if line.strip()]
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompts-file")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.sampling_seed, stop=args.stop or None)
    llm = LLM(**_engine_kwargs(args))
    outputs = llm.generate(prompts, params, use_tqdm=not args.json and len(prompts) > 1)
    for output in outputs:
        completion = output.outputs[0]
        if args.json:
            print(json.dumps({"prompt": output.prompt, "text": completion.text,
                              "token_ids": completion.token_ids, "finish_reason": completion.finish_reason}))
        else:
            print(f"{output.prompt}\033[1m{completion.text}\033[0m  [{completion.finish_reason}, "
                  f"{len(completion.token_ids)} tokens]\n")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from tokenmill.bench.command import run_bench

    return run_bench(args)


def _cmd_gateway(args: argparse.Namespace) -> int:
    from tokenmill.gateway.command import run_gateway

    return run_gateway(args)


def _cmd_plan(args: argparse.Namespace) -> int:
    from tokenmill.planner.command import run_plan

    return run_plan(args)


def _cmd_keys(args: argparse.Namespace) -> int:
    from tokenmill.gateway.keys_command import run_keys

    return run_keys(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="tokenmill: a production LLM serving stack")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                                description="Serve a model over an OpenAI-compatible HTTP API (completions, chat, "
                                            "streaming, /health, /metrics, /tokenize, /detokenize).")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--served-model-name", default=None,
                       help="model name clients use (default: gemma-3-270m, or the model's file/folder name)")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 endpoints")
    serve.add_argument("--chat-template", default=None,
                       help="Jinja chat template (file or inline); default: the model's, else a Gemma or generic one")
    serve.add_argument("--max-waiting-requests", type=int, default=512,
                       help="bound of the waiting queue; beyond it requests get 503 with Retry-After")
    serve.add_argument("--request-timeout", type=float, default=None,
                       help="seconds after which a request is aborted (finish_reason 'timeout')")
    serve.add_argument("--max-tokens-cap", type=int, default=None,
                       help="upper bound applied to every request's max_tokens")
    serve.add_argument("--drain-timeout", type=float, default=30.0,
                       help="on SIGTERM, seconds to let running requests finish before exiting")
    serve.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                       help="server log level")
    _add_engine_args(serve)
    serve.set_defaults(handler=_cmd_serve)

    generate = commands.add_parser("generate", help="generate completions for prompts (offline engine)",
                                   description="Generate completions for one or more prompts with the offline engine.")
    generate.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    generate.add_argument("--prompts-file", help="a text file with one prompt per line")
    generate.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    generate.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    generate.add_argument("--sampling-seed", type=int, default=None, help="per-request seed for reproducible sampling")
    generate.add_argument("--stop", action="append", help="stop string (repeat for several)")
    generate.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    _add_engine_args(generate)
    generate.set_defaults(handler=_cmd_generate)

    bench = commands.add_parser("bench", help="load-test an OpenAI-compatible server (TTFT, ITL, goodput, sizing)",
                                description="Load-test any OpenAI-compatible server with streamed requests: TTFT, "
                                            "per-token ITL, TPOT, E2E, throughput, goodput under SLOs, sweeps and "
                                            "the largest number of concurrent users kept within target. Formulas: "
                                            "docs/metrics.md.")
    add_bench_arguments(bench)
    bench.set_defaults(handler=_cmd_bench)

    gateway = commands.add_parser("gateway", help="the request layer: keys, limits, queue, routing, failover",
                                  description="Run the OpenAI-compatible gateway in front of tokenmill replicas and "
                                              "external APIs: API keys, limits shared through Redis, an SLA queue "
                                              "with overflow, auto routing, failover, usage ledger. Config and "
                                              "semantics: docs/gateway.md.")
    add_gateway_arguments(gateway)
    gateway.set_defaults(handler=_cmd_gateway)

    plan = commands.add_parser("plan", help="capacity and cost planner: traffic -> GPUs -> monthly bill",
                               description="Turn a traffic description into a fleet and a monthly bill, tied to a "
                                           "roofline model of the engine; compare GPUs, precisions and APIs; "
                                           "calibrate on a tokenmill bench sweep. Formulas: docs/planner.md.")
    add_plan_arguments(plan)
    plan.set_defaults(handler=_cmd_plan)

    keys = commands.add_parser("keys", help="the gateway's API keys: create, list, revoke, usage",
                               description="Manage the gateway's API keys (stored as salted hashes) and read their "
                                           "usage. See docs/gateway.md.")
    add_keys_arguments(keys)
    keys.set_defaults(handler=_cmd_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except BrokenPipeError:
        # The reader (e.g. `| head`) has gone: not an error of ours. Point stdout
        # at devnull so the interpreter's final flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError) as error:
        print(f"tokenmill {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
