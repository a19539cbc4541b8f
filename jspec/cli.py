"""The `jspec` command line.

    jspec generate --model random:random-tiny --prompt "def fib(n):" --strategy sample --temperature 0.8
    jspec strategies
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from typing import Any, Sequence

import jspec

SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:
        print(f"jspec: error: {error}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jspec", description="Fast LLM decoding in JAX.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="decode prompts with a strategy, streaming the text")
    generate.add_argument("--model", default="random:random-tiny", help="model name or path (default: %(default)s)")
    generate.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    generate.add_argument("--strategy", default="greedy", help=f"one of {jspec.strategy_names()} (default: greedy)")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling strategies")
    generate.add_argument("--temperature", type=float)
    generate.add_argument("--top-k", type=int)
    generate.add_argument("--top-p", type=float)
    generate.add_argument("--min-p", type=float)
    generate.add_argument("--stop-token", type=int, action="append", help="token id that ends a row (repeatable)")
    generate.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    generate.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="any other strategy option, e.g. --set num_draft_tokens=4"
    )
    generate.add_argument("--no-stream", action="store_true", help="decode in one compiled call, print at the end")
    generate.add_argument("--json", action="store_true", help="print the result (tokens, text, stats) as JSON")
    generate.set_defaults(run=run_generate)

    listing = commands.add_parser("strategies", help="list the registered strategies")
    listing.set_defaults(run=lambda args: print("\n".join(jspec.strategy_names())) or 0)
    return parser


def strategy_options(args: argparse.Namespace) -> dict[str, Any]:
    options = {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--set: expected NAME=VALUE, got {item!r}")
        options[name.strip()] = _parse_value(value.strip())
    return options


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def run_generate(args: argparse.Namespace) -> int:
    model = jspec.load(args.model, dtype=args.dtype)
    if args.model.startswith("random:"):
        print(f"[{args.model}: random weights, the text below is noise]", file=sys.stderr)
    options = strategy_options(args)
    common = dict(max_new_tokens=args.max_new_tokens, key=args.seed, stop_tokens=args.stop_token, **options)
    started = time.perf_counter()
    if args.no_stream or args.json or len(args.prompt) > 1:
        output = jspec.decode(model, args.prompt, args.strategy, **common)
        if not args.json:
            for index, text in enumerate(output.text or [str(s) for s in output.sequences()]):
                print(f"--- row {index} ---\n{args.prompt[index]}{text}")
    else:
        stream = jspec.stream(model, args.prompt, args.strategy, **common)
        print(args.prompt[0], end="", flush=True)
        for step in stream:
            print(stream.text_deltas[0] if stream.text_deltas is not None else " ".join(map(str, step[0])), end="", flush=True)
        print()
        output = stream.output
    elapsed = time.perf_counter() - started
    if args.json:
        print(json.dumps({"tokens": output.sequences(), "text": output.text, "finish_reason": output.finish_reasons(), "stats": output.stats, "seconds": elapsed}))
    else:
        stats = ", ".join(f"{k}={v}" for k, v in output.stats.items())
        print(f"[{args.strategy}] finish={output.finish_reasons()} {stats} seconds={elapsed:.2f} (compile included)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
