"""The Pallas MLA decode kernel inside the "mla" attention kind (`attention_impl="pallas_dense"`): decode chunks
attend through it and give the XLA absorbed form's tokens; on a mesh (2 simulated devices, a subprocess) TPLA's
shards run it over their latent slices and equal TPLA on XLA.

Widths: the kernel's Triton form (the default in interpret mode) needs the latent and RoPE widths (per shard, under
TPLA) to be powers of two >= 16, hence kv_lora_rank 32 and qk_rope_head_dim 16 here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jspec
from jspec.models.attention.mla import absorbed_attention, softmax_scale, split_kv_b
from jspec.models.config import MLAConfig, TransformerConfig

PROMPTS = [[5, 17, 3, 99, 42, 7], [9, 2, 44], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
NEW_TOKENS = 10


def mla_model(seed: int = 0) -> jspec.Model:
    config = TransformerConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
                               intermediate_size=128, max_position_embeddings=256, eos_token_ids=(),
                               mla=MLAConfig(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
                                             q_lora_rank=32))
    return jspec.Model.random(config, seed, init_scale=0.3)


def kernel_model(model: jspec.Model) -> jspec.Model:
    return model.with_kernels(attention_impl="pallas_dense", attention_interpret=True, mla_block_size=16)


def decode_step_uses_kernel(model: jspec.Model) -> bool:
    """Whether one decode token over a cache (the default causal mask) lowers to a Pallas call."""
    cache = model.new_cache(2, 32)
    tokens = jnp.zeros((2, 1), jnp.int32)
    step = jax.make_jaxpr(lambda model, cache: model.forward(tokens, tokens, cache))(model, cache)
    return "pallas_call" in str(step)


def decoded(model, strategy="greedy", **options) -> list[list[int]]:
    return jspec.decode(model, PROMPTS, strategy=strategy, max_new_tokens=NEW_TOKENS, **options).tokens.tolist()


def test_kernel_attend_equals_absorbed_form():
    model = kernel_model(mla_model())
    config, mla = model.config, model.config.mla
    kind = jspec.models.transformer.group_kinds(config, model.kernels)[0][0]
    params = jax.tree.map(lambda x: x[0] if x.ndim > 1 and x.shape[0] == 1 else x, model.params["groups"][0][0])
    keys = jax.random.split(jax.random.key(1), 4)
    batch, length, slots, heads = 2, 4, 48, config.num_heads
    q_nope = jax.random.normal(keys[0], (batch, length, heads, mla.qk_nope_head_dim))
    q_rope = jax.random.normal(keys[1], (batch, length, heads, mla.qk_rope_head_dim))
    latent = jax.random.normal(keys[2], (batch, slots, mla.kv_lora_rank))
    rope_key = jax.random.normal(keys[3], (batch, slots, mla.qk_rope_head_dim))
    write_slots = jnp.array([[5], [37]]) + jnp.arange(length)[None, :]  # the second chain crosses a block
    kernel = kind.kernel_attend(config, params, q_nope, q_rope, latent, rope_key, write_slots)
    mask = jnp.arange(slots)[None, None, :] <= write_slots[:, :, None]
    w_uk, w_uv = split_kv_b(params["kv_b"], config)
    xla = absorbed_attention(q_nope, q_rope, latent, rope_key, w_uk, w_uv, mask, softmax_scale(config))
    assert kernel.shape == xla.shape == (batch, length, heads, mla.v_head_dim)
    assert float(jnp.abs(kernel - xla).max()) < 1e-5


def test_kernel_decoding_equals_xla_decoding():
    model = mla_model()
    fast = kernel_model(model)
    assert fast.cache_size_multiple == 16
    assert decode_step_uses_kernel(fast) and not decode_step_uses_kernel(model)
    expected = decoded(model)
    assert decoded(fast) == expected
    # chain verification (k + 1 <= 8 tokens per row) goes through the kernel too
    assert decoded(fast, "prompt_lookup", num_draft_tokens=3) == expected


def test_sparse_kernel_refused_for_mla_layers():
    with pytest.raises(ValueError, match="attention_impl.*'mla'.*pallas_sparse"):
        mla_model().with_kernels(attention_impl="pallas_sparse")


def tpla_kernel_check() -> dict:
    """On 2 devices: TPLA (g = 2, latent slices of 16) with the kernel equals TPLA on XLA, greedy tokens and their log-probabilities."""
    mesh = jspec.make_mesh(data=1, model=2)
    model = mla_model()
    xla = jspec.tpla(model, mesh, "hadamard")
    fast = jspec.tpla(kernel_model(model), mesh, "hadamard")
    first = jspec.decode(xla, PROMPTS, strategy="greedy", max_new_tokens=NEW_TOKENS, mesh=mesh, logprobs=0)
    second = jspec.decode(fast, PROMPTS, strategy="greedy", max_new_tokens=NEW_TOKENS, mesh=mesh, logprobs=0)
    return {"kernel_used": decode_step_uses_kernel(fast), "tokens_equal": first.tokens.tolist() == second.tokens.tolist(),
            "logprob_difference": float(np.abs(np.asarray(first.logprobs) - np.asarray(second.logprobs)).max())}


def test_tpla_shards_run_the_kernel():
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "2", "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["kernel_used"] and result["tokens_equal"], result
    assert result["logprob_difference"] < 1e-4, result


if __name__ == "__main__":
    print(json.dumps(tpla_kernel_check()))
