"""InfLLM-v2-style block selection for sparse decode attention (pure jnp), with NOSA's optional extra scores.

Pipeline (ALGORITHMS.md section 7), per row b, KV head h, for the one query token at position seq_len - 1:

1. Compressed keys: ``K_c[j] = mean(K[stride*j : stride*j + kernel_size])`` for each full kernel
   (``compress_keys``; kept up to date one decode step at a time by ``update_compressed_keys``).
2. ``S[j] = sum over the G query heads of softmax_j(q_g . K_c[j] * sm_scale)`` over the row's valid kernels.
3. Max-pool to blocks: block b takes the max of S over the kernels that overlap it,
   j in [r*b - p, r*b + r - 1] with r = block_size / stride and p = kernel_size / stride - 1 (for InfLLM's
   32 / 16 / 64: window 5, stride 4, pad 1, as in ``max_pooling_1d``).
4. Optional NOSA query-agnostic ``extra_block_scores`` are added.
5. Forced in (+inf): the first ``init_blocks`` blocks and the ``local_blocks`` most recent blocks ending at the
   query's own block, ``q_blk - local_blocks < b <= q_blk`` (the extent of infllmv2_cuda_impl's
   ``max_pooling_1d`` local mask; ``window_size = 2048`` -> 32 blocks of 64). Excluded (-inf): blocks after the
   query's block, i.e. blocks starting at or past seq_len.
6. ``lax.top_k`` with a static k, then sorted ascending; slots beyond the selectable blocks are -1 (at the end).

``top_k >= init_blocks + local_blocks`` is required, so the forced blocks are always all selected (the
query's own block in particular).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _common


def _check_kernel_geometry(kernel_size, kernel_stride, block_size=None):
    kernel_size = _common.check_static_int("kernel_size", kernel_size, minimum=1)
    kernel_stride = _common.check_static_int("kernel_stride", kernel_stride, minimum=1)
    if kernel_size % kernel_stride:
        raise ValueError(f"kernel_stride ({kernel_stride}) must divide kernel_size ({kernel_size})")
    if block_size is not None:
        block_size = _common.check_static_int("block_size", block_size, minimum=1)
        if block_size % kernel_stride:
            raise ValueError(f"kernel_stride ({kernel_stride}) must divide block_size ({block_size})")
    return kernel_size, kernel_stride, block_size


def num_full_kernels(lengths, kernel_size: int = 32, kernel_stride: int = 16):
    """Number of complete compression kernels in ``lengths`` tokens (int or int array): floor((n-ks)/stride)+1."""
    if isinstance(lengths, int):
        return max(0, (lengths - kernel_size) // kernel_stride + 1)
    lengths = jnp.asarray(lengths).astype(jnp.int32)
    return jnp.where(lengths >= kernel_size, (lengths - kernel_size) // kernel_stride + 1, 0).astype(jnp.int32)


def init_compressed_keys(batch: int, cache_len: int, num_kv_heads: int, head_dim: int, dtype=jnp.bfloat16, *,
                         kernel_size: int = 32, kernel_stride: int = 16):
    """An empty compressed-key cache for a K cache of ``cache_len`` positions.

    Returns:
      (compressed_k [B, Nc, Hkv, D] zeros, num_compressed [B] int32 zeros) with
      Nc = num_full_kernels(cache_len). Both are plain arrays, to be kept in a cache pytree.
    """
    kernel_size, kernel_stride, _ = _check_kernel_geometry(kernel_size, kernel_stride)
    capacity = num_full_kernels(int(cache_len), kernel_size, kernel_stride)
    return (jnp.zeros((batch, capacity, num_kv_heads, head_dim), dtype), jnp.zeros((batch,), jnp.int32))


def _chunk_sums(x, kernel_stride: int):
    """[B, n*stride, Hkv, D] -> [B, n, Hkv, D] float32 sums of consecutive ``kernel_stride`` positions."""
    b, length, h, d = x.shape
    return x.astype(jnp.float32).reshape(b, length // kernel_stride, kernel_stride, h, d).sum(axis=2)


def _kernel_means(chunk_sums, kernels_per_window: int, kernel_size: int, count: int, dtype):
    """Window means from chunk sums: out[:, j] = sum(chunk_sums[:, j : j + r]) / kernel_size, j < count."""
    total = chunk_sums[:, 0:count]
    for i in range(1, kernels_per_window):
        total = total + chunk_sums[:, i:i + count]
    return (total / kernel_size).astype(dtype)


@functools.partial(jax.jit, static_argnames=("kernel_size", "kernel_stride"))
def _compress_keys_jit(k, seq_lens, *, kernel_size, kernel_stride):
    batch, cache_len, _, _ = k.shape
    capacity = num_full_kernels(cache_len, kernel_size, kernel_stride)
    counts = num_full_kernels(seq_lens, kernel_size, kernel_stride)
    if capacity == 0:
        return jnp.zeros((batch, 0) + k.shape[2:], k.dtype), counts
    num_chunks = cache_len // kernel_stride
    sums = _chunk_sums(k[:, :num_chunks * kernel_stride], kernel_stride)
    means = _kernel_means(sums, kernel_size // kernel_stride, kernel_size, capacity, k.dtype)
    valid = jnp.arange(capacity)[None, :] < counts[:, None]
    return jnp.where(valid[:, :, None, None], means, jnp.zeros((), k.dtype)), counts


def compress_keys(k, seq_lens, kernel_size: int = 32, kernel_stride: int = 16):
    """Mean-pooled keys over sliding kernels (InfLLM v2's compressed keys), computed from scratch.

    Args:
      k: [B, S, Hkv, D] key cache.
      seq_lens: [B] int, valid positions per row.
      kernel_size, kernel_stride: static; kernel_stride must divide kernel_size.

    Returns:
      (compressed_k [B, Nc, Hkv, D] in k.dtype, num_compressed [B] int32) with Nc = num_full_kernels(S).
      Guarantee: compressed_k[b, j] = mean(k[b, j*stride : j*stride + kernel_size]) (float32 sum, rounded to
      k.dtype) for j < num_compressed[b] = num_full_kernels(seq_lens[b]); later entries are 0. Only full
      kernels are valid: a kernel is complete once all its kernel_size tokens are in the cache.
    """
    kernel_size, kernel_stride, _ = _check_kernel_geometry(kernel_size, kernel_stride)
    if k.ndim != 4:
        raise ValueError(f"k must have shape [B, S, Hkv, D]; got {k.shape}")
    if seq_lens.shape != (k.shape[0],):
        raise ValueError(f"seq_lens must have shape [B] = ({k.shape[0]},); got {seq_lens.shape}")
    _common.check_int_dtype("seq_lens", seq_lens)
    return _compress_keys_jit(k, seq_lens, kernel_size=kernel_size, kernel_stride=kernel_stride)


@functools.partial(jax.jit, static_argnames=("kernel_size", "kernel_stride", "max_new_kernels"))
def _update_compressed_keys_jit(compressed_k, num_compressed, k, seq_lens, *, kernel_size, kernel_stride,
                                max_new_kernels):
    batch, capacity = compressed_k.shape[:2]
    full = num_full_kernels(seq_lens, kernel_size, kernel_stride)
    kept = jnp.minimum(num_compressed.astype(jnp.int32), full)      # rollback drops kernels past seq_len
    if capacity == 0:
        return compressed_k, kept
    last_start = k.shape[1] - kernel_size

    def one_row(ck, k_row, first, stop):
        # ck [Nc, Hkv, D], k_row [S, Hkv, D], first/stop int32: kernels [first, stop) are due.
        for i in range(max_new_kernels):
            j = first + i
            start = jnp.clip(j * kernel_stride, 0, last_start)
            window = lax.dynamic_slice_in_dim(k_row, start, kernel_size, axis=0)[None]  # [1, ks, Hkv, D]
            mean = _kernel_means(_chunk_sums(window, kernel_stride), kernel_size // kernel_stride, kernel_size,
                                 1, ck.dtype)[0]                                           # [1, Hkv, D]
            slot = jnp.clip(j, 0, capacity - 1)
            old = lax.dynamic_slice_in_dim(ck, slot, 1, axis=0)
            ck = lax.dynamic_update_slice_in_dim(ck, jnp.where(j < stop, mean, old), slot, axis=0)
        return ck

    compressed_k = jax.vmap(one_row)(compressed_k, k, kept, full)
    return compressed_k, kept + jnp.clip(full - kept, 0, max_new_kernels)


def update_compressed_keys(compressed_k, num_compressed, k, seq_lens, *, kernel_size: int = 32,
                           kernel_stride: int = 16, max_new_kernels: int = 1):
    """Brings a compressed-key cache up to date after tokens were appended to (or rolled back from) ``k``.

    Only kernels completed since the last update are computed (at most ``max_new_kernels`` per row per call,
    a static bound: appending T tokens completes at most ceil(T / kernel_stride) kernels, so 1 suffices for
    one decoded token per step). Cost O(max_new_kernels * kernel_size) per row, independent of S.

    Rollback: a call with smaller seq_lens drops the kernels that are no longer complete. The caller must make
    such a call before overwriting cache positions below the old length (e.g. after rejected draft tokens),
    since only the lengths, not the contents, tell this function what changed.

    Args:
      compressed_k: [B, Nc, Hkv, D], Nc = num_full_kernels(S) (see ``init_compressed_keys``).
      num_compressed: [B] int32, kernels of compressed_k that are valid.
      k: [B, S, Hkv, D] key cache with the new tokens already written.
      seq_lens: [B] int32, the new lengths (may be smaller than before: a rollback).

    Returns:
      (compressed_k, num_compressed). Guarantee: with full = num_full_kernels(seq_lens), the new count is
      min(old, full) + min(max(full - min(old, full), 0), max_new_kernels), and entries [0, count) equal
      ``compress_keys(k, seq_lens)`` (to float32 summation order) provided the old entries [0, old) matched the
      current cache contents. Entries at or past the count are unspecified. When more than max_new_kernels kernels
      were due, the rest are computed by later calls (the count says how far it got).
    """
    kernel_size, kernel_stride, _ = _check_kernel_geometry(kernel_size, kernel_stride)
    max_new_kernels = _common.check_static_int("max_new_kernels", max_new_kernels, minimum=1)
    if k.ndim != 4:
        raise ValueError(f"k must have shape [B, S, Hkv, D]; got {k.shape}")
    batch, cache_len, hkv, d = k.shape
    capacity = num_full_kernels(cache_len, kernel_size, kernel_stride)
    if compressed_k.shape != (batch, capacity, hkv, d):
        raise ValueError(
            f"compressed_k must have shape [B, Nc, Hkv, D] = ({batch}, {capacity}, {hkv}, {d}) for a cache of "
            f"{cache_len} positions; got {compressed_k.shape}")
    for name, x in (("num_compressed", num_compressed), ("seq_lens", seq_lens)):
        if x.shape != (batch,):
            raise ValueError(f"{name} must have shape [B] = ({batch},); got {x.shape}")
        _common.check_int_dtype(name, x)
    return _update_compressed_keys_jit(compressed_k, num_compressed, k, seq_lens, kernel_size=kernel_size,
                                       kernel_stride=kernel_stride, max_new_kernels=max_new_kernels)


@functools.partial(jax.jit, static_argnames=(
    "kernel_size", "kernel_stride", "block_size", "init_blocks", "local_blocks", "top_k", "num_blocks",
    "sm_scale"))
def _select_blocks_jit(q, compressed_k, seq_lens, extra_block_scores, num_compressed, *, kernel_size,
                       kernel_stride, block_size, init_blocks, local_blocks, top_k, num_blocks, sm_scale):
    capacity = compressed_k.shape[1]
    seq_lens = seq_lens.astype(jnp.int32)
    if num_compressed is None:
        num_compressed = num_full_kernels(seq_lens, kernel_size, kernel_stride)
    valid_kernel = jnp.arange(capacity)[None, :] < num_compressed[:, None]               # [B, Nc]

    # 2. Per-head softmax over the row's valid compressed keys, summed over the group.
    logits = jnp.einsum("bhgd,bjhd->bhgj", q.astype(jnp.float32), compressed_k.astype(jnp.float32),
                        precision=lax.Precision.HIGHEST) * sm_scale                      # [B, Hkv, G, Nc]
    logits = jnp.where(valid_kernel[:, None, None, :], logits, -jnp.inf)
    row_max = logits.max(axis=-1, keepdims=True, initial=-jnp.inf)
    probs = jnp.exp(logits - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    denom = probs.sum(axis=-1, keepdims=True)
    probs = probs / jnp.where(denom > 0, denom, 1.0)
    kernel_scores = jnp.where(valid_kernel[:, None, :], probs.sum(axis=2), -jnp.inf)      # [B, Hkv, Nc]

    # 3. Max-pool over the kernels overlapping each block.
    ratio = block_size // kernel_stride
    pad = kernel_size // kernel_stride - 1
    length = ratio * num_blocks
    if capacity >= length:
        kernel_scores = kernel_scores[..., :length]
    else:
        kernel_scores = jnp.pad(kernel_scores, ((0, 0), (0, 0), (0, length - capacity)),
                                constant_values=-jnp.inf)
    kernel_scores = jnp.pad(kernel_scores, ((0, 0), (0, 0), (pad, 0)), constant_values=-jnp.inf)
    block_scores = lax.reduce_window(kernel_scores, -jnp.inf, lax.max, (1, 1, ratio + pad), (1, 1, ratio),
                                     "VALID")                                             # [B, Hkv, NB]
    # 4. NOSA query-agnostic scores.
    if extra_block_scores is not None:
        block_scores = block_scores + extra_block_scores.astype(jnp.float32)

    # 5. Forced and excluded blocks.
    blocks = jnp.arange(num_blocks, dtype=jnp.int32)[None, :]                             # [1, NB]
    q_block = ((seq_lens - 1) // block_size)[:, None]                                     # [B, 1]; -1 if empty
    exists = blocks <= q_block
    forced = (blocks < init_blocks) | ((blocks > q_block - local_blocks) & (blocks <= q_block))
    block_scores = jnp.where(forced[:, None, :], jnp.inf, block_scores)
    block_scores = jnp.where(exists[:, None, :], block_scores, -jnp.inf)

    # 6. Static top-k, ascending, -1 padded.
    if top_k > num_blocks:
        block_scores = jnp.pad(block_scores, ((0, 0), (0, 0), (0, top_k - num_blocks)),
                               constant_values=-jnp.inf)
    values, indices = lax.top_k(block_scores, top_k)
    selectable = values > -jnp.inf
    indices = jnp.sort(jnp.where(selectable, indices, jnp.iinfo(jnp.int32).max), axis=-1)
    return jnp.where(indices == jnp.iinfo(jnp.int32).max, -1, indices).astype(jnp.int32)


def select_blocks(q, compressed_k, seq_lens, *, kernel_size: int = 32, kernel_stride: int = 16,
                  block_size: int = 64, init_blocks: int = 1, local_blocks: int = 32, top_k: int = 64,
                  extra_block_scores=None, num_compressed=None, num_blocks: int | None = None, sm_scale=None):
    """InfLLM v2 block selection for one decode token (see the module docstring for the exact rule).

    Args:
      q: [B, Hkv, G, D] the query token (G query heads per KV head share one selection).
      compressed_k: [B, Nc, Hkv, D] compressed keys (``compress_keys`` / ``update_compressed_keys``).
      seq_lens: [B] int32 cache lengths including the query token (the query is at position seq_len - 1).
      kernel_size, kernel_stride, block_size: static; kernel_stride divides kernel_size and block_size.
      init_blocks, local_blocks: static; the forced sink blocks and recent-window blocks (local_blocks >= 1:
        the query's own block is always selected).
      top_k: static number of slots K, >= init_blocks + local_blocks. May exceed the number of blocks.
      extra_block_scores: optional [B, Hkv, NB] float, added to the pooled scores before forcing (NOSA's
        query-agnostic eviction score pooled per block). Must be finite or -inf (-inf excludes a block unless
        it is forced).
      num_compressed: optional [B] int32, valid compressed keys per row (default num_full_kernels(seq_lens);
        pass the count of an ``update_compressed_keys`` cache).
      num_blocks: static NB, blocks in the cache. Default: extra_block_scores.shape[-1] if given, else the
        block count of the cache that compressed_k was built for, ((Nc - 1) * stride + kernel_size) // block_size
        (exact when S is a multiple of block_size).
      sm_scale: static float, default 1 / sqrt(D).

    Returns:
      block_indices [B, Hkv, top_k] int32: distinct blocks in ascending order, then -1 padding. Guarantees: all
      forced blocks that exist are included; no block at or past seq_len and no block scoring -inf is included;
      the rest are the highest-scoring blocks (ties to the lower index). Exactly the input
      ``sparse_decode_attention`` expects.
    """
    kernel_size, kernel_stride, block_size = _check_kernel_geometry(kernel_size, kernel_stride, block_size)
    init_blocks = _common.check_static_int("init_blocks", init_blocks, minimum=0)
    local_blocks = _common.check_static_int("local_blocks", local_blocks, minimum=1)
    top_k = _common.check_static_int("top_k", top_k, minimum=1)
    if top_k < init_blocks + local_blocks:
        raise ValueError(
            f"top_k ({top_k}) must be >= init_blocks + local_blocks ({init_blocks} + {local_blocks}) so that every "
            "forced block is selected")
    if q.ndim != 4:
        raise ValueError(f"q must have shape [B, Hkv, G, D]; got {q.shape}")
    if compressed_k.ndim != 4:
        raise ValueError(f"compressed_k must have shape [B, Nc, Hkv, D]; got {compressed_k.shape}")
    batch, hkv, _, d = q.shape
    if (compressed_k.shape[0], compressed_k.shape[2], compressed_k.shape[3]) != (batch, hkv, d):
        raise ValueError(
            f"compressed_k must have shape [B, Nc, Hkv, D] with B={batch}, Hkv={hkv}, D={d} from q; got "
            f"{compressed_k.shape}")
    _common.check_float_dtype("q", q)
    _common.check_float_dtype("compressed_k", compressed_k)
    if seq_lens.shape != (batch,):
        raise ValueError(f"seq_lens must have shape [B] = ({batch},); got {seq_lens.shape}")
    _common.check_int_dtype("seq_lens", seq_lens)
    if num_compressed is not None:
        if num_compressed.shape != (batch,):
            raise ValueError(f"num_compressed must have shape [B] = ({batch},); got {num_compressed.shape}")
        _common.check_int_dtype("num_compressed", num_compressed)
    if extra_block_scores is not None:
        if extra_block_scores.ndim != 3 or extra_block_scores.shape[:2] != (batch, hkv):
            raise ValueError(
                f"extra_block_scores must have shape [B, Hkv, NB] = ({batch}, {hkv}, NB); got "
                f"{extra_block_scores.shape}")
        _common.check_float_dtype("extra_block_scores", extra_block_scores)
        if num_blocks is None:
            num_blocks = extra_block_scores.shape[-1]
        elif extra_block_scores.shape[-1] != num_blocks:
            raise ValueError(
                f"extra_block_scores must have NB = num_blocks = {num_blocks} blocks; got {extra_block_scores.shape}")
    if num_blocks is None:
        capacity = compressed_k.shape[1]
        if capacity == 0:
            raise ValueError("num_blocks must be given when compressed_k holds no kernels (Nc = 0)")
        num_blocks = ((capacity - 1) * kernel_stride + kernel_size) // block_size
    num_blocks = _common.check_static_int("num_blocks", num_blocks, minimum=1)
    sm_scale = _common.resolve_sm_scale(sm_scale, d)
    return _select_blocks_jit(q, compressed_k, seq_lens, extra_block_scores, num_compressed,
                              kernel_size=kernel_size, kernel_stride=kernel_stride, block_size=block_size,
                              init_blocks=init_blocks, local_blocks=local_blocks, top_k=top_k,
                              num_blocks=num_blocks, sm_scale=sm_scale)
