"""InfLLM-v2 block selection and compressed keys: hand-computed examples, incremental == from scratch, an
independent loop-based oracle for the pooling geometry, and argument validation."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import (
    compress_keys,
    decode_attention_reference,
    init_compressed_keys,
    num_full_kernels,
    select_blocks,
    sparse_decode_attention,
    sparse_decode_attention_reference,
    update_compressed_keys,
)

# ----------------------------------------------------------------------------------------------------------
# A hand-built example. Defaults kernel_size 32, stride 16, block 64; cache S = 512: 8 blocks, 31 kernels.
# Kernel j covers tokens [16j, 16j + 32) and overlaps blocks b with 4b - 1 <= j <= 4b + 3.
# Head 0 puts all its softmax mass on kernel 9 (overlaps block 2 only: 7 <= 9 <= 11).
# Head 1 splits its mass over kernels 17 (block 4 only: 15 <= 17 <= 19) and 25 (block 6 only).
# So block scores: block 2 ~ 1.0, block 4 ~ 0.5, block 6 ~ 0.5, the rest ~ 1e-26.
# ----------------------------------------------------------------------------------------------------------
D = 16


def hand_example():
    ck = np.zeros((1, 31, 1, D), np.float32)
    ck[0, 9, 0, 0] = 1.0
    ck[0, 17, 0, 1] = 1.0
    ck[0, 25, 0, 1] = 1.0
    q = np.zeros((1, 1, 2, D), np.float32)
    q[0, 0, 0, 0] = 60.0
    q[0, 0, 1, 1] = 60.0
    return jnp.asarray(q), jnp.asarray(ck)


@pytest.mark.parametrize("top_k,expected", [
    # seq_len 500: the query is in block 7 (448..511); 30 full kernels (kernel 30 would end at 512 > 500).
    # Forced: init block 0, local blocks 6, 7 (local_blocks = 2: q_blk - 2 < b <= q_blk).
    (3, [0, 6, 7]),
    (4, [0, 2, 6, 7]),                       # + block 2 (score ~1)
    (5, [0, 2, 4, 6, 7]),                    # + block 4 (score ~0.5)
    (8, [0, 1, 2, 3, 4, 5, 6, 7]),           # every block
    (10, [0, 1, 2, 3, 4, 5, 6, 7, -1, -1]),  # more slots than blocks: -1 padding at the end
])
def test_select_blocks_hand_example(top_k, expected):
    q, ck = hand_example()
    got = select_blocks(q, ck, jnp.array([500], jnp.int32), init_blocks=1, local_blocks=2, top_k=top_k,
                        sm_scale=1.0)
    assert got.dtype == jnp.int32 and got.shape == (1, 1, top_k)
    assert got[0, 0].tolist() == expected


def test_select_blocks_excludes_blocks_past_seq_len():
    q, ck = hand_example()
    # seq_len 200: query in block 3; blocks 4..7 do not exist; kernels 0..10 are full (kernel 11 ends at 208).
    # Forced: 0, 2, 3. Kernels 9 (block 2) is valid; kernels 17, 25 are not. Block 1 is the only other block.
    got = select_blocks(q, ck, jnp.array([200], jnp.int32), init_blocks=1, local_blocks=2, top_k=6, sm_scale=1.0)
    assert got[0, 0].tolist() == [0, 1, 2, 3, -1, -1]
    # seq_len 1: only block 0 exists. seq_len 0: nothing is selectable.
    got = select_blocks(q, ck, jnp.array([1], jnp.int32), init_blocks=1, local_blocks=2, top_k=3, sm_scale=1.0)
    assert got[0, 0].tolist() == [0, -1, -1]
    got = select_blocks(q, ck, jnp.array([0], jnp.int32), init_blocks=1, local_blocks=2, top_k=3, sm_scale=1.0)
    assert got[0, 0].tolist() == [-1, -1, -1]


def test_select_blocks_local_window_and_init_blocks():
    # All scores equal (q = 0): only the forced blocks are distinguishable. seq_len 449: query in block 7.
    q = jnp.zeros((1, 1, 2, D), jnp.float32)
    ck = jnp.zeros((1, 31, 1, D), jnp.float32)
    got = select_blocks(q, ck, jnp.array([449], jnp.int32), init_blocks=2, local_blocks=3, top_k=5)
    assert got[0, 0].tolist() == [0, 1, 5, 6, 7]


def test_select_blocks_nosa_extra_scores():
    q, ck = hand_example()
    extra = np.zeros((1, 1, 8), np.float32)
    extra[0, 0, 3] = 5.0              # the query-agnostic score lifts block 3 above block 2 (~1)
    got = select_blocks(q, ck, jnp.array([500], jnp.int32), init_blocks=1, local_blocks=2, top_k=4, sm_scale=1.0,
                        extra_block_scores=jnp.asarray(extra))
    assert got[0, 0].tolist() == [0, 3, 6, 7]
    extra[0, 0, 3] = 0.0
    extra[0, 0, 2] = -np.inf          # -inf excludes an unforced block
    got = select_blocks(q, ck, jnp.array([500], jnp.int32), init_blocks=1, local_blocks=2, top_k=4, sm_scale=1.0,
                        extra_block_scores=jnp.asarray(extra))
    assert got[0, 0].tolist() == [0, 4, 6, 7]


def test_select_blocks_per_kv_head_and_row():
    """Rows and KV heads select independently; the G heads of one KV head share a selection."""
    q1, ck1 = hand_example()
    q = jnp.concatenate([q1, q1[:, :, ::-1]], axis=1)                # KV head 1: the heads swapped (same sum)
    q = jnp.concatenate([q, jnp.zeros_like(q)], axis=0)              # row 1: all-zero query
    ck = jnp.concatenate([ck1, ck1], axis=2)
    ck = jnp.concatenate([ck, ck], axis=0)
    got = select_blocks(q, ck, jnp.array([500, 500], jnp.int32), init_blocks=1, local_blocks=2, top_k=5,
                        sm_scale=1.0)
    assert got[0, 0].tolist() == got[0, 1].tolist() == [0, 2, 4, 6, 7]
    # Row 1: equal scores for every block; ties go to the lowest index.
    assert got[1, 0].tolist() == [0, 1, 2, 6, 7]


# ----------------------------------------------------------------------------------------------------------
# Compressed keys
# ----------------------------------------------------------------------------------------------------------
def test_compress_keys_hand_example():
    # k[b, s] = s: kernel j averages positions 16j .. 16j + 31 -> 16j + 15.5.
    k = jnp.broadcast_to(jnp.arange(512, dtype=jnp.float32)[None, :, None, None], (2, 512, 1, 4))
    ck, count = compress_keys(k, jnp.array([100, 512], jnp.int32))
    assert ck.shape == (2, 31, 1, 4)
    assert count.tolist() == [5, 31]       # (100 - 32) // 16 + 1 = 5 full kernels
    np.testing.assert_array_equal(np.asarray(ck[1, :, 0, 0]), 16 * np.arange(31) + 15.5)
    np.testing.assert_array_equal(np.asarray(ck[0, :5, 0, 0]), 16 * np.arange(5) + 15.5)
    assert np.all(np.asarray(ck[0, 5:]) == 0)
    assert num_full_kernels(31) == 0 and num_full_kernels(32) == 1 and num_full_kernels(47) == 1
    assert num_full_kernels(48) == 2


def random_cache(batch, cache_len, heads, dim, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((batch, cache_len, heads, dim), np.float32)).astype(dtype)


def assert_valid_prefix_equal(ck, count, ref_ck, ref_count, atol):
    assert np.asarray(count).tolist() == np.asarray(ref_count).tolist()
    for b, n in enumerate(np.asarray(count)):
        np.testing.assert_allclose(np.asarray(ck[b, :n], np.float32), np.asarray(ref_ck[b, :n], np.float32),
                                   atol=atol, rtol=0)


def test_incremental_compressed_keys_equal_recompute_token_by_token():
    k = random_cache(2, 128, 2, 8, seed=1)
    ck, count = init_compressed_keys(2, 128, 2, 8, jnp.float32)
    lens = np.array([0, 29])                 # rows start at different lengths
    for _ in range(99):
        lens = np.minimum(lens + 1, 128)
        ck, count = update_compressed_keys(ck, count, k, jnp.asarray(lens, jnp.int32))
        ref_ck, ref_count = compress_keys(k, jnp.asarray(lens, jnp.int32))
        assert_valid_prefix_equal(ck, count, ref_ck, ref_count, atol=1e-6)
    assert np.asarray(count).tolist() == [5, 7]   # lengths 99 and 128


def test_incremental_compressed_keys_multi_token_steps_rollback_and_catch_up():
    k = random_cache(2, 256, 1, 16, jnp.bfloat16, seed=2)
    ck, count = init_compressed_keys(2, 256, 1, 16, jnp.bfloat16)
    # Steps of 5 tokens complete at most ceil(5 / 16) = 1 kernel per step.
    for length in range(5, 120, 5):
        lens = jnp.array([length, length + 3], jnp.int32)
        ck, count = update_compressed_keys(ck, count, k, lens, max_new_kernels=1)
        assert_valid_prefix_equal(ck, count, *compress_keys(k, lens), atol=0)
    assert count.tolist() == [6, 6]       # lengths 115 and 118
    # Rollback to 48 tokens (2 full kernels), then overwrite the rolled-back positions and grow again.
    lens = jnp.array([48, 48], jnp.int32)
    ck, count = update_compressed_keys(ck, count, k, lens)
    assert count.tolist() == [2, 2]
    k = k.at[:, 48:].set(random_cache(2, 208, 1, 16, jnp.bfloat16, seed=3))
    # A jump to 240 tokens: 14 full kernels, 12 due; max_new_kernels = 4 computes them over 3 calls.
    lens = jnp.array([240, 240], jnp.int32)
    for expected in (6, 10, 14):
        ck, count = update_compressed_keys(ck, count, k, lens, max_new_kernels=4)
        assert count.tolist() == [expected, expected]
    assert_valid_prefix_equal(ck, count, *compress_keys(k, lens), atol=0)


# ----------------------------------------------------------------------------------------------------------
# An independent oracle: per block, the max over the kernels whose token span overlaps the block.
# ----------------------------------------------------------------------------------------------------------
def oracle_select(q, ck, seq_len, kernel_size, stride, block_size, init_blocks, local_blocks, top_k, num_blocks,
                  extra=None):
    """q [Hkv, G, D], ck [Nc, Hkv, D] numpy float64; one row. Returns [Hkv, top_k] lists."""
    hkv, _, d = q.shape
    n_valid = max(0, (seq_len - kernel_size) // stride + 1)
    q_blk = (seq_len - 1) // block_size
    result = []
    for h in range(hkv):
        logits = q[h] @ ck[:n_valid, h].T / np.sqrt(d)                     # [G, n_valid]
        probs = np.exp(logits - logits.max(axis=1, keepdims=True)) if n_valid else logits
        probs = probs / probs.sum(axis=1, keepdims=True) if n_valid else probs
        kernel_score = probs.sum(axis=0)
        scores = []
        for b in range(num_blocks):
            overlapping = [j for j in range(n_valid)
                           if j * stride < (b + 1) * block_size and j * stride + kernel_size > b * block_size]
            score = max(kernel_score[j] for j in overlapping) if overlapping else -np.inf
            if extra is not None:
                score += extra[h, b]
            if b < init_blocks or q_blk - local_blocks < b <= q_blk:
                score = np.inf
            if b > q_blk:
                score = -np.inf
            scores.append(score)
        ranked = sorted((b for b in range(num_blocks) if scores[b] > -np.inf), key=lambda b: (-scores[b], b))
        chosen = sorted(ranked[:top_k])
        result.append(chosen + [-1] * (top_k - len(chosen)))
    return result


@settings(max_examples=12, deadline=None, derandomize=True)
@given(num_blocks=st.integers(1, 12), stride=st.sampled_from([4, 8]), kernel_mult=st.sampled_from([1, 2, 3]),
       block_mult=st.sampled_from([1, 2, 4]), init_blocks=st.integers(0, 1), local_blocks=st.integers(1, 2),
       extra_slots=st.integers(0, 3), use_extra=st.booleans(), seed=st.integers(0, 2**16))
def test_select_blocks_matches_oracle(num_blocks, stride, kernel_mult, block_mult, init_blocks, local_blocks,
                                      extra_slots, use_extra, seed):
    rng = np.random.default_rng(seed)
    kernel_size, block_size = stride * kernel_mult, stride * block_mult
    cache_len = num_blocks * block_size
    batch, hkv, group, d = 3, 2, 3, 8
    q = rng.standard_normal((batch, hkv, group, d)) * 3
    k = jnp.asarray(rng.standard_normal((batch, cache_len, hkv, d)), jnp.float32)
    # Mostly long rows (many blocks competing for few slots), plus an empty and a random one.
    lens = np.array([cache_len, rng.integers(cache_len // 2, cache_len + 1), rng.integers(0, cache_len + 1)])
    ck, _ = compress_keys(k, jnp.asarray(lens, jnp.int32), kernel_size=kernel_size, kernel_stride=stride)
    extra = rng.standard_normal((batch, hkv, num_blocks)) if use_extra else None
    top_k = init_blocks + local_blocks + extra_slots
    got = select_blocks(jnp.asarray(q, jnp.float32), ck, jnp.asarray(lens, jnp.int32), kernel_size=kernel_size,
                        kernel_stride=stride, block_size=block_size, init_blocks=init_blocks,
                        local_blocks=local_blocks, top_k=top_k, num_blocks=num_blocks,
                        extra_block_scores=None if extra is None else jnp.asarray(extra, jnp.float32))
    ck64 = np.asarray(ck, np.float64)
    for b in range(batch):
        expected = oracle_select(q[b], ck64[b], int(lens[b]), kernel_size, stride, block_size, init_blocks,
                                 local_blocks, top_k, num_blocks, None if extra is None else extra[b])
        assert np.asarray(got[b]).tolist() == expected


def test_selection_drives_sparse_attention():
    """select_blocks output is a valid block_indices; with top_k covering every block, sparse == dense."""
    rng = np.random.default_rng(4)
    q = jnp.asarray(rng.standard_normal((2, 2, 4, 32)), jnp.float32)
    k = random_cache(2, 256, 2, 32, seed=5)
    v = random_cache(2, 256, 2, 32, seed=6)
    lens = jnp.array([256, 130], jnp.int32)
    ck, _ = compress_keys(k, lens)
    idx = select_blocks(q, ck, lens, init_blocks=1, local_blocks=1, top_k=2)
    assert idx[1, 0].tolist()[-1] == 2            # row 1: the query's block (130 // 64 = 2) is selected
    out, lse = sparse_decode_attention(q, k, v, lens, idx, block_size=64)
    ref_out, ref_lse = sparse_decode_attention_reference(q, k, v, lens, idx, block_size=64)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=2e-5, rtol=2e-5)
    idx_all = select_blocks(q, ck, lens, init_blocks=1, local_blocks=1, top_k=4)
    out_all, _ = sparse_decode_attention(q, k, v, lens, idx_all, block_size=64)
    dense_out, _ = decode_attention_reference(q, k, v, lens, block_size=64)
    np.testing.assert_allclose(np.asarray(out_all), np.asarray(dense_out), atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------------------------------------
# Argument validation
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(kernel_stride=12), "kernel_stride"),
    (dict(kernel_size=32, kernel_stride=16, block_size=40), "block_size"),
    (dict(top_k=2, init_blocks=1, local_blocks=2), "top_k"),
    (dict(local_blocks=0), "local_blocks"),
    (dict(init_blocks=-1), "init_blocks"),
    (dict(top_k=4.0), "top_k"),
    (dict(extra_block_scores=jnp.zeros((1, 1, 7))), "extra_block_scores"),
    (dict(extra_block_scores=jnp.zeros((1, 2, 8))), "extra_block_scores"),
    (dict(extra_block_scores=jnp.zeros((1, 1, 8), jnp.int32)), "extra_block_scores"),
    (dict(num_compressed=jnp.zeros((2,), jnp.int32)), "num_compressed"),
])
def test_select_blocks_bad_arguments(kwargs, match):
    q, ck = hand_example()
    kwargs = {"init_blocks": 1, "local_blocks": 2, "top_k": 4, "num_blocks": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        select_blocks(q, ck, jnp.array([500], jnp.int32), **kwargs)


def test_select_blocks_bad_shapes():
    q, ck = hand_example()
    lens = jnp.array([500], jnp.int32)
    with pytest.raises(ValueError, match="compressed_k"):
        select_blocks(q, ck[..., :8], lens, top_k=33)
    with pytest.raises(ValueError, match="q must have shape"):
        select_blocks(q[0], ck, lens, top_k=33)
    with pytest.raises(ValueError, match="seq_lens"):
        select_blocks(q, ck, jnp.array([500.0]), top_k=33)


def test_compressed_keys_bad_arguments():
    k = random_cache(1, 64, 1, 8)
    lens = jnp.array([10], jnp.int32)
    with pytest.raises(ValueError, match="kernel_stride"):
        compress_keys(k, lens, kernel_size=32, kernel_stride=10)
    with pytest.raises(ValueError, match="seq_lens"):
        compress_keys(k, lens.astype(jnp.float32))
    ck, count = init_compressed_keys(1, 64, 1, 8, jnp.float32)
    with pytest.raises(ValueError, match="compressed_k"):
        update_compressed_keys(ck[:, :2], count, k, lens)
    with pytest.raises(ValueError, match="num_compressed"):
        update_compressed_keys(ck, count[None], k, lens)
    with pytest.raises(ValueError, match="max_new_kernels"):
        update_compressed_keys(ck, count, k, lens, max_new_kernels=0)


def test_select_blocks_cache_shorter_than_a_kernel():
    """No compressed key exists yet (S < kernel_size): only the forced blocks are selected."""
    k = random_cache(1, 16, 1, 8)
    ck, count = compress_keys(k, jnp.array([10], jnp.int32))
    assert ck.shape == (1, 0, 1, 8) and count.tolist() == [0]
    q = jnp.ones((1, 1, 2, 8), jnp.float32)
    got = select_blocks(q, ck, jnp.array([10], jnp.int32), block_size=16, init_blocks=1, local_blocks=1, top_k=2,
                        num_blocks=1)
    assert got.tolist() == [[[0, -1]]]
