"""`jspec.Model`: one pytree that carries a model's parameters, with its config, kernel options and tokenizer as
static metadata; the model protocol every strategy uses and nothing else.

Because config and kernel options are static metadata, a `Model` passes through `jit` as an ordinary argument:
its arrays are traced, its config selects the compiled code.

The protocol (what strategies call):
    model.forward(tokens, positions, cache, mask, *, write_slots, skip_layers, output_indices) -> logits, cache
    model.new_cache(batch_size, capacity, *, max_chunk=None) -> Cache     the only cache constructor
    model.param_axes, model.cache_axes                                     logical axis names (sharding)
    model.sharding                                                         its mesh and rules, or None
    model.config.vocab_size, mask_token_id, shifted_logits, ...            what a strategy needs to know
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import jax
from flax import struct

from jspec.cache import Cache
from jspec.models import transformer
from jspec.models.config import TransformerConfig
from jspec.models.kernels import KernelOptions


@struct.dataclass
class Model:
    params: transformer.Params
    config: TransformerConfig = struct.field(pytree_node=False)
    tokenizer: Any = struct.field(pytree_node=False, default=None)
    kernels: KernelOptions = struct.field(pytree_node=False, default=KernelOptions())

    def __post_init__(self):
        transformer.group_kinds(self.config, self.kernels)  # raises for a layer kind the kernels cannot serve

    @classmethod
    def random(
        cls, config: TransformerConfig, key: jax.Array | int = 0, init_scale: float = 0.02, tokenizer: Any = None,
        kernels: KernelOptions | None = None,
    ) -> "Model":
        """A model with random parameters (see `transformer.init_params`)."""
        if isinstance(key, int):
            key = jax.random.key(key)
        return cls(params=transformer.init_params(config, key, init_scale), config=config, tokenizer=tokenizer,
                   kernels=kernels or KernelOptions())

    def forward(
        self,
        tokens: jax.Array,  # [B, T]
        positions: jax.Array,  # [B, T]
        cache: Cache | None = None,
        mask: jax.Array | None = None,  # [B, T, S]
        **options: Any,
    ) -> tuple[jax.Array, Cache | None]:
        """`transformer.forward` with this model's parameters, config and kernels. On a mesh, the returned cache
        keeps the cache's sharding (so a loop carrying it never re-lays it out)."""
        logits, cache = transformer.forward(self.params, self.config, tokens, positions, cache, mask,
                                            kernels=self.kernels, **options)
        if self.sharding is not None and cache is not None:
            cache = self.sharding.constrain(cache, self.cache_axes)
        return logits, cache

    def new_cache(self, batch_size: int, capacity: int, *, max_chunk: int | None = None) -> Cache:
        """An empty cache (see `transformer.new_cache`): `capacity` logical slots per row, rounded up to the attention
        kernels' block size; `max_chunk` bounds sliding-window layers' ring buffers."""
        cache = transformer.new_cache(self.config, self.kernels, batch_size, capacity, max_chunk)
        if self.sharding is not None:  # created sharded inside the compiled loop: never whole on one device
            cache = self.sharding.constrain(cache, self.cache_axes)
        return cache

    def with_kernels(self, **options: Any) -> "Model":
        """The same model computing with other kernel options (`KernelOptions` fields); its config is unchanged."""
        return self.replace(kernels=self.kernels.replace(**options))

    def without_tokenizer(self) -> "Model":
        """The same model with no tokenizer: what jitted code receives, so tokenizers never key a compile."""
        return self if self.tokenizer is None else self.replace(tokenizer=None)

    @property
    def sharding(self) -> Any:
        """The `jspec.sharding.MeshSharding` this model was placed with (`jspec.shard`), or None."""
        return self.kernels.sharding

    @property
    def param_axes(self) -> transformer.Params:
        return transformer.param_logical_axes(self.config)

    @property
    def cache_axes(self) -> Cache:
        return transformer.cache_logical_axes(self.config, self.kernels)

    @property
    def cache_size_multiple(self) -> int:
        """Cache capacities are rounded up to a multiple of this (the attention kernels' block size)."""
        return transformer.cache_size_multiple(self.config, self.kernels)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def num_parameters(self) -> int:
        return sum(leaf.size for leaf in jax.tree.leaves(self.params))


# id(embedding) -> (a weak reference to it, its [D, V] copy): copies live as long as their embedding.
_head_copies: dict[int, tuple[weakref.ref, jax.Array]] = {}
_transposed = jax.jit(lambda embed: embed.T)


def with_head_copy(model: Any) -> Any:
    """`model` (a `Model` or `RecurrentModel`) as decoding runs it. Where `model.kernels.head_copy` asks for it (None:
    when the embedding lives on CPU) and the embeddings are tied, the same model untied: its lm_head [D, V] is a copy
    of embed.T, made once per embedding array and kept while that array lives. Sharded models, and models whose
    embedding is not a concrete array (traced, or lazily loaded), are returned unchanged.

    The copy holds the same numbers, so logits differ from the tied model's at most by the order XLA sums a
    product in; every strategy of a decode computes with the same copy (a draft model's too, see `jspec.decode`)."""
    kernels, embed = getattr(model, "kernels", None), model.params.get("embed")
    concrete = isinstance(embed, jax.Array) and not isinstance(embed, jax.core.Tracer)
    if kernels is None or not concrete or not model.config.tie_embeddings or model.sharding is not None:
        return model
    wanted = kernels.head_copy
    if wanted is None:
        wanted = all(device.platform == "cpu" for device in embed.devices())
    if not wanted:
        return model
    key = id(embed)
    entry = _head_copies.get(key)
    if entry is None or entry[0]() is not embed:
        forget = lambda _, key=key, table=_head_copies: table.pop(key, None)  # noqa: E731 (bound now: no globals at exit)
        entry = (weakref.ref(embed, forget), _transposed(embed))
        _head_copies[key] = entry
    params = {**model.params, "lm_head": entry[1]}
    return model.replace(params=params, config=dataclasses.replace(model.config, tie_embeddings=False))
