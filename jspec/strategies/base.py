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
    """Emitted tokens per row; the one place that applies stop tokens and the length limit."""

    tokens: jax.Array  # [B, N] int32, -1 past each row's length
    lengths: jax.Array  # [B] int32
    finish_reason: jax.Array  # [B] int32 FinishReason
    limits: jax.Array  # [B] int32 <= N: tokens each row may emit (LENGTH when reached)
    stop_strings: Any = None  # jspec.stop_strings.StopStrings, or None
    tail: jax.Array | None = None  # [B, W] int32 with stop strings: each row's last W tokens (prompt included), -1: none

    @classmethod
    def create(cls, batch_size: int, max_new_tokens: int, limits: jax.Array | None = None) -> "OutputBuffer":
        full = jnp.full((batch_size,), max_new_tokens, jnp.int32)
        return cls(
            tokens=jnp.full((batch_size, max_new_tokens), -1, jnp.int32),
            lengths=jnp.zeros((batch_size,), jnp.int32),
            finish_reason=jnp.zeros((batch_size,), jnp.int32),
            limits=full if limits is None else jnp.minimum(jnp.asarray(limits, jnp.int32), full),
        )

    @property
    def finished(self) -> jax.Array:  # [B] bool
        return self.finish_reason != FinishReason.RUNNING

    def append(
        self,
        new_tokens: jax.Array,  # [B, T] int32
        num_new: jax.Array,  # [B] int32: how many leading tokens of new_tokens each row emits
        stop_tokens: jax.Array,  # [B, K] int32, -1 padded
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
        lengths = self.lengths + jnp.sum(kept, axis=1, dtype=jnp.int32)
        stopped = jnp.any(kept & is_stop, axis=1)
        stop_reason = jnp.where(jnp.any(kept & is_stop_token, axis=1), FinishReason.EOS, FinishReason.STOP_STRING)
        reason = jnp.where(stopped, stop_reason, jnp.where(lengths >= self.limits, FinishReason.LENGTH, FinishReason.RUNNING))
        reason = jnp.where(self.finished, self.finish_reason, reason)
        buffer = self.replace(tokens=tokens, lengths=lengths, finish_reason=reason.astype(jnp.int32))
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
        return checked.replace(finish_reason=jnp.where(by_string, checked.finish_reason, self.finish_reason))

    def finish(self, rows: jax.Array, reason: FinishReason) -> "OutputBuffer":
        """Mark running rows [B] bool as finished with `reason`."""
        mark = rows & ~self.finished
        return self.replace(finish_reason=jnp.where(mark, int(reason), self.finish_reason).astype(jnp.int32))


# Stats with one entry per row (the others are per call: counts, histograms, per-depth rates).
ROW_STATS = frozenset({"tokens_generated", "active_steps", "emitted_drafts", "emitted_corrections",
                       "mean_accepted_length", "block_forwards", "sequence_scores"})


@dataclasses.dataclass
class DecodeOutput:
    """What a decode returns. Inside jit the fields are device arrays; `jspec.decode` returns numpy.

    tokens: [B, max_new_tokens] int32, -1 past each row's length; lengths: [B]; finish_reason: [B] of
    FinishReason; stats: `model_calls` (target forward calls), `steps` (loop iterations),
    `tokens_generated` [B], plus strategy-specific entries; text: decoded rows when the model has a
    tokenizer (stop tokens excluded).
    """

    tokens: Any
    lengths: Any
    finish_reason: Any
    stats: dict[str, Any]
    text: list[str] | None = None

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
        return DecodeOutput(tokens=np.asarray(self.tokens)[rows][:, columns], lengths=pick(self.lengths),
                            finish_reason=pick(self.finish_reason), stats=stats, text=text)


jax.tree_util.register_dataclass(
    DecodeOutput, data_fields=["tokens", "lengths", "finish_reason", "stats"], meta_fields=["text"]
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


def register_strategy(name: str, factory: Callable[..., Strategy]) -> None:
    """Make `jspec.decode(..., strategy=name, **options)` build `factory(**options)`."""
    _REGISTRY[name] = factory


def strategy_names() -> list[str]:
    return sorted(_REGISTRY)


def resolve_strategy(strategy: Any, options: dict[str, Any]) -> Strategy:
    """A strategy object from a registered name and its options, or the object itself (then no options)."""
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
        return factory(**options)
    if options:
        raise ArgumentError(
            f"strategy: options {sorted(options)} were given with a strategy object; set them on the object instead"
        )
    if not all(hasattr(strategy, attr) for attr in ("init", "step", "done", "output")):
        raise ArgumentError(f"strategy: expected a registered name or a strategy object, got {strategy!r}")
    return strategy


def _option_names(factory: Callable[..., Any]) -> list[str]:
    if dataclasses.is_dataclass(factory):
        return [f.name for f in dataclasses.fields(factory) if f.init]
    import inspect

    return [p.name for p in inspect.signature(factory).parameters.values() if p.kind == p.KEYWORD_ONLY or p.default is not p.empty]


def mark_cache_full(output: OutputBuffer, cache_lengths: jax.Array, capacity: int, slots_needed: int = 1) -> OutputBuffer:
    """Finish running rows whose next step needs more cache slots than remain."""
    return output.finish(cache_lengths + slots_needed > capacity, FinishReason.CACHE_FULL)


def row_positions(lengths: jax.Array, width: int) -> jax.Array:
    """[B, width] int32: positions lengths[b] + t."""
    return lengths[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :]


def prefill(model: Any, prompts: Prompts, cache: Any) -> tuple[jax.Array, Any]:
    """Write every prompt's keys/values into an empty cache and commit them.

    Returns the logits [B, V] at each row's last prompt token and the cache with lengths = prompt lengths.
    Padding tokens are written to an out-of-range slot, so they never enter the cache.
    """
    batch, width = prompts.tokens.shape
    positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32)[None, :], (batch, width))
    slots = jnp.where(positions < prompts.lengths[:, None], positions, cache.capacity)
    logits, cache = model.forward(
        prompts.tokens, positions, cache, write_slots=slots, output_indices=(prompts.lengths - 1)[:, None]
    )
    return logits[:, 0], cache.with_lengths(prompts.lengths)
