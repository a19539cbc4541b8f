"""Logit processors and per-token log-probabilities, computed inside the compiled step.

Processors, applied in transformers' order, before sampling's warpers (temperature, top-k, top-p, min-p):

    logit_bias            {token id: bias} added to the logits (one dict for every row, or one per row)
    repetition_penalty    transformers' RepetitionPenaltyLogitsProcessor: for every token in the prompt or the
                          generated tokens, a positive logit is divided by the penalty, a negative one multiplied
                          (1 is off; > 0)
    presence_penalty,     OpenAI / vLLM: over the generated tokens only (not the prompt),
    frequency_penalty     logit -= presence_penalty * (count > 0) + frequency_penalty * count (in [-2, 2]; 0 is off)
    no_repeat_ngram_size  transformers' NoRepeatNGramLogitsProcessor over prompt and generated tokens: a token
                          that would complete an n-gram already in the sequence gets -inf (0 is off)
    min_new_tokens        the row's stop tokens get -inf until the row has emitted that many tokens (0 is off)

(transformers has no presence / frequency penalty; they sit after the repetition penalty, as in vLLM.)

The numbers are traced values, a scalar or one per row, so changing them does not recompile. Whether an option
is given at all (None: off) is static: an option left off costs nothing, turning one on compiles it in once.
`no_repeat_ngram_size` (the width of the n-gram comparison) and `logprobs` (the output's shape) are static.

Everything here is pure: `GenerationOptions` holds what the user asked for (a field of the strategy),
`ProcessorParams` its per-row arrays, `History` what the processors read about each row (token counts, the
token sequence); `process` maps logits [B, P, V] at P positions to processed logits. The P positions may lie on a
draft tree (speculative decoding): position p sees the history plus the draft tokens on its path, so a verified
position is processed exactly as autoregressive decoding processes it after emitting that path.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jspec import sampling, validation
from jspec.validation import ArgumentError

GENERATION_OPTIONS = (
    "logprobs", "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "min_new_tokens",
    "no_repeat_ngram_size",
)
PROCESSOR_OPTIONS = GENERATION_OPTIONS[1:]
MAX_NO_REPEAT_NGRAM = 64  # the n-gram comparison unrolls n - 1 shifted compares of the whole history


@struct.dataclass
class LogitBias:
    """{token id: bias} as arrays: rows R = 1 (every row) or one per row, K entries, ids -1 padded."""

    ids: Any  # [R, K] int32
    values: Any  # [R, K] float32

    @classmethod
    def from_dicts(cls, value: Any) -> "LogitBias":
        """From a dict or a list of dicts (one per row); ArgumentError naming logit_bias otherwise."""
        expected = "a dict {token id: bias} (ints >= 0 to finite numbers), or a list of such dicts (one per row)"
        rows = [value] if isinstance(value, dict) else value
        if not isinstance(rows, (list, tuple)) or not rows or not all(isinstance(r, dict) for r in rows):
            validation.fail("logit_bias", expected, value)
        for row in rows:
            for token, bias in row.items():
                number = isinstance(bias, (int, float, np.integer, np.floating)) and not isinstance(bias, (bool, np.bool_))
                if not validation.is_int(token) or token < 0 or not number or not np.isfinite(bias):
                    raise ArgumentError(f"logit_bias: expected {expected}; got the entry {token!r}: {bias!r}")
        width = max(1, max(len(r) for r in rows))
        ids = np.full((len(rows), width), -1, np.int32)
        values = np.zeros((len(rows), width), np.float32)
        for index, row in enumerate(rows):
            ids[index, : len(row)] = list(row.keys())
            values[index, : len(row)] = list(row.values())
        return cls(ids=ids, values=values)


@struct.dataclass
class GenerationOptions:
    """Logit processors and log-probabilities a strategy applies (module docstring). None leaves one off.

    logprobs: k >= 0 reports each emitted token's log-probability under the distribution it was drawn from
    (after processors and warpers; greedy: the processed log-softmax) and under the raw model distribution, and
    for k > 0 the k most likely tokens of that distribution with theirs (`DecodeOutput.logprobs`, ...).
    """

    repetition_penalty: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: LogitBias | None = None
    min_new_tokens: Any = None
    no_repeat_ngram_size: int = struct.field(pytree_node=False, default=0)
    logprobs: int | None = struct.field(pytree_node=False, default=None)

    def __post_init__(self) -> None:
        if self.logit_bias is not None and not isinstance(self.logit_bias, LogitBias):  # a dict, or one per row
            object.__setattr__(self, "logit_bias", LogitBias.from_dicts(self.logit_bias))

    def updated(self, **options: Any) -> "GenerationOptions":
        """These options with some replaced (names from GENERATION_OPTIONS)."""
        unknown = sorted(set(options) - set(GENERATION_OPTIONS))
        if unknown:
            raise ArgumentError(f"{unknown[0]}: not a generation option; they are {', '.join(GENERATION_OPTIONS)}")
        if options.get("no_repeat_ngram_size") is None and "no_repeat_ngram_size" in options:
            options["no_repeat_ngram_size"] = 0
        if options.get("logprobs") is not None:
            validation.check_int("logprobs", options["logprobs"], minimum=0)
        validation.check_int("no_repeat_ngram_size", options.get("no_repeat_ngram_size", 0), minimum=0,
                             maximum=MAX_NO_REPEAT_NGRAM, why=" (0 turns it off)")
        return dataclasses.replace(self, **options)

    def validate(self, vocab_size: int, num_rows: int) -> None:
        """ArgumentError naming the option whose value is out of range (before tracing)."""
        rules = {
            "repetition_penalty": (lambda x: x > 0, "a float > 0 (1 turns it off)"),
            "presence_penalty": (lambda x: (x >= -2) & (x <= 2), "a float in [-2, 2] (0 turns it off)"),
            "frequency_penalty": (lambda x: (x >= -2) & (x <= 2), "a float in [-2, 2] (0 turns it off)"),
            "min_new_tokens": (lambda x: (x >= 0) & (x == np.round(x)), "an int >= 0 (0 turns it off)"),
        }
        for name, (ok, expected) in rules.items():
            if getattr(self, name) is not None:
                validation.check_per_row(name, getattr(self, name), num_rows, ok, expected)
        if self.logprobs is not None:
            validation.check_int("logprobs", self.logprobs, minimum=0, maximum=vocab_size,
                                 why=f" (the vocabulary has {vocab_size} tokens)")
        if self.logit_bias is not None:
            ids = np.asarray(self.logit_bias.ids)
            if ids.shape[0] not in (1, num_rows):
                raise ArgumentError(f"logit_bias: expected one dict, or {num_rows} (one per row), got {ids.shape[0]}")
            bad = ids[(ids != -1) & ((ids < 0) | (ids >= vocab_size))]
            if bad.size:
                raise ArgumentError(f"logit_bias: token id {int(bad[0])} is outside the vocabulary [0, {vocab_size})")

    def processor_params(self, batch_size: int, stop_tokens: jax.Array) -> "ProcessorParams":
        """Per-row arrays [B, ...] (values given for the caller's rows are extended over a bucket's padding rows)."""
        rows = lambda value, dtype: None if value is None else sampling.as_rows(value, dtype, batch_size)  # noqa: E731
        bias = self.logit_bias
        return ProcessorParams(
            repetition_penalty=rows(self.repetition_penalty, jnp.float32),
            presence_penalty=rows(self.presence_penalty, jnp.float32),
            frequency_penalty=rows(self.frequency_penalty, jnp.float32),
            bias_ids=None if bias is None else rows(bias.ids, jnp.int32),
            bias_values=None if bias is None else rows(bias.values, jnp.float32),
            min_new_tokens=rows(self.min_new_tokens, jnp.int32),
            stop_tokens=None if self.min_new_tokens is None else stop_tokens,
            no_repeat_ngram_size=int(self.no_repeat_ngram_size),
        )


@struct.dataclass
class ProcessorParams:
    """The processors' per-row parameters; None for a processor that is off."""

    repetition_penalty: jax.Array | None  # [B] float32
    presence_penalty: jax.Array | None  # [B] float32
    frequency_penalty: jax.Array | None  # [B] float32
    bias_ids: jax.Array | None  # [B, K] int32, -1 padded
    bias_values: jax.Array | None  # [B, K] float32
    min_new_tokens: jax.Array | None  # [B] int32
    stop_tokens: jax.Array | None  # [B, S] int32, -1 padded (with min_new_tokens)
    no_repeat_ngram_size: int = struct.field(pytree_node=False, default=0)

    @property
    def needs_counts(self) -> bool:
        return self.presence_penalty is not None or self.frequency_penalty is not None

    @property
    def needs_seen(self) -> bool:
        return self.repetition_penalty is not None

    @property
    def any(self) -> bool:
        return any(x is not None for x in jax.tree.leaves(self)) or self.no_repeat_ngram_size > 0


@struct.dataclass
class History:
    """What the processors read about each row: only the parts an enabled processor needs are kept."""

    counts: jax.Array | None  # [B, V] int32: generated tokens per vocabulary entry (presence / frequency)
    seen: jax.Array | None  # [B, V] bool: tokens of the prompt or generated (repetition penalty)
    tokens: jax.Array | None  # [B, H] int32: the prompt then the generated tokens (no_repeat_ngram_size)
    length: jax.Array  # [B] int32: prompt + generated tokens
    generated: jax.Array  # [B] int32: generated tokens

    @classmethod
    def create(
        cls,
        params: ProcessorParams,
        prompt_tokens: jax.Array,  # [B, T] int32, right-padded
        prompt_lengths: jax.Array,  # [B] int32
        vocab_size: int,
        capacity: int,  # tokens a row's sequence may reach (prompt, generated, and a draft path)
    ) -> "History":
        batch, width = prompt_tokens.shape
        in_prompt = jnp.arange(width)[None, :] < prompt_lengths[:, None]
        seen = None
        if params.needs_seen:
            ids = jnp.where(in_prompt, prompt_tokens, vocab_size)
            seen = jnp.zeros((batch, vocab_size), bool).at[jnp.arange(batch)[:, None], ids].set(True, mode="drop")
        tokens = None
        if params.no_repeat_ngram_size:
            tokens = jnp.full((batch, max(capacity, width)), -1, jnp.int32)
            tokens = tokens.at[:, :width].set(jnp.where(in_prompt, prompt_tokens, -1))
        return cls(
            counts=jnp.zeros((batch, vocab_size), jnp.int32) if params.needs_counts else None,
            seen=seen,
            tokens=tokens,
            length=prompt_lengths.astype(jnp.int32),
            generated=jnp.zeros((batch,), jnp.int32),
        )

    def append(self, new_tokens: jax.Array, num_new: jax.Array) -> "History":
        """The history after each row emitted its first num_new[b] tokens of new_tokens [B, T]."""
        batch, width = new_tokens.shape
        rows = jnp.arange(batch)[:, None]
        kept = jnp.arange(width)[None, :] < num_new[:, None]  # [B, T]
        updates = {}
        if self.counts is not None:
            vocab = self.counts.shape[1]
            updates["counts"] = self.counts.at[rows, jnp.where(kept, new_tokens, vocab)].add(1, mode="drop")
        if self.seen is not None:
            vocab = self.seen.shape[1]
            updates["seen"] = self.seen.at[rows, jnp.where(kept, new_tokens, vocab)].set(True, mode="drop")
        if self.tokens is not None:
            slots = jnp.where(kept, self.length[:, None] + jnp.arange(width)[None, :], self.tokens.shape[1])
            updates["tokens"] = self.tokens.at[rows, slots].set(new_tokens, mode="drop")
        return self.replace(length=self.length + num_new, generated=self.generated + num_new, **updates)


@struct.dataclass
class Processing:
    """A strategy's processors: parameters and history, kept in its state. Calling it processes logits."""

    params: ProcessorParams
    history: History

    @classmethod
    def create(cls, options: GenerationOptions, prompts: Any, vocab_size: int, headroom: int = 0) -> "Processing":
        """For `prompts` (a `Prompts`); headroom: draft tokens a processed position may see beyond the emitted."""
        params = options.processor_params(prompts.batch_size, prompts.stop_tokens)
        capacity = prompts.tokens.shape[1] + prompts.max_new_tokens + headroom
        return cls(params, History.create(params, prompts.tokens, prompts.lengths, vocab_size, capacity))

    def __call__(
        self,
        logits: jax.Array,  # [B, P, V]
        path_tokens: jax.Array | None = None,  # [B, N] int32: draft tokens, at the nodes of `template`
        template: Any = None,  # a TreeTemplate over path_tokens (None: no draft tokens)
        positions: Sequence[int] | None = None,  # [P] static: 0 = the root, i + 1 = after node i (None: 0..P-1)
    ) -> jax.Array:  # [B, P, V]
        return process(self.params, self.history, logits, path_tokens, template, positions)

    def append(self, new_tokens: jax.Array, num_new: jax.Array) -> "Processing":
        return self.replace(history=self.history.append(new_tokens, num_new))


def process(
    params: ProcessorParams,
    history: History,
    logits: jax.Array,  # [B, P, V]
    path_tokens: jax.Array | None = None,  # [B, N] int32
    template: Any = None,
    positions: Sequence[int] | None = None,
) -> jax.Array:  # [B, P, V] float32 (the logits unchanged when every processor is off)
    """Processed logits at P positions. Position p continues the history with the draft tokens on its path:
    the ancestors (and itself) of node positions[p] - 1 of `template`; position 0 is the root (the history
    alone). Without a template every position is the root."""
    if not params.any:
        return logits
    logits = logits.astype(jnp.float32)
    batch, width, vocab = logits.shape
    rows = jnp.arange(batch)
    if template is None:
        context = np.zeros((width, 0), bool)  # [P, N]: the path tokens each position sees
        node_depths = np.zeros((0,), np.int32)
    else:
        positions = list(range(width)) if positions is None else list(positions)
        context = np.asarray(template.ancestors)[positions, 1:]
        node_depths = np.asarray(template.depths)
    depth = jnp.asarray(context.sum(axis=1), jnp.int32)  # [P]
    has_path = context.shape[1] > 0
    on_path = None  # [B, P, V] int32: how often each token occurs on a position's draft path
    if has_path and (params.needs_counts or params.needs_seen):
        on_path = jnp.zeros((batch, width, vocab), jnp.int32).at[
            rows[:, None, None], jnp.arange(width)[None, :, None], path_tokens[:, None, :]
        ].add(jnp.asarray(context, jnp.int32)[None])

    if params.bias_ids is not None:
        ids = jnp.where(params.bias_ids >= 0, params.bias_ids, vocab)
        bias = jnp.zeros((batch, vocab), jnp.float32).at[rows[:, None], ids].add(params.bias_values, mode="drop")
        logits = logits + bias[:, None, :]
    if params.repetition_penalty is not None:
        penalty = params.repetition_penalty[:, None, None]
        seen = history.seen[:, None, :] if on_path is None else history.seen[:, None, :] | (on_path > 0)
        logits = jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)
    if params.needs_counts:
        counts = (history.counts[:, None, :] + (0 if on_path is None else on_path)).astype(jnp.float32)
        if params.frequency_penalty is not None:
            logits = logits - params.frequency_penalty[:, None, None] * counts
        if params.presence_penalty is not None:
            logits = logits - params.presence_penalty[:, None, None] * (counts > 0)
    if params.no_repeat_ngram_size:
        tokens = jnp.broadcast_to(history.tokens[:, None, :], (batch, width, history.tokens.shape[1]))
        if has_path:  # node n of a position's path sits at index length + depth(n) - 1 of its sequence
            slots = jnp.where(jnp.asarray(context)[None], history.length[:, None, None] + jnp.asarray(node_depths - 1),
                              tokens.shape[2])  # [B, P, N]
            tokens = tokens.at[rows[:, None, None], jnp.arange(width)[None, :, None], slots].set(
                jnp.broadcast_to(path_tokens[:, None, :], slots.shape), mode="drop")
        lengths = history.length[:, None] + depth[None, :]  # [B, P]
        banned = jax.vmap(jax.vmap(lambda t, n: ngram_bans(t, n, params.no_repeat_ngram_size, vocab)))(tokens, lengths)
        logits = jnp.where(banned, sampling.NEG_INF, logits)
    if params.min_new_tokens is not None:
        stops = jnp.where(params.stop_tokens >= 0, params.stop_tokens, vocab)
        is_stop = jnp.zeros((batch, vocab), bool).at[rows[:, None], stops].set(True, mode="drop")
        early = (history.generated[:, None] + depth[None, :]) < params.min_new_tokens[:, None]  # [B, P]
        logits = jnp.where(early[:, :, None] & is_stop[:, None, :], sampling.NEG_INF, logits)
    return logits


def ngram_bans(tokens: jax.Array, length: jax.Array, ngram_size: int, vocab_size: int) -> jax.Array:
    """[V] bool: the tokens that would complete an n-gram (n = ngram_size) already in tokens[:length] [H]
    (transformers' NoRepeatNGramLogitsProcessor: the last n - 1 tokens followed by the banned token occur)."""
    size = tokens.shape[0]
    starts = jnp.arange(size)
    pattern_start = length - (ngram_size - 1)
    match = (starts <= length - ngram_size) & (pattern_start >= 0)
    at = lambda index: tokens[jnp.clip(index, 0, size - 1)]  # noqa: E731
    for offset in range(ngram_size - 1):
        match &= at(starts + offset) == at(pattern_start + offset)
    banned = jnp.where(match, at(starts + ngram_size - 1), vocab_size)
    return jnp.zeros((vocab_size,), bool).at[banned].set(True, mode="drop")


# --- log-probabilities ------------------------------------------------------------------------------------


@struct.dataclass
class TokenScores:
    """Per emitted token: its log-probability under the distribution it was drawn from and under the raw model
    distribution, and the k most likely tokens of the former (k = 0: none)."""

    logprobs: jax.Array  # [B, T] float32
    raw_logprobs: jax.Array  # [B, T] float32
    top_tokens: jax.Array  # [B, T, k] int32
    top_logprobs: jax.Array  # [B, T, k] float32

    @classmethod
    def empty(cls, batch_size: int, capacity: int, k: int) -> "TokenScores":
        """A buffer of NaN log-probabilities and -1 tokens."""
        nan = lambda *shape: jnp.full(shape, jnp.nan, jnp.float32)  # noqa: E731
        return cls(nan(batch_size, capacity), nan(batch_size, capacity),
                   jnp.full((batch_size, capacity, k), -1, jnp.int32), nan(batch_size, capacity, k))


def token_scores(
    raw_logits: jax.Array,  # [B, T, V]: the model's
    processed: jax.Array,  # [B, T, V]: after the processors
    tokens: jax.Array,  # [B, T] int32: the tokens drawn there
    params: sampling.SamplingParams,  # [B]
    k: int,
) -> TokenScores:
    """Scores of tokens drawn from `sampling.sample(processed, params)`: the distribution is the warped one where
    a row samples, the processed log-softmax where it is greedy (as transformers' scores with `normalize_logits`)."""
    batch, width, vocab = processed.shape
    flat = processed.reshape(batch * width, vocab).astype(jnp.float32)
    flat_params = params.per_position(width)
    warped = jax.nn.log_softmax(sampling.warp_logits(flat, flat_params), axis=-1)
    chosen = jnp.where(flat_params.temperature[:, None] > 0, warped, jax.nn.log_softmax(flat, axis=-1))
    chosen = chosen.reshape(batch, width, vocab)
    raw = jax.nn.log_softmax(raw_logits.astype(jnp.float32), axis=-1)
    pick = lambda table: jnp.take_along_axis(table, tokens[:, :, None], axis=-1)[:, :, 0]  # noqa: E731
    top_logprobs, top_tokens = jax.lax.top_k(chosen, k)
    return TokenScores(pick(chosen), pick(raw), top_tokens.astype(jnp.int32), top_logprobs)
