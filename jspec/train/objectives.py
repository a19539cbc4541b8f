"""Training objectives: pluggable loss functions the one trainer calls.

An objective is built by a factory registered under a name (`register_objective`), from the model config and
the recipe's `objective_options`, and is then a pure function

    objective(params, batch, key) -> (loss, metrics)

- params: the parameter pytree in the compute dtype (the trainer casts fp32 master weights before the call);
- batch: {"tokens": int32 [B, L + 1]} packed windows (objectives take what they need: a causal LM predicts
  tokens[:, 1:] from tokens[:, :-1]; a diffusion objective would mask a subset of tokens[:, :L]);
- key: a PRNG key unique to the step (`fold_in(seed, step)`), for objectives that sample (masking, noise);
- loss: the scalar that is differentiated;
- metrics: at least "loss_sum" and "token_count" (float32 scalars), so evaluation can average over many
  batches exactly; anything else is logged.

The causal LM objective is registered here; masked-diffusion and block-diffusion objectives register beside it
(`register_objective("masked_diffusion", factory)`) without touching the trainer.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp

from jspec.models import transformer
from jspec.models.config import TransformerConfig

Metrics = dict[str, jax.Array]


class Objective(Protocol):
    def __call__(self, params: Any, batch: dict[str, jax.Array], key: jax.Array) -> tuple[jax.Array, Metrics]: ...


ObjectiveFactory = Callable[..., Objective]  # factory(config: TransformerConfig, **options) -> Objective

_OBJECTIVES: dict[str, ObjectiveFactory] = {}


def register_objective(name: str, factory: ObjectiveFactory) -> None:
    _OBJECTIVES[name] = factory


def objective_names() -> list[str]:
    return sorted(_OBJECTIVES)


def make_objective(name: str, config: TransformerConfig, **options: Any) -> Objective:
    if name not in _OBJECTIVES:
        raise ValueError(f"objective: unknown {name!r}; registered objectives are {objective_names()}")
    return _OBJECTIVES[name](config, **options)


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:  # logits [B, T, V] f32, targets [B, T]
    """Per-token cross-entropy [B, T] in float32."""
    logits = logits.astype(jnp.float32)
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_normalizer - target_logits


def causal_lm(config: TransformerConfig, ignore_token_id: int | None = None) -> Objective:
    """Next-token cross-entropy over every position of the packed window, through the one `forward`.

    ignore_token_id: targets equal to it are left out of the loss (e.g. padding); None keeps all.
    """

    def objective(params: Any, batch: dict[str, jax.Array], key: jax.Array) -> tuple[jax.Array, Metrics]:
        del key  # deterministic objective
        tokens = batch["tokens"]  # [B, L + 1]
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        batch_size, length = inputs.shape
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None, :], (batch_size, length))
        logits, _ = transformer.forward(params, config, inputs, positions)  # causal over the chunk
        losses = token_cross_entropy(logits, targets)
        weights = jnp.ones_like(losses) if ignore_token_id is None else (targets != ignore_token_id).astype(jnp.float32)
        loss_sum = jnp.sum(losses * weights)
        token_count = jnp.sum(weights)
        loss = loss_sum / jnp.maximum(token_count, 1.0)
        accuracy = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * weights) / jnp.maximum(token_count, 1.0)
        return loss, {"loss_sum": loss_sum, "token_count": token_count, "accuracy": accuracy}

    return objective


register_objective("causal_lm", causal_lm)
