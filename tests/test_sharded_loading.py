"""Loading straight onto a mesh: `jspec.load(path, mesh=mesh)` equals `jspec.sharding.shard(jspec.load(path), mesh)`
leaf for leaf (values, dtypes, shardings), reads device slices of lazy checkpoint tensors, and holds no whole
checkpoint on the host.

Tests that need several devices run this file as a script in a subprocess with JAX_NUM_CPU_DEVICES=8 (the pytest
process keeps its one device) and check what it prints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
NUM_DEVICES = 8
# divides by 4 (the model axis) and by 3: the 8 heads are then the only axis a 3-device model axis cannot split
BASE = dict(vocab_size=384, hidden_size=64, num_heads=8, num_kv_heads=2, intermediate_size=96, eos_token_ids=(2,))


def run_with_devices(*args: str, timeout: float = 120) -> dict:
    """Run this file as a script with NUM_DEVICES CPU devices; its last stdout line is JSON."""
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(NUM_DEVICES), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"subprocess failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def random_model(config, seed: int = 0):
    """A model with random parameters drawn with numpy (norms near 1), no compiles."""
    import jax
    import jax.numpy as jnp

    import jspec

    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: jspec.models.init_params(config, jax.random.key(0)))
    params = jax.tree.map_with_path(
        lambda path, leaf: jnp.asarray((1.0 if "norm" in jax.tree_util.keystr(path) else 0.0)
                                       + 0.3 * rng.standard_normal(leaf.shape), leaf.dtype), shapes)
    return jspec.Model(params=params, config=config)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """HF directories: float32 with 2 unstacked layers in several safetensors files, and bfloat16 with 5 stacked
    layers (SCAN_MIN_LAYERS), q/k/v biases and tied embeddings."""
    from jspec.checkpoint.hf import save_hf
    from jspec.models.config import TransformerConfig
    from jspec.models.transformer import SCAN_MIN_LAYERS

    root = tmp_path_factory.mktemp("sharded_loading")
    small = TransformerConfig(**BASE, num_layers=2, name="small")
    stacked = TransformerConfig(**BASE, num_layers=SCAN_MIN_LAYERS, qkv_bias=True, tie_embeddings=True,
                                dtype="bfloat16", name="stacked")
    save_hf(random_model(small, 1), root / "small", max_shard_bytes=60_000)
    save_hf(random_model(stacked, 2), root / "stacked")
    assert len(list((root / "small").glob("model-*.safetensors"))) > 1
    return root


def test_lazy_tensor_slices_equal_the_whole_tensor_sliced(tmp_path):
    """Every composition of file read, transpose, stack and cast reads any slice as the whole tensor sliced."""
    import ml_dtypes

    from jspec.checkpoint import lazy, safetensors

    rng = np.random.default_rng(0)
    arrays = {f"t{i}": rng.standard_normal((5, 6, 7)).astype(np.float32) for i in range(3)}
    safetensors.save_file(arrays, tmp_path / "model.safetensors")
    files = safetensors.lazy_checkpoint(tmp_path)
    composed = {
        "file": (files["t0"], arrays["t0"]),
        "transposed": (files["t1"].transpose((2, 0, 1)), arrays["t1"].transpose(2, 0, 1)),
        "cast": (files["t2"].T.astype(ml_dtypes.bfloat16), arrays["t2"].T.astype(ml_dtypes.bfloat16)),
        "stacked": (lazy.stack([files[n].T for n in sorted(files)]).astype(np.float16),
                    np.stack([arrays[n].T for n in sorted(arrays)]).astype(np.float16)),
        "in memory": (lazy.InMemory(arrays["t0"]).T, arrays["t0"].T),
    }
    for label, (tensor, expected) in composed.items():
        assert tensor.shape == expected.shape and tensor.dtype == expected.dtype, label
        assert np.array_equal(tensor.read_all(), expected), label
        for _ in range(30):
            index = []
            for length in expected.shape:
                start, stop = sorted(rng.integers(0, length + 1, 2))
                index.append(slice(int(start), int(stop), int(rng.choice([1, 1, 2]))))
            got = tensor.read(tuple(index))
            assert got.flags.c_contiguous and np.array_equal(got, expected[tuple(index)]), (label, index)
    with pytest.raises(ValueError, match="index: expected at most 3 slices"):
        files["t0"].read((slice(None),) * 4)


def test_rules_without_a_mesh_raise():
    import jspec

    with pytest.raises(jspec.ArgumentError, match="^rules: sharding rules .* need a mesh"):
        jspec.load("demo-code", rules={"vocab": None})


# --- in the subprocess ------------------------------------------------------------------------------------


def compare_loads(cases: list[list]) -> dict:
    """For each [path, dtype, mesh]: load onto the mesh and compare with load + shard, leaf by leaf."""
    import jax

    import jspec
    from jspec import sharding

    out = {}
    for path, dtype, mesh_text in cases:
        mesh = sharding.parse_mesh(mesh_text)
        reference = sharding.shard(jspec.load(path, dtype=dtype), mesh)
        direct = jspec.load(path, dtype=dtype, mesh=mesh)
        plan = sharding.MeshSharding.create(mesh, None, sharding.logical_counts(direct.config))
        assert direct.sharding == plan == reference.sharding, (direct.sharding, reference.sharding)
        assert direct.config == reference.config
        assert jax.tree.structure(direct.params) == jax.tree.structure(reference.params)
        specs, mismatches = {}, []
        for (where, leaf), other in zip(jax.tree.leaves_with_path(direct.params), jax.tree.leaves(reference.params)):
            name = jax.tree_util.keystr(where)
            specs[name] = list(leaf.sharding.spec) + [None] * (leaf.ndim - len(leaf.sharding.spec))
            same = (leaf.dtype == other.dtype and leaf.shape == other.shape and leaf.sharding == other.sharding
                    and all(a.index == b.index and np.array_equal(np.asarray(a.data), np.asarray(b.data))
                            for a, b in zip(leaf.addressable_shards, other.addressable_shards)))
            if not same:
                mismatches.append(name)
        out[f"{Path(path).name}:{dtype}"] = {"specs": specs, "mismatches": mismatches,
                                            "dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(direct.params)}),
                                            "num_devices": len(direct.params["embed"].addressable_shards)}
    return out


def bad_meshes(path: str) -> dict:
    """The ArgumentError messages of loads onto meshes the model cannot use."""
    import jax

    import jspec
    from jspec import sharding

    meshes = {
        "no data/model axes": jax.make_mesh((NUM_DEVICES,), ("x",)),
        "model axis 3": sharding.make_mesh(data=1, model=3, devices=jax.devices()[:3]),
    }
    out = {}
    for label, mesh in meshes.items():
        for source in (path, "random:random-tiny"):  # a safetensors checkpoint; a model built, then sharded
            try:
                jspec.load(source, mesh=mesh)
                out[f"{label} ({source})"] = None
            except jspec.ArgumentError as error:
                out[f"{label} ({source})"] = str(error)
    return out


# --- tests ------------------------------------------------------------------------------------------------


def test_mesh_load_equals_load_then_shard(checkpoints):
    small, stacked = str(checkpoints / "small"), str(checkpoints / "stacked")
    mesh = "data=2,model=4"
    cases = [[small, None, mesh], [small, "bfloat16", mesh], [stacked, None, mesh], [stacked, "float32", mesh],
             ["demo-code", None, "data=4,model=2"]]  # a shipped model (6 heads)
    results = run_with_devices("compare", json.dumps(cases))
    for key, result in results.items():
        assert result["mismatches"] == [], f"{key}: leaves differ from load + shard: {result['mismatches']}"
        assert result["num_devices"] == NUM_DEVICES
    assert results["small:None"]["dtypes"] == ["float32"] and results["small:bfloat16"]["dtypes"] == ["bfloat16"]
    assert results["stacked:None"]["dtypes"] == ["bfloat16"] and results["stacked:float32"]["dtypes"] == ["float32"]

    # the expected placement, written out: heads, MLP and vocabulary over "model"; the 2 KV heads replicated
    # over the 4-device model axis; norms replicated; stacked layers lead with a replicated "layers" axis
    layer = {"q": [None, "model"], "k": [None, None], "v": [None, None], "o": ["model", None],
             "gate": [None, "model"], "up": [None, "model"], "down": ["model", None],
             "attn_norm": [None], "mlp_norm": [None]}
    top = {"['embed']": ["model", None], "['final_norm']": [None]}
    assert results["small:None"]["specs"] == {
        **top, "['lm_head']": [None, "model"],
        **{f"['groups'][0][{i}]['{k}']": v for i in range(2) for k, v in layer.items()}}
    biases = {"q_bias": ["model"], "k_bias": [None], "v_bias": [None]}
    assert results["stacked:None"]["specs"] == {  # tied embeddings: no lm_head
        **top, **{f"['groups'][0]['{k}']": [None, *v] for k, v in {**layer, **biases}.items()}}


def test_bad_mesh_raises_the_sharding_error(checkpoints):
    messages = run_with_devices("bad", str(checkpoints / "small"))
    for source in (str(checkpoints / "small"), "random:random-tiny"):
        assert "mesh: has axes ('x',)" in (messages[f"no data/model axes ({source})"] or "")
    assert "8 attention heads ('q_heads') do not divide over mesh axis model of size 3" in (
        messages[f"model axis 3 ({checkpoints / 'small'})"] or "")
    assert "259 vocabulary entries ('vocab') do not divide over mesh axis model of size 3" in (
        messages["model axis 3 (random:random-tiny)"] or "")


@pytest.mark.slow
def test_mesh_load_peak_memory_stays_below_the_checkpoint(tmp_path):
    """A random ~1 GB float32 checkpoint loaded onto 8 CPU devices (model=8: everything but the norms split).
    On CPU the devices' memory is the process's own, so the peak resident memory includes the loaded parameters
    (`device_bytes`, the checkpoint's size); beyond them the load holds about one parameter's device slices at a
    time (read one parameter at a time), far from a whole checkpoint, which a load then shard holds on top of its
    result (benchmarks/bench_load_memory.py prints both). The bound is a quarter of the checkpoint, not one
    parameter: the host part is the peak resident memory (VmHWM) less the devices' part, which also counts what the
    allocator keeps after freeing; it measured 126 MiB alone and 240 MiB inside the full suite for a 224 MiB
    largest parameter. With a real accelerator the device part is not host memory, and the host part is what
    remains."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_load_memory as bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    sizes = bench.write_random_checkpoint(tmp_path / "checkpoint", size_gb=1.0)
    result = bench.run_mode("mesh", tmp_path / "checkpoint", "data=1,model=8")
    checkpoint = sizes["checkpoint_bytes"]
    mib = {key: value / 2**20 for key, value in {**sizes, **result}.items() if key.endswith("_bytes")}
    figures = (f"checkpoint {mib['checkpoint_bytes']:.0f} MiB, largest parameter {mib['largest_parameter_bytes']:.0f} "
               f"MiB; mesh load: peak {mib['peak_bytes']:.0f} MiB beyond the baseline, of which "
               f"{mib['device_bytes']:.0f} MiB on the devices, {mib['host_bytes']:.0f} MiB on the host; "
               f"{result['seconds']:.1f} s")
    print(figures)
    assert abs(result["device_bytes"] - checkpoint) < 0.01 * checkpoint, figures  # split 8 ways, not replicated
    assert result["host_bytes"] < 0.25 * checkpoint, figures  # far from a whole checkpoint (allocator noise: see above)


if __name__ == "__main__":
    command, argument = sys.argv[1], sys.argv[2]
    if command == "compare":
        print(json.dumps(compare_loads(json.loads(argument))))
    elif command == "bad":
        print(json.dumps(bad_meshes(argument)))
    else:
        raise SystemExit(f"unknown command {command!r}")
