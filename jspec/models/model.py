"""`jspec.Model`: one pytree that carries a model's parameters, with its config and tokenizer as static metadata.

Because the config is static metadata, a `Model` passes through `jit` as an ordinary argument: its arrays
are traced, its config selects the compiled code.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import struct

from jspec.cache import KVCache
from jspec.models import transformer
from jspec.models.config import TransformerConfig


@struct.dataclass
class Model:
    params: transformer.Params
    config: TransformerConfig = struct.field(pytree_node=False)
    tokenizer: Any = struct.field(pytree_node=False, default=None)

    @classmethod
    def random(cls, config: TransformerConfig, key: jax.Array | int = 0, init_scale: float = 0.02, tokenizer: Any = None) -> "Model":
        """A model with random parameters (see `transformer.init_params`)."""
        if isinstance(key, int):
            key = jax.random.key(key)
        return cls(params=transformer.init_params(config, key, init_scale), config=config, tokenizer=tokenizer)

    def forward(
        self,
        tokens: jax.Array,  # [B, T]
        positions: jax.Array,  # [B, T]
        cache: KVCache | None = None,
        mask: jax.Array | None = None,  # [B, T, S]
        **options: Any,
    ) -> tuple[jax.Array, KVCache | None]:
        """`transformer.forward` with this model's parameters and config."""
        return transformer.forward(self.params, self.config, tokens, positions, cache, mask, **options)

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        return KVCache.create(self.config, batch_size, capacity)

    def without_tokenizer(self) -> "Model":
        """The same model with no tokenizer: what jitted code receives, so tokenizers never key a compile."""
        return self if self.tokenizer is None else self.replace(tokenizer=None)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def num_parameters(self) -> int:
        return sum(leaf.size for leaf in jax.tree.leaves(self.params))
