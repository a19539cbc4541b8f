"""Lookahead decoding (Fu et al., ICML 2024; hao-ai-lab/LookaheadDecoding): Jacobi trajectories fill an n-gram pool
whose entries are verified as drafts, all in one target forward per step.

Each row keeps a 2D lookahead window of N - 1 levels x W columns (N = `ngram_size`, W = `window`) and an n-gram pool
on device: for every token id, up to G = `guess_set_size` n-grams of N - 1 tokens that followed it, replaced in ring
order (oldest first), duplicates not stored twice. One step is one forward over

    [pending, G guesses of N - 1 tokens (the pool's entries under the pending token), the window's W (N - 1) tokens]

with one mask (`jspec.masks.prefix_and_block_mask` over a static pattern): every entry sees the committed prefix
and the pending token; a guess token sees its own guess's earlier tokens (the guesses are a tree of G chains, the
speculative family's tree verification); window token (level l, column i), at position pending + 1 + i + l, sees
level 0 up to column i and column i of levels 1..l (its Jacobi trajectory), never a guess. The guesses never see
the window, so their logits are those of a plain verification.

After the step (`LookaheadDrafter.observe`), the last level's outputs (argmax, also when sampling, as the reference
implementation does) form a new level; each column's n-gram (level 0 .. level N - 2, new) enters the pool under its
first token, the oldest level is dropped and the new one appended (the window advances one position per step).

Verification is the speculative family's tree walk (`jspec.strategies.speculative`), so it is lossless: greedy is
token for token greedy decoding; sampling tries the guesses at a node in turn, each accepted with probability p(d)
(a guess is a deterministic draft: q is one-hot), a rejected token removed from p, and the correction drawn from
what is left: Lookahead's multi-draft sampling verification, exact in distribution.

Differences from the reference implementation: guesses sharing a first token are separate branches (the walk
follows the first accepted one; the reference keeps every guess with the accepted prefix alive), so a step may
accept fewer tokens than the reference would; the window's level 0 has W tokens (the reference's has W + N - 3);
the levels start filled with prompt tokens (the reference fills them over the first N - 2 steps); the pool is not
seeded from the prompt.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jspec import sampling, validation
from jspec.strategies.base import Prompts, register_strategy, static_field
from jspec.strategies.drafters import Proposal, Verified
from jspec.strategies.speculative import MAX_DRAFT_DEPTH, MAX_DRAFT_NODES, Speculative
from jspec.strategies.tree import TreeTemplate
from jspec.validation import ArgumentError

MAX_WINDOW_TOKENS = 256  # window x (ngram_size - 1): tokens the lookahead branch adds to every forward


@struct.dataclass
class LookaheadState:
    levels: jax.Array  # [B, N - 1, W] int32: the lookahead window, oldest level first
    pool: jax.Array  # [B, V, G, N - 1] int32: n-grams after each token id
    pool_count: jax.Array  # [B, V] int32: n-grams ever stored under each token id (ring slot = count % G)


@struct.dataclass
class LookaheadDrafter:
    """Lookahead's window and n-gram pool (module docstring); proposes the pool's guesses as G chains."""

    window: int = static_field(default=7)
    ngram_size: int = static_field(default=5)
    guess_set_size: int = static_field(default=7)
    prefill_calls: ClassVar[int] = 0

    @property
    def template(self) -> TreeTemplate:
        return guess_template(self.guess_set_size, self.ngram_size)

    def validate(self, target: Any, template: TreeTemplate, prompts: Prompts) -> None:
        check_lookahead(self.window, self.ngram_size, self.guess_set_size)
        if template != self.template:
            raise ArgumentError("tree_parents: lookahead verifies its guesses as guess_set_size chains; leave tree unset")

    def extra_layout(self, template: TreeTemplate) -> tuple[np.ndarray, np.ndarray]:
        """Offsets [E] from the pending position and visibility [E, N + 1 + E] of the window tokens, level-major."""
        levels, width, nodes = self.ngram_size - 1, self.window, template.num_nodes
        offsets = np.asarray([1 + i + l for l in range(levels) for i in range(width)], np.int32)
        visibility = np.zeros((levels * width, nodes + 1 + levels * width), bool)
        visibility[:, 0] = True  # the pending token
        for level in range(levels):
            for column in range(width):
                row = visibility[level * width + column]
                row[nodes + 1 : nodes + 2 + column] = True  # level 0, columns 0..column
                for above in range(1, level + 1):
                    row[nodes + 1 + above * width + column] = True  # this column's trajectory, itself included
        return offsets, visibility

    def init(self, target: Any, prompts: Prompts, template: TreeTemplate) -> LookaheadState:
        batch, levels = prompts.batch_size, self.ngram_size - 1
        # the window starts as prompt tokens picked at fixed pseudo-random places (it only affects speed)
        picks = jax.random.randint(jax.random.key(0), (batch, levels * self.window), 0, prompts.lengths[:, None])
        start = jnp.take_along_axis(prompts.tokens, picks, axis=1).reshape(batch, levels, self.window)
        vocab = target.config.vocab_size
        return LookaheadState(
            levels=start.astype(jnp.int32),
            pool=jnp.zeros((batch, vocab, self.guess_set_size, levels), jnp.int32),
            pool_count=jnp.zeros((batch, vocab), jnp.int32),
        )

    def propose(self, target, state, pending, depth_limit, key, template) -> Proposal:
        lookahead = state.drafter_state
        batch = pending.shape[0]
        rows = jnp.arange(batch)
        guesses = lookahead.pool[rows, pending]  # [B, G, N - 1]
        stored = jnp.arange(self.guess_set_size)[None, :] < lookahead.pool_count[rows, pending][:, None]  # [B, G]
        tokens = jnp.swapaxes(guesses, 1, 2).reshape(batch, -1)  # breadth-first: depth-major, guess-minor
        depths = jnp.asarray(template.depths)[None, :]
        valid = jnp.tile(stored, (1, self.ngram_size - 1)) & (depths <= depth_limit[:, None])
        valid_depth = jnp.where(jnp.any(stored, axis=1), jnp.minimum(depth_limit, template.max_depth), 0)
        return Proposal(
            tokens, None, valid, valid_depth, state.cache, lookahead, jnp.int32(0), sampled_from_parent=(),
            extra_tokens=lookahead.levels.reshape(batch, -1),
        )

    def commit(self, drafter_state: LookaheadState, template: TreeTemplate, path: jax.Array, lengths: jax.Array) -> LookaheadState:
        return drafter_state

    def observe(self, drafter_state: LookaheadState, verified: Verified) -> LookaheadState:
        """Append the new level (the last level's argmax outputs), store each column's n-gram, drop level 0."""
        levels = drafter_state.levels  # [B, N - 1, W]
        last = verified.extra_logits[:, -self.window :]  # [B, W, V]: outputs of the newest level
        new = sampling.argmax(last)  # [B, W]
        grams = jnp.concatenate([jnp.swapaxes(levels[:, 1:], 1, 2), new[:, :, None]], axis=2)  # [B, W, N - 1]
        keys = levels[:, 0]  # [B, W]
        rows = jnp.arange(levels.shape[0])
        size = self.guess_set_size

        def store(column, carry):
            pool, count = carry
            key, gram = keys[:, column], grams[:, column]  # [B], [B, N - 1]
            entries, stored = pool[rows, key], count[rows, key]  # [B, G, N - 1], [B]
            present = jnp.any(jnp.all(entries == gram[:, None, :], axis=-1) & (jnp.arange(size)[None, :] < stored[:, None]), axis=1)
            write = verified.running & ~present
            slot = stored % size
            pool = pool.at[rows, key, slot].set(jnp.where(write[:, None], gram, pool[rows, key, slot]))
            return pool, count.at[rows, key].add(write.astype(jnp.int32))

        pool, count = jax.lax.fori_loop(0, self.window, store, (drafter_state.pool, drafter_state.pool_count))
        shifted = jnp.concatenate([levels[:, 1:], new[:, None]], axis=1)
        levels = jnp.where(verified.running[:, None, None], shifted, levels)
        return LookaheadState(levels=levels, pool=pool, pool_count=count)


def guess_template(guess_set_size: int, ngram_size: int) -> TreeTemplate:
    """G chains of N - 1 nodes from the root, numbered breadth-first: node (d - 1) G + g is guess g's d-th token."""
    size = guess_set_size
    return TreeTemplate(tuple(-1 if depth == 0 else (depth - 1) * size + g for depth in range(ngram_size - 1) for g in range(size)))


def check_lookahead(window: Any, ngram_size: Any, guess_set_size: Any) -> None:
    """Raise `ArgumentError` unless the window, n-gram size and guess set fit the bounds of one verification forward."""
    validation.check_int("window", window, minimum=1, maximum=MAX_WINDOW_TOKENS)
    validation.check_int("ngram_size", ngram_size, minimum=2, maximum=MAX_DRAFT_DEPTH + 1,
                         why=f" (guesses are ngram_size - 1 draft levels, at most {MAX_DRAFT_DEPTH})")
    validation.check_int("guess_set_size", guess_set_size, minimum=1)
    if guess_set_size * (ngram_size - 1) > MAX_DRAFT_NODES:
        validation.fail("guess_set_size", f"guess_set_size x (ngram_size - 1) <= {MAX_DRAFT_NODES} draft nodes",
                        guess_set_size)
    if window * (ngram_size - 1) > MAX_WINDOW_TOKENS:
        validation.fail("window", f"window x (ngram_size - 1) <= {MAX_WINDOW_TOKENS} lookahead tokens", window)


def lookahead_strategy(
    *, window: int = 7, ngram_size: int = 5, guess_set_size: int = 7,
    temperature: Any = 0.0, top_k: Any = 0, top_p: Any = 1.0, min_p: Any = 0.0,
) -> Speculative:
    """Lookahead decoding (lossless: greedy token-identical, sampling distribution-identical)."""
    check_lookahead(window, ngram_size, guess_set_size)
    drafter = LookaheadDrafter(window=window, ngram_size=ngram_size, guess_set_size=guess_set_size)
    return Speculative(drafter=drafter, tree_parents=drafter.template.parents, temperature=temperature, top_k=top_k,
                       top_p=top_p, min_p=min_p)


register_strategy("lookahead", lookahead_strategy, generation_options=True)
