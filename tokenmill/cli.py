"""Command line: `tokenmill generate` (more commands join as they are built)."""
from __future__ import annotations

import argparse
import json
import logging
import sys


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--model", default=None,
                       help="Hugging Face model directory or .gguf file (default: the bundled Gemma 3 270M)")
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="compute dtype; auto = float32 on CPU, bfloat16 on CUDA")
    group.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    group.add_argument("--max-model-len", type=int, default=None,
                       help="longest sequence (prompt + output) accepted; default: the model's context, "
                            "capped by the KV cache")
    group.add_argument("--max-num-seqs", type=int, default=256, help="most sequences running at once")
    group.add_argument("--max-num-batched-tokens", type=int, default=2048,
                       help="token budget of one engine step (long prompts are chunked to fit)")
    group.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    group.add_argument("--kv-cache-memory", type=int, default=None,
                       help="bytes reserved for the KV cache (default 2 GiB)")
    group.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                       help="reuse the KV blocks of shared prompt prefixes")
    group.add_argument("--seed", type=int, default=0, help="seed of the engine's shared random generator")


def _engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                block_size=args.block_size, kv_cache_memory=args.kv_cache_memory,
                enable_prefix_caching=args.enable_prefix_caching, seed=args.seed)


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
    llm = LLM(model=args.model, **_engine_kwargs(args))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="tokenmill: a production LLM serving stack")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"tokenmill {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
