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


def block_causal_mask(
    query_positions: jax.Array,  # [B, T] int
    key_positions: jax.Array,  # [B, S] int
    block_size: int,
) -> jax.Array:  # [B, T, S] bool
    """Block diffusion (Fast-dLLM v2): a query reads every key whose block (position // block_size) is not
    after its own: causal across blocks, bidirectional inside one."""
    return (key_positions[:, None, :] // block_size) <= (query_positions[:, :, None] // block_size)


def block_diffusion_training_mask(length: int, block_size: int) -> jax.Array:  # [2L, 2L] bool
    """The Fast-dLLM v2 training mask over the concatenation [noisy x_t ; clean x_0] (2 x length positions,
    both halves at positions 0..length-1): a noisy block reads itself bidirectionally (M_BD) and the clean
    blocks before it (M_OBC); a clean token reads the clean blocks up to its own (M_BC); nothing reads noisy
    tokens of another block."""
    blocks = jnp.arange(length) // block_size
    query, key = blocks[:, None], blocks[None, :]
    noisy_reads_noisy = query == key
    noisy_reads_clean = key < query
    clean_reads_clean = key <= query
    top = jnp.concatenate([noisy_reads_noisy, noisy_reads_clean], axis=1)
    bottom = jnp.concatenate([jnp.zeros_like(clean_reads_clean), clean_reads_clean], axis=1)
    return jnp.concatenate([top, bottom], axis=0)


def span_and_context_mask(
    in_sequence: jax.Array,  # [B, L] bool: span entries that are real positions (not past the sequence end)
    write_base: int,  # cache slot of the span's first entry: the span occupies [base, base + L)
    num_key_slots: int,
    context: jax.Array | None = None,  # [B, C] bool: slots (from 0) every query also reads
) -> jax.Array:  # [B, L, S] bool
    """A span written at [base, base + L) that reads itself bidirectionally (its real entries) and the kept
    context (a masked-diffusion forward; FreeDave runs one such span per draft branch, each as its own row)."""
    length = in_sequence.shape[1]
    relative = jnp.arange(num_key_slots) - write_base  # [S]
    in_span = (relative >= 0) & (relative < length)
    key_real = in_span[None, :] & jnp.take_along_axis(in_sequence, jnp.clip(relative, 0, length - 1)[None, :], axis=1)  # [B, S]
    visible = jnp.broadcast_to(key_real[:, None, :], (in_sequence.shape[0], length, num_key_slots))
    if context is not None:
        visible |= jnp.pad(context, ((0, 0), (0, num_key_slots - context.shape[1])))[:, None, :]
    return visible
