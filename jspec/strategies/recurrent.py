"""Decoding recurrent-depth models (jspec.models.recurrent): autoregressive at a fixed r, per-token adaptive exit,
and the diffusion-forcing parallel sampler (Geiping, Yang, Su 2025, arXiv 2510.14961). Each runs in the one
compiled loop of `jspec.decode`, with static shapes and every row at its own front.

- `recurrent`: one token per step, r = `num_recurrences` core iterations per token (a traced value: changing it
  does not recompile; with the exact cache, r up to the cache's recurrence copies, a power-of-two bucket of r).
- `recurrent_adaptive`: the same, but each row stops iterating a token once the relative change of its latent
  (criterion "latent") or the KL divergence between successive readouts ("kl") is below `threshold`, at most
  `num_recurrences` iterations. Stats: recurrences per token. Threshold 0 never exits: it equals `recurrent`.
- `diffusion_forcing`: a window of up to `max_wavefront` positions, each at its own recurrence depth, advanced
  `inner_recurrence` core steps per loop step in parallel; positions freeze when their latent stops changing.

A non-recurrent model, r < 1, max_wavefront < 1, a negative threshold: ValueError naming the argument.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from jspec import processors, sampling
from jspec.cache import Cache
from jspec.models import recurrent
from jspec.strategies.autoregressive import AutoregressiveState, emit_sampled
from jspec.strategies.base import (
    DecodeOutput,
    FinishReason,
    OutputBuffer,
    Prompts,
    mark_cache_full,
    prefill,
    register_strategy,
    static_field,
)
from jspec.validation import ArgumentError, check_choice, check_float, check_int


def check_recurrent_model(model: Any, strategy: str) -> None:
    if not recurrent.is_recurrent(model):
        raise ArgumentError(
            f"model: strategy {strategy!r} needs a recurrent-depth model (jspec.models.recurrent.RecurrentModel, e.g. "
            f"jspec.load('demo-code-recurrent') or a Huginn-0125 directory), got {type(model).__name__}")


def resolved_recurrences(model: Any, num_recurrences: Any) -> Any:
    """r: the strategy's, else the model's config.mean_recurrence."""
    return model.config.mean_recurrence if num_recurrences is None else num_recurrences


def exact_cache_recurrences(num_recurrences: Any, cache_recurrences: int | None, mean_recurrence: int) -> int:
    """The recurrence copies of an exact cache: as asked, else the power-of-two bucket of r (so nearby r share one
    compiled program), else of the model's mean recurrence."""
    if cache_recurrences is not None:
        return int(cache_recurrences)
    try:
        r = mean_recurrence if num_recurrences is None else max(int(num_recurrences), 1)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ArgumentError("cache_recurrences: a RecurrentDepth built directly with an exact cache needs "
                            "cache_recurrences (an int >= num_recurrences); the registered names set it") from None
    return 1 << max(r - 1, 0).bit_length()


def validate_recurrence_options(strategy: Any, model: Any, name: str) -> None:
    check_recurrent_model(model, name)
    r = resolved_recurrences(model, strategy.num_recurrences)
    check_int("num_recurrences", r, minimum=1)
    check_float("init_scale", strategy.init_scale, lambda v: v >= 0, "a float >= 0 (0: a zero initial state)")


# --- autoregressive, fixed or adaptive depth -------------------------------------------------------------


@struct.dataclass
class RecurrentState(AutoregressiveState):
    state_key: jax.Array  # draws the initial states s_0
    recurrences: jax.Array  # [B] int32: core iterations spent on each row's emitted tokens
    sequential_recurrences: jax.Array  # [] int32: core iterations run one after another (the batch's loop)


@struct.dataclass
class RecurrentDepth:
    """Autoregressive decoding of a recurrent-depth model: per token the prelude, up to `num_recurrences` core
    iterations from s_0 (`init_scale`; 0: zero, deterministic), the coda and one sampled token. `criterion`
    "none" runs exactly r; "latent" / "kl" let each row stop a token early (see the module docstring).
    cache: "exact" (every recurrence keeps its K/V: equals full recomputation) or "shared" (Huginn's compressed
    scheme: the core layers' K/V shared by all recurrences, latest write wins; see jspec.models.recurrent).
    The prompt is prefilled at r (no exit). Sampling options and generation options as `autoregressive`."""

    name: ClassVar[str] = "recurrent"
    shape_buckets: ClassVar[bool] = True
    num_recurrences: Any = None  # None: the model's mean_recurrence
    init_scale: Any = 0.0
    temperature: Any = 0.0
    top_k: Any = 0
    top_p: Any = 1.0
    min_p: Any = 0.0
    threshold: Any = 0.0
    criterion: str = static_field(default="none")
    cache: str = static_field(default="exact")
    cache_recurrences: int | None = static_field(default=None)
    generation: processors.GenerationOptions = struct.field(default_factory=processors.GenerationOptions)

    def validate(self, model: Any, prompts: Prompts) -> None:
        validate_recurrence_options(self, model, self.name)
        check_choice("criterion", self.criterion, recurrent.EXIT_CRITERIA)
        check_choice("cache", self.cache, recurrent.CACHE_KINDS)
        check_float("threshold", self.threshold, lambda v: v >= 0, "a float >= 0 (0: never exit early)")
        if self.cache == "exact":
            r = resolved_recurrences(model, self.num_recurrences)
            copies = self.exact_copies(model)
            check_int("num_recurrences", r, minimum=1, maximum=copies,
                      why=f" (the exact cache holds {copies} recurrence copies; raise cache_recurrences)")
        sampling.validate_sampling_options(prompts.num_rows, temperature=self.temperature, top_k=self.top_k,
                                           top_p=self.top_p, min_p=self.min_p)
        self.generation.validate(model.config.vocab_size, prompts.num_rows)

    def exact_copies(self, model: Any) -> int:
        return exact_cache_recurrences(self.num_recurrences, self.cache_recurrences, model.config.mean_recurrence)

    def cache_headroom(self) -> int:
        return 0

    def bound(self, model: Any, state_key: jax.Array) -> Any:
        """The model running at this strategy's r, s_0 and cache (what `prefill` and each step call)."""
        copies = self.exact_copies(model) if self.cache == "exact" else 1
        return model.with_options(num_recurrences=resolved_recurrences(model, self.num_recurrences),
                                  init_scale=self.init_scale, key=state_key, cache=self.cache, cache_recurrences=copies)

    def init(self, model: Any, prompts: Prompts, key: jax.Array) -> RecurrentState:
        state_key = jax.random.fold_in(key, STATE_KEY)
        model = self.bound(model, state_key)
        cache = model.new_cache(prompts.batch_size, prompts.cache_size)
        logits, cache = prefill(model, prompts, cache)
        params = sampling.SamplingParams.broadcast(prompts.batch_size, self.temperature, self.top_k, self.top_p, self.min_p)
        processing = processors.Processing.create(self.generation, prompts, model.config.vocab_size)
        output = OutputBuffer.create(prompts.batch_size, prompts.max_new_tokens, prompts.limits, self.generation.logprobs)
        running = jnp.ones((prompts.batch_size,), bool)
        first, output, processing = emit_sampled(jax.random.fold_in(key, 0), logits, running, output, processing, params,
                                                 prompts.stop_tokens, self.generation.logprobs)
        r = jnp.asarray(model.num_recurrences, jnp.int32)
        return RecurrentState(
            cache=cache, pending=first, output=mark_cache_full(output, cache.lengths, cache.capacity), sampling=params,
            processing=processing, stop_tokens=prompts.stop_tokens, key=key, state_key=state_key, step=jnp.int32(1),
            model_calls=jnp.int32(1), recurrences=jnp.where(output.lengths > 0, r, 0).astype(jnp.int32),
            sequential_recurrences=r)

    def step(self, model: Any, state: RecurrentState) -> RecurrentState:
        model = self.bound(model, state.state_key)
        cache = state.cache
        running = ~state.output.finished
        logits, cache, count = model.run(state.pending[:, None], cache.lengths[:, None], cache, running=running,
                                         criterion=self.criterion, threshold=self.threshold)
        cache = cache.with_lengths(cache.lengths + running)
        token, output, processing = emit_sampled(
            jax.random.fold_in(state.key, state.step), logits[:, 0], running, state.output, state.processing,
            state.sampling, state.stop_tokens, self.generation.logprobs)
        emitted = output.lengths > state.output.lengths
        return state.replace(
            cache=cache, pending=jnp.where(running, token, state.pending),
            output=mark_cache_full(output, cache.lengths, cache.capacity), processing=processing, step=state.step + 1,
            model_calls=state.model_calls + 1, recurrences=state.recurrences + jnp.where(emitted, count, 0),
            sequential_recurrences=state.sequential_recurrences + jnp.max(jnp.where(running, count, 0)))

    def done(self, state: RecurrentState) -> jax.Array:
        return state.output.finished

    def output(self, state: RecurrentState) -> DecodeOutput:
        tokens = jnp.maximum(state.output.lengths, 1)
        return state.output.decode_output({
            "model_calls": state.model_calls, "steps": state.step, "tokens_generated": state.output.lengths,
            "recurrences_per_token": state.recurrences / tokens,
            "sequential_recurrences": state.sequential_recurrences})


def static_cache_recurrences(cache: str, num_recurrences: Any, cache_recurrences: int | None) -> int | None:
    """An exact cache's recurrence copies, fixed when the strategy is built (a static shape): as asked, else the
    power-of-two bucket of an int num_recurrences; None leaves it to the model (its mean_recurrence) or to validation."""
    if cache != "exact" or cache_recurrences is not None or not check_plain_int(num_recurrences):
        return cache_recurrences
    return exact_cache_recurrences(num_recurrences, None, 1)


def check_plain_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def recurrent_depth(
    *, num_recurrences: Any = None, init_scale: Any = 0.0, temperature: Any = 0.0, top_k: Any = 0, top_p: Any = 1.0,
    min_p: Any = 0.0, cache: str = "exact", cache_recurrences: int | None = None,
) -> RecurrentDepth:
    """`recurrent`: r = num_recurrences (default the model's mean_recurrence) iterations per token."""
    return RecurrentDepth(num_recurrences=num_recurrences, init_scale=init_scale, temperature=temperature, top_k=top_k,
                          top_p=top_p, min_p=min_p, cache=cache,
                          cache_recurrences=static_cache_recurrences(cache, num_recurrences, cache_recurrences))


def recurrent_adaptive(
    *, num_recurrences: Any = None, threshold: Any = 0.03, criterion: str = "latent", init_scale: Any = 0.0,
    temperature: Any = 0.0, top_k: Any = 0, top_p: Any = 1.0, min_p: Any = 0.0, cache: str = "exact",
    cache_recurrences: int | None = None,
) -> RecurrentDepth:
    """`recurrent_adaptive`: per row and token, stop iterating once criterion "latent" (||s_i - s_i-1|| / ||s_i||,
    Huginn's default 0.03) or "kl" (KL between successive readouts, e.g. 1e-3) falls below `threshold`; at most
    num_recurrences iterations. An exited row's K/V at later recurrences are copies of its last (exact cache)."""
    if criterion == "none":
        raise ArgumentError("criterion: expected 'latent' or 'kl' for recurrent_adaptive (use strategy 'recurrent' for "
                            "a fixed depth)")
    return RecurrentDepth(num_recurrences=num_recurrences, threshold=threshold, criterion=criterion,
                          init_scale=init_scale, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                          cache=cache, cache_recurrences=static_cache_recurrences(cache, num_recurrences, cache_recurrences))


# --- the diffusion-forcing sampler ----------------------------------------------------------------------------

FREEZE_RULES = ("input", "prediction")
# fold_in data of the keys that draw initial states (sampling keys fold in the step number, which stays below these)
STATE_KEY = 2**31 - 1
NOISE_KEY = 2**31 - 2


@struct.dataclass
class DiffusionForcingState:
    cache: Cache  # shared-slot cache; lengths = c, the first window position (the last frozen token's)
    sequence: jax.Array  # [B, N] int32: prompt, frozen tokens, then the window's guesses
    frozen: jax.Array  # [B] int32: F, frozen tokens (prompt included); c = F - 1
    width: jax.Array  # [B] int32: live window positions W (window j is position c + j)
    latents: jax.Array  # [B, Wmax, D]
    counts: jax.Array  # [B, Wmax] int32: recurrences each window position has received
    embeds: jax.Array  # [B, Wmax, D]: the window's (EMA) prelude outputs of the last step
    embed_source: jax.Array  # [B, Wmax] int32: 0 none, 1 `embeds`, 2 the new embedding itself (after the prefill)
    output: OutputBuffer
    sampling: sampling.SamplingParams
    stop_tokens: jax.Array
    key: jax.Array
    step: jax.Array  # [] int32
    row_steps: jax.Array  # [B] int32: steps each row ran
    recurrences: jax.Array  # [B] int32: sequential core iterations of each row (prefill r + inner per step)
    position_recurrences: jax.Array  # [B] int32: core iterations summed over the positions a row froze
    frozen_sum: jax.Array  # [B] int32: positions frozen after the prefill


@struct.dataclass
class DiffusionForcing:
    """Diffusion-forcing sampling (Geiping, Yang, Su 2025; the reference `generate_diffusion_style`), batched with a
    front per row. After a prefill of the prompt at `prefill_recurrences` (whose last logit gives the first token),
    each step:
      1. runs the prelude on the window's tokens (positions c .. c+W-1, causal over the cached prefix);
      2. mixes each position's prelude output with the last step's: e = (1 - ema) e_new + ema e_old (positions
         without one get (1 - ema) e_new, as the reference);
      3. mixes each latent with a fresh initial state: s = (1 - b) s + b s_0, b = state_noise_mixing / (1 + n_j);
      4. runs `inner_recurrence` core iterations on the whole window in parallel (shared-slot cache, latest wins);
      5. reads out every window position and samples a token from each (position j predicts j + 1);
      6. freezes by latent difference: with J the last window position whose ||s_j - s_j^prev|| / ||s_j|| is below
         `exit_threshold`, freeze="input" (the reference) freezes every token up to position c + J (a token
         freezes when the latent at its own position has converged), freeze="prediction" up to c + J + 1 (a
         converged latent's prediction freezes too); the window then starts at the last frozen position and the
         K/V of every later position are dropped (recomputed next step);
      7. appends `headway` fresh positions (the last sampled token, then headway - 1 random tokens) up to
         `max_wavefront` positions.
    A row finishes on a frozen stop token, at its token limit, a full cache, or after `max_steps` steps (LENGTH).
    Deviations from the reference: the window cap applies after the freeze (the reference truncates first, so a
    full window admits its new position a step later); a stop token ends a row whenever it freezes (the reference
    ignores it in the first 32 steps); `init_scale` defaults to 0 (zero initial and mixing states).
    Guarantee (tests/test_recurrent.py): freeze="prediction", max_wavefront=1, inner_recurrence=R,
    prefill_recurrences=R, exit_threshold > 1, ema_embeds=0, init_scale=0 admits one position per step and freezes
    it after R recurrences: greedy, it equals `recurrent` with R recurrences and the shared cache token for token."""

    name: ClassVar[str] = "diffusion_forcing"
    inner_recurrence: Any = 4
    prefill_recurrences: Any = None  # None: the model's mean_recurrence
    exit_threshold: Any = 0.03
    ema_embeds: Any = 0.1
    state_noise_mixing: Any = 0.5
    init_scale: Any = 0.0
    max_steps: Any = 4096
    temperature: Any = 0.0
    top_k: Any = 0
    top_p: Any = 1.0
    min_p: Any = 0.0
    max_wavefront: int = static_field(default=128)
    headway: int = static_field(default=1)
    freeze: str = static_field(default="input")

    def validate(self, model: Any, prompts: Prompts) -> None:
        check_recurrent_model(model, self.name)
        check_int("max_wavefront", self.max_wavefront, minimum=2 if self.freeze == "input" else 1,
                  why=" (freeze='input' keeps the last frozen position in the window, so it needs room for one more)"
                  if self.freeze == "input" and self.max_wavefront == 1 else "")
        check_int("headway", self.headway, minimum=1)
        check_choice("freeze", self.freeze, FREEZE_RULES)
        check_int("inner_recurrence", self.inner_recurrence, minimum=1)
        check_int("prefill_recurrences", resolved_recurrences(model, self.prefill_recurrences), minimum=1)
        check_int("max_steps", self.max_steps, minimum=1)
        check_float("exit_threshold", self.exit_threshold, lambda v: v >= 0, "a float >= 0")
        check_float("ema_embeds", self.ema_embeds, lambda v: 0 <= v <= 1, "a float in [0, 1]")
        check_float("state_noise_mixing", self.state_noise_mixing, lambda v: 0 <= v <= 1, "a float in [0, 1]")
        check_float("init_scale", self.init_scale, lambda v: v >= 0, "a float >= 0 (0: a zero initial state)")
        sampling.validate_sampling_options(prompts.num_rows, temperature=self.temperature, top_k=self.top_k,
                                           top_p=self.top_p, min_p=self.min_p)

    def cache_headroom(self) -> int:
        return self.max_wavefront + self.headway + 1

    def init(self, model: Any, prompts: Prompts, key: jax.Array) -> DiffusionForcingState:
        config = model.config
        batch, width = prompts.tokens.shape
        r = resolved_recurrences(model, self.prefill_recurrences)
        state_key = jax.random.fold_in(key, STATE_KEY)
        bound = model.with_options(num_recurrences=r, init_scale=self.init_scale, key=state_key, cache="shared")
        cache = bound.new_cache(batch, prompts.cache_size)
        logits, cache = prefill(bound, prompts, cache)
        params = sampling.SamplingParams.broadcast(batch, self.temperature, self.top_k, self.top_p, self.min_p)
        first = sampling.sample(jax.random.fold_in(key, 0), logits, params)
        output = OutputBuffer.create(batch, prompts.max_new_tokens, prompts.limits)
        output = output.append(first[:, None], jnp.ones((batch,), jnp.int32), prompts.stop_tokens)
        length = width + prompts.max_new_tokens + self.max_wavefront + self.headway + 2
        sequence = jnp.zeros((batch, length), jnp.int32).at[:, :width].set(prompts.tokens)
        rows = jnp.arange(batch)
        sequence = sequence.at[rows, prompts.lengths].set(first)
        wmax, hidden = self.max_wavefront, config.hidden_size
        positions = prompts.lengths[:, None] + jnp.arange(wmax)[None, :]
        latents = recurrent.initial_state(config, self.noise_key(key, 0), positions, self.init_scale, model.params["embed"].dtype)
        r32 = jnp.asarray(r, jnp.int32)
        return DiffusionForcingState(
            cache=cache, sequence=sequence, frozen=prompts.lengths + 1, width=jnp.ones((batch,), jnp.int32),
            latents=latents, counts=jnp.zeros((batch, wmax), jnp.int32),
            embeds=jnp.zeros((batch, wmax, hidden), latents.dtype),
            embed_source=jnp.zeros((batch, wmax), jnp.int32).at[:, 0].set(2),
            output=mark_cache_full(output, cache.lengths + wmax, cache.capacity), sampling=params,
            stop_tokens=prompts.stop_tokens, key=key, step=jnp.int32(0), row_steps=jnp.zeros((batch,), jnp.int32),
            recurrences=jnp.full((batch,), r32), position_recurrences=jnp.zeros((batch,), jnp.int32),
            frozen_sum=jnp.zeros((batch,), jnp.int32))

    @staticmethod
    def noise_key(key: jax.Array, step: Any) -> jax.Array:
        """The key of step `step`'s fresh states (0: the prefill's window)."""
        return jax.random.fold_in(jax.random.fold_in(key, NOISE_KEY), step)

    def step(self, model: Any, state: DiffusionForcingState) -> DiffusionForcingState:
        config, params = model.config, model.params
        batch, wmax = state.counts.shape
        running = ~state.output.finished
        start = state.cache.lengths  # c
        offsets = jnp.arange(wmax, dtype=jnp.int32)[None, :]
        positions = start[:, None] + offsets  # [B, Wmax]
        live = (offsets < state.width[:, None]) & running[:, None]
        tokens = jnp.take_along_axis(state.sequence, jnp.clip(positions, 0, state.sequence.shape[1] - 1), axis=1)
        slots = jnp.where(live, positions, state.cache.capacity)
        context = recurrent.attention_context(config, positions, state.cache, slots, None)
        fresh_new, cache = recurrent.embed(params, config, tokens, state.cache, context)

        # 2. embedding EMA, aligned by position (the window's old embeddings were shifted with it)
        prior = jnp.where((state.embed_source == 2)[..., None], fresh_new, state.embeds)
        ema = jnp.asarray(self.ema_embeds, fresh_new.dtype)
        embedded = (1 - ema) * fresh_new + jnp.where((state.embed_source > 0)[..., None], ema * prior, 0)

        # 3. state noise mixing, dampened by the recurrences each position has had
        noise = recurrent.initial_state(config, self.noise_key(state.key, 2 * state.step + 1), positions,
                                        self.init_scale, state.latents.dtype)
        beta = (jnp.asarray(self.state_noise_mixing, jnp.float32) / (1.0 + state.counts))[..., None]
        latents = ((1 - beta) * state.latents + beta * noise).astype(state.latents.dtype)

        # 4. inner recurrences over the whole window
        def inner(index, carry):
            latents, cache = carry
            return recurrent.core_step(params, config, latents, embedded, index, cache, context)

        latents, cache = jax.lax.fori_loop(0, jnp.asarray(self.inner_recurrence, jnp.int32), inner, (latents, cache))
        inner_count = jnp.asarray(self.inner_recurrence, jnp.int32)
        counts = state.counts + jnp.where(live, inner_count, 0)

        # 5. read out and sample every window position (position c + j predicts c + j + 1)
        logits, cache = recurrent.readout(params, config, latents, cache, context)
        step_key = jax.random.fold_in(state.key, 2 * state.step + 2)
        sample_key, extra_key = jax.random.split(step_key)
        sampled = sampling.sample(sample_key, logits.reshape(batch * wmax, -1), state.sampling.per_position(wmax))
        sampled = sampled.reshape(batch, wmax)

        # the proposed sequence: window guesses after c, then headway - 1 random tokens
        proposal_slots = jnp.where(live, positions + 1, state.sequence.shape[1])
        rows = jnp.arange(batch)[:, None]
        sequence = state.sequence.at[rows, proposal_slots].set(sampled, mode="drop")
        if self.headway > 1:
            extra = jax.random.randint(extra_key, (batch, self.headway - 1), 0, config.vocab_size, jnp.int32)
            extra_slots = (start + state.width + 1)[:, None] + jnp.arange(self.headway - 1)[None, :]
            extra_slots = jnp.where(running[:, None], extra_slots, sequence.shape[1])
            sequence = sequence.at[rows, extra_slots].set(extra, mode="drop")

        # 6. freeze by latent difference
        change = jnp.linalg.norm((latents - state.latents).astype(jnp.float32), axis=-1) / jnp.maximum(
            jnp.linalg.norm(latents.astype(jnp.float32), axis=-1), 1e-30)
        converged = live & (change < self.exit_threshold)
        last = jnp.max(jnp.where(converged, offsets, -1), axis=1)  # J, -1: none
        lead = 1 if self.freeze == "prediction" else 0
        proposed = jnp.where(last >= 0, start + last + 1 + lead, state.frozen)
        frozen = jnp.where(running, jnp.maximum(state.frozen, proposed), state.frozen)
        newly = frozen - state.frozen
        new_tokens = jnp.take_along_axis(
            sequence, jnp.clip(state.frozen[:, None] + jnp.arange(wmax + 1)[None, :], 0, sequence.shape[1] - 1), axis=1)
        output = state.output.append(new_tokens, newly, state.stop_tokens)
        new_start = frozen - 1
        shift = new_start - start  # window positions that leave
        kept = state.width - shift

        # 7. shift the window and append fresh positions
        moved = offsets + shift[:, None]  # new window index j holds old index j + shift
        take = lambda x: jnp.take_along_axis(x, jnp.clip(moved, 0, wmax - 1).reshape(  # noqa: E731
            batch, wmax, *([1] * (x.ndim - 2))), axis=1)
        is_kept = offsets < kept[:, None]
        new_width = jnp.minimum(kept + self.headway, wmax)
        new_positions = new_start[:, None] + offsets
        fresh = recurrent.initial_state(config, self.noise_key(state.key, 2 * state.step + 2), new_positions,
                                        self.init_scale, latents.dtype)
        new_latents = jnp.where(is_kept[..., None], take(latents), fresh)
        new_counts = jnp.where(is_kept, take(counts), 0)
        new_embeds = take(embedded)
        new_source = jnp.where(is_kept, 1, 0)

        keep_row = running[:, None]
        froze_positions = jnp.sum(jnp.where((offsets < shift[:, None]) & live, counts, 0), axis=1)
        cache = cache.with_lengths(jnp.where(running, new_start, start))
        output = mark_cache_full(output, cache.lengths + wmax, cache.capacity)
        output = output.finish(running & (state.row_steps + 1 >= self.max_steps), FinishReason.LENGTH)
        return state.replace(
            cache=cache, sequence=jnp.where(keep_row, sequence, state.sequence), frozen=frozen,
            width=jnp.where(running, new_width, state.width),
            latents=jnp.where(keep_row[..., None], new_latents, state.latents),
            counts=jnp.where(keep_row, new_counts, state.counts),
            embeds=jnp.where(keep_row[..., None], new_embeds, state.embeds),
            embed_source=jnp.where(keep_row, new_source, state.embed_source), output=output, step=state.step + 1,
            row_steps=state.row_steps + running, recurrences=state.recurrences + jnp.where(running, inner_count, 0),
            position_recurrences=state.position_recurrences + froze_positions,
            frozen_sum=state.frozen_sum + jnp.where(running, shift, 0))

    def done(self, state: DiffusionForcingState) -> jax.Array:
        return state.output.finished

    def output(self, state: DiffusionForcingState) -> DecodeOutput:
        tokens = jnp.maximum(state.output.lengths, 1)
        return state.output.decode_output({
            "model_calls": state.step + 1, "steps": state.step, "tokens_generated": state.output.lengths,
            "active_steps": state.row_steps, "recurrences_per_token": state.recurrences / tokens,
            "sequential_recurrences": jnp.max(state.recurrences),
            "recurrences_per_frozen_position": state.position_recurrences / jnp.maximum(state.frozen_sum, 1)})


register_strategy("recurrent", recurrent_depth, generation_options=True)
register_strategy("recurrent_adaptive", recurrent_adaptive, generation_options=True)
register_strategy("diffusion_forcing", DiffusionForcing)
