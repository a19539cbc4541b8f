"""Decoding on a mesh: every strategy on 8 simulated CPU devices (the mesh data x model = 2x4; the core families
also on 1x8 and 8x1: tests/mesh_checks.py CORE_CASES) equals one device token for token; parameters and caches
carry the rules' shardings; the compiled loop never all-gathers a cache-sized operand; bad meshes and batches are
refused naming the numbers.

The checks run in one subprocess (tests/mesh_checks.py) with JAX_NUM_CPU_DEVICES=8, so this process keeps its
single device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def run_checks(*names: str, devices: int = 8, timeout: int = 900) -> dict:
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), PYTHONPATH=str(TESTS.parent))
    done = subprocess.run([sys.executable, str(TESTS / "mesh_checks.py"), *names], env=env, capture_output=True,
                          text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    assert done.returncode == 0 and lines, f"mesh checks failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
    results = json.loads(lines[-1][len("RESULTS "):])
    for name in names:
        assert "error" not in results[name], results[name].get("error")
    return results


@pytest.fixture(scope="module")
def mesh_results() -> dict:
    return run_checks("strategies", "layout", "errors")


def test_every_strategy_on_every_mesh_equals_one_device(mesh_results):
    results = mesh_results["strategies"]
    assert len(results) >= 15
    for case, row in results.items():
        meshes = {mesh: got for mesh, got in row.items() if mesh != "reference"}
        assert meshes, case
        for mesh, got in meshes.items():
            assert got == row["reference"], f"{case} on mesh {mesh}: {got} != one device {row['reference']}"
    for case in ("greedy", "sample", "speculative-chain", "speculative-tree", "dllm-static", "block-diffusion"):
        assert {"1x8", "2x4", "8x1"} <= set(results[case]), case  # the core families on every mesh


def test_rows_finish_early_and_ragged(mesh_results):
    """The batch is ragged and stop tokens end rows at different steps, so the equality above covers rows that
    finish while others run."""
    for case in ("greedy", "speculative-chain", "speculative-tree", "sample"):
        reference = mesh_results["strategies"][case]["reference"]
        assert 1 in reference["finish"], (case, reference)  # FinishReason.EOS
        assert len(set(reference["lengths"])) > 1, (case, reference)


def test_parameter_and_cache_shardings(mesh_results):
    layout = mesh_results["layout"]
    params = layout["params"]
    assert params["embed"] == "P('model', None)" and params["lm_head"] == "P(None, 'model')"
    layer = "groups/0/0/"
    assert params[layer + "q"] == "P(None, 'model')" and params[layer + "o"] == "P('model', None)"
    assert params[layer + "gate"] == "P(None, 'model')" and params[layer + "down"] == "P('model', None)"
    # 2 KV heads on a model axis of 4: K/V projections and the KV cache replicated over "model"
    assert params[layer + "k"] == "P(None, None)" and params[layer + "v"] == "P(None, None)"
    assert params[layer + "attn_norm"] == "P(None,)"
    assert layout["cache"][:-1] == ["P(None, 'data')"] * (len(layout["cache"]) - 1)
    assert layout["cache"][-1] == "P('data',)"  # lengths
    # 8 KV heads: the cache splits its KV-head axis over "model"
    assert layout["mha_cache"][0] == "P(None, 'data', None, 'model')"


def test_compiled_loop_never_all_gathers_the_cache(mesh_results):
    for case, found in mesh_results["layout"]["gathers"].items():
        capacity, head_dim = found["capacity"], found["head_dim"]
        cache_like = [shape for shape in found["shapes"] if capacity in shape and head_dim in shape]
        assert not cache_like, f"{case}: all-gathers of cache-shaped operands {cache_like} (cache leaf {found['cache_leaf']})"


@pytest.mark.parametrize(
    "case, expected",
    [
        ("axes", "mesh: has axes ('x', 'y'), but the sharding rules map 'batch' to 'data'"),
        ("heads", "6 attention heads ('q_heads') do not divide over mesh axis model of size 4"),
        ("batch", "3 rows do not divide over the mesh's batch axis of size 2"),
        ("other-mesh", "the model is sharded on the mesh {data: 2, model: 4}"),
        ("make-mesh", "data=3 x model=2 = 6 devices, but there are 8 devices"),
        ("mesh-type", "mesh: expected a jax.sharding.Mesh"),
    ],
)
def test_bad_meshes_are_refused_naming_the_numbers(mesh_results, case, expected):
    message = mesh_results["errors"][case]
    assert message is not None and message.startswith("ArgumentError") and expected in message, message


def test_cli_generate_on_a_mesh_prints_the_one_device_tokens():
    argv = [sys.executable, "-m", "jspec", "generate", "--model", "demo-code", "--prompt", "def add(a, b):",
            "--prompt", "class Stack:", "--max-new-tokens", "12", "--json"]
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="8", PYTHONPATH=str(TESTS.parent))
    on_mesh = subprocess.run(argv + ["--mesh", "data=4,model=2"], env=env, capture_output=True, text=True, timeout=300)
    alone = subprocess.run(argv, env=dict(env, JAX_NUM_CPU_DEVICES="1"), capture_output=True, text=True, timeout=300)
    assert on_mesh.returncode == 0 and alone.returncode == 0, on_mesh.stderr[-2000:] + alone.stderr[-2000:]
    assert json.loads(on_mesh.stdout)["tokens"] == json.loads(alone.stdout)["tokens"]
