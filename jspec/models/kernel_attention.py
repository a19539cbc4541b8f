"""Decode attention through the Pallas kernels, chosen by `TransformerConfig.attention_impl`.

`transformer.forward` calls `kernel_attend` instead of `layers.attend` when `uses_kernels` holds (a static
decision): a non-"xla" `attention_impl`, a cache, the default causal mask (`mask=None`) and a decode-sized chunk
of at most `MAX_CHAIN_TOKENS` tokens. Everything else stays on XLA: prefill (longer chunks), and any custom mask
(tree verification, diffusion blocks, drafting levels), since the kernels only know causal chains over a prefix.

The kernel path reads the chunk as a causal chain: row b's token t sits at cache slot write_slots[b, 0] + t and
sees every slot up to its own. That is exactly the default causal-by-slot mask when a row's in-range write
slots are contiguous from write_slots[b, 0] (what every strategy writes: the decode token at `lengths`, a
draft model's [lengths - 1, lengths]) and the chain fits in the cache. Rows whose slots are out of range
(finished or padding rows at slot = capacity) get clamped lengths and outputs that must be ignored, as on the
XLA path. Not supported (unlike XLA): a row whose chain runs past the capacity (its in-range tokens are then
misaligned too; strategies finish such rows first, see `mark_cache_full`) or whose slots have gaps.

- "pallas_dense": `pallas_kernels.decode_attention` (flash decoding; sliding windows supported).
- "pallas_sparse": InfLLM v2. Per query token and KV head: `select_blocks` over the cache's incrementally kept
  compressed keys (init + local blocks forced, top-k), then `sparse_decode_attention` over the selected
  blocks. A query whose sequence (itself included) is shorter than `sparse_dense_len` attends to every block
  instead, through the same kernel (per row, so a batch equals its rows decoded alone). The block table is
  therefore max(top_k, cdiv(sparse_dense_len - 1, block)) wide (128 for the defaults); the GPU form iterates
  only a row's valid entries, the TPU form runs the padding entries as no-op grid steps (no DMA).
  The compressed keys are kept by `KVCache` itself (every write updates them; see jspec/cache.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jspec.cache import KVCache
from jspec.models.config import TransformerConfig
from pallas_kernels import decode_attention, num_full_kernels, select_blocks, sparse_decode_attention

MAX_CHAIN_TOKENS = 8  # longest causal chunk (tokens per row) that runs through the decode kernels


def uses_kernels(config: TransformerConfig, cache: KVCache | None, mask: jax.Array | None, num_tokens: int) -> bool:
    """Whether `forward` attends with the Pallas kernels (static: config, cache presence, mask presence, T)."""
    return config.attention_impl != "xla" and cache is not None and mask is None and num_tokens <= MAX_CHAIN_TOKENS


def check_cache(config: TransformerConfig, cache: KVCache) -> None:
    """Raise a ValueError when `cache` cannot serve `config.attention_impl` (capacity, missing compressed keys)."""
    multiple = config.cache_size_multiple
    if cache.capacity % multiple:
        raise ValueError(
            f"cache capacity (cache_size) {cache.capacity} is not a multiple of the attention kernel block size "
            f"{multiple} (attention_impl={config.attention_impl!r})"
        )
    if config.attention_impl == "pallas_sparse":
        geometry = (config.sparse_kernel_size, config.sparse_kernel_stride)
        if cache.compression != geometry:
            raise ValueError(
                f"cache: attention_impl='pallas_sparse' needs compressed keys with (kernel_size, stride) = {geometry}, "
                f"the cache has {cache.compression}; create it with KVCache.create(config, ...)"
            )


def kernel_attend(
    config: TransformerConfig,
    queries: jax.Array,  # [B, T, H, D], T <= MAX_CHAIN_TOKENS
    cache: KVCache,  # with this chunk's keys/values already written
    layer: int,
    write_slots: jax.Array,  # [B, T] int32, the chunk's cache slots
) -> jax.Array:  # [B, T, H, D]
    """Causal-chain attention of the chunk over the cache with the configured kernel (see the module docstring).

    Guarantee: "pallas_dense" equals `layers.attend` with the default causal mask (to float32 accumulation);
    "pallas_sparse" equals softmax attention restricted to the blocks `sparse_block_indices` selects.
    """
    batch, length, num_heads, head_dim = queries.shape
    num_kv_heads = config.num_kv_heads
    q = queries.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim).transpose(0, 2, 1, 3, 4)
    keys, values = cache.keys[layer], cache.values[layer]
    seq_lens = jnp.clip(write_slots[:, 0] + length, 0, cache.capacity).astype(jnp.int32)  # [B], chain included
    if config.attention_impl == "pallas_dense":
        out, _ = decode_attention(
            q, keys, values, seq_lens, block_size=config.dense_block_size,
            interpret=config.attention_interpret, sliding_window=config.sliding_window,
        )
    else:
        per_token = []
        for t in range(length):  # each token of the chain has its own selection, as in InfLLM v2 prefill
            token_lens = jnp.maximum(seq_lens - (length - 1 - t), 0)
            block_indices = sparse_block_indices(
                config, q[:, :, t], cache.compressed_keys[layer], cache.num_compressed[layer], token_lens,
                cache.capacity // config.sparse_block_size,
            )
            out_t, _ = sparse_decode_attention(
                q[:, :, t], keys, values, token_lens, block_indices, block_size=config.sparse_block_size,
                interpret=config.attention_interpret,
            )
            per_token.append(out_t)
        out = jnp.stack(per_token, axis=2)
    return out.transpose(0, 2, 1, 3, 4).reshape(batch, length, num_heads, head_dim)


def sparse_block_indices(
    config: TransformerConfig,
    q: jax.Array,  # [B, Hkv, G, D], one query token per row
    compressed_keys: jax.Array,  # [B, Nc, Hkv, D]
    num_compressed: jax.Array,  # [B] int32, valid compressed keys (may include kernels past the query)
    seq_lens: jax.Array,  # [B] int32, the query's sequence length (itself included)
    num_blocks: int,  # static: cache capacity // sparse_block_size
) -> jax.Array:  # [B, Hkv, K] int32, ascending, -1 padded; K = max(top_k, dense blocks)
    """The blocks each (row, KV head) attends to: InfLLM v2's selection (`select_blocks` over the compressed
    keys complete at the query), or every block up to the query when seq_len < sparse_dense_len."""
    block_size = config.sparse_block_size
    complete = num_full_kernels(seq_lens, config.sparse_kernel_size, config.sparse_kernel_stride)
    count = jnp.minimum(num_compressed, complete)  # kernels complete at the query
    selected = select_blocks(
        q, compressed_keys, seq_lens, kernel_size=config.sparse_kernel_size, kernel_stride=config.sparse_kernel_stride,
        block_size=block_size, init_blocks=config.sparse_init_blocks, local_blocks=config.sparse_local_blocks,
        top_k=config.sparse_top_k, num_compressed=count, num_blocks=num_blocks,
    )
    dense_width = min(num_blocks, -(-max(config.sparse_dense_len - 1, 0) // block_size))
    width = max(config.sparse_top_k, dense_width)
    selected = jnp.pad(selected, ((0, 0), (0, 0), (0, width - config.sparse_top_k)), constant_values=-1)
    blocks = jnp.arange(width, dtype=jnp.int32)[None, :]
    every_block = jnp.where((blocks < num_blocks) & (blocks * block_size < seq_lens[:, None]), blocks, -1)  # [B, K]
    dense = (seq_lens < config.sparse_dense_len)[:, None, None]
    return jnp.where(dense, every_block[:, None, :], selected)
