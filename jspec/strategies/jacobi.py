"""Jacobi decoding and Speculative Jacobi Decoding (SJD): the target drafts for itself from a window of guesses.

Each row keeps a window of `num_draft_tokens` guesses for the tokens after its pending one. One step is one target
forward over [pending, window]: the speculative family's chain verification, acceptance walk and cache rollback
(`jspec.strategies.speculative`) keep the accepted prefix and emit a correction or bonus token; then the window
is refreshed from the same forward (`JacobiDrafter.observe`): the guesses after the accepted ones become the
target's outputs at those positions (a Jacobi update, made under the old, partly wrong prefix), and the slots
left at the end are filled by the initialisation rule at the next step.

- `jacobi` (Santilli et al., 2023): greedy; the refreshed guesses are argmax outputs and acceptance is exact match.
  Lossless: token for token the output of greedy autoregressive decoding.
- `sjd` (Teng et al., ICLR 2025; ../shared/NEXT-WAVE.md section 4.1): sampling; each guess keeps the distribution
  q it was drawn from (its warped target distribution in the previous iteration, or one-hot for an initialised
  guess), is accepted with probability min(1, p/q) against this forward's warped p, a rejection emits a sample of
  norm(max(0, p - q)), and a step that accepts every guess emits a bonus sample. The refreshed guesses are fresh
  samples of this forward's p at their positions (their q is that p). Lossless in distribution: given the state,
  every guess was drawn from its q independently of the acceptance uniforms, so the speculative-sampling argument
  holds position by position. Warpers (temperature, top-k, top-p, min-p) apply identically to p and q: q is kept
  as the logits that produced it and warped with the same parameters.
- `sjd` with `lossy=True, relaxed="gsd"`: GSD's grouped acceptance (So et al., ICCV 2025; NEXT-WAVE section 4.2),
  NOT lossless: a guess is accepted with probability min(1, P(G) / Q(G)) over a group G of tokens near it.
  stats["lossy"] says so.

Initialisation rules (`init`) for the slots a step leaves empty: "repeat" (the token before the slot), "prompt_lookup"
(the continuation of the earliest earlier n-gram match of the row's last tokens, else repeat), "random" (uniform over
the vocabulary), "repeat_horizon" (the token `horizon` positions back: one image row up for an image model whose
rows are `horizon` tokens wide). An initialised guess has a one-hot q: SJD accepts it with probability p(guess).
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from jspec import sampling, validation
from jspec.strategies.base import Prompts, register_strategy, static_field
from jspec.strategies.drafters import MAX_NGRAM, Proposal, Verified, all_greedy, prompt_lookup, sample_positions
from jspec.strategies.speculative import Speculative, check_draft_shape
from jspec.strategies.tree import TreeTemplate
from jspec.validation import ArgumentError

INITS = ("repeat", "prompt_lookup", "random", "repeat_horizon")
RELAXED = ("gsd",)


@struct.dataclass
class JacobiState:
    window: jax.Array  # [B, W] int32: guesses for the W tokens after the pending one
    fresh: jax.Array  # [B, W] bool: slots the initialisation fills at the next step
    q_logits: jax.Array | None  # [B, W, V] float32 (sjd): logits whose warped distribution drew each guess


@struct.dataclass
class JacobiDrafter:
    """A window of guesses refreshed from each verification (see the module docstring); drafts a chain."""

    fill: str = static_field(default="repeat")  # the initialisation rule, one of INITS
    horizon: int = static_field(default=8)  # repeat_horizon: copy the token this many positions back
    max_ngram: int = static_field(default=3)  # prompt_lookup: longest n-gram matched
    sampled: bool = static_field(default=False)  # sjd: guesses are samples, each with its q
    prefill_calls: ClassVar[int] = 0

    def validate(self, target: Any, template: TreeTemplate, prompts: Prompts) -> None:
        if not template.is_chain:
            raise ArgumentError("tree: a Jacobi window is a chain of guesses; set num_draft_tokens, not tree")
        check_init(self.fill, self.horizon, self.max_ngram)

    def init(self, target: Any, prompts: Prompts, template: TreeTemplate) -> JacobiState:
        batch, width = prompts.batch_size, template.num_nodes
        q_logits = jnp.zeros((batch, width, target.config.vocab_size), jnp.float32) if self.sampled else None
        return JacobiState(jnp.zeros((batch, width), jnp.int32), jnp.ones((batch, width), bool), q_logits)

    def propose(self, target, state, pending, depth_limit, key, template) -> Proposal:
        window_state = self._filled(state.drafter_state, state.history, state.cache.lengths, pending, key,
                                    target.config.vocab_size)
        valid = jnp.asarray(template.depths)[None, :] <= depth_limit[:, None]
        return Proposal(
            window_state.window, window_state.q_logits, valid, jnp.sum(valid, axis=1, dtype=jnp.int32), state.cache,
            window_state, jnp.int32(0), sampled_from_parent=(True,) * template.num_nodes if self.sampled else (),
        )

    def commit(self, drafter_state: JacobiState, template: TreeTemplate, path: jax.Array, lengths: jax.Array) -> JacobiState:
        return drafter_state

    def observe(self, drafter_state: JacobiState, verified: Verified) -> JacobiState:
        """The guesses after the accepted ones become this forward's outputs there (argmax, or samples of p for
        sjd, with q = p); the slots left at the end are marked for the initialisation."""
        logits = verified.logits  # [B, W + 1, V]: after pending, after guess 1, ...
        width = drafter_state.window.shape[1]
        outputs = jax.lax.cond(
            all_greedy(verified.sampling),
            lambda: sampling.argmax(logits),
            lambda: sample_positions(verified.key, logits, verified.sampling),
        )  # [B, W + 1]
        # the correction / bonus token took position num_accepted + 1; the output at chunk index j predicts j + 1
        index = verified.num_accepted[:, None] + 1 + jnp.arange(width)[None, :]  # [B, W]
        refreshed = index <= width
        index = jnp.minimum(index, width)
        running = verified.running[:, None]
        window = jnp.where(running, jnp.take_along_axis(outputs, index, axis=1), drafter_state.window)
        q_logits = drafter_state.q_logits
        if self.sampled:
            q_logits = jnp.where(running[:, :, None], jnp.take_along_axis(logits, index[:, :, None], axis=1), q_logits)
        return JacobiState(window, jnp.where(running, ~refreshed, drafter_state.fresh), q_logits)

    def _filled(self, state: JacobiState, history: jax.Array, lengths: jax.Array, pending: jax.Array, key: jax.Array,
                vocab_size: int) -> JacobiState:
        """The window with its fresh slots initialised (q one-hot there); slot i guesses position lengths + 1 + i."""
        batch, width = state.window.shape
        rows = jnp.arange(batch)
        if self.fill == "random":
            drawn = jax.random.randint(key, (batch, width), 0, vocab_size, jnp.int32)
        elif self.fill == "prompt_lookup":
            looked_up, found = prompt_lookup(history, lengths, self.max_ngram, width)
        slots = []
        previous = pending
        for i in range(width):
            if self.fill == "random":
                candidate = drawn[:, i]
            elif self.fill == "repeat_horizon":
                source = lengths + 1 + i - self.horizon  # a known token (prompt or output) or an earlier slot
                candidate = history[rows, jnp.maximum(source, 0)] if i < self.horizon else slots[i - self.horizon]
            elif self.fill == "prompt_lookup":
                candidate = jnp.where(found[:, i], looked_up[:, i], previous)
            else:  # repeat
                candidate = previous
            previous = jnp.where(state.fresh[:, i], candidate, state.window[:, i])
            slots.append(previous)
        window = jnp.stack(slots, axis=1)
        q_logits = state.q_logits
        if self.sampled:  # an initialised guess was not drawn from a distribution: q is one-hot on it
            one_hot = jax.nn.one_hot(window, vocab_size, dtype=bool)
            q_logits = jnp.where(state.fresh[:, :, None], jnp.where(one_hot, 0.0, -jnp.inf), q_logits)
        return JacobiState(window, jnp.zeros_like(state.fresh), q_logits)


@struct.dataclass
class GroupedAcceptance:
    """GSD's grouped acceptance (So et al., ICCV 2025; code junhyukso/GSD): LOSSY, an opt-in relaxation of SJD.

    For a guess d, the group G is the tokens within `group_size // 2` ranks of d in the target's probability order
    whose probability is within `prob_gap` of p(d) and (unless embed_distance is None) whose input embedding is
    within squared-L2 distance `embed_distance` of d's; d is always in G. The guess is accepted with probability
    min(1, p(G) / q(G)); a rejection resamples from norm(max(0, p - q)) as SJD does.
    """

    prob_gap: Any = 0.15
    embed_distance: Any = 0.5  # None: no embedding filter
    group_size: int = static_field(default=14)
    lossy: ClassVar[bool] = True

    def masses(self, probs: jax.Array, q: jax.Array, token: jax.Array, embeddings: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(p(G), q(G)) [B] for probs, q [B, V] and guesses token [B]; embeddings [V, H]."""
        batch, vocab = probs.shape
        rows = jnp.arange(batch)[:, None]
        order = jnp.argsort(-probs, axis=-1)  # [B, V] most likely first
        rank = jnp.argmax(order == token[:, None], axis=-1)  # [B]
        half = self.group_size // 2
        index = rank[:, None] + jnp.arange(-half, self.group_size - half)[None, :]  # [B, S]
        candidates = order[rows, jnp.clip(index, 0, vocab - 1)]
        group = (index >= 0) & (index < vocab)
        group &= jnp.abs(probs[rows, candidates] - probs[rows, token[:, None]]) < self.prob_gap
        if self.embed_distance is not None:
            table = embeddings.astype(jnp.float32)
            distance = jnp.sum((table[candidates] - table[token][:, None, :]) ** 2, axis=-1)
            group &= distance < self.embed_distance
        group |= candidates == token[:, None]
        p_mass = jnp.sum(jnp.where(group, probs[rows, candidates], 0.0), axis=-1)
        q_mass = jnp.sum(jnp.where(group, q[rows, candidates], 0.0), axis=-1)
        return p_mass, q_mass


def check_init(init: Any, horizon: Any, max_ngram: Any) -> None:
    """Raise `ArgumentError` unless init is one of INITS, horizon an int >= 1 and max_ngram in [1, MAX_NGRAM]."""
    validation.check_choice("init", init, INITS)
    validation.check_int("horizon", horizon, minimum=1)
    validation.check_int("max_ngram", max_ngram, minimum=1, maximum=MAX_NGRAM)


def relaxed_acceptance(lossy: Any, relaxed: Any, group_size: Any, prob_gap: Any, embed_distance: Any) -> GroupedAcceptance | None:
    """The relaxed rule the options select (None: exact SJD). A relaxed rule needs lossy=True, and lossy=True a rule."""
    validation.check_bool("lossy", lossy)
    if relaxed is not None:
        validation.check_choice("relaxed", relaxed, RELAXED)
        if not lossy:
            raise ArgumentError(
                f"relaxed: {relaxed!r} accepts guesses the target would reject, so the output is no longer the target's "
                "distribution; pass lossy=True to enable it"
            )
    elif lossy:
        raise ArgumentError(f"lossy: True enables a relaxed acceptance; also give relaxed= one of {RELAXED}")
    validation.check_int("group_size", group_size, minimum=1, maximum=256)
    validation.check_float("prob_gap", prob_gap, lambda x: 0 < x <= 1, "a float in (0, 1]")
    if embed_distance is not None:
        validation.check_float("embed_distance", embed_distance, lambda x: x > 0, "a float > 0, or None (no filter)")
    if relaxed is None:
        return None
    return GroupedAcceptance(prob_gap=float(prob_gap), group_size=int(group_size),
                             embed_distance=None if embed_distance is None else float(embed_distance))


def jacobi_strategy(*, num_draft_tokens: int = 8, init: str = "repeat", horizon: int = 8, max_ngram: int = 3) -> Speculative:
    """Greedy Jacobi decoding over a window of num_draft_tokens guesses (lossless: equals greedy decoding)."""
    check_draft_shape(num_draft_tokens, None, None)
    check_init(init, horizon, max_ngram)
    drafter = JacobiDrafter(fill=init, horizon=horizon, max_ngram=max_ngram, sampled=False)
    return Speculative(drafter=drafter, num_draft_tokens=num_draft_tokens, temperature=0.0)


def sjd_strategy(
    *, num_draft_tokens: int = 8, init: str = "random", horizon: int = 8, max_ngram: int = 3,
    temperature: Any = 1.0, top_k: Any = 0, top_p: Any = 1.0, min_p: Any = 0.0,
    lossy: bool = False, relaxed: str | None = None, group_size: int = 14, prob_gap: float = 0.15,
    embed_distance: float | None = 0.5,
) -> Speculative:
    """Speculative Jacobi Decoding (lossless in distribution; relaxed='gsd' with lossy=True is GSD, lossy)."""
    check_draft_shape(num_draft_tokens, None, None)
    check_init(init, horizon, max_ngram)
    rule = relaxed_acceptance(lossy, relaxed, group_size, prob_gap, embed_distance)
    drafter = JacobiDrafter(fill=init, horizon=horizon, max_ngram=max_ngram, sampled=True)
    return Speculative(drafter=drafter, num_draft_tokens=num_draft_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, min_p=min_p, relaxed=rule)


register_strategy("jacobi", jacobi_strategy, generation_options=True)
register_strategy("sjd", sjd_strategy, generation_options=True)
