"""Multi-head latent attention (MLA, DeepSeek-V2/V3) decode in the absorbed form, as a Pallas kernel, with a jnp
reference.

In absorbed decode (../shared/NEXT-WAVE.md §1.5) MLA is multi-query attention with one latent "KV head" shared by
all H query heads: the key of cache slot s is [c_s ; k_rope_s] (the normalised latent, kv_lora_rank = r values,
and the rotated RoPE key, qk_rope_head_dim = Dr values) and its value is c_s itself. Query head h brings
q_latent_h = W_UK,h^T q_nope_h (r values) and q_rope_h (Dr values):

    score(h, s) = (q_latent_h . c_s + q_rope_h . k_rope_s) * scale,   out_h = softmax(score(h, .)) @ c   (r values)

and the caller applies W_UV and the output projection to out. The cache therefore holds r + Dr values per token
and layer (1152 bytes in bf16 for DeepSeek-V3, against 80 KiB of per-head K/V for the equivalent MHA).

The kernel is the dense decode kernel of `decode_attention.py` (one implementation: the block-list kernel and
online-softmax update of `sparse_decode_attention.py`) run with one KV head, G = H query heads per KV head, the
keys in two parts (latent, RoPE key: their scores are summed, nothing is concatenated) and the values aliased to
the keys' first part: the latent is one kernel operand, and each latent block is read from HBM once and used for
both the scores and the values. TPU (Mosaic, scalar-prefetch grid) and Triton (GPU) forms; interpret mode on CPU.
On GPU the H * T query rows are split over programs of ``query_tile_rows`` rows (16 for r = 512, which keeps a
program's float32 accumulator [16, 512]); each such program reads the latent blocks of its row again (from L2
when the programs of a row run together).

Verified here (CPU only): both forms in Pallas interpret mode against the reference, the TPU form also in TPU
interpret mode, and lowering to Triton IR / Mosaic MLIR. Not verified: the Triton and Mosaic compilers, and speed
(see benchmarks/bench_mla_attention.py).
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from pallas_kernels import _common
from pallas_kernels.sparse_decode_attention import block_list_attention, resolve_launch


def _check_scale(scale) -> float:
    return _common.check_static_float(
        "scale", scale, "a Python float (MLA's softmax scale: qk_head_dim**-0.5 times the YaRN mscale factor, not "
        "(kv_lora_rank + qk_rope_head_dim)**-0.5)")


def validate_mla_inputs(q_latent, q_rope, latent, k_rope, seq_lens, block_size: int, backend: str | None):
    """Validates `mla_decode_attention`'s array arguments and block size.

    Args:
      q_latent: [B, T, H, r]; q_rope: [B, T, H, Dr]; latent: [B, S, r]; k_rope: [B, S, Dr]; seq_lens: [B].
      backend: "tpu", "triton" or None (None: no form-specific checks; used by the reference).
    Returns:
      (batch, cache_len, num_tokens, num_heads, kv_lora_rank, rope_dim).
    Raises:
      ValueError naming the offending argument and the expected form.
    """
    if latent.ndim != 3:
        raise ValueError(f"latent must have shape [B, S, kv_lora_rank]; got shape {latent.shape}")
    batch, cache_len, rank = latent.shape
    if k_rope.ndim != 3 or k_rope.shape[:2] != (batch, cache_len):
        raise ValueError(
            f"k_rope must have shape [B, S, qk_rope_head_dim] with [B, S] = {(batch, cache_len)} (those of "
            f"latent); got shape {k_rope.shape}")
    rope_dim = k_rope.shape[2]
    if q_latent.ndim != 4 or q_latent.shape[0] != batch or q_latent.shape[3] != rank:
        raise ValueError(
            f"q_latent must have shape [B, T, H, kv_lora_rank] with B = {batch} and kv_lora_rank = {rank} (those "
            f"of latent); got shape {q_latent.shape}")
    _, num_tokens, num_heads, _ = q_latent.shape
    if q_rope.shape != (batch, num_tokens, num_heads, rope_dim):
        raise ValueError(
            f"q_rope must have shape [B, T, H, qk_rope_head_dim] = {(batch, num_tokens, num_heads, rope_dim)} "
            f"(B, T, H of q_latent, qk_rope_head_dim of k_rope); got shape {q_rope.shape}")
    if num_tokens < 1 or num_heads < 1:
        raise ValueError(f"q_latent must hold at least one query token and head; got shape {q_latent.shape}")
    named = (("q_latent", q_latent), ("q_rope", q_rope), ("latent", latent), ("k_rope", k_rope))
    for name, x in named:
        _common.check_float_dtype(name, x)
    if len({np.dtype(x.dtype) for _, x in named}) != 1:
        raise ValueError("q_latent, q_rope, latent and k_rope must share one dtype; got "
                         + ", ".join(f"{name} {x.dtype}" for name, x in named))
    _common.check_block_size(block_size, cache_len, "latent.shape[1]")
    _common.check_head_dim("kv_lora_rank (latent.shape[2])", rank, latent.dtype, backend)
    _common.check_head_dim("qk_rope_head_dim (k_rope.shape[2])", rope_dim, latent.dtype, backend)
    _common.check_seq_lens(seq_lens, batch, cache_len)
    return batch, cache_len, num_tokens, num_heads, rank, rope_dim


@functools.partial(jax.jit, static_argnames=(
    "scale", "block_size", "interpret", "backend", "num_splits", "query_tile_rows", "num_warps", "num_stages"))
def _mla_kernel_jit(q_latent, q_rope, latent, k_rope, seq_lens, *, scale, block_size, interpret, backend,
                    num_splits, query_tile_rows, num_warps, num_stages):
    # One KV head: [B, T, H, .] queries -> [B, 1, T, H, .]; [B, S, .] cache -> [B, S, 1, .] (free reshapes).
    out, lse = block_list_attention(
        q_latent[:, None], latent[:, :, None], None, seq_lens, None, block_size=block_size, sm_scale=scale,
        interpret=interpret, backend=backend, num_splits=num_splits, num_warps=num_warps, num_stages=num_stages,
        q_rope=q_rope[:, None], k_rope=k_rope[:, :, None], query_tile_rows=query_tile_rows)
    return out[:, 0], lse[:, 0]


def mla_decode_attention(q_latent, q_rope, latent, k_rope, seq_lens, *, scale: float, block_size: int = 64,
                         interpret=None, backend: str | None = None, num_splits: int | None = None,
                         query_tile_rows: int | None = None, num_warps: int | None = None,
                         num_stages: int | None = None):
    """Absorbed MLA decode attention over the first seq_len cache slots of each row (flash decoding).

    Args:
      q_latent: [B, T, H, r] the absorbed queries W_UK,h^T q_nope (r = kv_lora_rank), T query tokens per row at
        cache positions seq_len - T ... seq_len - 1 (a decode chain, causally masked among themselves: token t
        sees slots < seq_len - (T - 1 - t)), H query heads.
      q_rope: [B, T, H, Dr] the rotated RoPE queries (Dr = qk_rope_head_dim).
      latent: [B, S, r] the latent cache c (keys' first part and values), the query tokens' entries written.
      k_rope: [B, S, Dr] the rotated RoPE key cache (keys' second part).
      seq_lens: [B] int32, valid cache slots per row (including the T query tokens), 0 <= seq_len <= S.
      scale: static float, the softmax scale (required: MLA's is qk_head_dim**-0.5 times the YaRN factor,
        not a function of r + Dr).
      block_size: static power of two >= 16 dividing S: cache slots per kernel step. The default 64 keeps a
        Triton program's double-buffered latent + RoPE blocks at 2 * 64 * (512 + 64) * 2 bytes = 144 KiB of shared
        memory for DeepSeek's bf16 widths; on TPU (~0.35 us per grid step) prefer 512 or more.
      interpret: None (True on CPU), bool, or ``pltpu.InterpretParams()`` (TPU interpret mode).
      backend: None, "tpu" or "triton"; the kernel form.
      num_splits: static split count of each row's slot range (flash decoding); None: 1 on TPU and in interpret
        mode, enough to launch ~128 programs on GPU.
      query_tile_rows: static power of two >= 16, query rows (token, head pairs) per program; None: all of
        them on TPU and in interpret mode, 8192 // r on GPU. Larger than T * H (padded to a power of two):
        one tile.
      num_warps, num_stages: Triton compiler settings (GPU only).

    Returns:
      out [B, T, H, r] in q_latent.dtype and lse [B, T, H] float32 (log-sum-exp of the scaled scores, for
      merging partial results with ``merge_attention_partials``). Guarantee: equal (to float32 accumulation;
      bf16 probabilities in the P.V product for bf16 inputs) to softmax attention with keys [latent ; k_rope]
      and values latent over the visible slots; that is ``mla_decode_attention_reference``. Slots at or past
      seq_len are never read; the latent is read once per block (it is one operand, not a K and a V copy). A
      row with seq_len = 0 (or a token with no visible slot) gives out = 0 and lse = -inf.

    Raises:
      ValueError naming the argument for malformed shapes, dtypes, static arguments or an unsupported
      platform; seq_lens values are checked only when concrete (outside jit).
    """
    interpret = _common.resolve_interpret(interpret)
    backend = _common.resolve_backend(backend, interpret)
    batch, cache_len, num_tokens, num_heads, rank, _ = validate_mla_inputs(
        q_latent, q_rope, latent, k_rope, seq_lens, block_size, backend)
    scale = _check_scale(scale)
    num_splits, query_tile_rows = resolve_launch(
        backend, interpret, batch=batch, num_kv_heads=1, rows=_common.kernel_rows(num_tokens * num_heads),
        head_dim=rank, max_entries=cache_len // block_size, num_splits=num_splits, query_tile_rows=query_tile_rows)
    return _mla_kernel_jit(q_latent, q_rope, latent, k_rope, seq_lens, scale=scale, block_size=block_size,
                           interpret=interpret, backend=backend, num_splits=num_splits,
                           query_tile_rows=query_tile_rows, num_warps=num_warps, num_stages=num_stages)


@functools.partial(jax.jit, static_argnames=("scale",))
def _mla_reference_jit(q_latent, q_rope, latent, k_rope, seq_lens, *, scale):
    mask = _common.causal_key_mask(seq_lens, q_latent.shape[1], latent.shape[1], None)[:, None]  # [B, 1, T, S]
    out, lse = _common.masked_attention_reference(
        q_latent[:, None], latent[:, :, None], latent[:, :, None], mask, scale,
        q_rope=q_rope[:, None], k_rope=k_rope[:, :, None])
    return out[:, 0], lse[:, 0]


def mla_decode_attention_reference(q_latent, q_rope, latent, k_rope, seq_lens, *, scale: float,
                                   block_size: int = 64, interpret=None, backend=None, num_splits=None,
                                   query_tile_rows=None, num_warps=None, num_stages=None):
    """Plain-jnp `mla_decode_attention` (same signature and guarantees; the kernel-only arguments are ignored).

    A dense float32 masked softmax (the expanded reading of the same math: scores from both key parts, values the
    latent) over slots s < seq_lens[b] - (T - 1 - t). Also the XLA baseline of benchmarks/bench_mla_attention.py.
    """
    del interpret, backend, num_splits, query_tile_rows, num_warps, num_stages
    validate_mla_inputs(q_latent, q_rope, latent, k_rope, seq_lens, block_size, None)
    return _mla_reference_jit(q_latent, q_rope, latent, k_rope, seq_lens, scale=_check_scale(scale))
