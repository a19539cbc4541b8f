"""Choosing the layers a self-speculative draft skips.

`calibrate_skip_layers` searches greedily: it adds, one at a time, the layer whose removal keeps the
draft's top-1 agreement with the full model highest on held-out tokens. The agreement it reports is the
fraction of positions where the skipping model's argmax equals the full model's, which is the per-token
acceptance rate of greedy self-speculative decoding on that text.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jspec.models.model import Model
from jspec.validation import ArgumentError


@functools.partial(jax.jit, static_argnames="skip_layers")
def _argmax_predictions(model: Model, tokens: jax.Array, skip_layers: tuple[int, ...]) -> jax.Array:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1])[None], tokens.shape)
    logits, _ = model.forward(tokens, positions, skip_layers=skip_layers)
    return jnp.argmax(logits, axis=-1)


def top1_agreement(model: Model, tokens: jax.Array, skip_layers: tuple[int, ...]) -> float:
    """Fraction of positions of tokens [B, T] where skipping `skip_layers` keeps the full model's argmax."""
    full = _argmax_predictions(model, tokens, ())
    return float(jnp.mean(_argmax_predictions(model, tokens, tuple(sorted(skip_layers))) == full))


def calibrate_skip_layers(model: Model, tokens, num_skip: int) -> tuple[tuple[int, ...], float]:
    """Greedy search for `num_skip` layers to skip on held-out tokens [B, T] (int).

    Returns the sorted layer indices and their top-1 agreement with the full model.
    """
    tokens = jnp.asarray(np.asarray(tokens, np.int32))
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ArgumentError(f"tokens: expected held-out token ids of shape [B, T] with T >= 2, got shape {tokens.shape}")
    layers = model.config.num_layers
    if not isinstance(num_skip, int) or not 1 <= num_skip < layers:
        raise ArgumentError(f"num_skip: expected an int in [1, {layers - 1}], got {num_skip!r}")
    chosen: list[int] = []
    agreement = 1.0
    for _ in range(num_skip):
        scores = {layer: top1_agreement(model, tokens, tuple(chosen + [layer])) for layer in range(layers) if layer not in chosen}
        best = max(scores, key=lambda layer: (scores[layer], -layer))
        chosen.append(best)
        agreement = scores[best]
    return tuple(sorted(chosen)), agreement
