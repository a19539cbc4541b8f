"""Transformer configuration: a frozen, hashable dataclass passed as static metadata.

One configuration covers the Llama-2/3, Mistral, Qwen2/2.5, Qwen3 and DeepSeek-V2/V3 families: the differences
between them are named options (qkv bias, q/k norm, Llama-3 or YaRN RoPE scaling, sliding window, tied embeddings,
multi-head latent attention `mla`, mixture-of-experts MLPs `moe`), not copies of the model code.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
DIFFUSION_KINDS = ("masked", "block")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (`rope_type="llama3"` in Hugging Face configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class YarnScaling:
    """YaRN RoPE scaling (`rope_type="yarn"` in Hugging Face configs), as transformers 5 computes it: inverse
    frequencies blended between interpolation (/factor) and extrapolation by a linear ramp over the correction range
    [beta_fast, beta_slow] rotations; cos/sin multiplied by `attention_factor` (default: mscale(factor, mscale) /
    mscale(factor, mscale_all_dim) when both are set, else mscale(factor)). MLA layers also multiply their softmax
    scale by mscale(factor, mscale_all_dim)^2 when mscale_all_dim is nonzero (DeepSeek)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    rope_type: str = "yarn"  # tells a serialized YarnScaling from a (Llama-3) RopeScaling

    def __post_init__(self):
        _require(self.factor > 0, "rope_scaling.factor", "a positive float", self.factor)
        _require(_is_int(self.original_max_position_embeddings) and self.original_max_position_embeddings > 0,
                 "rope_scaling.original_max_position_embeddings", "a positive int", self.original_max_position_embeddings)
        _require(self.rope_type == "yarn", "rope_scaling.rope_type", "'yarn'", self.rope_type)


def yarn_mscale(factor: float, mscale: float | None = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * (1.0 if mscale is None else mscale) * math.log(factor) + 1.0


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3; the "mla" layer kind, jspec/models/attention/mla.py).

    Per token a layer caches only the RMS-normalised latent c (kv_lora_rank values) and one RoPE key shared by all
    heads (qk_rope_head_dim values). Queries come from `q_lora_rank` (a low-rank q_a -> norm -> q_b) or, when None,
    one projection. Head dims: qk_nope_head_dim + qk_rope_head_dim for scores, v_head_dim for values. The RoPE layout
    is rotate-half (interleaved checkpoints are permuted at load, jspec/checkpoint/hf.py). `norm_eps`: the q_a / kv_a
    RMSNorm epsilon (Hugging Face builds both with 1e-6 whatever rms_norm_eps says)."""

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    norm_eps: float = 1e-6

    def __post_init__(self):
        for name in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            _require(_is_int(getattr(self, name)) and getattr(self, name) > 0, f"mla.{name}", "a positive int",
                     getattr(self, name))
        rope = self.qk_rope_head_dim
        _require(_is_int(rope) and rope > 0 and rope % 2 == 0, "mla.qk_rope_head_dim",
                 "a positive even int (RoPE rotates pairs)", rope)
        q = self.q_lora_rank
        _require(q is None or (_is_int(q) and q > 0), "mla.q_lora_rank", "None or a positive int", q)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


SCORING_FUNCS = ("sigmoid", "softmax")
GROUP_SCORES = ("top2_sum", "max")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts MLPs (DeepSeek-V2/V3 names). Layers from `first_k_dense_replace` on route each token to
    `num_experts_per_tok` of `n_routed_experts` SwiGLU experts (hidden `moe_intermediate_size`) and add
    `n_shared_experts` shared ones (one SwiGLU of hidden n_shared_experts * moe_intermediate_size); earlier layers
    keep the dense SwiGLU of `intermediate_size`.

    Routing (jspec/models/mlp.py): scores = `scoring_func`(router logits) in float32; selection adds
    `e_score_correction_bias` (V3) when present; experts are split into `n_group` groups, each scored by
    `group_score` ("top2_sum": the sum of its two best biased scores, V3; "max": its best score, V2
    group_limited_greedy), and only the `topk_group` best groups compete; the top-k experts' weights are their
    unbiased scores, renormalised when `norm_topk_prob`, times `routed_scaling_factor`."""

    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    n_shared_experts: int = 0
    first_k_dense_replace: int = 0
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "top2_sum"
    scoring_func: str = "sigmoid"
    e_score_correction_bias: bool = False
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0

    def __post_init__(self):
        for name, minimum in (("n_routed_experts", 1), ("num_experts_per_tok", 1), ("moe_intermediate_size", 1),
                              ("n_shared_experts", 0), ("first_k_dense_replace", 0), ("n_group", 1), ("topk_group", 1)):
            value = getattr(self, name)
            _require(_is_int(value) and value >= minimum, f"moe.{name}", f"an int >= {minimum}", value)
        experts = self.n_routed_experts
        _require(experts % self.n_group == 0, "moe.n_group", f"a divisor of n_routed_experts={experts}", self.n_group)
        _require(self.topk_group <= self.n_group, "moe.topk_group", f"an int <= n_group={self.n_group}", self.topk_group)
        selectable = self.topk_group * (experts // self.n_group)
        _require(self.num_experts_per_tok <= selectable, "moe.num_experts_per_tok",
                 f"an int <= the {selectable} experts of topk_group={self.topk_group} groups", self.num_experts_per_tok)
        per_group = experts // self.n_group
        _require(self.group_score in GROUP_SCORES, "moe.group_score", f"one of {GROUP_SCORES}", self.group_score)
        _require(self.n_group == 1 or self.group_score != "top2_sum" or per_group >= 2, "moe.group_score",
                 "'max' when a group has one expert ('top2_sum' sums two)", self.group_score)
        _require(self.scoring_func in SCORING_FUNCS, "moe.scoring_func", f"one of {SCORING_FUNCS}", self.scoring_func)
        _require(isinstance(self.e_score_correction_bias, bool), "moe.e_score_correction_bias", "a bool",
                 self.e_score_correction_bias)
        _require(isinstance(self.norm_topk_prob, bool), "moe.norm_topk_prob", "a bool", self.norm_topk_prob)
        _require(isinstance(self.routed_scaling_factor, (int, float)) and self.routed_scaling_factor > 0,
                 "moe.routed_scaling_factor", "a positive float", self.routed_scaling_factor)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Static description of a decoder-only transformer.

    Hashable and immutable: it is static metadata under `jit`, so two models with equal configs share
    compiled code. Parameters live apart, in a pytree built by `jspec.models.transformer.init_params`.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int | None = None  # defaults to hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | YarnScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 / Qwen2.5
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    sliding_window: int | None = None  # Mistral: a query sees at most this many most recent keys
    dtype: str = "float32"  # parameter and activation dtype; softmax, norms and logits run in float32
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    mask_token_id: int | None = None  # diffusion LMs: the token that stands for "not decoded yet"
    # Diffusion LMs (jspec/strategies/diffusion.py, block_diffusion.py). None: an autoregressive LM.
    # "masked": every position attends to every other (LLaDA / Dream); "block": causal across blocks of
    # `diffusion_block_size` positions, bidirectional inside a block (Fast-dLLM v2). The same transformer runs
    # all three: only the attention mask differs.
    diffusion: str | None = None
    diffusion_block_size: int | None = None  # the block size a "block" model was trained with
    shifted_logits: bool = False  # the logit at position i-1 predicts the token at i (Dream, Fast-dLLM v2)
    name: str = "transformer"
    # The attention kind of each layer (Hugging Face's names): "full_attention", "sliding_attention" (a query sees
    # the `sliding_window` most recent positions; its cache is a ring buffer bounded by the window), or any kind
    # registered with `jspec.models.attention.register_attention_kind`. None: every layer "sliding_attention"
    # when sliding_window is set, else "full_attention". Kernel choices live apart, in `KernelOptions`.
    layer_types: tuple[str, ...] | None = None
    # DeepSeek-style models: multi-head latent attention (every layer "mla" unless layer_types says otherwise) and
    # mixture-of-experts MLPs (layer groups split where a layer's MLP changes from dense to MoE).
    mla: MLAConfig | None = None
    moe: MoEConfig | None = None

    def __post_init__(self):
        if isinstance(self.mla, dict):
            object.__setattr__(self, "mla", MLAConfig(**self.mla))
        if isinstance(self.moe, dict):
            object.__setattr__(self, "moe", MoEConfig(**self.moe))
        _require(self.mla is None or isinstance(self.mla, MLAConfig), "mla", "None or an MLAConfig", self.mla)
        _require(self.moe is None or isinstance(self.moe, MoEConfig), "moe", "None or a MoEConfig", self.moe)
        _require(self.vocab_size > 0, "vocab_size", "a positive int", self.vocab_size)
        _require(self.hidden_size > 0, "hidden_size", "a positive int", self.hidden_size)
        _require(self.num_layers > 0, "num_layers", "a positive int", self.num_layers)
        _require(self.num_heads > 0, "num_heads", "a positive int", self.num_heads)
        _require(
            self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads == 0,
            "num_kv_heads",
            f"a positive divisor of num_heads={self.num_heads}",
            self.num_kv_heads,
        )
        _require(self.dtype in DTYPES, "dtype", f"one of {DTYPES}", self.dtype)
        _require(self.head_size % 2 == 0, "head_dim", "an even int (RoPE rotates pairs)", self.head_size)
        if isinstance(self.layer_types, list):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self._validate_layer_types()
        self._validate_diffusion()
        if isinstance(self.eos_token_ids, list):
            object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        if isinstance(self.rope_scaling, dict):
            values = dict(self.rope_scaling)
            scaling = YarnScaling(**values) if values.get("rope_type") == "yarn" else RopeScaling(**values)
            object.__setattr__(self, "rope_scaling", scaling)

    def _validate_layer_types(self) -> None:
        from jspec.models.attention import attention_kind_names

        window = self.sliding_window
        _require(window is None or (_is_int(window) and window >= 1), "sliding_window", "None or an int >= 1", window)
        types = self.layer_types
        sliding = window is not None and (types is None or "sliding_attention" in types)
        _require(not sliding or window <= self.max_position_embeddings, "sliding_window",
                 f"None or an int <= max_position_embeddings={self.max_position_embeddings}", window)
        if types is None:
            return
        _require(isinstance(types, tuple) and len(types) == self.num_layers, "layer_types",
                 f"None or one attention kind per layer ({self.num_layers})", types)
        known = attention_kind_names()
        for layer, kind in enumerate(types):
            if kind == "mla" and self.mla is None:
                raise ValueError(f"TransformerConfig.mla: layer {layer} is 'mla', which needs mla (an MLAConfig), got None")
            if kind not in known:
                raise ValueError(f"TransformerConfig.layer_types: layer {layer} has unknown kind {kind!r}; known kinds are {known}")
            if kind == "sliding_attention" and window is None:
                raise ValueError(f"TransformerConfig.sliding_window: layer {layer} is 'sliding_attention', which needs "
                                 "sliding_window (an int >= 1), got None")

    def _validate_diffusion(self) -> None:
        _require(self.diffusion is None or self.diffusion in DIFFUSION_KINDS, "diffusion",
                 f"None or one of {DIFFUSION_KINDS}", self.diffusion)
        mask = self.mask_token_id
        _require(mask is None or (_is_int(mask) and 0 <= mask < self.vocab_size), "mask_token_id",
                 f"None or a token id in [0, vocab_size={self.vocab_size})", mask)
        _require(self.diffusion is None or mask is not None, "mask_token_id",
                 f"a token id (a diffusion={self.diffusion!r} model needs a mask token)", mask)
        size = self.diffusion_block_size
        if self.diffusion == "block":
            _require(_is_int(size) and size >= 1, "diffusion_block_size", "a positive int for diffusion='block'", size)
        else:
            _require(size is None, "diffusion_block_size", "None unless diffusion='block'", size)

    @property
    def attention_types(self) -> tuple[str, ...]:
        """The attention kind of every layer (see `layer_types`)."""
        if self.layer_types is not None:
            return self.layer_types
        if self.mla is not None:
            return ("mla",) * self.num_layers
        return ("sliding_attention" if self.sliding_window is not None else "full_attention",) * self.num_layers

    @property
    def layer_groups(self) -> tuple[tuple[str, int, int], ...]:
        """(kind, first layer, end layer) of each run of consecutive layers of one attention kind and one MLP kind
        (`is_moe_layer`): the units whose parameters and cache entries are stacked and run with one `lax.scan`."""
        groups: list[tuple[str, int, int]] = []
        for layer, kind in enumerate(self.attention_types):
            if groups and groups[-1][0] == kind and self.is_moe_layer(layer) == self.is_moe_layer(layer - 1):
                groups[-1] = (kind, groups[-1][1], layer + 1)
            else:
                groups.append((kind, layer, layer + 1))
        return tuple(groups)

    def is_moe_layer(self, layer: int) -> bool:
        """Whether `layer`'s MLP is a mixture of experts (else the dense SwiGLU of intermediate_size)."""
        return self.moe is not None and layer >= self.moe.first_k_dense_replace

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def queries_per_kv_head(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        if self.layer_types is not None:
            out["layer_types"] = list(self.layer_types)
        for name in ("mla", "moe"):  # left out when None (config files of models without them stay as they were)
            if getattr(self, name) is None:
                out.pop(name)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TransformerConfig":
        from jspec.models.kernels import KernelOptions

        known = {f.name for f in dataclasses.fields(cls)}
        # kernel choices were config fields in jspec 0.1; they are not part of what a model is
        values = {k: v for k, v in values.items() if k not in KernelOptions.field_names()}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TransformerConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> "TransformerConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def num_parameters(self) -> int:
        """Parameter count, embeddings included (tied embeddings counted once)."""
        if self.mla is not None or self.moe is not None:  # counted from the parameter shapes (nothing allocated)
            import jax

            from jspec.models import transformer

            shapes = jax.eval_shape(lambda key: transformer.init_params(self, key), jax.random.key(0))
            return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))
        d, h, kv, hd, f = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_size, self.intermediate_size
        attn = d * h * hd + 2 * d * kv * hd + h * hd * d
        if self.qkv_bias:
            attn += h * hd + 2 * kv * hd
        if self.qk_norm:
            attn += 2 * hd
        per_layer = attn + 3 * d * f + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + embed + d


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(ok: bool, name: str, expected: str, got: Any) -> None:
    if not ok:
        raise ValueError(f"TransformerConfig.{name}: expected {expected}, got {got!r}")
