"""What every diffusion-LM decoder shares: turning logits into (token, confidence) predictions at masked
positions, ranking them, choosing which to unmask, and checking the model and options; and the unmasking
rules of masked-diffusion decoding as small policy objects (`StaticUnmasking`, `ThresholdUnmasking`,
`FreeDaveUnmasking`, `Learn2PDUnmasking`).

Predictions follow LLaDA / Fast-dLLM: the predicted token x0 is the argmax (temperature 0) or a sample from
softmax(logits / temperature) (`sampling.draw`: one uniform per position, where LLaDA adds Gumbel noise to every
logit; the same distribution); its confidence is its probability under softmax(logits). The mask
token itself is never predicted.

Sampling noise is a pure function of (key, row, decision index, position): the decision index is the number of
generated tokens a row had decided when the prediction was made. Two decoders that pass through the same
states therefore draw the same samples, which is what lets FreeDave reproduce static decoding at temperature > 0.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
from flax import struct

from jspec import sampling, validation
from jspec.strategies import learn2pd
from jspec.strategies.base import DecodeOutput, Prompts, static_field
from jspec.validation import ArgumentError

THRESHOLD = 0.9  # the "threshold" rule's default confidence threshold (Fast-dLLM)
LEARN2PD_THRESHOLD = 0.99  # the "learn2pd" rule's default filter threshold (the model card's Learn2PD entries measure it)

Policy = TypeVar("Policy")


def predict(
    logits: jax.Array,  # [B, K, T, V] float32: the logits that predict each position (already shifted)
    slots: jax.Array,  # [B, T] int32: each position's slot (for the sampling noise)
    decided: jax.Array,  # [B, K] int32: the decision index each branch's state is at
    temperature: jax.Array,  # [B] float32
    key: jax.Array,
    mask_token_id: int,
) -> tuple[jax.Array, jax.Array]:  # x0 [B, K, T] int32, confidence [B, K, T] float32
    """Predicted tokens and their confidences (see the module docstring)."""
    logits = logits.at[..., mask_token_id].set(-jnp.inf)
    probabilities = jax.nn.softmax(logits, axis=-1)

    def sampled(_):
        def draw(row_key, branch_decided, position, weights):  # weights [V] -> token []
            return sampling.draw(jax.random.fold_in(jax.random.fold_in(row_key, branch_decided), position), weights)

        row_keys = jax.vmap(lambda row: jax.random.fold_in(key, row))(jnp.arange(logits.shape[0]))
        per_position = jax.vmap(draw, in_axes=(None, None, 0, 0))
        per_branch = jax.vmap(per_position, in_axes=(None, 0, None, 0))
        scale = jnp.maximum(temperature, 1e-6)[:, None, None, None]
        tempered = jax.nn.softmax(logits / scale, axis=-1)  # [B, K, T, V]
        drawn = jax.vmap(per_branch, in_axes=(0, 0, 0, 0))(row_keys, decided, slots, tempered)  # [B, K, T]
        return jnp.where(temperature[:, None, None] > 0, drawn, sampling.argmax(logits))

    greedy = lambda _: sampling.argmax(logits)  # noqa: E731
    tokens = jax.lax.cond(jnp.any(temperature > 0), sampled, greedy, None)
    confidence = jnp.take_along_axis(probabilities, tokens[..., None], axis=-1)[..., 0]
    return tokens, confidence


def confidence_order(
    confidence: jax.Array,  # [..., T] float32
    masked: jax.Array,  # [..., T] bool: positions still to decide
) -> jax.Array:  # [..., T] int32
    """Positions by decreasing confidence, masked ones first, ties to the leftmost: element 0 is the position
    static (low-confidence-remasking) decoding unmasks next, element k the (k+1)-th most confident."""
    key = jnp.where(masked, -confidence, jnp.inf)
    return jnp.argsort(key, axis=-1, stable=True).astype(jnp.int32)


def most_confident(confidence: jax.Array, masked: jax.Array) -> jax.Array:  # [..., T] -> [..., T] bool
    """One-hot of the most confident masked position (none where nothing is masked)."""
    first = confidence_order(confidence, masked)[..., 0]
    return jax.nn.one_hot(first, masked.shape[-1], dtype=bool) & masked


def unmask_above(
    scores: jax.Array,  # [..., T] float32: each position's score
    confidence: jax.Array,  # [..., T] float32
    masked: jax.Array,  # [..., T] bool
    threshold: jax.Array,  # [B]: broadcast over the trailing axes
) -> jax.Array:  # [..., T] bool
    """Every masked position whose score > threshold; where none passes, the most confident one (the position
    static decoding picks). With threshold 1 and scores in [0, 1] this is `most_confident`. When the scores are
    the confidences, "and at least the most confident one" (Fast-dLLM) is the same rule."""
    threshold = threshold.reshape(threshold.shape + (1,) * (scores.ndim - 1))
    passing = masked & (scores > threshold)
    return passing | (most_confident(confidence, masked) & ~jnp.any(passing, axis=-1, keepdims=True))


def above_threshold(confidence: jax.Array, masked: jax.Array, threshold: jax.Array) -> jax.Array:
    """Fast-dLLM's parallel rule: every masked position with confidence > threshold, and at least the most
    confident one. threshold: [B] (broadcast over the trailing axes). With threshold 1 this is
    `most_confident` (a probability never exceeds 1)."""
    return unmask_above(confidence, confidence, masked, threshold)


def learn2pd_selection(
    filter: learn2pd.UnmaskingFilter,
    threshold: jax.Array,  # [B]
    predicted: jax.Array,  # [B, T] int32: current predictions
    confidence: jax.Array,  # [B, T] float32
    masked: jax.Array,  # [B, T] bool: positions that may be unmasked
    positions: jax.Array,  # [B, T] int32: generated positions
) -> jax.Array:  # [B, T] bool
    """Learn2PD: the masked positions the filter scores above threshold; where none passes, the most confident one."""
    inputs = learn2pd.FilterInputs(learn2pd.filter_features(confidence, masked), predicted, masked, positions)
    return unmask_above(filter.scores(inputs), confidence, masked, threshold)


class Acceptance(NamedTuple):
    """What one step of an unmasking rule keeps, per row."""

    branch: jax.Array  # [B] int32: the branch whose state continues (its predictions describe the next state)
    block: jax.Array  # [B, bs] int32: the current block after the step
    committed: jax.Array  # [B] int32: generated positions the step decided


@struct.dataclass
class UnmaskingRule:
    """Which masked positions of the current block a masked-diffusion step decides.

    A step runs `num_branches` states of the block in one forward (each state a batch row of its own, computed
    as a one-branch forward computes it) and `accept`s one of them. This base class is the one-branch case: the branch is the current
    state, and `select` picks positions from its fresh predictions. Rules are pytrees: fields that users tune
    per call (a threshold) are traced, the rest static.
    """

    strategy_name: ClassVar[str] = "masked_diffusion"  # the registered name errors refer to
    drafts_from_kept_predictions: ClassVar[bool] = False  # True: a step needs predictions of the current state
    # before its forward (a whole-canvas forward that only records them comes first where they are missing)

    @property
    def num_branches(self) -> int:
        return 1

    def validate(self, config: Any, prompts: Prompts) -> None:
        """Concrete checks of the rule's options against the model's config and the request, before tracing."""

    def branches(
        self,
        block: jax.Array,  # [B, bs] int32: the current block
        masked: jax.Array,  # [B, bs] bool: its positions still to decide
        kept_predicted: jax.Array,  # [B, bs] int32: kept predictions of the current state (valid when drafting)
        kept_confidence: jax.Array,  # [B, bs] float32
    ) -> tuple[jax.Array, jax.Array]:  # blocks [B, K, bs], ahead [K] int32: decisions each branch is ahead
        """The block states one forward runs."""
        return block[:, None, :], jnp.zeros((1,), jnp.int32)

    def accept(
        self,
        block: jax.Array,  # [B, bs] int32
        masked: jax.Array,  # [B, bs] bool
        blocks: jax.Array,  # [B, K, bs] int32: the branches that ran (from `branches`)
        kept_predicted: jax.Array,  # [B, bs] int32
        kept_confidence: jax.Array,  # [B, bs] float32
        predicted: jax.Array,  # [B, K, bs] int32: each branch's fresh predictions
        confidence: jax.Array,  # [B, K, bs] float32
        positions: jax.Array,  # [B, bs] int32: each block position's generated position (0 = first generated)
    ) -> Acceptance:
        """Unmask the positions `select` picks, with their fresh predictions."""
        chosen = self.select(predicted[:, 0], confidence[:, 0], masked, positions)
        zeros = jnp.zeros(block.shape[:1], jnp.int32)
        return Acceptance(zeros, jnp.where(chosen, predicted[:, 0], block), jnp.sum(chosen, axis=1, dtype=jnp.int32))

    def select(
        self,
        predicted: jax.Array,  # [B, bs] int32: fresh predictions
        confidence: jax.Array,  # [B, bs] float32
        masked: jax.Array,  # [B, bs] bool
        positions: jax.Array,  # [B, bs] int32: generated positions
    ) -> jax.Array:  # [B, bs] bool: the positions to unmask
        raise NotImplementedError

    def stats(self, committed_histogram: jax.Array) -> dict[str, jax.Array]:
        """Rule-specific entries of DecodeOutput.stats."""
        return {}


@struct.dataclass
class StaticUnmasking(UnmaskingRule):
    """LLaDA low-confidence remasking: one position per forward, the most confident masked one of the block."""

    strategy_name: ClassVar[str] = "dllm_static"

    def select(self, predicted, confidence, masked, positions):
        return most_confident(confidence, masked)


@struct.dataclass
class ThresholdUnmasking(UnmaskingRule):
    """Fast-dLLM v1 parallel decoding: every masked position with confidence > threshold, and at least the most
    confident one. threshold in (0, 1], traced (scalar or one per row); 1 is `StaticUnmasking`."""

    strategy_name: ClassVar[str] = "dllm_threshold"
    threshold: Any = THRESHOLD

    def validate(self, config: Any, prompts: Prompts) -> None:
        check_threshold(self.threshold, prompts)

    def select(self, predicted, confidence, masked, positions):
        return above_threshold(confidence, masked, per_row(self.threshold, confidence.shape[0]))


@struct.dataclass
class Learn2PDUnmasking(UnmaskingRule):
    """Learn2PD (arXiv 2509.25188): every masked position a filter (`jspec.strategies.learn2pd`) scores above
    `threshold`; where none passes, the most confident one (so a step decides at least one position; with an
    `OracleFilter` the positions it passes hold the reference's tokens, the fallback's need not). filter: an
    `UnmaskingFilter` pytree (a learned `MLPFilter`, or an `OracleFilter`), traced; threshold in (0, 1], traced
    (scalar or one per row). Scores lie in [0, 1], so threshold 1 unmasks only the most confident position:
    `StaticUnmasking` token for token."""

    strategy_name: ClassVar[str] = "dllm_learn2pd"
    filter: Any = None
    threshold: Any = LEARN2PD_THRESHOLD

    def validate(self, config: Any, prompts: Prompts) -> None:
        if not isinstance(self.filter, learn2pd.UnmaskingFilter):
            raise ArgumentError(f"filter: expected an UnmaskingFilter object (learn2pd.as_filter makes one of a name), got {self.filter!r}")
        self.filter.validate(config, prompts.batch_size, prompts.max_new_tokens)
        check_threshold(self.threshold, prompts)

    def select(self, predicted, confidence, masked, positions):
        threshold = per_row(self.threshold, confidence.shape[0])
        return learn2pd_selection(self.filter, threshold, predicted, confidence, masked, positions)


@struct.dataclass
class FreeDaveUnmasking(UnmaskingRule):
    """FreeDave (arXiv 2510.00294), lossless: from the kept predictions of the current state, draft the next
    `draft_steps` static states (draft k fills the k + 1 most confident masked positions), run them in one
    forward, and accept the longest chain in which each draft is exactly the static step from the one before
    (at least one token). The accepted states are the static trajectory, so the output equals
    `StaticUnmasking`'s token for token; the accepted draft's predictions are the next step's kept ones."""

    strategy_name: ClassVar[str] = "freedave"
    drafts_from_kept_predictions: ClassVar[bool] = True
    draft_steps: int = static_field(default=8)

    @property
    def num_branches(self) -> int:
        return self.draft_steps

    def validate(self, config: Any, prompts: Prompts) -> None:
        check_positive_int("draft_steps", self.draft_steps)

    def _drafted(self, masked: jax.Array, kept_confidence: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The static order [B, bs] of the masked positions and the positions each draft fills [B, K, bs]."""
        order = confidence_order(kept_confidence, masked)
        rank = jnp.argsort(order, axis=1).astype(jnp.int32)  # [B, bs]: each position's place in the order
        draft_index = jnp.arange(self.draft_steps, dtype=jnp.int32)[None, :, None]
        return order, masked[:, None, :] & (rank[:, None, :] <= draft_index)

    def branches(self, block, masked, kept_predicted, kept_confidence):
        _, filled = self._drafted(masked, kept_confidence)
        drafts = jnp.where(filled, kept_predicted[:, None, :], block[:, None, :])
        return drafts, 1 + jnp.arange(self.draft_steps, dtype=jnp.int32)

    def accept(self, block, masked, blocks, kept_predicted, kept_confidence, predicted, confidence, positions):
        # draft k+1 is the static step from draft k iff draft k's most confident masked position is the
        # (k+2)-th of the original order and its predicted token there is the original prediction
        order, filled = self._drafted(masked, kept_confidence)
        batch, block_size = block.shape
        remaining = jnp.sum(masked, axis=1, dtype=jnp.int32)  # [B]
        next_position = confidence_order(confidence, masked[:, None, :] & ~filled)[:, :, 0]  # [B, K]
        next_token = jnp.take_along_axis(predicted, next_position[:, :, None], axis=2)[:, :, 0]
        k = jnp.arange(self.draft_steps, dtype=jnp.int32)[None, :]
        next_in_order = jnp.broadcast_to(jnp.minimum(k + 1, block_size - 1), (batch, self.draft_steps))  # [B, K]
        expected_position = jnp.take_along_axis(order, next_in_order, axis=1)
        expected_token = jnp.take_along_axis(kept_predicted, expected_position, axis=1)
        is_static_step = (k + 1 < remaining[:, None]) & (next_position == expected_position)
        is_static_step &= next_token == expected_token
        best = jnp.sum(jnp.cumprod(is_static_step[:, :-1], axis=1), axis=1, dtype=jnp.int32)  # [B] in [0, K-1]
        return Acceptance(best, jnp.take_along_axis(blocks, best[:, None, None], axis=1)[:, 0], best + 1)

    def stats(self, committed_histogram: jax.Array) -> dict[str, jax.Array]:
        return {"committed_histogram": committed_histogram}


def unmasking_rule(
    unmasking: str | UnmaskingRule, *, threshold: Any = None, draft_steps: int = 8, filter: Any = "demo-code-dllm"
) -> UnmaskingRule:
    """The rule a user option names ("threshold" takes `threshold`, None: THRESHOLD; "freedave" `draft_steps`;
    "learn2pd" `threshold`, None: LEARN2PD_THRESHOLD, and `filter`: an `UnmaskingFilter`, or the name of a model
    whose filter is shipped), or the rule object itself."""
    named = {
        "static": StaticUnmasking,
        "threshold": lambda: ThresholdUnmasking(threshold=THRESHOLD if threshold is None else threshold),
        "freedave": lambda: FreeDaveUnmasking(draft_steps=draft_steps),
        "learn2pd": lambda: Learn2PDUnmasking(filter=learn2pd.as_filter(filter),
                                              threshold=LEARN2PD_THRESHOLD if threshold is None else threshold),
    }
    return choose_policy("unmasking", unmasking, named, UnmaskingRule)


def choose_policy(argument: str, value: Any, named: dict[str, Callable[[], Policy]], kind: type) -> Policy:
    """`value` when it is a `kind` object, else the policy `named[value]()`; any other value raises a
    ValueError naming `argument` and the accepted names (no names: only `kind` objects are accepted)."""
    if isinstance(value, kind):
        return value
    if isinstance(value, str) and value in named:
        return named[value]()
    if named:
        raise ArgumentError(f"{argument}: expected one of {tuple(named)} or an object of type {kind.__name__}, got {value!r}")
    raise ArgumentError(f"{argument}: expected an object of type {kind.__name__} (the factories take names), got {value!r}")


def check_diffusion_model(model: Any, kind: str, strategy: str) -> None:
    config = model.config
    if config.mask_token_id is None:
        raise ArgumentError(
            f"model: {config.name!r} has no mask token (config.mask_token_id is None); strategy {strategy!r} needs a "
            f"diffusion LM, e.g. jspec.load('demo-code-dllm') or jspec.load('demo-code-bd')"
        )
    if config.diffusion != kind:
        other = {"masked": "dllm_static / dllm_threshold / freedave", "block": "block_diffusion"}.get(config.diffusion)
        hint = f"; a diffusion={config.diffusion!r} model decodes with {other}" if other else ""
        raise ArgumentError(f"model: strategy {strategy!r} needs a diffusion={kind!r} model, got diffusion={config.diffusion!r}{hint}")


def check_positive_int(name: str, value: Any) -> None:
    validation.check_int(name, value, minimum=1)


def check_per_row(name: str, value: Any, prompts: Prompts, ok, expected: str) -> None:
    """A traced option given as a scalar or one value per row; concrete values are range-checked."""
    validation.check_per_row(name, value, prompts.batch_size, ok, expected)


def check_options(prompts: Prompts, temperature: Any, threshold: Any | None = None) -> None:
    check_per_row("temperature", temperature, prompts, lambda x: x >= 0, "a float >= 0 (0 is greedy)")
    if threshold is not None:
        check_threshold(threshold, prompts)


def check_threshold(threshold: Any, prompts: Prompts) -> None:
    check_per_row("threshold", threshold, prompts, lambda x: (x > 0) & (x <= 1), "a float in (0, 1]")


def per_row(value: Any, batch_size: int) -> jax.Array:  # [B] float32
    return jnp.broadcast_to(jnp.asarray(value, jnp.float32), (batch_size,))


def decode_output(state: Any, **extra_stats: jax.Array) -> DecodeOutput:
    """The DecodeOutput of a diffusion decoder's state (output buffer, model_calls, step, block_forwards)."""
    generated = state.output.lengths
    stats = {
        "model_calls": state.model_calls,
        "steps": state.step,
        "tokens_generated": generated,
        "tokens_per_forward": jnp.sum(generated) / jnp.maximum(state.model_calls, 1) / generated.shape[0],
        "block_forwards": state.block_forwards,
        **extra_stats,
    }
    return DecodeOutput(tokens=state.output.tokens, lengths=generated, finish_reason=state.output.finish_reason, stats=stats)
