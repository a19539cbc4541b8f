"""TPLA (`jspec.tpla`): the folded orthogonal transform leaves the model's logits unchanged; with g = 1 TPLA is MLA;
on 2, 4 and 8 simulated CPU devices (a subprocess: tests/tpla_checks.py) it runs inside the compiled decode loop,
each device holds kv_lora_rank / g latent values per token, and the sharded attention equals TPLA's equations
computed on one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jspec
from jspec.models.config import MLAConfig, TransformerConfig
from jspec.tpla import fold_latent_rotation, hadamard, latent_rotations

TESTS = Path(__file__).resolve().parent
TOKENS = np.random.default_rng(0).integers(0, 128, (2, 12))
PROMPTS = [[5, 17, 3, 99, 42, 7], [9, 2, 44]]


def mla_model(seed: int = 0) -> jspec.Model:
    config = TransformerConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
                               intermediate_size=128, max_position_embeddings=128, eos_token_ids=(),
                               mla=MLAConfig(kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                                             q_lora_rank=32))
    model = jspec.Model.random(config, seed, init_scale=0.2)  # logits of magnitude ~3: fp32 rounding ~1e-6
    # latent norm weights away from 1, so folding them into kv_b is exercised
    groups = jax.tree.map(lambda x: x, model.params["groups"])
    for layer in groups[0]:
        layer["kv_a_norm"] = 1.0 + 0.3 * jax.random.normal(jax.random.key(seed + 7), layer["kv_a_norm"].shape)
    return model.replace(params={**model.params, "groups": groups})


@jax.jit
def logits(model, tokens):
    return model.forward(tokens, jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape))[0]


@pytest.mark.parametrize("transform", ["hadamard", "pca", "none"])
def test_folded_transform_leaves_logits_unchanged(transform):
    model = mla_model()
    rotations = latent_rotations(model, transform, calibration=TOKENS)
    for rotation in rotations.values():
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(16), atol=1e-9)
    folded = fold_latent_rotation(model, rotations)
    assert all(np.all(np.asarray(layer["kv_a_norm"]) == 1) for layer in folded.params["groups"][0])
    if transform != "none":  # the cached latents really are rotated
        assert not np.allclose(np.asarray(folded.params["groups"][0][0]["kv_a"]), np.asarray(model.params["groups"][0][0]["kv_a"]))
    tokens = jnp.asarray(TOKENS, jnp.int32)
    assert float(jnp.abs(logits(folded, tokens) - logits(model, tokens)).max()) < 1e-5


def test_tpla_with_one_shard_equals_mla():
    model = mla_model()
    mesh = jspec.make_mesh(data=1, model=1, devices=jax.devices()[:1])
    tpla = jspec.tpla(model, mesh, "hadamard")
    assert tpla.kernels.latent_parallel is not None
    want = jspec.decode(model, PROMPTS, max_new_tokens=10, stop_tokens=[], logprobs=2)
    got = jspec.decode(tpla, PROMPTS, max_new_tokens=10, stop_tokens=[], logprobs=2)
    assert got.sequences() == want.sequences()
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-5)


def test_hadamard_and_bad_arguments():
    matrix = hadamard(8)
    np.testing.assert_allclose(matrix @ matrix.T, np.eye(8), atol=1e-12)
    model, mesh = mla_model(), jspec.make_mesh(data=1, model=1, devices=jax.devices()[:1])
    with pytest.raises(jspec.ArgumentError, match="calibration"):
        jspec.tpla(model, mesh, "pca")
    with pytest.raises(jspec.ArgumentError, match="transform"):
        jspec.tpla(model, mesh, "fourier")
    with pytest.raises(jspec.ArgumentError, match="rope"):
        jspec.tpla(model, mesh, rope="both")
    gqa = jspec.Model.random(TransformerConfig(vocab_size=32, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                                               intermediate_size=32), 0)
    with pytest.raises(jspec.ArgumentError, match="MLA layers"):
        jspec.tpla(gqa, mesh)


@pytest.fixture(scope="module")
def mesh_results() -> dict:
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="8", PYTHONPATH=str(TESTS.parent))
    done = subprocess.run([sys.executable, str(TESTS / "tpla_checks.py")], env=env, capture_output=True, text=True,
                          timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    assert done.returncode == 0 and lines, f"tpla checks failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
    results = json.loads(lines[-1][len("RESULTS "):])["tpla"]
    assert "error" not in results, results.get("error")
    return results


@pytest.mark.parametrize("case", ["g2-replicated-plain", "g4-replicated-plain", "g4-split-rescale", "g8-replicated-plain"])
def test_tpla_on_simulated_devices(mesh_results, case):
    row = mesh_results[case]
    shards = int(case.split("-")[0][1:])
    assert row["devices"] == shards and row["latent_global"] == [1, 4, 16, 32]
    assert row["latent_per_device"] == [[1, 4, 16, 32 // shards]]  # kv_lora_rank / g latent values per token
    assert row["rope_per_device"] == [[1, 4, 16, 8 // shards if "split" in case else 8]]
    assert row["attention_max_diff"] < 1e-5  # the sharded attention computes TPLA's equations
    if "replicated" in case:
        assert row["greedy_lengths"] == [8] * 4  # decoded inside the compiled loop
    if case == "g4-replicated-plain":
        assert row["speculative_equals_greedy"]  # verification chunks attend by TPLA too
