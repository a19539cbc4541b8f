"""The KV cache: per-layer K and V leaves, per-row committed lengths, static capacity.

Invariants every strategy relies on:
- Slot s of row b holds the key/value of that row's token at cache position s, for s < lengths[b].
  Slots at or beyond lengths[b] may hold stale entries (a rolled-back draft, a diffusion block that was not
  committed); masks built from `lengths` never let a query see them unless the caller wrote them this step.
- Writes scatter a chunk of tokens to explicit per-row slots; a slot outside [0, capacity) is dropped, which
  is how padded tokens of a ragged chunk are kept out of the cache.
- Rollback is a change of `lengths`, never a copy. Tree verification keeps an accepted path with
  `compact`, which moves only the accepted entries.
- Compressed keys (only for `attention_impl="pallas_sparse"`, else None): per layer, InfLLM v2's mean-pooled
  keys over kernels of `kernel_size` slots every `kernel_stride` slots, and a per-row count of valid ones.
  Entries [0, count) always equal `pallas_kernels.compress_keys` of the layer's current K contents: every write
  (and `compact`) first drops the kernels that cover a slot at or after the row's first written slot (this is
  how a rollback is seen), then computes the kernels completed up to the row's last written slot. A decode
  write of T contiguous slots computes at most ceil(T / kernel_stride) kernels per row (no pass over the
  context); a long chunk (prefill) recomputes the layer's kernels from scratch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import struct

from pallas_kernels.block_selection import compress_keys, num_full_kernels, update_compressed_keys

if TYPE_CHECKING:
    from jspec.models.config import TransformerConfig

# A write of more than this many kernels' worth of slots (a prefill) recomputes compressed keys from scratch:
# the incremental update unrolls one dynamic slice per new kernel.
MAX_INCREMENTAL_KERNELS = 8


@struct.dataclass
class KVCache:
    keys: tuple[jax.Array, ...]  # per layer [B, S, Hkv, D]
    values: tuple[jax.Array, ...]  # per layer [B, S, Hkv, D]
    lengths: jax.Array  # [B] int32, committed entries per row
    compressed_keys: tuple[jax.Array, ...] | None = None  # per layer [B, Nc, Hkv, D], Nc = num_full_kernels(S)
    num_compressed: tuple[jax.Array, ...] | None = None  # per layer [B] int32, valid compressed keys per row
    compression: tuple[int, int] | None = struct.field(pytree_node=False, default=None)  # (kernel_size, stride)

    @classmethod
    def create(cls, config: TransformerConfig, batch_size: int, capacity: int, num_layers: int | None = None) -> "KVCache":
        """An empty cache of `capacity` slots per row; every row starts at length 0.

        With `config.attention_impl` "pallas_dense" / "pallas_sparse", `capacity` must be a multiple of the
        kernel's block size (`config.cache_size_multiple`); "pallas_sparse" also allocates compressed keys.
        """
        if capacity < 1:
            raise ValueError(f"cache capacity: expected a positive int, got {capacity}")
        multiple = config.cache_size_multiple
        if capacity % multiple:
            raise ValueError(
                f"cache capacity (cache_size) {capacity} is not a multiple of the attention kernel block size "
                f"{multiple} (attention_impl={config.attention_impl!r}); use cache_size="
                f"{-(-capacity // multiple) * multiple}"
            )
        shape = (batch_size, capacity, config.num_kv_heads, config.head_size)
        layers = config.num_layers if num_layers is None else num_layers
        dtype = jnp.dtype(config.dtype)
        zeros = lambda: jnp.zeros(shape, dtype)  # noqa: E731
        compressed = {}
        if config.attention_impl == "pallas_sparse":
            kernel_size, stride = config.sparse_kernel_size, config.sparse_kernel_stride
            compressed_shape = (batch_size, num_full_kernels(capacity, kernel_size, stride)) + shape[2:]
            compressed = dict(
                compressed_keys=tuple(jnp.zeros(compressed_shape, dtype) for _ in range(layers)),
                num_compressed=tuple(jnp.zeros((batch_size,), jnp.int32) for _ in range(layers)),
                compression=(kernel_size, stride),
            )
        return cls(
            keys=tuple(zeros() for _ in range(layers)),
            values=tuple(zeros() for _ in range(layers)),
            lengths=jnp.zeros((batch_size,), jnp.int32),
            **compressed,
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
        return self.replace(keys=tuple(new_keys), values=tuple(new_values))._refresh_compressed(layer, slots)

    def _refresh_compressed(self, layer: int, slots: jax.Array) -> "KVCache":
        """Bring layer's compressed keys up to date after slots [B, T] of its K were (re)written.

        Per row: kernels covering a slot >= the first written slot are dropped, then kernels completed up to the
        last written slot are computed from the current K. Rows with no in-range slot are unchanged. If a row's
        written slots span more than T slots, kernels beyond ceil(T / stride) new ones are caught up by later
        writes (the count says how far it got).
        """
        if self.compression is None:
            return self
        kernel_size, stride = self.compression
        capacity, width = self.capacity, slots.shape[1]
        in_range = (slots >= 0) & (slots < capacity)
        first = jnp.min(jnp.where(in_range, slots, capacity), axis=1)  # [B]
        end = jnp.max(jnp.where(in_range, slots + 1, 0), axis=1)  # [B]
        count = jnp.minimum(self.num_compressed[layer], num_full_kernels(first, kernel_size, stride))
        # rows without a write: an end whose full-kernel count is exactly `count` (nothing to compute)
        unchanged_end = jnp.where(count > 0, kernel_size + (count - 1) * stride, 0)
        end = jnp.where(in_range.any(axis=1), end, unchanged_end).astype(jnp.int32)
        max_new = -(-width // stride)
        if max_new > MAX_INCREMENTAL_KERNELS:
            compressed, count = compress_keys(self.keys[layer], end, kernel_size, stride)
        else:
            compressed, count = update_compressed_keys(
                self.compressed_keys[layer], count, self.keys[layer], end,
                kernel_size=kernel_size, kernel_stride=stride, max_new_kernels=max_new,
            )
        new_compressed, new_count = list(self.compressed_keys), list(self.num_compressed)
        new_compressed[layer], new_count[layer] = compressed, count
        return self.replace(compressed_keys=tuple(new_compressed), num_compressed=tuple(new_count))

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

        moved = self.replace(keys=tuple(map(move, self.keys)), values=tuple(map(move, self.values)))
        for layer in range(len(self.keys)):
            moved = moved._refresh_compressed(layer, destination)
        return moved


def scatter_rows(buffer: jax.Array, updates: jax.Array, slots: jax.Array) -> jax.Array:
    """buffer [B, S, ...] with updates [B, T, ...] written at slots [B, T]; slots outside [0, S) are dropped."""
    rows = jnp.arange(buffer.shape[0])[:, None]
    slots = jnp.where(slots < 0, buffer.shape[1], slots)  # negative indices would wrap around
    return buffer.at[rows, slots].set(updates.astype(buffer.dtype), mode="drop")
