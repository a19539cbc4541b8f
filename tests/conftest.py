"""Shared fixtures: tiny random models of every family the transformer covers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import jspec
from jspec.models.config import RopeScaling, TransformerConfig
from jspec.models.kernels import KernelOptions

if jax.default_backend() != "cpu":
    # XLA's default float32 dot on an accelerator is TF32 (H100/H200: 10-bit mantissa), while the Pallas kernels
    # compute float32 at HIGHEST precision; the tests compare float32 paths to 1e-5. On an H200 two kernel-vs-XLA
    # tests of test_attention_impl.py failed (their messages were lost to the time limit: TF32 is the suspected,
    # unconfirmed cause). CPU dots are always full float32, so this changes nothing on CPU.
    jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every module's compiled programs when it finishes. The suite compiles hundreds of decode loops in
    one process; one full run crashed (segfault) inside XLA's CPU compiler late in the suite. The cause was not
    established; releasing compiled programs between modules is a mitigation that also bounds memory."""
    yield
    jax.clear_caches()


FAMILIES = {
    "llama": dict(),
    "llama3_scaled": dict(rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16), rope_theta=500000.0),
    "mistral_window": dict(sliding_window=5),
    "qwen2": dict(qkv_bias=True, tie_embeddings=True),
    "qwen3": dict(qk_norm=True, head_dim=16),
    "mha": dict(num_kv_heads=4),
}


def tiny_config(family: str = "llama", **overrides) -> TransformerConfig:
    values = dict(
        name=f"tiny-{family}",
        vocab_size=97,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        eos_token_ids=(),
    )
    values.update(FAMILIES[family])
    values.update(overrides)
    return TransformerConfig(**values)


def tiny_model(family: str = "llama", seed: int = 0, init_scale: float = 0.3, **overrides) -> jspec.Model:
    """A random model whose logits are far from uniform (init_scale 0.3), so argmax ties do not occur.
    Overrides that are `KernelOptions` fields (attention_impl, ...) set the model's kernels."""
    kernels = {k: overrides.pop(k) for k in list(overrides) if k in KernelOptions.field_names()}
    return jspec.Model.random(tiny_config(family, **overrides), jax.random.key(seed), init_scale=init_scale,
                              kernels=KernelOptions(**kernels))


REFERENCE_WIDTH = 64  # naive references run on sequences right-padded to this width (causal: padding is inert)


@jax.jit
def uncached_logits(model: jspec.Model, padded: jax.Array) -> jax.Array:
    """Logits [W, V] of one uncached causal forward over a padded sequence [W] (one compile per model shape, not
    per sequence length)."""
    return model.forward(padded[None], jnp.arange(padded.shape[0])[None])[0][0]


def padded(sequence: list[int]) -> jax.Array:  # -> [REFERENCE_WIDTH] int32
    assert len(sequence) <= REFERENCE_WIDTH
    return jnp.asarray(list(sequence) + [0] * (REFERENCE_WIDTH - len(sequence)), jnp.int32)


def naive_greedy(model: jspec.Model, prompt: list[int], num_tokens: int) -> list[int]:
    """Argmax loop over full uncached forwards: the reference greedy output."""
    sequence = list(prompt)
    for _ in range(num_tokens):
        sequence.append(int(jnp.argmax(uncached_logits(model, padded(sequence))[len(sequence) - 1])))
    return sequence[len(prompt) :]


@pytest.fixture
def model() -> jspec.Model:
    return tiny_model("llama")


def line_break_tokens(model: jspec.Model) -> list[int]:
    """A diffusion demo's tokens that contain a line break (its last token, the mask, left out): as stop tokens,
    decoding stops at the end of the first line."""
    return [i for i in range(model.config.vocab_size - 1) if "\n" in model.tokenizer.decode([i])]


def assert_end_of_text_changes_no_token(plain: jspec.DecodeOutput, early: jspec.DecodeOutput) -> None:
    """A diffusion decode with End-of-Text Prediction (early) against the same decode without it (plain): the same
    tokens and finish reasons, no row runs more forwards, and some row runs fewer."""
    import numpy as np

    forwards = lambda out: np.asarray(out.stats["block_forwards"]).sum(axis=1)  # noqa: E731
    assert early.sequences() == plain.sequences()
    np.testing.assert_array_equal(early.finish_reason, plain.finish_reason)
    assert np.all(forwards(early) <= forwards(plain)) and np.any(forwards(early) < forwards(plain))
