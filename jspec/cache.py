"""The decode cache: a generic container of per-layer-group entries plus per-row committed lengths.

A model creates its cache (`model.new_cache(batch_size, capacity)`); strategies only read `lengths` and
`capacity`, commit or roll back with `with_lengths`, and keep a tree path with `compact`. What an entry holds
is the business of the attention kind that owns it (jspec/models/attention/): full K/V, a ring buffer bounded
by a sliding window, K/V plus InfLLM compressed keys, ... This module knows none of them: it imports neither
model configs nor kernels.

Invariants every strategy relies on:
- Slots are logical: slot s of row b is the s-th token of that row's sequence, for s < lengths[b]. Slots at or
  beyond lengths[b] may hold stale entries (a rolled-back draft, a diffusion block that was not committed);
  masks built from `lengths` never let a query see them unless the caller wrote them this step.
- A forward writes a chunk of tokens to explicit per-row slots; a slot outside [0, capacity) is dropped, which
  is how padded tokens of a ragged chunk are kept out of the cache.
- Rollback is a change of `lengths`, never a copy. Tree verification keeps an accepted path with `compact`,
  which moves only the accepted entries (each entry moves its own leaves).

Entries are pytrees whose array leaves are stacked over the group's layers: [L, B, ...]. An entry type
implements `compact(source_slots, destination_start, capacity) -> entry`; `move_slots` is the common case of
leaves indexed by logical slot ([L, B, S, ...]).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Cache:
    entries: tuple[Any, ...]  # one per layer group, each owned by that group's attention kind
    lengths: jax.Array  # [B] int32, committed entries per row
    capacity: int = struct.field(pytree_node=False)  # logical slots per row: writes at or past it are dropped

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def with_lengths(self, lengths: jax.Array) -> "Cache":
        """Commit or roll back: the cache with per-row lengths [B] (no data moves)."""
        return self.replace(lengths=jnp.asarray(lengths, jnp.int32))

    def compact(self, source_slots: jax.Array, destination_start: jax.Array) -> "Cache":
        """Move the entries at source_slots [B, T] to slots destination_start[b] + t, in every layer.

        Source slots outside [0, capacity) are skipped (their destination is left unchanged). Only the moved
        entries are read and written; lengths are not changed (commit with `with_lengths`).
        """
        entries = tuple(entry.compact(source_slots, destination_start, self.capacity) for entry in self.entries)
        return self.replace(entries=entries)


KVCache = Cache  # the name jspec 0.1 exported


def compact_destinations(source_slots: jax.Array, destination_start: jax.Array, capacity: int):
    """(clipped source slots [B, T], destination slots [B, T] with skipped moves at `capacity`) for a compact."""
    num = source_slots.shape[1]
    valid = (source_slots >= 0) & (source_slots < capacity)
    destination = jnp.where(valid, destination_start[:, None] + jnp.arange(num)[None, :], capacity)
    return jnp.clip(source_slots, 0, capacity - 1), destination


def move_slots(
    buffer: jax.Array,  # [L, B, S, ...] stacked over layers, indexed by logical slot
    source_slots: jax.Array,  # [B, T]
    destination_start: jax.Array,  # [B]
) -> jax.Array:  # [L, B, S, ...]
    """`Cache.compact` for a slot-indexed leaf: entries source_slots[b, t] move to destination_start[b] + t."""
    capacity = buffer.shape[2]
    sources, destination = compact_destinations(source_slots, destination_start, capacity)

    def move(rows, row_sources, row_destination):  # per row (vmapped: on a mesh each device moves its own rows)
        return rows.at[:, row_destination].set(rows[:, row_sources], mode="drop")

    return jax.vmap(move, in_axes=(1, 0, 0), out_axes=1)(buffer, sources, destination)


def scatter_rows(buffer: jax.Array, updates: jax.Array, slots: jax.Array) -> jax.Array:
    """buffer [B, S, ...] with updates [B, T, ...] written at slots [B, T]; slots outside [0, S) are dropped."""
    slots = jnp.where(slots < 0, buffer.shape[1], slots)  # negative indices would wrap around
    write = lambda row, row_updates, row_slots: row.at[row_slots].set(row_updates, mode="drop")  # noqa: E731
    return jax.vmap(write)(buffer, updates.astype(buffer.dtype), slots)


def scatter_layer_rows(buffer: jax.Array, layer: jax.Array | int, updates: jax.Array, slots: jax.Array) -> jax.Array:
    """buffer [L, B, S, ...] with updates [B, T, ...] written into layer `layer` at slots [B, T] (others dropped).

    Writes only the chunk's entries (no copy of the layer), so it runs in place inside a scan over layers."""
    slots = jnp.where(slots < 0, buffer.shape[2], slots)
    # one scatter per row, vmapped: the rows are the scatter's batch dimension, so on a mesh each device writes
    # its own rows (no all-gather of the updates across the batch axis)
    write = lambda rows, row_updates, row_slots: rows.at[layer, row_slots].set(row_updates, mode="drop")  # noqa: E731
    return jax.vmap(write, in_axes=(1, 0, 0), out_axes=1)(buffer, updates.astype(buffer.dtype), slots)
