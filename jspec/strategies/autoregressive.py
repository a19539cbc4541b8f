"""Autoregressive decoding, greedy or sampled: the baseline every other strategy is measured against."""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from jspec import processors, sampling
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
    processing: processors.Processing
    stop_tokens: jax.Array  # [B, K]
    key: jax.Array
    step: jax.Array  # [] int32
    model_calls: jax.Array  # [] int32


@struct.dataclass
class Autoregressive:
    """One token per model call. Temperature 0 is greedy (argmax); otherwise samples from the warped
    distribution (temperature, top-k, top-p, min-p; see `jspec.sampling`). All four are traced values:
    changing them does not recompile. Each may be a scalar or one value per row.
    generation: logit processors (applied before the warpers) and log-probabilities (`jspec.processors`); set
    through `jspec.decode`'s options (repetition_penalty=..., logprobs=k, ...)."""

    name: ClassVar[str] = "autoregressive"
    shape_buckets: ClassVar[bool] = True  # batch and max_new_tokens may be bucketed (padding rows, traced limits)
    temperature: Any = 0.0
    top_k: Any = 0
    top_p: Any = 1.0
    min_p: Any = 0.0
    generation: processors.GenerationOptions = struct.field(default_factory=processors.GenerationOptions)

    def validate(self, model: Any, prompts: Prompts) -> None:
        sampling.validate_sampling_options(
            prompts.num_rows, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p
        )
        self.generation.validate(model.config.vocab_size, prompts.num_rows)

    def cache_headroom(self) -> int:
        return 0

    def sampling_params(self, batch_size: int) -> sampling.SamplingParams:
        return sampling.SamplingParams.broadcast(batch_size, self.temperature, self.top_k, self.top_p, self.min_p)

    def init(self, model: Any, prompts: Prompts, key: jax.Array) -> AutoregressiveState:
        return self.start(model, prompts, key, model.new_cache(prompts.batch_size, prompts.cache_size, max_chunk=1))

    def start(self, model: Any, prompts: Prompts, key: jax.Array, cache: Cache) -> AutoregressiveState:
        """`init` on a given empty cache (a caller whose steps share a cache layout with wider forwards, e.g. a
        sliding window's ring sized for a verification chunk, passes that cache: the steps then compute exactly
        what they compute on it)."""
        logits, cache = prefill(model, prompts, cache)
        params = self.sampling_params(prompts.batch_size)
        processing = processors.Processing.create(self.generation, prompts, model.config.vocab_size)
        output = OutputBuffer.create(prompts.batch_size, prompts.max_new_tokens, prompts.limits, self.generation.logprobs)
        running = jnp.ones((prompts.batch_size,), bool)
        first, output, processing = emit_sampled(
            jax.random.fold_in(key, 0), logits, running, output, processing, params, prompts.stop_tokens,
            self.generation.logprobs)
        return AutoregressiveState(
            cache=cache,
            pending=first,
            output=mark_cache_full(output, cache.lengths, cache.capacity),
            sampling=params,
            processing=processing,
            stop_tokens=prompts.stop_tokens,
            key=key,
            step=jnp.int32(1),
            model_calls=jnp.int32(1),
        )

    def step(self, model: Any, state: AutoregressiveState) -> AutoregressiveState:
        running = ~state.output.finished
        token, cache, output, processing = decode_one_token(
            model, state.cache, state.pending, running, jax.random.fold_in(state.key, state.step), state.output,
            state.processing, state.sampling, state.stop_tokens, self.generation.logprobs)
        return state.replace(
            cache=cache,
            pending=jnp.where(running, token, state.pending),
            output=mark_cache_full(output, cache.lengths, cache.capacity),
            processing=processing,
            step=state.step + 1,
            model_calls=state.model_calls + 1,
        )

    def done(self, state: AutoregressiveState) -> jax.Array:
        return state.output.finished

    def output(self, state: AutoregressiveState) -> DecodeOutput:
        return state.output.decode_output(
            {"model_calls": state.model_calls, "steps": state.step, "tokens_generated": state.output.lengths})


def decode_one_token(
    model: Any,
    cache: Cache,  # lengths[b] = committed tokens; the pending token goes to slot lengths[b]
    pending: jax.Array,  # [B] int32: the last emitted token, not yet in the cache
    running: jax.Array,  # [B] bool: rows that decode (the others write nowhere and keep their length)
    key: jax.Array,
    output: OutputBuffer,
    processing: processors.Processing,
    params: sampling.SamplingParams,
    stop_tokens: jax.Array,  # [B, K]
    logprobs: int | None,
) -> tuple[jax.Array, Cache, OutputBuffer, processors.Processing]:  # the new token [B], cache, output, processing
    """One autoregressive step: a one-token forward over the pending token (committed to the cache for running rows),
    then `emit_sampled` of the next token. Speculative decoding's steps that draft nothing run this same step."""
    slots = jnp.where(running, cache.lengths, cache.capacity)[:, None]
    logits, cache = model.forward(pending[:, None], cache.lengths[:, None], cache, write_slots=slots)
    cache = cache.with_lengths(cache.lengths + running)
    token, output, processing = emit_sampled(key, logits[:, 0], running, output, processing, params, stop_tokens, logprobs)
    return token, cache, output, processing


def emit_sampled(
    key: jax.Array,
    logits: jax.Array,  # [B, V]: the model's next-token logits
    running: jax.Array,  # [B] bool: rows that emit
    output: OutputBuffer,
    processing: processors.Processing,
    params: sampling.SamplingParams,
    stop_tokens: jax.Array,  # [B, K]
    logprobs: int | None,  # k, or None: no scores
) -> tuple[jax.Array, OutputBuffer, processors.Processing]:  # the token [B], the output, the processing
    """Process, sample, append one token per running row (with its scores), and extend the processors' history
    by what the output kept."""
    processed = processing(logits[:, None])[:, 0]
    token = sampling.sample(key, processed, params)
    scores = None
    if logprobs is not None:
        scores = processors.token_scores(logits[:, None], processed[:, None], token[:, None], params, logprobs)
    appended = output.append(token[:, None], running.astype(jnp.int32), stop_tokens, scores)
    return token, appended, processing.append(token[:, None], appended.lengths - output.lengths)


def greedy() -> Autoregressive:
    """Autoregressive argmax decoding."""
    return Autoregressive(temperature=0.0)


def sample(*, temperature: Any = 1.0, top_k: Any = 0, top_p: Any = 1.0, min_p: Any = 0.0) -> Autoregressive:
    """Autoregressive sampling (temperature 1 unless given)."""
    return Autoregressive(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)


register_strategy("greedy", greedy, generation_options=True)
register_strategy("sample", sample, generation_options=True)
register_strategy("autoregressive", Autoregressive, generation_options=True)
