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

The same kernel also serves absorbed MLA decode (`mla_decode_attention.py`): the keys may come in two parts
(``k`` and ``k_rope``; the scores of the parts are summed, nothing is concatenated) and the values may be the
keys' first part itself (``v=None``: one operand, each block read once and used for both products). The query
rows (t * G + g) of a (row, KV head) may be split over programs of ``query_tile_rows`` rows (grid axis 2 then
enumerates (row tile, split) pairs), which keeps a Triton program's accumulator small for wide heads (MLA: 512).

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
# Elements of a Triton program's float32 accumulator [query rows, D] the automatic query tiling aims for
# (32 KiB: 64 registers per thread at 4 warps).
_TRITON_ACC_ELEMENTS = 8192


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
    head_dim: int           # D: width of the keys' (first) part and of the values
    rope_dim: int           # Dr: width of the keys' second part (MLA's RoPE key); 0: keys have one part
    values_are_keys: bool   # V is the keys' first part (MLA's latent): one read of each block serves both
    num_tokens: int         # T query tokens per KV head
    group: int              # G query heads per KV head
    rows: int               # query rows: kernel_rows(T * G)
    tile_rows: int          # query rows per program (a power of two dividing rows)
    max_entries: int        # K (sparse) or S // block_size (dense)
    num_splits: int
    sm_scale: float
    sliding_window: int | None   # a query at position p sees keys p - window < key <= p
    num_blocks: int              # S // block_size

    @property
    def entries_per_split(self) -> int:  # static bound used by the TPU grid
        return pl.cdiv(self.max_entries, self.num_splits)

    @property
    def row_tiles(self) -> int:
        return self.rows // self.tile_rows

    @property
    def key_widths(self) -> tuple[int, ...]:  # widths of the key parts (and of the matching query parts)
        return (self.head_dim, self.rope_dim) if self.rope_dim else (self.head_dim,)


def _tile_and_split(p, geom: _Geometry):
    """(query-row tile, key split) of grid axis 2, which enumerates them tile-major: p = tile * splits + split."""
    if geom.row_tiles == 1:
        return 0, p
    if geom.num_splits == 1:
        return p, 0
    return p // geom.num_splits, p % geom.num_splits


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


def _row_limits(seq_len, tile, geom: _Geometry):
    """[tile_rows, 1] int32: exclusive key-position limit per row of query-row tile ``tile`` (row r = t * G + g).

    Token t of T sees keys < seq_len - (T - 1 - t); padding rows (r >= T * G) get seq_len. Written with
    comparisons against an iota (no vector integer division, which Mosaic lacks).
    """
    r = tile * geom.tile_rows + lax.broadcasted_iota(jnp.int32, (geom.tile_rows, 1), 0)
    back = jnp.zeros((geom.tile_rows, 1), jnp.int32)
    for t in range(1, geom.num_tokens):  # back = T - 1 - t(r): the number of tokens after row r's token
        back = back + (r < t * geom.group).astype(jnp.int32)
    return seq_len - back


def _init_state(geom: _Geometry):
    """Online-softmax state: running max m [R, 1], denominator l [R, 1], numerator acc [R, D] (R = tile_rows)."""
    return (jnp.full((geom.tile_rows, 1), -jnp.inf, jnp.float32),
            jnp.zeros((geom.tile_rows, 1), jnp.float32),
            jnp.zeros((geom.tile_rows, geom.head_dim), jnp.float32))


def _online_softmax_update(q_parts, k_parts, v, block, row_limit, state, geom: _Geometry):
    """Folds one K/V block into the online-softmax state. The one block-attention implementation.

    Args:
      q_parts: ([R, D],) or ([R, D], [R, Dr]): the query tile's parts (input dtype).
      k_parts: ([block_size, D],) or ([block_size, D], [block_size, Dr]): the key block's parts; the score is
        the sum of the parts' dot products (q and k concatenated along the feature dim, without the copy).
      v: [block_size, D] the value block (input dtype); MLA passes k_parts[0] itself.
      block: int32 scalar, the block's index in the cache (its keys are at block * block_size + i).
      row_limit: [R, 1] int32, exclusive key-position limit per row.
      state: (m [R, 1], l [R, 1], acc [R, D]) float32.
    Returns:
      The updated state. Keys at positions >= row_limit (or < row_limit - sliding_window) get probability
      exactly 0; a row that has seen no visible key keeps m = -inf, l = 0, acc = 0.
    """
    m_prev, l_prev, acc_prev = state
    precision = lax.Precision.HIGHEST if q_parts[0].dtype == jnp.float32 else lax.Precision.DEFAULT
    scores = None
    for q, k in zip(q_parts, k_parts, strict=True):
        part = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)                      # [R, block_size]
        scores = part if scores is None else scores + part
    scores = scores * geom.sm_scale
    key_pos = block * geom.block_size + lax.broadcasted_iota(jnp.int32, (1, geom.block_size), 1)
    visible = key_pos < row_limit
    if geom.sliding_window is not None:
        visible = visible & (key_pos >= row_limit - geom.sliding_window)
    scores = jnp.where(visible, scores, -jnp.inf)
    m_next = jnp.maximum(m_prev, scores.max(axis=-1, keepdims=True))                  # [R, 1]
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    alpha = jnp.exp(m_prev - m_safe)                                                    # 0 when m_prev = -inf
    probs = jnp.exp(scores - m_safe)                                                    # [R, block_size]
    l_next = alpha * l_prev + probs.sum(axis=-1, keepdims=True)
    pv = lax.dot_general(probs.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)                            # [R, D]
    return m_next, l_next, alpha * acc_prev + pv


def _finalize(state):
    """(out [R, D] f32, lse [R, 1] f32); out = 0 and lse = -inf for rows with no visible key."""
    m, l, acc = state
    seen = l > 0.0
    safe_l = jnp.where(seen, l, 1.0)
    out = acc / safe_l
    lse = jnp.where(seen, m + jnp.log(safe_l), -jnp.inf)
    return out, lse


def _split_input_refs(refs, geom: _Geometry):
    """(q refs, k refs, v ref, remaining refs) from the refs that follow the scalar inputs.

    The array inputs are, in order: the query parts, the key parts, then V unless ``values_are_keys`` (then the
    V ref is the first key part's ref: the block is read once and used twice).
    """
    n = len(geom.key_widths)
    q_refs, k_refs, refs = refs[:n], refs[n:2 * n], refs[2 * n:]
    if geom.values_are_keys:
        return q_refs, k_refs, k_refs[0], refs
    return q_refs, k_refs, refs[0], refs[1:]


# ----------------------------------------------------------------------------------------------------------
# TPU form: scalar-prefetch grid
# ----------------------------------------------------------------------------------------------------------
def _tpu_entry_block(b, h, split, j, seq_len, num_entries_ref, table_ref, geom: _Geometry):
    """(block to read at grid step (b, h, split, j), whether the step holds an entry). Scalar code (SMEM)."""
    n = num_entries_ref[b * geom.num_kv_heads + h]
    start, stop = _entry_span(n, split, geom.num_splits)
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
    # q_refs: [R, D] (and [R, Dr]); k_refs: [block_size, D] (and [block_size, Dr]); v_ref: [block_size, D]
    q_refs, k_refs, v_ref, refs = _split_input_refs(refs, geom)
    (o_ref,       # [R, D]  (partial out of this split)
     lse_ref,     # [R, 1]
     m_scratch,   # [R, 1] f32
     l_scratch,   # [R, 1] f32
     acc_scratch, # [R, D] f32
     ) = refs
    b, h, p, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    tile, split = _tile_and_split(p, geom)

    @pl.when(j == 0)
    def _init():
        m0, l0, acc0 = _init_state(geom)
        m_scratch[...] = m0
        l_scratch[...] = l0
        acc_scratch[...] = acc0

    block, valid = _tpu_entry_block(b, h, split, j, seq_lens_ref[b], num_entries_ref, table_ref, geom)

    @pl.when(valid)
    def _update():
        row_limit = _row_limits(seq_lens_ref[b], tile, geom)
        state = (m_scratch[...], l_scratch[...], acc_scratch[...])
        k_parts = tuple(ref[...] for ref in k_refs)
        v = k_parts[0] if geom.values_are_keys else v_ref[...]
        m, l, acc = _online_softmax_update(tuple(ref[...] for ref in q_refs), k_parts, v, block, row_limit,
                                           state, geom)
        m_scratch[...] = m
        l_scratch[...] = l
        acc_scratch[...] = acc

    @pl.when(j == pl.num_programs(3) - 1)
    def _write():
        out, lse = _finalize((m_scratch[...], l_scratch[...], acc_scratch[...]))
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


def _tpu_call(seq_lens, num_entries, table, q_tiles, k_flats, v_flat, geom: _Geometry, out_dtype, interpret):
    """q_tiles: per key part [B, Hkv, rows, width]; k_flats: per key part [B, S, Hkv * width]; v_flat: [B, S,
    Hkv * D] or None (values are the first key part)."""
    batch = q_tiles[0].shape[0]
    hkv, rows, tile_rows, d, bs = geom.num_kv_heads, geom.rows, geom.tile_rows, geom.head_dim, geom.block_size
    sq = _SQUEEZED
    num_prefetch = 3 if geom.sparse else 2

    def q_map(b, h, p, j, *prefetch):
        return (b, h, _tile_and_split(p, geom)[0], 0)

    def kv_map(b, h, p, j, seq_lens_ref, num_entries_ref, *table_ref):
        block, _ = _tpu_entry_block(b, h, _tile_and_split(p, geom)[1], j, seq_lens_ref[b], num_entries_ref,
                                    table_ref[0] if table_ref else None, geom)
        return (b, block, h)

    def out_map(b, h, p, j, *prefetch):
        tile, split = _tile_and_split(p, geom)
        return (b, h, split, tile, 0)

    in_specs = [pl.BlockSpec((sq, sq, tile_rows, w), q_map) for w in geom.key_widths]   # q parts
    in_specs += [pl.BlockSpec((sq, bs, w), kv_map) for w in geom.key_widths]           # key parts
    inputs = [*q_tiles, *k_flats]
    if not geom.values_are_keys:
        in_specs.append(pl.BlockSpec((sq, bs, d), kv_map))
        inputs.append(v_flat)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=num_prefetch,
        grid=(batch, hkv, geom.row_tiles * geom.num_splits, geom.entries_per_split),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((sq, sq, sq, tile_rows, d), out_map),  # out [B, Hkv, splits, rows, D]
            pl.BlockSpec((sq, sq, sq, tile_rows, 1), out_map),  # lse [B, Hkv, splits, rows, 1]
        ],
        scratch_shapes=[pltpu.VMEM((tile_rows, 1), jnp.float32),
                        pltpu.VMEM((tile_rows, 1), jnp.float32),
                        pltpu.VMEM((tile_rows, d), jnp.float32)],
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
        name=_kernel_name(geom),
    )(*prefetch, *inputs)


def _kernel_name(geom: _Geometry) -> str:
    if geom.rope_dim:
        return "mla_decode_attention"
    return "sparse_decode_attention" if geom.sparse else "decode_attention"


# ----------------------------------------------------------------------------------------------------------
# Triton (GPU) form: one program per (row, KV head, query-row tile, split), looping over its entries
# ----------------------------------------------------------------------------------------------------------
def _triton_kernel(seq_len_ref,      # [] int32
                   num_entries_ref,  # [] int32: entries of this (row, KV head)
                   *refs, geom: _Geometry):
    if geom.sparse:
        table_ref, *refs = refs      # [K] int32: compacted block table of this (row, KV head)
    # q_refs: [R, D] (and [R, Dr]); k_refs: this (row, KV head)'s keys [S, D] (and [S, Dr]), strided views of
    # which only the visited blocks are loaded; v_ref: [S, D] (the first key ref when values are keys).
    q_refs, k_refs, v_ref, (o_ref,    # [R, D]
                            lse_ref,  # [R, 1]
                            ) = _split_input_refs(refs, geom)
    tile, split = _tile_and_split(pl.program_id(2), geom)
    seq_len = seq_len_ref[...]
    start, stop = _entry_span(num_entries_ref[...], split, geom.num_splits)
    q_parts = tuple(ref[...] for ref in q_refs)
    row_limit = _row_limits(seq_len, tile, geom)
    bs = geom.block_size
    first_block = None if geom.sparse else _first_window_block(seq_len, geom)

    def body(entry, state):
        block = table_ref[entry] if geom.sparse else first_block + entry
        window = pl.ds(pl.multiple_of(block * bs, bs), bs)
        k_parts = tuple(ref[window, :] for ref in k_refs)
        v = k_parts[0] if geom.values_are_keys else v_ref[window, :]
        return _online_softmax_update(q_parts, k_parts, v, block, row_limit, state, geom)

    out, lse = _finalize(lax.fori_loop(start, stop, body, _init_state(geom)))
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _triton_call(seq_lens, num_entries, table, q_tiles, k_flats, v_flat, geom: _Geometry, out_dtype, interpret,
                 num_warps: int | None, num_stages: int | None):
    """Arguments as in `_tpu_call`."""
    batch, cache_len = k_flats[0].shape[:2]
    hkv, rows, tile_rows, d = geom.num_kv_heads, geom.rows, geom.tile_rows, geom.head_dim
    sq = _SQUEEZED
    in_specs = [
        pl.BlockSpec((sq,), lambda b, h, p: (b,)),                  # seq_lens [B]
        pl.BlockSpec((sq, sq), lambda b, h, p: (b, h)),             # num_entries [B, Hkv]
    ]
    args = [seq_lens, num_entries.reshape(batch, hkv)]
    if geom.sparse:
        in_specs.append(pl.BlockSpec((sq, sq, geom.max_entries), lambda b, h, p: (b, h, 0)))  # table [B, Hkv, K]
        args.append(table.reshape(batch, hkv, geom.max_entries))
    q_map = lambda b, h, p: (b, h, _tile_and_split(p, geom)[0], 0)  # noqa: E731
    kv_map = lambda b, h, p: (b, 0, h)                               # noqa: E731
    in_specs += [pl.BlockSpec((sq, sq, tile_rows, w), q_map) for w in geom.key_widths]  # q parts [B, Hkv, rows, w]
    in_specs += [pl.BlockSpec((sq, cache_len, w), kv_map) for w in geom.key_widths]     # key parts [B, S, Hkv * w]
    args += [*q_tiles, *k_flats]
    if not geom.values_are_keys:
        in_specs.append(pl.BlockSpec((sq, cache_len, d), kv_map))                       # v [B, S, Hkv * D]
        args.append(v_flat)
    out_map = lambda b, h, p: (b, h, _tile_and_split(p, geom)[1], _tile_and_split(p, geom)[0], 0)  # noqa: E731
    compiler_params = None
    if not interpret:
        compiler_params = pltriton.CompilerParams(
            num_warps=4 if num_warps is None else num_warps,
            num_stages=2 if num_stages is None else num_stages)
    return pl.pallas_call(
        functools.partial(_triton_kernel, geom=geom),
        grid=(batch, hkv, geom.row_tiles * geom.num_splits),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((sq, sq, sq, tile_rows, d), out_map),  # out [B, Hkv, splits, rows, D]
            pl.BlockSpec((sq, sq, sq, tile_rows, 1), out_map),  # lse [B, Hkv, splits, rows, 1]
        ],
        out_shape=[jax.ShapeDtypeStruct((batch, hkv, geom.num_splits, rows, d), out_dtype),
                   jax.ShapeDtypeStruct((batch, hkv, geom.num_splits, rows, 1), jnp.float32)],
        compiler_params=compiler_params,
        interpret=interpret,
        name=_kernel_name(geom),
    )(*args)


# ----------------------------------------------------------------------------------------------------------
# Driver shared by decode_attention, sparse_decode_attention and mla_decode_attention
# ----------------------------------------------------------------------------------------------------------
def default_query_tile_rows(backend: str, interpret, rows: int, head_dim: int) -> int:
    """Query rows per program: all of them on TPU and in interpret mode; on GPU at most what keeps a program's
    float32 accumulator [R, D] at _TRITON_ACC_ELEMENTS (MLA's D = 512: 16 rows, as FlashMLA-style Triton
    kernels use)."""
    if backend != "triton" or interpret:
        return rows
    return min(rows, max(_common.MIN_KERNEL_ROWS, _TRITON_ACC_ELEMENTS // head_dim))


def default_num_splits(backend: str, interpret, batch: int, num_kv_heads: int, max_entries: int,
                       row_tiles: int = 1) -> int:
    """Splits of each (row, KV head)'s entry list: enough programs to fill a GPU; 1 on TPU and in interpret."""
    if backend != "triton" or interpret:
        return 1
    programs = batch * num_kv_heads * row_tiles
    return max(1, min(max_entries, -(-_TARGET_GPU_PROGRAMS // programs)))


def resolve_launch(backend: str, interpret, *, batch: int, num_kv_heads: int, rows: int, head_dim: int,
                   max_entries: int, num_splits, query_tile_rows) -> tuple[int, int]:
    """(num_splits, query_tile_rows) as static ints: the defaults above for None, else checked values.

    ``query_tile_rows`` must be a power of two >= 16; values above ``rows`` mean one tile.
    """
    if query_tile_rows is None:
        query_tile_rows = default_query_tile_rows(backend, interpret, rows, head_dim)
    query_tile_rows = min(rows, _common.check_static_int(
        "query_tile_rows", query_tile_rows, minimum=_common.MIN_KERNEL_ROWS, power_of_2=True))
    if num_splits is None:
        num_splits = default_num_splits(backend, interpret, batch, num_kv_heads, max_entries,
                                        rows // query_tile_rows)
    num_splits = _common.check_static_int("num_splits", num_splits, minimum=1)
    return num_splits, query_tile_rows


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
    "block_size", "sm_scale", "interpret", "backend", "num_splits", "num_warps", "num_stages", "sliding_window",
    "query_tile_rows"))
def block_list_attention(q, k, v, seq_lens, block_indices, *, block_size: int, sm_scale: float, interpret,
                         backend: str, num_splits: int, num_warps=None, num_stages=None, sliding_window=None,
                         q_rope=None, k_rope=None, query_tile_rows: int | None = None):
    """Attention of q over the K/V blocks listed by ``block_indices`` (all blocks if None). Arguments validated.

    Args:
      q: [B, Hkv, T, G, D].
      k: [B, S, Hkv, D].
      v: [B, S, Hkv, D], or None: the values are k itself (MLA's latent), read once per block for both uses.
      seq_lens: [B] int.
      block_indices: [B, Hkv, K] int or None (dense).
      q_rope, k_rope: None, or a second key part [B, Hkv, T, G, Dr] and [B, S, Hkv, Dr]: scores are
        (q.k + q_rope.k_rope) * sm_scale.
      query_tile_rows: static power of two >= 16 dividing the padded query rows, or None (all rows in one
        program): query rows (t * G + g) per program; each tile reads the key blocks again.
    Returns:
      out [B, Hkv, T, G, D] (q.dtype), lse [B, Hkv, T, G] float32.
    """
    batch, hkv, num_tokens, group, d = q.shape
    cache_len = k.shape[1]
    num_blocks = cache_len // block_size
    sparse = block_indices is not None
    seq_lens = seq_lens.astype(jnp.int32)
    rows = _common.kernel_rows(num_tokens * group)
    geom = _Geometry(sparse=sparse, block_size=block_size, num_kv_heads=hkv, head_dim=d,
                     rope_dim=0 if k_rope is None else k_rope.shape[-1], values_are_keys=v is None,
                     num_tokens=num_tokens, group=group, rows=rows,
                     tile_rows=rows if query_tile_rows is None else query_tile_rows,
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

    def as_tiles(x):   # [B, Hkv, T, G, w] -> [B, Hkv, rows, w], zero padding rows
        x = x.reshape(batch, hkv, num_tokens * group, x.shape[-1])
        return jnp.pad(x, ((0, 0), (0, 0), (0, rows - num_tokens * group), (0, 0)))

    def as_flat(x):    # [B, S, Hkv, w] -> [B, S, Hkv * w]: free (row-major bitcast): (b, s, h*w + i)
        return x.reshape(batch, cache_len, hkv * x.shape[-1])

    q_parts, k_parts = (q,), (k,)
    if k_rope is not None:
        q_parts, k_parts = (q, q_rope), (k, k_rope)
    q_tiles = tuple(as_tiles(x) for x in q_parts)
    k_flats = tuple(as_flat(x) for x in k_parts)
    v_flat = None if v is None else as_flat(v)
    out_dtype = q.dtype if num_splits == 1 else jnp.float32
    num_entries = num_entries.reshape(-1)
    if backend == "tpu":
        out, lse = _tpu_call(seq_lens, num_entries, table, q_tiles, k_flats, v_flat, geom, out_dtype, interpret)
    else:
        out, lse = _triton_call(seq_lens, num_entries, table, q_tiles, k_flats, v_flat, geom, out_dtype,
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
    """Validation and static-argument resolution shared by the dense and sparse kernel wrappers.

    Returns (sm_scale, interpret, backend, num_splits, sliding_window, query_tile_rows) resolved to static values.
    """
    interpret = _common.resolve_interpret(interpret)
    backend = _common.resolve_backend(backend, interpret)
    batch, cache_len, hkv, num_tokens, group, d = _common.validate_decode_inputs(
        q, k, v, seq_lens, block_size, backend)
    if block_indices is not None:
        _validate_block_indices(block_indices, batch, hkv, cache_len // block_size)
        max_entries = block_indices.shape[-1]
    else:
        max_entries = cache_len // block_size
    sm_scale = _common.resolve_sm_scale(sm_scale, d)
    num_splits, query_tile_rows = resolve_launch(
        backend, interpret, batch=batch, num_kv_heads=hkv, rows=_common.kernel_rows(num_tokens * group), head_dim=d,
        max_entries=max_entries, num_splits=num_splits, query_tile_rows=None)
    sliding_window = _common.check_sliding_window(sliding_window)
    return sm_scale, interpret, backend, num_splits, sliding_window, query_tile_rows

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
    sm_scale, interpret, backend, num_splits, sliding_window, query_tile_rows = prepare_call(
        q, k, v, seq_lens, block_indices, block_size=block_size, sm_scale=sm_scale, interpret=interpret,
        backend=backend, num_splits=num_splits, sliding_window=sliding_window)
    out, lse = block_list_attention(
        _common.as_multi_token(q), k, v, seq_lens, block_indices, block_size=block_size, sm_scale=sm_scale,
        interpret=interpret, backend=backend, num_splits=num_splits, num_warps=num_warps, num_stages=num_stages,
        sliding_window=sliding_window, query_tile_rows=query_tile_rows)
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
