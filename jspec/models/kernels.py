"""Kernel choices: how a model computes, never what it computes.

`KernelOptions` is kept apart from `TransformerConfig`: changing the attention kernel (XLA, Pallas dense flash
decoding, InfLLM v2 block-sparse) or its tuning changes neither a checkpoint nor its config.json. A `Model`
carries its options as static metadata (`model.with_kernels(attention_impl="pallas_dense")`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

ATTENTION_IMPLS = ("xla", "pallas_dense", "pallas_sparse")


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """Decode attention of full-attention layers (see jspec/models/attention/).

    "xla": `layers.attend` everywhere. "pallas_dense" / "pallas_sparse": decode-sized causal chunks over a cache
    use the Pallas kernels; prefill and custom masks (tree verification, diffusion blocks) stay on XLA. Cache
    capacities are then rounded to a multiple of `cache_size_multiple`. Sliding-window layers always attend with
    XLA over their ring buffer ("pallas_sparse" refuses them: InfLLM v2 has no window).
    """

    attention_impl: str = "xla"
    attention_interpret: bool | None = None  # Pallas interpret mode; None: interpret on CPU, compile elsewhere
    dense_block_size: int = 128  # keys per step of the dense decode kernel ("pallas_dense")
    # Slots per step of the MLA decode kernel ("pallas_dense" on "mla" layers): 64 keeps a GPU program's two bf16
    # latent + RoPE blocks of DeepSeek's widths (512 + 64) in shared memory; on TPU prefer 512.
    mla_block_size: int = 64
    # InfLLM v2 sparse attention ("pallas_sparse"), released MiniCPM4 defaults:
    sparse_block_size: int = 64  # keys per attended block
    sparse_kernel_size: int = 32  # compressed key = mean of this many keys ...
    sparse_kernel_stride: int = 16  # ... every this many keys
    sparse_init_blocks: int = 1  # first blocks always attended (attention sink)
    sparse_local_blocks: int = 32  # most recent blocks always attended (window 2048 / 64)
    sparse_top_k: int = 64  # blocks attended per query and KV head, forced ones included
    sparse_dense_len: int = 8192  # a query whose sequence (itself included) is shorter attends densely
    # Where it computes: a `jspec.sharding.MeshSharding` (set by `jspec.shard`), or None for one device. Caches
    # are then created sharded and the Pallas kernels run per shard under `jax.shard_map`.
    sharding: Any = None
    # TPLA (`jspec.tpla`): a `jspec.models.attention.mla.LatentParallel`: MLA layers decode with the latent split
    # over the mesh's model axis. None: ordinary MLA.
    latent_parallel: Any = None
    # Decoding with tied embeddings multiplies by a [D, V] copy of the embedding (made once per embedding array and
    # kept while it lives) instead of by embed.T in every forward: XLA:CPU re-packs the transposed operand of a
    # product of >= 2 rows in every call (multi-token verification paid ~3x one token's head for 2 rows). None: where
    # the embedding lives on CPU, unsharded models only; True / False: always (unsharded) / never. Costs one V x D
    # buffer.
    head_copy: bool | None = None

    def __post_init__(self):
        impl = self.attention_impl
        _require(impl in ATTENTION_IMPLS, "attention_impl", f"one of {ATTENTION_IMPLS}", impl)
        for name in ("attention_interpret", "head_copy"):
            value = getattr(self, name)
            _require(value is None or isinstance(value, bool), name, "None or a bool", value)
        for name in ("dense_block_size", "mla_block_size", "sparse_block_size"):
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

    @property
    def cache_size_multiple(self) -> int:
        """Cache capacities are rounded up to a multiple of this: the kernel's block size (1 for "xla")."""
        return {"xla": 1, "pallas_dense": self.dense_block_size, "pallas_sparse": self.sparse_block_size}[
            self.attention_impl
        ]

    def replace(self, **changes: Any) -> "KernelOptions":
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(ok: bool, name: str, expected: str, got: Any) -> None:
    if not ok:
        raise ValueError(f"KernelOptions.{name}: expected {expected}, got {got!r}")
