"""Full causal grouped-query attention over a cache indexed by slot: XLA, or the Pallas dense decode kernel.

The kernel path (`KernelOptions.attention_impl="pallas_dense"`) serves decode-sized chunks: a cache, the default
causal mask (`mask=None`) and at most `MAX_CHAIN_TOKENS` tokens per row. It reads the chunk as a causal chain:
row b's token t sits at cache slot write_slots[b, 0] + t and sees every slot up to its own. That is exactly the
default causal-by-slot mask when a row's in-range write slots are contiguous from write_slots[b, 0] (what every
strategy writes: the decode token at `lengths`, a chain verification, a draft model's [lengths - 1, lengths]) and
the chain fits in the cache. Rows whose slots are out of range (finished or padding rows at slot = capacity) get
clamped lengths and outputs that must be ignored, as on the XLA path. Everything else (prefill, any custom mask:
tree verification, diffusion blocks) attends with XLA.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec as P

from jspec import masks
from jspec.cache import move_slots, scatter_layer_rows, take_rows
from jspec.models.attention import base
from jspec.models.layers import attend, rope_tables
from pallas_kernels import decode_attention

MAX_CHAIN_TOKENS = 8  # longest causal chunk (tokens per row) that runs through the decode kernels


@struct.dataclass
class KVEntry:
    """Per-slot keys and values of a group of layers."""

    keys: jax.Array  # [L, B, S, Hkv, Dh]
    values: jax.Array  # [L, B, S, Hkv, Dh]

    def write(self, layer: jax.Array, keys: jax.Array, values: jax.Array, slots: jax.Array) -> "KVEntry":
        """Scatter one layer's chunk keys/values [B, T, Hkv, Dh] to slots [B, T] (out-of-range slots dropped)."""
        return self.replace(keys=scatter_layer_rows(self.keys, layer, keys, slots),
                            values=scatter_layer_rows(self.values, layer, values, slots))

    def compact(self, source_slots: jax.Array, destination_start: jax.Array, capacity: int) -> "KVEntry":
        return self.replace(keys=move_slots(self.keys, source_slots, destination_start),
                            values=move_slots(self.values, source_slots, destination_start))

    def gather_rows(self, rows: jax.Array) -> "KVEntry":
        return jax.tree.map(lambda leaf: take_rows(leaf, rows), self)  # every leaf is [L, B, ...]


@dataclasses.dataclass(frozen=True)
class FullContext:
    cos: jax.Array  # [B, T, Dh]
    sin: jax.Array  # [B, T, Dh]
    mask: jax.Array | None  # [B, T, S] bool; None on the kernel path
    write_slots: jax.Array | None  # [B, T]
    use_kernels: bool


@dataclasses.dataclass(frozen=True)
class FullAttention:
    """Causal grouped-query attention over every earlier slot (Llama, Qwen, Mistral without a window)."""

    impl: str = "xla"  # "xla" | "pallas_dense"
    interpret: bool | None = None
    block_size: int = 128  # keys per step of the dense kernel; cache capacities are multiples of it
    sharding: Any = None  # the model's `MeshSharding`: kernels then run per shard under `jax.shard_map`

    init_params = staticmethod(base.gqa_init_params)
    param_axes = staticmethod(base.gqa_param_axes)

    @property
    def cache_size_multiple(self) -> int:
        return 1 if self.impl == "xla" else self.block_size

    def new_entry(self, config: Any, num_layers: int, batch_size: int, capacity: int, chunk: int) -> KVEntry:
        shape = (num_layers, batch_size, capacity, config.num_kv_heads, config.head_size)
        return KVEntry(keys=jnp.zeros(shape, config.dtype), values=jnp.zeros(shape, config.dtype))

    def entry_axes(self, config: Any) -> KVEntry:
        return KVEntry(keys=base.kv_axes(), values=base.kv_axes())

    def check_entry(self, entry: Any, capacity: int) -> None:
        """Raise a ValueError when `entry` cannot serve this kind (another kind's entry, a capacity the kernel
        cannot read in whole blocks)."""
        if type(entry) is not KVEntry:
            raise ValueError(f"cache: a {type(self).__name__} layer needs a KVEntry, the cache holds "
                             f"{type(entry).__name__}; create caches with model.new_cache(...)")
        if capacity % self.cache_size_multiple:
            raise ValueError(
                f"cache capacity (cache_size) {capacity} is not a multiple of the attention kernel block size "
                f"{self.cache_size_multiple} (attention_impl={self.impl!r}); create caches with model.new_cache(...)"
            )

    def prepare(self, config, entry, positions, write_slots, mask, capacity) -> FullContext:
        cos, sin = rope_tables(positions, config)
        batch, length = positions.shape
        if entry is None:
            if mask is None:
                query_slots = jnp.broadcast_to(jnp.arange(length)[None, :], (batch, length))
                mask = masks.causal_mask(query_slots, length)
            return FullContext(cos, sin, mask, None, False)
        self.check_entry(entry, capacity)
        use_kernels = self.impl != "xla" and mask is None and length <= MAX_CHAIN_TOKENS
        if mask is None and not use_kernels:
            mask = masks.causal_mask(write_slots, capacity)
        return FullContext(cos, sin, mask, write_slots, use_kernels)

    def apply(self, params, config, normed, entry, layer, context: FullContext):
        queries, keys, values = base.gqa_project(params, config, normed, context.cos, context.sin)
        if entry is None:
            return base.gqa_output(params, attend(queries, keys, values, context.mask)), None
        entry = self.write(entry, layer, keys, values, context.write_slots)
        if context.use_kernels:
            attended = self.kernel_attend(config, queries, entry, layer, context.write_slots)
        else:
            attended = attend(queries, entry.keys[layer], entry.values[layer], context.mask)
        return base.gqa_output(params, attended), entry

    def write(self, entry, layer, keys, values, slots):
        return entry.write(layer, keys, values, slots)

    def finish(self, entry: Any, context: Any) -> Any:
        return entry

    def kernel_attend(
        self,
        config: Any,
        queries: jax.Array,  # [B, T, H, Dh], T <= MAX_CHAIN_TOKENS
        entry: KVEntry,  # with this chunk's keys/values already written
        layer: jax.Array,
        write_slots: jax.Array,  # [B, T] int32
    ) -> jax.Array:  # [B, T, H, Dh]
        """Causal-chain attention of the chunk through the dense decode kernel (see the module docstring).
        Guarantee: equals `layers.attend` with the default causal mask (to float32 accumulation)."""
        q, seq_lens = chain_queries(config, queries, write_slots, entry.keys.shape[2])
        kernel = lambda q, k, v, lens: decode_attention(q, k, v, lens, block_size=self.block_size,  # noqa: E731
                                                        interpret=self.interpret)[0]
        return chain_output(per_shard(self.sharding, kernel, q, entry.keys[layer], entry.values[layer], seq_lens))


def chain_queries(config: Any, queries: jax.Array, write_slots: jax.Array, capacity: int):
    """Queries [B, T, H, Dh] as the kernels read them [B, Hkv, T, G, Dh], and each row's sequence length [B]
    (the chain included, clamped into the cache)."""
    batch, length, num_heads, head_dim = queries.shape
    groups = num_heads // config.num_kv_heads
    q = queries.reshape(batch, length, config.num_kv_heads, groups, head_dim).transpose(0, 2, 1, 3, 4)
    seq_lens = jnp.clip(write_slots[:, 0] + length, 0, capacity).astype(jnp.int32)
    return q, seq_lens


def per_shard(
    sharding: Any,
    kernel: Callable,  # (q, k, v, seq_lens, *per_head) -> out [B, Hkv, T, G, Dh]
    q: jax.Array,  # [B, Hkv, T, G, Dh]
    k: jax.Array,  # [B, S, Hkv, Dh]
    v: jax.Array,  # [B, S, Hkv, Dh]
    seq_lens: jax.Array,  # [B]
    *per_head: jax.Array,  # [B, Hkv, ...] (e.g. block tables)
    split_groups: bool = True,
) -> jax.Array:  # [B, Hkv, T, G, Dh]
    """A decode kernel on a mesh: under `jax.shard_map`, each device runs it on its rows (the batch axis) and its
    heads. Heads split along KV heads when the model axis divides them; else (KV heads replicated) along the
    query heads of each KV head when it divides those and `split_groups`; else every device of the model axis
    computes all heads of its rows. No cache-sized operand moves: K/V enter with the cache's own sharding.
    Without a mesh: the kernel itself."""
    if sharding is None:
        return kernel(q, k, v, seq_lens, *per_head)
    batch, num_kv_heads, _, groups, _ = q.shape
    rows = sharding.spec(("batch",))[0] if batch % sharding.axis_size("batch") == 0 else None
    heads = sharding.spec(("kv_heads",), (num_kv_heads,))[0]
    group_axis = None
    if heads is None and split_groups and groups % sharding.axis_size("kv_heads") == 0:
        group_axis = dict(sharding.rules).get("kv_heads")
    q_spec = P(rows, heads, None, group_axis, None)
    kv_spec = P(rows, None, heads, None)
    head_specs = tuple(P(rows, heads, *([None] * (x.ndim - 2))) for x in per_head)
    return jax.shard_map(kernel, mesh=sharding.mesh, in_specs=(q_spec, kv_spec, kv_spec, P(rows), *head_specs),
                         out_specs=q_spec, check_vma=False)(q, k, v, seq_lens, *per_head)


def chain_output(out: jax.Array) -> jax.Array:  # [B, Hkv, T, G, Dh] -> [B, T, H, Dh]
    batch, num_kv_heads, length, groups, head_dim = out.shape
    return out.transpose(0, 2, 1, 3, 4).reshape(batch, length, num_kv_heads * groups, head_dim)


def full_attention(config: Any, kernels: Any, layer: int):
    """The "full_attention" kind for `kernels`: XLA / Pallas dense (`FullAttention`) or InfLLM v2 sparse."""
    if kernels.attention_impl == "pallas_sparse":
        from jspec.models.attention.sparse import SparseAttention

        return SparseAttention.from_options(kernels)
    return FullAttention(kernels.attention_impl, kernels.attention_interpret, kernels.dense_block_size, kernels.sharding)
