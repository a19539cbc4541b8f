"""Block-sparse decode-attention kernel vs its jnp reference (interpret mode on CPU), the flash-decoding merge,
and argument validation.

Tolerances (kernel vs float32 reference): float32 inputs: out and lse within 2e-5 abs + 2e-5 rel; bfloat16
inputs: out within 2e-2 abs + 2e-2 rel, lse within 1e-4 (see test_pallas_decode_attention.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import (
    decode_attention,
    decode_attention_reference,
    merge_attention_partials,
    sparse_decode_attention,
    sparse_decode_attention_reference,
)
from pallas_kernels.sparse_decode_attention import block_list_attention, compact_block_table

TOL = {jnp.float32: dict(out=(2e-5, 2e-5), lse=(2e-5, 2e-5)), jnp.bfloat16: dict(out=(2e-2, 2e-2), lse=(1e-4, 1e-4))}


def backend_kwargs(backend):
    """Compiled where the form is native (Triton on GPU, Mosaic on TPU), interpreted elsewhere (and on CPU).

    So the same tests check the interpreted kernels on CPU and the compiled ones on an accelerator.
    """
    native = {"gpu": "triton", "tpu": "tpu"}.get(jax.default_backend())
    return dict(backend=backend, interpret=None if backend == native else True)


def make_inputs(batch, cache_len, num_kv_heads, group, head_dim, dtype, seed=0, num_tokens=None):
    rng = np.random.default_rng(seed)
    q_shape = (batch, num_kv_heads, group, head_dim)
    if num_tokens is not None:
        q_shape = (batch, num_kv_heads, num_tokens, group, head_dim)
    kv_shape = (batch, cache_len, num_kv_heads, head_dim)
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)
                 for shape in (q_shape, kv_shape, kv_shape))


def random_block_indices(rng, batch, num_kv_heads, num_blocks, num_slots, sort=True):
    """[B, Hkv, K] distinct blocks per (row, head), a random count in [0, K], then -1 padding."""
    out = np.full((batch, num_kv_heads, num_slots), -1, np.int32)
    for b in range(batch):
        for h in range(num_kv_heads):
            count = rng.integers(0, min(num_slots, num_blocks) + 1)
            chosen = rng.choice(num_blocks, size=count, replace=False)
            out[b, h, :count] = np.sort(chosen) if sort else chosen
    return jnp.asarray(out)


def assert_close(out, lse, ref_out, ref_lse, dtype):
    tol = TOL[dtype]
    assert out.dtype == ref_out.dtype == jnp.dtype(dtype)
    assert lse.dtype == ref_lse.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32),
                               atol=tol["out"][0], rtol=tol["out"][1])
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=tol["lse"][0], rtol=tol["lse"][1])


LENS = [1, 77, 256, 200]   # a single token, partial last blocks, a full cache
KERNEL_CASES = [
    # backend, head_dim, block_size, dtype, group, num_slots K
    ("triton", 64, 32, jnp.float32, 1, 1),
    ("triton", 64, 32, jnp.bfloat16, 4, 3),
    ("triton", 32, 64, jnp.float32, 8, 4),       # K = all blocks
    ("tpu", 128, 64, jnp.bfloat16, 1, 4),
    ("tpu", 128, 32, jnp.float32, 4, 5),
    ("tpu", 128, 32, jnp.bfloat16, 8, 8),        # K = all blocks
]


@pytest.mark.parametrize("backend,head_dim,block_size,dtype,group,num_slots", KERNEL_CASES)
def test_sparse_matches_reference(backend, head_dim, block_size, dtype, group, num_slots):
    rng = np.random.default_rng(group * 10 + num_slots)
    q, k, v = make_inputs(4, 256, 2, group, head_dim, dtype, seed=group)
    lens = jnp.array(LENS, jnp.int32)
    idx = random_block_indices(rng, 4, 2, 256 // block_size, num_slots)
    idx = idx.at[0, 0, 0].set(0)             # row 0 (seq_len 1) head 0 sees its one token
    out, lse = sparse_decode_attention(q, k, v, lens, idx, block_size=block_size, **backend_kwargs(backend))
    ref_out, ref_lse = sparse_decode_attention_reference(q, k, v, lens, idx, block_size=block_size)
    assert out.shape == q.shape and lse.shape == q.shape[:-1]
    assert_close(out, lse, ref_out, ref_lse, dtype)
    assert np.isfinite(np.asarray(lse[0, 0])).all()


@pytest.mark.parametrize("backend,head_dim", [("triton", 32), ("tpu", 128)])
def test_sparse_all_blocks_equals_dense(backend, head_dim):
    """Every block selected (in a shuffled order, with padding) gives the dense kernel's result."""
    q, k, v = make_inputs(3, 128, 2, 4, head_dim, jnp.float32, seed=11)
    lens = jnp.array([128, 70, 1], jnp.int32)
    idx = jnp.broadcast_to(jnp.array([3, 0, 2, -1, 1, -1], jnp.int32), (3, 2, 6))
    out, lse = sparse_decode_attention(q, k, v, lens, idx, block_size=32, **backend_kwargs(backend))
    dense_out, dense_lse = decode_attention(q, k, v, lens, block_size=32, **backend_kwargs(backend))
    ref_out, ref_lse = decode_attention_reference(q, k, v, lens, block_size=32)
    np.testing.assert_allclose(np.asarray(out), np.asarray(dense_out), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(dense_lse), atol=1e-5, rtol=1e-5)
    assert_close(out, lse, ref_out, ref_lse, jnp.float32)


@pytest.mark.parametrize("backend,head_dim", [("triton", 32), ("tpu", 128)])
def test_sparse_padding_rows_give_zero_and_neg_inf(backend, head_dim):
    """A (row, head) whose entries are all -1, or all past seq_len, gives out = 0 and lse = -inf."""
    q, k, v = make_inputs(2, 128, 2, 4, head_dim, jnp.float32, seed=12)
    lens = jnp.array([40, 128], jnp.int32)
    idx = jnp.array([[[2, 3], [0, -1]],        # row 0 head 0: blocks past seq_len 40 (block 1 starts at 32)
                     [[-1, -1], [1, 3]]], jnp.int32)
    out, lse = sparse_decode_attention(q, k, v, lens, idx, block_size=32, **backend_kwargs(backend), num_splits=2)
    ref_out, ref_lse = sparse_decode_attention_reference(q, k, v, lens, idx, block_size=32)
    for b, h in [(0, 0), (1, 0)]:
        assert np.all(np.asarray(out[b, h]) == 0) and np.all(np.isneginf(np.asarray(lse[b, h])))
        assert np.all(np.asarray(ref_out[b, h]) == 0) and np.all(np.isneginf(np.asarray(ref_lse[b, h])))
    assert_close(out, lse, ref_out, ref_lse, jnp.float32)


@pytest.mark.parametrize("backend,head_dim,num_splits", [("triton", 32, 3), ("tpu", 128, 2)])
def test_sparse_split_k_matches_reference(backend, head_dim, num_splits):
    rng = np.random.default_rng(num_splits)
    q, k, v = make_inputs(2, 256, 2, 4, head_dim, jnp.bfloat16, seed=13)
    lens = jnp.array([256, 150], jnp.int32)
    idx = random_block_indices(rng, 2, 2, 8, 5)
    out, lse = sparse_decode_attention(q, k, v, lens, idx, block_size=32, num_splits=num_splits,
                                       **backend_kwargs(backend))
    ref_out, ref_lse = sparse_decode_attention_reference(q, k, v, lens, idx, block_size=32)
    assert_close(out, lse, ref_out, ref_lse, jnp.bfloat16)


def test_sparse_multi_token():
    q, k, v = make_inputs(2, 128, 2, 2, 32, jnp.float32, seed=14, num_tokens=4)
    lens = jnp.array([66, 100], jnp.int32)     # row 0's tokens are at 62..65: blocks 1 and 2 (of 32)
    idx = jnp.array([[[0, 2, -1], [1, 2, -1]], [[3, -1, -1], [0, 1, 3]]], jnp.int32)
    out, lse = sparse_decode_attention(q, k, v, lens, idx, block_size=32)
    ref_out, ref_lse = sparse_decode_attention_reference(q, k, v, lens, idx, block_size=32)
    assert out.shape == q.shape and lse.shape == q.shape[:-1]
    assert_close(out, lse, ref_out, ref_lse, jnp.float32)
    # Row 0, head 0 (blocks 0 and 2): tokens 0, 1 (positions 62, 63) see block 0 only; token 3 sees 64, 65 too.
    assert not np.allclose(np.asarray(out[0, 0, 1]), np.asarray(out[0, 0, 3]))


def test_sparse_tpu_interpret_mode():
    """The scalar-prefetch TPU form under TPU interpret mode: the index map reads the SMEM block table."""
    rng = np.random.default_rng(15)
    q, k, v = make_inputs(2, 128, 2, 4, 128, jnp.bfloat16, seed=15)
    lens = jnp.array([100, 128], jnp.int32)
    idx = random_block_indices(rng, 2, 2, 4, 3)
    out, lse = sparse_decode_attention(q, k, v, lens, idx, block_size=32, interpret=pltpu.InterpretParams(),
                                       num_splits=2)
    ref_out, ref_lse = sparse_decode_attention_reference(q, k, v, lens, idx, block_size=32)
    assert_close(out, lse, ref_out, ref_lse, jnp.bfloat16)


def test_sparse_under_jit_skips_out_of_range_entries():
    """Under jit the index range is not checked: out-of-range entries are skipped (never read)."""
    q, k, v = make_inputs(1, 128, 2, 4, 32, jnp.float32, seed=16)
    lens = jnp.array([128], jnp.int32)
    bad = jnp.array([[[1, 99, 3], [-7, 0, -1]]], jnp.int32)
    out, lse = jax.jit(lambda *a: sparse_decode_attention(*a, block_size=32))(q, k, v, lens, bad)
    clean = jnp.array([[[1, -1, 3], [-1, 0, -1]]], jnp.int32)
    ref_out, ref_lse = sparse_decode_attention_reference(q, k, v, lens, clean, block_size=32)
    assert_close(out, lse, ref_out, ref_lse, jnp.float32)


def test_compact_block_table():
    idx = jnp.array([[[-1, 5, 2, 7, 1]]], jnp.int32)
    table, count = compact_block_table(idx, jnp.array([200], jnp.int32), block_size=32, num_blocks=8)
    # Readable: 5 (starts at 160 < 200), 2, 1; 7 starts at 224 >= 200; -1 is padding. Order kept.
    assert count.tolist() == [[3]]
    assert table.tolist() == [[[5, 2, 1, 0, 0]]]


@settings(max_examples=6, deadline=None, derandomize=True)
@given(batch=st.integers(1, 3), num_kv_heads=st.integers(1, 2), group=st.sampled_from([1, 2, 4, 8]),
       log_blocks=st.integers(1, 3), block_size=st.sampled_from([16, 32]), num_slots=st.integers(1, 6),
       num_tokens=st.sampled_from([None, 2]), num_splits=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_sparse_property_random_shapes(batch, num_kv_heads, group, log_blocks, block_size, num_slots, num_tokens,
                                       num_splits, seed):
    rng = np.random.default_rng(seed)
    num_blocks = 2 ** log_blocks
    cache_len = num_blocks * block_size
    q, k, v = make_inputs(batch, cache_len, num_kv_heads, group, 32, jnp.float32, seed=seed, num_tokens=num_tokens)
    lens = jnp.asarray(rng.integers(0, cache_len + 1, size=batch), jnp.int32)
    idx = random_block_indices(rng, batch, num_kv_heads, num_blocks, num_slots, sort=bool(seed % 2))
    out, lse = sparse_decode_attention(q, k, v, lens, idx, block_size=block_size, num_splits=num_splits)
    ref_out, ref_lse = sparse_decode_attention_reference(q, k, v, lens, idx, block_size=block_size)
    assert_close(out, lse, ref_out, ref_lse, jnp.float32)


# ----------------------------------------------------------------------------------------------------------
# Flash-decoding merge
# ----------------------------------------------------------------------------------------------------------
def test_merge_partials_equals_full_softmax():
    """Attention over 3 disjoint block sets (computed by the sparse reference), merged = dense attention."""
    q, k, v = make_inputs(2, 128, 2, 4, 32, jnp.float32, seed=21)
    lens = jnp.array([128, 90], jnp.int32)
    parts = [jnp.array([0, 3]), jnp.array([1]), jnp.array([2])]
    outs, lses = [], []
    for blocks in parts:
        idx = jnp.broadcast_to(blocks.astype(jnp.int32), (2, 2, blocks.shape[0]))
        o, l = sparse_decode_attention_reference(q, k, v, lens, idx, block_size=32)
        outs.append(o)
        lses.append(l)
    # Row 1 (seq_len 90): block 3 starts at 96, so part 0 only sees block 0; merge must still be exact.
    out, lse = merge_attention_partials(jnp.stack(outs), jnp.stack(lses), axis=0)
    ref_out, ref_lse = decode_attention_reference(q, k, v, lens, block_size=32)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=1e-5, rtol=1e-5)


def test_merge_partials_by_hand():
    # Two partials of one row: lse log(1) and log(3) -> weights 1/4, 3/4; an empty partial is ignored.
    outs = jnp.array([[[2.0, 0.0]], [[6.0, 4.0]], [[123.0, 456.0]]])      # [P=3, 1, D=2]
    lses = jnp.array([[0.0], [np.log(3.0)], [-np.inf]])                     # [P=3, 1]
    out, lse = merge_attention_partials(outs, lses)
    np.testing.assert_allclose(np.asarray(out), [[5.0, 3.0]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(lse), [np.log(4.0)], rtol=1e-6)
    # All partials empty: out 0, lse -inf.
    out, lse = merge_attention_partials(outs[2:], lses[2:])
    assert np.all(np.asarray(out) == 0) and np.isneginf(np.asarray(lse)).all()
    with pytest.raises(ValueError, match="lses"):
        merge_attention_partials(outs, lses[:, :, None])


# ----------------------------------------------------------------------------------------------------------
# Lowering for the accelerators, dense and sparse (no device needed: Pallas -> Triton IR / Mosaic MLIR only; the
# Triton and Mosaic compilers themselves run only on a GPU / TPU, so this does not prove they accept the code).
# ----------------------------------------------------------------------------------------------------------
LOWERING_CASES = [  # sparse, num_splits, sliding_window
    (False, 1, None), (False, 4, 100), (True, 1, None), (True, 2, 100)]


def lower_for(platform, backend, sparse, num_splits, sliding_window):
    q = jnp.zeros((2, 2, 1, 4, 128), jnp.bfloat16)
    k = jnp.zeros((2, 256, 2, 128), jnp.bfloat16)
    lens = jnp.zeros((2,), jnp.int32)
    idx = jnp.zeros((2, 2, 3), jnp.int32) if sparse else None
    fn = jax.jit(lambda q, k, v, lens, idx: block_list_attention(
        q, k, v, lens, idx, block_size=64, sm_scale=0.1, interpret=False, backend=backend, num_splits=num_splits,
        sliding_window=sliding_window))
    return fn.trace(q, k, k, lens, idx).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("sparse,num_splits,sliding_window", LOWERING_CASES)
def test_lowers_to_triton(sparse, num_splits, sliding_window):
    assert "__gpu$xla.gpu.triton" in lower_for("cuda", "triton", sparse, num_splits, sliding_window)


@pytest.fixture
def fake_tpu_info(monkeypatch):
    """Lets the Mosaic TPU lowering run off-TPU by registering TPU v5e hardware info for this device kind."""
    try:
        from jax._src.pallas.mosaic import tpu_info
        info = tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1)
        monkeypatch.setitem(tpu_info.registry, jax.devices()[0].device_kind, lambda: info)
        tpu_info.get_tpu_info.cache_clear()
    except Exception as e:  # private API: may move in later jax versions
        pytest.skip(f"cannot fake TPU info for an off-TPU Mosaic lowering: {e!r}")
    yield
    tpu_info.get_tpu_info.cache_clear()


@pytest.mark.parametrize("sparse,num_splits,sliding_window", LOWERING_CASES)
def test_lowers_to_mosaic_tpu(fake_tpu_info, sparse, num_splits, sliding_window):
    assert "tpu_custom_call" in lower_for("tpu", "tpu", sparse, num_splits, sliding_window)


# ----------------------------------------------------------------------------------------------------------
# Argument validation
# ----------------------------------------------------------------------------------------------------------
def good_args():
    q, k, v = make_inputs(2, 128, 2, 4, 32, jnp.float32)
    idx = jnp.array([[[0, 1], [2, -1]], [[3, -1], [-1, -1]]], jnp.int32)
    return q, k, v, jnp.array([5, 128], jnp.int32), idx


@pytest.mark.parametrize("idx,match", [
    (jnp.array([[[0, 4], [2, -1]], [[3, -1], [-1, -1]]], jnp.int32), "block_indices must lie in"),
    (jnp.array([[[0, -2], [2, -1]], [[3, -1], [-1, -1]]], jnp.int32), "block_indices must lie in"),
    (jnp.array([[[1, 1], [2, -1]], [[3, -1], [-1, -1]]], jnp.int32), "repeat"),
    (jnp.zeros((2, 1, 2), jnp.int32), r"block_indices must have shape \[B, Hkv, K\]"),
    (jnp.zeros((2, 2), jnp.int32), r"block_indices must have shape"),
    (jnp.zeros((2, 2, 0), jnp.int32), "K >= 1"),
    (jnp.zeros((2, 2, 2), jnp.float32), "block_indices must have an integer dtype"),
])
@pytest.mark.parametrize("fn", [sparse_decode_attention, sparse_decode_attention_reference])
def test_sparse_bad_block_indices(fn, idx, match):
    q, k, v, lens, _ = good_args()
    with pytest.raises(ValueError, match=match):
        fn(q, k, v, lens, idx, block_size=32)


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_size=48), "block_size"),
    (dict(block_size=256), "block_size"),
    (dict(backend="tpu", interpret=True), "multiple of 128"),
    (dict(num_splits=1.5), "num_splits"),
])
def test_sparse_bad_static_arguments(kwargs, match):
    q, k, v, lens, idx = good_args()
    with pytest.raises(ValueError, match=match):
        sparse_decode_attention(q, k, v, lens, idx, **{"block_size": 32, **kwargs})


def test_sparse_bad_shapes():
    q, k, v, lens, idx = good_args()
    with pytest.raises(ValueError, match="Hkv"):
        sparse_decode_attention(q[:, :1], k, v, lens, idx[:, :1], block_size=32)
    with pytest.raises(ValueError, match="share one dtype"):
        sparse_decode_attention(q, k.astype(jnp.bfloat16), v, lens, idx, block_size=32)


@pytest.mark.parametrize("backend,head_dim", [("triton", 32), ("tpu", 128)])
def test_sparse_sliding_window(backend, head_dim):
    """Selected blocks wholly before the window are skipped; partly covered ones are masked per key."""
    q, k, v = make_inputs(2, 256, 2, 4, head_dim, jnp.float32, seed=17)
    lens = jnp.array([64, 200], jnp.int32)     # window 33: row 0 sees keys 31..63, row 1 keys 167..199
    idx = jnp.array([[[0, 1, -1], [1, -1, -1]], [[0, 4, 6], [5, 6, -1]]], jnp.int32)
    out, lse = sparse_decode_attention(q, k, v, lens, idx, block_size=32, **backend_kwargs(backend), sliding_window=33)
    ref_out, ref_lse = sparse_decode_attention_reference(q, k, v, lens, idx, block_size=32, sliding_window=33)
    assert_close(out, lse, ref_out, ref_lse, jnp.float32)
    # Row 1 head 0: blocks 0 and 4 are wholly before the window; only block 6 (keys 192..199) counts.
    only_6 = jnp.array([[[0, 1, -1], [1, -1, -1]], [[6, -1, -1], [5, 6, -1]]], jnp.int32)
    ref6, _ = sparse_decode_attention_reference(q, k, v, lens, only_6, block_size=32, sliding_window=33)
    np.testing.assert_allclose(np.asarray(out[1, 0]), np.asarray(ref6[1, 0]), atol=1e-5)
