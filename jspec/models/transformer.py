"""A decoder-only transformer (Llama / Mistral / Qwen2 / Qwen3) as pure functions over a parameter pytree.

`forward` is the one entry: prefill, single-token decode, tree verification and bidirectional diffusion
blocks are calls of it with different tokens, positions, write slots and masks.

Parameter pytree (nested dicts; shapes for hidden D, heads H, KV heads Hkv, head dim Dh, MLP F, vocab V):
    embed      [V, D]
    layers     list of {attn_norm [D], q [D, H*Dh], k [D, Hkv*Dh], v [D, Hkv*Dh], o [H*Dh, D],
                        (q_bias [H*Dh], k_bias [Hkv*Dh], v_bias [Hkv*Dh] if qkv_bias),
                        (q_norm [Dh], k_norm [Dh] if qk_norm),
                        mlp_norm [D], gate [D, F], up [D, F], down [F, D]}
    final_norm [D]
    lm_head    [D, V]   (absent when embeddings are tied)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jspec import masks
from jspec.cache import KVCache
from jspec.models import kernel_attention
from jspec.models.config import TransformerConfig
from jspec.models.layers import apply_rope, attend, rms_norm, rope_tables

Params = dict[str, Any]


def init_params(config: TransformerConfig, key: jax.Array, init_scale: float = 0.02) -> Params:
    """Random parameters: weights ~ N(0, init_scale^2), norms = 1, biases ~ N(0, init_scale^2)."""
    dtype = jnp.dtype(config.dtype)
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q_dim = config.num_heads * config.head_size
    kv_dim = config.num_kv_heads * config.head_size
    keys = iter(jax.random.split(key, 4 + 10 * config.num_layers))

    def normal(shape):
        return (init_scale * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    def layer():
        params = {
            "attn_norm": jnp.ones((d,), dtype),
            "q": normal((d, q_dim)),
            "k": normal((d, kv_dim)),
            "v": normal((d, kv_dim)),
            "o": normal((q_dim, d)),
            "mlp_norm": jnp.ones((d,), dtype),
            "gate": normal((d, f)),
            "up": normal((d, f)),
            "down": normal((f, d)),
        }
        if config.qkv_bias:
            params.update(q_bias=normal((q_dim,)), k_bias=normal((kv_dim,)), v_bias=normal((kv_dim,)))
        if config.qk_norm:
            params.update(q_norm=jnp.ones((config.head_size,), dtype), k_norm=jnp.ones((config.head_size,), dtype))
        return params

    params: Params = {
        "embed": normal((v, d)),
        "layers": [layer() for _ in range(config.num_layers)],
        "final_norm": jnp.ones((d,), dtype),
    }
    if not config.tie_embeddings:
        params["lm_head"] = normal((d, v))
    return params


def param_logical_axes(config: TransformerConfig) -> Params:
    """The parameter pytree's structure with a tuple of logical axis names per leaf (for sharding rules)."""
    layer = {
        "attn_norm": ("embed",),
        "q": ("embed", "q_heads"),
        "k": ("embed", "kv_heads"),
        "v": ("embed", "kv_heads"),
        "o": ("q_heads", "embed"),
        "mlp_norm": ("embed",),
        "gate": ("embed", "mlp"),
        "up": ("embed", "mlp"),
        "down": ("mlp", "embed"),
    }
    if config.qkv_bias:
        layer.update(q_bias=("q_heads",), k_bias=("kv_heads",), v_bias=("kv_heads",))
    if config.qk_norm:
        layer.update(q_norm=("head_dim",), k_norm=("head_dim",))
    axes: Params = {
        "embed": ("vocab", "embed"),
        "layers": [dict(layer) for _ in range(config.num_layers)],
        "final_norm": ("embed",),
    }
    if not config.tie_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def forward(
    params: Params,
    config: TransformerConfig,
    tokens: jax.Array,  # [B, T] int32
    positions: jax.Array,  # [B, T] int32, RoPE positions
    cache: KVCache | None = None,
    mask: jax.Array | None = None,  # [B, T, S] bool over key slots; None: causal by slot
    *,
    write_slots: jax.Array | None = None,  # [B, T] cache slots for the chunk; None: lengths + t
    skip_layers: tuple[int, ...] = (),
    output_indices: jax.Array | None = None,  # [B, K] chunk indices whose logits are wanted; None: all
) -> tuple[jax.Array, KVCache | None]:  # logits [B, T or K, V] float32, cache
    """Run the transformer on a chunk of tokens.

    With a cache: the chunk's keys/values are written at `write_slots` (a slot outside [0, capacity) is
    dropped; padding tokens use that), then every query attends over all cache slots through `mask`.
    The cache's `lengths` are not changed: committing is the caller's decision (`cache.with_lengths`).
    Without a cache: queries attend over the chunk itself; `mask` is then [B, T, T] (None: causal).

    Guarantee: for a causal mask, prefill of a prefix followed by chunked or single-token calls gives the
    same logits (to float tolerance) as one call over the whole sequence.
    `skip_layers` (static) leaves those layers out (self-speculative drafting); their cache slots are not
    written.
    With `config.attention_impl` "pallas_dense" / "pallas_sparse" and a cache, a chunk of at most
    `kernel_attention.MAX_CHAIN_TOKENS` tokens under the default mask attends through the Pallas decode
    kernels; its in-range write slots must then be contiguous per row (see `kernel_attention`). Prefill and
    every custom mask (tree verification, diffusion) use XLA `attend`.
    """
    batch, length = tokens.shape
    if cache is not None and write_slots is None:
        write_slots = cache.lengths[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]
    if cache is not None and config.attention_impl != "xla":
        kernel_attention.check_cache(config, cache)
    use_kernels = kernel_attention.uses_kernels(config, cache, mask, length)
    if mask is None and not use_kernels:
        if cache is None:
            query_slots = jnp.broadcast_to(jnp.arange(length)[None, :], (batch, length))
            mask = masks.causal_mask(query_slots, length, config.sliding_window)
        else:
            mask = masks.causal_mask(write_slots, cache.capacity, config.sliding_window)

    cos, sin = rope_tables(positions, config)
    hidden = params["embed"][tokens]
    for index, layer in enumerate(params["layers"]):
        if index in skip_layers:
            continue
        normed = rms_norm(hidden, layer["attn_norm"], config.rms_norm_eps)
        queries, keys, values = _project_qkv(layer, config, normed, cos, sin)
        if cache is not None:
            cache = cache.write_layer(index, keys, values, write_slots)
            keys, values = cache.keys[index], cache.values[index]
        if use_kernels:
            attended = kernel_attention.kernel_attend(config, queries, cache, index, write_slots)
        else:
            attended = attend(queries, keys, values, mask)
        attended = attended.reshape(batch, length, -1)
        hidden = hidden + attended @ layer["o"]
        normed = rms_norm(hidden, layer["mlp_norm"], config.rms_norm_eps)
        hidden = hidden + (jax.nn.silu(normed @ layer["gate"]) * (normed @ layer["up"])) @ layer["down"]

    if output_indices is not None:
        hidden = jnp.take_along_axis(hidden, output_indices[:, :, None], axis=1)
    hidden = rms_norm(hidden, params["final_norm"], config.rms_norm_eps)
    head = params["embed"].T if config.tie_embeddings else params["lm_head"]
    logits = jnp.einsum("btd,dv->btv", hidden, head, preferred_element_type=jnp.float32)
    return logits, cache


def position_logits(logits: jax.Array, shifted: bool) -> jax.Array:  # [B, T, V] -> [B, T, V]
    """The logits that predict the token at each position of a chunk. Unshifted (LLaDA): a position's own
    logits. Shifted (Dream, Fast-dLLM v2 token shift): the previous position's; the chunk's first position
    keeps its own (callers never ask a shifted model to predict it: it is known)."""
    if not shifted:
        return logits
    return jnp.concatenate([logits[:, :1], logits[:, :-1]], axis=1)


def _project_qkv(
    layer: Params,
    config: TransformerConfig,
    normed: jax.Array,  # [B, T, D]
    cos: jax.Array,  # [B, T, Dh]
    sin: jax.Array,  # [B, T, Dh]
) -> tuple[jax.Array, jax.Array, jax.Array]:  # q [B, T, H, Dh], k and v [B, T, Hkv, Dh]
    batch, length, _ = normed.shape
    queries, keys, values = normed @ layer["q"], normed @ layer["k"], normed @ layer["v"]
    if config.qkv_bias:
        queries, keys, values = queries + layer["q_bias"], keys + layer["k_bias"], values + layer["v_bias"]
    queries = queries.reshape(batch, length, config.num_heads, config.head_size)
    keys = keys.reshape(batch, length, config.num_kv_heads, config.head_size)
    values = values.reshape(batch, length, config.num_kv_heads, config.head_size)
    if config.qk_norm:
        queries = rms_norm(queries, layer["q_norm"], config.rms_norm_eps)
        keys = rms_norm(keys, layer["k_norm"], config.rms_norm_eps)
    return apply_rope(queries, cos, sin), apply_rope(keys, cos, sin), values
