"""A decoder-only transformer (Llama / Mistral / Qwen2 / Qwen3) as pure functions over a parameter pytree.

`forward` is the one entry: prefill, single-token decode, tree verification and bidirectional diffusion
blocks are calls of it with different tokens, positions, write slots and masks.

Each layer's attention is an attention kind (jspec/models/attention/): full causal GQA, sliding window (ring
buffer cache), InfLLM v2 sparse, or any registered kind; the config names one per layer. Consecutive layers of
one kind form a group; a group's parameters are stacked over its layers and run with one `lax.scan`, so compile
time does not grow with depth.

Parameter pytree (nested dicts; shapes for hidden D, heads H, KV heads Hkv, head dim Dh, MLP F, vocab V, and L
layers in a group):
    embed      [V, D]
    groups     tuple, one per layer group, of {attn_norm [L, D], the kind's parameters stacked over L (for GQA:
               q [L, D, H*Dh], k [L, D, Hkv*Dh], v [L, D, Hkv*Dh], o [L, H*Dh, D], (q_bias, k_bias, v_bias if
               qkv_bias), (q_norm, k_norm [L, Dh] if qk_norm)), mlp_norm [L, D], the MLP's parameters (dense
               SwiGLU: gate [L, D, F], up [L, D, F], down [L, F, D]; mixture of experts: jspec/models/mlp.py)};
               a group of fewer than SCAN_MIN_LAYERS layers is instead a tuple of per-layer
               dicts (the same leaves without the L axis), run unrolled
    final_norm [D]
    lm_head    [D, V]   (absent when embeddings are tied)
`layer_params` / `stack_layers` convert between that and one flat dict per layer (checkpoint formats).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jspec.cache import Cache
from jspec.models.attention import AttentionKind, attention_kind
from jspec.models.config import TransformerConfig
from jspec.models.kernels import KernelOptions
from jspec.models import mlp
from jspec.models.layers import rms_norm

Params = dict[str, Any]
DEFAULT_KERNELS = KernelOptions()
# Groups of at least this many layers are stacked and scanned (compile time flat in depth); shorter ones keep one
# dict per layer and run unrolled: XLA on CPU slices each scanned layer's weights out of the stack, measured at
# 1.17x the time per token of separate arrays on the 3-layer demo-code at batch 1.
SCAN_MIN_LAYERS = 5


def is_scanned(start: int, end: int) -> bool:
    """Whether the layer group [start, end) is stacked and run with lax.scan (else per-layer and unrolled)."""
    return end - start >= SCAN_MIN_LAYERS


def group_kinds(config: TransformerConfig, kernels: KernelOptions = DEFAULT_KERNELS) -> tuple[tuple[AttentionKind, int, int], ...]:
    """(kind, first layer, end layer) per layer group (static: from the config and the kernel options)."""
    return tuple((attention_kind(name, config, kernels, start), start, end) for name, start, end in config.layer_groups)


def init_params(config: TransformerConfig, key: jax.Array, init_scale: float = 0.02) -> Params:
    """Random parameters: weights ~ N(0, init_scale^2), norms = 1, biases ~ N(0, init_scale^2)."""
    dtype = jnp.dtype(config.dtype)
    d, v = config.hidden_size, config.vocab_size
    # random draws per layer: 10 covers GQA + dense MLP (kept so those models' random weights stay as they were)
    draws = 10 if config.mla is None and config.moe is None else 16
    keys = iter(jax.random.split(key, 4 + draws * config.num_layers))
    kinds = [kind for kind, start, end in group_kinds(config) for _ in range(start, end)]

    def normal(shape: tuple[int, ...]) -> jax.Array:  # draws keys in a fixed order: embed, per layer, head
        return (init_scale * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    def layer(index: int) -> Params:
        attention = kinds[index].init_params(config, normal)
        return {"attn_norm": jnp.ones((d,), dtype), **attention, "mlp_norm": jnp.ones((d,), dtype),
                **mlp.init_params(config, index, normal)}

    params: Params = {"embed": normal((v, d))}
    params["groups"] = stack_layers(config, [layer(i) for i in range(config.num_layers)])
    params["final_norm"] = jnp.ones((d,), dtype)
    if not config.tie_embeddings:
        params["lm_head"] = normal((d, v))
    return params


def stack_layers(
    config: TransformerConfig, layers: Sequence[Params], stack: Callable = jnp.stack
) -> tuple[Params, ...]:
    """One flat dict per layer -> the stacked groups of `config.layer_groups` (`stack`: how a sequence of leaves
    becomes one, e.g. lazily for checkpoint tensors not yet read)."""
    if len(layers) != config.num_layers:
        raise ValueError(f"layers: expected {config.num_layers} per-layer parameter dicts, got {len(layers)}")
    return tuple(
        jax.tree.map(lambda *xs: stack(xs), *layers[start:end]) if is_scanned(start, end) else tuple(layers[start:end])
        for _, start, end in config.layer_groups
    )


def layer_params(config: TransformerConfig, params: Params, layer: int) -> Params:
    """The flat parameter dict of one layer (a view into its group's stacked arrays)."""
    for group, (_, start, end) in zip(params["groups"], config.layer_groups):
        if start <= layer < end:
            return jax.tree.map(lambda x: x[layer - start], group) if is_scanned(start, end) else group[layer - start]
    raise ValueError(f"layer: expected an index in [0, {config.num_layers}), got {layer}")


def param_logical_axes(config: TransformerConfig) -> Params:
    """The parameter pytree's structure with a tuple of logical axis names per leaf (for sharding rules); stacked
    group leaves lead with "layers"."""
    groups = []
    for kind, start, end in group_kinds(config):
        layer = {"attn_norm": ("embed",), **kind.param_axes(config), "mlp_norm": ("embed",),
                 **mlp.param_axes(config, start)}
        stacked = {name: ("layers", *axes) for name, axes in layer.items()}
        groups.append(stacked if is_scanned(start, end) else tuple(dict(layer) for _ in range(start, end)))
    axes: Params = {"embed": ("vocab", "embed"), "groups": tuple(groups), "final_norm": ("embed",)}
    if not config.tie_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def new_cache(
    config: TransformerConfig, kernels: KernelOptions, batch_size: int, capacity: int, max_chunk: int | None = None
) -> Cache:
    """An empty cache of `capacity` logical slots per row (rounded up to the kernels' block size); every row starts
    at length 0. `max_chunk`: the most slots one forward writes at or past the committed length (a prefill aside);
    it bounds ring-buffer layers (window + max_chunk slots). None: the capacity (no bound)."""
    from jspec.validation import check_int

    check_int("capacity", capacity, minimum=1)
    if max_chunk is not None:
        check_int("max_chunk", max_chunk, minimum=1)
    kinds = group_kinds(config, kernels)
    multiple = cache_size_multiple(config, kernels)
    capacity = -(-int(capacity) // multiple) * multiple
    chunk = capacity if max_chunk is None else int(max_chunk)
    entries = tuple(kind.new_entry(config, size, batch_size, capacity, chunk) for kind, size in _entry_layers(kinds))
    return Cache(entries=entries, lengths=jnp.zeros((batch_size,), jnp.int32), capacity=capacity)


def cache_size_multiple(config: TransformerConfig, kernels: KernelOptions = DEFAULT_KERNELS) -> int:
    """Cache capacities are multiples of this: the least common multiple of the layer kinds' kernel blocks."""
    return int(np.lcm.reduce([getattr(kind, "cache_size_multiple", 1) for kind, _, _ in group_kinds(config, kernels)]))


def cache_logical_axes(config: TransformerConfig, kernels: KernelOptions = DEFAULT_KERNELS) -> Cache:
    """The cache's structure with a tuple of logical axis names per array leaf (entries lead with "layers")."""
    entries = tuple(kind.entry_axes(config) for kind, _ in _entry_layers(group_kinds(config, kernels)))
    return Cache(entries=entries, lengths=("batch",), capacity=0)


def _entry_layers(kinds) -> list[tuple[AttentionKind, int]]:
    """(kind, layers stacked in the entry) of each cache entry: one per scanned group, one per layer of an unrolled
    group (so an unrolled layer reads and writes its own buffers, never a slice of a stacked one)."""
    return [entry for kind, start, end in kinds
            for entry in ([(kind, end - start)] if is_scanned(start, end) else [(kind, 1)] * (end - start))]


def forward(
    params: Params,
    config: TransformerConfig,
    tokens: jax.Array,  # [B, T] int32
    positions: jax.Array,  # [B, T] int32, RoPE positions
    cache: Cache | None = None,
    mask: jax.Array | None = None,  # [B, T, S] bool over key slots; None: causal by slot
    *,
    write_slots: jax.Array | None = None,  # [B, T] cache slots for the chunk; None: lengths + t
    skip_layers: tuple[int, ...] = (),
    output_indices: jax.Array | None = None,  # [B, K] chunk indices whose logits are wanted; None: all
    kernels: KernelOptions = DEFAULT_KERNELS,
) -> tuple[jax.Array, Cache | None]:  # logits [B, T or K, V] float32, cache
    """Run the transformer on a chunk of tokens.

    With a cache: the chunk's keys/values are written at `write_slots` (a slot outside [0, capacity) is
    dropped; padding tokens use that), and every query attends over the cache's slots through `mask` (and its
    layer's window). The cache's `lengths` are not changed: committing is the caller's decision
    (`cache.with_lengths`). Without a cache: queries attend over the chunk itself; `mask` is then [B, T, T]
    (None: causal).

    Guarantee: for a causal mask, prefill of a prefix followed by chunked or single-token calls gives the
    same logits (to float tolerance) as one call over the whole sequence.
    `skip_layers` (static) leaves those layers out (self-speculative drafting); their cache slots are not
    written. With Pallas `kernels`, decode-sized chunks under the default mask attend through the kernels (see
    jspec/models/attention/full.py); prefill and every custom mask use XLA.
    """
    length = tokens.shape[1]
    capacity = None if cache is None else cache.capacity
    if cache is not None and write_slots is None:
        write_slots = cache.lengths[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]
    hidden = params["embed"][tokens]
    kinds = group_kinds(config, kernels)
    sizes = [size for _, size in _entry_layers(kinds)]
    if cache is not None and [entry_layers(entry) for entry in cache.entries] != sizes:
        raise ValueError(f"cache: entries for {[entry_layers(entry) for entry in cache.entries]} layers, the model needs "
                         f"{sizes}; create caches with model.new_cache(...)")
    entries = list(cache.entries) if cache is not None else [None] * len(sizes)
    first = 0  # index of the group's first entry
    for (kind, start, end), group in zip(kinds, params["groups"]):
        count = 1 if is_scanned(start, end) else end - start
        context = kind.prepare(config, entries[first], positions, write_slots, mask, capacity)
        active = tuple(layer not in skip_layers for layer in range(start, end))
        hidden, group_entries = _run_group(kind, config, group, hidden, entries[first:first + count], context, active,
                                           config.is_moe_layer(start))
        entries[first:first + count] = [kind.finish(entry, context) for entry in group_entries]
        first += count
    if cache is not None:
        cache = cache.replace(entries=tuple(entries))

    if output_indices is not None:
        hidden = jnp.take_along_axis(hidden, output_indices[:, :, None], axis=1)
    hidden = rms_norm(hidden, params["final_norm"], config.rms_norm_eps)
    head = params["embed"].T if config.tie_embeddings else params["lm_head"]
    logits = jnp.einsum("btd,dv->btv", hidden, head, preferred_element_type=jnp.float32)
    return logits, cache


def entry_layers(entry: Any) -> int:
    """Layers stacked in a cache entry (the leading axis of its first leaf)."""
    return jax.tree.leaves(entry)[0].shape[0]


def _run_group(
    kind: AttentionKind,
    config: TransformerConfig,
    group: Params | tuple[Params, ...],  # stacked leaves [L, ...], or one dict per layer
    hidden: jax.Array,  # [B, T, D]
    entries: list[Any],  # the group's cache entries: one stacked entry, or one per layer (None without a cache)
    context: Any,
    active: tuple[bool, ...],  # static: layers of the group that run (False: skipped)
    moe: bool,  # static: the group's MLP is a mixture of experts (else dense SwiGLU)
) -> tuple[jax.Array, list[Any]]:
    """The group's layers in order: one `lax.scan` over a stacked group (a `lax.cond` per layer when some are
    skipped), or a Python loop over a tuple of per-layer dicts, each with its own cache entry."""

    def block(operands, layer_params, layer):
        hidden, entry = operands
        normed = rms_norm(hidden, layer_params["attn_norm"], config.rms_norm_eps)
        attended, entry = kind.apply(layer_params, config, normed, entry, layer, context)
        hidden = hidden + attended
        normed = rms_norm(hidden, layer_params["mlp_norm"], config.rms_norm_eps)
        return hidden + mlp.apply(layer_params, config, moe, normed), entry

    if isinstance(group, tuple):
        entries = list(entries)
        for layer, (layer_params, is_active) in enumerate(zip(group, active)):
            if is_active:
                hidden, entries[layer] = block((hidden, entries[layer]), layer_params, 0)
        return hidden, entries
    (entry,) = entries
    if not any(active):
        return hidden, [entry]

    def body(operands, xs):
        layer_params, layer, is_active = xs
        if all(active):
            return block(operands, layer_params, layer), None
        run = lambda ops: block(ops, layer_params, layer)  # noqa: E731
        return jax.lax.cond(is_active, run, lambda ops: ops, operands), None

    layers = jnp.arange(len(active), dtype=jnp.int32)
    (hidden, entry), _ = jax.lax.scan(body, (hidden, entry), (group, layers, jnp.asarray(active)))
    return hidden, [entry]


def position_logits(logits: jax.Array, shifted: bool) -> jax.Array:  # [B, T, V] -> [B, T, V]
    """The logits that predict the token at each position of a chunk. Unshifted (LLaDA): a position's own
    logits. Shifted (Dream, Fast-dLLM v2 token shift): the previous position's; the chunk's first position
    keeps its own (callers never ask a shifted model to predict it: it is known)."""
    if not shifted:
        return logits
    return jnp.concatenate([logits[:, :1], logits[:, :-1]], axis=1)
