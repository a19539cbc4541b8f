"""Sliding-window grouped-query attention with a ring-buffer cache bounded by the window.

A query at position p reads keys at positions p - window < key <= p that its mask allows (Mistral's and Hugging
Face's convention: the last `window` positions, itself included). The cache keeps R = min(capacity, window +
chunk) physical slots per row, where `chunk` is the most slots one forward writes at or past the committed length
(1 for autoregressive decoding, the draft tree plus one for speculative verification): logical slot s lives at
physical slot s mod R. The entry records which logical slot and which position each physical slot holds, so the
logical masks strategies build ([B, T, S] over logical slots) are read at the physical slots' logical indices,
and rollback stays a length change.

A forward attends over the ring as it was before the chunk plus the chunk's own keys (so a chunk of any length,
a whole prompt included, sees exactly its window), then writes the chunk into the ring; a chunk entry that a
later entry of the same chunk would overwrite is not written. Ring entries whose logical slot the chunk
rewrites are hidden (a rolled-back draft being replaced). Guarantee: the same attention as a full cache with
the window mask, as long as every key a query may read is among the last R slots written (true for R >= window
+ chunk).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jspec.cache import compact_destinations, scatter_layer_rows, scatter_rows, take_rows
from jspec.models.attention import base
from jspec.models.layers import attend, rope_tables


@struct.dataclass
class RingKVEntry:
    keys: jax.Array  # [L, B, R, Hkv, Dh]
    values: jax.Array  # [L, B, R, Hkv, Dh]
    slots: jax.Array  # [B, R] int32: the logical slot each physical slot holds (-1: empty); shared by the layers
    positions: jax.Array  # [B, R] int32: the position (RoPE) of the key each physical slot holds

    @property
    def ring_size(self) -> int:
        return self.keys.shape[2]

    def compact(self, source_slots: jax.Array, destination_start: jax.Array, capacity: int) -> "RingKVEntry":
        size = self.ring_size
        sources, destination = compact_destinations(source_slots, destination_start, capacity)
        from_slot = sources % size
        to_slot = jnp.where(destination < capacity, destination % size, size)  # size: dropped
        rows = jnp.arange(sources.shape[0])[:, None]
        move = lambda buffer: buffer.at[:, rows, to_slot].set(buffer[:, rows, from_slot], mode="drop")  # noqa: E731
        return self.replace(
            keys=move(self.keys),
            values=move(self.values),
            slots=self.slots.at[rows, to_slot].set(destination, mode="drop"),
            positions=self.positions.at[rows, to_slot].set(self.positions[rows, from_slot], mode="drop"),
        )

    def gather_rows(self, rows: jax.Array) -> "RingKVEntry":
        # K/V are [L, B, R, ...]; the slot and position maps, shared by the layers, are [B, R]
        return self.replace(keys=take_rows(self.keys, rows), values=take_rows(self.values, rows),
                            slots=take_rows(self.slots, rows, axis=0), positions=take_rows(self.positions, rows, axis=0))


@dataclasses.dataclass(frozen=True)
class WindowContext:
    cos: jax.Array  # [B, T, Dh]
    sin: jax.Array  # [B, T, Dh]
    visible: jax.Array  # [B, T, R + T] bool over (ring as before the chunk, chunk); [B, T, T] without a cache
    ring_writes: jax.Array | None  # [B, T] int32 physical slot of each chunk entry (R: not written)
    write_slots: jax.Array | None  # [B, T] logical slots
    positions: jax.Array  # [B, T]


@dataclasses.dataclass(frozen=True)
class WindowAttention:
    window: int

    init_params = staticmethod(base.gqa_init_params)
    param_axes = staticmethod(base.gqa_param_axes)
    cache_size_multiple = 1

    def new_entry(self, config: Any, num_layers: int, batch_size: int, capacity: int, chunk: int) -> RingKVEntry:
        size = min(capacity, self.window + chunk)
        shape = (num_layers, batch_size, size, config.num_kv_heads, config.head_size)
        empty = jnp.full((batch_size, size), -1, jnp.int32)
        return RingKVEntry(jnp.zeros(shape, config.dtype), jnp.zeros(shape, config.dtype), empty, empty)

    def entry_axes(self, config: Any) -> RingKVEntry:
        return RingKVEntry(base.kv_axes(), base.kv_axes(), ("batch", "seq"), ("batch", "seq"))

    def prepare(self, config, entry, positions, write_slots, mask, capacity) -> WindowContext:
        cos, sin = rope_tables(positions, config)
        batch, length = positions.shape
        in_window = lambda key_positions: key_positions[:, None, :] > positions[:, :, None] - self.window  # noqa: E731
        if entry is None:  # the chunk attends to itself; slots are chunk indices
            index = jnp.arange(length)
            causal = jnp.broadcast_to(index[None, None, :] <= index[None, :, None], (batch, length, length))
            visible = (causal if mask is None else mask) & in_window(positions)
            return WindowContext(cos, sin, visible, None, None, positions)
        if type(entry) is not RingKVEntry:
            raise ValueError(f"cache: a sliding_attention layer needs a RingKVEntry, the cache holds "
                             f"{type(entry).__name__}; create caches with model.new_cache(...)")
        size = entry.ring_size
        in_range = (write_slots >= 0) & (write_slots < capacity)  # [B, T]
        rewritten = jnp.any(entry.slots[:, :, None] == jnp.where(in_range, write_slots, -2)[:, None, :], axis=-1)
        ring_valid = (entry.slots >= 0) & ~rewritten  # [B, R]
        if mask is None:  # causal by slot
            ring_visible = entry.slots[:, None, :] <= write_slots[:, :, None]
            chunk_visible = write_slots[:, None, :] <= write_slots[:, :, None]
        else:
            at = lambda slots: jnp.broadcast_to(jnp.clip(slots, 0, capacity - 1)[:, None, :], (batch, length, slots.shape[1]))  # noqa: E731
            ring_visible = jnp.take_along_axis(mask, at(entry.slots), axis=2)
            chunk_visible = jnp.take_along_axis(mask, at(write_slots), axis=2)
        ring_visible &= ring_valid[:, None, :] & in_window(entry.positions)
        chunk_visible &= in_range[:, None, :] & in_window(positions)
        last = jnp.max(jnp.where(in_range, write_slots, -1), axis=1)  # [B]
        written = in_range & (write_slots > last[:, None] - size)
        ring_writes = jnp.where(written, write_slots % size, size)
        visible = jnp.concatenate([ring_visible, chunk_visible], axis=2)
        return WindowContext(cos, sin, visible, ring_writes, write_slots, positions)

    def apply(self, params, config, normed, entry, layer, context: WindowContext):
        queries, keys, values = base.gqa_project(params, config, normed, context.cos, context.sin)
        if entry is None:
            return base.gqa_output(params, attend(queries, keys, values, context.visible)), None
        dtype = entry.keys.dtype
        all_keys = jnp.concatenate([entry.keys[layer], keys.astype(dtype)], axis=1)
        all_values = jnp.concatenate([entry.values[layer], values.astype(dtype)], axis=1)
        attended = attend(queries, all_keys, all_values, context.visible)
        entry = entry.replace(keys=scatter_layer_rows(entry.keys, layer, keys, context.ring_writes),
                              values=scatter_layer_rows(entry.values, layer, values, context.ring_writes))
        return base.gqa_output(params, attended), entry

    def finish(self, entry: RingKVEntry | None, context: WindowContext) -> RingKVEntry | None:
        if entry is None:
            return None
        return entry.replace(slots=scatter_rows(entry.slots, context.write_slots, context.ring_writes),
                             positions=scatter_rows(entry.positions, context.positions, context.ring_writes))


def sliding_attention(config: Any, kernels: Any, layer: int) -> WindowAttention:
    """The "sliding_attention" kind. InfLLM v2 block selection has no window: "pallas_sparse" refuses it."""
    if kernels.attention_impl == "pallas_sparse":
        raise ValueError(
            f"sliding_window: layer {layer} is 'sliding_attention', which attention_impl='pallas_sparse' cannot serve "
            "(InfLLM v2 block selection has no sliding window); use 'pallas_dense' or 'xla'"
        )
    return WindowAttention(config.sliding_window)
