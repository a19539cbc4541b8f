"""What every diffusion-LM decoder shares: turning logits into (token, confidence) predictions at masked
positions, ranking them, choosing which to unmask, and checking the model and options.

Predictions follow LLaDA / Fast-dLLM: the predicted token x0 is the argmax (temperature 0) or a sample from
softmax(logits / temperature) (Gumbel-max); its confidence is its probability under softmax(logits). The mask
token itself is never predicted.

Sampling noise is a pure function of (key, row, decision index, position): the decision index is the number of
generated tokens a row had decided when the prediction was made. Two decoders that pass through the same
states therefore draw the same samples, which is what lets FreeDave reproduce static decoding at temperature > 0.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jspec.strategies.base import DecodeOutput, Prompts


def predict(
    logits: jax.Array,  # [B, K, T, V] float32: the logits that predict each position (already shifted)
    slots: jax.Array,  # [B, T] int32: each position's slot (for the sampling noise)
    decided: jax.Array,  # [B, K] int32: the decision index each branch's state is at
    temperature: jax.Array,  # [B] float32
    key: jax.Array,
    mask_token_id: int,
) -> tuple[jax.Array, jax.Array]:  # x0 [B, K, T] int32, confidence [B, K, T] float32
    """Predicted tokens and their confidences (see the module docstring)."""
    logits = logits.at[..., mask_token_id].set(-jnp.inf)
    probabilities = jax.nn.softmax(logits, axis=-1)

    def sampled(_):
        def noise(row_key, branch_decided, position):  # [V]
            return jax.random.gumbel(jax.random.fold_in(jax.random.fold_in(row_key, branch_decided), position), logits.shape[-1:])

        row_keys = jax.vmap(lambda row: jax.random.fold_in(key, row))(jnp.arange(logits.shape[0]))
        per_position = jax.vmap(noise, in_axes=(None, None, 0))
        per_branch = jax.vmap(per_position, in_axes=(None, 0, None))
        gumbel = jax.vmap(per_branch, in_axes=(0, 0, 0))(row_keys, decided, slots)  # [B, K, T, V]
        scale = jnp.maximum(temperature, 1e-6)[:, None, None, None]
        tempered = jnp.where(temperature[:, None, None, None] > 0, logits / scale + gumbel, logits)
        return jnp.argmax(tempered, axis=-1).astype(jnp.int32)

    greedy = lambda _: jnp.argmax(logits, axis=-1).astype(jnp.int32)  # noqa: E731
    tokens = jax.lax.cond(jnp.any(temperature > 0), sampled, greedy, None)
    confidence = jnp.take_along_axis(probabilities, tokens[..., None], axis=-1)[..., 0]
    return tokens, confidence


def confidence_order(
    confidence: jax.Array,  # [..., T] float32
    masked: jax.Array,  # [..., T] bool: positions still to decide
) -> jax.Array:  # [..., T] int32
    """Positions by decreasing confidence, masked ones first, ties to the leftmost: element 0 is the position
    static (low-confidence-remasking) decoding unmasks next, element k the (k+1)-th most confident."""
    key = jnp.where(masked, -confidence, jnp.inf)
    return jnp.argsort(key, axis=-1, stable=True).astype(jnp.int32)


def most_confident(confidence: jax.Array, masked: jax.Array) -> jax.Array:  # [..., T] -> [..., T] bool
    """One-hot of the most confident masked position (none where nothing is masked)."""
    first = confidence_order(confidence, masked)[..., 0]
    return jax.nn.one_hot(first, masked.shape[-1], dtype=bool) & masked


def above_threshold(confidence: jax.Array, masked: jax.Array, threshold: jax.Array) -> jax.Array:
    """Fast-dLLM's parallel rule: every masked position with confidence > threshold, and at least the most
    confident one. threshold: [B] (broadcast over the trailing axes). With threshold 1 this is
    `most_confident` (a probability never exceeds 1)."""
    threshold = threshold.reshape(threshold.shape + (1,) * (confidence.ndim - 1))
    return (masked & (confidence > threshold)) | most_confident(confidence, masked)


def check_diffusion_model(model: Any, kind: str, strategy: str) -> None:
    config = model.config
    if config.mask_token_id is None:
        raise ValueError(
            f"model: {config.name!r} has no mask token (config.mask_token_id is None); strategy {strategy!r} needs a "
            f"diffusion LM, e.g. jspec.load('demo-code-dllm') or jspec.load('demo-code-bd')"
        )
    if config.diffusion != kind:
        other = {"masked": "dllm_static / dllm_threshold / freedave", "block": "block_diffusion"}.get(config.diffusion)
        hint = f"; a diffusion={config.diffusion!r} model decodes with {other}" if other else ""
        raise ValueError(f"model: strategy {strategy!r} needs a diffusion={kind!r} model, got diffusion={config.diffusion!r}{hint}")


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")


def check_per_row(name: str, value: Any, prompts: Prompts, ok, expected: str) -> None:
    """A traced option given as a scalar or one value per row; concrete values are range-checked."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {expected} or one per row, got {value!r}") from None
    if array.ndim > 1 or (array.ndim == 1 and array.shape[0] != prompts.batch_size):
        raise ValueError(f"{name}: expected a scalar or {prompts.batch_size} values (one per row), got shape {array.shape}")
    if not np.all(np.isfinite(array)) or not np.all(ok(array)):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def check_options(prompts: Prompts, temperature: Any, threshold: Any | None = None) -> None:
    check_per_row("temperature", temperature, prompts, lambda x: x >= 0, "a float >= 0 (0 is greedy)")
    if threshold is not None:
        check_per_row("threshold", threshold, prompts, lambda x: (x > 0) & (x <= 1), "a float in (0, 1]")


def per_row(value: Any, batch_size: int) -> jax.Array:  # [B] float32
    return jnp.broadcast_to(jnp.asarray(value, jnp.float32), (batch_size,))


def decode_output(state: Any, **extra_stats: jax.Array) -> DecodeOutput:
    """The DecodeOutput of a diffusion decoder's state (output buffer, model_calls, step, block_forwards)."""
    generated = state.output.lengths
    stats = {
        "model_calls": state.model_calls,
        "steps": state.step,
        "tokens_generated": generated,
        "tokens_per_forward": jnp.sum(generated) / jnp.maximum(state.model_calls, 1) / generated.shape[0],
        "block_forwards": state.block_forwards,
        **extra_stats,
    }
    return DecodeOutput(tokens=state.output.tokens, lengths=generated, finish_reason=state.output.finish_reason, stats=stats)
