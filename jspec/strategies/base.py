"""The strategy contract, and the pieces every strategy shares.

A strategy is a frozen `flax.struct` dataclass. Its fields marked `static_field()` are part of the pytree
structure (changing them recompiles); every other field is a traced leaf (temperature, thresholds: changing
them reuses the compiled code). It provides pure functions:

    init(model, prompts, key) -> State        prefill and first step
    step(model, state) -> State               one iteration of the algorithm
    done(state) -> bool[B]                    rows that have finished
    output(state) -> DecodeOutput             tokens, lengths, finish reasons, stats (device arrays)

`jspec.decode` runs `lax.while_loop(not all(done), step, init(...))` under one `jit`.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable, ClassVar, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jspec.processors import GENERATION_OPTIONS, GenerationOptions, TokenScores
from jspec.validation import ArgumentError

static_field = lambda **kwargs: struct.field(pytree_node=False, **kwargs)  # noqa: E731


class FinishReason(enum.IntEnum):
    RUNNING = 0
    EOS = 1  # a stop token was emitted (it is included in the output)
    LENGTH = 2  # max_new_tokens were emitted
    CACHE_FULL = 3  # the next step would not fit in the KV cache
    STOP_STRING = 4  # the row's text ends with a stop string (`stop=`; the tokens that spell it are kept)


@struct.dataclass
class Prompts:
    """A batch of requests: right-padded prompts with per-row lengths, stop tokens and limits.

    Shapes may be bucketed (see `jspec.decode`): `max_new_tokens` is then the output capacity (static) and
    `limits` each row's own limit (traced), and rows with `active` False are padding rows of a batch bucket,
    finished before the first step.
    """

    tokens: jax.Array  # [B, T] int32, right-padded
    lengths: jax.Array  # [B] int32, >= 1
    stop_tokens: jax.Array  # [B, K] int32, padded with -1 (K may be 0)
    max_new_tokens: int = static_field()
    cache_size: int = static_field()
    limits: jax.Array | None = None  # [B] int32, new tokens each row may emit (None: max_new_tokens)
    active: jax.Array | None = None  # [B] bool, real rows (None: all)
    stop_strings: Any = None  # jspec.stop_strings.StopStrings (`stop=`), or None
    samples_per_prompt: int = static_field(default=1)  # num_samples: each prompt's rows are this many consecutive rows

    @property
    def num_rows(self) -> int:
        """The caller's rows (the first ones; the rest are padding rows of a batch bucket). Concrete values only."""
        return self.batch_size if self.active is None else int(np.sum(np.asarray(self.active)))

    @property
    def row_limits(self) -> jax.Array:  # [B] int32
        if self.limits is None:
            return jnp.full((self.batch_size,), self.max_new_tokens, jnp.int32)
        return self.limits

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]


@struct.dataclass
class OutputBuffer:
    """Emitted tokens per row, and their scores when asked for; the one place that applies stop tokens and the
    length limit (scores are kept exactly where tokens are)."""

    tokens: jax.Array  # [B, N] int32, -1 past each row's length
    lengths: jax.Array  # [B] int32
    finish_reason: jax.Array  # [B] int32 FinishReason
    limits: jax.Array  # [B] int32 <= N: tokens each row may emit (LENGTH when reached)
    scores: TokenScores | None = None  # [B, N, ...]: NaN / -1 past each row's length
    stop_strings: Any = None  # jspec.stop_strings.StopStrings, or None
    tail: jax.Array | None = None  # [B, W] int32 with stop strings: each row's last W tokens (prompt included), -1: none

    @classmethod
    def create(
        cls, batch_size: int, max_new_tokens: int, limits: jax.Array | None = None, logprobs: int | None = None
    ) -> "OutputBuffer":
        """An empty buffer; logprobs: k to keep each token's scores with its k most likely tokens (None: none)."""
        full = jnp.full((batch_size,), max_new_tokens, jnp.int32)
        return cls(
            tokens=jnp.full((batch_size, max_new_tokens), -1, jnp.int32),
            lengths=jnp.zeros((batch_size,), jnp.int32),
            finish_reason=jnp.zeros((batch_size,), jnp.int32),
            limits=full if limits is None else jnp.minimum(jnp.asarray(limits, jnp.int32), full),
            scores=None if logprobs is None else TokenScores.empty(batch_size, max_new_tokens, logprobs),
        )

    @property
    def finished(self) -> jax.Array:  # [B] bool
        return self.finish_reason != FinishReason.RUNNING

    def append(
        self,
        new_tokens: jax.Array,  # [B, T] int32
        num_new: jax.Array,  # [B] int32: how many leading tokens of new_tokens each row emits
        stop_tokens: jax.Array,  # [B, K] int32, -1 padded
        scores: TokenScores | None = None,  # [B, T, ...]: the new tokens' scores (when the buffer keeps scores)
    ) -> "OutputBuffer":
        """Emit up to num_new[b] tokens per running row, stopping after the first stop token (kept) and at
        the row's limit. Finished rows are unchanged."""
        capacity = self.tokens.shape[1]
        offsets = jnp.arange(new_tokens.shape[1], dtype=jnp.int32)[None, :]
        offered = (offsets < num_new[:, None]) & ~self.finished[:, None]
        is_stop_token = offered & jnp.any(new_tokens[:, :, None] == stop_tokens[:, None, :], axis=-1)
        is_stop = is_stop_token
        if self.stop_strings is not None:
            history = jnp.concatenate([self.tail, new_tokens.astype(jnp.int32)], axis=1)  # [B, W + T]
            window = self.stop_strings.window
            ends = jnp.arange(new_tokens.shape[1])[:, None] + 1 + jnp.arange(window)[None, :]  # [T, W]
            tails = history[:, ends]  # [B, T, W]: the last W tokens once new token t is emitted
            ends_string = self.stop_strings.matches(tails.reshape(-1, window)).reshape(new_tokens.shape)
            is_stop = is_stop | (offered & ends_string)
        first_stop = jnp.where(jnp.any(is_stop, axis=1), jnp.argmax(is_stop, axis=1), new_tokens.shape[1])
        kept = offered & (offsets <= first_stop[:, None]) & (offsets < (self.limits - self.lengths)[:, None])
        slots = jnp.where(kept, self.lengths[:, None] + offsets, capacity)
        rows = jnp.arange(new_tokens.shape[0])[:, None]
        tokens = self.tokens.at[rows, slots].set(new_tokens, mode="drop")
        kept_scores = self.scores
        if self.scores is not None:
            kept_scores = jax.tree.map(lambda old, new: old.at[rows, slots].set(new, mode="drop"), self.scores, scores)
        lengths = self.lengths + jnp.sum(kept, axis=1, dtype=jnp.int32)
        stopped = jnp.any(kept & is_stop, axis=1)
        stop_reason = jnp.where(jnp.any(kept & is_stop_token, axis=1), FinishReason.EOS, FinishReason.STOP_STRING)
        reason = jnp.where(stopped, stop_reason, jnp.where(lengths >= self.limits, FinishReason.LENGTH, FinishReason.RUNNING))
        reason = jnp.where(self.finished, self.finish_reason, reason)
        buffer = self.replace(tokens=tokens, lengths=lengths, finish_reason=reason.astype(jnp.int32), scores=kept_scores)
        if self.stop_strings is not None:  # the last W tokens after the kept ones
            count = jnp.sum(kept, axis=1, dtype=jnp.int32)
            index = count[:, None] + jnp.arange(self.stop_strings.window, dtype=jnp.int32)[None, :]
            buffer = buffer.replace(tail=jnp.take_along_axis(history, index, axis=1))
        return buffer

    def watching(self, stop_strings: Any, tail: jax.Array, stop_tokens: jax.Array) -> "OutputBuffer":
        """This buffer ending rows on stop strings from now on (`tail` [B, W]: each prompt's last W tokens). The
        tokens already emitted are checked again, so a row whose first tokens (emitted by `init`) complete a stop
        string ends there; other finish reasons already set are kept."""
        fresh = OutputBuffer.create(self.tokens.shape[0], self.tokens.shape[1], self.limits)
        checked = fresh.replace(stop_strings=stop_strings, tail=tail).append(self.tokens, self.lengths, stop_tokens)
        by_string = checked.finish_reason == FinishReason.STOP_STRING
        scores = self.scores
        if scores is not None:  # scores of tokens cut by a stop string go back to padding (NaN / -1)
            empty = TokenScores.empty(*self.tokens.shape, scores.top_tokens.shape[-1])
            kept = jnp.arange(self.tokens.shape[1])[None, :] < checked.lengths[:, None]  # [B, N]
            scores = jax.tree.map(lambda x, e: jnp.where(kept.reshape(kept.shape + (1,) * (x.ndim - 2)), x, e),
                                  scores, empty)
        return checked.replace(finish_reason=jnp.where(by_string, checked.finish_reason, self.finish_reason),
                               scores=scores)

    def finish(self, rows: jax.Array, reason: FinishReason) -> "OutputBuffer":
        """Mark running rows [B] bool as finished with `reason`."""
        mark = rows & ~self.finished
        return self.replace(finish_reason=jnp.where(mark, int(reason), self.finish_reason).astype(jnp.int32))

    def decode_output(self, stats: dict[str, Any]) -> "DecodeOutput":
        """The DecodeOutput of these tokens (and scores) with `stats`."""
        scores = {} if self.scores is None else dict(
            logprobs=self.scores.logprobs, raw_logprobs=self.scores.raw_logprobs,
            top_tokens=self.scores.top_tokens, top_logprobs=self.scores.top_logprobs)
        return DecodeOutput(tokens=self.tokens, lengths=self.lengths, finish_reason=self.finish_reason, stats=stats,
                            **scores)


# Stats with one entry per row (the others are per call: counts, histograms, per-depth rates).
ROW_STATS = frozenset({"tokens_generated", "active_steps", "emitted_drafts", "emitted_corrections",
                       "mean_accepted_length", "block_forwards", "sequence_scores", "recurrences_per_token",
                       "recurrences_per_frozen_position"})


@dataclasses.dataclass
class DecodeOutput:
    """What a decode returns. Inside jit the fields are device arrays; `jspec.decode` returns numpy.

    tokens: [B, max_new_tokens] int32, -1 past each row's length; lengths: [B]; finish_reason: [B] of
    FinishReason; stats: `model_calls` (target forward calls), `steps` (loop iterations),
    `tokens_generated` [B], plus strategy-specific entries; text: decoded rows when the model has a
    tokenizer (stop tokens excluded).
    With the option logprobs=k (else None): logprobs [B, max_new_tokens] float32, each token's log-probability
    under the distribution it was drawn from (after processors and warpers; greedy: the processed
    log-softmax); raw_logprobs, the same under the model's raw distribution; top_tokens / top_logprobs
    [B, max_new_tokens, k], the k most likely tokens of the former, most likely first. NaN / -1 past each row's
    length.
    """

    tokens: Any
    lengths: Any
    finish_reason: Any
    stats: dict[str, Any]
    text: list[str] | None = None
    logprobs: Any = None
    raw_logprobs: Any = None
    top_tokens: Any = None
    top_logprobs: Any = None

    def sequences(self) -> list[list[int]]:
        """Each row's emitted tokens as a list, without padding."""
        return [list(map(int, row[:n])) for row, n in zip(np.asarray(self.tokens), np.asarray(self.lengths))]

    def finish_reasons(self) -> list[str]:
        return [FinishReason(int(r)).name.lower() for r in np.asarray(self.finish_reason)]

    def select(self, rows: Any, columns: Any = slice(None)) -> "DecodeOutput":
        """A host-side output of some rows (a slice or index array; per-row stats follow, per-call stats are kept)
        and token columns (lists stay lists)."""
        pick = lambda value: np.asarray(value)[rows].tolist() if isinstance(value, list) else np.asarray(value)[rows]  # noqa: E731
        stats = {name: (pick(value) if name in ROW_STATS else value) for name, value in self.stats.items()}
        text = None if self.text is None else list(np.asarray(self.text, dtype=object)[rows])
        per_token = {name: None if getattr(self, name) is None else np.asarray(getattr(self, name))[rows][:, columns]
                     for name in ("tokens",) + SCORE_FIELDS}
        return DecodeOutput(lengths=pick(self.lengths), finish_reason=pick(self.finish_reason), stats=stats, text=text,
                            **per_token)


SCORE_FIELDS = ("logprobs", "raw_logprobs", "top_tokens", "top_logprobs")
jax.tree_util.register_dataclass(
    DecodeOutput, data_fields=["tokens", "lengths", "finish_reason", "stats", *SCORE_FIELDS], meta_fields=["text"]
)


class Strategy(Protocol):
    """The contract every decoding strategy implements (see the module docstring)."""

    name: ClassVar[str]
    # Optional: `takes_cache_size: ClassVar[bool] = False` for strategies that size their cache themselves (an
    # explicit cache_size is then refused with an error saying why).

    def validate(self, model: Any, prompts: Prompts) -> None: ...  # concrete checks, before tracing

    def cache_headroom(self) -> int: ...  # cache slots a step may write beyond the emitted tokens

    def init(self, model: Any, prompts: Prompts, key: jax.Array) -> Any: ...

    def step(self, model: Any, state: Any) -> Any: ...

    def done(self, state: Any) -> jax.Array: ...

    def output(self, state: Any) -> DecodeOutput: ...


_REGISTRY: dict[str, Callable[..., Strategy]] = {}
_TAKE_GENERATION_OPTIONS: set[Any] = set()  # factories whose strategies take GENERATION_OPTIONS


def register_strategy(name: str, factory: Callable[..., Strategy], generation_options: bool = False) -> None:
    """Make `jspec.decode(..., strategy=name, **options)` build `factory(**options)`. generation_options: its
    strategies have a `generation` field (`jspec.processors.GenerationOptions`): logprobs and logit processors."""
    _REGISTRY[name] = factory
    if generation_options:
        _TAKE_GENERATION_OPTIONS.add(factory)


def strategy_names() -> list[str]:
    return sorted(_REGISTRY)


def resolve_strategy(strategy: Any, options: dict[str, Any]) -> Strategy:
    """A strategy object from a registered name and its options, or the object itself (then no options but the
    generation options, `jspec.processors.GENERATION_OPTIONS`, which set its `generation` field)."""
    generation = {name: options[name] for name in GENERATION_OPTIONS if name in options}
    options = {name: value for name, value in options.items() if name not in generation}
    if isinstance(strategy, str):
        if strategy not in _REGISTRY:
            raise ArgumentError(f"strategy: unknown strategy {strategy!r}; known strategies are {strategy_names()}")
        factory = _REGISTRY[strategy]
        allowed = _option_names(factory)
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ArgumentError(
                f"strategy {strategy!r}: unknown option(s) {unknown}; its options are {sorted(allowed) or 'none'}"
            )
        return with_generation_options(factory(**options), generation, strategy)
    if options:
        raise ArgumentError(
            f"strategy: options {sorted(options)} were given with a strategy object; set them on the object instead"
        )
    if not all(hasattr(strategy, attr) for attr in ("init", "step", "done", "output")):
        raise ArgumentError(f"strategy: expected a registered name or a strategy object, got {strategy!r}")
    return with_generation_options(strategy, generation, getattr(strategy, "name", type(strategy).__name__))


def with_generation_options(strategy: Any, options: dict[str, Any], name: str) -> Any:
    """The strategy with these generation options set; ArgumentError naming the first when it takes none."""
    if not options:
        return strategy
    if not isinstance(getattr(strategy, "generation", None), GenerationOptions):
        takers = [n for n in strategy_names() if _REGISTRY[n] in _TAKE_GENERATION_OPTIONS]
        raise ArgumentError(
            f"{next(iter(options))}: not defined for strategy {name!r}: log-probabilities and logit processors apply "
            f"to strategies that draw each token from a next-token distribution ({', '.join(takers)})"
        )
    return strategy.replace(generation=strategy.generation.updated(**options))


def _option_names(factory: Callable[..., Any]) -> list[str]:
    extra = list(GENERATION_OPTIONS) if factory in _TAKE_GENERATION_OPTIONS else []
    if dataclasses.is_dataclass(factory):
        return [f.name for f in dataclasses.fields(factory) if f.init and f.name != "generation"] + extra
    import inspect

    parameters = inspect.signature(factory).parameters.values()
    return [p.name for p in parameters if p.kind == p.KEYWORD_ONLY or p.default is not p.empty] + extra


def mark_cache_full(output: OutputBuffer, cache_lengths: jax.Array, capacity: int, slots_needed: int = 1) -> OutputBuffer:
    """Finish running rows whose next step needs more cache slots than remain."""
    return output.finish(cache_lengths + slots_needed > capacity, FinishReason.CACHE_FULL)


def tokens_left(output: OutputBuffer, cache_lengths: jax.Array, capacity: int, slots_needed: int = 1) -> jax.Array:  # [B] int32
    """Tokens each row may still emit before its length limit or a full cache ends it (`mark_cache_full`; 0 for a
    finished row). Each emitted token takes one cache slot and a step runs while cache_lengths + slots_needed <=
    capacity, so a row emitting a token per step has capacity - slots_needed - cache_lengths + 1 left; a step that
    emits several can overshoot that by up to slots_needed - 1 (a lower bound, exact for one token per step)."""
    by_cache = capacity - slots_needed - cache_lengths + 1
    return jnp.where(output.finished, 0, jnp.maximum(jnp.minimum(output.limits - output.lengths, by_cache), 0))


def row_positions(lengths: jax.Array, width: int) -> jax.Array:
    """[B, width] int32: positions lengths[b] + t."""
    return lengths[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :]


def prefill(model: Any, prompts: Prompts, cache: Any) -> tuple[jax.Array, Any]:
    """Write every prompt's keys/values into an empty cache and commit them.

    Returns the logits [B, V] at each row's last prompt token and the cache with lengths = prompt lengths.
    Padding tokens are written to an out-of-range slot, so they never enter the cache.
    """
    return prefill_tokens(model, prompts.tokens, prompts.lengths, cache)


def prefill_tokens(
    model: Any,
    tokens: jax.Array,  # [B, T] int32, right-padded
    lengths: jax.Array,  # [B] int32, >= 1
    cache: Any,
) -> tuple[jax.Array, Any]:
    """`prefill` of right-padded tokens with per-row lengths: logits [B, V] at each row's last token, the cache."""
    batch, width = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32)[None, :], (batch, width))
    slots = jnp.where(positions < lengths[:, None], positions, cache.capacity)
    logits, cache = model.forward(tokens, positions, cache, write_slots=slots, output_indices=(lengths - 1)[:, None])
    return logits[:, 0], cache.with_lengths(lengths)


def run_if(pred: jax.Array, body: Callable[[Any], Any], operand: Any) -> Any:
    """body(operand) where pred ([] bool) holds, else operand (body keeps the operand's structure).

    A `lax.cond` that keeps the operand's buffers in place: XLA:CPU copies every buffer a `lax.cond` branch updates
    in place (a KV cache: megabytes per decode step), while a while loop of zero or one trip updates its carry in
    place. Take what body updates from its argument, not from a closure (a closed-over buffer is copied)."""
    return jax.lax.while_loop(lambda carry: carry[0], lambda carry: (jnp.bool_(False), body(carry[1])), (pred, operand))[1]


def run_either(pred: jax.Array, if_true: Callable[[Any], Any], if_false: Callable[[Any], Any], operand: Any) -> Any:
    """if_true(operand) where pred ([] bool) holds, else if_false(operand): `run_if` twice, buffers kept in place."""
    return run_if(~pred, if_false, run_if(pred, if_true, operand))


def run_indexed(index: jax.Array, bodies: list[Callable[[Any], Any]], operand: Any) -> Any:
    """bodies[index](operand) for index [] int32 in [0, len(bodies)): a `lax.switch` with buffers kept in place."""
    for i, body in enumerate(bodies):
        operand = run_if(index == i, body, operand)
    return operand
