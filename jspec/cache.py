"""The KV cache: per-layer K and V leaves, per-row committed lengths, static capacity.

Invariants every strategy relies on:
- Slot s of row b holds the key/value of that row's token at cache position s, for s < lengths[b].
  Slots at or beyond lengths[b] may hold stale entries (a rolled-back draft, a diffusion block that was not
  committed); masks built from `lengths` never let a query see them unless the caller wrote them this step.
- Writes scatter a chunk of tokens to explicit per-row slots; a slot outside [0, capacity) is dropped, which
  is how padded tokens of a ragged chunk are kept out of the cache.
- Rollback is a change of `lengths`, never a copy. Tree verification keeps an accepted path with
  `compact`, which moves only the accepted entries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import struct

if TYPE_CHECKING:
    from jspec.models.config import TransformerConfig


@struct.dataclass
class KVCache:
    keys: tuple[jax.Array, ...]  # per layer [B, S, Hkv, D]
    values: tuple[jax.Array, ...]  # per layer [B, S, Hkv, D]
    lengths: jax.Array  # [B] int32, committed entries per row

    @classmethod
    def create(cls, config: TransformerConfig, batch_size: int, capacity: int, num_layers: int | None = None) -> "KVCache":
        """An empty cache of `capacity` slots per row; every row starts at length 0."""
        if capacity < 1:
            raise ValueError(f"cache capacity: expected a positive int, got {capacity}")
        shape = (batch_size, capacity, config.num_kv_heads, config.head_size)
        layers = config.num_layers if num_layers is None else num_layers
        zeros = lambda: jnp.zeros(shape, jnp.dtype(config.dtype))  # noqa: E731
        return cls(
            keys=tuple(zeros() for _ in range(layers)),
            values=tuple(zeros() for _ in range(layers)),
            lengths=jnp.zeros((batch_size,), jnp.int32),
        )

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def with_lengths(self, lengths: jax.Array) -> "KVCache":
        """Commit or roll back: the cache with per-row lengths [B] (no data moves)."""
        return self.replace(lengths=jnp.asarray(lengths, jnp.int32))

    def write_layer(self, layer: int, keys: jax.Array, values: jax.Array, slots: jax.Array) -> "KVCache":
        """Scatter keys/values [B, T, Hkv, D] of one layer into slots [B, T]; out-of-range slots are dropped."""
        new_keys = list(self.keys)
        new_values = list(self.values)
        new_keys[layer] = scatter_rows(self.keys[layer], keys, slots)
        new_values[layer] = scatter_rows(self.values[layer], values, slots)
        return self.replace(keys=tuple(new_keys), values=tuple(new_values))

    def compact(self, source_slots: jax.Array, destination_start: jax.Array) -> "KVCache":
        """Move entries source_slots [B, T] of every layer to destination_start[b] + t (tree path compaction).

        Source slots outside [0, capacity) are skipped (their destination is left unchanged). Only the moved
        entries are read and written; lengths are not changed (commit with `with_lengths`).
        """
        batch, num = source_slots.shape
        valid = (source_slots >= 0) & (source_slots < self.capacity)
        gather_slots = jnp.clip(source_slots, 0, self.capacity - 1)
        destination = jnp.where(valid, destination_start[:, None] + jnp.arange(num)[None, :], self.capacity)
        rows = jnp.arange(batch)[:, None]

        def move(layer_cache: jax.Array) -> jax.Array:
            return scatter_rows(layer_cache, layer_cache[rows, gather_slots], destination)

        return self.replace(keys=tuple(map(move, self.keys)), values=tuple(map(move, self.values)))


def scatter_rows(buffer: jax.Array, updates: jax.Array, slots: jax.Array) -> jax.Array:
    """buffer [B, S, ...] with updates [B, T, ...] written at slots [B, T]; slots outside [0, S) are dropped."""
    rows = jnp.arange(buffer.shape[0])[:, None]
    slots = jnp.where(slots < 0, buffer.shape[1], slots)  # negative indices would wrap around
    return buffer.at[rows, slots].set(updates.astype(buffer.dtype), mode="drop")
