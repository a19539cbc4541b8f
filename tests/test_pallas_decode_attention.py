"""Dense decode-attention kernel vs its jnp reference (interpret mode on CPU), and argument validation.

Tolerances (kernel vs float32 reference): float32 inputs: out and lse within 2e-5 (abs) + 2e-5 (rel); bfloat16
inputs: out within 2e-2 abs + 2e-2 rel (the kernel multiplies bf16-rounded probabilities with V, and out is
rounded to bf16), lse within 1e-4 (computed from exact bf16 products in float32).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import decode_attention, decode_attention_reference

TOL = {jnp.float32: dict(out=(2e-5, 2e-5), lse=(2e-5, 2e-5)), jnp.bfloat16: dict(out=(2e-2, 2e-2), lse=(1e-4, 1e-4))}


def backend_kwargs(backend):
    """Compiled where the form is native (Triton on GPU, Mosaic on TPU), interpreted elsewhere (and on CPU).

    So the same tests check the interpreted kernels on CPU and the compiled ones on an accelerator.
    """
    native = {"gpu": "triton", "tpu": "tpu"}.get(jax.default_backend())
    return dict(backend=backend, interpret=None if backend == native else True)


def make_inputs(batch, cache_len, num_kv_heads, group, head_dim, dtype, seed=0, num_tokens=None):
    rng = np.random.default_rng(seed)   # numpy: jax.random would compile a sampler per shape (slow on CPU)
    q_shape = (batch, num_kv_heads, group, head_dim)
    if num_tokens is not None:
        q_shape = (batch, num_kv_heads, num_tokens, group, head_dim)
    kv_shape = (batch, cache_len, num_kv_heads, head_dim)
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)
                 for shape in (q_shape, kv_shape, kv_shape))


def assert_close(out, lse, ref_out, ref_lse, dtype):
    tol = TOL[dtype]
    assert out.dtype == ref_out.dtype == jnp.dtype(dtype)
    assert lse.dtype == ref_lse.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32),
                               atol=tol["out"][0], rtol=tol["out"][1])
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=tol["lse"][0], rtol=tol["lse"][1])


# Ragged lengths: a single token, a partial last block, a full cache, an empty row.
LENS = [1, 77, 256, 0]


# Each backend meets each dtype and each GQA ratio G (1, 4, 8) without the full product (compiles are slow).
KERNEL_CASES = [
    # backend, head_dim, block_size, dtype, group
    ("triton", 64, 32, jnp.float32, 1),
    ("triton", 64, 32, jnp.bfloat16, 4),
    ("triton", 32, 64, jnp.float32, 8),
    ("tpu", 128, 64, jnp.bfloat16, 1),
    ("tpu", 128, 32, jnp.float32, 4),
    ("tpu", 128, 64, jnp.bfloat16, 8),
]


@pytest.mark.parametrize("backend,head_dim,block_size,dtype,group", KERNEL_CASES)
def test_dense_matches_reference(backend, head_dim, block_size, dtype, group):
    q, k, v = make_inputs(4, 256, 2, group, head_dim, dtype, seed=group)
    lens = jnp.array(LENS, jnp.int32)
    out, lse = decode_attention(q, k, v, lens, block_size=block_size, **backend_kwargs(backend))
    ref_out, ref_lse = decode_attention_reference(q, k, v, lens, block_size=block_size)
    assert out.shape == q.shape and lse.shape == q.shape[:-1]
    assert_close(out, lse, ref_out, ref_lse, dtype)
    # The empty row: out = 0, lse = -inf (kernel and reference).
    assert np.all(np.asarray(out[3], np.float32) == 0) and np.all(np.isneginf(np.asarray(lse[3])))
    assert np.all(np.isneginf(np.asarray(ref_lse[3])))
    assert np.all(np.isfinite(np.asarray(lse[:3])))


@pytest.mark.parametrize("backend,head_dim,num_splits", [("triton", 32, 3), ("tpu", 128, 2)])
def test_dense_split_k_matches_reference(backend, head_dim, num_splits):
    q, k, v = make_inputs(3, 256, 2, 4, head_dim, jnp.float32, seed=3)
    lens = jnp.array([33, 256, 0], jnp.int32)
    out, lse = decode_attention(q, k, v, lens, block_size=32, **backend_kwargs(backend), num_splits=num_splits)
    ref_out, ref_lse = decode_attention_reference(q, k, v, lens)
    assert_close(out, lse, ref_out, ref_lse, jnp.float32)


@pytest.mark.parametrize("backend,head_dim", [("triton", 32), ("tpu", 128)])
def test_dense_multi_token_causal(backend, head_dim):
    """T = 3 query tokens at positions seq_len-3 .. seq_len-1: each sees one more key than the previous."""
    q, k, v = make_inputs(2, 128, 2, 4, head_dim, jnp.float32, seed=5, num_tokens=3)
    lens = jnp.array([65, 3], jnp.int32)   # 65: the tokens straddle a block boundary (62, 63 | 64)
    out, lse = decode_attention(q, k, v, lens, block_size=32, **backend_kwargs(backend))
    ref_out, ref_lse = decode_attention_reference(q, k, v, lens)
    assert out.shape == q.shape and lse.shape == q.shape[:-1]
    assert_close(out, lse, ref_out, ref_lse, jnp.float32)
    # Token t of row 1 (seq_len 3) sees exactly t + 1 keys: check the first against a one-key softmax.
    np.testing.assert_allclose(np.asarray(out[1, :, 0]), np.broadcast_to(np.asarray(v[1, 0])[:, None, :],
                               out[1, :, 0].shape), atol=1e-6)


def test_reference_is_not_trivially_equal():
    """The comparison above can fail: a kernel ignoring seq_len differs from the reference."""
    q, k, v = make_inputs(1, 64, 1, 4, 32, jnp.float32)
    ref_short, _ = decode_attention_reference(q, k, v, jnp.array([40], jnp.int32), block_size=32)
    out_full, _ = decode_attention(q, k, v, jnp.array([64], jnp.int32), block_size=32)
    assert np.abs(np.asarray(out_full) - np.asarray(ref_short)).max() > 1e-2


def test_dense_tpu_interpret_mode():
    """The TPU form under TPU interpret mode (simulated SMEM scalar prefetch, VMEM scratch, DMAs)."""
    q, k, v = make_inputs(2, 128, 2, 4, 128, jnp.bfloat16, seed=7)
    lens = jnp.array([50, 128], jnp.int32)
    out, lse = decode_attention(q, k, v, lens, block_size=32, interpret=pltpu.InterpretParams())
    ref_out, ref_lse = decode_attention_reference(q, k, v, lens)
    assert_close(out, lse, ref_out, ref_lse, jnp.bfloat16)


def test_dense_under_jit():
    q, k, v = make_inputs(2, 128, 2, 4, 32, jnp.float32, seed=8)
    lens = jnp.array([100, 7], jnp.int32)
    out, lse = jax.jit(lambda *a: decode_attention(*a, block_size=32))(q, k, v, lens)
    ref_out, ref_lse = decode_attention_reference(q, k, v, lens)
    assert_close(out, lse, ref_out, ref_lse, jnp.float32)


# ----------------------------------------------------------------------------------------------------------
# Argument validation
# ----------------------------------------------------------------------------------------------------------
def good_args():
    q, k, v = make_inputs(2, 128, 2, 4, 32, jnp.float32)
    return q, k, v, jnp.array([5, 128], jnp.int32)


BAD_ARGUMENTS = [
    (lambda q, k, v, l: (q, k, v, l), dict(block_size=48), "block_size"),
    (lambda q, k, v, l: (q, k, v, l), dict(block_size=8), "block_size"),
    (lambda q, k, v, l: (q, k, v, l), dict(block_size=256), "block_size"),
    (lambda q, k, v, l: (q, k[:, :96], v[:, :96], l), dict(block_size=64), "block_size"),
    (lambda q, k, v, l: (q[:, :1], k, v, l), {}, "Hkv"),
    (lambda q, k, v, l: (q[..., :16], k, v, l), {}, "head dim"),
    (lambda q, k, v, l: (q[0], k, v, l), {}, "q must have shape"),
    (lambda q, k, v, l: (q, k, v[:, :64], l), {}, "v must have the shape"),
    (lambda q, k, v, l: (q, k[..., 0], v, l), {}, "k must have shape"),
    (lambda q, k, v, l: (q[:1], k, v, l), {}, "batch"),
    (lambda q, k, v, l: (q.astype(jnp.bfloat16), k, v, l), {}, "dtype"),
    (lambda q, k, v, l: (q.astype(jnp.int32), k, v, l), {}, "q must have dtype"),
    (lambda q, k, v, l: (q, k, v, l.astype(jnp.float32)), {}, "seq_lens"),
    (lambda q, k, v, l: (q, k, v, l[:1]), {}, "seq_lens"),
    (lambda q, k, v, l: (q, k, v, jnp.array([5, 129], jnp.int32)), {}, "seq_lens"),
    (lambda q, k, v, l: (q, k, v, jnp.array([-1, 3], jnp.int32)), {}, "seq_lens"),
    (lambda q, k, v, l: (q, k, v, l), dict(interpret="yes"), "interpret"),
    (lambda q, k, v, l: (q, k, v, l), dict(backend="cuda"), "backend"),
    (lambda q, k, v, l: (q, k, v, l), dict(backend="triton", interpret=pltpu.InterpretParams()), "backend"),
    (lambda q, k, v, l: (q, k, v, l), dict(backend="tpu", interpret=True), "multiple of 128"),
    (lambda q, k, v, l: (q, k, v, l), dict(num_splits=0), "num_splits"),
    (lambda q, k, v, l: (q, k, v, l), dict(sm_scale="x"), "sm_scale"),
    (lambda q, k, v, l: (q, k, v, l), dict(sliding_window=0), "sliding_window"),
]
KERNEL_ONLY = ("interpret", "backend", "num_splits")   # ignored by the reference
CASES = [(fn, *case) for fn in (decode_attention, decode_attention_reference) for case in BAD_ARGUMENTS
         if fn is decode_attention or not any(key in case[1] for key in KERNEL_ONLY)]


@pytest.mark.parametrize("fn,mutate,kwargs,match", CASES)
def test_dense_bad_arguments(fn, mutate, kwargs, match):
    args = mutate(*good_args())
    kwargs = {"block_size": 32, **kwargs}
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)


def test_dense_head_dim_rules():
    # 24 bf16 elements = 48 bytes: allowed by the 16-byte rule, but Triton needs a power of two.
    q, k, v = make_inputs(1, 64, 1, 2, 24, jnp.bfloat16)
    lens = jnp.array([10], jnp.int32)
    with pytest.raises(ValueError, match="power of two"):
        decode_attention(q, k, v, lens, block_size=32, backend="triton")
    # 12 bf16 elements = 24 bytes: not a multiple of 16 bytes.
    q, k, v = make_inputs(1, 64, 1, 2, 12, jnp.bfloat16)
    with pytest.raises(ValueError, match="16 bytes"):
        decode_attention(q, k, v, lens, block_size=32)


def load_benchmark(name: str):
    """The module benchmarks/<name>.py (the scripts are not a package)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_smoke_mode(tmp_path):
    """benchmarks/bench_decode_attention.py --smoke runs end to end on CPU (interpret mode) and writes JSON."""
    import json

    bench = load_benchmark("bench_decode_attention")
    out = tmp_path / "smoke.json"
    bench.main(["--smoke", "--batches", "1", "--runs", "1", "--out", str(out)])
    records = json.loads(out.read_text())["records"]
    assert {r["method"] for r in records} == {"xla_dense", "pallas_dense", "pallas_sparse"}
    assert all(r["max_abs_err_vs_reference"] < 2e-2 for r in records)
    assert bench.detect_peak_tbps("NVIDIA H100 80GB HBM3") == 3.35
    assert bench.detect_peak_tbps("NVIDIA H200") == 4.8


@pytest.mark.parametrize("backend,head_dim,num_tokens", [("triton", 32, None), ("tpu", 128, None), ("triton", 32, 2)])
def test_dense_sliding_window(backend, head_dim, num_tokens):
    """Window 33, block 32: row 0 (seq_len 64) sees keys 31..63, so block 0 (key 31) must still be read."""
    q, k, v = make_inputs(4, 256, 2, 4, head_dim, jnp.float32, seed=9, num_tokens=num_tokens)
    lens = jnp.array([64, 100, 2, 256], jnp.int32)
    out, lse = decode_attention(q, k, v, lens, block_size=32, sliding_window=33, num_splits=2,
                                **backend_kwargs(backend))
    ref_out, ref_lse = decode_attention_reference(q, k, v, lens, block_size=32, sliding_window=33)
    assert_close(out, lse, ref_out, ref_lse, jnp.float32)
    # The window changes the result (the test can fail): compare with full causal attention.
    full_out, _ = decode_attention_reference(q, k, v, lens, block_size=32)
    assert np.abs(np.asarray(full_out[0]) - np.asarray(ref_out[0])).max() > 1e-3


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="compiling is refused only on CPU")
def test_compiling_on_cpu_is_refused():
    q, k, v, lens = good_args()
    with pytest.raises(ValueError, match="interpret"):
        decode_attention(q, k, v, lens, block_size=32, interpret=False)
