"""Attention masks over key slots.

A mask is bool [B, T, S]: query t of row b may read key slot s. With a cache, key slots are cache slots
(S = capacity); without one, they are the chunk's own tokens (S = T). Every decoding pattern (prefill,
single-token decode, tree verification, bidirectional diffusion blocks) is one of these masks handed to the
same `forward`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_mask(
    query_slots: jax.Array,  # [B, T] int: the slot each query's own key/value occupies
    num_key_slots: int,
    sliding_window: int | None = None,
) -> jax.Array:  # [B, T, S] bool
    """Each query reads every slot up to and including its own (and, with a window, the last `window`)."""
    key_slots = jnp.arange(num_key_slots)[None, None, :]
    own = query_slots[:, :, None]
    visible = key_slots <= own
    if sliding_window is not None:
        visible &= key_slots > own - sliding_window
    return visible


def prefix_and_block_mask(
    prefix_lengths: jax.Array,  # [B] committed slots every query reads
    block_visibility: jax.Array,  # [T, U] or [B, T, U] bool: query t reads block entry u
    block_start: jax.Array,  # [B] slot of the block's first entry
    num_key_slots: int,
) -> jax.Array:  # [B, T, S] bool
    """The committed prefix plus a pattern over a block of U slots written at block_start + u.

    The queries may be the block itself (T = U: tree verification, a bidirectional diffusion block) or a
    subset of it (one level of a draft tree reading its ancestors).
    """
    batch = prefix_lengths.shape[0]
    length, width = block_visibility.shape[-2:]
    key_slots = jnp.arange(num_key_slots)[None, None, :]
    in_prefix = key_slots < prefix_lengths[:, None, None]
    offset = key_slots - block_start[:, None, None]  # [B, 1, S]: block entry of each slot
    in_block = (offset >= 0) & (offset < width)
    visibility = jnp.broadcast_to(block_visibility, (batch, length, width))
    entry = jnp.broadcast_to(jnp.clip(offset, 0, width - 1), (batch, length, num_key_slots))
    return in_prefix | (in_block & jnp.take_along_axis(visibility, entry, axis=2))
