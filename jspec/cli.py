"""The `jspec` command line.

    jspec generate --prompt "def fib(n):" --strategy sample --temperature 0.8          # the shipped demo-code model
    jspec strategies
    jspec train --recipe demo-code --out runs/demo-code [--steps N] [--resume]
    jspec build-demo --out-root runs --assets jspec/assets
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
SPECULATIVE_FLAGS = ("num_draft_tokens", "tree", "skip_layers", "max_ngram", "adaptive")
DIFFUSION_FLAGS = ("block_size", "sub_block_size", "threshold", "draft_steps", "cache")


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
    generate.add_argument("--model", default="demo-code", help="model name or path (default: %(default)s, shipped with jspec)")
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
    speculative = generate.add_argument_group("speculative decoding (strategies speculative, prompt_lookup, self_speculative)")
    speculative.add_argument("--draft", help="draft model name or path (strategy speculative)")
    speculative.add_argument("--num-draft-tokens", type=int, help="chain length / maximum draft depth")
    speculative.add_argument("--tree", type=_int_tuple, help="draft tree branching per depth, e.g. 3,2,1")
    speculative.add_argument("--skip-layers", type=_int_tuple, help="layers the self-speculative draft skips, e.g. 2,3")
    speculative.add_argument("--max-ngram", type=int, help="longest n-gram prompt lookup matches")
    speculative.add_argument("--adaptive", action="store_true", default=None, help="adapt the draft depth per row")
    diffusion = generate.add_argument_group(
        "diffusion LMs (strategies dllm_static, dllm_threshold, freedave with demo-code-dllm; block_diffusion with demo-code-bd)"
    )
    diffusion.add_argument("--block-size", type=int, help="tokens per block (dllm default 32; block_diffusion: the model's)")
    diffusion.add_argument("--sub-block-size", type=int, help="block_diffusion sub-block size (default 8)")
    diffusion.add_argument("--threshold", type=float, help="confidence threshold in (0, 1] (dllm_threshold, block_diffusion)")
    diffusion.add_argument("--draft-steps", type=int, help="FreeDave drafts verified per forward (default 8)")
    diffusion.add_argument("--diffusion-cache", dest="cache", help="none | prefix | dual (dllm) ; none | block | sub_block (block_diffusion)")
    generate.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="any other strategy option, e.g. --set num_draft_tokens=4"
    )
    generate.add_argument("--no-stream", action="store_true", help="decode in one compiled call, print at the end")
    generate.add_argument("--json", action="store_true", help="print the result (tokens, text, stats) as JSON")
    generate.set_defaults(run=run_generate)

    listing = commands.add_parser("strategies", help="list the registered strategies")
    listing.set_defaults(run=lambda args: print("\n".join(jspec.strategy_names())) or 0)

    train = commands.add_parser("train", help="train a model from a recipe (configs/train/<name>.json or a path)")
    train.add_argument("--recipe", required=True, help="recipe name in configs/train/ or a path to a recipe JSON")
    train.add_argument("--out", help="output directory (default: runs/<recipe name>)")
    train.add_argument("--steps", type=int, help="override the recipe's total steps (changes the LR schedule)")
    train.add_argument("--batch-size", type=int)
    train.add_argument("--seq-len", type=int)
    train.add_argument("--learning-rate", type=float)
    train.add_argument("--compute-dtype", choices=["float32", "bfloat16"])
    train.add_argument("--tokenizer", help="a tokenizer.json to use instead of training one")
    train.add_argument("--corpus-manifest", help="a corpus manifest to verify and use instead of building one")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    train.add_argument("--stop-at", type=int, help="stop after this many steps (checkpointed), as if interrupted")
    train.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="any other recipe field, e.g. --set eval_every=100"
    )
    train.set_defaults(run=run_train)

    build = commands.add_parser("build-demo", help="train the demo models and export them to Hugging Face directories")
    build.add_argument("--out-root", default="runs", help="training directories go under here (default: %(default)s)")
    build.add_argument("--assets", default=None, help="where to export (default: the package's jspec/assets)")
    build.add_argument("--only", choices=["demo-code", "demo-code-draft"], action="append", help="build only these")
    build.add_argument("--resume", action="store_true", help="resume interrupted training runs")
    build.set_defaults(run=run_build_demo)
    return parser


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints like 3,2,1, got {text!r}") from None


def strategy_options(args: argparse.Namespace) -> dict[str, Any]:
    flags = SAMPLING_FLAGS + SPECULATIVE_FLAGS + DIFFUSION_FLAGS
    options = {name: getattr(args, name) for name in flags if getattr(args, name, None) is not None}
    if getattr(args, "draft", None):
        options["draft"] = jspec.load(args.draft, dtype=args.dtype)
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


def run_train(args: argparse.Namespace) -> int:
    from jspec.train import TrainConfig, train

    overrides = {
        "out_dir": args.out,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "learning_rate": args.learning_rate,
        "compute_dtype": args.compute_dtype,
        "tokenizer": args.tokenizer,
        "corpus_manifest": args.corpus_manifest,
    }
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--set: expected NAME=VALUE, got {item!r}")
        overrides[name.strip()] = _parse_value(value.strip())
    config = TrainConfig.from_recipe(args.recipe, **overrides)
    result = train(config, resume=args.resume, stop_at_step=args.stop_at)
    print(
        json.dumps(
            {
                "out_dir": str(result.out_dir),
                "steps": result.steps,
                "tokens_seen": result.tokens_seen,
                "wall_seconds": round(result.wall_seconds, 1),
                "train_loss": result.train_loss,
                "eval_loss": result.eval_loss,
                "eval_perplexity": result.eval_perplexity,
            }
        )
    )
    return 0


def run_build_demo(args: argparse.Namespace) -> int:
    from jspec.train import demo

    demo.build(out_root=args.out_root, assets_dir=args.assets, only=args.only, resume=args.resume)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
