"""Shared helpers for the Pallas decode-attention kernels.

One implementation of each of: platform / interpret / backend resolution, argument validation, reading
values when they are concrete, the per-query-row length rule, and the dense masked-softmax reference math
that every `*_reference` function is built on.

Conventions used by every kernel in this package:

* ``interpret=None`` means "interpret on CPU, compile elsewhere". ``interpret`` may also be ``True`` (the
  generic Pallas interpreter), ``False`` (compile for the accelerator) or a
  ``jax.experimental.pallas.tpu.InterpretParams()`` (TPU interpret mode: simulates TPU memory spaces, DMAs and
  SMEM on CPU; it always runs the TPU form of a kernel).
* ``backend=None`` picks the form of the kernel from the default JAX platform: ``"tpu"`` (Mosaic TPU: a
  scalar-prefetch grid whose index maps read the block table) on TPU, ``"triton"`` (one program per
  (row, KV head, split) that loops over its blocks) on GPU and on CPU. Both forms run in interpret mode on CPU,
  so both are tested here.
* Query tokens per KV head are the rows of the kernel's query tile; the tile is padded to
  ``max(16, next_power_of_2(rows))`` rows because Triton's ``tl.dot`` needs every dimension >= 16 and power-of-two
  tensor sizes, and TPU's bf16 tile is (16, 128).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

BACKENDS = ("tpu", "triton")
_SUPPORTED_PLATFORMS = ("cpu", "gpu", "tpu")
_FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MIN_BLOCK_SIZE = 16
MIN_KERNEL_ROWS = 16


def default_platform() -> str:
    """The platform of JAX's default backend: ``"cpu"``, ``"gpu"`` (CUDA or ROCm) or ``"tpu"``."""
    return jax.default_backend()


def is_tpu_interpret(interpret: Any) -> bool:
    return isinstance(interpret, pltpu.InterpretParams)


def resolve_interpret(interpret: Any) -> Any:
    """``None`` -> True on CPU, False on GPU/TPU; other values are returned unchanged (after a type check)."""
    if interpret is None:
        return default_platform() == "cpu"
    if isinstance(interpret, (bool, np.bool_)):
        return bool(interpret)
    if is_tpu_interpret(interpret):
        return interpret
    raise ValueError(
        "interpret must be None, a bool, or jax.experimental.pallas.tpu.InterpretParams(); "
        f"got {interpret!r}")


def resolve_backend(backend: str | None, interpret: Any) -> str:
    """Returns the kernel form to build ("tpu" or "triton") and raises on an unsupported combination.

    Args:
      backend: None, "tpu" or "triton".
      interpret: an already resolved ``interpret`` value.
    """
    platform = default_platform()
    if platform not in _SUPPORTED_PLATFORMS:
        raise ValueError(
            f"Pallas decode-attention kernels support the cpu (interpret mode), gpu and tpu platforms; the "
            f"default JAX platform is {platform!r}. Use the *_reference function on this platform.")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None, 'tpu' or 'triton'; got {backend!r}")
    if is_tpu_interpret(interpret):
        if backend == "triton":
            raise ValueError(
                "backend='triton' cannot run under TPU interpret mode (interpret=pltpu.InterpretParams()); "
                "use backend='tpu' or interpret=True")
        return "tpu"
    if backend is None:
        backend = "tpu" if platform == "tpu" else "triton"
    if not interpret:
        if platform == "cpu":
            raise ValueError(
                "Pallas kernels cannot be compiled for CPU: pass interpret=True (the default on CPU) or use the "
                "*_reference function")
        if platform == "tpu" and backend != "tpu":
            raise ValueError(f"backend={backend!r} cannot be compiled on TPU; use backend='tpu' (or None)")
        if platform == "gpu" and backend != "triton":
            raise ValueError(f"backend={backend!r} cannot be compiled on GPU; use backend='triton' (or None)")
    return backend


def next_power_of_2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def is_power_of_2(x: int) -> bool:
    return x >= 1 and (x & (x - 1)) == 0


def kernel_rows(num_rows: int) -> int:
    """Rows of the kernel's query tile for ``num_rows`` query rows (see module docstring)."""
    return max(MIN_KERNEL_ROWS, next_power_of_2(num_rows))


def concrete_value(x) -> np.ndarray | None:
    """``np.asarray(x)`` when ``x`` is concrete (outside jit), else None (a tracer: no value checks possible)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_static_int(name: str, value, *, minimum: int | None = None, power_of_2: bool = False) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be a Python int; got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    if power_of_2 and not is_power_of_2(value):
        raise ValueError(f"{name} must be a power of two; got {value}")
    return value


def check_float_dtype(name: str, x) -> None:
    if jnp.dtype(x.dtype) not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must have dtype float32, bfloat16 or float16; got {x.dtype}")


def check_int_dtype(name: str, x) -> None:
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must have an integer dtype (int32); got {x.dtype}")


def check_block_size(block_size, cache_len: int, cache_len_name: str) -> None:
    """block_size: a static power of two >= 16 dividing the cache length (named ``cache_len_name`` in errors)."""
    check_static_int("block_size", block_size, minimum=MIN_BLOCK_SIZE, power_of_2=True)
    if cache_len % block_size:
        raise ValueError(
            f"block_size ({block_size}) must divide the cache length S = {cache_len_name} = {cache_len}; "
            "allocate the cache as a multiple of the block size")


def check_head_dim(label: str, dim: int, dtype, backend: str | None) -> None:
    """A feature dim the kernels tile whole: a multiple of 16 bytes; for Triton also a power of two >= 16."""
    itemsize = jnp.dtype(dtype).itemsize
    if (dim * itemsize) % 16:
        raise ValueError(
            f"{label} = {dim} must be a multiple of 16 bytes ({16 // itemsize} elements of {jnp.dtype(dtype)}) "
            "for Mosaic GPU / TPU DMA alignment")
    if backend == "triton" and not (is_power_of_2(dim) and dim >= 16):
        raise ValueError(
            f"backend='triton' needs {label} = {dim} to be a power of two >= 16 (Triton tensor sizes must be "
            "powers of two and tl.dot needs dims >= 16)")


def check_seq_lens(seq_lens, batch: int, cache_len: int) -> None:
    """seq_lens: [B] integer; its values lie in [0, S] (checked only when concrete, i.e. outside jit)."""
    if seq_lens.shape != (batch,):
        raise ValueError(f"seq_lens must have shape [B] = ({batch},); got {seq_lens.shape}")
    check_int_dtype("seq_lens", seq_lens)
    lens = concrete_value(seq_lens)
    if lens is not None and ((lens < 0).any() or (lens > cache_len).any()):
        raise ValueError(f"seq_lens must lie in [0, S = {cache_len}]; got {lens.tolist()}")


def check_static_float(name: str, value, expected: str = "a Python float") -> float:
    """``float(value)`` for a Python (or NumPy) real number; else ValueError naming ``name`` and ``expected``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name} must be {expected}; got {value!r}")
    return float(value)


def resolve_sm_scale(sm_scale, head_dim: int) -> float:
    if sm_scale is None:
        return 1.0 / math.sqrt(head_dim)
    return check_static_float("sm_scale", sm_scale, "None or a Python float")


def validate_decode_inputs(q, k, v, seq_lens, block_size: int, backend: str | None):
    """Validates the arguments shared by the dense and sparse decode kernels and their references.

    Args:
      q: [B, Hkv, G, D] or [B, Hkv, T, G, D].
      k, v: [B, S, Hkv, D].
      seq_lens: [B] integer.
      block_size: static int.
      backend: "tpu", "triton" or None (None: no form-specific checks; used by the references).

    Returns:
      (batch, cache_len, num_kv_heads, num_query_tokens, group, head_dim).
    Raises:
      ValueError naming the offending argument.
    """
    if q.ndim not in (4, 5):
        raise ValueError(f"q must have shape [B, Hkv, G, D] or [B, Hkv, T, G, D]; got shape {q.shape}")
    if k.ndim != 4:
        raise ValueError(f"k must have shape [B, S, Hkv, D]; got shape {k.shape}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {k.shape} ([B, S, Hkv, D]); got {v.shape}")
    batch, cache_len, num_kv_heads, head_dim = k.shape
    if q.shape[0] != batch:
        raise ValueError(f"q batch size {q.shape[0]} must equal the batch size of k ({batch})")
    if q.shape[1] != num_kv_heads:
        raise ValueError(
            f"q must have shape [B, Hkv, G, D] with Hkv = k.shape[2] = {num_kv_heads} KV heads; got q.shape[1] = "
            f"{q.shape[1]} (reshape q [B, Hq, D] to [B, Hkv, Hq // Hkv, D])")
    if q.shape[-1] != head_dim:
        raise ValueError(f"q head dim {q.shape[-1]} must equal the head dim of k ({head_dim})")
    num_query_tokens = 1 if q.ndim == 4 else q.shape[2]
    group = q.shape[-2]
    if group < 1 or num_query_tokens < 1:
        raise ValueError(f"q must have at least one query head and token; got shape {q.shape}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_float_dtype(name, x)
    if k.dtype != v.dtype or q.dtype != k.dtype:
        raise ValueError(f"q, k and v must share one dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    check_block_size(block_size, cache_len, "k.shape[1]")
    check_head_dim("the head dim D", head_dim, k.dtype, backend)
    if backend == "tpu" and num_kv_heads > 1 and head_dim % 128:
        raise ValueError(
            f"backend='tpu' needs the head dim D = {head_dim} to be a multiple of 128 when Hkv > 1: the cache "
            "[B, S, Hkv, D] is read as [B, S, Hkv*D] in (block_size, D) tiles, whose minor dim must be a "
            "multiple of 128 lanes")
    check_seq_lens(seq_lens, batch, cache_len)
    return batch, cache_len, num_kv_heads, num_query_tokens, group, head_dim


def query_row_limits(seq_lens, num_query_tokens: int):
    """Exclusive key-position limit of each query token: [B, T] int32.

    Query token t of T sits at cache position ``seq_len - T + t`` (the T newest cache entries are the query
    tokens, already written), so it sees keys at positions ``< seq_len - (T - 1 - t)``; with T = 1 the query sees
    positions ``< seq_len``.
    """
    t = jnp.arange(num_query_tokens, dtype=jnp.int32)
    return seq_lens.astype(jnp.int32)[:, None] - (num_query_tokens - 1 - t)[None, :]


def check_sliding_window(sliding_window) -> int | None:
    if sliding_window is None:
        return None
    return check_static_int("sliding_window", sliding_window, minimum=1)


def causal_key_mask(seq_lens, num_query_tokens: int, cache_len: int, sliding_window: int | None):
    """[B, T, S] bool: key position s is visible to query token t (causal, optionally a sliding window).

    Token t (at position p = seq_len - T + t) sees keys p - sliding_window < s <= p.
    """
    positions = jnp.arange(cache_len, dtype=jnp.int32)[None, None, :]
    limits = query_row_limits(seq_lens, num_query_tokens)[:, :, None]                # exclusive upper bound
    mask = positions < limits
    if sliding_window is not None:
        mask = mask & (positions >= limits - sliding_window)
    return mask


def masked_attention_reference(q, k, v, key_mask, sm_scale: float, q_rope=None, k_rope=None):
    """Dense masked softmax attention in float32: the math behind every ``*_reference`` function.

    Args:
      q: [B, Hkv, T, G, D].
      k: [B, S, Hkv, D].
      v: [B, S, Hkv, Dv] (MLA passes the latent as both k and v).
      key_mask: [B, Hkv, T, S] bool, True where query token t may attend to key position s.
      sm_scale: scale applied to the scores.
      q_rope, k_rope: optional second key part, [B, Hkv, T, G, Dr] and [B, S, Hkv, Dr]: the score is then
        (q.k + q_rope.k_rope) * sm_scale, as if q and k were concatenated along the feature dim.

    Returns:
      out [B, Hkv, T, G, Dv] in q.dtype (0 for rows with no visible key) and lse [B, Hkv, T, G] float32
      (log-sum-exp of the scaled scores over visible keys; -inf for rows with no visible key).
    """
    hi = jax.lax.Precision.HIGHEST
    f32 = jnp.float32
    scores = jnp.einsum("bhtgd,bshd->bhtgs", q.astype(f32), k.astype(f32), precision=hi)
    if q_rope is not None:
        scores = scores + jnp.einsum("bhtgd,bshd->bhtgs", q_rope.astype(f32), k_rope.astype(f32), precision=hi)
    scores = scores * sm_scale
    scores = jnp.where(key_mask[:, :, :, None, :], scores, -jnp.inf)
    row_max = scores.max(axis=-1)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    probs = jnp.exp(scores - row_max[..., None])
    denom = probs.sum(axis=-1)
    lse = jnp.where(denom > 0, row_max + jnp.log(jnp.where(denom > 0, denom, 1.0)), -jnp.inf)
    out = jnp.einsum("bhtgs,bshd->bhtgd", probs, v.astype(f32), precision=hi)
    out = out / jnp.where(denom > 0, denom, 1.0)[..., None]
    return out.astype(q.dtype), lse


def as_multi_token(q):
    """[B, Hkv, G, D] -> [B, Hkv, 1, G, D]; [B, Hkv, T, G, D] unchanged."""
    return q[:, :, None] if q.ndim == 4 else q


def from_multi_token(x, q_ndim: int):
    """Inverse of ``as_multi_token`` for an output with the token axis at 2 ([B, Hkv, T, G, ...])."""
    return x[:, :, 0] if q_ndim == 4 else x
