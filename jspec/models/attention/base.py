"""The protocol every attention kind implements, and the grouped-query projections the built-in kinds share.

A kind is a frozen dataclass (static under jit). For one group of L consecutive layers of its kind, `forward`
calls, in order:

    context = kind.prepare(config, entry, positions, write_slots, mask, capacity)    once per forward
    out, entry = kind.apply(params, config, normed, entry, layer, context)          per layer, inside lax.scan
    entry = kind.finish(entry, context)                                              once per forward

- `entry` is the group's cache entry (None without a cache): a pytree whose array leaves are stacked over the
  group's layers ([L, B, ...]) and which implements `compact(source_slots, destination_start, capacity)` and
  `gather_rows(rows)` (see jspec/cache.py).
  `apply` must write only the chunk's entries of layer `layer` (a traced index), never copy a whole layer.
- `mask` is None (causal by slot: each query reads every slot up to its own) or bool [B, T, S] over the
  cache's logical slots (S = capacity; without a cache S = T, the chunk itself).
- `context` is what `prepare` derives once for all layers of the group (masks, rotary tables, ...).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp

from jspec.models.layers import apply_rope, rms_norm


class AttentionKind(Protocol):
    def init_params(self, config: Any, normal: Callable[[tuple[int, ...]], jax.Array]) -> dict[str, jax.Array]: ...
    # one layer's parameters; `normal(shape)` draws random weights at the model's init scale and dtype

    def param_axes(self, config: Any) -> dict[str, tuple[str, ...]]: ...  # logical axis names per parameter

    def new_entry(self, config: Any, num_layers: int, batch_size: int, capacity: int, chunk: int) -> Any: ...

    def entry_axes(self, config: Any) -> Any: ...  # the entry's structure with a tuple of axis names per leaf

    def prepare(self, config: Any, entry: Any, positions: jax.Array, write_slots: jax.Array | None,
                mask: jax.Array | None, capacity: int | None) -> Any: ...

    def apply(self, params: dict[str, jax.Array], config: Any, normed: jax.Array, entry: Any, layer: jax.Array,
              context: Any) -> tuple[jax.Array, Any]: ...

    def finish(self, entry: Any, context: Any) -> Any: ...


# --- grouped-query attention parameters, shared by the built-in kinds -------------------------------------


def gqa_init_params(config: Any, normal: Callable[[tuple[int, ...]], jax.Array]) -> dict[str, jax.Array]:
    """q [D, H*Dh], k and v [D, Hkv*Dh], o [H*Dh, D] drawn by `normal(shape)`; then biases (qkv_bias) likewise;
    q/k norms (qk_norm) = 1."""
    dtype = jnp.dtype(config.dtype)
    d, q_dim, kv_dim = config.hidden_size, config.num_heads * config.head_size, config.num_kv_heads * config.head_size
    params = {"q": normal((d, q_dim)), "k": normal((d, kv_dim)), "v": normal((d, kv_dim)), "o": normal((q_dim, d))}
    if config.qkv_bias:
        params.update(q_bias=normal((q_dim,)), k_bias=normal((kv_dim,)), v_bias=normal((kv_dim,)))
    if config.qk_norm:
        params.update(q_norm=jnp.ones((config.head_size,), dtype), k_norm=jnp.ones((config.head_size,), dtype))
    return params


def gqa_param_axes(config: Any) -> dict[str, tuple[str, ...]]:
    axes = {"q": ("embed", "q_heads"), "k": ("embed", "kv_heads"), "v": ("embed", "kv_heads"), "o": ("q_heads", "embed")}
    if config.qkv_bias:
        axes.update(q_bias=("q_heads",), k_bias=("kv_heads",), v_bias=("kv_heads",))
    if config.qk_norm:
        axes.update(q_norm=("head_dim",), k_norm=("head_dim",))
    return axes


def gqa_project(
    params: dict[str, jax.Array],
    config: Any,
    normed: jax.Array,  # [B, T, D]
    cos: jax.Array,  # [B, T, Dh]
    sin: jax.Array,  # [B, T, Dh]
) -> tuple[jax.Array, jax.Array, jax.Array]:  # q [B, T, H, Dh], k and v [B, T, Hkv, Dh]
    """Query, key and value heads with RoPE applied to q and k (q/k RMSNorm first for Qwen3)."""
    batch, length, _ = normed.shape
    queries, keys, values = normed @ params["q"], normed @ params["k"], normed @ params["v"]
    if config.qkv_bias:
        queries, keys, values = queries + params["q_bias"], keys + params["k_bias"], values + params["v_bias"]
    queries = queries.reshape(batch, length, config.num_heads, config.head_size)
    keys = keys.reshape(batch, length, config.num_kv_heads, config.head_size)
    values = values.reshape(batch, length, config.num_kv_heads, config.head_size)
    if config.qk_norm:
        queries = rms_norm(queries, params["q_norm"], config.rms_norm_eps)
        keys = rms_norm(keys, params["k_norm"], config.rms_norm_eps)
    return apply_rope(queries, cos, sin), apply_rope(keys, cos, sin), values


def gqa_output(params: dict[str, jax.Array], attended: jax.Array) -> jax.Array:  # [B, T, H, Dh] -> [B, T, D]
    return attended.reshape(attended.shape[0], attended.shape[1], -1) @ params["o"]


def kv_axes() -> tuple[str, ...]:
    """Logical axes of a stacked K or V leaf [L, B, S, Hkv, Dh]."""
    return ("layers", "batch", "seq", "kv_heads", "head_dim")
