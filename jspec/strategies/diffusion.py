"""Masked-diffusion LM decoding (LLaDA / Dream models): static, threshold-parallel (Fast-dLLM v1) and FreeDave.

Layout. Row b's canvas [W] holds its prompt at slots [0, P_b), its max_new_tokens = N generated positions at
[P_b, P_b + N) (mask tokens until decided), then padding; a token's position is its slot. The generated
region is split into blocks of `block_size` decided left to right (LLaDA's semi-autoregressive blocks): a step
only unmasks positions of the row's current block; a completed block is emitted, and a stop token in it ends
the row there (the block's later positions are dropped). Rows move through blocks independently.

Unmasking rules (`unmasking`: a name, or one of the policy objects of jspec/strategies/unmasking.py):
- "static" (`StaticUnmasking`): one position per forward, the most confident masked one of the block
  (low-confidence remasking).
- "threshold" (`ThresholdUnmasking`): Fast-dLLM v1: every masked position of the block with confidence >
  threshold, and at least the most confident one. threshold = 1 is "static".
- "freedave" (`FreeDaveUnmasking`): FreeDave (arXiv 2510.00294): from the predictions of the current state,
  draft the next `draft_steps` static states (the top-1, top-2, ... most confident positions filled), run all of
  them in ONE forward (each draft a batch row of its own, with the tokens, positions, mask and cache shape of a
  static forward), and accept the longest chain in which each draft is exactly the static step from the previous
  one. The accepted chain is the static trajectory, so the output equals "static" token for token (same key at
  temperature > 0), with fewer forwards; the accepted draft's predictions are the next step's, so no forward is
  wasted. Each draft is computed by the static forward's arithmetic for that state (not packed with the others
  along the sequence, which changes the attention's reductions); only the forward's number of rows differs, so
  this holds in bfloat16 as in float32 where the backend computes a row independently of the batch size, and
  otherwise up to the first near-tie of static decoding at the backend's discrepancy (README).

Attention context (`cache`: a name, or one of the policy objects below):
- "none" (`NoContextCache`): every forward reads the whole canvas bidirectionally (exact).
- "prefix" (`PrefixCache`, Fast-dLLM v1 prefix cache): at a block's first step the whole canvas is run once and
  its keys and values are kept; later steps of the block run only the block and what follows it, reading the
  kept prefix.
- "dual" (`DualCache`, Fast-dLLM v1 dual cache): as "prefix", and the suffix after the block is read from the
  kept values too, so a step runs only the block.
The caches are Fast-dLLM's approximation for models with more than one layer (kept entries do not see later
decisions); with one layer they are exact. Every rule runs with every context mode, and FreeDave equals static
under the same mode.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from jspec import masks, validation
from jspec.cache import Cache
from jspec.strategies import unmasking
from jspec.strategies.base import DecodeOutput, OutputBuffer, Prompts, register_strategy, run_either, static_field
from jspec.strategies.unmasking import LEARN2PD_THRESHOLD, THRESHOLD, StaticUnmasking, UnmaskingRule, unmasking_rule
from jspec.validation import ArgumentError

# --- attention context ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ContextCache:
    """What a masked-diffusion forward reads besides the tokens it runs. A live forward writes each branch's
    entries at cache slots [kept_slots, kept_slots + span_length) of that branch's copy of the row (scratch, read
    only inside the forward); a whole-canvas forward rebuilds the kept context at slots [0, kept_slots)."""

    carries_predictions: ClassVar[bool] = False  # a block-completing forward also predicts the next block

    def span_length(self, width: int, max_new_tokens: int, block_size: int, shifted: int) -> int:
        """Tokens a live forward runs per branch (static)."""
        raise NotImplementedError

    def kept_slots(self, width: int) -> int:
        """Cache slots of the kept context (static)."""
        raise NotImplementedError

    def live_view(
        self,
        block_start: jax.Array,  # [B] int32: slot of the current block's first position
        block_size: int,
        gen_end: jax.Array,  # [B] int32: slot after the last generated position
        width: int,
        shifted: int,  # 1 for token-shift models (the token before the block predicts its first position)
    ) -> tuple[jax.Array, jax.Array | None]:  # span_start [B] int32, context [B, W] bool (None: nothing kept)
        """Where a live forward's span starts and which kept slots every query reads."""
        raise NotImplementedError

    def outdated_rows(self, state: MaskedDiffusionState) -> jax.Array | None:  # [B] bool
        """Rows whose kept context is from an earlier block (None: nothing is kept, nothing goes stale)."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class NoContextCache(ContextCache):
    """Every forward runs the whole canvas (exact); nothing is kept, and a forward that completes a block has
    already predicted the next one."""

    carries_predictions: ClassVar[bool] = True

    def span_length(self, width: int, max_new_tokens: int, block_size: int, shifted: int) -> int:
        return width

    def kept_slots(self, width: int) -> int:
        return 0

    def live_view(self, block_start, block_size, gen_end, width, shifted):
        return jnp.zeros_like(block_start), None

    def outdated_rows(self, state: MaskedDiffusionState) -> None:
        return None


@dataclasses.dataclass(frozen=True)
class PrefixCache(ContextCache):
    """Fast-dLLM v1 prefix cache: the canvas's keys/values are kept from the block's first step; a live forward
    runs the block and everything after it over the kept prefix."""

    def span_length(self, width: int, max_new_tokens: int, block_size: int, shifted: int) -> int:
        return max_new_tokens + shifted

    def kept_slots(self, width: int) -> int:
        return width

    def live_view(self, block_start, block_size, gen_end, width, shifted):
        span_start = block_start - shifted
        return span_start, jnp.arange(width, dtype=jnp.int32)[None, :] < span_start[:, None]

    def outdated_rows(self, state: MaskedDiffusionState) -> jax.Array:
        return state.cache_block != state.block


@dataclasses.dataclass(frozen=True)
class DualCache(PrefixCache):
    """Fast-dLLM v1 dual cache: as `PrefixCache`, and the generated suffix after the block is read from the kept
    entries too, so a live forward runs only the block."""

    def span_length(self, width: int, max_new_tokens: int, block_size: int, shifted: int) -> int:
        return block_size + shifted

    def live_view(self, block_start, block_size, gen_end, width, shifted):
        span_start, prefix = super().live_view(block_start, block_size, gen_end, width, shifted)
        slots = jnp.arange(width, dtype=jnp.int32)[None, :]
        suffix = (slots >= (block_start + block_size)[:, None]) & (slots < gen_end[:, None])
        return span_start, prefix | suffix



CONTEXT_CACHES = {"none": NoContextCache, "prefix": PrefixCache, "dual": DualCache}


def context_cache(cache: str | ContextCache) -> ContextCache:
    """The context mode a user option names, or the mode object itself."""
    return unmasking.choose_policy("cache", cache, CONTEXT_CACHES, ContextCache)


# --- emitting ------------------------------------------------------------------------------------------


def emit_decided(
    output: OutputBuffer,
    block: jax.Array,  # [B, T] int32: each row's current block from its first generated position
    undecided: jax.Array,  # [B, T] bool: its positions still to decide, and those past the row's last one
    complete: jax.Array,  # [B] bool: rows whose block is fully decided: emitted up to their first undecided position
    open_rows: jax.Array,  # [B] bool: running rows whose current block is not emitted yet
    stop_tokens: jax.Array,  # [B, K] int32
    end_of_text: bool,
) -> OutputBuffer:
    """Emit the complete blocks; with `end_of_text` (End-of-Text Prediction, Learn2PD), also the decided prefix
    (the positions before the first undecided one) of every other open row's block where emitting it ends the
    row (a stop token or stop string in it, or the length limit). Lossless: the emitted tokens are decided and a
    decided position never changes, so the row emits exactly what it would emit once the block completes (the
    buffer stops at the first stop either way); the forwards the rest of the block would cost are saved."""
    length = block.shape[1]
    prefix = jnp.where(jnp.any(undecided, axis=1), jnp.argmax(undecided, axis=1), length).astype(jnp.int32)  # [B]
    emitting = complete
    if end_of_text:
        emitting = complete | (output.append(block, jnp.where(open_rows, prefix, 0), stop_tokens).finished & open_rows)
    return output.append(block, jnp.where(emitting, prefix, 0), stop_tokens)


# --- the decoder ---------------------------------------------------------------------------------------


@struct.dataclass
class MaskedDiffusionState:
    canvas: jax.Array  # [B, W] int32: prompt, generated positions (mask token until decided), padding
    gen_start: jax.Array  # [B] int32: slot of the first generated position (= prompt length)
    block: jax.Array  # [B] int32: the row's current block
    cache: Cache  # kept context (prefix / dual) at slots [0, W), then one span of scratch slots
    cache_block: jax.Array  # [B] int32: the block the kept context was computed at (-1: none)
    predicted: jax.Array  # [B, 2 * block_size] int32: predictions for the current block and the next (FreeDave)
    confidence: jax.Array  # [B, 2 * block_size] float32
    predictions_valid: jax.Array  # [B] bool: predicted/confidence describe the current canvas
    decided: jax.Array  # [B] int32: generated positions decided so far (the static decision index)
    output: OutputBuffer
    stop_tokens: jax.Array  # [B, K]
    temperature: jax.Array  # [B] float32
    key: jax.Array
    step: jax.Array  # [] int32
    model_calls: jax.Array  # [] int32: forward calls
    block_forwards: jax.Array  # [B, num_blocks] int32: forwards each row spent on each block
    committed_histogram: jax.Array  # [num_branches + 1] int32: decisions by accepted branch + 1 (FreeDave: tokens)
    mask_token_id: int = static_field()


@struct.dataclass
class MaskedDiffusion:
    """Decoding for masked-diffusion LMs (config.diffusion == "masked"); see the module docstring.

    unmasking: an `UnmaskingRule` (its traced options, a threshold, do not recompile). block_size (static): must
    divide max_new_tokens. cache (static): a `ContextCache`. temperature: traced, scalar or one per row. The
    registered factories (`masked_diffusion`, `dllm_static`, `dllm_threshold`, `freedave`) take the names.
    """

    name: ClassVar[str] = "masked_diffusion"
    takes_cache_size: ClassVar[bool] = False  # the cache is sized from the canvas (prompts + max_new_tokens)
    unmasking: UnmaskingRule = StaticUnmasking()
    block_size: int = static_field(default=32)
    cache: ContextCache = static_field(default=NoContextCache())
    temperature: Any = 0.0
    end_of_text: bool = static_field(default=True)

    # --- contract -------------------------------------------------------------------------------------

    def validate(self, model: Any, prompts: Prompts) -> None:
        rule = unmasking.choose_policy("unmasking", self.unmasking, {}, UnmaskingRule)
        unmasking.choose_policy("cache", self.cache, {}, ContextCache)
        unmasking.check_positive_int("block_size", self.block_size)
        if prompts.max_new_tokens % self.block_size:
            raise ArgumentError(
                f"block_size: {self.block_size} does not divide max_new_tokens={prompts.max_new_tokens}; masked-diffusion "
                "decoding fills whole blocks (choose max_new_tokens as a multiple of block_size)"
            )
        unmasking.check_diffusion_model(model, "masked", rule.strategy_name)
        unmasking.check_options(prompts, self.temperature)
        validation.check_bool("end_of_text", self.end_of_text)
        rule.validate(model.config, prompts)

    def cache_headroom(self) -> int:
        return 0

    def init(self, model: Any, prompts: Prompts, key: jax.Array) -> MaskedDiffusionState:
        batch, prompt_width = prompts.tokens.shape
        width = prompt_width + prompts.max_new_tokens
        slots = jnp.arange(width, dtype=jnp.int32)[None, :]
        gen_start = prompts.lengths
        padded = jnp.pad(prompts.tokens, ((0, 0), (0, prompts.max_new_tokens)))
        mask_id = model.config.mask_token_id
        generated = (slots >= gen_start[:, None]) & (slots < (gen_start + prompts.max_new_tokens)[:, None])
        canvas = jnp.where(slots < gen_start[:, None], padded, jnp.where(generated, mask_id, model.config.pad_token_id))
        num_blocks = prompts.max_new_tokens // self.block_size
        window = 2 * self.block_size
        shifted = int(model.config.shifted_logits)
        span_length = self.cache.span_length(width, prompts.max_new_tokens, self.block_size, shifted)
        capacity = self.cache.kept_slots(width) + span_length  # the same for every rule (branches are batch rows)
        return MaskedDiffusionState(
            canvas=canvas.astype(jnp.int32),
            gen_start=gen_start,
            block=jnp.zeros((batch,), jnp.int32),
            cache=model.new_cache(batch, capacity),
            cache_block=jnp.full((batch,), -1, jnp.int32),
            predicted=jnp.zeros((batch, window), jnp.int32),
            confidence=jnp.zeros((batch, window), jnp.float32),
            predictions_valid=jnp.zeros((batch,), bool),
            decided=jnp.zeros((batch,), jnp.int32),
            output=OutputBuffer.create(batch, prompts.max_new_tokens),
            stop_tokens=prompts.stop_tokens,
            temperature=unmasking.per_row(self.temperature, batch),
            key=key,
            step=jnp.int32(0),
            model_calls=jnp.int32(0),
            block_forwards=jnp.zeros((batch, num_blocks), jnp.int32),
            committed_histogram=jnp.zeros((self.unmasking.num_branches + 1,), jnp.int32),
            mask_token_id=mask_id,
        )

    def step(self, model: Any, state: MaskedDiffusionState) -> MaskedDiffusionState:
        """Rows with a stale kept context or missing kept predictions run a whole-canvas refresh; otherwise every
        running row runs a live forward of the rule's branches and accepts one."""
        stale = self._stale_rows(state)
        if stale is None:
            state = self._live_step(model, state)
        else:
            refresh = lambda s: self._refresh(model, s, stale)  # noqa: E731
            state = run_either(jnp.any(stale), refresh, lambda s: self._live_step(model, s), state)
        return state.replace(step=state.step + 1)

    def done(self, state: MaskedDiffusionState) -> jax.Array:
        return state.output.finished

    def output(self, state: MaskedDiffusionState) -> DecodeOutput:
        return unmasking.decode_output(state, **self.unmasking.stats(state.committed_histogram))

    # --- layout -----------------------------------------------------------------------------------------

    def _block_start(self, state: MaskedDiffusionState) -> jax.Array:  # [B]
        return state.gen_start + state.block * self.block_size

    def _block_slots(self, state: MaskedDiffusionState) -> jax.Array:  # [B, block_size]
        """The current block's slots (clipped into the canvas for rows past their last block)."""
        slots = self._block_start(state)[:, None] + jnp.arange(self.block_size, dtype=jnp.int32)[None, :]
        return jnp.minimum(slots, state.canvas.shape[1] - 1)

    def _gen_end(self, state: MaskedDiffusionState) -> jax.Array:  # [B]
        return state.gen_start + state.output.tokens.shape[1]

    def _current_block(self, state: MaskedDiffusionState) -> tuple[jax.Array, jax.Array]:  # [B, bs] int32, bool
        """The current block's tokens and its positions still to decide."""
        block = jnp.take_along_axis(state.canvas, self._block_slots(state), axis=1)
        return block, block == state.mask_token_id

    def _stale_rows(self, state: MaskedDiffusionState) -> jax.Array | None:  # [B] bool
        """Running rows whose next forward must run the whole canvas: their kept context is from an earlier
        block, or their rule drafts from kept predictions and has none of the current state. None: never."""
        stale = self.cache.outdated_rows(state)
        if self.unmasking.drafts_from_kept_predictions:
            stale = ~state.predictions_valid if stale is None else stale | ~state.predictions_valid
        return None if stale is None else stale & ~state.output.finished

    # --- forwards ---------------------------------------------------------------------------------------

    def _forward(
        self,
        model: Any,
        state: MaskedDiffusionState,
        spans: jax.Array,  # [B, K, L] int32: each branch's tokens
        span_start: jax.Array,  # [B] int32: slot of each span's first token
        context: jax.Array | None,  # [B, W] bool: kept slots every query reads (None: none)
        write_base: int,  # cache slot of each span's first token
        writing: jax.Array,  # [B] bool: rows whose entries are written (others' writes are dropped)
        decided: jax.Array,  # [B, K] int32: each branch's decision index (sampling noise)
    ) -> tuple[jax.Array, jax.Array, Cache]:  # predicted [B, K, 2bs], confidence [B, K, 2bs], cache [B K rows]
        """One model call in which each of the K branches is a batch row of its own (row b * K + k: row b's
        span with branch k's tokens, over a copy of row b's cache): every branch runs with the tokens, positions,
        mask and cache shape of a one-branch (static) forward, so it is computed as the static decoder computes
        that state. Predictions for the window [block start, + 2 * block_size); the cache comes back with B * K
        rows (B when K = 1)."""
        batch, branches, length = spans.shape
        rows = jnp.repeat(jnp.arange(batch, dtype=jnp.int32), branches)  # [B K]: the row each branch row copies
        cache = state.cache if branches == 1 else state.cache.gather_rows(rows)
        capacity = cache.capacity
        offsets = jnp.arange(length, dtype=jnp.int32)
        span_slots = span_start[:, None] + offsets[None, :]  # [B, L]
        in_sequence = span_slots < self._gen_end(state)[:, None]  # [B, L]
        write_slots = jnp.where(writing[:, None], write_base + offsets[None, :], capacity)  # [B, L]
        visible = masks.span_and_context_mask(in_sequence, write_base, capacity, context)  # [B, L, S]

        window = 2 * self.block_size
        window_index = self._block_start(state)[:, None] - span_start[:, None] + jnp.arange(window, dtype=jnp.int32)[None, :]
        shifted = int(model.config.shifted_logits)
        logit_index = jnp.clip(window_index - shifted, 0, length - 1)  # [B, 2bs]: the logits predicting each
        per_branch = lambda x: x[rows]  # noqa: E731  # [B, ...] -> [B K, ...]
        logits, cache = model.forward(
            spans.reshape(batch * branches, length), per_branch(span_slots), cache, per_branch(visible),
            write_slots=per_branch(write_slots), output_indices=per_branch(logit_index),
        )
        logits = logits.reshape(batch, branches, window, -1)
        window_slots = self._block_start(state)[:, None] + jnp.arange(window, dtype=jnp.int32)[None, :]
        predicted, confidence = unmasking.predict(logits, window_slots, decided, state.temperature, state.key, model.config.mask_token_id)
        return predicted, confidence, cache

    def _refresh(self, model: Any, state: MaskedDiffusionState, rows: jax.Array) -> MaskedDiffusionState:
        """Run the whole canvas for `rows`, rebuilding their kept context and keeping its predictions; then,
        unless the rule drafts from kept predictions (its next step uses them), decide from them."""
        batch, width = state.canvas.shape
        predicted, confidence, cache = self._forward(
            model, state, state.canvas[:, None, :], jnp.zeros((batch,), jnp.int32), None, 0, rows, state.decided[:, None]
        )
        keep = rows[:, None]
        state = state.replace(
            cache=cache,
            cache_block=jnp.where(rows, state.block, state.cache_block),
            model_calls=state.model_calls + 1,
            block_forwards=self._count_forward(state, rows),
            predicted=jnp.where(keep, predicted[:, 0], state.predicted),
            confidence=jnp.where(keep, confidence[:, 0], state.confidence),
            predictions_valid=state.predictions_valid | rows,
        )
        if self.unmasking.drafts_from_kept_predictions:
            return state
        block, _ = self._current_block(state)
        return self._accept(state, rows, block[:, None, :], predicted, confidence)

    def _live_spans(
        self, model: Any, state: MaskedDiffusionState, blocks: jax.Array  # blocks [B, K, bs]
    ) -> tuple[jax.Array, jax.Array, jax.Array | None, int]:  # spans [B, K, L], span_start [B], context, write base
        """The tokens each branch runs (the canvas with the branch's block in place, cut to the context mode's
        span) and the kept context they read."""
        batch, width = state.canvas.shape
        rows = jnp.arange(batch)[:, None, None]
        branches = jnp.arange(blocks.shape[1])[None, :, None]
        canvases = jnp.broadcast_to(state.canvas[:, None, :], (batch, blocks.shape[1], width))
        canvases = canvases.at[rows, branches, self._block_slots(state)[:, None, :]].set(blocks, mode="drop")
        shifted = int(model.config.shifted_logits)
        length = self.cache.span_length(width, state.output.tokens.shape[1], self.block_size, shifted)
        block_start, gen_end = self._block_start(state), self._gen_end(state)
        span_start, context = self.cache.live_view(block_start, self.block_size, gen_end, width, shifted)
        span_slots = jnp.clip(span_start[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :], 0, width - 1)
        spans = jnp.take_along_axis(canvases, jnp.broadcast_to(span_slots[:, None, :], (batch, blocks.shape[1], length)), axis=2)
        return spans, span_start, context, self.cache.kept_slots(width)

    def _live_step(self, model: Any, state: MaskedDiffusionState) -> MaskedDiffusionState:
        """One forward of the rule's branches for every running row (context from the kept cache); accept one."""
        running = ~state.output.finished
        bs = self.block_size
        block, masked = self._current_block(state)
        blocks, ahead = self.unmasking.branches(block, masked, state.predicted[:, :bs], state.confidence[:, :bs])
        spans, span_start, context, base = self._live_spans(model, state, blocks)
        decided = state.decided[:, None] + ahead[None, :]  # [B, K]
        # the branches' entries are scratch (read only inside this forward): the kept context stays as it is
        predicted, confidence, _ = self._forward(model, state, spans, span_start, context, base, running, decided)
        state = state.replace(model_calls=state.model_calls + 1, block_forwards=self._count_forward(state, running))
        return self._accept(state, running, blocks, predicted, confidence)

    # --- decisions --------------------------------------------------------------------------------------

    def _accept(
        self,
        state: MaskedDiffusionState,
        rows: jax.Array,  # [B] bool: rows whose forward ran
        blocks: jax.Array,  # [B, K, bs] int32: the branches that ran
        predicted: jax.Array,  # [B, K, 2bs] int32: their predictions
        confidence: jax.Array,  # [B, K, 2bs] float32
    ) -> MaskedDiffusionState:
        """Let the rule decide in the current block of `rows`; keep the accepted branch's predictions; emit
        completed blocks."""
        bs = self.block_size
        block, masked = self._current_block(state)
        kept = state.predicted[:, :bs], state.confidence[:, :bs]
        positions = (state.block * bs)[:, None] + jnp.arange(bs, dtype=jnp.int32)[None, :]  # [B, bs] generated positions
        accepted = self.unmasking.accept(block, masked, blocks, *kept, predicted[..., :bs], confidence[..., :bs], positions)
        committed = jnp.where(rows, accepted.committed, 0)
        histogram_index = jnp.where(rows, accepted.branch + 1, 0)
        pick = accepted.branch[:, None, None]
        keep = rows[:, None]
        state = state.replace(
            canvas=self._write_block(state, jnp.where(keep, accepted.block, block)),
            decided=state.decided + committed,
            predicted=jnp.where(keep, jnp.take_along_axis(predicted, pick, axis=1)[:, 0], state.predicted),
            confidence=jnp.where(keep, jnp.take_along_axis(confidence, pick, axis=1)[:, 0], state.confidence),
            committed_histogram=state.committed_histogram.at[histogram_index].add(rows.astype(jnp.int32)),
        )
        return self._finish_blocks(state)

    def _finish_blocks(self, state: MaskedDiffusionState) -> MaskedDiffusionState:
        """Emit completed blocks (stop tokens end a row there) and move those rows to their next block, with the
        kept predictions for it; they stay valid where the context mode carries predictions over, otherwise the
        next block starts with a refresh. With `end_of_text`, a row whose decided prefix of the current block
        already ends it (a stop token, or the length limit) is emitted and ends now (see `emit_decided`)."""
        running = ~state.output.finished
        block, masked = self._current_block(state)
        complete = running & ~jnp.any(masked, axis=1)
        output = emit_decided(state.output, block, masked, complete, running, state.stop_tokens, self.end_of_text)
        bs = self.block_size
        next_block = lambda window: jnp.concatenate([window[:, bs:], window[:, bs:]], axis=1)  # noqa: E731
        advance = complete[:, None]
        return state.replace(
            output=output,
            block=state.block + complete,
            predicted=jnp.where(advance, next_block(state.predicted), state.predicted),
            confidence=jnp.where(advance, next_block(state.confidence), state.confidence),
            predictions_valid=jnp.where(complete, self.cache.carries_predictions, state.predictions_valid),
        )

    # --- small helpers ----------------------------------------------------------------------------------

    def _write_block(self, state: MaskedDiffusionState, block: jax.Array) -> jax.Array:  # block [B, bs] -> canvas
        rows = jnp.arange(state.canvas.shape[0])[:, None]
        return state.canvas.at[rows, self._block_slots(state)].set(block, mode="drop")

    def _count_forward(self, state: MaskedDiffusionState, rows: jax.Array) -> jax.Array:
        num_blocks = state.block_forwards.shape[1]
        index = jnp.clip(state.block, 0, num_blocks - 1)[:, None]
        return state.block_forwards + (jax.nn.one_hot(index[:, 0], num_blocks, dtype=jnp.int32) * rows[:, None])


def masked_diffusion(
    *,
    unmasking: str | UnmaskingRule = "static",
    block_size: int = 32,
    cache: str | ContextCache = "none",
    draft_steps: int = 8,
    temperature: Any = 0.0,
    threshold: Any = None,
    filter: Any = "demo-code-dllm",
    end_of_text: bool = True,
) -> MaskedDiffusion:
    """Masked-diffusion decoding with a named (or given) unmasking rule and context mode; `threshold` is the
    "threshold" and "learn2pd" rules' (None: their defaults, 0.9 and 0.99), `draft_steps` the "freedave" rule's,
    `filter` the "learn2pd" rule's.
    end_of_text: end a row once its decided tokens contain a stop (lossless; see `emit_decided`)."""
    rule = unmasking_rule(unmasking, threshold=threshold, draft_steps=draft_steps, filter=filter)
    options = dict(block_size=block_size, cache=context_cache(cache), temperature=temperature, end_of_text=end_of_text)
    return MaskedDiffusion(unmasking=rule, **options)


def dllm_static(
    *, block_size: int = 32, cache: str | ContextCache = "none", temperature: Any = 0.0, end_of_text: bool = True
) -> MaskedDiffusion:
    """One token per forward: the most confident masked position of the current block."""
    options = dict(block_size=block_size, cache=cache, temperature=temperature, end_of_text=end_of_text)
    return masked_diffusion(unmasking="static", **options)


def dllm_threshold(
    *, threshold: Any = THRESHOLD, block_size: int = 32, cache: str | ContextCache = "none", temperature: Any = 0.0,
    end_of_text: bool = True,
) -> MaskedDiffusion:
    """Fast-dLLM v1 parallel decoding: every masked position above `threshold` (and at least one) per forward."""
    options = dict(block_size=block_size, cache=cache, temperature=temperature, end_of_text=end_of_text)
    return masked_diffusion(unmasking="threshold", threshold=threshold, **options)


def freedave(
    *, draft_steps: int = 8, block_size: int = 32, cache: str | ContextCache = "none", temperature: Any = 0.0,
    end_of_text: bool = True,
) -> MaskedDiffusion:
    """FreeDave lossless parallel decoding: the output of dllm_static with fewer forwards."""
    options = dict(block_size=block_size, cache=cache, temperature=temperature, end_of_text=end_of_text)
    return masked_diffusion(unmasking="freedave", draft_steps=draft_steps, **options)


def dllm_learn2pd(
    *, threshold: Any = LEARN2PD_THRESHOLD, filter: Any = "demo-code-dllm", block_size: int = 32,
    cache: str | ContextCache = "none", temperature: Any = 0.0, end_of_text: bool = True,
) -> MaskedDiffusion:
    """Learn2PD parallel decoding: every masked position a learned filter scores above `threshold` (and at least
    the most confident one) per forward. filter: a model name whose filter is shipped, a .safetensors filter
    file, or an `UnmaskingFilter`; threshold 1 is dllm_static."""
    options = dict(block_size=block_size, cache=cache, temperature=temperature, end_of_text=end_of_text)
    return masked_diffusion(unmasking="learn2pd", threshold=threshold, filter=filter, **options)


register_strategy("dllm_static", dllm_static)
register_strategy("dllm_threshold", dllm_threshold)
register_strategy("freedave", freedave)
register_strategy("dllm_learn2pd", dllm_learn2pd)
register_strategy("masked_diffusion", masked_diffusion)
