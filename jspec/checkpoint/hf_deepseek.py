"""DeepSeek-V2 / V3 (`DeepseekV2ForCausalLM`, `DeepseekV3ForCausalLM`) in Hugging Face checkpoints: the config
fields and tensor names of multi-head latent attention and mixture-of-experts layers (used by
jspec/checkpoint/hf.py, which owns the directory handling and the generic validation).

Config (transformers 5 names -> jspec): q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim ->
`MLAConfig`; n_routed_experts, num_experts_per_tok, moe_intermediate_size, n_shared_experts, first_k_dense_replace,
n_group, topk_group, norm_topk_prob, routed_scaling_factor (+ V3: sigmoid scoring, e_score_correction_bias,
top-2-sum group scores; V2: softmax scoring, topk_method greedy or group_limited_greedy with max group scores, no
renormalisation) -> `MoEConfig`; rope_parameters of type default or yarn. Fields jspec cannot represent raise naming
the field: num_key_value_heads != num_attention_heads, attention_bias, mlp_bias, moe_layer_freq != 1, another
scoring_func / topk_method, another rope type, quantization (hf.py). num_mtp_layers (the multi-token-prediction
module) builds no weights in transformers and is ignored, like its `model.layers.{N}` tensors are not expected.

Tensors (torch [out, in]; jspec [in, out]):
    self_attn.q_a_proj [q_lora, D] -> q_a;  q_a_layernorm -> q_a_norm;  q_b_proj [H*(dn+dr), q_lora] -> q_b
    (or self_attn.q_proj [H*(dn+dr), D] -> q);  kv_a_proj_with_mqa [r+dr, D] -> kv_a;  kv_a_layernorm -> kv_a_norm
    kv_b_proj [H*(dn+dv), r] -> kv_b;  o_proj [D, H*dv] -> o
    dense layers: mlp.{gate,up,down}_proj -> gate, up, down
    MoE layers: mlp.gate.weight [E, D] -> router;  mlp.gate.e_score_correction_bias [E] (V3) -> router_bias;
    mlp.experts.{e}.{gate,up,down}_proj -> experts_{gate,up,down} [E, ...] (stacked);
    mlp.shared_experts.{gate,up,down}_proj -> shared_{gate,up,down}
Interleaved RoPE (V2 always; V3 when rope_interleave) is turned into jspec's rotate-half layout by one exact row
permutation of the RoPE rows of q_b_proj / q_proj (per head) and kv_a_proj_with_mqa ([0, 2, ..., dr-2, 1, 3, ...,
dr-1]): scores are unchanged. `save_hf` writes V3 with rope_interleave=false (no permutation) and V2 with the
inverse permutation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jspec.models.config import MLAConfig, MoEConfig, TransformerConfig, YarnScaling

ARCHITECTURES = ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM")
MODEL_TYPES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM"}
DEFAULTS: dict[str, dict[str, Any]] = {  # transformers 5.24 class defaults
    "DeepseekV3ForCausalLM": dict(
        num_key_value_heads=128, head_dim=None, max_position_embeddings=4096, bos_token_id=0, eos_token_id=1,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=256, num_experts_per_tok=8, moe_intermediate_size=2048, n_shared_experts=1,
        first_k_dense_replace=3, n_group=8, topk_group=4, norm_topk_prob=True, routed_scaling_factor=2.5,
        rope_interleave=True),
    "DeepseekV2ForCausalLM": dict(
        num_key_value_heads=None, head_dim=None, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=64, num_experts_per_tok=None, moe_intermediate_size=1407, n_shared_experts=2,
        first_k_dense_replace=0, n_group=None, topk_group=None, norm_topk_prob=False, routed_scaling_factor=1.0,
        topk_method="greedy"),
}


def is_deepseek(architecture: str) -> bool:
    return architecture in ARCHITECTURES


def interleaved_rope(architecture: str, field) -> bool:
    """Whether the checkpoint's RoPE rows are interleaved (V2 always; V3 per rope_interleave)."""
    return architecture == "DeepseekV2ForCausalLM" or bool(field("rope_interleave", True))


def mla_moe_from_hf(architecture: str, field, num_layers: int) -> tuple[MLAConfig, MoEConfig | None]:
    """The MLA and MoE options of a DeepSeek config.json (`field(key, default)` reads it with the class defaults).
    Raises ValueError naming a field jspec cannot represent."""

    def fail(name: str, expected: str) -> None:
        raise ValueError(f"config.json ({architecture}): {name}={field(name)!r} is not supported; {expected}")

    heads = field("num_attention_heads")
    if field("num_key_value_heads") not in (None, heads):
        fail("num_key_value_heads", f"MLA needs num_key_value_heads == num_attention_heads ({heads}) or null")
    if field("attention_bias", False):
        fail("attention_bias", "jspec's MLA projections have no biases")
    if field("mlp_bias", False):
        fail("mlp_bias", "jspec's MLPs have no biases")
    if field("moe_layer_freq", 1) != 1:
        fail("moe_layer_freq", "every layer from first_k_dense_replace on is MoE (moe_layer_freq 1)")
    mla = MLAConfig(kv_lora_rank=field("kv_lora_rank"), qk_nope_head_dim=field("qk_nope_head_dim"),
                    qk_rope_head_dim=field("qk_rope_head_dim"), v_head_dim=field("v_head_dim"),
                    q_lora_rank=field("q_lora_rank"))
    first_dense = field("first_k_dense_replace") or 0
    if first_dense >= num_layers:
        return mla, None
    if architecture == "DeepseekV3ForCausalLM":
        if field("scoring_func", "sigmoid") != "sigmoid":
            fail("scoring_func", "DeepseekV3 routes with sigmoid scores")
        if field("topk_method", "noaux_tc") != "noaux_tc":
            fail("topk_method", "DeepseekV3 routes with 'noaux_tc' (group-limited, bias-corrected)")
        routing = dict(scoring_func="sigmoid", group_score="top2_sum", e_score_correction_bias=True,
                       norm_topk_prob=bool(field("norm_topk_prob")), n_group=field("n_group") or 1,
                       topk_group=field("topk_group") or 1)
    else:
        if field("scoring_func", "softmax") != "softmax":
            fail("scoring_func", "DeepseekV2 routes with softmax scores")
        method = field("topk_method")
        if method not in ("greedy", "group_limited_greedy"):
            fail("topk_method", "expected 'greedy' or 'group_limited_greedy'")
        grouped = method == "group_limited_greedy"
        routing = dict(scoring_func="softmax", group_score="max", e_score_correction_bias=False, norm_topk_prob=False,
                       n_group=(field("n_group") or 1) if grouped else 1, topk_group=(field("topk_group") or 1) if grouped else 1)
    moe = MoEConfig(n_routed_experts=field("n_routed_experts"), num_experts_per_tok=field("num_experts_per_tok"),
                    moe_intermediate_size=field("moe_intermediate_size"), n_shared_experts=field("n_shared_experts") or 0,
                    first_k_dense_replace=first_dense, routed_scaling_factor=float(field("routed_scaling_factor")),
                    **routing)
    return mla, moe


def yarn_from_hf(parameters: dict[str, Any], architecture: str, field) -> YarnScaling:
    try:
        factor = float(parameters["factor"])
        original = int(parameters.get("original_max_position_embeddings") or field("max_position_embeddings"))
    except KeyError as error:
        raise ValueError(f"config.json ({architecture}): yarn rope scaling lacks {error.args[0]!r}") from None
    optional = {k: float(parameters[k]) for k in ("beta_fast", "beta_slow") if parameters.get(k)}
    optional.update({k: float(parameters[k]) for k in ("mscale", "mscale_all_dim", "attention_factor")
                     if parameters.get(k) is not None})
    return YarnScaling(factor=factor, original_max_position_embeddings=original,
                       truncate=bool(parameters.get("truncate", True)), **optional)


def yarn_to_hf(scaling: YarnScaling) -> dict[str, Any]:
    out = {"rope_type": "yarn", "factor": scaling.factor, "beta_fast": scaling.beta_fast, "beta_slow": scaling.beta_slow,
           "original_max_position_embeddings": scaling.original_max_position_embeddings, "truncate": scaling.truncate}
    for key in ("mscale", "mscale_all_dim", "attention_factor"):
        if getattr(scaling, key) is not None:
            out[key] = getattr(scaling, key)
    return out


def architecture_for(config: TransformerConfig) -> str:
    """V2 when the router is V2's (softmax scores), else V3. Raises ValueError for what neither expresses."""
    if config.qkv_bias or config.qk_norm or config.sliding_window is not None or set(config.attention_types) != {"mla"}:
        raise ValueError("config: a DeepSeek checkpoint has MLA in every layer and no qkv_bias, qk_norm or "
                         f"sliding_window (layer_types={config.attention_types})")
    if config.mla.norm_eps != 1e-6:
        raise ValueError(f"mla.norm_eps: Hugging Face DeepSeek builds its latent norms with 1e-6, got {config.mla.norm_eps}")
    moe = config.moe
    if moe is not None and moe.scoring_func == "softmax":
        if moe.e_score_correction_bias or moe.norm_topk_prob or (moe.n_group > 1 and moe.group_score != "max"):
            raise ValueError(f"moe: softmax routing is written as DeepseekV2, whose router has no correction bias, no "
                             f"renormalisation and max group scores; got {moe}")
        return "DeepseekV2ForCausalLM"
    if moe is not None and moe.group_score != "top2_sum":
        raise ValueError(f"moe: sigmoid routing is written as DeepseekV3, whose groups score by top2_sum; got {moe}")
    return "DeepseekV3ForCausalLM"


def config_fields_to_hf(config: TransformerConfig, architecture: str) -> dict[str, Any]:
    """The DeepSeek-specific config.json fields (MLA, MoE, RoPE layout)."""
    mla, moe = config.mla, config.moe
    out: dict[str, Any] = dict(
        q_lora_rank=mla.q_lora_rank, kv_lora_rank=mla.kv_lora_rank, qk_nope_head_dim=mla.qk_nope_head_dim,
        qk_rope_head_dim=mla.qk_rope_head_dim, v_head_dim=mla.v_head_dim, attention_bias=False,
        num_key_value_heads=config.num_heads)
    if moe is None:
        out["first_k_dense_replace"] = config.num_layers  # every layer dense; the MoE fields keep their defaults
        if architecture == "DeepseekV2ForCausalLM":
            out["num_experts_per_tok"] = 1
    else:
        out.update(n_routed_experts=moe.n_routed_experts, num_experts_per_tok=moe.num_experts_per_tok,
                   moe_intermediate_size=moe.moe_intermediate_size, n_shared_experts=moe.n_shared_experts,
                   first_k_dense_replace=moe.first_k_dense_replace, routed_scaling_factor=moe.routed_scaling_factor,
                   norm_topk_prob=moe.norm_topk_prob, n_group=moe.n_group, topk_group=moe.topk_group)
    if architecture == "DeepseekV3ForCausalLM":
        out["rope_interleave"] = False  # jspec's rotate-half layout, written as is
    else:
        out["mlp_bias"] = False
        out["topk_method"] = "group_limited_greedy" if moe is not None and moe.n_group > 1 else "greedy"
    return out


def rope_row_order(config: TransformerConfig, name: str) -> np.ndarray | None:
    """For an interleaved checkpoint: the row order that turns tensor `name` (torch layout) into rotate-half
    (rows[order]); None for tensors without RoPE rows."""
    mla = config.mla
    dn, dr = mla.qk_nope_head_dim, mla.qk_rope_head_dim
    deinterleave = np.concatenate([np.arange(0, dr, 2), np.arange(1, dr, 2)])
    if name.endswith(("self_attn.q_b_proj.weight", "self_attn.q_proj.weight")):
        head = np.concatenate([np.arange(dn), dn + deinterleave])
        return (np.arange(config.num_heads)[:, None] * mla.qk_head_dim + head[None, :]).reshape(-1)
    if name.endswith("self_attn.kv_a_proj_with_mqa.weight"):
        return np.concatenate([np.arange(mla.kv_lora_rank), mla.kv_lora_rank + deinterleave])
    return None


def layer_tensors(config: TransformerConfig, layer: int, architecture: str) -> dict[str, tuple[tuple[int, ...], Any, bool]]:
    """{name under model.layers.{layer}.: (torch shape, destination key in the layer's params (a tuple (key, e) for
    expert e of a stacked expert tensor), transpose)} of one DeepSeek layer."""
    mla, d, h = config.mla, config.hidden_size, config.num_heads
    qk = h * mla.qk_head_dim
    out: dict[str, tuple[tuple[int, ...], Any, bool]] = {}
    if mla.q_lora_rank is None:
        out["self_attn.q_proj.weight"] = ((qk, d), "q", True)
    else:
        out.update({"self_attn.q_a_proj.weight": ((mla.q_lora_rank, d), "q_a", True),
                    "self_attn.q_a_layernorm.weight": ((mla.q_lora_rank,), "q_a_norm", False),
                    "self_attn.q_b_proj.weight": ((qk, mla.q_lora_rank), "q_b", True)})
    out.update({
        "self_attn.kv_a_proj_with_mqa.weight": ((mla.kv_lora_rank + mla.qk_rope_head_dim, d), "kv_a", True),
        "self_attn.kv_a_layernorm.weight": ((mla.kv_lora_rank,), "kv_a_norm", False),
        "self_attn.kv_b_proj.weight": ((h * (mla.qk_nope_head_dim + mla.v_head_dim), mla.kv_lora_rank), "kv_b", True),
        "self_attn.o_proj.weight": ((d, h * mla.v_head_dim), "o", True),
        "input_layernorm.weight": ((d,), "attn_norm", False),
        "post_attention_layernorm.weight": ((d,), "mlp_norm", False),
    })
    if not config.is_moe_layer(layer):
        f = config.intermediate_size
        out.update({"mlp.gate_proj.weight": ((f, d), "gate", True), "mlp.up_proj.weight": ((f, d), "up", True),
                    "mlp.down_proj.weight": ((d, f), "down", True)})
        return out
    moe = config.moe
    experts, inner = moe.n_routed_experts, moe.moe_intermediate_size
    out["mlp.gate.weight"] = ((experts, d), "router", True)
    if architecture == "DeepseekV3ForCausalLM":  # V3 always has the buffer (zeros when unused)
        out["mlp.gate.e_score_correction_bias"] = ((experts,), "router_bias" if moe.e_score_correction_bias else None, False)
    for e in range(experts):
        out.update({f"mlp.experts.{e}.gate_proj.weight": ((inner, d), ("experts_gate", e), True),
                    f"mlp.experts.{e}.up_proj.weight": ((inner, d), ("experts_up", e), True),
                    f"mlp.experts.{e}.down_proj.weight": ((d, inner), ("experts_down", e), True)})
    if moe.n_shared_experts:
        shared = moe.n_shared_experts * inner
        out.update({"mlp.shared_experts.gate_proj.weight": ((shared, d), "shared_gate", True),
                    "mlp.shared_experts.up_proj.weight": ((shared, d), "shared_up", True),
                    "mlp.shared_experts.down_proj.weight": ((d, shared), "shared_down", True)})
    return out
