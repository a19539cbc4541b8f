"""Block-diffusion decoding (Fast-dLLM v2, arXiv 2509.26328) for block-diffusion LMs (config.diffusion == "block").

Layout. Blocks are aligned to absolute positions: block j covers positions [j * block_size, (j + 1) * block_size).
A row's prompt fills its complete blocks, which are committed (their keys/values kept); the block holding the
prompt's tail (or, when the prompt ends on a block boundary, the block whose first token is the argmax of the
prompt's last logit) is the first one decoded. A block is decided sub-block by sub-block (`sub_block_size`, left
to right): each iteration runs the block bidirectionally over the committed prefix, predicts masked positions
with the token shift (position i from the logits at i - 1), and lets the unmasking rule (`unmasking`, the
masked-diffusion rules of jspec/strategies/unmasking.py that decide from one forward) choose among the masked
positions of the current sub-block: "threshold" (Fast-dLLM v2: every one with confidence > `threshold`, and at
least the most confident one), "static" (the most confident one), or "learn2pd" (Learn2PD: every one a learned
filter scores above `threshold`, and at least the most confident one; the filter's features are computed over
the sub-block, the positions the rule may unmask). Threshold 1 decides one token per forward under either
threshold rule, the same tokens as "static". A complete block is emitted (stop
tokens end the row there) and committed by one more forward, whose last logit gives the next block's first token.
Rows move through blocks independently; positions past max_new_tokens are never decided.

Caches (`cache`: a name, or one of the policy objects `NoBlockCache`, `BlockCache`, `SubBlockCache` below):
- "none" (`NoBlockCache`): every forward runs all committed blocks and the current one under the block-causal
  mask (the reference decoder).
- "block" (`BlockCache`): committed blocks' keys/values are kept and each forward runs only the current block.
  Exact: a committed block never reads later positions, so its entries do not change ("none" and "block" give
  the same tokens).
- "sub_block" (`SubBlockCache`): as "block", and at a sub-block's first iteration the whole block runs once and
  keeps its own entries; later iterations run only the sub-block (and the token before it) over those.
  Fast-dLLM v2's `use_block_cache`: an approximation (kept entries of the rest of the block do not see the
  sub-block's new tokens), exact for one-layer models.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from jspec import masks, validation
from jspec.cache import Cache
from jspec.strategies import unmasking
from jspec.strategies.base import DecodeOutput, OutputBuffer, Prompts, register_strategy, run_either, static_field
from jspec.strategies.diffusion import emit_decided
from jspec.strategies.unmasking import ThresholdUnmasking, UnmaskingRule, unmasking_rule
from jspec.validation import ArgumentError

# --- caches --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockDiffusionCache:
    """Which keys/values a block-diffusion forward keeps, and so which tokens it runs."""

    def capacity(self, width: int) -> int:
        """Cache slots per row for a canvas of `width` (static)."""
        raise NotImplementedError

    def prefill(
        self,
        model: Any,
        state: BlockDiffusionState,  # the initial state (nothing committed yet)
        prompts: Prompts,
        committed: jax.Array,  # [B] int32: end of the prompt's complete blocks
        block_size: int,
    ) -> tuple[jax.Array, Cache]:  # logits [B, 1, V] at slot committed - 1 (clipped to 0), cache
        """Run the prompt's complete blocks, keeping their entries where this mode keeps any."""
        raise NotImplementedError

    def run(
        self, model: Any, state: BlockDiffusionState, slots: jax.Array, block_size: int, rows: jax.Array
    ) -> tuple[jax.Array, Cache]:  # logits [B, T, V] (unshifted), cache
        """Run the current block's tokens at slots [B, T] over the committed prefix and the block; the cache with
        their entries written for `rows` (where entries are kept)."""
        raise NotImplementedError

    def whole_block_rows(
        self, state: BlockDiffusionState, current_sub_block: jax.Array, running: jax.Array  # [B] int32, [B] bool
    ) -> jax.Array | None:  # [B] bool
        """Running rows whose next forward runs the whole block (the others run their current sub-block);
        None: every forward runs the whole block."""
        return None


@dataclasses.dataclass(frozen=True)
class NoBlockCache(BlockDiffusionCache):
    """Nothing is kept: every forward runs all committed blocks and the current one under the block-causal mask
    (the reference decoder)."""

    def capacity(self, width: int) -> int:
        return 1  # the state always carries a cache; this mode writes nothing to it, so one slot is enough

    def prefill(self, model, state, prompts, committed, block_size):
        return canvas_logits(model, state.canvas, block_size, committed, (committed - 1)[:, None]), state.cache

    def run(self, model, state, slots, block_size, rows):
        return canvas_logits(model, state.canvas, block_size, state.committed + block_size, slots), state.cache


@dataclasses.dataclass(frozen=True)
class BlockCache(BlockDiffusionCache):
    """Committed blocks' keys/values are kept and every forward runs only the current block. Exact: a committed
    block never reads later positions, so its entries do not change."""

    def capacity(self, width: int) -> int:
        return width

    def prefill(self, model, state, prompts, committed, block_size):
        batch, prompt_width = prompts.tokens.shape
        width = state.canvas.shape[1]
        slots = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32)[None, :], (batch, width))
        positions = jnp.broadcast_to(jnp.arange(prompt_width, dtype=jnp.int32)[None, :], (batch, prompt_width))
        write = jnp.where(positions < committed[:, None], positions, width)
        mask = masks.block_causal_mask(positions, slots, block_size) & (slots < committed[:, None])[:, None, :]
        last = jnp.maximum(committed - 1, 0)[:, None]
        return model.forward(prompts.tokens, positions, state.cache, mask, write_slots=write, output_indices=last)

    def run(self, model, state, slots, block_size, rows):
        block_start = state.committed
        tokens = jnp.take_along_axis(state.canvas, jnp.minimum(slots, state.canvas.shape[1] - 1), axis=1)
        write = jnp.where(rows[:, None], slots, state.cache.capacity)
        visibility = jnp.ones((slots.shape[1], block_size), bool)  # every fed token reads the whole block
        mask = masks.prefix_and_block_mask(block_start, visibility, block_start, state.cache.capacity)
        return model.forward(tokens, slots, state.cache, mask, write_slots=write)


@dataclasses.dataclass(frozen=True)
class SubBlockCache(BlockCache):
    """As `BlockCache`, and at a sub-block's first iteration the whole block runs once and keeps its own entries;
    later iterations run only the sub-block (and the token before it) over those (Fast-dLLM v2's
    `use_block_cache`: an approximation, exact for one-layer models)."""

    def whole_block_rows(self, state, current_sub_block, running):
        return running & (state.needs_commit | (current_sub_block != state.sub_block_started))


BLOCK_CACHES = {"none": NoBlockCache, "block": BlockCache, "sub_block": SubBlockCache}


def block_diffusion_cache(cache: str | BlockDiffusionCache) -> BlockDiffusionCache:
    """The cache mode a user option names, or the mode object itself."""
    return unmasking.choose_policy("cache", cache, BLOCK_CACHES, BlockDiffusionCache)


def canvas_logits(
    model: Any,
    canvas: jax.Array,  # [B, S] int32
    block_size: int,
    visible_end: jax.Array,  # [B] int32: keys at slots >= visible_end are not read
    indices: jax.Array,  # [B, T] int32: slots whose logits are returned
) -> jax.Array:  # [B, T, V]
    """One uncached forward of the canvas under the block-causal mask."""
    batch, width = canvas.shape
    positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32)[None, :], (batch, width))
    mask = masks.block_causal_mask(positions, positions, block_size) & (positions < visible_end[:, None])[:, None, :]
    logits, _ = model.forward(canvas, positions, None, mask, output_indices=jnp.clip(indices, 0, width - 1))
    return logits


# --- the decoder ---------------------------------------------------------------------------------------


class SubBlockDecision(NamedTuple):
    """What the unmasking rule saw at a row's last decision: the current sub-block's positions (the Learn2PD
    trainer, jspec/train/learn2pd.py, records these along static decoding)."""

    predicted: jax.Array  # [B, sub] int32: the fresh predictions
    confidence: jax.Array  # [B, sub] float32
    masked: jax.Array  # [B, sub] bool: positions the rule could unmask (none where the row's forward decided nothing)
    positions: jax.Array  # [B, sub] int32: generated positions (0 = the first generated token)


@struct.dataclass
class BlockDiffusionState:
    canvas: jax.Array  # [B, S] int32: prompt, decided tokens, mask tokens elsewhere
    committed: jax.Array  # [B] int32: committed length (a multiple of block_size); the current block starts here
    gen_start: jax.Array  # [B] int32: first generated position (= prompt length)
    needs_commit: jax.Array  # [B] bool: the current block is complete and emitted; commit it next
    sub_block_started: jax.Array  # [B] int32: the sub-block whose whole-block run is kept (SubBlockCache), -1: none
    cache: Cache
    decided: jax.Array  # [B] int32: generated positions decided so far (sampling noise index)
    output: OutputBuffer
    stop_tokens: jax.Array  # [B, K]
    temperature: jax.Array  # [B] float32
    key: jax.Array
    step: jax.Array  # [] int32
    model_calls: jax.Array  # [] int32
    block_forwards: jax.Array  # [B, max_blocks] int32: forwards each row spent deciding each of its blocks
    last_decision: SubBlockDecision
    mask_token_id: int = static_field()


@struct.dataclass
class BlockDiffusion:
    """Fast-dLLM v2 inference; see the module docstring.

    block_size (static, None: the model's training block size), sub_block_size (static, divides block_size),
    cache (static): a `BlockDiffusionCache` (the factory `block_diffusion` takes the names "none" | "block" |
    "sub_block"). unmasking: a one-branch `UnmaskingRule` (`ThresholdUnmasking`, `StaticUnmasking`,
    `Learn2PDUnmasking`), applied to the current sub-block; its threshold and filter are traced (swapping them
    does not recompile). temperature >= 0: traced, scalar or one per row.
    """

    name: ClassVar[str] = "block_diffusion"
    takes_cache_size: ClassVar[bool] = False  # the cache is sized from the canvas (prompts + max_new_tokens)
    block_size: int | None = static_field(default=None)
    sub_block_size: int = static_field(default=8)
    cache: BlockDiffusionCache = static_field(default=BlockCache())
    unmasking: UnmaskingRule = ThresholdUnmasking(threshold=0.9)
    temperature: Any = 0.0
    end_of_text: bool = static_field(default=True)

    # --- contract -------------------------------------------------------------------------------------

    def validate(self, model: Any, prompts: Prompts) -> None:
        unmasking.check_diffusion_model(model, "block", "block_diffusion")
        if not model.config.shifted_logits:
            raise ArgumentError("model: block_diffusion needs a token-shift model (config.shifted_logits=True), as Fast-dLLM v2 trains")
        unmasking.choose_policy("cache", self.cache, {}, BlockDiffusionCache)
        if self.block_size is not None:
            unmasking.check_positive_int("block_size", self.block_size)
        unmasking.check_positive_int("sub_block_size", self.sub_block_size)
        block_size = self._block_size(model)
        if block_size % self.sub_block_size:
            raise ArgumentError(f"sub_block_size: {self.sub_block_size} does not divide block_size={block_size}")
        unmasking.check_options(prompts, self.temperature)
        validation.check_bool("end_of_text", self.end_of_text)
        check_sub_block_rule(self.unmasking)
        self.unmasking.validate(model.config, prompts)

    def cache_headroom(self) -> int:
        return 0

    def init(self, model: Any, prompts: Prompts, key: jax.Array) -> BlockDiffusionState:
        bs = self._block_size(model)
        batch, prompt_width = prompts.tokens.shape
        new = prompts.max_new_tokens
        width = -(-(prompt_width + new + bs) // bs) * bs
        slots = jnp.arange(width, dtype=jnp.int32)[None, :]
        mask_id = model.config.mask_token_id
        padded = jnp.pad(prompts.tokens, ((0, 0), (0, width - prompt_width)))
        canvas = jnp.where(slots < prompts.lengths[:, None], padded, mask_id).astype(jnp.int32)
        committed = (prompts.lengths // bs) * bs
        max_blocks = -(-(new + bs) // bs) + 1
        state = BlockDiffusionState(
            canvas=canvas,
            committed=jnp.zeros_like(committed),
            gen_start=prompts.lengths,
            needs_commit=jnp.zeros((batch,), bool),
            sub_block_started=jnp.full((batch,), -1, jnp.int32),
            cache=model.new_cache(batch, self.cache.capacity(width)),
            decided=jnp.zeros((batch,), jnp.int32),
            output=OutputBuffer.create(batch, new),
            stop_tokens=prompts.stop_tokens,
            temperature=unmasking.per_row(self.temperature, batch),
            key=key,
            step=jnp.int32(0),
            model_calls=jnp.int32(0),
            block_forwards=jnp.zeros((batch, max_blocks), jnp.int32),
            last_decision=SubBlockDecision(*(jnp.zeros((batch, self.sub_block_size), t) for t in (jnp.int32, jnp.float32, bool, jnp.int32))),
            mask_token_id=mask_id,
        )
        # Prefill: commit the prompt's complete blocks; where the prompt ends on a block boundary its last
        # logit gives the first generated token.
        logits, cache = self.cache.prefill(model, state, prompts, committed, bs)
        on_boundary = (committed == prompts.lengths) & (prompts.max_new_tokens > 0)
        state = state.replace(cache=cache.with_lengths(committed), committed=committed, model_calls=jnp.int32(1))
        return self._place_first_token(model, state, logits[:, 0], on_boundary)

    def step(self, model: Any, state: BlockDiffusionState) -> BlockDiffusionState:
        running = ~state.output.finished
        whole = self.cache.whole_block_rows(state, self._current_sub_block(model, state), running)
        if whole is None:
            state = self._block_step(model, state, running)
        else:
            block_step = lambda s: self._block_step(model, s, whole)  # noqa: E731
            state = run_either(jnp.any(whole), block_step, lambda s: self._sub_block_step(model, s, running), state)
        return state.replace(step=state.step + 1)

    def done(self, state: BlockDiffusionState) -> jax.Array:
        return state.output.finished

    def output(self, state: BlockDiffusionState) -> DecodeOutput:
        return unmasking.decode_output(state)

    # --- layout -----------------------------------------------------------------------------------------

    def _block_size(self, model: Any) -> int:
        return self.block_size if self.block_size is not None else model.config.diffusion_block_size

    def _block_slots(self, model: Any, state: BlockDiffusionState) -> jax.Array:  # [B, bs]
        bs = self._block_size(model)
        slots = state.committed[:, None] + jnp.arange(bs, dtype=jnp.int32)[None, :]
        return jnp.minimum(slots, state.canvas.shape[1] - 1)

    def _to_decide(self, model: Any, state: BlockDiffusionState) -> jax.Array:  # [B, bs] bool
        """Masked positions of the current block inside the generation limit."""
        slots = self._block_slots(model, state)
        block = jnp.take_along_axis(state.canvas, slots, axis=1)
        in_limit = slots < (state.gen_start + state.output.tokens.shape[1])[:, None]
        return (block == state.mask_token_id) & in_limit

    def _current_sub_block(self, model: Any, state: BlockDiffusionState) -> jax.Array:  # [B] int32
        """The leftmost sub-block with positions still to decide."""
        pending = self._to_decide(model, state)
        first = jnp.argmax(pending, axis=1)
        return jnp.where(jnp.any(pending, axis=1), first // self.sub_block_size, -1).astype(jnp.int32)

    # --- forwards ---------------------------------------------------------------------------------------

    def _run(self, model: Any, state: BlockDiffusionState, start: jax.Array, length: int, rows: jax.Array) -> tuple[jax.Array, Cache]:
        """Run `length` tokens of the current block from block offset start [B] over the committed prefix and
        the block; logits [B, length, V] (unshifted), and the cache with those entries written for `rows`."""
        slots = state.committed[:, None] + start[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]  # [B, length]
        return self.cache.run(model, state, slots, self._block_size(model), rows)

    def _block_step(self, model: Any, state: BlockDiffusionState, rows: jax.Array) -> BlockDiffusionState:
        """Run the whole current block for `rows`: commit the complete ones, decide in the others."""
        bs = self._block_size(model)
        logits, cache = self._run(model, state, jnp.zeros_like(state.committed), bs, rows)
        commit = rows & state.needs_commit
        state = state.replace(
            cache=cache,
            model_calls=state.model_calls + 1,
            block_forwards=self._count_forward(model, state, rows & ~commit),
            sub_block_started=jnp.where(rows & ~commit, self._current_sub_block(model, state), state.sub_block_started),
        )
        # committing rows: the next block starts after this one, its first token from the last logit
        committed = jnp.where(commit, state.committed + bs, state.committed)
        after = state.replace(committed=committed, cache=state.cache.with_lengths(committed), needs_commit=state.needs_commit & ~commit)
        after = after.replace(sub_block_started=jnp.where(commit, -1, after.sub_block_started))
        after = self._place_first_token(model, after, logits[:, bs - 1], commit)
        # deciding rows: predictions for block positions 1.. from the logits before them (token shift)
        return self._decide(model, after, logits[:, :-1], jnp.ones_like(state.committed), rows & ~commit)

    def _sub_block_step(self, model: Any, state: BlockDiffusionState, rows: jax.Array) -> BlockDiffusionState:
        """Run only the current sub-block (and the token before it) over the kept block entries."""
        sub = self.sub_block_size
        sub_start = self._current_sub_block(model, state) * sub
        fed_start = jnp.maximum(sub_start - 1, 0)
        logits, cache = self._run(model, state, fed_start, sub + 1, rows)
        state = state.replace(cache=cache, model_calls=state.model_calls + 1, block_forwards=self._count_forward(model, state, rows))
        return self._decide(model, state, logits, fed_start + 1, rows)

    # --- decisions --------------------------------------------------------------------------------------

    def _decide(self, model: Any, state: BlockDiffusionState, logits: jax.Array, first: jax.Array, rows: jax.Array) -> BlockDiffusionState:
        """Let the rule unmask in the current sub-block of `rows`, from logits [B, T, V] predicting block offsets
        first [B] + t; then emit a completed block."""
        # the current sub-block's window: its block offsets, and which logit predicts each (token shift)
        sub, length = self.sub_block_size, logits.shape[1]
        window = self._current_sub_block(model, state)[:, None] * sub + jnp.arange(sub, dtype=jnp.int32)[None, :]  # [B, sub]
        index = window - first[:, None]  # [B, sub]
        window_logits = jnp.take_along_axis(logits, jnp.clip(index, 0, length - 1)[:, :, None], axis=1)  # [B, sub, V]
        slots = state.committed[:, None] + window  # [B, sub]
        predicted, confidence = unmasking.predict(
            window_logits[:, None], slots, state.decided[:, None], state.temperature, state.key, state.mask_token_id
        )
        to_decide = jnp.take_along_axis(self._to_decide(model, state), jnp.clip(window, 0, self._block_size(model) - 1), axis=1)
        eligible = to_decide & (index >= 0) & (index < length) & (window >= 0) & rows[:, None]
        decision = SubBlockDecision(predicted[:, 0], confidence[:, 0], eligible, slots - state.gen_start[:, None])
        chosen = self.unmasking.select(*decision)
        write = jnp.where(chosen, slots, state.canvas.shape[1])
        batch_rows = jnp.arange(state.canvas.shape[0])[:, None]
        canvas = state.canvas.at[batch_rows, write].set(decision.predicted, mode="drop")
        decided = state.decided + jnp.sum(chosen, axis=1, dtype=jnp.int32)
        state = state.replace(canvas=canvas, decided=decided, last_decision=decision)
        return self._emit_complete(model, state, rows)

    def _emit_complete(self, model: Any, state: BlockDiffusionState, rows: jax.Array) -> BlockDiffusionState:
        """Emit the generated tokens of `rows` whose current block is now fully decided (with `end_of_text`, also
        of rows whose decided prefix already ends them: `emit_decided`)."""
        bs = self._block_size(model)
        complete = rows & ~jnp.any(self._to_decide(model, state), axis=1) & ~state.needs_commit
        first = jnp.maximum(state.committed, state.gen_start)  # the first generated slot of the block
        end = jnp.minimum(state.committed + bs, state.gen_start + state.output.tokens.shape[1])
        offsets = jnp.arange(bs, dtype=jnp.int32)[None, :]
        tokens = jnp.take_along_axis(state.canvas, jnp.minimum(first[:, None] + offsets, state.canvas.shape[1] - 1), axis=1)
        undecided = (tokens == state.mask_token_id) | (offsets >= (end - first)[:, None])
        open_rows = ~state.output.finished & ~state.needs_commit
        output = emit_decided(state.output, tokens, undecided, complete, open_rows, state.stop_tokens, self.end_of_text)
        return state.replace(output=output, needs_commit=state.needs_commit | (complete & ~output.finished))

    def _place_first_token(self, model: Any, state: BlockDiffusionState, logits: jax.Array, rows: jax.Array) -> BlockDiffusionState:
        """Put the token predicted by logits [B, V] at the first position of `rows`' current block."""
        slot = state.committed
        predicted, _ = unmasking.predict(
            logits[:, None, None], slot[:, None], state.decided[:, None], state.temperature, state.key, state.mask_token_id
        )
        in_limit = slot < state.gen_start + state.output.tokens.shape[1]
        place = rows & in_limit
        batch_rows = jnp.arange(state.canvas.shape[0])
        canvas = state.canvas.at[batch_rows, jnp.where(place, slot, state.canvas.shape[1])].set(predicted[:, 0, 0], mode="drop")
        state = state.replace(canvas=canvas, decided=state.decided + place)
        return self._emit_complete(model, state, place)

    def _count_forward(self, model: Any, state: BlockDiffusionState, rows: jax.Array) -> jax.Array:
        bs = self._block_size(model)
        max_blocks = state.block_forwards.shape[1]
        index = jnp.clip((state.committed - (state.gen_start // bs) * bs) // bs, 0, max_blocks - 1)
        return state.block_forwards + jax.nn.one_hot(index, max_blocks, dtype=jnp.int32) * rows[:, None]


def check_sub_block_rule(rule: Any) -> None:
    """A rule block_diffusion can apply: one that decides from one forward's predictions of the current state."""
    rule = unmasking.choose_policy("unmasking", rule, {}, UnmaskingRule)
    if rule.num_branches != 1 or rule.drafts_from_kept_predictions:
        raise ArgumentError(
            f"unmasking: block_diffusion decides each sub-block from one forward of its current state; "
            f"{type(rule).__name__} runs drafted branches (use 'threshold', 'static' or 'learn2pd')"
        )


def block_diffusion(
    *,
    block_size: int | None = None,
    sub_block_size: int = 8,
    cache: str | BlockDiffusionCache = "block",
    unmasking: str | UnmaskingRule = "threshold",
    threshold: Any = None,
    filter: Any = "demo-code-bd",
    temperature: Any = 0.0,
    end_of_text: bool = True,
) -> BlockDiffusion:
    """Fast-dLLM v2 block-diffusion decoding (see the module docstring). unmasking: "threshold" | "static" |
    "learn2pd" or a rule object; threshold: the "threshold" rule's confidence threshold (None: 0.9) or the
    "learn2pd" rule's filter-score threshold (None: unmasking.LEARN2PD_THRESHOLD, 0.99); filter: the "learn2pd" rule's (a model
    name whose filter is shipped, a .safetensors filter file, or an `UnmaskingFilter`)."""
    rule = unmasking_rule(unmasking, threshold=threshold, filter=filter)
    check_sub_block_rule(rule)
    options = dict(temperature=temperature, end_of_text=end_of_text)
    return BlockDiffusion(block_size=block_size, sub_block_size=sub_block_size, cache=block_diffusion_cache(cache), unmasking=rule, **options)


register_strategy("block_diffusion", block_diffusion)
