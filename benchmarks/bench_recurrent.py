"""Recurrent-depth decoding on demo-code-recurrent: held-out loss against r, then the decoders side by side.

Part 1: mean next-token loss over held-out windows for r = 1, 2, 4, 8, 16, 32 (s_0 = 0).
Part 2: on held-out prompts (batch 1, greedy, no stop tokens), interleaved per prompt and round (every decoder
runs on prompt p before any runs on prompt p + 1, and rounds repeat that), after one compile call each:
  tokens/s (generated tokens / wall time, totals over prompts and rounds), sequential core evaluations per token
  (core iterations run one after another, prefill included, over generated tokens), the NLL of the output under
  the model at r = 32, and agreement with `recurrent` r = 32 (the fraction of its positions holding the same token).

    python benchmarks/bench_recurrent.py            # the table in jspec/assets/MODEL_CARD.md
    python benchmarks/bench_recurrent.py --quick     # fewer prompts and tokens
"""

from __future__ import annotations

import argparse
import time

import jax

import jspec
from jspec import bench
from jspec.train import recurrence_eval

REFERENCE_R = 32


def decoders(quick: bool) -> list[tuple[str, str, dict]]:
    rows = [(f"recurrent r={r}", "recurrent", {"num_recurrences": r}) for r in (8, 16, 32)]
    rows += [("adaptive latent<0.03 r<=32", "recurrent_adaptive", {"num_recurrences": 32, "threshold": 0.03}),
             ("adaptive kl<1e-3 r<=32", "recurrent_adaptive", {"num_recurrences": 32, "criterion": "kl", "threshold": 1e-3})]
    common = {"prefill_recurrences": REFERENCE_R}
    rows += [("diffusion forcing (defaults)", "diffusion_forcing", dict(common)),
             ("diffusion forcing inner=2 exit=0.05 W=16", "diffusion_forcing",
              dict(common, inner_recurrence=2, exit_threshold=0.05, max_wavefront=16)),
             ("diffusion forcing inner=8 exit=0.01 W=32", "diffusion_forcing",
              dict(common, inner_recurrence=8, exit_threshold=0.01, max_wavefront=32))]
    return rows[:4] + rows[5:7] if quick else rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo-code-recurrent", help="a recurrent-depth model name or directory")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--windows", type=int, default=None, help="held-out windows for the loss against r")
    args = parser.parse_args()
    num_prompts = args.prompts or (2 if args.quick else 4)
    new_tokens = args.new_tokens or (24 if args.quick else 48)
    rounds = args.rounds or (1 if args.quick else 2)
    num_windows = args.windows or (16 if args.quick else 64)

    model = jspec.load(args.model)
    print(f"{args.model}: {model.num_parameters():,} parameters; jax {jax.__version__} on {jax.default_backend()}")

    windows = recurrence_eval.heldout_windows(model.tokenizer, 256, num_windows)
    losses = []
    for r in (1, 2, 4, 8, 16, 32):
        started = time.perf_counter()
        losses.append({"r": r, "held-out loss": recurrence_eval.heldout_loss(model, windows, r),
                       "seconds": time.perf_counter() - started})
    print(f"\nHeld-out loss (nats/token) over {len(windows)} windows of 256 tokens, s_0 = 0:")
    bench.print_table(losses, ["r", "held-out loss", "seconds"])

    prompts = bench.heldout_prompts(model.tokenizer, num_prompts, 32)
    rows = decoders(args.quick)
    seconds = {name: 0.0 for name, _, _ in rows}
    outputs: dict[str, list] = {name: [None] * len(prompts) for name, _, _ in rows}
    stats = {name: [None] * len(prompts) for name, _, _ in rows}

    def call(strategy: str, options: dict, prompt: list[int]):
        return jspec.decode(model, [prompt], strategy, max_new_tokens=new_tokens, stop_tokens=[], **options)

    for name, strategy, options in rows:  # compile every program once
        call(strategy, options, prompts[0])
    for _ in range(rounds):
        for index, prompt in enumerate(prompts):
            for name, strategy, options in rows:  # interleaved: A, B, C, ... on this prompt, this round
                started = time.perf_counter()
                out = call(strategy, options, prompt)
                seconds[name] += time.perf_counter() - started
                outputs[name][index], stats[name][index] = out.sequences()[0], out.stats

    reference = outputs[f"recurrent r={REFERENCE_R}"]
    table = []
    for name, strategy, _ in rows:
        generated = sum(len(tokens) for tokens in outputs[name])
        sequential = sum(s["sequential_recurrences"] for s in stats[name])
        table.append({
            "decoder": name,
            "tokens/s": rounds * generated / seconds[name],
            "seq. core evals/token": sequential / generated,
            f"NLL at r={REFERENCE_R}": sum(recurrence_eval.output_nll(model, p, t, REFERENCE_R)
                                          for p, t in zip(prompts, outputs[name])) / len(prompts),
            f"agreement r={REFERENCE_R}": sum(recurrence_eval.agreement(t, ref)
                                             for t, ref in zip(outputs[name], reference)) / len(prompts),
            "speed vs r=32": None,
        })
    base = next(row["tokens/s"] for row in table if row["decoder"] == f"recurrent r={REFERENCE_R}")
    for row in table:
        row["speed vs r=32"] = row["tokens/s"] / base
    print(f"\nDecoders: {len(prompts)} held-out prompts of 32 tokens, {new_tokens} new tokens, batch 1, greedy, "
          f"{rounds} round(s), interleaved per prompt and round:")
    columns = ["decoder", "tokens/s", "speed vs r=32", "seq. core evals/token", f"NLL at r={REFERENCE_R}",
               f"agreement r={REFERENCE_R}"]
    bench.print_table(table, columns)
    path = bench.write_json("bench_recurrent", {"losses": losses, "decoders": table, "prompts": len(prompts),
                                                "new_tokens": new_tokens, "rounds": rounds})
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
