"""MLA decode-attention benchmark: the Pallas MLA kernel against XLA formulations of the same absorbed attention,
and the KV-cache bytes per token of MLA against the per-head K/V of the equivalent multi-head attention.

Absorbed MLA decode is one latent "KV head" shared by H query heads: keys [c ; k_rope], values c (see
pallas_kernels/mla_decode_attention.py). Default configuration (for a GPU or TPU): contexts 8K and 32K, batch 1
and 8, H = 16 query heads (DeepSeek-V2-Lite; V3 has 128), kv_lora_rank r = 512, qk_rope_head_dim Dr = 64,
bfloat16, one query token per row, every row at the full context. Methods:

* ``xla_reference``: ``mla_decode_attention_reference`` under ``jax.jit`` (float32 masked softmax; the
  reference the kernel is tested against).
* ``xla_native``: the same math as XLA would run it in a model: einsums in the input dtype with float32
  accumulation, masked softmax in float32, probabilities cast to the input dtype for the value product.
* ``pallas_mla``: ``mla_decode_attention`` (automatic split count and query tiling).

Timing interleaves the methods: every round calls each method once in turn (A, B, C, A, B, C, ...), each call
ended by ``block_until_ready``; reported are the total over the rounds, the median, and the ratio of totals
against each XLA method (xla total / method total: > 1 means the method is faster). Also: compile time, the
cache bytes the kernel must read (B * seq_len * (r + Dr) * itemsize), the achieved bandwidth and its fraction of
the peak (``--peak-tbps`` or from the device kind), and each method's max abs error against the reference.

The KV-bytes table compares, per token and layer, MLA's cache (r + Dr values) with the per-head K and V an MHA
layer of the same heads would cache (H * (qk_nope_head_dim + Dr) keys + H * v_head_dim values), for DeepSeek-V3,
DeepSeek-V2-Lite and the benchmark's configuration.

On CPU there is no compiled Pallas kernel: ``--quick`` runs tiny shapes with the kernel in Pallas interpret mode
(a Python-level simulation), only to show that the script works and the methods agree. Its timings say nothing
about speed; speed needs a GPU or TPU.

    python benchmarks/bench_mla_attention.py               # GPU / TPU
    python benchmarks/bench_mla_attention.py --quick       # CPU, seconds (timings meaningless)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jspec.bench import detect_peak_tbps, environment, print_table, write_json  # noqa: E402
from pallas_kernels import mla_decode_attention, mla_decode_attention_reference  # noqa: E402

# Attention dims of released MLA models (HF config fields): heads, kv_lora_rank, qk_rope_head_dim,
# qk_nope_head_dim, v_head_dim.
MLA_MODELS = {
    "deepseek_v3": dict(heads=128, rank=512, rope_dim=64, nope_dim=128, v_dim=128),
    "deepseek_v2_lite": dict(heads=16, rank=512, rope_dim=64, nope_dim=128, v_dim=128),
}


def kv_bytes_per_token(heads: int, rank: int, rope_dim: int, nope_dim: int, v_dim: int, itemsize: int) -> dict:
    """Cache bytes per token and layer: MLA (latent + RoPE key) vs MHA with the same heads (per-head K and V)."""
    mla = (rank + rope_dim) * itemsize
    mha = heads * (nope_dim + rope_dim + v_dim) * itemsize
    return dict(heads=heads, rank=rank, rope_dim=rope_dim, nope_dim=nope_dim, v_dim=v_dim, itemsize=itemsize,
                mla_bytes=mla, mha_bytes=mha, mha_over_mla=mha / mla)


@functools.partial(jax.jit, static_argnames=("scale",))
def xla_native(q_latent, q_rope, latent, k_rope, seq_lens, *, scale):
    """Absorbed MLA attention as plain XLA ops in the input dtype (float32 accumulation and softmax).

    q_latent [B, T, H, r], q_rope [B, T, H, Dr], latent [B, S, r], k_rope [B, S, Dr], seq_lens [B] ->
    (out [B, T, H, r], lse [B, T, H]).
    """
    f32 = jnp.float32
    scores = (jnp.einsum("bthr,bsr->bths", q_latent, latent, preferred_element_type=f32)
              + jnp.einsum("bthr,bsr->bths", q_rope, k_rope, preferred_element_type=f32)) * scale
    num_tokens, cache_len = q_latent.shape[1], latent.shape[1]
    limits = seq_lens[:, None] - (num_tokens - 1 - jnp.arange(num_tokens))[None, :]            # [B, T]
    visible = jnp.arange(cache_len)[None, None, :] < limits[:, :, None]                        # [B, T, S]
    scores = jnp.where(visible[:, :, None, :], scores, -jnp.inf)
    top = jnp.max(scores, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.exp(scores - top)
    denom = weights.sum(axis=-1, keepdims=True)
    safe = jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bths,bsr->bthr", weights.astype(latent.dtype), latent, preferred_element_type=f32) / safe
    lse = jnp.where(denom > 0, top + jnp.log(safe), -jnp.inf)[..., 0]
    return out.astype(q_latent.dtype), lse


def make_case(batch, context, tokens, heads, rank, rope_dim, dtype, seed):
    keys = jax.random.split(jax.random.key(seed), 4)
    shapes = ((batch, tokens, heads, rank), (batch, tokens, heads, rope_dim), (batch, context, rank),
              (batch, context, rope_dim))
    arrays = tuple(jax.random.normal(k, s, jnp.float32).astype(dtype) for k, s in zip(keys, shapes))
    return (*arrays, jnp.full((batch,), context, jnp.int32))


def interleaved_times(compiled: dict, args, rounds: int, warmup: int):
    """{method: [seconds per round]}: each round calls every method once, in turn."""
    outputs = {}
    for _ in range(warmup):
        for name, fn in compiled.items():
            outputs[name] = jax.block_until_ready(fn(*args))
    times = {name: [] for name in compiled}
    for _ in range(rounds):
        for name, fn in compiled.items():
            start = time.perf_counter()
            outputs[name] = jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return times, outputs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, Pallas interpret mode on CPU")
    parser.add_argument("--contexts", type=int, nargs="+", default=None, help="default 8192 32768")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 8")
    parser.add_argument("--heads", type=int, default=16, help="query heads H")
    parser.add_argument("--rank", type=int, default=None, help="kv_lora_rank r (default 512; --quick 64)")
    parser.add_argument("--rope-dim", type=int, default=None, help="qk_rope_head_dim Dr (default 64; --quick 32)")
    parser.add_argument("--nope-dim", type=int, default=128, help="qk_nope_head_dim (KV-bytes table only)")
    parser.add_argument("--v-dim", type=int, default=128, help="v_head_dim (KV-bytes table only)")
    parser.add_argument("--tokens", type=int, default=1, help="query tokens per row (a decode chain)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--block-size", type=int, default=64, help="cache slots per kernel step")
    parser.add_argument("--num-splits", type=int, default=None, help="default: the kernel's automatic choice")
    parser.add_argument("--query-tile-rows", type=int, default=None, help="default: the kernel's automatic choice")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds; default 20")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tbps", type=float, default=None, help="peak memory bandwidth, TB/s")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<name>.json)")
    args = parser.parse_args(argv)

    if args.quick:
        contexts, batches = args.contexts or [256], args.batches or [1, 2]
        rank, rope_dim = args.rank or 64, args.rope_dim or 32
        rounds, warmup, interpret = args.rounds or 2, 1, True
    else:
        contexts, batches = args.contexts or [8192, 32768], args.batches or [1, 8]
        rank, rope_dim = args.rank or 512, args.rope_dim or 64
        rounds, warmup, interpret = args.rounds or 20, args.warmup, None
        if jax.default_backend() == "cpu":
            parser.error("no accelerator found: run on a GPU/TPU, or pass --quick for the CPU interpret-mode run")

    device_kind = environment()["device"]
    peak_tbps = args.peak_tbps if args.peak_tbps is not None else detect_peak_tbps(device_kind)
    dtype = jnp.dtype(args.dtype)
    itemsize = dtype.itemsize
    scale = float((args.nope_dim + rope_dim) ** -0.5)   # MLA's scale: qk_head_dim^-1/2 (no YaRN factor here)

    methods = {
        "xla_reference": functools.partial(mla_decode_attention_reference, scale=scale, block_size=args.block_size),
        "xla_native": functools.partial(xla_native, scale=scale),
        "pallas_mla": functools.partial(mla_decode_attention, scale=scale, block_size=args.block_size,
                                        interpret=interpret, num_splits=args.num_splits,
                                        query_tile_rows=args.query_tile_rows),
    }
    records = []
    for context in contexts:
        for batch in batches:
            case = make_case(batch, context, args.tokens, args.heads, rank, rope_dim, dtype, seed=context + batch)
            compiled, compile_s = {}, {}
            for name, fn in methods.items():
                start = time.perf_counter()
                compiled[name] = jax.jit(fn).lower(*case).compile()
                compile_s[name] = time.perf_counter() - start
            times, outputs = interleaved_times(compiled, case, rounds, warmup)
            ref = outputs["xla_reference"][0].astype(jnp.float32)
            cache_bytes = batch * context * (rank + rope_dim) * itemsize
            totals = {name: sum(t) for name, t in times.items()}
            for name in methods:
                median_s = statistics.median(times[name])
                tbps = cache_bytes / median_s / 1e12
                records.append(dict(
                    context=context, batch=batch, method=name, compile_s=compile_s[name], rounds=rounds,
                    total_s=totals[name], median_ms=median_s * 1e3,
                    speedup_vs_xla_reference=totals["xla_reference"] / totals[name],
                    speedup_vs_xla_native=totals["xla_native"] / totals[name],
                    cache_bytes=cache_bytes, achieved_tbps=tbps,
                    fraction_of_peak=None if peak_tbps is None else tbps / peak_tbps,
                    max_abs_err_vs_reference=float(jnp.abs(outputs[name][0].astype(jnp.float32) - ref).max())))

    note = "  [QUICK: Pallas interpret mode on CPU, timings meaningless]" if args.quick else ""
    print(f"device: {device_kind}  jax {jax.__version__}  dtype {dtype.name}  H {args.heads}  r {rank}  "
          f"Dr {rope_dim}  T {args.tokens}  block {args.block_size}  peak {peak_tbps} TB/s{note}")
    print_table([dict(r, cache_mb=r["cache_bytes"] / 1e6,
                      pct_peak=None if r["fraction_of_peak"] is None else 100 * r["fraction_of_peak"])
                 for r in records],
                ["context", "batch", "method", "compile_s", "median_ms", "speedup_vs_xla_reference",
                 "speedup_vs_xla_native", "cache_mb", "achieved_tbps", "pct_peak", "max_abs_err_vs_reference"])

    kv_table = [dict(config=name, **kv_bytes_per_token(**dims, itemsize=itemsize)) for name, dims in MLA_MODELS.items()]
    kv_table.append(dict(config="benchmark", **kv_bytes_per_token(args.heads, rank, rope_dim, args.nope_dim,
                                                                  args.v_dim, itemsize)))
    print(f"\nKV cache bytes per token and layer ({dtype.name}): MLA latent + RoPE key vs MHA per-head K and V")
    print_table(kv_table, ["config", "heads", "rank", "rope_dim", "nope_dim", "v_dim", "mla_bytes", "mha_bytes",
                           "mha_over_mla"])

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_path = pathlib.Path(args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                     f"mla_attention_{'quick_' if args.quick else ''}{stamp}.json"))
    written = write_json(out_path.stem, dict(
        benchmark="mla_attention", quick=args.quick, dtype=dtype.name, heads=args.heads, rank=rank,
        rope_dim=rope_dim, tokens=args.tokens, block_size=args.block_size, num_splits=args.num_splits,
        query_tile_rows=args.query_tile_rows, rounds=rounds, warmup=warmup, peak_tbps=peak_tbps, timestamp=stamp,
        records=records, kv_bytes_per_token={row["config"]: row for row in kv_table}), out_path.parent)
    print(f"wrote {written}")
    return records


if __name__ == "__main__":
    main()
