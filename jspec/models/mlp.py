"""The per-layer MLP: the dense SwiGLU, or a DeepSeek-style mixture of experts (`TransformerConfig.moe`).

A layer's MLP kind is static (`config.is_moe_layer(layer)`); layer groups split where it changes, so one scanned
group has one kind.

Parameters of one layer (shapes for hidden D, MLP F, experts E, expert hidden I, shared hidden Is):
    dense: gate [D, F], up [D, F], down [F, D]
    MoE:   router [D, E] (routing runs in float32), router_bias [E] (when e_score_correction_bias),
           experts_gate [E, D, I], experts_up [E, D, I], experts_down [E, I, D],
           (shared_gate [D, Is], shared_up [D, Is], shared_down [Is, D] when n_shared_experts)

MoE compute: every token runs every expert and the outputs are combined with a [B, T, E] weight matrix that is
zero outside the token's top-k. Exact (the unselected experts get weight 0), and simple to shard, but it does
E / k times the routed FLOPs of a dispatching implementation: right for the tiny and demo models jspec tests,
not for DeepSeek-V3 scale. On a mesh the experts are replicated (logical axes "experts" and "expert_mlp" map to
no mesh axis in the default rules).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

Params = dict[str, jax.Array]


def init_params(config: Any, layer: int, normal: Callable[[tuple[int, ...]], jax.Array]) -> Params:
    """One layer's MLP parameters drawn by `normal(shape)` (router bias zero)."""
    d = config.hidden_size
    if not config.is_moe_layer(layer):
        f = config.intermediate_size
        return {"gate": normal((d, f)), "up": normal((d, f)), "down": normal((f, d))}
    moe = config.moe
    e, i = moe.n_routed_experts, moe.moe_intermediate_size
    params = {"router": normal((d, e)), "experts_gate": normal((e, d, i)),
              "experts_up": normal((e, d, i)), "experts_down": normal((e, i, d))}
    if moe.e_score_correction_bias:
        params["router_bias"] = jnp.zeros((e,), jnp.dtype(config.dtype))
    if moe.n_shared_experts:
        shared = moe.n_shared_experts * i
        params.update(shared_gate=normal((d, shared)), shared_up=normal((d, shared)), shared_down=normal((shared, d)))
    return params


def param_axes(config: Any, layer: int) -> dict[str, tuple[str, ...]]:
    if not config.is_moe_layer(layer):
        return {"gate": ("embed", "mlp"), "up": ("embed", "mlp"), "down": ("mlp", "embed")}
    axes = {"router": ("embed", "experts"), "experts_gate": ("experts", "embed", "expert_mlp"),
            "experts_up": ("experts", "embed", "expert_mlp"), "experts_down": ("experts", "expert_mlp", "embed")}
    if config.moe.e_score_correction_bias:
        axes["router_bias"] = ("experts",)
    if config.moe.n_shared_experts:
        axes.update(shared_gate=("embed", "expert_mlp"), shared_up=("embed", "expert_mlp"),
                    shared_down=("expert_mlp", "embed"))
    return axes


def swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:  # [..., D] -> [..., D]
    return (jax.nn.silu(x @ gate) * (x @ up)) @ down


def apply(params: Params, config: Any, moe: bool, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, D]
    """The MLP of a layer whose kind is `moe` (static)."""
    if not moe:
        return swiglu(x, params["gate"], params["up"], params["down"])
    weights = routing_weights(params, config.moe, x)  # [B, T, E]
    hidden = jax.nn.silu(jnp.einsum("btd,edi->btei", x, params["experts_gate"]))
    hidden = hidden * jnp.einsum("btd,edi->btei", x, params["experts_up"])
    routed = jnp.einsum("btei,eid->bted", hidden, params["experts_down"])
    out = jnp.einsum("bted,bte->btd", routed, weights.astype(routed.dtype))
    if config.moe.n_shared_experts:
        out = out + swiglu(x, params["shared_gate"], params["shared_up"], params["shared_down"])
    return out


def routing_weights(params: Params, moe: Any, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, E] float32
    """Each token's combine weight per expert: zero outside its top-k (see `MoEConfig` for the rule)."""
    logits = jnp.einsum("btd,de->bte", x.astype(jnp.float32), params["router"].astype(jnp.float32))
    scores = jax.nn.sigmoid(logits) if moe.scoring_func == "sigmoid" else jax.nn.softmax(logits, axis=-1)
    choice = scores + params["router_bias"] if moe.e_score_correction_bias else scores
    if moe.n_group > 1:
        grouped = choice.reshape(*choice.shape[:-1], moe.n_group, -1)  # [B, T, G, E/G]
        if moe.group_score == "top2_sum":
            group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)
        else:
            group_scores = grouped.max(-1)
        kept_groups = jax.lax.top_k(group_scores, moe.topk_group)[1]  # [B, T, topk_group]
        kept = jnp.any(kept_groups[..., :, None] == jnp.arange(moe.n_group), axis=-2)  # [B, T, G]
        choice = jnp.where(kept[..., None], grouped, -jnp.inf).reshape(choice.shape)
    chosen = jax.lax.top_k(choice, moe.num_experts_per_tok)[1]  # [B, T, k]
    selected = jnp.any(chosen[..., :, None] == jnp.arange(moe.n_routed_experts), axis=-2)  # [B, T, E]
    weights = jnp.where(selected, scores, 0.0)
    if moe.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * moe.routed_scaling_factor
