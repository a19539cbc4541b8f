"""MLA (absorbed latent) decode-attention kernel vs its jnp reference (interpret mode on CPU), the reference vs an
independent float64 NumPy reading of the expanded math, decode chains, the one-read latent, lowering, and argument
validation.

Tolerances as in tests/test_pallas_decode_attention.py (kernel vs float32 reference): float32 inputs: out and lse
within 2e-5 abs + 2e-5 rel; bfloat16 inputs: out within 2e-2 abs + 2e-2 rel (bf16 probabilities times the bf16
latent, out rounded to bf16), lse within 1e-4.
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from test_pallas_decode_attention import TOL, assert_close, backend_kwargs, load_benchmark
from test_pallas_sparse_attention import fake_tpu_info  # noqa: F401  (fixture)

from pallas_kernels import mla_decode_attention, mla_decode_attention_reference


def make_inputs(batch, cache_len, num_tokens, num_heads, rank, rope_dim, dtype, seed=0):
    """(q_latent [B, T, H, r], q_rope [B, T, H, Dr], latent [B, S, r], k_rope [B, S, Dr]) standard normal."""
    rng = np.random.default_rng(seed)   # numpy: jax.random would compile a sampler per shape (slow on CPU)
    shapes = ((batch, num_tokens, num_heads, rank), (batch, num_tokens, num_heads, rope_dim),
              (batch, cache_len, rank), (batch, cache_len, rope_dim))
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype) for shape in shapes)


def scale_for(rank, rope_dim):
    # Inputs are standard normal: scale the (r + Dr)-term dot products to O(1) logits so softmax is not one-hot.
    return float((rank + rope_dim) ** -0.5)


def numpy_expanded(q_latent, q_rope, latent, k_rope, seq_lens, scale):
    """Float64 NumPy, written independently of both: keys [c ; k_rope] concatenated, values c, per-token limits."""
    q = np.concatenate([np.asarray(q_latent, np.float64), np.asarray(q_rope, np.float64)], axis=-1)  # [B, T, H, r+Dr]
    k = np.concatenate([np.asarray(latent, np.float64), np.asarray(k_rope, np.float64)], axis=-1)    # [B, S, r+Dr]
    v = np.asarray(latent, np.float64)
    batch, num_tokens, num_heads, rank = q_latent.shape
    out = np.zeros((batch, num_tokens, num_heads, rank))
    lse = np.full((batch, num_tokens, num_heads), -np.inf)
    for b in range(batch):
        for t in range(num_tokens):
            visible = int(seq_lens[b]) - (num_tokens - 1 - t)
            if visible <= 0:
                continue
            scores = q[b, t] @ k[b, :visible].T * scale              # [H, visible]
            top = scores.max(axis=-1, keepdims=True)
            weights = np.exp(scores - top)
            out[b, t] = weights @ v[b, :visible] / weights.sum(axis=-1, keepdims=True)
            lse[b, t] = top[:, 0] + np.log(weights.sum(axis=-1))
    return out, lse


# Ragged lengths: a single slot, a partial last block, a full cache, an empty row.
LENS = [1, 77, 256, 0]

# Each backend meets each dtype, both latent widths (64, 512), both RoPE widths (32, 64), chains and query tiles.
KERNEL_CASES = [
    # backend, heads, rank, rope_dim, tokens, block_size, dtype, query_tile_rows, num_splits
    ("triton", 16, 64, 32, 1, 32, jnp.float32, None, None),
    ("triton", 16, 512, 64, 2, 64, jnp.bfloat16, 16, 3),     # 32 query rows in 2 programs of 16; split-K 3
    ("triton", 8, 512, 64, 1, 32, jnp.float32, None, None),
    ("tpu", 16, 512, 64, 4, 32, jnp.bfloat16, None, None),
    ("tpu", 16, 64, 32, 8, 64, jnp.float32, 32, 2),          # 128 query rows in 4 programs of 32; split-K 2
]


@pytest.mark.parametrize("backend,heads,rank,rope_dim,tokens,block_size,dtype,tile,splits", KERNEL_CASES)
def test_mla_matches_reference(backend, heads, rank, rope_dim, tokens, block_size, dtype, tile, splits):
    q_latent, q_rope, latent, k_rope = make_inputs(4, 256, tokens, heads, rank, rope_dim, dtype, seed=rank + tokens)
    lens = jnp.array(LENS, jnp.int32)
    scale = scale_for(rank, rope_dim)
    out, lse = mla_decode_attention(q_latent, q_rope, latent, k_rope, lens, scale=scale, block_size=block_size,
                                    query_tile_rows=tile, num_splits=splits, **backend_kwargs(backend))
    ref_out, ref_lse = mla_decode_attention_reference(q_latent, q_rope, latent, k_rope, lens, scale=scale)
    assert out.shape == q_latent.shape and lse.shape == q_latent.shape[:-1]
    assert_close(out, lse, ref_out, ref_lse, dtype)
    # The empty row: out = 0, lse = -inf; the full rows' last token sees at least one slot.
    assert np.all(np.asarray(out[3], np.float32) == 0) and np.all(np.isneginf(np.asarray(lse[3])))
    assert np.all(np.isfinite(np.asarray(lse[1:3])))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_reference_equals_expanded_numpy(dtype):
    """The reference is the expanded math (concatenated keys, values = latent), per-token causal limits."""
    q_latent, q_rope, latent, k_rope = make_inputs(4, 64, 3, 4, 32, 16, dtype, seed=1)
    lens = np.array([64, 17, 2, 0], np.int32)      # row 2: token 0 sees nothing, tokens 1, 2 see 1, 2 slots
    out, lse = mla_decode_attention_reference(q_latent, q_rope, latent, k_rope, jnp.asarray(lens), scale=0.2,
                                              block_size=16)
    want_out, want_lse = numpy_expanded(q_latent, q_rope, latent, k_rope, lens, 0.2)
    atol = 1e-5 if dtype == jnp.float32 else TOL[jnp.bfloat16]["out"][0]
    np.testing.assert_allclose(np.asarray(out, np.float64), want_out, atol=atol, rtol=atol)
    np.testing.assert_allclose(np.asarray(lse, np.float64), want_lse, atol=1e-5, rtol=1e-5)


def test_mla_chains_of_one_to_eight_tokens():
    """Chains of T = 1..8 tokens, the last T of one 8-token chain ending at slot 69 of row 0 (so it straddles
    the block boundary at 64 for T >= 6) and at slot 4 of row 1 (its first tokens see no slot): the 8-token chain
    equals the reference; each token of a shorter chain equals the same token in the 8-token chain (it sees the
    same slots); and each token equals a one-token query at its own length seq_len - (T - 1 - t)."""
    q_latent, q_rope, latent, k_rope = make_inputs(2, 128, 8, 16, 64, 32, jnp.float32, seed=11)
    lens = jnp.array([70, 5], jnp.int32)
    scale = scale_for(64, 32)
    out8, lse8 = mla_decode_attention(q_latent, q_rope, latent, k_rope, lens, scale=scale, block_size=32)
    ref_out, ref_lse = mla_decode_attention_reference(q_latent, q_rope, latent, k_rope, lens, scale=scale)
    assert_close(out8, lse8, ref_out, ref_lse, jnp.float32)
    for tokens in range(1, 8):
        out, lse = mla_decode_attention(q_latent[:, 8 - tokens:], q_rope[:, 8 - tokens:], latent, k_rope, lens,
                                        scale=scale, block_size=32)
        assert_close(out, lse, out8[:, 8 - tokens:], lse8[:, 8 - tokens:], jnp.float32)
    for index in range(8):   # token `index` of the 8-token chain sees seq_len - (7 - index) slots
        one, _ = mla_decode_attention_reference(q_latent[:, index:index + 1], q_rope[:, index:index + 1], latent,
                                                k_rope, jnp.maximum(lens - (7 - index), 0), scale=scale)
        np.testing.assert_allclose(np.asarray(out8[:, index]), np.asarray(one[:, 0]), atol=2e-5)
    assert np.all(np.isneginf(np.asarray(lse8[1, :3])))   # row 1 (seq_len 5): tokens 0..2 see no slot


def test_mla_tpu_interpret_mode():
    """The TPU form under TPU interpret mode (simulated SMEM scalar prefetch, VMEM scratch, DMAs)."""
    q_latent, q_rope, latent, k_rope = make_inputs(2, 128, 2, 16, 512, 64, jnp.bfloat16, seed=7)
    lens = jnp.array([50, 128], jnp.int32)
    out, lse = mla_decode_attention(q_latent, q_rope, latent, k_rope, lens, scale=0.05, block_size=32,
                                    interpret=pltpu.InterpretParams())
    ref_out, ref_lse = mla_decode_attention_reference(q_latent, q_rope, latent, k_rope, lens, scale=0.05)
    assert_close(out, lse, ref_out, ref_lse, jnp.bfloat16)


def test_mla_under_jit_and_rope_part_matters():
    """Under jit; and the comparison can fail: dropping the RoPE part, or the length limit, changes the output."""
    q_latent, q_rope, latent, k_rope = make_inputs(2, 64, 1, 16, 64, 32, jnp.float32, seed=8)
    lens = jnp.array([40, 7], jnp.int32)
    out, lse = jax.jit(lambda *a: mla_decode_attention(*a, scale=0.1, block_size=16))(
        q_latent, q_rope, latent, k_rope, lens)
    ref_out, ref_lse = mla_decode_attention_reference(q_latent, q_rope, latent, k_rope, lens, scale=0.1)
    assert_close(out, lse, ref_out, ref_lse, jnp.float32)
    no_rope, _ = mla_decode_attention_reference(q_latent, q_rope, latent, jnp.zeros_like(k_rope), lens, scale=0.1)
    assert np.abs(np.asarray(no_rope) - np.asarray(out)).max() > 1e-2
    longer, _ = mla_decode_attention_reference(q_latent, q_rope, latent, k_rope, lens + 1, scale=0.1)
    assert np.abs(np.asarray(longer) - np.asarray(out)).max() > 1e-3


@pytest.mark.parametrize("backend", ["triton", "tpu"])
def test_mla_latent_is_one_operand(backend):
    """The latent enters the kernel once (keys' first part and values alias it): no K/V copy, no concatenation."""
    batch, cache_len, rank, rope_dim = 2, 64, 64, 32
    args = make_inputs(batch, cache_len, 2, 16, rank, rope_dim, jnp.float32)
    lens = jnp.array([40, 7], jnp.int32)
    jaxpr = jax.make_jaxpr(lambda *a: mla_decode_attention(*a, scale=0.1, block_size=16, backend=backend,
                                                           interpret=True))(*args, lens)

    def equations(jaxpr):
        for eqn in jaxpr.eqns:
            yield eqn
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from equations(sub)

    eqns = list(equations(jaxpr.jaxpr))
    calls = [e for e in eqns if e.primitive.name == "pallas_call"]
    assert len(calls) == 1
    cache_operands = [tuple(v.aval.shape) for v in calls[0].invars if tuple(v.aval.shape[:2]) == (batch, cache_len)]
    assert cache_operands == [(batch, cache_len, rank), (batch, cache_len, rope_dim)]
    assert not any(e.primitive.name == "concatenate" for e in eqns)


# ----------------------------------------------------------------------------------------------------------
# Lowering for the accelerators (no device needed: Pallas -> Triton IR / Mosaic MLIR only; the Triton and Mosaic
# compilers run only on a GPU / TPU, so this does not prove they accept the code). DeepSeek-V3 widths.
# ----------------------------------------------------------------------------------------------------------
def lower_mla(platform, backend, num_splits):
    args = (jnp.zeros((2, 2, 16, 512), jnp.bfloat16), jnp.zeros((2, 2, 16, 64), jnp.bfloat16),
            jnp.zeros((2, 256, 512), jnp.bfloat16), jnp.zeros((2, 256, 64), jnp.bfloat16), jnp.zeros((2,), jnp.int32))
    from pallas_kernels.mla_decode_attention import _mla_kernel_jit
    return _mla_kernel_jit.trace(*args, scale=0.1, block_size=64, interpret=False, backend=backend,
                                 num_splits=num_splits, query_tile_rows=16, num_warps=None,
                                 num_stages=None).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("num_splits", [1, 4])
def test_mla_lowers_to_triton(num_splits):
    assert "__gpu$xla.gpu.triton" in lower_mla("cuda", "triton", num_splits)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_mla_lowers_to_mosaic_tpu(fake_tpu_info, num_splits):  # noqa: F811
    assert "tpu_custom_call" in lower_mla("tpu", "tpu", num_splits)


def test_gpu_launch_defaults():
    """On GPU (compiled Triton) the H * T query rows go 16 per program for r = 512 and the splits fill ~128
    programs; TPU and interpret mode keep one tile and one split."""
    from pallas_kernels.sparse_decode_attention import resolve_launch
    common = dict(batch=1, num_kv_heads=1, rows=128, head_dim=512, max_entries=512, num_splits=None,
                  query_tile_rows=None)
    assert resolve_launch("triton", False, **common) == (16, 16)          # 8 tiles x 16 splits = 128 programs
    assert resolve_launch("triton", False, **dict(common, head_dim=64)) == (128, 128)   # one tile, 128 splits
    assert resolve_launch("triton", True, **common) == (1, 128)
    assert resolve_launch("tpu", False, **common) == (1, 128)
    assert resolve_launch("triton", False, **dict(common, query_tile_rows=512)) == (128, 128)  # clamped: one tile


# ----------------------------------------------------------------------------------------------------------
# Argument validation
# ----------------------------------------------------------------------------------------------------------
def good_args():
    return (*make_inputs(2, 128, 2, 4, 64, 32, jnp.float32), jnp.array([5, 128], jnp.int32))


BAD_ARGUMENTS = [  # mutate (ql, qr, c, kr, lens), kwargs, message
    (lambda ql, qr, c, kr, l: (ql, qr, c, kr, l), dict(block_size=48), "block_size"),
    (lambda ql, qr, c, kr, l: (ql, qr, c, kr, l), dict(block_size=256), "block_size"),
    (lambda ql, qr, c, kr, l: (ql, qr, c[:, :96], kr[:, :96], l), dict(block_size=64), "block_size"),
    (lambda ql, qr, c, kr, l: (ql, qr, c[:, None], kr, l), {}, "latent must have shape"),
    (lambda ql, qr, c, kr, l: (ql, qr, c, kr[:, :64], l), {}, "k_rope must have shape"),
    (lambda ql, qr, c, kr, l: (ql[..., :32], qr, c, kr, l), {}, "q_latent must have shape"),
    (lambda ql, qr, c, kr, l: (ql[0], qr, c, kr, l), {}, "q_latent must have shape"),
    (lambda ql, qr, c, kr, l: (ql, qr[:, :, :2], c, kr, l), {}, "q_rope must have shape"),
    (lambda ql, qr, c, kr, l: (ql, qr[..., :16], c, kr, l), {}, "q_rope must have shape"),
    (lambda ql, qr, c, kr, l: (ql, qr, c.astype(jnp.bfloat16), kr, l), {}, "share one dtype"),
    (lambda ql, qr, c, kr, l: (ql, qr, c, kr.astype(jnp.int32), l), {}, "k_rope must have dtype"),
    (lambda ql, qr, c, kr, l: (ql, qr, c, kr, l.astype(jnp.float32)), {}, "seq_lens"),
    (lambda ql, qr, c, kr, l: (ql, qr, c, kr, l[:1]), {}, "seq_lens"),
    (lambda ql, qr, c, kr, l: (ql, qr, c, kr, jnp.array([5, 129], jnp.int32)), {}, "seq_lens"),
    (lambda ql, qr, c, kr, l: (ql, qr, c, kr, l), dict(scale=None), "scale"),
    (lambda ql, qr, c, kr, l: (ql, qr, c, kr, l), dict(scale="0.1"), "scale"),
    (lambda ql, qr, c, kr, l: (ql, qr, c, kr, l), dict(interpret="yes"), "interpret"),
    (lambda ql, qr, c, kr, l: (ql, qr, c, kr, l), dict(backend="cuda"), "backend"),
    (lambda ql, qr, c, kr, l: (ql, qr, c, kr, l), dict(num_splits=0), "num_splits"),
    (lambda ql, qr, c, kr, l: (ql, qr, c, kr, l), dict(query_tile_rows=24), "query_tile_rows"),
    (lambda ql, qr, c, kr, l: (ql, qr, c, kr, l), dict(query_tile_rows=8), "query_tile_rows"),
]
KERNEL_ONLY = ("interpret", "backend", "num_splits", "query_tile_rows")   # ignored by the reference
CASES = [(fn, *case) for fn in (mla_decode_attention, mla_decode_attention_reference) for case in BAD_ARGUMENTS
         if fn is mla_decode_attention or not any(key in case[1] for key in KERNEL_ONLY)]


@pytest.mark.parametrize("fn,mutate,kwargs,match", CASES)
def test_mla_bad_arguments(fn, mutate, kwargs, match):
    args = mutate(*good_args())
    kwargs = {"block_size": 32, "scale": 0.1, **kwargs}
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)


def test_mla_triton_width_rules():
    """Triton needs power-of-two widths >= 16: a 48-wide latent is refused there, accepted by the TPU form."""
    q_latent, q_rope, latent, k_rope = make_inputs(1, 64, 1, 4, 48, 16, jnp.float32)
    lens = jnp.array([10], jnp.int32)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        mla_decode_attention(q_latent, q_rope, latent, k_rope, lens, scale=0.1, block_size=32, backend="triton")
    out, lse = mla_decode_attention(q_latent, q_rope, latent, k_rope, lens, scale=0.1, block_size=32, **backend_kwargs("tpu"))
    ref_out, ref_lse = mla_decode_attention_reference(q_latent, q_rope, latent, k_rope, lens, scale=0.1)
    assert_close(out, lse, ref_out, ref_lse, jnp.float32)


def test_benchmark_quick_mode(tmp_path):
    """benchmarks/bench_mla_attention.py --quick runs end to end on CPU (interpret mode) and writes JSON."""
    import json

    bench = load_benchmark("bench_mla_attention")
    out = tmp_path / "quick.json"
    bench.main(["--quick", "--contexts", "128", "--batches", "2", "--rounds", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert {r["method"] for r in result["records"]} == {"xla_reference", "xla_native", "pallas_mla"}
    assert all(r["max_abs_err_vs_reference"] < 2e-2 for r in result["records"])
    v3 = result["kv_bytes_per_token"]["deepseek_v3"]
    assert v3["mla_bytes"] == (512 + 64) * 2 and v3["mha_bytes"] == 128 * (128 + 64 + 128) * 2
