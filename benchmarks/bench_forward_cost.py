"""What a k-token forward costs relative to a one-token forward (the price of a speculative verification).

Each configuration (XLA flags, a weight dtype) runs in its own long-lived worker process; the driver interleaves
the timed calls (every configuration and width in turn, per round), so load changes on the machine fall on all
alike. A figure is the total over the rounds of one call's time; "x 1 token" divides it by the same
configuration's one-token total, "x default" by the default configuration's.

    python benchmarks/bench_forward_cost.py                          # demo-code forward, k = 1, 2, 4, 8
    python benchmarks/bench_forward_cost.py --matmul                 # a lone 384 x 4096 product of k rows
    python benchmarks/bench_forward_cost.py --configs default xla_cpu_multi_thread_eigen=false default@bfloat16
    python benchmarks/bench_forward_cost.py --configs default default+head_copy   # tied head as decode runs it

A configuration is "<XLA flags or default>[@<weight dtype>][+head_copy]"; "+head_copy" times the forward of the model
as `jspec.decode` runs it on CPU (`with_head_copy`: a tied embedding's head copied to [D, V]), else the tied head.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from jspec import bench

DEFAULT_CONFIGS = ["default", "xla_cpu_multi_thread_eigen=false", "xla_cpu_use_thunk_runtime=false",
                   "xla_cpu_experimental_onednn_custom_call=true", "default@bfloat16"]


def worker() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jspec

    batch, prompt_len, dtype = int(os.environ["BENCH_BATCH"]), int(os.environ["BENCH_PROMPT"]), os.environ["BENCH_DTYPE"]
    calls = {}
    if os.environ["BENCH_MATMUL"] == "1":
        weights = jnp.asarray(np.random.default_rng(0).normal(size=(384, 4096)), dtype)
        product = jax.jit(lambda x, w: x @ w)
        for width in map(int, os.environ["BENCH_WIDTHS"].split(",")):
            rows = jnp.ones((batch * width, 384), dtype)
            calls[width] = lambda rows=rows: product(rows, weights)
    else:
        model = jspec.load(os.environ["BENCH_MODEL"]).without_tokenizer()
        model = model.replace(params=jax.tree.map(lambda x: x.astype(dtype) if x.dtype == jnp.float32 else x, model.params))
        model = model.with_kernels(head_copy=os.environ["BENCH_HEAD_COPY"] == "1")  # forward_call applies it
        for width in map(int, os.environ["BENCH_WIDTHS"].split(",")):
            calls[width] = bench.forward_call(model, batch, prompt_len, width)
    for call in calls.values():
        jax.block_until_ready(call())  # compile

    def handle(request):
        call, best = calls[request["width"]], []
        for _ in range(request["calls"]):
            start = time.perf_counter()
            jax.block_until_ready(call())
            best.append(time.perf_counter() - start)
        return sorted(best)[len(best) // 2]  # the median of a short burst

    bench.serve(handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo-code")
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                        help="XLA flags per worker, without the leading dashes, comma-separated ('default': none); "
                             "append '@bfloat16' for bf16 weights")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=5, help="calls per timed burst (its median is the sample)")
    parser.add_argument("--matmul", action="store_true", help="time a lone [k, 384] x [384, 4096] product instead")
    args = parser.parse_args()

    workers = {}
    for config in args.configs:
        setting, _, extra_option = config.partition("+")
        if extra_option not in ("", "head_copy"):
            raise SystemExit(f"--configs: unknown option +{extra_option} in {config!r} (expected +head_copy)")
        flags, _, dtype = setting.partition("@")
        extra = [] if flags == "default" else ["--" + flag for flag in flags.split(",")]
        env = dict(os.environ, XLA_FLAGS=" ".join([os.environ.get("XLA_FLAGS", ""), *extra]).strip(),
                   BENCH_MODEL=args.model, BENCH_WIDTHS=",".join(map(str, args.widths)), BENCH_BATCH=str(args.batch),
                   BENCH_PROMPT=str(args.prompt_tokens), BENCH_DTYPE=dtype or "float32", BENCH_MATMUL=str(int(args.matmul)),
                   BENCH_HEAD_COPY=str(int(extra_option == "head_copy")),
                   PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        workers[config] = bench.Worker([__file__, "--worker"], env=env)
    totals = {(config, width): 0.0 for config in workers for width in args.widths}
    for _ in range(args.rounds):  # interleaved: every configuration and width in turn
        for config, w in workers.items():
            for width in args.widths:
                totals[config, width] += w.ask(width=width, calls=args.calls)
    for w in workers.values():
        w.close()

    what = "[k, 384] x [384, 4096] product" if args.matmul else f"{args.model} forward over a {args.prompt_tokens}-token cache"
    print(f"{bench.environment()}\n{what}, batch {args.batch}: median of {args.calls} calls, summed over {args.rounds} "
          "interleaved rounds\n")
    first = args.configs[0]
    rows = [{"config": config, "k": width, "us per call": 1e6 * totals[config, width] / args.rounds,
             "x 1 token": totals[config, width] / totals[config, args.widths[0]],
             "x default 1 token": totals[config, width] / totals[first, args.widths[0]]}
            for config in args.configs for width in args.widths]
    bench.print_table(rows, ["config", "k", "us per call", "x 1 token", "x default 1 token"])
    bench.write_json("forward_cost", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker()
    else:
        main()
