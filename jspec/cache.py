"""The decode cache: a generic container of per-layer-group entries plus per-row committed lengths.

A model creates its cache (`model.new_cache(batch_size, capacity)`); strategies only read `lengths` and
`capacity`, commit or roll back with `with_lengths`, keep a tree path with `compact`, and reorder or repeat rows
(beams, samples) with `gather_rows`. What an entry holds
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
leaves indexed by logical slot ([L, B, S, ...]). It also implements `gather_rows(rows) -> entry` (row r of the
result is row rows[r]: beams reordered, a prompt's rows repeated); `take_rows` is the common case of a leaf whose
rows are along one axis.
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

    def gather_rows(self, rows: jax.Array) -> "Cache":
        """The cache whose row r is this cache's row rows[r] [R] (R may differ from B: beams reordered, a prompt's
        rows repeated to its beams). Every entry gathers its own leaves; lengths follow the rows."""
        entries = tuple(entry.gather_rows(rows) for entry in self.entries)
        return self.replace(entries=entries, lengths=self.lengths[rows])


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
    rest = tuple(range(3, buffer.ndim))
    moved = jax.lax.gather(  # [L, B, T, ...]: buffer[:, b, sources[b, t]]
        buffer, sources[:, :, None],
        jax.lax.GatherDimensionNumbers(offset_dims=(0, *rest), collapsed_slice_dims=(2,), start_index_map=(2,),
                                       operand_batching_dims=(1,), start_indices_batching_dims=(0,)),
        slice_sizes=(buffer.shape[0], 1, 1, *buffer.shape[3:]), mode="clip")
    return _scatter_by_row(buffer, destination[:, :, None], moved, slot_axes=(2,), window_axes=(0, *rest))


def take_rows(buffer: jax.Array, rows: jax.Array, axis: int = 1) -> jax.Array:
    """`Cache.gather_rows` for one leaf: buffer with its rows (along `axis`: 1 for [L, B, ...] leaves) taken at
    rows [R]."""
    return jnp.take(buffer, rows, axis=axis, mode="clip")


def scatter_rows(buffer: jax.Array, updates: jax.Array, slots: jax.Array) -> jax.Array:
    """buffer [B, S, ...] with updates [B, T, ...] written at slots [B, T]; slots outside [0, S) are dropped."""
    slots = jnp.where(slots < 0, buffer.shape[1], slots)  # negative indices would wrap around
    return _scatter_by_row(buffer, slots[:, :, None], updates.astype(buffer.dtype), slot_axes=(1,),
                           window_axes=tuple(range(2, updates.ndim)), row_axis=0)


def scatter_layer_rows(buffer: jax.Array, layer: jax.Array | int, updates: jax.Array, slots: jax.Array) -> jax.Array:
    """buffer [L, B, S, ...] with updates [B, T, ...] written into layer `layer` at slots [B, T] (others dropped).

    Writes only the chunk's entries (no copy of the layer), so it runs in place inside a scan over layers."""
    slots = jnp.where(slots < 0, buffer.shape[2], slots)
    indices = jnp.stack([jnp.broadcast_to(jnp.asarray(layer, slots.dtype), slots.shape), slots], axis=-1)
    return _scatter_by_row(buffer, indices, updates.astype(buffer.dtype), slot_axes=(0, 2),
                           window_axes=tuple(range(2, updates.ndim)))


def _scatter_by_row(
    buffer: jax.Array,  # rows along `row_axis`
    indices: jax.Array,  # [B, T, k] int: per row, the positions along `slot_axes` (out of range: dropped)
    updates: jax.Array,  # [B, T, ...] (or with window axes elsewhere, at `window_axes` of the updates)
    slot_axes: tuple[int, ...],
    window_axes: tuple[int, ...],
    row_axis: int = 1,
) -> jax.Array:
    """A scatter whose rows are its batch dimension (operand_batching_dims): each row writes only its own row, so on
    a mesh whose batch axis splits the rows every device writes its rows locally (no gather of the updates, no
    transpose of the buffer)."""
    numbers = jax.lax.ScatterDimensionNumbers(
        update_window_dims=window_axes, inserted_window_dims=slot_axes, scatter_dims_to_operand_dims=slot_axes,
        operand_batching_dims=(row_axis,), scatter_indices_batching_dims=(0,))
    return jax.lax.scatter(buffer, indices, updates, numbers, mode="drop")
