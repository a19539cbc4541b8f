"""`jspec.decode` and `jspec.stream`: the one entry point to every strategy.

`decode` validates its inputs in Python (clear errors, nothing truncated), then runs
`lax.while_loop(not all(done), step, init(...))` under one `jit` and syncs with the host once.
`stream` drives the same jitted `step` from a Python loop and yields tokens as they are made.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jspec import sharding, stop_strings, validation
from jspec.models.model import Model, with_head_copy
from jspec.strategies.base import DecodeOutput, FinishReason, Prompts, Strategy, resolve_strategy
from jspec.validation import ArgumentError

# Shape buckets: nearby calls share one compiled program. Prompts are right-padded to the next power of two
# (at least PROMPT_PAD_MULTIPLE); strategies with `shape_buckets` also pad the batch to the next power of two
# (padding rows finish before the first step) and size the output for the next power of two of max_new_tokens
# (at least OUTPUT_BUCKET_MINIMUM), with each row's limit a traced value; the default cache size follows.
PROMPT_PAD_MULTIPLE = 16
OUTPUT_BUCKET_MINIMUM = 16
# The default cache size is rounded up to a multiple of this (and of the attention kernel's block): on XLA:CPU a
# greedy step over a 261-slot cache (a chain of 4's default for 128 + 128 tokens: 5 slots of headroom) cost 5-7%
# more than over 256 or 272 slots at batch 8 and 0-3% at batch 1 (demo-code, two interleaved runs;
# benchmarks/bench_cache_sizes.py: 264 slots 3.6% more at batch 8, 272 and 288 as fast as 256).
CACHE_SIZE_MULTIPLE = 16

_trace_count = 0


def trace_count() -> int:
    """How many programs `decode` and `stream` have traced (compiled) in this process: one per decode loop, and
    init, step, done and output for a stream."""
    return _trace_count


def _counted(function):
    def traced(*args):
        global _trace_count
        _trace_count += 1
        return function(*args)

    return traced


def _start(model: Model, strategy: Strategy, prompts: Prompts, key: jax.Array) -> Any:
    """The strategy's initial state, with the padding rows of a batch bucket already finished."""
    state = strategy.init(model, prompts, key)
    if prompts.stop_strings is not None:
        tail = stop_strings.prompt_tails(prompts.tokens, prompts.lengths, prompts.stop_strings.window)
        state = state.replace(output=state.output.watching(prompts.stop_strings, tail, prompts.stop_tokens))
    if prompts.active is not None:
        state = state.replace(output=state.output.finish(~prompts.active, FinishReason.LENGTH))
    return state


def _decode_loop(model: Model, strategy: Strategy, prompts: Prompts, key: jax.Array) -> DecodeOutput:
    state = _start(model, strategy, prompts, key)
    state = jax.lax.while_loop(lambda s: ~jnp.all(strategy.done(s)), lambda s: strategy.step(model, s), state)
    return _replicated(model, strategy.output(state))


def _replicated(model: Model, tree: Any) -> Any:
    """On a mesh, results every process reads whole (outputs, done flags): replicated on every device, so each
    process of a multi-host run holds all of them (they are small: tokens and per-row stats)."""
    if model.sharding is None:
        return tree
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, model.sharding.replicated()), tree)


_decode_jit = jax.jit(_counted(_decode_loop))
_init_jit = jax.jit(_counted(_start))
_step_jit = jax.jit(_counted(lambda model, strategy, state: strategy.step(model, state)), donate_argnums=2)
_done_jit = jax.jit(_counted(lambda model, strategy, state: _replicated(model, strategy.done(state))))
_output_jit = jax.jit(_counted(lambda model, strategy, state: _replicated(model, strategy.output(state))))


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> str:
    """Keep compiled programs on disk (JAX's persistent compilation cache): a later process decoding the same
    shapes with the same model config and strategy loads them instead of compiling. Call it before the first
    decode of the process. directory: default $JSPEC_CACHE_DIR, else ~/.cache/jspec/xla. Returns the directory."""
    path = os.fspath(directory or os.environ.get("JSPEC_CACHE_DIR") or os.path.expanduser("~/.cache/jspec/xla"))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def bucket(size: int, minimum: int = 1) -> int:
    """The shape bucket of `size`: the next power of two, at least `minimum`. Calls whose sizes share buckets
    share one compiled program."""
    return max(minimum, 1 << max(int(size) - 1, 0).bit_length())


def decode(
    model: Model,
    prompts: Any,
    strategy: str | Strategy = "greedy",
    *,
    max_new_tokens: int,
    key: jax.Array | int | None = None,
    prompt_lengths: Any = None,
    stop_tokens: Any = None,
    cache_size: int | None = None,
    mesh: Any = None,
    num_samples: int = 1,
    stop: Any = None,
    **options: Any,
) -> DecodeOutput:
    """Decode a batch of prompts with one strategy, in one compiled loop.

    prompts: a str or list of str (the model needs a tokenizer), a list of token-id lists (ragged), one flat
        list of token ids, or an int array [B, T] with `prompt_lengths` [B] (default: every row is T long).
    strategy: a registered name (`jspec.strategy_names()`) with its options as keyword arguments, or a
        strategy object.
    max_new_tokens: tokens to generate per row at most (>= 0).
    key: PRNG key or int seed for sampling strategies (default: seed 0; greedy ignores it).
    stop_tokens: token ids that end a row (kept in the output): a list for all rows or a list per row;
        default the model's EOS ids; [] to never stop early.
    cache_size: KV cache slots per row (default: padded prompt length + max_new_tokens + what the strategy
        needs beyond that, rounded up to a multiple of CACHE_SIZE_MULTIPLE). A row that fills its cache finishes with reason "cache_full".
    mesh: a `jax.sharding.Mesh` with axes "data" and "model" (`jspec.make_mesh`) to decode on: the model (and
        a draft model) is placed with `jspec.shard` unless it already is, on this mesh; the batch is split over
        "data" (strategies with shape buckets pad it to a multiple of the data axis; others need a batch it
        divides). Default: the model's own mesh if it was sharded, else one device. On a multi-host mesh, every
        process makes the same call with the same prompts and receives the whole output.
    stop: a str or list of str (the model needs a tokenizer): a row ends when its text ends with one of them, as
        transformers' `stop_strings` (see `jspec.stop_strings`): the tokens that complete the string are kept, the
        text is not cut inside the last token, and the finish reason is "stop_string". Matched on device.
    num_samples: rows per prompt (>= 1): each prompt is decoded num_samples times in the same batch, its rows
        consecutive in the output (prompt 0's samples first, then prompt 1's, ...). Sampling strategies draw each
        row's tokens independently, so the samples differ, and the same key reproduces them. The rows are
        expanded before the prefill (each strategy owns its prefill: a draft model's, a diffusion canvas), so a
        prompt's prefill runs once per sample.

    Returns numpy arrays (one host sync): see `DecodeOutput`. A strategy with `rows_per_prompt` (beam_search's
    num_return_sequences) returns that many consecutive rows per prompt.
    """
    strategy = resolve_strategy(strategy, options)
    model, strategy = for_decoding(*on_mesh(model, strategy, mesh))
    request = build_prompts(model, prompts, max_new_tokens, prompt_lengths, stop_tokens, cache_size, strategy,
                            num_samples=num_samples, stop=stop)
    if max_new_tokens == 0:
        return _empty_output(model, request, strategy)
    strategy = validated(strategy, model, request)
    result = _decode_jit(model.without_tokenizer(), strategy, *_placed(model, request, _as_key(key)))
    return _to_host(model, sharding.to_host(result), request, max_new_tokens, _rows_per_prompt(strategy))


def validated(strategy: Strategy, model: Model, request: Prompts) -> Strategy:
    """strategy.validate(model, request), then the strategy its `measured(model, request)` returns where it has one:
    the strategy with what it measured for this request in its traced fields (the auto depth's step costs), so the
    compiled loop takes them as inputs instead of constants of whichever request compiled it first."""
    strategy.validate(model, request)
    measured = getattr(strategy, "measured", None)
    return strategy if measured is None else measured(model, request)


def _rows_per_prompt(strategy: Strategy) -> int:
    """Output rows per request row: a strategy's `rows_per_prompt` (beam_search's num_return_sequences), else 1."""
    return int(getattr(strategy, "rows_per_prompt", 1))


def on_mesh(model: Model, strategy: Strategy, mesh: Any) -> tuple[Model, Strategy]:
    """The model and the strategy's models (a draft model) placed on `mesh` (None: the model's own mesh, if any).
    Raises when the model was sharded on another mesh than the one passed."""
    if mesh is None:
        if model.sharding is None:
            return model, strategy
        mesh = model.sharding.mesh
    mesh = sharding.auto_mesh(mesh)
    rules = None
    if model.sharding is not None:
        if not sharding.same_mesh(model.sharding.mesh, mesh):
            raise ArgumentError(f"mesh: the model is sharded on the mesh {sharding.describe(model.sharding.mesh)}, but "
                                f"mesh= is {sharding.describe(mesh)}; pass the model's mesh or reshard it with jspec.shard")
        rules = dict(model.sharding.rules)
    return _each_model(lambda m: sharding.shard(m, mesh, rules) if isinstance(m, Model) else m, model, strategy)


def for_decoding(model: Model, strategy: Strategy) -> tuple[Model, Strategy]:
    """The model and the strategy's models (a draft model) as the compiled loop computes with them
    (`jspec.models.model.with_head_copy`: a tied head copied to [D, V] on CPU)."""
    return _each_model(with_head_copy, model, strategy)


def _each_model(change: Any, model: Model, strategy: Strategy) -> tuple[Model, Strategy]:
    """`change` applied to the model and to every `Model` inside the strategy."""
    apply = lambda m: change(m) if isinstance(m, Model) else m  # noqa: E731
    return change(model), jax.tree.map(apply, strategy, is_leaf=lambda x: isinstance(x, Model))


def _placed(model: Model, request: Prompts, key: jax.Array) -> tuple[Prompts, jax.Array]:
    """On a mesh: the request's rows split over the batch axis and the key replicated, as global arrays (each
    process contributes its devices' slices of the same host values)."""
    plan = model.sharding
    if plan is None:
        return request, key
    rows = lambda x: sharding.place(x, plan.named(("batch",) + (None,) * (np.ndim(x) - 1)))  # noqa: E731
    whole = jax.tree.map(lambda x: sharding.place(x, plan.replicated()), request.stop_strings)  # tables, not rows
    request = jax.tree.map(rows, request.replace(stop_strings=None)).replace(stop_strings=whole)
    key = jax.random.wrap_key_data(sharding.place(jax.random.key_data(key), plan.replicated()))
    return request, key


class Stream:
    """Iterates over the tokens a decode makes, one step at a time: each item is a list (one entry per row)
    of the token ids that step emitted, and `.text` deltas where the model has a tokenizer. After the
    iteration, `.output` holds the same `DecodeOutput` that `jspec.decode` returns."""

    def __init__(self, model: Model, strategy: Strategy, request: Prompts, key: jax.Array, max_new_tokens: int):
        self._model, self._strategy, self._request, self._key = model, strategy, request, key
        self._max_new_tokens = max_new_tokens
        self.output: DecodeOutput | None = None
        self.text_deltas: list[str] | None = None

    def __iter__(self) -> Iterator[list[list[int]]]:
        model = self._model.without_tokenizer()
        tokenizer = self._model.tokenizer
        if self._max_new_tokens == 0:
            self.output = _empty_output(self._model, self._request, self._strategy)
            return
        state = _init_jit(model, self._strategy, *_placed(model, self._request, self._key))
        batch = self._request.num_rows
        emitted = np.zeros(batch, np.int64)
        texts = [""] * batch
        while True:
            partial = _trimmed(sharding.to_host(_output_jit(model, self._strategy, state)), batch, self._max_new_tokens)
            new = [list(map(int, row[start:end])) for row, start, end in zip(partial.tokens, emitted, partial.lengths)]
            emitted = np.asarray(partial.lengths, np.int64)
            if tokenizer is not None:
                self.text_deltas = []
                for row, seq in enumerate(partial.sequences()):
                    text = _visible_text(tokenizer, seq, self._request.stop_tokens[row])
                    self.text_deltas.append(text[len(texts[row]) :] if text.startswith(texts[row]) else text)
                    texts[row] = text
            if any(new):
                yield new
            if bool(np.all(sharding.to_host(_done_jit(model, self._strategy, state)))):
                break
            state = _step_jit(model, self._strategy, state)
        self.output = _to_host(self._model, partial, self._request, self._max_new_tokens)


def stream(
    model: Model,
    prompts: Any,
    strategy: str | Strategy = "greedy",
    *,
    max_new_tokens: int,
    key: jax.Array | int | None = None,
    prompt_lengths: Any = None,
    stop_tokens: Any = None,
    cache_size: int | None = None,
    mesh: Any = None,
    num_samples: int = 1,
    stop: Any = None,
    **options: Any,
) -> Stream:
    """Like `decode`, but returns a `Stream` that yields each step's new tokens as they are made.

    The same jitted `step` runs from a Python loop (one host sync per step), so the tokens equal `decode`'s;
    `mesh` and `num_samples` as for `decode`. Strategies that know their output only at the end (beam_search) are
    refused.
    """
    strategy = resolve_strategy(strategy, options)
    if not getattr(strategy, "streams", True):
        raise ArgumentError(f"strategy: {strategy.name!r} knows its output only when it ends; use jspec.decode")
    model, strategy = for_decoding(*on_mesh(model, strategy, mesh))
    request = build_prompts(model, prompts, max_new_tokens, prompt_lengths, stop_tokens, cache_size, strategy,
                            num_samples=num_samples, stop=stop)
    if max_new_tokens > 0:
        strategy = validated(strategy, model, request)
    return Stream(model, strategy, request, _as_key(key), int(max_new_tokens))


# --- inputs -------------------------------------------------------------------------------------------


def build_prompts(
    model: Model,
    prompts: Any,
    max_new_tokens: Any,
    prompt_lengths: Any = None,
    stop_tokens: Any = None,
    cache_size: int | None = None,
    strategy: Strategy | None = None,
    *,
    num_samples: int = 1,
    stop: Any = None,
) -> Prompts:
    """Validate user input and build the `Prompts` pytree. Raises `ArgumentError` (a ValueError) naming the bad
    argument; nothing is truncated. Bounds: the longest prompt plus max_new_tokens must fit the model's position
    limit, and the cache must fit the device's memory (checked before anything is allocated)."""
    validation.check_int("max_new_tokens", max_new_tokens, minimum=0)
    max_new_tokens = int(max_new_tokens)
    rows = _token_rows(model, prompts, prompt_lengths)
    vocab = model.config.vocab_size
    for index, row in enumerate(rows):
        if len(row) == 0:
            raise ArgumentError(f"prompts: row {index} is empty; every prompt needs at least one token")
        bad = np.flatnonzero((row < 0) | (row >= vocab))
        if bad.size:
            raise ArgumentError(
                f"prompts: row {index}, position {bad[0]} has token id {row[bad[0]]}, outside the vocabulary [0, {vocab})"
            )
    num_samples = validation.check_int("num_samples", num_samples, minimum=1)
    prompt_rows = len(rows)
    rows = [row for row in rows for _ in range(num_samples)]  # each prompt's samples are consecutive rows
    lengths = np.array([len(r) for r in rows], np.int32)
    limit = model.config.max_position_embeddings
    room = limit - int(lengths.max())
    if room < 0:
        raise validation.ArgumentError(
            f"prompts: row {int(np.argmax(lengths))} has {int(lengths.max())} tokens, more than the model's position "
            f"limit max_position_embeddings={limit}"
        )
    validation.check_int("max_new_tokens", max_new_tokens, minimum=0, maximum=room,
                         why=f" (the longest prompt has {int(lengths.max())} tokens; the model's position limit is "
                             f"max_position_embeddings={limit})")
    buckets = bool(getattr(strategy, "shape_buckets", False))
    width = bucket(int(lengths.max()), PROMPT_PAD_MULTIPLE)
    batch = _batch_size(model, strategy, len(rows), buckets)
    capacity = bucket(max_new_tokens, OUTPUT_BUCKET_MINIMUM) if buckets and max_new_tokens else max_new_tokens
    tokens = np.full((batch, width), model.config.pad_token_id, np.int32)
    for index, row in enumerate(rows):
        tokens[index, : len(row)] = row
    lengths = np.concatenate([lengths, np.ones(batch - len(rows), np.int32)])  # padding rows: one pad token

    headroom = strategy.cache_headroom() if strategy is not None else 0
    multiple = model.cache_size_multiple  # attention kernels read the cache in whole blocks
    if cache_size is None:
        rounding = math.lcm(multiple, CACHE_SIZE_MULTIPLE)
        cache_size = -(-(width + capacity + headroom) // rounding) * rounding
    else:
        validation.check_int("cache_size", cache_size, minimum=1)
        if strategy is not None and not getattr(strategy, "takes_cache_size", True):
            raise validation.ArgumentError(
                f"cache_size: strategy {getattr(strategy, 'name', strategy)!r} sizes its own cache from the prompts and "
                "max_new_tokens (its canvas); leave cache_size unset"
            )
        if cache_size % multiple:
            raise validation.ArgumentError(
                f"cache_size: {cache_size} is not a multiple of the attention kernel block size {multiple} "
                f"(attention_impl={model.kernels.attention_impl!r}); use cache_size={-(-cache_size // multiple) * multiple}"
            )
        if int(lengths.max()) > cache_size:
            longest = int(np.argmax(lengths))
            raise validation.ArgumentError(
                f"cache_size: prompt row {longest} has {lengths[longest]} tokens, more than cache_size={cache_size}; "
                "raise cache_size or shorten the prompt (prompts are never truncated)"
            )
    _check_memory(model, batch, int(cache_size), headroom + 1)
    stops = np.repeat(_stop_token_rows(model, stop_tokens, prompt_rows), num_samples, axis=0)
    strings = stop_strings.check_stop(stop, model.tokenizer)
    stops = np.pad(stops, ((0, batch - len(rows)), (0, bucket(stops.shape[1]) - stops.shape[1])), constant_values=-1)
    active = np.arange(batch) < len(rows)
    return Prompts(
        tokens=jnp.asarray(tokens),
        lengths=jnp.asarray(lengths),
        stop_tokens=jnp.asarray(stops),
        max_new_tokens=capacity,
        cache_size=int(cache_size),
        limits=jnp.full((batch,), max_new_tokens, jnp.int32) if buckets else None,
        active=jnp.asarray(active) if buckets else None,
        stop_strings=None if strings is None else stop_strings.stop_strings(model.tokenizer, strings, vocab),
        samples_per_prompt=num_samples,
    )


def _batch_size(model: Model, strategy: Strategy | None, rows: int, buckets: bool) -> int:
    """Rows of the compiled batch: the caller's, or with shape buckets the next power of two, rounded up to a
    multiple of the mesh's data axis (padding rows finish before the first step)."""
    split = 1 if model.sharding is None else model.sharding.axis_size("batch")
    if not buckets:
        if rows % split:
            raise ArgumentError(
                f"prompts: {rows} rows do not divide over the mesh's batch axis of size {split}, and strategy "
                f"{getattr(strategy, 'name', strategy)!r} does not pad batches; pass a multiple of {split} rows or a "
                "mesh with a smaller data axis")
        return rows
    return -(-bucket(rows) // split) * split


def _check_memory(model: Model, batch_size: int, cache_size: int, max_chunk: int) -> None:
    """Raise before allocating when the cache alone would not fit in the device's memory (shapes only)."""
    needed = _cache_bytes(model, batch_size, cache_size, max_chunk)
    available = _device_memory_bytes()
    if available is not None and needed > 0.9 * available:
        raise validation.ArgumentError(
            f"cache_size: a cache of {cache_size} slots for {batch_size} rows needs {needed / 2**30:.1f} GiB per device, more than "
            f"90% of the device's {available / 2**30:.1f} GiB; lower max_new_tokens, cache_size or the batch size"
        )


_CACHE_BYTES: dict[Any, int] = {}  # (model type, config, kernels, batch, cache size, chunk) -> bytes per device


def _cache_bytes(model: Model, batch_size: int, cache_size: int, max_chunk: int) -> int:
    """Bytes of the cache `model.new_cache` makes, per device; from shapes only (`jax.eval_shape`: a trace, 3.5 ms
    for demo-code, so unsharded models' figures are remembered: a decode call pays it once per shape)."""
    # config and kernels are a Model's static fields, so hashable (jit keys compiles on them)
    key = None if model.sharding is not None else (type(model), model.config, model.kernels, batch_size, cache_size,
                                                   max_chunk)
    if key in _CACHE_BYTES:
        return _CACHE_BYTES[key]
    cache = jax.eval_shape(lambda: model.new_cache(batch_size, cache_size, max_chunk=max_chunk))
    shapes = [leaf.shape for leaf in jax.tree.leaves(cache)]
    if model.sharding is not None:  # each device holds its shard
        shapes = [s.shard_shape(leaf.shape) for s, leaf in
                  zip(jax.tree.leaves(model.sharding.tree_shardings(cache, model.cache_axes)), jax.tree.leaves(cache))]
    needed = sum(int(np.prod(shape)) * leaf.dtype.itemsize for shape, leaf in zip(shapes, jax.tree.leaves(cache)))
    if key is not None:
        _CACHE_BYTES[key] = needed
    return needed


def _device_memory_bytes() -> int | None:
    device = jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def _token_rows(model: Model, prompts: Any, prompt_lengths: Any) -> list[np.ndarray]:
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, str) for p in prompts)):
        if prompt_lengths is not None:
            raise ArgumentError("prompt_lengths: only valid with an int array of prompts, not with text")
        if model.tokenizer is None:
            raise ArgumentError("prompts: text prompts need a model with a tokenizer; pass token ids instead")
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        return [np.asarray(_with_bos(model, model.tokenizer.encode(t)), np.int64) for t in texts]
    if isinstance(prompts, (np.ndarray, jax.Array)):
        array = np.asarray(prompts)
        if not np.issubdtype(array.dtype, np.integer):
            raise ArgumentError(f"prompts: expected integer token ids, got an array of dtype {array.dtype}")
        if array.ndim != 2:
            raise ArgumentError(f"prompts: expected an int array of shape [B, T], got shape {array.shape}")
        if prompt_lengths is None:
            lengths = np.full(array.shape[0], array.shape[1])
        else:
            lengths = np.asarray(prompt_lengths)
            if lengths.shape != (array.shape[0],) or not np.issubdtype(lengths.dtype, np.integer):
                raise ArgumentError(f"prompt_lengths: expected {array.shape[0]} ints (one per row), got {prompt_lengths!r}")
            if np.any(lengths > array.shape[1]) or np.any(lengths < 0):
                raise ArgumentError(f"prompt_lengths: expected values in [1, {array.shape[1]}], got {lengths.tolist()}")
        return [array[i, : lengths[i]].astype(np.int64) for i in range(array.shape[0])]
    if prompt_lengths is not None:
        raise ArgumentError("prompt_lengths: only valid with an int array of prompts [B, T]")
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise ArgumentError("prompts: expected at least one prompt, got an empty list")
        if all(_is_int(t) for t in prompts):
            return [np.asarray(prompts, np.int64)]
        rows = []
        for index, row in enumerate(prompts):
            if not isinstance(row, (list, tuple, np.ndarray)) or not all(_is_int(t) for t in row):
                raise ArgumentError(
                    f"prompts: row {index} is not a list of int token ids ({row!r}); expected str, list of str, "
                    "list of token-id lists, or an int array [B, T]"
                )
            rows.append(np.asarray(row, np.int64).reshape(-1))
        return rows
    raise ArgumentError(
        f"prompts: expected str, list of str, list of token-id lists, or an int array [B, T]; got {type(prompts).__name__}"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _with_bos(model: Model, ids: list[int]) -> list[int]:
    bos = getattr(model.tokenizer, "bos_token_id", None) if model.config.bos_token_id is None else model.config.bos_token_id
    prepend = getattr(model.tokenizer, "add_bos", False)
    return [bos] + ids if (prepend and bos is not None) else ids


def _stop_token_rows(model: Model, stop_tokens: Any, batch_size: int) -> np.ndarray:
    if stop_tokens is None:
        stop_tokens = list(model.config.eos_token_ids) or list(getattr(model.tokenizer, "eos_token_ids", ()) or ())
    if _is_int(stop_tokens):
        stop_tokens = [stop_tokens]
    if isinstance(stop_tokens, (str, bytes)) or not isinstance(stop_tokens, (list, tuple, np.ndarray)):
        validation.fail("stop_tokens", f"token ids in [0, {model.config.vocab_size}) (a list, or a list per row)",
                        stop_tokens)
    stop_tokens = list(stop_tokens)
    per_row = bool(stop_tokens) and all(isinstance(s, (list, tuple, np.ndarray)) for s in stop_tokens)
    if per_row and len(stop_tokens) != batch_size:
        raise ArgumentError(f"stop_tokens: expected one list per row ({batch_size}), got {len(stop_tokens)}")
    rows = [list(s) for s in stop_tokens] if per_row else [stop_tokens] * batch_size
    for row in rows:
        for token in row:
            if not _is_int(token) or not 0 <= token < model.config.vocab_size:
                raise ArgumentError(
                    f"stop_tokens: expected token ids in [0, {model.config.vocab_size}) (a list, or a list per row), got {token!r}"
                )
    width = max(len(r) for r in rows)
    table = np.full((batch_size, width), -1, np.int32)
    for index, row in enumerate(rows):
        table[index, : len(row)] = row
    return table


def _as_key(key: Any) -> jax.Array:
    if key is None:
        return jax.random.key(0)
    if _is_int(key):
        return jax.random.key(int(key))
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if isinstance(key, jax.Array) and key.shape == (2,) and key.dtype == jnp.uint32:
        return jax.random.wrap_key_data(key)
    raise ArgumentError(f"key: expected an int seed or a jax.random.key, got {key!r}")


# --- outputs ------------------------------------------------------------------------------------------


def _trimmed(result: DecodeOutput, batch_size: int, max_new_tokens: int) -> DecodeOutput:
    """A host-side output without the bucket's padding: the first batch_size rows and max_new_tokens columns."""
    return result.select(slice(0, batch_size), slice(0, max_new_tokens))


def _to_host(model: Model, result: DecodeOutput, request: Prompts, max_new_tokens: int,
             rows_per_prompt: int = 1) -> DecodeOutput:
    output = _trimmed(result, request.num_rows * rows_per_prompt, max_new_tokens)
    stats = {name: (value.tolist() if np.ndim(value) else value.item()) if hasattr(value, "tolist") else value for name, value in output.stats.items()}
    output = dataclasses.replace(output, stats=stats)
    if model.tokenizer is not None:
        stops = np.asarray(request.stop_tokens)
        texts = [_visible_text(model.tokenizer, seq, stops[row // rows_per_prompt])
                 for row, seq in enumerate(output.sequences())]
        output = dataclasses.replace(output, text=texts)
    return output


def _visible_text(tokenizer: Any, sequence: Sequence[int], stop_tokens: Any) -> str:
    stops = {int(s) for s in np.asarray(stop_tokens).reshape(-1) if s >= 0}
    if sequence and int(sequence[-1]) in stops:
        sequence = sequence[:-1]
    return tokenizer.decode(list(sequence))


def _empty_output(model: Model, request: Prompts, strategy: Strategy) -> DecodeOutput:
    rows_per_prompt = _rows_per_prompt(strategy)
    batch = request.num_rows * rows_per_prompt
    k = getattr(getattr(strategy, "generation", None), "logprobs", None)
    scores = {}
    if k is not None:
        empty = lambda *trailing, dtype=np.float32: np.zeros((batch, 0, *trailing), dtype)  # noqa: E731
        scores = dict(logprobs=empty(), raw_logprobs=empty(), top_tokens=empty(k, dtype=np.int32), top_logprobs=empty(k))
    return _to_host(
        model,
        DecodeOutput(
            tokens=np.zeros((batch, 0), np.int32),
            lengths=np.zeros(batch, np.int32),
            finish_reason=np.full(batch, int(FinishReason.LENGTH), np.int32),
            stats={"model_calls": 0, "steps": 0, "tokens_generated": np.zeros(batch, np.int32)},
            **scores,
        ),
        request,
        0,
        rows_per_prompt,
    )
