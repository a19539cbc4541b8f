"""Masked-diffusion LM decoding (LLaDA / Dream models): static, threshold-parallel (Fast-dLLM v1) and FreeDave.

Layout. Row b's canvas [W] holds its prompt at slots [0, P_b), its max_new_tokens = N generated positions at
[P_b, P_b + N) (mask tokens until decided), then padding; a token's position is its slot. The generated
region is split into blocks of `block_size` decided left to right (LLaDA's semi-autoregressive blocks): a step
only unmasks positions of the row's current block; a completed block is emitted, and a stop token in it ends
the row there (the block's later positions are dropped). Rows move through blocks independently.

Unmasking rules (`unmasking`):
- "static": one position per forward, the most confident masked one of the block (low-confidence remasking).
- "threshold": Fast-dLLM v1: every masked position of the block with confidence > threshold, and at least the
  most confident one. threshold = 1 is "static".
- "freedave": FreeDave (arXiv 2510.00294): from the predictions of the current state, draft the next
  `draft_steps` static states (the top-1, top-2, ... most confident positions filled), run all of them in ONE
  forward (packed as branches: each reads the shared context and only its own branch), and accept the longest
  chain in which each draft is exactly the static step from the previous one. The accepted chain is the static
  trajectory, so the output equals "static" token for token (same key at temperature > 0), with fewer forwards;
  the accepted draft's predictions are the next step's, so no forward is wasted.

Attention context (`cache`):
- "none": every forward reads the whole canvas bidirectionally (exact).
- "prefix" (Fast-dLLM v1 prefix cache): at a block's first step the whole canvas is run once and its keys and
  values are kept; later steps of the block run only the block and what follows it, reading the kept prefix.
- "dual" (Fast-dLLM v1 dual cache): as "prefix", and the suffix after the block is read from the kept values
  too, so a step runs only the block.
The caches are Fast-dLLM's approximation for models with more than one layer (kept entries do not see later
decisions); with one layer they are exact. Every rule runs with every context mode, and FreeDave equals static
under the same mode.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from jspec import masks
from jspec.cache import KVCache
from jspec.models.transformer import position_logits
from jspec.strategies import unmasking
from jspec.strategies.base import DecodeOutput, OutputBuffer, Prompts, register_strategy, static_field

UNMASKING_RULES = ("static", "threshold", "freedave")
CACHE_MODES = ("none", "prefix", "dual")


@struct.dataclass
class MaskedDiffusionState:
    canvas: jax.Array  # [B, W] int32: prompt, generated positions (mask token until decided), padding
    gen_start: jax.Array  # [B] int32: slot of the first generated position (= prompt length)
    block: jax.Array  # [B] int32: the row's current block
    cache: KVCache  # kept context (prefix / dual) at slots [0, W), then branch scratch slots
    cache_block: jax.Array  # [B] int32: the block the kept context was computed at (-1: none)
    predicted: jax.Array  # [B, 2 * block_size] int32: predictions for the current block and the next (FreeDave)
    confidence: jax.Array  # [B, 2 * block_size] float32
    predictions_valid: jax.Array  # [B] bool: predicted/confidence describe the current canvas
    decided: jax.Array  # [B] int32: generated positions decided so far (the static decision index)
    output: OutputBuffer
    stop_tokens: jax.Array  # [B, K]
    temperature: jax.Array  # [B] float32
    threshold: jax.Array  # [B] float32
    key: jax.Array
    step: jax.Array  # [] int32
    model_calls: jax.Array  # [] int32: forward calls
    block_forwards: jax.Array  # [B, num_blocks] int32: forwards each row spent on each block
    committed_histogram: jax.Array  # [draft_steps + 1] int32: FreeDave verifications by tokens committed
    mask_token_id: int = static_field()


@struct.dataclass
class MaskedDiffusion:
    """Decoding for masked-diffusion LMs (config.diffusion == "masked"); see the module docstring.

    block_size (static): must divide max_new_tokens. cache (static): "none" | "prefix" | "dual".
    draft_steps (static, "freedave"): drafts verified per forward. temperature, threshold: traced, scalar or
    one per row (changing them does not recompile).
    """

    name: ClassVar[str] = "masked_diffusion"
    unmasking: str = static_field(default="static")
    block_size: int = static_field(default=32)
    cache: str = static_field(default="none")
    draft_steps: int = static_field(default=8)
    temperature: Any = 0.0
    threshold: Any = 0.9

    # --- contract -------------------------------------------------------------------------------------

    def validate(self, model: Any, prompts: Prompts) -> None:
        strategy = {"static": "dllm_static", "threshold": "dllm_threshold", "freedave": "freedave"}.get(self.unmasking, self.name)
        if self.unmasking not in UNMASKING_RULES:
            raise ValueError(f"unmasking: expected one of {UNMASKING_RULES}, got {self.unmasking!r}")
        if self.cache not in CACHE_MODES:
            raise ValueError(f"cache: expected one of {CACHE_MODES}, got {self.cache!r}")
        unmasking.check_positive_int("block_size", self.block_size)
        unmasking.check_positive_int("draft_steps", self.draft_steps)
        if prompts.max_new_tokens % self.block_size:
            raise ValueError(
                f"block_size: {self.block_size} does not divide max_new_tokens={prompts.max_new_tokens}; masked-diffusion "
                "decoding fills whole blocks (choose max_new_tokens as a multiple of block_size)"
            )
        unmasking.check_diffusion_model(model, "masked", strategy)
        unmasking.check_options(prompts, self.temperature, self.threshold if self.unmasking == "threshold" else None)

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
        return MaskedDiffusionState(
            canvas=canvas.astype(jnp.int32),
            gen_start=gen_start,
            block=jnp.zeros((batch,), jnp.int32),
            cache=model.new_cache(batch, self._capacity(model, width, prompts.max_new_tokens)),
            cache_block=jnp.full((batch,), -1, jnp.int32),
            predicted=jnp.zeros((batch, window), jnp.int32),
            confidence=jnp.zeros((batch, window), jnp.float32),
            predictions_valid=jnp.zeros((batch,), bool),
            decided=jnp.zeros((batch,), jnp.int32),
            output=OutputBuffer.create(batch, prompts.max_new_tokens),
            stop_tokens=prompts.stop_tokens,
            temperature=unmasking.per_row(self.temperature, batch),
            threshold=unmasking.per_row(self.threshold if self.unmasking == "threshold" else 1.0, batch),
            key=key,
            step=jnp.int32(0),
            model_calls=jnp.int32(0),
            block_forwards=jnp.zeros((batch, num_blocks), jnp.int32),
            committed_histogram=jnp.zeros((self._branches + 1,), jnp.int32),
            mask_token_id=mask_id,
        )

    def step(self, model: Any, state: MaskedDiffusionState) -> MaskedDiffusionState:
        running = ~state.output.finished
        if self.unmasking == "freedave":
            stale = running & ~state.predictions_valid
            state = jax.lax.cond(jnp.any(stale), lambda s: self._refresh(model, s, stale, act=False), lambda s: self._verify_drafts(model, s), state)
        elif self.cache == "none":
            state = self._refresh(model, state, running, act=True)
        else:
            stale = running & (state.cache_block != state.block)
            state = jax.lax.cond(jnp.any(stale), lambda s: self._refresh(model, s, stale, act=True), lambda s: self._live_step(model, s), state)
        return state.replace(step=state.step + 1)

    def done(self, state: MaskedDiffusionState) -> jax.Array:
        return state.output.finished

    def output(self, state: MaskedDiffusionState) -> DecodeOutput:
        extra = {"committed_histogram": state.committed_histogram} if self.unmasking == "freedave" else {}
        return unmasking.decode_output(state, **extra)

    # --- layout -----------------------------------------------------------------------------------------

    @property
    def _branches(self) -> int:
        return self.draft_steps if self.unmasking == "freedave" else 1

    def _span_length(self, model: Any, width: int, max_new_tokens: int) -> int:
        """Tokens a live forward runs per branch: the whole canvas, or the block (and for "prefix" what
        follows it) plus, for shifted-logit models, the token before the block."""
        shifted = int(model.config.shifted_logits)
        return {"none": width, "prefix": max_new_tokens + shifted, "dual": self.block_size + shifted}[self.cache]

    def _capacity(self, model: Any, width: int, max_new_tokens: int) -> int:
        kept = 0 if self.cache == "none" else width
        return kept + self._branches * self._span_length(model, width, max_new_tokens)

    def _block_start(self, state: MaskedDiffusionState) -> jax.Array:  # [B]
        return state.gen_start + state.block * self.block_size

    def _block_slots(self, state: MaskedDiffusionState) -> jax.Array:  # [B, block_size]
        """The current block's slots (clipped into the canvas for rows past their last block)."""
        slots = self._block_start(state)[:, None] + jnp.arange(self.block_size, dtype=jnp.int32)[None, :]
        return jnp.minimum(slots, state.canvas.shape[1] - 1)

    def _gen_end(self, state: MaskedDiffusionState) -> jax.Array:  # [B]
        return state.gen_start + state.output.tokens.shape[1]

    # --- forwards ---------------------------------------------------------------------------------------

    def _forward(
        self,
        model: Any,
        state: MaskedDiffusionState,
        spans: jax.Array,  # [B, K, L] int32: each branch's tokens
        span_start: jax.Array,  # [B] int32: slot of each span's first token
        context: jax.Array | None,  # [B, W] bool: kept slots every query reads (None: none)
        write_base: int,  # cache slot of branch 0's first token
        writing: jax.Array,  # [B] bool: rows whose entries are written (others' writes are dropped)
        decided: jax.Array,  # [B, K] int32: each branch's decision index (sampling noise)
    ) -> tuple[jax.Array, jax.Array, KVCache]:  # predicted [B, K, 2bs], confidence [B, K, 2bs], cache
        """One model call over K packed branches; predictions for the window [block start, + 2 * block_size)."""
        cache = state.cache
        batch, branches, length = spans.shape
        capacity = cache.capacity
        offsets = jnp.arange(length, dtype=jnp.int32)
        span_slots = span_start[:, None] + offsets[None, :]  # [B, L]
        in_sequence = span_slots < self._gen_end(state)[:, None]  # [B, L]
        tokens = spans.reshape(batch, branches * length)
        positions = jnp.tile(span_slots, (1, branches))
        written = write_base + jnp.arange(branches * length, dtype=jnp.int32)
        write_slots = jnp.where(writing[:, None], written[None, :], capacity)

        visible = masks.packed_branches_mask(branches, in_sequence, write_base, capacity, context)

        window = 2 * self.block_size
        window_index = self._block_start(state)[:, None] - span_start[:, None] + jnp.arange(window, dtype=jnp.int32)[None, :]
        shifted = int(model.config.shifted_logits)
        logit_index = jnp.clip(window_index - shifted, 0, length - 1)  # [B, 2bs]: the logits predicting each
        output_indices = (jnp.arange(branches, dtype=jnp.int32)[None, :, None] * length + logit_index[:, None, :]).reshape(batch, -1)
        logits, cache = model.forward(tokens, positions, cache, visible, write_slots=write_slots, output_indices=output_indices)
        logits = logits.reshape(batch, branches, window, -1)
        window_slots = self._block_start(state)[:, None] + jnp.arange(window, dtype=jnp.int32)[None, :]
        predicted, confidence = unmasking.predict(logits, window_slots, decided, state.temperature, state.key, model.config.mask_token_id)
        return predicted, confidence, cache

    def _refresh(self, model: Any, state: MaskedDiffusionState, rows: jax.Array, act: bool) -> MaskedDiffusionState:
        """Run the whole canvas for `rows` (rebuilding their kept context); then unmask (act) or keep the
        predictions (FreeDave)."""
        batch, width = state.canvas.shape
        predicted, confidence, cache = self._forward(
            model, state, state.canvas[:, None, :], jnp.zeros((batch,), jnp.int32), None, 0, rows, state.decided[:, None]
        )
        state = state.replace(
            cache=cache,
            cache_block=jnp.where(rows, state.block, state.cache_block),
            model_calls=state.model_calls + 1,
            block_forwards=self._count_forward(state, rows),
        )
        if act:
            return self._unmask(state, predicted[:, 0], confidence[:, 0], rows)
        keep = rows[:, None]
        return state.replace(
            predicted=jnp.where(keep, predicted[:, 0], state.predicted),
            confidence=jnp.where(keep, confidence[:, 0], state.confidence),
            predictions_valid=state.predictions_valid | rows,
        )

    def _live_spans(self, model: Any, state: MaskedDiffusionState, blocks: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array | None, int]:
        """The tokens each branch runs, given each branch's block [B, K, bs]: the canvas with the block
        replaced ("none"), or the block with its neighbours ("prefix", "dual"); and the context they read."""
        batch, width = state.canvas.shape
        block_slots = self._block_slots(state)  # [B, bs]
        rows = jnp.arange(batch)[:, None, None]
        branches = jnp.arange(blocks.shape[1])[None, :, None]
        canvases = jnp.broadcast_to(state.canvas[:, None, :], (batch, blocks.shape[1], width))
        canvases = canvases.at[rows, branches, block_slots[:, None, :]].set(blocks, mode="drop")
        if self.cache == "none":
            return canvases, jnp.zeros((batch,), jnp.int32), None, 0
        length = self._span_length(model, width, state.output.tokens.shape[1])
        span_start = self._block_start(state) - int(model.config.shifted_logits)
        span_slots = jnp.clip(span_start[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :], 0, width - 1)
        spans = jnp.take_along_axis(canvases, jnp.broadcast_to(span_slots[:, None, :], (batch, blocks.shape[1], length)), axis=2)
        slots = jnp.arange(width, dtype=jnp.int32)[None, :]
        context = slots < span_start[:, None]
        if self.cache == "dual":
            block_end = self._block_start(state) + self.block_size
            context |= (slots >= block_end[:, None]) & (slots < self._gen_end(state)[:, None])
        return spans, span_start, context, width

    def _live_step(self, model: Any, state: MaskedDiffusionState) -> MaskedDiffusionState:
        """One forward of each running row's current state (context from the kept cache), then unmask."""
        running = ~state.output.finished
        block = jnp.take_along_axis(state.canvas, self._block_slots(state), axis=1)
        spans, span_start, context, base = self._live_spans(model, state, block[:, None, :])
        predicted, confidence, cache = self._forward(model, state, spans, span_start, context, base, running, state.decided[:, None])
        state = state.replace(cache=cache, model_calls=state.model_calls + 1, block_forwards=self._count_forward(state, running))
        return self._unmask(state, predicted[:, 0], confidence[:, 0], running)

    # --- decisions --------------------------------------------------------------------------------------

    def _unmask(self, state: MaskedDiffusionState, predicted: jax.Array, confidence: jax.Array, rows: jax.Array) -> MaskedDiffusionState:
        """Apply the static / threshold rule to the current block of `rows` (predictions [B, 2bs])."""
        block_slots = self._block_slots(state)
        block = jnp.take_along_axis(state.canvas, block_slots, axis=1)
        masked = block == self._mask_id(state)
        bs = self.block_size
        chosen = unmasking.above_threshold(confidence[:, :bs], masked, state.threshold) & rows[:, None]
        block = jnp.where(chosen, predicted[:, :bs], block)
        state = state.replace(
            canvas=self._write_block(state, block),
            decided=state.decided + jnp.sum(chosen, axis=1, dtype=jnp.int32),
        )
        return self._finish_blocks(state, predicted, confidence)

    def _verify_drafts(self, model: Any, state: MaskedDiffusionState) -> MaskedDiffusionState:
        """FreeDave: draft the next K static states from the current predictions, verify them in one forward,
        keep the longest chain of exact static steps (at least one token)."""
        running = ~state.output.finished
        bs, num_drafts = self.block_size, self._branches
        block = jnp.take_along_axis(state.canvas, self._block_slots(state), axis=1)  # [B, bs]
        masked = block == self._mask_id(state)
        remaining = jnp.sum(masked, axis=1, dtype=jnp.int32)  # [B] >= 1 for running rows
        order = unmasking.confidence_order(state.confidence[:, :bs], masked)  # [B, bs]
        rank = jnp.argsort(order, axis=1).astype(jnp.int32)  # [B, bs]: each position's place in the order
        draft_index = jnp.arange(num_drafts, dtype=jnp.int32)[None, :, None]
        filled = masked[:, None, :] & (rank[:, None, :] <= draft_index)  # [B, K, bs]: draft k fills the top k+1
        drafts = jnp.where(filled, state.predicted[:, None, :bs], block[:, None, :])
        spans, span_start, context, base = self._live_spans(model, state, drafts)
        draft_decided = state.decided[:, None] + 1 + jnp.arange(num_drafts, dtype=jnp.int32)[None, :]  # draft k: k + 1 more
        predicted, confidence, cache = self._forward(model, state, spans, span_start, context, base, running, draft_decided)

        # draft k+1 is the static step from draft k iff draft k's most confident masked position is the
        # (k+2)-th of the original order and its predicted token there is the original prediction
        still_masked = masked[:, None, :] & ~filled  # [B, K, bs]
        next_position = unmasking.confidence_order(confidence[:, :, :bs], still_masked)[:, :, 0]  # [B, K]
        next_token = jnp.take_along_axis(predicted[:, :, :bs], next_position[:, :, None], axis=2)[:, :, 0]
        k = jnp.arange(num_drafts, dtype=jnp.int32)[None, :]
        expected_position = jnp.take_along_axis(order, jnp.broadcast_to(jnp.minimum(k + 1, bs - 1), order.shape[:1] + k.shape[1:]), axis=1)
        expected_token = jnp.take_along_axis(state.predicted[:, :bs], expected_position, axis=1)
        is_static_step = (k + 1 < remaining[:, None]) & (next_position == expected_position) & (next_token == expected_token)
        best = jnp.sum(jnp.cumprod(is_static_step[:, :-1], axis=1), axis=1, dtype=jnp.int32)  # [B] in [0, K-1]
        committed = jnp.where(running, best + 1, 0)

        pick = best[:, None, None]
        new_block = jnp.take_along_axis(drafts, pick, axis=1)[:, 0]
        keep = running[:, None]
        state = state.replace(
            canvas=self._write_block(state, jnp.where(keep, new_block, block)),
            decided=state.decided + committed,
            predicted=jnp.where(keep, jnp.take_along_axis(predicted, pick, axis=1)[:, 0], state.predicted),
            confidence=jnp.where(keep, jnp.take_along_axis(confidence, pick, axis=1)[:, 0], state.confidence),
            cache=cache,
            model_calls=state.model_calls + 1,
            block_forwards=self._count_forward(state, running),
            committed_histogram=state.committed_histogram.at[committed].add(running.astype(jnp.int32)),
        )
        return self._finish_blocks(state, state.predicted, state.confidence)

    def _finish_blocks(self, state: MaskedDiffusionState, predicted: jax.Array, confidence: jax.Array) -> MaskedDiffusionState:
        """Emit completed blocks (stop tokens end a row there) and move those rows to their next block.

        The predictions for the next block carry over when they came from a whole-canvas forward ("none");
        otherwise the next block starts with a refresh."""
        running = ~state.output.finished
        block = jnp.take_along_axis(state.canvas, self._block_slots(state), axis=1)
        complete = running & ~jnp.any(block == self._mask_id(state), axis=1)
        output = state.output.append(block, jnp.where(complete, self.block_size, 0), state.stop_tokens)
        bs = self.block_size
        shifted_predictions = jnp.concatenate([predicted[:, bs:], predicted[:, bs:]], axis=1)
        shifted_confidence = jnp.concatenate([confidence[:, bs:], confidence[:, bs:]], axis=1)
        carry = self.cache == "none"
        advance = complete[:, None]
        return state.replace(
            output=output,
            block=state.block + complete,
            predicted=jnp.where(advance, shifted_predictions, state.predicted),
            confidence=jnp.where(advance, shifted_confidence, state.confidence),
            predictions_valid=jnp.where(complete, carry, state.predictions_valid),
        )

    # --- small helpers ----------------------------------------------------------------------------------

    @staticmethod
    def _mask_id(state: MaskedDiffusionState) -> int:
        return state.mask_token_id

    def _write_block(self, state: MaskedDiffusionState, block: jax.Array) -> jax.Array:  # block [B, bs] -> canvas
        rows = jnp.arange(state.canvas.shape[0])[:, None]
        return state.canvas.at[rows, self._block_slots(state)].set(block, mode="drop")

    def _count_forward(self, state: MaskedDiffusionState, rows: jax.Array) -> jax.Array:
        num_blocks = state.block_forwards.shape[1]
        index = jnp.clip(state.block, 0, num_blocks - 1)[:, None]
        return state.block_forwards + (jax.nn.one_hot(index[:, 0], num_blocks, dtype=jnp.int32) * rows[:, None])


def dllm_static(*, block_size: int = 32, cache: str = "none", temperature: Any = 0.0) -> MaskedDiffusion:
    """One token per forward: the most confident masked position of the current block."""
    return MaskedDiffusion(unmasking="static", block_size=block_size, cache=cache, temperature=temperature)


def dllm_threshold(*, threshold: Any = 0.9, block_size: int = 32, cache: str = "none", temperature: Any = 0.0) -> MaskedDiffusion:
    """Fast-dLLM v1 parallel decoding: every masked position above `threshold` (and at least one) per forward."""
    return MaskedDiffusion(unmasking="threshold", block_size=block_size, cache=cache, temperature=temperature, threshold=threshold)


def freedave(*, draft_steps: int = 8, block_size: int = 32, cache: str = "none", temperature: Any = 0.0) -> MaskedDiffusion:
    """FreeDave lossless parallel decoding: the output of dllm_static with fewer forwards."""
    return MaskedDiffusion(unmasking="freedave", block_size=block_size, cache=cache, temperature=temperature, draft_steps=draft_steps)


register_strategy("dllm_static", dllm_static)
register_strategy("dllm_threshold", dllm_threshold)
register_strategy("freedave", freedave)
register_strategy("masked_diffusion", MaskedDiffusion)
