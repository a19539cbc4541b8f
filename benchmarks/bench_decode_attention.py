"""Decode-attention benchmark: block-sparse Pallas kernel, dense Pallas kernel and XLA dense attention.

On a GPU (the default configuration): contexts 8K / 32K / 128K, batch 1 and 8, head dim 128, 8 KV heads x 4
query heads each, bfloat16, one query token per row, every row at the full context. Methods:

* ``xla_dense``: ``decode_attention_reference`` under ``jax.jit`` (XLA's dense masked softmax); the baseline.
* ``pallas_dense``: ``decode_attention`` (flash decoding, automatic split count).
* ``pallas_sparse``: ``sparse_decode_attention`` with ``--top-k`` (64) blocks of ``--sparse-block-size`` (64)
  per (row, KV head), chosen at random (distinct, ascending).

Reported per method: compile time (lower + compile, apart), median run time over ``--runs`` runs (each ended by
``block_until_ready``), the speedup against xla_dense measured in the same run (xla time / method time), the
bytes of K/V the method must read (xla_dense and pallas_dense: seq_len positions of K and V per row; sparse:
the selected blocks), achieved bandwidth = bytes / time, and its fraction of the peak (``--peak-tbps`` or from
the device kind: H100 SXM 3.35 TB/s, H200 4.8 TB/s). Also the max abs error of each kernel against its
reference. Prints a table and writes JSON to benchmarks/results/.

``--smoke`` runs tiny shapes in Pallas interpret mode on CPU, only to show that the script works.

    python benchmarks/bench_decode_attention.py               # GPU
    python benchmarks/bench_decode_attention.py --smoke       # CPU, seconds
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jspec.bench import detect_peak_tbps  # noqa: E402
from pallas_kernels import (  # noqa: E402
    decode_attention,
    decode_attention_reference,
    sparse_decode_attention,
    sparse_decode_attention_reference,
)


def make_case(batch, context, num_kv_heads, group, head_dim, dtype, top_k, sparse_block_size, seed):
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (batch, num_kv_heads, group, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (batch, context, num_kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (batch, context, num_kv_heads, head_dim), jnp.float32).astype(dtype)
    seq_lens = jnp.full((batch,), context, jnp.int32)
    num_blocks = context // sparse_block_size
    slots = min(top_k, num_blocks)
    idx = np.stack([np.sort(rng.choice(num_blocks, size=slots, replace=False))
                    for _ in range(batch * num_kv_heads)]).reshape(batch, num_kv_heads, slots)
    return q, k, v, seq_lens, jnp.asarray(idx, jnp.int32)


def time_method(fn, args, runs: int, warmup: int):
    """(compile seconds, median run seconds, output) for a jitted fn."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    out = None
    for _ in range(warmup):
        out = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return compile_s, statistics.median(times), out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, Pallas interpret mode on CPU")
    parser.add_argument("--contexts", type=int, nargs="+", default=None, help="default 8192 32768 131072")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 8")
    parser.add_argument("--num-kv-heads", type=int, default=None, help="default 8")
    parser.add_argument("--group", type=int, default=4, help="query heads per KV head")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--top-k", type=int, default=64, help="selected blocks per (row, KV head)")
    parser.add_argument("--sparse-block-size", type=int, default=64)
    parser.add_argument("--dense-block-size", type=int, default=128)
    parser.add_argument("--num-splits", type=int, default=None, help="default: the kernels' automatic choice")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per method (median); default 20")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tbps", type=float, default=None, help="peak memory bandwidth, TB/s")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<name>.json)")
    args = parser.parse_args(argv)

    if args.smoke:
        contexts = args.contexts or [256]
        batches = args.batches or [1, 2]
        num_kv_heads = args.num_kv_heads or 2
        top_k = min(args.top_k, 2)
        runs = args.runs or 2
        warmup = 1
        interpret = True
    else:
        contexts = args.contexts or [8192, 32768, 131072]
        batches = args.batches or [1, 8]
        num_kv_heads = args.num_kv_heads or 8
        top_k = args.top_k
        runs = args.runs or 20
        warmup = args.warmup
        interpret = None
        if jax.default_backend() == "cpu":
            parser.error("no accelerator found: run on a GPU/TPU, or pass --smoke for the CPU interpret-mode run")

    device = jax.devices()[0]
    device_kind = getattr(device, "device_kind", str(device))
    peak_tbps = args.peak_tbps if args.peak_tbps is not None else detect_peak_tbps(device_kind)
    dtype = jnp.dtype(args.dtype)
    itemsize = dtype.itemsize

    methods = {
        "xla_dense": functools.partial(decode_attention_reference, block_size=args.dense_block_size),
        "pallas_dense": functools.partial(decode_attention, block_size=args.dense_block_size,
                                          interpret=interpret, num_splits=args.num_splits),
        "pallas_sparse": functools.partial(sparse_decode_attention, block_size=args.sparse_block_size,
                                           interpret=interpret, num_splits=args.num_splits),
    }
    records = []
    for context in contexts:
        for batch in batches:
            q, k, v, seq_lens, idx = make_case(batch, context, num_kv_heads, args.group, args.head_dim, dtype,
                                               top_k, args.sparse_block_size, seed=context + batch)
            per_position = num_kv_heads * args.head_dim * itemsize * 2          # K and V, all KV heads
            dense_bytes = batch * context * per_position
            sparse_positions = int((np.asarray(idx) >= 0).sum()) * args.sparse_block_size  # over (row, head)
            sparse_bytes = sparse_positions * args.head_dim * itemsize * 2
            results = {}
            for name, fn in methods.items():
                call_args = (q, k, v, seq_lens, idx) if name == "pallas_sparse" else (q, k, v, seq_lens)
                compile_s, run_s, (out, lse) = time_method(fn, call_args, runs, warmup)
                results[name] = dict(compile_s=compile_s, run_s=run_s, out=out)
            # Correctness against the references (not timed).
            xla_out = results["xla_dense"]["out"]
            sparse_ref, _ = jax.jit(functools.partial(sparse_decode_attention_reference,
                                                      block_size=args.sparse_block_size))(q, k, v, seq_lens, idx)
            errors = {
                "xla_dense": 0.0,
                "pallas_dense": float(jnp.abs(results["pallas_dense"]["out"].astype(jnp.float32)
                                              - xla_out.astype(jnp.float32)).max()),
                "pallas_sparse": float(jnp.abs(results["pallas_sparse"]["out"].astype(jnp.float32)
                                               - sparse_ref.astype(jnp.float32)).max()),
            }
            baseline = results["xla_dense"]["run_s"]
            for name, res in results.items():
                bytes_read = sparse_bytes if name == "pallas_sparse" else dense_bytes
                tbps = bytes_read / res["run_s"] / 1e12
                records.append(dict(
                    context=context, batch=batch, method=name, compile_s=res["compile_s"],
                    median_ms=res["run_s"] * 1e3, speedup_vs_xla=baseline / res["run_s"],
                    kv_bytes=bytes_read, achieved_tbps=tbps,
                    fraction_of_peak=None if peak_tbps is None else tbps / peak_tbps,
                    max_abs_err_vs_reference=errors[name]))

    header = (f"{'context':>8} {'batch':>5} {'method':<14} {'compile_s':>9} {'median_ms':>10} {'vs_xla':>7} "
              f"{'KV_MB':>9} {'TB/s':>7} {'%peak':>6} {'max_err':>8}")
    smoke_note = "  [SMOKE: interpret mode, timings meaningless]" if args.smoke else ""
    print(f"device: {device_kind}  jax {jax.__version__}  dtype {dtype.name}  Hkv {num_kv_heads} x G {args.group}"
          f"  D {args.head_dim}  peak {peak_tbps} TB/s{smoke_note}")
    print(header)
    print("-" * len(header))
    for r in records:
        peak = "-" if r["fraction_of_peak"] is None else f"{100 * r['fraction_of_peak']:.1f}"
        print(f"{r['context']:>8} {r['batch']:>5} {r['method']:<14} {r['compile_s']:>9.2f} {r['median_ms']:>10.3f} "
              f"{r['speedup_vs_xla']:>6.2f}x {r['kv_bytes'] / 1e6:>9.1f} {r['achieved_tbps']:>7.3f} {peak:>6} "
              f"{r['max_abs_err_vs_reference']:>8.1e}")

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                        f"decode_attention_{'smoke_' if args.smoke else ''}{stamp}.json")
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(dict(
            benchmark="decode_attention", smoke=args.smoke, device_kind=device_kind, platform=jax.default_backend(),
            jax_version=jax.__version__, dtype=dtype.name, num_kv_heads=num_kv_heads, group=args.group,
            head_dim=args.head_dim, top_k=top_k, sparse_block_size=args.sparse_block_size,
            dense_block_size=args.dense_block_size, num_splits=args.num_splits, runs=runs, warmup=warmup,
            peak_tbps=peak_tbps, timestamp=stamp, records=records), f, indent=2)
    print(f"wrote {out_path}")
    return records


if __name__ == "__main__":
    main()
