"""Peak host memory of loading a safetensors checkpoint: whole (`jspec.load(path)`), whole then sharded
(`jspec.sharding.shard(jspec.load(path), mesh)`), and straight onto the mesh (`jspec.load(path, mesh=mesh)`).

Writes a random Hugging Face checkpoint of about --size-gb (random numpy written straight into safetensors),
then loads it in one fresh process per mode, each with JAX_NUM_CPU_DEVICES simulated CPU devices, and prints a
table (and JSON with --json):

    peak       the process's peak resident memory during the load, beyond its resident memory just before
    devices    bytes the loaded parameters occupy on this process's devices (on CPU devices that memory is
               the process's own, so it is part of `peak`: every replica counts)
    host       peak - devices: what the load held on the host beyond its result

A load straight onto the mesh holds at most one tensor's device slices at a time beyond its result, so its
`host` stays near the largest (stacked) parameter, where a whole load holds the checkpoint.

    python benchmarks/bench_load_memory.py                      # 1 GB float32, mesh data=1,model=8
    python benchmarks/bench_load_memory.py --modes mesh --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("plain", "plain+shard", "mesh")
NUM_DEVICES = 8


def checkpoint_config(size_gb: float, dtype: str):
    """A Llama config of about `size_gb` GB in `dtype` whose sharded axes all divide 8 (KV heads too, so only
    the norms are replicated); its layers (>= SCAN_MIN_LAYERS) are stacked."""
    import numpy as np

    from jspec.models.config import TransformerConfig

    hidden, mlp, vocab = 1024, 4096, 16384
    itemsize = 4 if dtype == "float32" else 2
    per_layer = (4 * hidden * hidden + 3 * hidden * mlp + 2 * hidden) * itemsize
    layers = max(5, round((size_gb * 1024**3 - 2 * vocab * hidden * itemsize) / per_layer))
    return TransformerConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=8, num_kv_heads=8,
                             intermediate_size=mlp, dtype=dtype, name="random-load-memory")


def write_random_checkpoint(directory: Path, size_gb: float = 1.0, dtype: str = "float32", seed: int = 0) -> dict:
    """A random HF directory (config.json + safetensors) of about `size_gb` GB. Returns its sizes in bytes (the
    largest parameter: a stacked one, [layers, ...])."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jspec.checkpoint import safetensors
    from jspec.checkpoint.hf import config_to_hf, tensor_shapes
    from jspec.models import transformer

    config = checkpoint_config(size_gb, dtype)
    rng = np.random.default_rng(seed)
    tensors = {name: (rng.random(shape, np.float32) - 0.5).astype(jnp.dtype(dtype))
               for name, shape in tensor_shapes(config).items()}
    directory.mkdir(parents=True, exist_ok=True)
    safetensors.save_checkpoint(tensors, directory, metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config_to_hf(config), indent=2, sort_keys=True) + "\n")
    parameters = jax.eval_shape(lambda: transformer.init_params(config, jax.random.key(0)))
    return {"checkpoint_bytes": sum(t.nbytes for t in tensors.values()),
            "largest_tensor_bytes": max(t.nbytes for t in tensors.values()),
            "largest_parameter_bytes": max(p.size * p.dtype.itemsize for p in jax.tree.leaves(parameters)),
            "num_layers": config.num_layers}


def _status(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(mode: str, directory: str, mesh_text: str) -> dict:
    """Run in a fresh process: the peak resident memory of one load, beyond the resident memory before it."""
    import jax

    import jspec
    from jspec import sharding

    mesh = sharding.parse_mesh(mesh_text)
    jax.block_until_ready(jax.numpy.zeros(8))  # the backend and its devices up before the baseline
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident memory (Linux >= 4.0)
    baseline = _status("VmRSS")
    start = time.perf_counter()
    if mode == "plain":
        model = jspec.load(directory)
    elif mode == "plain+shard":
        model = sharding.shard(jspec.load(directory), mesh)
    else:
        model = jspec.load(directory, mesh=mesh)
    jax.block_until_ready(model.params)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM") - baseline
    devices = sum(shard.data.nbytes for leaf in jax.tree.leaves(model.params) for shard in leaf.addressable_shards)
    return {"mode": mode, "mesh": mesh_text, "baseline_bytes": baseline, "peak_bytes": peak, "device_bytes": devices,
            "host_bytes": peak - devices, "seconds": seconds}


def run_mode(mode: str, directory: Path, mesh_text: str, num_devices: int = NUM_DEVICES) -> dict:
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(num_devices), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, __file__, "--worker", mode, str(directory), mesh_text], env=env,
                            capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"{mode} load failed:\n{result.stdout}\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--mesh", default="data=1,model=8")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--dir", help="where to write the checkpoint (default: a temporary directory)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--worker", nargs=3, metavar=("MODE", "DIR", "MESH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(*args.worker)))
        return {}
    modes = [m for m in args.modes.split(",") if m]
    if not set(modes) <= set(MODES):
        parser.error(f"--modes: expected some of {MODES}, got {modes}")
    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(args.dir or temporary) / "checkpoint"
        sizes = write_random_checkpoint(directory, args.size_gb, args.dtype)
        rows = [run_mode(mode, directory, args.mesh) for mode in modes]
    report = {**sizes, "dtype": args.dtype, "results": rows}
    gib = 1024**3
    print(f"checkpoint {sizes['checkpoint_bytes'] / gib:.3f} GiB ({args.dtype}, {sizes['num_layers']} layers), "
          f"largest tensor {sizes['largest_tensor_bytes'] / gib:.3f} GiB (parameter, stacked: "
          f"{sizes['largest_parameter_bytes'] / gib:.3f} GiB), {NUM_DEVICES} CPU devices, mesh {args.mesh}")
    print(f"{'mode':<12} {'peak GiB':>9} {'devices GiB':>12} {'host GiB':>9} {'seconds':>8}")
    for row in rows:
        print(f"{row['mode']:<12} {row['peak_bytes'] / gib:9.3f} {row['device_bytes'] / gib:12.3f} "
              f"{row['host_bytes'] / gib:9.3f} {row['seconds']:8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
