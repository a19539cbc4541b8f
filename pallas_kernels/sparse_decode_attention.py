"""Block-sparse decode attention (InfLLM v2 / NOSA style) as a Pallas kernel, with a jnp reference.

The kernel here is also the dense flash-decoding kernel (`decode_attention.py`): both are "attention over a
list of K/V blocks", the dense one with the list 0, 1, ..., cdiv(seq_len, block_size) - 1 and the sparse one with
the list from ``block_indices``. One kernel body, one online-softmax block update (`_online_softmax_update`),
two drivers:

* ``backend="tpu"`` (Mosaic TPU): ``pltpu.PrefetchScalarGridSpec`` with grid (B, Hkv, splits, entries); the
  block table, per-(row, head) entry counts and ``seq_lens`` are scalar-prefetched into SMEM and the K/V
  ``BlockSpec`` index maps read the table, so only selected blocks are DMA'd. Grid steps past a row's last
  entry map to the block already resident (no new DMA) and skip the compute. The online-softmax state lives in
  VMEM scratch across the sequential last grid axis.
* ``backend="triton"`` (GPU): grid (B, Hkv, splits), one program per (row, KV head, split) that loops over its
  entries with ``lax.fori_loop`` and loads each block by a dynamic slice of the (row, head) K/V view (Triton
  has neither scalar prefetch nor scratch). Padding and blocks past ``seq_len`` are not iterated at all.

Both forms read each selected K/V block once per (row, KV head) and use it for all G query heads of the group
(and all T query tokens). With ``num_splits > 1`` each program handles a contiguous share of the entry list and
writes a partial (out, lse); the partials are merged by `merge_attention_partials` (flash-decoding). This is
what fills a GPU when B * Hkv is small. An optional static ``sliding_window`` adds a lower key bound per query
(blocks wholly before every query's window are not read).

Verified here (CPU only): both forms in Pallas interpret mode, the TPU form also in TPU interpret mode, and
both lower to Triton IR / Mosaic MLIR. Not verified: the Triton and Mosaic compilers (they run only on a GPU /
TPU), and speed. Known cost of the TPU form: one grid step per (row, head, block), ~0.35 us each on TPU, so use
large dense block sizes there; a TPU-tuned version would fetch several blocks per step with manual DMAs (as
ragged paged attention does). The GPU form uses the Triton backend (``pltriton.CompilerParams``), which JAX
0.11 deprecates in favour of Mosaic GPU; it still lowers, but a Mosaic GPU (``plgpu.kernel``) port is the
long-term path.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _common

# A block dimension squeezed out of the kernel's ref (``pl.squeezed``; ``None`` on jax versions without it).
_SQUEEZED = getattr(pl, "squeezed", None)
# Programs the automatic ``num_splits`` aims for on GPU (about one wave on an H100's 132 SMs).
_TARGET_GPU_PROGRAMS = 128


# ----------------------------------------------------------------------------------------------------------
# Flash-decoding merge
# ----------------------------------------------------------------------------------------------------------
def merge_attention_partials(outs, lses, *, axis: int = 0):
    """Merges attention results computed over disjoint key sets (flash-decoding's final reduction).

    Args:
      outs: [..., P, ..., D] (P partials along ``axis``): each partial's softmax-normalized output.
      lses: outs.shape without D, float: each partial's log-sum-exp of scaled scores; -inf for a partial
        that saw no key (its out is ignored).
      axis: the partial axis (of ``lses``; the same axis of ``outs``). Negative values count from the end
        of ``lses``.

    Returns:
      (out, lse): out has outs.shape without the partial axis, dtype outs.dtype; lse float32. Guarantee: equal
      (to float32 rounding) to softmax attention over the union of the partials' keys; rows where every
      partial has lse = -inf give out = 0 and lse = -inf.
    """
    if outs.shape[:-1] != lses.shape:
        raise ValueError(
            f"lses must have the shape of outs without its last (head) dim: outs {outs.shape}, lses {lses.shape}")
    axis = axis % lses.ndim
    lses = lses.astype(jnp.float32)
    lse_max = lses.max(axis=axis, keepdims=True)
    lse_max = jnp.where(jnp.isfinite(lse_max), lse_max, 0.0)
    weights = jnp.exp(lses - lse_max)  # -inf -> 0
    total = weights.sum(axis=axis, keepdims=True)
    safe_total = jnp.where(total > 0, total, 1.0)
    out = (outs.astype(jnp.float32) * (weights / safe_total)[..., None]).sum(axis=axis)
    lse = jnp.where(total > 0, lse_max + jnp.log(safe_total), -jnp.inf)
    return out.astype(outs.dtype), jnp.squeeze(lse, axis)


# ----------------------------------------------------------------------------------------------------------
# Shared kernel pieces (used by both the TPU and the Triton driver)
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Static description of one kernel launch."""
    sparse: bool            # entries come from a block table (else entry e is block e)
    block_size: int
    num_kv_heads: int
    head_dim: int
    num_tokens: int         # T query tokens per KV head
    group: int              # G query heads per KV head
    rows: int               # query tile rows: kernel_rows(T * G)
    max_entries: int        # K (sparse) or S // block_size (dense)
    num_splits: int
    sm_scale: float
    sliding_window: int | None   # a query at position p sees keys p - window < key <= p
    num_blocks: int              # S // block_size

    @property
    def entries_per_split(self) -> int:  # static bound used by the TPU grid
        return pl.cdiv(self.max_entries, self.num_splits)


def _entry_span(num_entries, split, num_splits: int):
    """Entries [start, stop) of the row's entry list handled by ``split`` (contiguous, balanced)."""
    chunk = (num_entries + (num_splits - 1)) // num_splits
    start = jnp.minimum(split * chunk, num_entries)
    stop = jnp.minimum(start + chunk, num_entries)
    return start, stop


def _first_window_block(seq_len, geom: _Geometry):
    """Dense form: the first block any query row can see (0 without a sliding window). Scalar or [B] array."""
    if geom.sliding_window is None:
        return 0
    first_visible = seq_len - (geom.num_tokens - 1) - geom.sliding_window   # token 0's first visible key
    return jnp.clip(first_visible // geom.block_size, 0, geom.num_blocks - 1)


def _row_limits(seq_len, geom: _Geometry):
    """[rows, 1] int32: exclusive key-position limit per query-tile row (row r = t * G + g).

    Token t of T sees keys < seq_len - (T - 1 - t); padding rows (r >= T * G) get seq_len. Written with
    comparisons against an iota (no vector integer division, which Mosaic lacks).
    """
    r = lax.broadcasted_iota(jnp.int32, (geom.rows, 1), 0)
    back = jnp.zeros((geom.rows, 1), jnp.int32)
    for t in range(1, geom.num_tokens):  # back = T - 1 - t(r): the number of tokens after row r's token
        back = back + (r < t * geom.group).astype(jnp.int32)
    return seq_len - back


def _init_state(geom: _Geometry):
    """Online-softmax state: running max m [rows, 1], denominator l [rows, 1], numerator acc [rows, D]."""
    return (jnp.full((geom.rows, 1), -jnp.inf, jnp.float32),
            jnp.zeros((geom.rows, 1), jnp.float32),
            jnp.zeros((geom.rows, geom.head_dim), jnp.float32))


def _online_softmax_update(q, k, v, block, row_limit, state, geom: _Geometry):
    """Folds one K/V block into the online-softmax state. The one block-attention implementation.

    Args:
      q: [rows, D] query tile (input dtype).
      k, v: [block_size, D] the K/V block (input dtype).
      block: int32 scalar, the block's index in the cache (its keys are at block * block_size + i).
      row_limit: [rows, 1] int32, exclusive key-position limit per row.
      state: (m [rows, 1], l [rows, 1], acc [rows, D]) float32.
    Returns:
      The updated state. Keys at positions >= row_limit (or < row_limit - sliding_window) get probability
      exactly 0; a row that has seen no visible key keeps m = -inf, l = 0, acc = 0.
    """
    m_prev, l_prev, acc_prev = state
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else lax.Precision.DEFAULT
    scores = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32) * geom.sm_scale      # [rows, block_size]
    key_pos = block * geom.block_size + lax.broadcasted_iota(jnp.int32, (1, geom.block_size), 1)
    visible = key_pos < row_limit
    if geom.sliding_window is not None:
        visible = visible & (key_pos >= row_limit - geom.sliding_window)
    scores = jnp.where(visible, scores, -jnp.inf)
    m_next = jnp.maximum(m_prev, scores.max(axis=-1, keepdims=True))                  # [rows, 1]
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    alpha = jnp.exp(m_prev - m_safe)                                                    # 0 when m_prev = -inf
    probs = jnp.exp(scores - m_safe)                                                    # [rows, block_size]
    l_next = alpha * l_prev + probs.sum(axis=-1, keepdims=True)
    pv = lax.dot_general(probs.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)                            # [rows, D]
    return m_next, l_next, alpha * acc_prev + pv


def _finalize(state):
    """(out [rows, D] f32, lse [rows, 1] f32); out = 0 and lse = -inf for rows with no visible key."""
    m, l, acc = state
    seen = l > 0.0
    safe_l = jnp.where(seen, l, 1.0)
    out = acc / safe_l
    lse = jnp.where(seen, m + jnp.log(safe_l), -jnp.inf)
    return out, lse


# ----------------------------------------------------------------------------------------------------------
# TPU form: scalar-prefetch grid
# ----------------------------------------------------------------------------------------------------------
def _tpu_entry_block(b, h, s, j, seq_len, num_entries_ref, table_ref, geom: _Geometry):
    """(block to read at grid step (b, h, s, j), whether the step holds an entry). Scalar code (SMEM)."""
    n = num_entries_ref[b * geom.num_kv_heads + h]
    start, stop = _entry_span(n, s, geom.num_splits)
    entry = start + j
    valid = entry < stop
    # Past the end: re-read the split's last entry (already resident: the pipeline skips the copy).
    entry = jnp.maximum(jnp.minimum(entry, stop - 1), 0)
    if geom.sparse:
        block = table_ref[(b * geom.num_kv_heads + h) * geom.max_entries + entry]
    else:
        block = jnp.minimum(_first_window_block(seq_len, geom) + entry, geom.num_blocks - 1)
    return block, valid


def _tpu_kernel(seq_lens_ref,     # [B] int32 (SMEM)
                num_entries_ref,  # [B * Hkv] int32 (SMEM): entries per (row, KV head)
                *refs, geom: _Geometry):
    if geom.sparse:
        table_ref, *refs = refs   # [B * Hkv * K] int32 (SMEM): compacted block table
    else:
        table_ref = None
    (q_ref,       # [rows, D]
     k_ref,       # [block_size, D]
     v_ref,       # [block_size, D]
     o_ref,       # [rows, D]  (partial out of this split)
     lse_ref,     # [rows, 1]
     m_scratch,   # [rows, 1] f32
     l_scratch,   # [rows, 1] f32
     acc_scratch, # [rows, D] f32
     ) = refs
    b, h, s, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m0, l0, acc0 = _init_state(geom)
        m_scratch[...] = m0
        l_scratch[...] = l0
        acc_scratch[...] = acc0

    block, valid = _tpu_entry_block(b, h, s, j, seq_lens_ref[b], num_entries_ref, table_ref, geom)

    @pl.when(valid)
    def _update():
        row_limit = _row_limits(seq_lens_ref[b], geom)
        state = (m_scratch[...], l_scratch[...], acc_scratch[...])
        m, l, acc = _online_softmax_update(q_ref[...], k_ref[...], v_ref[...], block, row_limit, state, geom)
        m_scratch[...] = m
        l_scratch[...] = l
        acc_scratch[...] = acc

    @pl.when(j == pl.num_programs(3) - 1)
    def _write():
        out, lse = _finalize((m_scratch[...], l_scratch[...], acc_scratch[...]))
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


def _tpu_call(seq_lens, num_entries, table, q_tiles, k_flat, v_flat, geom: _Geometry, out_dtype, interpret):
    batch = q_tiles.shape[0]
    hkv, rows, d, bs = geom.num_kv_heads, geom.rows, geom.head_dim, geom.block_size
    sq = _SQUEEZED
    num_prefetch = 3 if geom.sparse else 2

    def q_map(b, h, s, j, *prefetch):
        return (b, h, 0, 0)

    def kv_map(b, h, s, j, seq_lens_ref, num_entries_ref, *table_ref):
        block, _ = _tpu_entry_block(b, h, s, j, seq_lens_ref[b], num_entries_ref,
                                    table_ref[0] if table_ref else None, geom)
        return (b, block, h)

    def out_map(b, h, s, j, *prefetch):
        return (b, h, s, 0, 0)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=num_prefetch,
        grid=(batch, hkv, geom.num_splits, geom.entries_per_split),
        in_specs=[
            pl.BlockSpec((sq, sq, rows, d), q_map),   # q_tiles [B, Hkv, rows, D]
            pl.BlockSpec((sq, bs, d), kv_map),        # k_flat [B, S, Hkv * D]
            pl.BlockSpec((sq, bs, d), kv_map),        # v_flat [B, S, Hkv * D]
        ],
        out_specs=[
            pl.BlockSpec((sq, sq, sq, rows, d), out_map),  # out [B, Hkv, splits, rows, D]
            pl.BlockSpec((sq, sq, sq, rows, 1), out_map),  # lse [B, Hkv, splits, rows, 1]
        ],
        scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32),
                        pltpu.VMEM((rows, 1), jnp.float32),
                        pltpu.VMEM((rows, d), jnp.float32)],
    )
    prefetch = (seq_lens, num_entries, table) if geom.sparse else (seq_lens, num_entries)
    return pl.pallas_call(
        functools.partial(_tpu_kernel, geom=geom),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((batch, hkv, geom.num_splits, rows, d), out_dtype),
                   jax.ShapeDtypeStruct((batch, hkv, geom.num_splits, rows, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="sparse_decode_attention" if geom.sparse else "decode_attention",
    )(*prefetch, q_tiles, k_flat, v_flat)


# ----------------------------------------------------------------------------------------------------------
# Triton (GPU) form: one program per (row, KV head, split), looping over its entries
# ----------------------------------------------------------------------------------------------------------
def _triton_kernel(seq_len_ref,      # [] int32
                   num_entries_ref,  # [] int32: entries of this (row, KV head)
                   *refs, geom: _Geometry):
    if geom.sparse:
        table_ref, *refs = refs      # [K] int32: compacted block table of this (row, KV head)
    (q_ref,   # [rows, D]
     k_ref,   # [S, D]: this (row, KV head)'s keys (a strided view; only selected blocks are loaded)
     v_ref,   # [S, D]
     o_ref,   # [rows, D]
     lse_ref, # [rows, 1]
     ) = refs
    s = pl.program_id(2)
    seq_len = seq_len_ref[...]
    start, stop = _entry_span(num_entries_ref[...], s, geom.num_splits)
    q = q_ref[...]
    row_limit = _row_limits(seq_len, geom)
    bs = geom.block_size
    first_block = None if geom.sparse else _first_window_block(seq_len, geom)

    def body(entry, state):
        block = table_ref[entry] if geom.sparse else first_block + entry
        window = pl.ds(pl.multiple_of(block * bs, bs), bs)
        return _online_softmax_update(q, k_ref[window, :], v_ref[window, :], block, row_limit, state, geom)

    out, lse = _finalize(lax.fori_loop(start, stop, body, _init_state(geom)))
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _triton_call(seq_lens, num_entries, table, q_tiles, k_flat, v_flat, geom: _Geometry, out_dtype, interpret,
                 num_warps: int | None, num_stages: int | None):
    batch, cache_len = k_flat.shape[:2]
    hkv, rows, d = geom.num_kv_heads, geom.rows, geom.head_dim
    sq = _SQUEEZED
    in_specs = [
        pl.BlockSpec((sq,), lambda b, h, s: (b,)),                  # seq_lens [B]
        pl.BlockSpec((sq, sq), lambda b, h, s: (b, h)),             # num_entries [B, Hkv]
    ]
    args = [seq_lens, num_entries.reshape(batch, hkv)]
    if geom.sparse:
        in_specs.append(pl.BlockSpec((sq, sq, geom.max_entries), lambda b, h, s: (b, h, 0)))  # table [B, Hkv, K]
        args.append(table.reshape(batch, hkv, geom.max_entries))
    in_specs += [
        pl.BlockSpec((sq, sq, rows, d), lambda b, h, s: (b, h, 0, 0)),  # q_tiles [B, Hkv, rows, D]
        pl.BlockSpec((sq, cache_len, d), lambda b, h, s: (b, 0, h)),     # k_flat [B, S, Hkv * D]
        pl.BlockSpec((sq, cache_len, d), lambda b, h, s: (b, 0, h)),     # v_flat [B, S, Hkv * D]
    ]
    args += [q_tiles, k_flat, v_flat]
    compiler_params = None
    if not interpret:
        compiler_params = pltriton.CompilerParams(
            num_warps=4 if num_warps is None else num_warps,
            num_stages=2 if num_stages is None else num_stages)
    return pl.pallas_call(
        functools.partial(_triton_kernel, geom=geom),
        grid=(batch, hkv, geom.num_splits),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((sq, sq, sq, rows, d), lambda b, h, s: (b, h, s, 0, 0)),  # [B, Hkv, splits, rows, D]
            pl.BlockSpec((sq, sq, sq, rows, 1), lambda b, h, s: (b, h, s, 0, 0)),  # [B, Hkv, splits, rows, 1]
        ],
        out_shape=[jax.ShapeDtypeStruct((batch, hkv, geom.num_splits, rows, d), out_dtype),
                   jax.ShapeDtypeStruct((batch, hkv, geom.num_splits, rows, 1), jnp.float32)],
        compiler_params=compiler_params,
        interpret=interpret,
        name="sparse_decode_attention" if geom.sparse else "decode_attention",
    )(*args)


# ----------------------------------------------------------------------------------------------------------
# Driver shared by decode_attention and sparse_decode_attention
# ----------------------------------------------------------------------------------------------------------
def default_num_splits(backend: str, interpret, batch: int, num_kv_heads: int, max_entries: int) -> int:
    """Splits of each (row, KV head)'s entry list: enough programs to fill a GPU; 1 on TPU and in interpret."""
    if backend != "triton" or interpret:
        return 1
    programs = batch * num_kv_heads
    return max(1, min(max_entries, -(-_TARGET_GPU_PROGRAMS // programs)))


def compact_block_table(block_indices, seq_lens, block_size: int, num_blocks: int, window_start=None):
    """Moves the entries the kernel will read to the front of each row's list.

    Args:
      block_indices: [B, Hkv, K] int.
      seq_lens: [B] int.
      window_start: optional [B] int, the first key position any query row can see (sliding window).
    Returns:
      (table [B, Hkv, K] int32, num_valid [B, Hkv] int32): table[..., :num_valid] are the readable entries
      (0 <= idx < num_blocks, idx * block_size < seq_len and (idx + 1) * block_size > window_start) in their
      given order; the rest are 0.
    """
    idx = block_indices.astype(jnp.int32)
    lens = seq_lens.astype(jnp.int32)[:, None, None]
    valid = (idx >= 0) & (idx < num_blocks) & (idx * block_size < lens)
    if window_start is not None:
        valid = valid & ((idx + 1) * block_size > window_start.astype(jnp.int32)[:, None, None])
    order = jnp.argsort(jnp.logical_not(valid), axis=-1, stable=True)
    table = jnp.take_along_axis(jnp.where(valid, idx, 0), order, axis=-1)
    return table, valid.sum(axis=-1, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames=(
    "block_size", "sm_scale", "interpret", "backend", "num_splits", "num_warps", "num_stages", "sliding_window"))
def block_list_attention(q, k, v, seq_lens, block_indices, *, block_size: int, sm_scale: float, interpret,
                         backend: str, num_splits: int, num_warps=None, num_stages=None, sliding_window=None):
    """Attention of q over the K/V blocks listed by ``block_indices`` (all blocks if None). Arguments validated.

    Args:
      q: [B, Hkv, T, G, D].
      k, v: [B, S, Hkv, D].
      seq_lens: [B] int.
      block_indices: [B, Hkv, K] int or None (dense).
    Returns:
      out [B, Hkv, T, G, D] (q.dtype), lse [B, Hkv, T, G] float32.
    """
    batch, hkv, num_tokens, group, d = q.shape
    cache_len = k.shape[1]
    num_blocks = cache_len // block_size
    sparse = block_indices is not None
    seq_lens = seq_lens.astype(jnp.int32)
    geom = _Geometry(sparse=sparse, block_size=block_size, num_kv_heads=hkv, head_dim=d,
                     num_tokens=num_tokens, group=group, rows=_common.kernel_rows(num_tokens * group),
                     max_entries=block_indices.shape[-1] if sparse else num_blocks, num_splits=num_splits,
                     sm_scale=sm_scale, sliding_window=sliding_window, num_blocks=num_blocks)
    if sparse:
        window_start = None
        if sliding_window is not None:
            window_start = seq_lens - (num_tokens - 1) - sliding_window   # token 0's first visible key
        table, num_entries = compact_block_table(block_indices, seq_lens, block_size, num_blocks, window_start)
        table = table.reshape(-1)
    else:
        table = None
        blocks_in_use = jnp.clip((seq_lens + block_size - 1) // block_size, 0, num_blocks)   # never read past S
        blocks_in_use = jnp.maximum(blocks_in_use - _first_window_block(seq_lens, geom), 0)
        num_entries = jnp.broadcast_to(blocks_in_use[:, None], (batch, hkv))
    q_tiles = q.reshape(batch, hkv, num_tokens * group, d)
    q_tiles = jnp.pad(q_tiles, ((0, 0), (0, 0), (0, geom.rows - num_tokens * group), (0, 0)))
    k_flat = k.reshape(batch, cache_len, hkv * d)   # free (row-major bitcast): (b, s, h*D + d)
    v_flat = v.reshape(batch, cache_len, hkv * d)
    out_dtype = q.dtype if num_splits == 1 else jnp.float32
    num_entries = num_entries.reshape(-1)
    if backend == "tpu":
        out, lse = _tpu_call(seq_lens, num_entries, table, q_tiles, k_flat, v_flat, geom, out_dtype, interpret)
    else:
        out, lse = _triton_call(seq_lens, num_entries, table, q_tiles, k_flat, v_flat, geom, out_dtype,
                                interpret, num_warps, num_stages)
    lse = lse[..., 0]                                   # [B, Hkv, splits, rows]
    if num_splits > 1:
        out, lse = merge_attention_partials(out, lse, axis=2)
        out = out.astype(q.dtype)
    else:
        out, lse = out[:, :, 0], lse[:, :, 0]
    out = out[:, :, :num_tokens * group].reshape(batch, hkv, num_tokens, group, d)
    lse = lse[:, :, :num_tokens * group].reshape(batch, hkv, num_tokens, group)
    return out, lse


def prepare_call(q, k, v, seq_lens, block_indices, *, block_size, sm_scale, interpret, backend, num_splits,
                 sliding_window):
    """Validation and static-argument resolution shared by the public kernel wrappers.

    Returns (sm_scale, interpret, backend, num_splits, sliding_window) resolved to static values.
    """
    interpret = _common.resolve_interpret(interpret)
    backend = _common.resolve_backend(backend, interpret)
    batch, cache_len, hkv, _, _, d = _common.validate_decode_inputs(q, k, v, seq_lens, block_size, backend)
    if block_indices is not None:
        _validate_block_indices(block_indices, batch, hkv, cache_len // block_size)
        max_entries = block_indices.shape[-1]
    else:
        max_entries = cache_len // block_size
    sm_scale = _common.resolve_sm_scale(sm_scale, d)
    if num_splits is None:
        num_splits = default_num_splits(backend, interpret, batch, hkv, max_entries)
    num_splits = _common.check_static_int("num_splits", num_splits, minimum=1)
    sliding_window = _common.check_sliding_window(sliding_window)
    return sm_scale, interpret, backend, num_splits, sliding_window


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------
def _validate_block_indices(block_indices, batch: int, num_kv_heads: int, num_blocks: int):
    if block_indices.ndim != 3 or block_indices.shape[:2] != (batch, num_kv_heads):
        raise ValueError(
            f"block_indices must have shape [B, Hkv, K] = ({batch}, {num_kv_heads}, K); got {block_indices.shape}")
    if block_indices.shape[2] < 1:
        raise ValueError("block_indices must hold at least one entry per row (K >= 1); pad with -1")
    _common.check_int_dtype("block_indices", block_indices)
    idx = _common.concrete_value(block_indices)
    if idx is None:
        return
    if (idx < -1).any() or (idx >= num_blocks).any():
        raise ValueError(
            f"block_indices must lie in [0, S / block_size = {num_blocks}) or be -1 (padding); got values in "
            f"[{idx.min()}, {idx.max()}]")
    ordered = np.sort(idx, axis=-1)
    duplicate = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
    if bool(duplicate.any()):
        raise ValueError("block_indices must not repeat a block within one (row, KV head) list")


def sparse_decode_attention(q, k, v, seq_lens, block_indices, *, block_size: int = 64, sm_scale=None,
                            interpret=None, backend: str | None = None, num_splits: int | None = None,
                            num_warps: int | None = None, num_stages: int | None = None,
                            sliding_window: int | None = None):
    """Block-sparse decode attention: each query attends only to the K/V blocks its KV head selected.

    Args:
      q: [B, Hkv, G, D] (one query token; G query heads share each KV head), or [B, Hkv, T, G, D] (T query
        tokens at cache positions seq_len - T ... seq_len - 1, causally masked among themselves).
      k, v: [B, S, Hkv, D] the cache (same dtype as q: float32, bfloat16 or float16), with the query tokens'
        own keys already written.
      seq_lens: [B] int32, valid cache entries per row (including the query tokens), 0 <= seq_len <= S.
      block_indices: [B, Hkv, K] int32, the blocks (of ``block_size`` positions) each (row, KV head) attends
        to: distinct block numbers in [0, S / block_size), padded with -1. Ascending order (what
        ``select_blocks`` returns) is recommended as the read order, not required. Entries -1 and blocks
        starting at or past seq_len are skipped (never read).
      block_size: static power of two >= 16 dividing S.
      sm_scale: static float, default 1 / sqrt(D).
      interpret: None (True on CPU), bool, or ``pltpu.InterpretParams()`` (TPU interpret mode).
      backend: None, "tpu" or "triton"; the kernel form (see the module docstring).
      num_splits: static split count of each (row, head)'s block list (flash decoding); None: 1 on TPU and in
        interpret mode, enough to launch ~128 programs on GPU.
      num_warps, num_stages: Triton compiler settings (GPU only).
      sliding_window: static int or None: the query token at position p also needs key > p - sliding_window
        (Mistral convention: the last sliding_window keys, itself included); selected blocks wholly before the
        window are skipped.

    Returns:
      out [B, Hkv, G, D] (or [B, Hkv, T, G, D]) in q.dtype and lse [B, Hkv, G] (or [B, Hkv, T, G]) float32,
      the log-sum-exp of the scaled scores over the attended keys, so partial results can be merged with
      ``merge_attention_partials``. Guarantee: equal (to float32 accumulation; bf16 probabilities in the
      P.V product for bf16 inputs) to softmax attention over the key positions p with p < seq_len (p <
      seq_len - (T - 1 - t) for query token t) and p // block_size among the row's selected blocks; that is
      ``sparse_decode_attention_reference``. A row with no such key (all padding, or seq_len = 0) gives out = 0
      and lse = -inf.

    Raises:
      ValueError naming the argument for malformed shapes, dtypes, static arguments or an unsupported
      platform. Block-index values (range, duplicates) and seq_lens values are checked only when concrete
      (outside jit, where reading them costs a host sync: call it under jit in a decode loop); under jit,
      out-of-range entries are skipped, and a repeated block is counted twice.
    """
    sm_scale, interpret, backend, num_splits, sliding_window = prepare_call(
        q, k, v, seq_lens, block_indices, block_size=block_size, sm_scale=sm_scale, interpret=interpret,
        backend=backend, num_splits=num_splits, sliding_window=sliding_window)
    out, lse = block_list_attention(
        _common.as_multi_token(q), k, v, seq_lens, block_indices, block_size=block_size, sm_scale=sm_scale,
        interpret=interpret, backend=backend, num_splits=num_splits, num_warps=num_warps, num_stages=num_stages,
        sliding_window=sliding_window)
    return _common.from_multi_token(out, q.ndim), _common.from_multi_token(lse, q.ndim)


def sparse_block_mask(block_indices, num_blocks: int):
    """[B, Hkv, num_blocks] bool: True for the blocks listed in ``block_indices`` ([B, Hkv, K], -1 = none)."""
    idx = block_indices.astype(jnp.int32)
    hits = (idx[..., None] == jnp.arange(num_blocks, dtype=jnp.int32)) & (idx[..., None] >= 0)
    return hits.any(axis=-2)


@functools.partial(jax.jit, static_argnames=("block_size", "sm_scale", "sliding_window"))
def _sparse_reference_jit(q, k, v, seq_lens, block_indices, *, block_size, sm_scale, sliding_window):
    q5 = _common.as_multi_token(q)
    num_tokens, cache_len = q5.shape[2], k.shape[1]
    causal = _common.causal_key_mask(seq_lens, num_tokens, cache_len, sliding_window)  # [B, T, S]
    blocks = sparse_block_mask(block_indices, cache_len // block_size)               # [B, Hkv, NB]
    selected = jnp.repeat(blocks, block_size, axis=-1)                                # [B, Hkv, S]
    mask = causal[:, None, :, :] & selected[:, :, None, :]                            # [B, Hkv, T, S]
    out, lse = _common.masked_attention_reference(q5, k, v, mask, sm_scale)
    return _common.from_multi_token(out, q.ndim), _common.from_multi_token(lse, q.ndim)


def sparse_decode_attention_reference(q, k, v, seq_lens, block_indices, *, block_size: int = 64, sm_scale=None,
                                      interpret=None, backend=None, num_splits=None, num_warps=None,
                                      num_stages=None, sliding_window: int | None = None):
    """Plain-jnp `sparse_decode_attention` (same signature and guarantees; the kernel-only arguments are ignored).

    A dense float32 masked softmax: key position p is visible to query token t of row b and KV head h iff
    p < seq_lens[b] - (T - 1 - t) (and p >= that limit - sliding_window) and p // block_size is listed (>= 0)
    in block_indices[b, h].
    """
    del interpret, backend, num_splits, num_warps, num_stages
    _common.validate_decode_inputs(q, k, v, seq_lens, block_size, None)
    _validate_block_indices(block_indices, k.shape[0], k.shape[2], k.shape[1] // block_size)
    sm_scale = _common.resolve_sm_scale(sm_scale, k.shape[-1])
    sliding_window = _common.check_sliding_window(sliding_window)
    return _sparse_reference_jit(q, k, v, seq_lens, block_indices, block_size=block_size, sm_scale=sm_scale,
                                 sliding_window=sliding_window)
