"""Greedy tokens/s of jspec's compiled decode loop against a naive baseline, same weights and prompts.

Baseline: a Python loop that calls one jitted forward per token (KV cache donated, argmax on device with
jspec's `sampling.argmax`, the next token fed back from the host): the structure of a typical hand-written JAX
decode loop, so the ratio measures the loop, not the argmax. The two run
interleaved (jspec, naive, jspec, naive, ...); speedups are ratios of total times.

    python benchmarks/bench_autoregressive.py [--model random-25m] [--new-tokens 128] [--prompt-length 32]
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

import jspec
from jspec import bench, sampling


@functools.partial(jax.jit, donate_argnums=3)
def _naive_step(model, tokens, positions, cache):
    logits, cache = model.forward(tokens, positions, cache)
    return sampling.argmax(logits[:, -1]), cache.with_lengths(cache.lengths + tokens.shape[1])


def naive_greedy(model, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
    """Greedy decode with a Python loop over a jitted single-step forward (equal-length prompts)."""
    batch, length = prompts.shape
    cache = model.new_cache(batch, length + new_tokens)
    positions = jnp.broadcast_to(jnp.arange(length)[None], (batch, length))
    token, cache = _naive_step(model, jnp.asarray(prompts), positions, cache)
    emitted = [token]
    for step in range(new_tokens - 1):
        position = jnp.full((batch, 1), length + step, jnp.int32)
        token, cache = _naive_step(model, token[:, None], position, cache)
        emitted.append(token)
    return np.stack(jax.device_get(emitted), axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random-25m", help="preset in configs/models (random weights)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    model = jspec.load(f"random:{args.model}").without_tokenizer()
    print(f"model {args.model}: {model.num_parameters() / 1e6:.1f}M parameters, {bench.environment()}")
    rows = []
    for batch in args.batch_sizes:
        prompts = np.random.default_rng(batch).integers(0, model.config.vocab_size, (batch, args.prompt_length)).astype(np.int32)
        decode = lambda: jspec.decode(model, prompts, max_new_tokens=args.new_tokens, stop_tokens=[]).tokens  # noqa: E731
        naive = lambda: naive_greedy(model, prompts, args.new_tokens)  # noqa: E731
        timings = bench.time_interleaved({"fast": decode, "slow": naive}, args.repeats)  # ratio of totals
        fast, slow = timings["fast"], timings["slow"]
        if not np.array_equal(fast.result, slow.result):
            raise SystemExit("jspec and the naive loop disagree: the benchmark is invalid")
        tokens = batch * args.new_tokens
        for name, timing in (("naive python loop", slow), ("jspec.decode greedy", fast)):
            rows.append(
                {
                    "batch": batch,
                    "method": name,
                    "tokens/s": tokens * len(timing.runs) / timing.total_seconds,
                    "median s": timing.median_seconds,
                    "compile s": timing.compile_seconds,
                    "speedup vs naive": slow.total_seconds / timing.total_seconds,
                }
            )
    bench.print_table(rows, ["batch", "method", "tokens/s", "median s", "compile s", "speedup vs naive"])
    path = bench.write_json("autoregressive", {"args": vars(args), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
