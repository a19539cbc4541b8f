"""Attention kinds: per-layer modules, each owning its parameters, its cache entry and its apply.

A config names one kind per layer (`TransformerConfig.attention_types`); consecutive layers of one kind form a
group whose parameters and cache entry are stacked over the group's layers and run with one `lax.scan`. A new
kind is one module: a frozen dataclass implementing `AttentionKind` (jspec/models/attention/base.py),
registered with `register_attention_kind(layer_type, factory)`; no strategy changes.

Built in:
- "full_attention": grouped-query attention over a cache indexed by slot (XLA, or the Pallas dense decode
  kernel), or InfLLM v2 block-sparse attention (Pallas; compressed keys in its own entry), as `KernelOptions`
  chooses.
- "mla": DeepSeek multi-head latent attention over a latent-only cache (absorbed form for decode chunks; TPLA
  under `jspec.tpla`).
- "sliding_attention": grouped-query attention over the `sliding_window` most recent positions, with a ring-buffer
  cache bounded by the window plus the largest chunk a step writes.
"""

from __future__ import annotations

from typing import Callable

from jspec.models.attention.base import AttentionKind

_KINDS: dict[str, Callable[..., AttentionKind]] = {}


def register_attention_kind(layer_type: str, factory: Callable[..., AttentionKind]) -> None:
    """Make `layer_type` usable in `TransformerConfig.layer_types`: `factory(config, kernels, layer)` returns
    the kind that runs that layer (frozen and hashable: it is static metadata under jit)."""
    _KINDS[layer_type] = factory


def attention_kind_names() -> list[str]:
    return sorted(_KINDS)


def attention_kind(layer_type: str, config, kernels, layer: int) -> AttentionKind:
    """The kind that runs `layer` (of type `layer_type`) of a model with `config` and `kernels`."""
    if layer_type not in _KINDS:
        raise ValueError(f"layer_types: layer {layer} has unknown kind {layer_type!r}; known kinds are {attention_kind_names()}")
    return _KINDS[layer_type](config, kernels, layer)


def _builtin_kinds() -> None:
    from jspec.models.attention.full import full_attention
    from jspec.models.attention.mla import mla_attention
    from jspec.models.attention.window import sliding_attention

    register_attention_kind("full_attention", full_attention)
    register_attention_kind("mla", mla_attention)
    register_attention_kind("sliding_attention", sliding_attention)


_builtin_kinds()

__all__ = ["AttentionKind", "attention_kind", "attention_kind_names", "register_attention_kind"]
