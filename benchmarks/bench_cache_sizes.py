"""Greedy decoding's speed by KV cache size: what an unaligned cache costs on this backend.

A speculative strategy's default cache is the padded prompt + the output + its verification's headroom (a chain
of 4: 5 slots), so 128 + 128 prompt and output tokens made a 261-slot cache, which XLA:CPU's attention handled
slower per step than 272 or 256 slots; `jspec.decode` now rounds default cache sizes up to a multiple of
`CACHE_SIZE_MULTIPLE`. Each size decodes the same held-out prompts (batch 1: one at a time), interleaved per round
(size 1, size 2, ..., size 1, ...); a ratio is the first size's total time over that size's. "ms/step" is a
decode's whole time, its prefill included, over its new tokens (the prefill is the same work at every size).
A diagnostic of one choice (`CACHE_SIZE_MULTIPLE`), not part of `run_all.py`.

    python benchmarks/bench_cache_sizes.py                                   # 256 261 264 272 288 320 at batch 1, 8
    python benchmarks/bench_cache_sizes.py --cache-sizes 256 261 272 --batch-sizes 8 --repeats 3
"""

from __future__ import annotations

import argparse

import numpy as np

import jspec
from jspec import bench
from jspec.bench import heldout_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo-code")
    parser.add_argument("--cache-sizes", type=int, nargs="+", default=[256, 261, 264, 272, 288, 320])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompts", type=int, default=4, help="batches of each size")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if min(args.cache_sizes) < args.prompt_tokens + args.new_tokens:
        raise SystemExit(f"--cache-sizes: each must hold the prompt and the output ({args.prompt_tokens + args.new_tokens})")

    model = jspec.load(args.model)
    print(f"{args.model}, {bench.environment()}")
    rows = []
    for batch in args.batch_sizes:
        prompts = heldout_prompts(model.tokenizer, args.prompts * batch, args.prompt_tokens)
        groups = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
        calls = {size: (lambda size=size: [jspec.decode(model, group, max_new_tokens=args.new_tokens, stop_tokens=[],
                                                        cache_size=size).tokens for group in groups])
                 for size in args.cache_sizes}
        timings = bench.time_interleaved(calls, args.repeats)
        first = timings[args.cache_sizes[0]]
        for size, timing in timings.items():
            same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(timing.result, first.result))
            rows.append({"batch": batch, "cache size": size,
                         "ms/step": 1e3 * timing.total_seconds / (len(timing.runs) * len(groups) * args.new_tokens),
                         f"speed vs {args.cache_sizes[0]}": first.total_seconds / timing.total_seconds,
                         "same tokens": same})
    bench.print_table(rows, ["batch", "cache size", "ms/step", f"speed vs {args.cache_sizes[0]}", "same tokens"])
    path = bench.write_json("cache_sizes", {"args": vars(args), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
