"""Jacobi, SJD (exact and lossy GSD) and Lookahead decoding against autoregressive decoding, interleaved in one run.

For each temperature and batch size, every method decodes the same prompts in turn (autoregressive, jacobi, sjd, ...,
then the next prompt group and the next round: A, B, C, A, B, C, ...), each program compiled before the timed rounds;
the speedup is the ratio of total times. Beside it:
- predicted: (AR calls x AR per-call time) / (method calls x the method's per-call time), from forwards of the
  method's verification width timed alone (default causal mask): what the measured calls and per-call costs imply;
- memory-bound: AR calls / method calls, the speedup of a device whose forward costs the same for 1 and for W tokens.
At batch 8 a call serves every row, so calls/token follows the slowest row. The lossy GSD row uses embed_distance=None
(GSD's 0.5 threshold was set for Lumina-mGPT's embeddings; with it, a quick run on demo-code accepted exactly as exact SJD).
Greedy outputs are checked token for token against autoregressive decoding (the benchmark stops if one differs).

    python benchmarks/bench_jacobi.py --quick                      # demo-code, < 3 minutes on 2 CPU cores
    python benchmarks/bench_jacobi.py --model demo-digits --temperatures 1.0 --top-k 8     # skipped if absent

Prompts: held-out code for demo-code; for a model without the code tokenizer (demo-digits) one-token prompts
0, 1, 2, ... (class tokens).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import jspec
from jspec import bench


def methods(quick: bool, temperature: float) -> list[tuple[str, str, dict]]:
    window = 8 if quick else 16
    lookahead = dict(window=5, ngram_size=4, guess_set_size=5) if quick else dict(window=7, ngram_size=5, guess_set_size=7)
    out = [("autoregressive", "autoregressive", {})]
    if temperature == 0:  # jacobi is greedy only
        out += [(f"jacobi W={window}", "jacobi", dict(num_draft_tokens=window))]
    out += [(f"sjd W={window}", "sjd", dict(num_draft_tokens=window))]
    out += [(f"sjd W={window} gsd (lossy)", "sjd", dict(num_draft_tokens=window, lossy=True, relaxed="gsd", embed_distance=None))]
    shape = ",".join(str(lookahead[k]) for k in ("window", "ngram_size", "guess_set_size"))
    out += [(f"lookahead W,N,G={shape}", "lookahead", lookahead)]
    return out


def chunk_width(model, strategy: str, options: dict) -> int:
    """Tokens per row of one forward of the strategy's steps (1 for autoregressive)."""
    if strategy == "autoregressive":
        return 1
    return jspec.strategies.resolve_strategy(strategy, options).chunk_width


def load_prompts(model, count: int, prompt_tokens: int) -> list[list[int]]:
    if model.tokenizer is not None:
        try:
            return bench.heldout_prompts(model.tokenizer, count, prompt_tokens)
        except (OSError, ValueError, KeyError):
            pass
    return [[i % model.config.vocab_size] for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo-code", help="a shipped model or a directory (demo-digits: skipped if absent)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts (batch 8 uses 8, batch 1 runs --batch1-prompts one by one)")
    parser.add_argument("--batch1-prompts", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.8])
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="window 8, small lookahead, fewer tokens and rounds")
    args = parser.parse_args()
    if args.quick:
        args.prompt_tokens, args.new_tokens, args.rounds, args.batch1_prompts = 64, 64, 1, 2

    try:
        model = jspec.load(args.model)
    except (OSError, ValueError) as error:
        print(f"{args.model}: not available ({error}); nothing to benchmark")
        return
    prompts = load_prompts(model, max(args.prompts, args.batch1_prompts), args.prompt_tokens)
    print(f"{bench.environment()}\n{args.model}: {model.num_parameters() / 1e6:.2f}M parameters, {len(prompts)} prompts")
    plain = model.without_tokenizer()

    rows, per_call = [], {}
    for temperature in args.temperatures:
        sampling = {"temperature": temperature, "top_k": args.top_k}
        for batch in args.batch_sizes:
            groups = [prompts[:batch]] if batch > 1 else [[p] for p in prompts[: args.batch1_prompts]]
            settings = methods(args.quick, temperature)
            run = lambda group, strategy, options: jspec.decode(  # noqa: E731
                model, group, strategy, max_new_tokens=args.new_tokens, stop_tokens=[], key=0,
                **options, **({} if strategy == "jacobi" else sampling))
            for _, strategy, options in settings:  # compile every program before the timed rounds
                for group in groups[:1]:
                    jax.block_until_ready(run(group, strategy, options).tokens)
            totals = {name: dict(seconds=0.0, calls=0, tokens=0, outputs=[]) for name, _, _ in settings}
            for _ in range(args.rounds):
                for group in groups:
                    for name, strategy, options in settings:  # interleaved: A, B, C, A, B, C, ...
                        started = time.perf_counter()
                        out = run(group, strategy, options)
                        totals[name]["seconds"] += time.perf_counter() - started
                        totals[name]["calls"] += out.stats["model_calls"]
                        totals[name]["tokens"] += int(np.sum(out.lengths))
                        totals[name]["outputs"] += out.sequences()
            base = totals["autoregressive"]
            for name, strategy, options in settings:
                width = chunk_width(model, strategy, options)
                if (batch, width) not in per_call:
                    per_call[(batch, width)] = bench.forward_ms(plain, batch, args.prompt_tokens, width)
                total = totals[name]
                if temperature == 0 and not name.endswith("(lossy)") and total["outputs"] != base["outputs"]:
                    raise SystemExit(f"{name}: greedy output differs from autoregressive: the benchmark is invalid")
                predicted = (base["calls"] * per_call[(batch, 1)]) / (total["calls"] * per_call[(batch, width)])
                row = {
                    "T": temperature, "batch": batch, "method": name,
                    "tokens/s": total["tokens"] / total["seconds"],
                    "calls/token": total["calls"] * batch / total["tokens"],
                    "tokens/call": total["tokens"] / (total["calls"] * batch),
                    "speedup (measured)": base["seconds"] / total["seconds"],
                    "predicted": predicted,
                    "memory-bound": base["calls"] / total["calls"],
                    "width": width,
                }
                rows.append(row)
                print(row, flush=True)
    print("\nper-call ms (batch, width):", {f"{b},{w}": round(v, 3) for (b, w), v in sorted(per_call.items())})
    print()
    bench.print_table(rows, ["T", "batch", "method", "tokens/s", "calls/token", "tokens/call", "speedup (measured)",
                             "predicted", "memory-bound", "width"])
    path = bench.write_json("jacobi", {"args": vars(args), "rows": rows,
                                       "per_call_ms": {f"{b},{w}": v for (b, w), v in per_call.items()}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
