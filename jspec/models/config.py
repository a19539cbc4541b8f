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
ATTENTION_IMPLS = ("xla", "pallas_dense", "pallas_sparse")


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
    # Decode attention (see jspec/models/kernel_attention.py). "xla": `layers.attend` everywhere.
    # "pallas_dense" / "pallas_sparse": decode-sized causal chunks over a cache use the Pallas kernels; prefill and
    # custom masks (tree verification, diffusion blocks) stay on XLA. Cache capacities must then be a multiple of
    # `cache_size_multiple`.
    attention_impl: str = "xla"
    attention_interpret: bool | None = None  # Pallas interpret mode; None: interpret on CPU, compile elsewhere
    dense_block_size: int = 128  # keys per step of the dense decode kernel ("pallas_dense")
    # InfLLM v2 sparse attention ("pallas_sparse"), released MiniCPM4 defaults:
    sparse_block_size: int = 64  # keys per attended block
    sparse_kernel_size: int = 32  # compressed key = mean of this many keys ...
    sparse_kernel_stride: int = 16  # ... every this many keys
    sparse_init_blocks: int = 1  # first blocks always attended (attention sink)
    sparse_local_blocks: int = 32  # most recent blocks always attended (window 2048 / 64)
    sparse_top_k: int = 64  # blocks attended per query and KV head, forced ones included
    sparse_dense_len: int = 8192  # a query whose sequence (itself included) is shorter attends densely

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
        self._validate_attention()
        self._validate_diffusion()
        if isinstance(self.eos_token_ids, list):
            object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

    def _validate_attention(self) -> None:
        impl = self.attention_impl
        _require(impl in ATTENTION_IMPLS, "attention_impl", f"one of {ATTENTION_IMPLS}", impl)
        _require(
            self.attention_interpret is None or isinstance(self.attention_interpret, bool),
            "attention_interpret",
            "None or a bool",
            self.attention_interpret,
        )
        for name in ("dense_block_size", "sparse_block_size"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 16 and value & (value - 1) == 0, name, "a power of two >= 16", value)
        for name, minimum in (("sparse_kernel_size", 1), ("sparse_kernel_stride", 1), ("sparse_init_blocks", 0),
                              ("sparse_local_blocks", 1), ("sparse_top_k", 1), ("sparse_dense_len", 0)):
            value = getattr(self, name)
            _require(_is_int(value) and value >= minimum, name, f"an int >= {minimum}", value)
        stride = self.sparse_kernel_stride
        _require(self.sparse_kernel_size % stride == 0, "sparse_kernel_stride",
                 f"a divisor of sparse_kernel_size={self.sparse_kernel_size}", stride)
        _require(self.sparse_block_size % stride == 0, "sparse_kernel_stride",
                 f"a divisor of sparse_block_size={self.sparse_block_size}", stride)
        forced = self.sparse_init_blocks + self.sparse_local_blocks
        _require(self.sparse_top_k >= forced, "sparse_top_k",
                 f"an int >= sparse_init_blocks + sparse_local_blocks = {forced} (forced blocks are always selected)",
                 self.sparse_top_k)
        _require(
            self.attention_impl != "pallas_sparse" or self.sliding_window is None,
            "sliding_window",
            "None with attention_impl='pallas_sparse' (InfLLM v2 block selection has no sliding window; "
            "use 'pallas_dense' or 'xla')",
            self.sliding_window,
        )

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
    def cache_size_multiple(self) -> int:
        """KV cache capacities must be a multiple of this: the attention kernel's block size (1 for "xla")."""
        return {"xla": 1, "pallas_dense": self.dense_block_size, "pallas_sparse": self.sparse_block_size}[
            self.attention_impl
        ]

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
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TransformerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
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
