"""InfLLM v2 block-sparse attention (`KernelOptions.attention_impl="pallas_sparse"`) for full-attention layers.

Per query token and KV head: `select_blocks` over the entry's incrementally kept compressed keys (init + local
blocks forced, top-k), then `sparse_decode_attention` over the selected blocks. A query whose sequence (itself
included) is shorter than `sparse_dense_len` attends to every block instead, through the same kernel (per row, so
a batch equals its rows decoded alone). The block table is therefore max(top_k, cdiv(sparse_dense_len - 1,
block)) wide; the GPU form iterates only a row's valid entries, the TPU form runs the padding entries as no-op
grid steps. Prefill and custom masks attend densely with XLA (as `FullAttention`), and keep the compressed keys
up to date.

Compressed keys: per layer, InfLLM v2's mean-pooled keys over kernels of `kernel_size` slots every
`kernel_stride` slots, and a per-row count of valid ones. Entries [0, count) always equal
`pallas_kernels.compress_keys` of the layer's current K contents: every write (and `compact`) first drops the
kernels that cover a slot at or after the row's first written slot (this is how a rollback is seen), then
computes the kernels completed up to the row's last written slot. A decode write of T contiguous slots computes
at most ceil(T / kernel_stride) kernels per row (no pass over the context); a long chunk (prefill) recomputes the
layer's kernels from scratch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jspec.cache import compact_destinations, move_slots, scatter_layer_rows, take_rows
from jspec.models.attention import base
from jspec.models.attention.full import FullAttention, chain_output, chain_queries, per_shard
from pallas_kernels import compress_keys, num_full_kernels, select_blocks, sparse_decode_attention, update_compressed_keys

# A write of more than this many kernels' worth of slots (a prefill) recomputes compressed keys from scratch:
# the incremental update unrolls one dynamic slice per new kernel.
MAX_INCREMENTAL_KERNELS = 8


@struct.dataclass
class SparseKVEntry:
    keys: jax.Array  # [L, B, S, Hkv, Dh]
    values: jax.Array  # [L, B, S, Hkv, Dh]
    compressed_keys: jax.Array  # [L, B, Nc, Hkv, Dh], Nc = num_full_kernels(S)
    num_compressed: jax.Array  # [L, B] int32: valid compressed keys per layer and row
    compression: tuple[int, int] = struct.field(pytree_node=False)  # (kernel_size, kernel_stride)

    def write(self, layer: jax.Array, keys: jax.Array, values: jax.Array, slots: jax.Array) -> "SparseKVEntry":
        """Scatter one layer's chunk [B, T, Hkv, Dh] to slots [B, T], then bring its compressed keys up to date."""
        entry = self.replace(keys=scatter_layer_rows(self.keys, layer, keys, slots),
                             values=scatter_layer_rows(self.values, layer, values, slots))
        compressed, count = refresh_compressed(entry.keys[layer], entry.compressed_keys[layer],
                                               entry.num_compressed[layer], slots, *self.compression)
        return entry.replace(compressed_keys=entry.compressed_keys.at[layer].set(compressed),
                             num_compressed=entry.num_compressed.at[layer].set(count))

    def compact(self, source_slots: jax.Array, destination_start: jax.Array, capacity: int) -> "SparseKVEntry":
        keys = move_slots(self.keys, source_slots, destination_start)
        _, destination = compact_destinations(source_slots, destination_start, capacity)
        refresh = jax.vmap(lambda k, c, n: refresh_compressed(k, c, n, destination, *self.compression))
        compressed, count = refresh(keys, self.compressed_keys, self.num_compressed)
        return self.replace(keys=keys, values=move_slots(self.values, source_slots, destination_start),
                            compressed_keys=compressed, num_compressed=count)

    def gather_rows(self, rows: jax.Array) -> "SparseKVEntry":
        return jax.tree.map(lambda leaf: take_rows(leaf, rows), self)  # every leaf is [L, B, ...] (counts [L, B])


def refresh_compressed(
    keys: jax.Array,  # [B, S, Hkv, Dh], one layer, after the write
    compressed: jax.Array,  # [B, Nc, Hkv, Dh]
    count: jax.Array,  # [B] int32
    slots: jax.Array,  # [B, T] the slots just (re)written; out-of-range ones are ignored
    kernel_size: int,
    stride: int,
) -> tuple[jax.Array, jax.Array]:  # compressed [B, Nc, Hkv, Dh], count [B]
    """Compressed keys after slots [B, T] of K were (re)written (module docstring). Rows with no in-range slot are
    unchanged. If a row's written slots span more than T slots, kernels beyond ceil(T / stride) new ones are caught
    up by later writes (the count says how far it got)."""
    capacity, width = keys.shape[1], slots.shape[1]
    in_range = (slots >= 0) & (slots < capacity)
    first = jnp.min(jnp.where(in_range, slots, capacity), axis=1)  # [B]
    end = jnp.max(jnp.where(in_range, slots + 1, 0), axis=1)  # [B]
    count = jnp.minimum(count, num_full_kernels(first, kernel_size, stride))
    # rows without a write: an end whose full-kernel count is exactly `count` (nothing to compute)
    unchanged_end = jnp.where(count > 0, kernel_size + (count - 1) * stride, 0)
    end = jnp.where(in_range.any(axis=1), end, unchanged_end).astype(jnp.int32)
    max_new = -(-width // stride)
    if max_new > MAX_INCREMENTAL_KERNELS:
        return compress_keys(keys, end, kernel_size, stride)
    return update_compressed_keys(compressed, count, keys, end, kernel_size=kernel_size, kernel_stride=stride,
                                  max_new_kernels=max_new)


@dataclasses.dataclass(frozen=True)
class SparseAttention(FullAttention):
    """InfLLM v2 block-sparse decode attention (module docstring). Guarantee: equals softmax attention restricted
    to the blocks `sparse_block_indices` selects; with top_k covering every block it equals `FullAttention`."""

    kernel_size: int = 32
    kernel_stride: int = 16
    init_blocks: int = 1
    local_blocks: int = 32
    top_k: int = 64
    dense_len: int = 8192

    @classmethod
    def from_options(cls, kernels: Any) -> "SparseAttention":
        return cls(impl="pallas_sparse", interpret=kernels.attention_interpret, block_size=kernels.sparse_block_size,
                   kernel_size=kernels.sparse_kernel_size, kernel_stride=kernels.sparse_kernel_stride,
                   init_blocks=kernels.sparse_init_blocks, local_blocks=kernels.sparse_local_blocks,
                   top_k=kernels.sparse_top_k, dense_len=kernels.sparse_dense_len, sharding=kernels.sharding)

    def new_entry(self, config: Any, num_layers: int, batch_size: int, capacity: int, chunk: int) -> SparseKVEntry:
        dense = super().new_entry(config, num_layers, batch_size, capacity, chunk)
        num_kernels = num_full_kernels(capacity, self.kernel_size, self.kernel_stride)
        shape = (num_layers, batch_size, num_kernels, config.num_kv_heads, config.head_size)
        return SparseKVEntry(dense.keys, dense.values, jnp.zeros(shape, config.dtype),
                             jnp.zeros((num_layers, batch_size), jnp.int32), (self.kernel_size, self.kernel_stride))

    def entry_axes(self, config: Any) -> SparseKVEntry:
        return SparseKVEntry(base.kv_axes(), base.kv_axes(), ("layers", "batch", "compressed_seq", "kv_heads", "head_dim"),
                             ("layers", "batch"), (self.kernel_size, self.kernel_stride))

    def check_entry(self, entry: Any, capacity: int) -> None:
        geometry = (self.kernel_size, self.kernel_stride)
        if type(entry) is not SparseKVEntry or entry.compression != geometry:
            raise ValueError(
                f"cache: attention_impl='pallas_sparse' needs compressed keys with (kernel_size, stride) = {geometry}, "
                f"the cache holds {type(entry).__name__}; create it with model.new_cache(...)"
            )
        if capacity % self.block_size:
            raise ValueError(f"cache capacity (cache_size) {capacity} is not a multiple of the attention kernel block "
                             f"size {self.block_size} (attention_impl='pallas_sparse')")

    def kernel_attend(self, config, queries, entry: SparseKVEntry, layer, write_slots):
        q, seq_lens = chain_queries(config, queries, write_slots, entry.keys.shape[2])
        keys, values = entry.keys[layer], entry.values[layer]
        capacity, length = keys.shape[1], queries.shape[1]
        per_token = []
        for t in range(length):  # each token of the chain has its own selection, as in InfLLM v2 prefill
            token_lens = jnp.maximum(seq_lens - (length - 1 - t), 0)
            block_indices = self.block_indices(q[:, :, t], entry.compressed_keys[layer], entry.num_compressed[layer],
                                               token_lens, capacity // self.block_size)
            kernel = lambda q, k, v, lens, blocks: sparse_decode_attention(  # noqa: E731
                q[:, :, 0], k, v, lens, blocks, block_size=self.block_size, interpret=self.interpret)[0][:, :, None]
            per_token.append(per_shard(self.sharding, kernel, q[:, :, t:t + 1], keys, values, token_lens,
                                       block_indices)[:, :, 0])
        return chain_output(jnp.stack(per_token, axis=2))

    def block_indices(
        self,
        q: jax.Array,  # [B, Hkv, G, Dh], one query token per row
        compressed_keys: jax.Array,  # [B, Nc, Hkv, Dh]
        num_compressed: jax.Array,  # [B] int32, valid compressed keys (may include kernels past the query)
        seq_lens: jax.Array,  # [B] int32, the query's sequence length (itself included)
        num_blocks: int,  # static: cache capacity // block_size
    ) -> jax.Array:  # [B, Hkv, K] int32, ascending, -1 padded; K = max(top_k, dense blocks)
        """The blocks each (row, KV head) attends to: InfLLM v2's selection over the compressed keys complete at
        the query, or every block up to the query when seq_len < dense_len."""
        block_size = self.block_size
        complete = num_full_kernels(seq_lens, self.kernel_size, self.kernel_stride)
        selected = select_blocks(
            q, compressed_keys, seq_lens, kernel_size=self.kernel_size, kernel_stride=self.kernel_stride,
            block_size=block_size, init_blocks=self.init_blocks, local_blocks=self.local_blocks, top_k=self.top_k,
            num_compressed=jnp.minimum(num_compressed, complete), num_blocks=num_blocks,
        )
        dense_width = min(num_blocks, -(-max(self.dense_len - 1, 0) // block_size))
        width = max(self.top_k, dense_width)
        selected = jnp.pad(selected, ((0, 0), (0, 0), (0, width - self.top_k)), constant_values=-1)
        blocks = jnp.arange(width, dtype=jnp.int32)[None, :]
        every_block = jnp.where((blocks < num_blocks) & (blocks * block_size < seq_lens[:, None]), blocks, -1)
        dense = (seq_lens < self.dense_len)[:, None, None]
        return jnp.where(dense, every_block[:, None, :], selected)
