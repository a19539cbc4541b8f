"""Transformer building blocks as pure functions: RMSNorm, rotary embeddings, grouped-query attention.

Numerics follow the Hugging Face reference implementations (norms and softmax in float32, RoPE angles in
float32, rotate-half convention), so checkpoints load without weight permutation and logits match.
"""

from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp

from jspec.models.config import RopeScaling, TransformerConfig, YarnScaling, yarn_mscale

MASKED_SCORE = float(np.finfo(np.float32).min)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis; computed in float32, returned in x's dtype.

    x: [..., D]; weight: [D].
    """
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def rope_inverse_frequencies(config: TransformerConfig, dim: int | None = None) -> np.ndarray:
    """Inverse frequencies [dim // 2] (float32; dim defaults to head_dim), with Llama-3 or YaRN scaling when the
    config asks for it."""
    dim = config.head_size if dim is None else dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    inv_freq = inv_freq.astype(np.float32)
    if isinstance(config.rope_scaling, YarnScaling):
        inv_freq = _yarn_scaled(inv_freq, config.rope_scaling, config.rope_theta, dim)
    elif config.rope_scaling is not None:
        inv_freq = _llama3_scaled(inv_freq, config.rope_scaling)
    return inv_freq


def rope_attention_factor(config: TransformerConfig) -> float:
    """The factor cos and sin are multiplied by (YaRN's attention_factor; 1 otherwise)."""
    scaling = config.rope_scaling
    if not isinstance(scaling, YarnScaling):
        return 1.0
    if scaling.attention_factor is not None:
        return float(scaling.attention_factor)
    if scaling.mscale and scaling.mscale_all_dim:
        return yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(scaling.factor, scaling.mscale_all_dim)
    return yarn_mscale(scaling.factor)


def _yarn_scaled(inv_freq: np.ndarray, scaling: YarnScaling, base: float, dim: int) -> np.ndarray:
    """transformers 5's `_compute_yarn_parameters` (float32 ramp over the correction range)."""

    def correction_dim(rotations: float) -> float:
        return dim * np.log(scaling.original_max_position_embeddings / (rotations * 2 * np.pi)) / (2 * np.log(base))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = np.floor(low), np.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation = 1 - ramp
    return (inv_freq / scaling.factor * (1 - extrapolation) + inv_freq * extrapolation).astype(np.float32)


def _llama3_scaled(inv_freq: np.ndarray, scaling: RopeScaling) -> np.ndarray:
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, config: TransformerConfig, dim: int | None = None) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables [B, T, dim] (float32; dim defaults to head_dim) for integer positions [B, T]."""
    inv_freq = jnp.asarray(rope_inverse_frequencies(config, dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, dim // 2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    factor = rope_attention_factor(config)
    if factor == 1.0:
        return jnp.cos(angles), jnp.sin(angles)
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, H, D] by the angles of cos/sin [B, T, D] (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def attend(
    queries: jax.Array,  # [B, T, H, D]
    keys: jax.Array,  # [B, S, Hkv, D]
    values: jax.Array,  # [B, S, Hkv, Dv]
    mask: jax.Array,  # [B, T, S] bool: query t may read key slot s
    scale: float | None = None,  # softmax scale; None: D ** -0.5
) -> jax.Array:  # [B, T, H, Dv]
    """Grouped-query softmax attention; scores and softmax in float32.

    A query whose mask row is all False gets a uniform average of the values rather than NaN; such rows
    are padding and their outputs must be ignored by the caller.
    """
    batch, length, num_heads, head_dim = queries.shape
    num_kv_heads = keys.shape[2]
    grouped = queries.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", grouped, keys, preferred_element_type=jnp.float32)
    scores = scores * (head_dim**-0.5 if scale is None else scale)
    scores = jnp.where(mask[:, None, None, :, :], scores, MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    # accumulated in float32 and rounded once: a bfloat16-output batched dot on XLA:CPU rounds differently with
    # the batch size, so a row's output would depend on how many rows run beside it
    out = jnp.einsum("bkgts,bskd->btkgd", probs, values, preferred_element_type=jnp.float32).astype(values.dtype)
    return out.reshape(batch, length, num_heads, values.shape[-1])
