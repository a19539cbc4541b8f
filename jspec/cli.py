"""The `jspec` command line.

    jspec generate --prompt "def fib(n):" --strategy sample --temperature 0.8          # the shipped demo-code model
    jspec generate --model demo-digits --prompt-class 3 --num-samples 16 --strategy sample --png digits.png
    jspec strategies                                                                  # name, guarantee, options
    jspec train --recipe demo-code --out runs/demo-code [--steps N] [--resume] [--mesh data=4]
    jspec build-demo --out-root runs                      # exports to runs/assets (--into-package: jspec/assets)

Guarantee: a user error (a bad flag or value, a missing or unreadable model, an option of another strategy, a
destination that would be overwritten) prints ONE line on stderr, `jspec ...: error: ...`, and exits with status 2,
never a traceback. Set JSPEC_TRACEBACK=1 to see the traceback of an error raised past argument parsing.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

import jspec
from jspec.processors import GENERATION_OPTIONS, GenerationOptions
from jspec.strategies.base import _REGISTRY, _option_names

SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p")
SPECULATIVE_FLAGS = ("num_draft_tokens", "tree", "skip_layers", "max_ngram", "adaptive")
BEAM_FLAGS = ("num_beams", "length_penalty", "early_stopping", "num_return_sequences")
DIFFUSION_FLAGS = ("block_size", "sub_block_size", "unmasking", "threshold", "draft_steps", "cache", "filter", "end_of_text")
GENERATION_FLAGS = GENERATION_OPTIONS  # logprobs and logit processors (jspec.processors)
JACOBI_OPTIONS = (  # name, help, argparse keywords
    ("init", "how empty window slots start: repeat | prompt_lookup | random | repeat_horizon", {}),
    ("horizon", "repeat_horizon: copy the token this many positions back (an image row)", {"type": int}),
    ("window", "lookahead window W (columns)", {"type": int}),
    ("ngram_size", "lookahead n-gram size N", {"type": int}),
    ("guess_set_size", "lookahead guesses per step G", {"type": int}),
    ("lossy", "allow a relaxed (lossy) acceptance", {"action": "store_true", "default": None}),
    ("relaxed", "relaxed acceptance: gsd (needs --lossy)", {}),
)
JACOBI_FLAGS = tuple(name for name, _, _ in JACOBI_OPTIONS)
RECURRENT_OPTIONS = (  # name, help, argparse keywords
    ("num_recurrences", "core iterations per token (recurrent_adaptive: at most); default the model's mean", {"type": int}),
    ("inner_recurrence", "diffusion_forcing: core iterations per step, 4", {"type": int}),
    ("max_wavefront", "diffusion_forcing: positions in flight at most, 128", {"type": int}),
)
RECURRENT_FLAGS = tuple(name for name, _, _ in RECURRENT_OPTIONS)
OPTION_FLAGS = (SAMPLING_FLAGS + SPECULATIVE_FLAGS + BEAM_FLAGS + DIFFUSION_FLAGS + GENERATION_FLAGS + JACOBI_FLAGS
                + RECURRENT_FLAGS)
FLAG_NAMES = {"cache": "--diffusion-cache", "init": "--jacobi-init", "filter": "--learn2pd-filter"}  # option name -> its flag, where they differ
REQUIRED = inspect.Parameter.empty  # the default of an option a strategy needs
USER_ERRORS = (ValueError, TypeError, OSError)  # what a user's input can cause; anything else is a bug, shown in full

# A few words on what each built-in strategy guarantees (`jspec strategies`); others show their docstring's first line.
GUARANTEES = {
    "greedy": "argmax decoding",
    "sample": "samples the warped distribution",
    "autoregressive": "argmax at temperature 0, else samples the warped distribution",
    "speculative": "lossless: greedy token-identical, sampling distribution-identical",
    "prompt_lookup": "lossless, drafts copied from earlier n-grams",
    "self_speculative": "lossless, the target without skip_layers drafts",
    "dllm_static": "masked diffusion, one token per forward",
    "dllm_threshold": "masked diffusion, Fast-dLLM v1 parallel; threshold=1 is dllm_static",
    "freedave": "lossless: dllm_static's tokens in fewer forwards",
    "dllm_learn2pd": "masked diffusion, Learn2PD learned unmasking filter; threshold=1 is dllm_static",
    "masked_diffusion": "masked diffusion with a named unmasking rule",
    "block_diffusion": "Fast-dLLM v2 block diffusion (threshold, static or Learn2PD sub-blocks); the block cache is exact",
    "beam_search": "transformers' beam search: same sequences and sequences_scores",
    "jacobi": "lossless: greedy Jacobi iteration, token-identical to greedy",
    "sjd": "Speculative Jacobi Decoding, distribution-identical (lossy only with lossy=True, relaxed=gsd)",
    "lookahead": "lossless: Lookahead n-gram pool from Jacobi trajectories, greedy and sampling",
    "recurrent": "recurrent-depth models: r core iterations per token; the exact cache equals full recomputation",
    "recurrent_adaptive": "recurrent-depth models: per-token early exit; threshold 0 is recurrent at the maximum r",
    "diffusion_forcing": "recurrent-depth models: parallel window sampler (lossy; one-per-step schedule = recurrent)",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 for a user error, reported in one line on stderr)."""
    parser = build_parser()
    args = parser.parse_args(argv)  # bad flags: one line and exit 2 (OneLineErrorParser)
    try:
        return args.run(args)
    except USER_ERRORS as error:
        if os.environ.get("JSPEC_TRACEBACK"):
            raise
        print(f"jspec {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2


def console_main() -> int:
    """The `jspec` command: `main` with JAX's persistent compilation cache on (set JSPEC_CACHE_DIR to move it,
    JSPEC_NO_COMPILATION_CACHE=1 to turn it off), so the next call with the same shapes skips compiling."""
    if not os.environ.get("JSPEC_NO_COMPILATION_CACHE"):
        from jspec.decode import enable_compilation_cache

        enable_compilation_cache()
    return main()


def one_line(error: BaseException | str) -> str:
    """The error's message on one line (whitespace runs, newlines included, become one space)."""
    return " ".join(str(error).split()) or type(error).__name__


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (with a pointer to --help) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows `(default: ...)` after a flag's help where the default says something (not None, False or [])."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == []:
            return action.help or ""
        return super()._get_help_string(action)


def strategies_taking(option: str) -> list[str]:
    """The registered strategies that take `option`."""
    return [name for name in jspec.strategy_names() if option in _option_names(_REGISTRY[name])]


def _takers(option: str) -> str:
    return f"strategies: {', '.join(strategies_taking(option)) or 'none'}"


def build_parser() -> argparse.ArgumentParser:
    from jspec.train import demo

    parser = OneLineErrorParser(prog="jspec", description="Fast LLM decoding in JAX.", formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)

    generate = command("generate", "decode prompts with a strategy, streaming the text")
    generate.add_argument("--model", default="demo-code", help="a shipped model's name, a directory, or random:<preset>")
    prompts = generate.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    prompts.add_argument("--prompt-class", type=int, action="append", metavar="DIGIT",
                         help="image models (demo-digits): prompt for a picture of this digit 0-9 (repeat for a batch)")
    generate.add_argument("--png", metavar="PATH", help="image models: write the samples as one PNG picture (with several prompts, a row per prompt)")
    strategies = ", ".join(jspec.strategy_names())
    generate.add_argument("--strategy", default="greedy", help=f"one of {strategies} (see: jspec strategies)")
    generate.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt at most")
    generate.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling strategies")
    generate.add_argument("--stop-token", type=int, action="append", help="token id that ends a row (repeatable; default: EOS)")
    generate.add_argument("--stop", action="append", type=_unescaped,
                          help='a string that ends a row, backslash escapes read ("\\n\\n"; repeatable)')
    generate.add_argument("--num-samples", type=int, default=1, help="rows per prompt (consecutive in the output)")
    generate.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast the parameters (default: stored)")

    def option(group: Any, name: str, help: str, **kwargs: Any) -> None:  # a strategy option's flag, naming its takers
        group.add_argument(flag_of(name), dest=name, help=f"{help} ({_takers(name)})", **kwargs)

    sampling = generate.add_argument_group("sampling (default: each strategy's own, see `jspec strategies`)")
    option(sampling, "temperature", "sampling temperature, 0 is argmax", type=float)
    option(sampling, "top_k", "keep the k most likely tokens, 0 keeps all", type=int)
    option(sampling, "top_p", "nucleus sampling mass in (0, 1]", type=float)
    option(sampling, "min_p", "drop tokens below min_p x the top probability", type=float)
    speculative = generate.add_argument_group("speculative decoding (speculative, prompt_lookup, self_speculative)")
    option(speculative, "draft", "draft model name or path")
    option(speculative, "num_draft_tokens", "chain length / maximum draft depth, or auto (depth per step from measured "
           "costs and acceptance)", type=_int_or_auto)
    option(speculative, "tree", "draft tree branching per depth, e.g. 3,2,1", type=_int_tuple)
    option(speculative, "skip_layers", "layers the draft skips, e.g. 2,3", type=_int_tuple)
    option(speculative, "max_ngram", "longest n-gram prompt lookup matches", type=int)
    option(speculative, "adaptive", "adapt the draft depth per row", action="store_true", default=None)
    beam = generate.add_argument_group("beam search (beam_search)")
    option(beam, "num_beams", "beams per prompt", type=int)
    option(beam, "length_penalty", "score = log-probability / generated length ** length_penalty", type=float)
    option(beam, "early_stopping", "True, False or never (as transformers)", type=_early_stopping)
    option(beam, "num_return_sequences", "best hypotheses returned per prompt", type=int)
    diffusion = generate.add_argument_group(
        "diffusion LMs (dllm_static, dllm_threshold, freedave, dllm_learn2pd with demo-code-dllm; block_diffusion with demo-code-bd)"
    )
    option(diffusion, "block_size", "tokens per block; dllm 32, block_diffusion the model's", type=int)
    option(diffusion, "sub_block_size", "block_diffusion sub-block size, 8", type=int)
    option(diffusion, "unmasking", "unmasking rule: static | threshold | learn2pd (masked_diffusion also freedave)")
    option(diffusion, "threshold", "confidence (learn2pd: filter score) threshold in (0, 1], 0.9 (learn2pd: 0.99)", type=float)
    option(diffusion, "draft_steps", "FreeDave drafts verified per forward, 8", type=int)
    option(diffusion, "cache", "none | prefix | dual (dllm); none | block | sub_block (block_diffusion)")
    option(diffusion, "filter", "Learn2PD filter: a model name whose filter is shipped (demo-code-dllm, demo-code-bd) or a "
           ".safetensors file")
    option(diffusion, "end_of_text", "end a row once its decided tokens hold a stop token (lossless, default on)",
           action=argparse.BooleanOptionalAction, default=None)
    processing = generate.add_argument_group("log-probabilities and logit processors (transformers' order, before sampling)")
    option(processing, "logprobs", "report each token's log-probability and its K most likely tokens' (in --json)",
           type=int, metavar="K")
    option(processing, "repetition_penalty", "transformers': over prompt and output, > 0, 1 is off", type=float)
    option(processing, "presence_penalty", "OpenAI/vLLM: minus this if the token was generated, in [-2, 2]", type=float)
    option(processing, "frequency_penalty", "OpenAI/vLLM: minus this x the token's count in the output, in [-2, 2]",
           type=float)
    option(processing, "logit_bias", "add BIAS to token ID's logit (repeatable)", type=_bias, action="append",
           metavar="ID=BIAS")
    option(processing, "min_new_tokens", "stop tokens are banned until a row has this many new tokens", type=int)
    option(processing, "no_repeat_ngram_size", "ban tokens that would repeat an n-gram of this size", type=int)
    jacobi = generate.add_argument_group("Jacobi decoding (jacobi, sjd, lookahead; window size: --num-draft-tokens)")
    for name, help, kwargs in JACOBI_OPTIONS:
        option(jacobi, name, help, **kwargs)
    recurrent = generate.add_argument_group("recurrent depth (recurrent, recurrent_adaptive, diffusion_forcing; e.g. "
                                            "with demo-code-recurrent)")
    for name, help, kwargs in RECURRENT_OPTIONS:
        option(recurrent, name, help, **kwargs)
    generate.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="any other strategy option, e.g. --set num_draft_tokens=4"
    )
    generate.add_argument(
        "--mesh", metavar="data=N,model=M",
        help="decode on a device mesh: the batch split over N devices, heads / MLP / vocabulary over M (M defaults to "
        "the devices left; N x M must be every device of the run); the model (and draft) load straight onto it",
    )
    generate.add_argument("--no-stream", action="store_true", help="decode in one compiled call, print at the end")
    generate.add_argument("--json", action="store_true", help="print the result (tokens, text, stats) as JSON")
    generate.set_defaults(run=run_generate)

    listing = command("strategies", "list the registered strategies: name, guarantee, options with defaults")
    listing.set_defaults(run=run_strategies)

    train = command("train", "train a model from a recipe (configs/train/<name>.json or a path)")
    train.add_argument("--recipe", required=True, help="recipe name in configs/train/ or a path to a recipe JSON")
    train.add_argument("--out", help="output directory (default: runs/<recipe name>)")
    train.add_argument("--steps", type=int, help="override the recipe's total steps (changes the LR schedule)")
    train.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    train.add_argument("--seq-len", type=int, help="override the recipe's sequence length")
    train.add_argument("--learning-rate", type=float, help="override the recipe's peak learning rate")
    train.add_argument("--compute-dtype", choices=["float32", "bfloat16"], help="override the recipe's compute dtype")
    train.add_argument("--tokenizer", help="a tokenizer.json to use instead of training one")
    train.add_argument("--corpus-manifest", help="a corpus manifest to verify and use instead of building one")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    train.add_argument("--stop-at", type=int, help="stop after this many steps (checkpointed), as if interrupted")
    train.add_argument(
        "--mesh", metavar="data=N",
        help="data-parallel training: each batch split over N devices (N: all the run's devices, dividing the batch "
        "size), parameters and optimizer state replicated; the losses equal one device's up to float rounding",
    )
    train.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="any other recipe field, e.g. --set eval_every=100"
    )
    train.set_defaults(run=run_train)

    build = command("build-demo", "train the demo models and export them to Hugging Face directories")
    demo.add_output_arguments(build)
    build.add_argument("--only", choices=list(demo.BUILDABLE), action="append",
                       help=f"train only these (repeatable; default: {', '.join(demo.NAMES)})")
    build.add_argument("--resume", action="store_true", help="resume interrupted training runs")
    build.set_defaults(run=run_build_demo)
    return parser


def _unescaped(text: str) -> str:
    """A flag value with backslash escapes read (\\n, \\t, \\\\, \\x41, \\u00e9), other text kept as typed."""
    return text.encode("utf-8", "backslashreplace").decode("unicode_escape").encode("latin-1").decode("utf-8")


def _early_stopping(text: str) -> bool | str:
    choices = {"true": True, "false": False, "never": "never"}
    if text.lower() not in choices:
        raise argparse.ArgumentTypeError(f"expected True, False or never, got {text!r}")
    return choices[text.lower()]


def _bias(text: str) -> tuple[int, float]:
    token, sep, bias = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ID=BIAS (a token id and a number, e.g. 42=-5.0), got {text!r}") from None


def _int_or_auto(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or auto, got {text!r}") from None


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints like 3,2,1, got {text!r}") from None


def strategy_options(args: argparse.Namespace) -> dict[str, Any]:
    """The strategy options the flags and `--set` give, checked against `--strategy` (ValueError naming the flag,
    and for an option of other strategies, which ones take it); `--draft` is loaded only after the check."""
    sources = {name: flag_of(name) for name in OPTION_FLAGS}
    options = {name: getattr(args, name) for name in sources if getattr(args, name, None) is not None}
    if "logit_bias" in options:
        options["logit_bias"] = dict(options["logit_bias"])
    if getattr(args, "draft", None):
        options["draft"], sources["draft"] = args.draft, "--draft"
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--set: expected NAME=VALUE, got {item!r}")
        options[name.strip()], sources[name.strip()] = _parse_value(value.strip()), f"--set {name.strip()}"
    check_strategy_options(args.strategy, options, sources)
    if "draft" in options and isinstance(options["draft"], str):
        options["draft"] = jspec.load(options["draft"], dtype=args.dtype, mesh=_mesh(args))
    return options


def _mesh(args: argparse.Namespace) -> Any:
    """The mesh `--mesh` names (errors name the flag), or None."""
    if not getattr(args, "mesh", None):
        return None
    from jspec.sharding import parse_mesh

    try:
        return parse_mesh(args.mesh)
    except ValueError as error:
        raise ValueError(f"--mesh: {str(error).removeprefix('mesh: ')}") from None


def flag_of(option: str) -> str:
    """The flag that sets a strategy option: its own (`--top-k`), else `--set NAME=...`."""
    if option in OPTION_FLAGS + ("draft",):
        return FLAG_NAMES.get(option, "--" + option.replace("_", "-"))
    return f"--set {option}"


def check_strategy_options(strategy: str, options: dict[str, Any], sources: dict[str, str]) -> None:
    """ValueError naming the flag (`sources[option]`) of the first option `strategy` does not take, and the
    strategies that do; ValueError naming --strategy for an unknown strategy."""
    if strategy not in _REGISTRY:
        raise ValueError(f"--strategy: unknown strategy {strategy!r}; known: {', '.join(jspec.strategy_names())}")
    defaults = option_defaults(strategy)
    allowed = list(defaults)
    for name, default in defaults.items():
        if default is REQUIRED and name not in options:
            raise ValueError(f"{flag_of(name)}: strategy {strategy!r} needs option {name!r}")
    for name in options:
        if name not in allowed:
            takers = strategies_taking(name)
            where = f"it is an option of {', '.join(takers)}" if takers else "no registered strategy takes it"
            raise ValueError(
                f"{sources.get(name, name)}: strategy {strategy!r} has no option {name!r} ({where}); "
                f"{strategy}'s options: {', '.join(allowed) or 'none'}"
            )


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def run_generate(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens: expected an int >= 0, got {args.max_new_tokens}")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples: expected an int >= 1, got {args.num_samples}")
    _class_prompts(args)
    mesh = _mesh(args)
    options = strategy_options(args)  # checked before the model loads
    try:
        model = jspec.load(args.model, dtype=args.dtype, mesh=mesh)
    except ValueError as error:  # a mesh that does not fit the model: name the flag
        raise ValueError(f"--{error}" if str(error).startswith("mesh:") else str(error)) from None
    if args.prompt_class or args.png:
        from jspec import images

        images.check_image_model(model, f"--model ({'--prompt-class' if args.prompt_class else '--png'} needs an image model)")
    common = dict(max_new_tokens=args.max_new_tokens, key=args.seed, stop_tokens=args.stop_token, stop=args.stop,
                  num_samples=args.num_samples, **options)
    started = time.perf_counter()
    streams = getattr(_REGISTRY[args.strategy], "streams", True)
    if args.no_stream or args.json or len(args.prompt) > 1 or args.num_samples != 1 or not streams:
        output = jspec.decode(model, args.prompt, args.strategy, **common)
        _warn_if_random(args.model)
        per_prompt = len(output.sequences()) // len(args.prompt)  # num_samples or num_return_sequences
        if not args.json:
            for index, text in enumerate(output.text or [str(s) for s in output.sequences()]):
                print(f"--- row {index} ---\n{args.prompt[index // per_prompt]}{text}")
    else:
        stream = jspec.stream(model, args.prompt, args.strategy, **common)  # validates the request
        _warn_if_random(args.model)
        print(args.prompt[0], end="", flush=True)
        for step in stream:
            print(stream.text_deltas[0] if stream.text_deltas is not None else " ".join(map(str, step[0])), end="", flush=True)
        print()
        output = stream.output
    elapsed = time.perf_counter() - started
    if args.png:
        from jspec import images

        pictures = images.tokens_to_images(model, output)
        columns = len(pictures) // len(args.prompt) if len(args.prompt) > 1 else None
        images.write_png(args.png, images.image_grid(pictures, columns=columns))
        print(f"[{len(pictures)} picture{'s' if len(pictures) != 1 else ''} written to {args.png}]", file=sys.stderr)
    if args.json:
        rows = len(output.sequences())
        result = {"tokens": output.sequences(), "text": output.text, "finish_reason": output.finish_reasons(),
                  "prompt_index": [row * len(args.prompt) // rows for row in range(rows)],
                  "stats": output.stats, "seconds": elapsed}
        if output.logprobs is not None:
            result.update(json_logprobs(output))
        print(json.dumps(result))
    else:
        stats = ", ".join(f"{k}={v}" for k, v in output.stats.items())
        print(f"[{args.strategy}] finish={output.finish_reasons()} {stats} seconds={elapsed:.2f} (compile included)", file=sys.stderr)
    return 0


def _class_prompts(args: argparse.Namespace) -> None:
    """Fill args.prompt from --prompt-class (each digit's class token, e.g. `<digit_3>`); errors name the flag."""
    from jspec import images

    if args.prompt_class:  # argparse makes it exclusive with --prompt
        bad = [digit for digit in args.prompt_class if not 0 <= digit < images.NUM_CLASSES]
        if bad:
            raise ValueError(f"--prompt-class: expected a digit 0-9, got {bad[0]}")
        args.prompt = [images.class_token(digit) for digit in args.prompt_class]


def json_logprobs(output: jspec.DecodeOutput) -> dict[str, Any]:
    """Each row's logprobs and raw_logprobs (lists as long as its tokens), and top_logprobs: per token a list of
    [token id, log-probability] pairs, most likely first (a -inf log-probability, a token filtered out, as None)."""
    number = lambda x: None if not np.isfinite(x) else float(x)  # noqa: E731
    rows = []
    for row, length in enumerate(np.asarray(output.lengths)):
        rows.append({
            "logprobs": [number(x) for x in output.logprobs[row, :length]],
            "raw_logprobs": [number(x) for x in output.raw_logprobs[row, :length]],
            "top_logprobs": [[[int(t), number(v)] for t, v in zip(ids, values)]
                             for ids, values in zip(output.top_tokens[row, :length], output.top_logprobs[row, :length])],
        })
    return {name: [row[name] for row in rows] for name in ("logprobs", "raw_logprobs", "top_logprobs")}


def _warn_if_random(model: str) -> None:
    """Say on stderr that a `random:` model's text is noise (after the request is validated: an error stays one line)."""
    if model.startswith("random:"):
        print(f"[{model}: random weights, the text below is noise]", file=sys.stderr)


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
    mesh = _mesh(args)
    result = train(config, resume=args.resume, stop_at_step=args.stop_at, mesh=mesh)
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


def option_defaults(strategy: str) -> dict[str, Any]:
    """A registered strategy's options (from its factory's signature) and their defaults; REQUIRED where none."""
    factory = _REGISTRY[strategy]
    parameters = inspect.signature(factory).parameters
    generation = GenerationOptions()
    return {name: parameters[name].default if name in parameters else
            getattr(generation, name) if name in GENERATION_OPTIONS else REQUIRED for name in _option_names(factory)}


def strategy_line(name: str) -> str:
    """`name  guarantee; options: a=1, b (required)` for a registered strategy."""
    options = [
        f"{option} (required)" if default is REQUIRED else f"{option}={default!r}"
        for option, default in option_defaults(name).items()
    ]
    guarantee = GUARANTEES.get(name) or (inspect.getdoc(_REGISTRY[name]) or "").split(".")[0].replace("\n", " ")
    return f"{name:<17} {guarantee}; options: {', '.join(options) or 'none'}"


def run_strategies(args: argparse.Namespace) -> int:
    print("\n".join(strategy_line(name) for name in jspec.strategy_names()))
    return 0


def run_build_demo(args: argparse.Namespace) -> int:
    from jspec.train import demo

    demo.build(
        out_root=args.out_root,
        assets_dir=args.assets,
        only=args.only,
        resume=args.resume,
        into_package=args.into_package,
        overwrite=args.overwrite,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
