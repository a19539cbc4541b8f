"""Transformer configuration: a frozen, hashable dataclass passed as static metadata.

One configuration covers the Llama-2/3, Mistral, Qwen2/2.5 and Qwen3 families: the differences between them
are named options (qkv bias, q/k norm, Llama-3 RoPE scaling, sliding window, tied embeddings), not copies of
the model code.
"""

from __future__ import annotations

import dataclasses
import json
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
    rope_scaling: RopeScaling | None = None
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

    def __post_init__(self):
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
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

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
        return ("sliding_attention" if self.sliding_window is not None else "full_attention",) * self.num_layers

    @property
    def layer_groups(self) -> tuple[tuple[str, int, int], ...]:
        """(kind, first layer, end layer) of each run of consecutive layers of one kind: the units whose
        parameters and cache entries are stacked and run with one `lax.scan`."""
        groups: list[tuple[str, int, int]] = []
        for layer, kind in enumerate(self.attention_types):
            if groups and groups[-1][0] == kind:
                groups[-1] = (kind, groups[-1][1], layer + 1)
            else:
                groups.append((kind, layer, layer + 1))
        return tuple(groups)

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
