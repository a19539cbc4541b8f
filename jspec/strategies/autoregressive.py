"""Autoregressive decoding, greedy or sampled: the baseline every other strategy is measured against."""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from jspec import sampling
from jspec.cache import Cache
from jspec.strategies.base import (
    DecodeOutput,
    OutputBuffer,
    Prompts,
    mark_cache_full,
    prefill,
    register_strategy,
)


@struct.dataclass
class AutoregressiveState:
    cache: Cache
    pending: jax.Array  # [B] int32: the last emitted token, not yet in the cache
    output: OutputBuffer
    sampling: sampling.SamplingParams
    stop_tokens: jax.Array  # [B, K]
    key: jax.Array
    step: jax.Array  # [] int32
    model_calls: jax.Array  # [] int32


@struct.dataclass
class Autoregressive:
    """One token per model call. Temperature 0 is greedy (argmax); otherwise samples from the warped
    distribution (temperature, top-k, top-p, min-p; see `jspec.sampling`). All four are traced values:
    changing them does not recompile. Each may be a scalar or one value per row."""

    name: ClassVar[str] = "autoregressive"
    shape_buckets: ClassVar[bool] = True  # batch and max_new_tokens may be bucketed (padding rows, traced limits)
    temperature: Any = 0.0
    top_k: Any = 0
    top_p: Any = 1.0
    min_p: Any = 0.0

    def validate(self, model: Any, prompts: Prompts) -> None:
        sampling.validate_sampling_options(
            prompts.num_rows, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p
        )

    def cache_headroom(self) -> int:
        return 0

    def sampling_params(self, batch_size: int) -> sampling.SamplingParams:
        return sampling.SamplingParams.broadcast(batch_size, self.temperature, self.top_k, self.top_p, self.min_p)

    def init(self, model: Any, prompts: Prompts, key: jax.Array) -> AutoregressiveState:
        cache = model.new_cache(prompts.batch_size, prompts.cache_size, max_chunk=1)  # one token per step
        logits, cache = prefill(model, prompts, cache)
        params = self.sampling_params(prompts.batch_size)
        first = sampling.sample(jax.random.fold_in(key, 0), logits, params)
        output = OutputBuffer.create(prompts.batch_size, prompts.max_new_tokens, prompts.limits)
        output = output.append(first[:, None], jnp.ones_like(first), prompts.stop_tokens)
        return AutoregressiveState(
            cache=cache,
            pending=first,
            output=mark_cache_full(output, cache.lengths, cache.capacity),
            sampling=params,
            stop_tokens=prompts.stop_tokens,
            key=key,
            step=jnp.int32(1),
            model_calls=jnp.int32(1),
        )

    def step(self, model: Any, state: AutoregressiveState) -> AutoregressiveState:
        cache = state.cache
        running = ~state.output.finished
        slots = jnp.where(running, cache.lengths, cache.capacity)[:, None]
        logits, cache = model.forward(state.pending[:, None], cache.lengths[:, None], cache, write_slots=slots)
        cache = cache.with_lengths(cache.lengths + running)
        token = sampling.sample(jax.random.fold_in(state.key, state.step), logits[:, 0], state.sampling)
        output = state.output.append(token[:, None], running.astype(jnp.int32), state.stop_tokens)
        return state.replace(
            cache=cache,
            pending=jnp.where(running, token, state.pending),
            output=mark_cache_full(output, cache.lengths, cache.capacity),
            step=state.step + 1,
            model_calls=state.model_calls + 1,
        )

    def done(self, state: AutoregressiveState) -> jax.Array:
        return state.output.finished

    def output(self, state: AutoregressiveState) -> DecodeOutput:
        return DecodeOutput(
            tokens=state.output.tokens,
            lengths=state.output.lengths,
            finish_reason=state.output.finish_reason,
            stats={"model_calls": state.model_calls, "steps": state.step, "tokens_generated": state.output.lengths},
        )


def greedy() -> Autoregressive:
    """Autoregressive argmax decoding."""
    return Autoregressive(temperature=0.0)


def sample(*, temperature: Any = 1.0, top_k: Any = 0, top_p: Any = 1.0, min_p: Any = 0.0) -> Autoregressive:
    """Autoregressive sampling (temperature 1 unless given)."""
    return Autoregressive(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)


register_strategy("greedy", greedy)
register_strategy("sample", sample)
register_strategy("autoregressive", Autoregressive)
