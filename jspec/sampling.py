"""Token distributions: temperature, top-k, top-p and min-p warping, and sampling from them.

The warping parameters are per-row arrays, so changing them between calls never recompiles. Temperature 0
means greedy: the distribution is one-hot on the argmax (ties to the lowest id), which makes greedy the exact
special case of every sampling rule built on `probabilities` (speculative acceptance included).
Filters are applied in the Hugging Face order: temperature, top-k, top-p, min-p. Tokens tied with the last
kept token are kept (as in Hugging Face).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

NEG_INF = -jnp.inf


@struct.dataclass
class SamplingParams:
    temperature: jax.Array  # [B] float32; 0 = greedy
    top_k: jax.Array  # [B] int32; 0 = off
    top_p: jax.Array  # [B] float32; 1 = off
    min_p: jax.Array  # [B] float32; 0 = off

    @classmethod
    def broadcast(cls, batch_size: int, temperature: Any = 0.0, top_k: Any = 0, top_p: Any = 1.0, min_p: Any = 0.0) -> "SamplingParams":
        """Per-row parameters from scalars or per-row sequences of length batch_size. A sequence covering only the
        first rows (the caller's rows of a batch bucket) is extended with its last value for the padding rows."""

        return cls(
            temperature=as_rows(temperature, jnp.float32, batch_size),
            top_k=as_rows(top_k, jnp.int32, batch_size),
            top_p=as_rows(top_p, jnp.float32, batch_size),
            min_p=as_rows(min_p, jnp.float32, batch_size),
        )

    def per_position(self, width: int) -> "SamplingParams":
        """The parameters of B rows repeated for B * width positions (row-major), for logits [B, width, V]
        flattened to [B * width, V]."""
        return jax.tree.map(lambda x: jnp.repeat(x, width, axis=0), self)


def as_rows(value: Any, dtype, batch_size: int) -> jax.Array:
    """value [batch_size, ...] from a scalar or per-row values: a leading axis covering only the first rows (the
    caller's rows of a batch bucket) is extended with its last entry for the padding rows."""
    array = jnp.asarray(value, dtype)
    if array.ndim >= 1 and 0 < array.shape[0] < batch_size:
        array = jnp.pad(array, [(0, batch_size - array.shape[0])] + [(0, 0)] * (array.ndim - 1), mode="edge")
    if array.ndim <= 1:
        return jnp.broadcast_to(array, (batch_size,))
    return jnp.broadcast_to(array, (batch_size, *array.shape[1:]))


def validate_sampling_options(batch_size: int, **values: Any) -> None:
    """Raise `ArgumentError` naming the option when a sampling option is not a number in range (scalar or per row)."""
    import numpy as np

    from jspec.validation import check_per_row

    rules = {
        "temperature": (lambda x: x >= 0, "a float >= 0 (0 is greedy)"),
        "top_k": (lambda x: (x >= 0) & (x == np.round(x)), "an int >= 0 (0 turns it off)"),
        "top_p": (lambda x: (x > 0) & (x <= 1), "a float in (0, 1] (1 turns it off)"),
        "min_p": (lambda x: (x >= 0) & (x < 1), "a float in [0, 1) (0 turns it off)"),
    }
    for name, value in values.items():
        check_per_row(name, value, batch_size, *rules[name])


def warp_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Warped logits [B, V] (float32): divided by temperature (1 where greedy), filtered tokens at -inf."""
    logits = logits.astype(jnp.float32)
    temperature = jnp.where(params.temperature > 0, params.temperature, 1.0)
    logits = logits / temperature[:, None]
    needs_sort = jnp.any(params.top_k > 0) | jnp.any(params.top_p < 1.0)
    logits = jax.lax.cond(needs_sort, _top_k_top_p, lambda x, p: x, logits, params)
    probs = jax.nn.softmax(logits, axis=-1)
    keep = probs >= params.min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(keep, logits, NEG_INF)


def _top_k_top_p(logits: jax.Array, params: SamplingParams) -> jax.Array:
    vocab = logits.shape[-1]
    ordered = -jnp.sort(-logits, axis=-1)  # [B, V] descending
    k = jnp.where(params.top_k > 0, jnp.minimum(params.top_k, vocab), vocab)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)
    logits = jnp.where(logits >= kth, logits, NEG_INF)
    ordered = jnp.where(ordered >= kth, ordered, NEG_INF)
    sorted_probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    kept_sorted = mass_before < params.top_p[:, None]  # the first token is always kept
    smallest_kept = jnp.min(jnp.where(kept_sorted, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= smallest_kept, logits, NEG_INF)


def argmax(values: jax.Array) -> jax.Array:
    """The index of the largest value along the last axis [...] int32, the lowest where tied (as `jnp.argmax`, NaN
    aside: see below), as two vectorised reductions (max, then min over the indices that reach it). XLA:CPU
    lowers `jnp.argmax` to a reduction over (value, index) pairs that runs ~3x slower (50 us for 4096 values,
    450 us for [8, 5, 4096]): a tenth of a small model's greedy step. Where a row holds NaN, the result is the
    last index (`jnp.argmax`: the first NaN's)."""
    largest = jnp.max(values, axis=-1, keepdims=True)
    indices = jax.lax.broadcasted_iota(jnp.int32, values.shape, values.ndim - 1)
    return jnp.min(jnp.where(values == largest, indices, values.shape[-1] - 1), axis=-1)


def probabilities(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """The distribution [B, V] a row samples from: softmax of the warped logits, one-hot argmax where greedy."""
    warped = warp_logits(logits, params)
    greedy = jax.nn.one_hot(argmax(logits), logits.shape[-1], dtype=jnp.float32)
    return jnp.where(params.temperature[:, None] > 0, jax.nn.softmax(warped, axis=-1), greedy)


def draw(key: jax.Array, weights: jax.Array) -> jax.Array:
    """One token per row [...] int32, drawn with probability proportional to weights [..., V] (>= 0, need not sum
    to one) by inverse transform sampling: the first token of positive weight whose cumulative weight exceeds a
    uniform draw times the total. A token of zero weight is never drawn (a row whose weights are all zero or NaN,
    which only NaN logits give, draws token 0). Exact to float32 precision: the uniform has 2^-23 resolution, so
    tokens of probability below ~1e-7 are drawn at a rounded rate (as with Gumbel-max in float32). One uniform
    per row: the Gumbel-max trick (`jax.random.categorical`) draws one per vocabulary entry, which on a CPU core
    costs ~0.2 ms for 4096 entries, a fifth of a small model's whole decode step."""
    weights = weights.astype(jnp.float32)
    cumulative = jnp.cumsum(weights, axis=-1)
    threshold = jax.random.uniform(key, weights.shape[:-1]) * cumulative[..., -1]
    indices = jax.lax.broadcasted_iota(jnp.int32, weights.shape, weights.ndim - 1)
    positive = weights > 0
    past = positive & (cumulative > threshold[..., None])
    last_positive = jnp.max(jnp.where(positive, indices, 0), axis=-1)  # float rounding's fallback
    return jnp.min(jnp.where(past, indices, last_positive[..., None]), axis=-1)


def sample(key: jax.Array, logits: jax.Array, params: SamplingParams) -> jax.Array:
    """One token per row [B] int32 from logits [B, V]: argmax where greedy, else `draw` from the warped distribution
    (not computed when every row is greedy, under jit; under vmap with batched parameters both branches run)."""
    greedy = argmax(logits)

    def sampled(greedy: jax.Array) -> jax.Array:
        drawn = draw(key, jax.nn.softmax(warp_logits(logits, params), axis=-1))
        return jnp.where(params.temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(params.temperature > 0), sampled, lambda greedy: greedy, greedy)
