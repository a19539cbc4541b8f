"""Speculative decoding: draft a tree of tokens, verify it in one target forward, keep the longest accepted path.

Lossless, for greedy and for sampling. At each node of the draft tree the children are tried in rank order:
child c with proposal distribution q is accepted with probability min(1, p(c) / q(c)), where p is the
target's (warped) distribution there; on rejection p <- norm(max(0, p - q)) and the next child is tried;
when no child is accepted a token is drawn from p (the correction), and after the last accepted node of a
full path a token is drawn from the target there (the bonus). This multi-draft rule (SpecInfer / EAGLE,
ALGORITHMS.md section 1) makes every emitted token an exact sample of the target:
- a node with one child (a chain) samples that child from the draft's distribution q: the rule is
  Leviathan/Chen speculative sampling;
- a node with several children takes the draft's top-k tokens, each with a one-hot q: acceptance with
  probability p(c), and a rejection removes c from p.
At temperature 0 p and q are one-hot, so acceptance is exact match with the target's argmax, and the output is
token for token the output of autoregressive greedy decoding.

Drafters (all share the tree machinery):
- `model`: a separate draft model with its own KV cache (its cache may lag the target's by one token; each
  step re-feeds the last committed token and the pending one);
- `layer_skip`: the target itself with a static subset of layers skipped, drafting over the target's own
  cache (draft writes are overwritten by the verification);
- `prompt_lookup`: no model; the continuation of the earliest earlier match of the last n tokens
  (n = max_ngram .. 1) in the prompt and output so far (chains only).

With `adaptive=True` a row's draft depth moves within [1, depth of the template]: one deeper after a step
that accepted every draft, one shallower otherwise. Nodes below a row's depth are not proposed (they are
rejected without being tried), so the output distribution is unchanged; draft model calls stop at the
deepest row's depth. The verification chunk keeps its static size.

Batches are ragged: every row has its own cache length, positions and accepted length; only the accepted
path's KV entries are kept (compacted in place), in target and draft caches; no realignment copies.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from jspec import masks, sampling
from jspec.cache import KVCache, scatter_rows
from jspec.models.model import Model
from jspec.strategies.base import (
    DecodeOutput,
    OutputBuffer,
    Prompts,
    mark_cache_full,
    prefill,
    register_strategy,
    static_field,
)
from jspec.strategies.tree import TreeTemplate

DRAFTERS = ("model", "layer_skip", "prompt_lookup")


@struct.dataclass
class SpeculativeState:
    cache: KVCache  # target cache; lengths[b] = committed tokens (all but the pending one)
    draft_cache: KVCache | None  # the draft model's own cache (drafter "model" only)
    history: jax.Array  # [B, H] int32: prompt and emitted tokens; history[b, cache.lengths[b]] is pending
    output: OutputBuffer
    sampling: sampling.SamplingParams
    stop_tokens: jax.Array  # [B, K]
    key: jax.Array
    step: jax.Array  # [] int32
    draft_depth: jax.Array  # [B] int32: the depth a row drafts to (adaptive), <= template depth
    stats: dict[str, jax.Array]


@struct.dataclass
class Speculative:
    """Speculative decoding with a pluggable drafter (see the module docstring for the guarantees).

    draft: the draft model (drafter "model"); must share the target's vocabulary.
    num_draft_tokens: the chain length (ignored when `tree` is given).
    tree: branching factor per depth, e.g. (3, 2, 1, 1): a static tree of top-k children.
    tree_parents: an explicit template instead (parent of each node, -1 = root, breadth-first).
    drafter: "model", "layer_skip" or "prompt_lookup" (default: "model" with a draft, else "layer_skip"
        when skip_layers is given).
    skip_layers: layers the self-speculative draft leaves out.
    max_ngram: the longest n-gram prompt lookup matches.
    adaptive: adapt each row's draft depth (see the module docstring).
    temperature, top_k, top_p, min_p: sampling (traced; 0 temperature = greedy).
    """

    name: ClassVar[str] = "speculative"
    draft: Model | None = None
    num_draft_tokens: int = static_field(default=4)
    tree: tuple[int, ...] | None = static_field(default=None)
    tree_parents: tuple[int, ...] | None = static_field(default=None)
    drafter: str | None = static_field(default=None)
    skip_layers: tuple[int, ...] = static_field(default=())
    max_ngram: int = static_field(default=3)
    adaptive: bool = static_field(default=False)
    temperature: Any = 0.0
    top_k: Any = 0
    top_p: Any = 1.0
    min_p: Any = 0.0

    # --- configuration -----------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        if self.drafter is not None:
            return self.drafter
        return "model" if self.draft is not None else "layer_skip" if self.skip_layers else "model"

    @property
    def template(self) -> TreeTemplate:
        if self.tree_parents is not None:
            return TreeTemplate(tuple(self.tree_parents))
        if self.tree is not None:
            return TreeTemplate.from_branching(tuple(self.tree))
        return TreeTemplate.chain(self.num_draft_tokens)

    def validate(self, model: Model, prompts: Prompts) -> None:
        if isinstance(self.num_draft_tokens, bool) or not isinstance(self.num_draft_tokens, int) or self.num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens: expected an int >= 1, got {self.num_draft_tokens!r}")
        if self.kind not in DRAFTERS:
            raise ValueError(f"drafter: expected one of {DRAFTERS}, got {self.kind!r}")
        template = self.template  # raises for a template that is not a tree
        if self.kind == "model":
            if not isinstance(self.draft, Model):
                raise ValueError("draft: the 'model' drafter needs a draft model (draft=jspec.load(...))")
            if self.draft.config.vocab_size != model.config.vocab_size:
                raise ValueError(
                    f"draft: vocabulary size {self.draft.config.vocab_size} differs from the target's "
                    f"{model.config.vocab_size}; the draft must share the target's tokenizer"
                )
        if self.kind == "layer_skip":
            layers = model.config.num_layers
            if not self.skip_layers or any(not 0 <= i < layers for i in self.skip_layers) or len(set(self.skip_layers)) >= layers:
                raise ValueError(
                    f"skip_layers: expected distinct layer indices in [0, {layers}) leaving at least one layer, got {self.skip_layers!r}"
                )
        if self.kind == "prompt_lookup":
            if not template.is_chain:
                raise ValueError("tree: prompt lookup drafts one continuation; use a chain (num_draft_tokens)")
            if not isinstance(self.max_ngram, int) or self.max_ngram < 1:
                raise ValueError(f"max_ngram: expected an int >= 1, got {self.max_ngram!r}")
        sampling.validate_sampling_options(
            prompts.batch_size, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p
        )

    def cache_headroom(self) -> int:
        return self.template.num_nodes + 1

    # --- the state machine ---------------------------------------------------------------------------

    def init(self, model: Model, prompts: Prompts, key: jax.Array) -> SpeculativeState:
        batch = prompts.batch_size
        template = self.template
        cache = model.new_cache(batch, prompts.cache_size, max_chunk=template.num_nodes + 1)
        logits, cache = prefill(model, prompts, cache)
        params = sampling.SamplingParams.broadcast(batch, self.temperature, self.top_k, self.top_p, self.min_p)
        first = sampling.sample(jax.random.fold_in(key, 0), logits, params)
        draft_cache, draft_calls = None, 0
        if self.kind == "model":
            draft_cache = self.draft.new_cache(batch, prompts.cache_size, max_chunk=template.num_nodes + 2)
            _, draft_cache = prefill(self.draft, prompts, draft_cache)
            draft_calls = 1
        history = jnp.full((batch, prompts.cache_size + template.num_nodes + 2), -1, jnp.int32)
        history = history.at[:, : prompts.tokens.shape[1]].set(prompts.tokens)
        history = scatter_rows(history, first[:, None], prompts.lengths[:, None])
        output = OutputBuffer.create(batch, prompts.max_new_tokens).append(first[:, None], jnp.ones_like(first), prompts.stop_tokens)
        depth = template.max_depth
        return SpeculativeState(
            cache=cache,
            draft_cache=draft_cache,
            history=history,
            output=mark_cache_full(output, cache.lengths, cache.capacity, template.num_nodes + 1),
            sampling=params,
            stop_tokens=prompts.stop_tokens,
            key=key,
            step=jnp.int32(1),
            draft_depth=jnp.full((batch,), depth, jnp.int32),
            stats={
                "model_calls": jnp.int32(1),
                "draft_calls": jnp.int32(draft_calls),
                "active_steps": jnp.zeros((batch,), jnp.int32),
                "emitted_drafts": jnp.zeros((batch,), jnp.int32),  # accepted draft tokens in the output
                "emitted_corrections": jnp.zeros((batch,), jnp.int32),  # correction / bonus tokens in the output
                "accepted_histogram": jnp.zeros((depth + 1,), jnp.int32),
                "accepted_by_depth": jnp.zeros((depth,), jnp.int32),
                "tried_by_depth": jnp.zeros((depth,), jnp.int32),
            },
        )

    def step(self, model: Model, state: SpeculativeState) -> SpeculativeState:
        template = self.template
        running = ~state.output.finished
        lengths = state.cache.lengths
        pending = jnp.take_along_axis(state.history, lengths[:, None], axis=1)[:, 0]
        step_key = jax.random.fold_in(state.key, state.step)
        draft_key, walk_key = jax.random.split(step_key)
        depth_limit = jnp.where(running, state.draft_depth, 0)

        proposal = self._propose(model, state, pending, depth_limit, draft_key)
        cache = proposal.target_cache

        # verify: one target forward over [pending, nodes] with the tree mask
        width = template.num_nodes + 1
        tokens = jnp.concatenate([pending[:, None], proposal.tokens], axis=1)
        offsets = jnp.asarray([0, *template.depths.tolist()], jnp.int32)
        slots = jnp.where(running[:, None], lengths[:, None] + jnp.arange(width, dtype=jnp.int32), cache.capacity)
        mask = masks.prefix_and_block_mask(lengths, jnp.asarray(template.ancestors), lengths, cache.capacity)
        logits, cache = model.forward(tokens, lengths[:, None] + offsets, cache, mask, write_slots=slots)
        walk = jax.lax.cond(
            _all_greedy(state.sampling),
            lambda: _accept_greedy(template, logits, proposal),
            lambda: _accept(template, _probabilities(logits, state.sampling), proposal, state.sampling, walk_key),
        )
        num_accepted = jnp.where(running, walk.num_accepted, 0)

        # commit: keep the accepted path's entries, emit path + correction/bonus
        if not template.is_chain:
            sources = jnp.where(walk.path >= 0, lengths[:, None] + 1 + walk.path, -1)
            cache = cache.compact(sources, lengths + 1)
        new_lengths = jnp.where(running, lengths + num_accepted + 1, lengths)
        cache = cache.with_lengths(new_lengths)
        draft_cache = proposal.draft_cache
        if draft_cache is not None and not template.is_chain:
            draft_cache = draft_cache.compact(jnp.where(walk.path >= 0, lengths[:, None] + 1 + walk.path, -1), lengths + 1)

        emitted = walk.emitted  # [B, D + 1]
        history_slots = jnp.where(
            running[:, None] & (jnp.arange(emitted.shape[1]) <= num_accepted[:, None]),
            lengths[:, None] + 1 + jnp.arange(emitted.shape[1]),
            state.history.shape[1],
        )
        history = scatter_rows(state.history, emitted, history_slots)
        output = state.output.append(emitted, jnp.where(running, num_accepted + 1, 0), state.stop_tokens)
        kept = output.lengths - state.output.lengths  # emitted this step after stop tokens / length limit
        kept_drafts = jnp.minimum(num_accepted, kept)
        output = mark_cache_full(output, new_lengths, cache.capacity, template.num_nodes + 1)

        draft_depth = state.draft_depth
        if self.adaptive:
            accepted_all = num_accepted >= proposal.valid_depth
            draft_depth = jnp.where(
                running,
                jnp.where(accepted_all, jnp.minimum(draft_depth + 1, template.max_depth), jnp.maximum(draft_depth - 1, 1)),
                draft_depth,
            )

        stats = dict(state.stats)
        stats["model_calls"] = stats["model_calls"] + 1
        stats["draft_calls"] = stats["draft_calls"] + proposal.draft_calls
        stats["active_steps"] = stats["active_steps"] + running
        stats["emitted_drafts"] = stats["emitted_drafts"] + kept_drafts
        stats["emitted_corrections"] = stats["emitted_corrections"] + (kept - kept_drafts)
        stats["accepted_histogram"] = stats["accepted_histogram"] + jnp.zeros_like(stats["accepted_histogram"]).at[num_accepted].add(running.astype(jnp.int32))
        stats["accepted_by_depth"] = stats["accepted_by_depth"] + jnp.sum(walk.accepted_at_depth & running[:, None], axis=0)
        stats["tried_by_depth"] = stats["tried_by_depth"] + jnp.sum(walk.tried_at_depth & running[:, None], axis=0)
        return state.replace(
            cache=cache,
            draft_cache=draft_cache,
            history=history,
            output=output,
            step=state.step + 1,
            draft_depth=draft_depth,
            stats=stats,
        )

    def done(self, state: SpeculativeState) -> jax.Array:
        return state.output.finished

    def output(self, state: SpeculativeState) -> DecodeOutput:
        stats = dict(state.stats)
        stats["steps"] = state.step
        stats["tokens_generated"] = state.output.lengths
        # tokens per target call: every row's first token comes from the prefill call
        stats["mean_accepted_length"] = state.output.lengths / jnp.maximum(stats["active_steps"] + 1, 1)
        stats["acceptance_rate_by_depth"] = stats["accepted_by_depth"] / jnp.maximum(stats["tried_by_depth"], 1)
        return DecodeOutput(
            tokens=state.output.tokens, lengths=state.output.lengths, finish_reason=state.output.finish_reason, stats=stats
        )

    # --- drafting ------------------------------------------------------------------------------------

    def _propose(self, model: Model, state: SpeculativeState, pending: jax.Array, depth_limit: jax.Array, key: jax.Array) -> "Proposal":
        template = self.template
        depths = jnp.asarray(template.depths)
        if self.kind == "prompt_lookup":
            tokens, found = prompt_lookup(state.history, state.cache.lengths, self.max_ngram, template.num_nodes)
            valid = found & (depths[None, :] <= depth_limit[:, None])
            return Proposal(tokens, None, valid, jnp.sum(valid, axis=1), state.cache, None, jnp.int32(0), sampled_from_parent=())
        valid = depths[None, :] <= depth_limit[:, None]
        tokens, parent_logits, target_cache, draft_cache, calls = self._draft_tree(model, state, pending, depth_limit, key)
        valid_depth = jnp.minimum(depth_limit, template.max_depth)
        sampled = tuple(bool(x) for x in _single_child_nodes(template))
        return Proposal(tokens, parent_logits, valid, valid_depth, target_cache, draft_cache, calls, sampled_from_parent=sampled)

    def _draft_tree(self, model: Model, state: SpeculativeState, pending: jax.Array, depth_limit: jax.Array, key: jax.Array):
        """Expand the template level by level with the draft network: one draft forward per level."""
        template = self.template
        lengths = state.cache.lengths
        batch = pending.shape[0]
        if self.kind == "model":
            draft_model, cache = self.draft, state.draft_cache
            previous = jnp.take_along_axis(state.history, jnp.maximum(lengths - 1, 0)[:, None], axis=1)[:, 0]
            first_tokens = jnp.stack([previous, pending], axis=1)
            first_positions = lengths[:, None] + jnp.asarray([[-1, 0]], jnp.int32)
            root_logits, cache = draft_model.forward(first_tokens, first_positions, cache, write_slots=first_positions, output_indices=jnp.ones((batch, 1), jnp.int32))
            skip: tuple[int, ...] = ()
        else:
            draft_model, cache, skip = model, state.cache, tuple(self.skip_layers)
            root_logits, cache = model.forward(pending[:, None], lengths[:, None], cache, write_slots=lengths[:, None], skip_layers=skip)

        num_nodes = template.num_nodes
        vocab = root_logits.shape[-1]
        node_logits = jnp.zeros((batch, num_nodes + 1, vocab), jnp.float32).at[:, 0].set(root_logits[:, 0])
        tokens = jnp.zeros((batch, num_nodes), jnp.int32)
        parent_logits_all = jnp.zeros((batch, num_nodes, vocab), jnp.float32)
        single_child = _single_child_nodes(template)
        greedy = _all_greedy(state.sampling)
        calls = jnp.int32(1)
        deepest = jnp.max(depth_limit)
        for depth, (start, end) in enumerate(template.levels, start=1):
            parent_rows = jnp.asarray([template.parents[n] + 1 for n in range(start, end)])
            parent_logits = node_logits[:, parent_rows]  # [B, W, V]
            max_rank = int(template.sibling_rank[start:end].max()) + 1
            top = jax.lax.top_k(parent_logits, max_rank)[1].astype(jnp.int32)  # [B, W, max_rank]
            ranks = jnp.asarray(template.sibling_rank[start:end])
            ranked = jnp.take_along_axis(top, ranks[None, :, None], axis=2)[:, :, 0]
            level_key = jax.random.fold_in(key, depth)
            sampled = jax.lax.cond(
                greedy,
                lambda: ranked,
                lambda: jax.random.categorical(level_key, jnp.log(_probabilities(parent_logits, state.sampling)), axis=-1).astype(jnp.int32),
            )
            level_tokens = jnp.where(jnp.asarray(single_child[start:end])[None, :], sampled, ranked)
            tokens = tokens.at[:, start:end].set(level_tokens)
            parent_logits_all = parent_logits_all.at[:, start:end].set(parent_logits)
            if depth == template.max_depth:
                break
            # run this level through the draft to get its children's distributions
            visibility = jnp.asarray(template.ancestors[start + 1 : end + 1, 1:])  # [W, N]
            mask = masks.prefix_and_block_mask(lengths + 1, visibility, lengths + 1, cache.capacity)
            slots = lengths[:, None] + 1 + jnp.arange(start, end, dtype=jnp.int32)
            positions = jnp.broadcast_to(lengths[:, None] + depth, slots.shape)

            def run_level(operands, level_tokens=level_tokens, mask=mask, slots=slots, positions=positions):
                cache, node_logits = operands
                level_logits, cache = draft_model.forward(level_tokens, positions, cache, mask, write_slots=slots, skip_layers=skip)
                return cache, node_logits.at[:, start + 1 : end + 1].set(level_logits)

            cache, node_logits = jax.lax.cond(depth < deepest, run_level, lambda operands: operands, (cache, node_logits))
            calls = calls + (depth < deepest)
        if self.kind == "model":
            return tokens, parent_logits_all, state.cache, cache, calls
        return tokens, parent_logits_all, cache, None, calls


@struct.dataclass
class Proposal:
    tokens: jax.Array  # [B, N] int32
    parent_logits: jax.Array | None  # [B, N, V] the draft's logits at each node's parent (None: no draft model)
    valid: jax.Array  # [B, N] bool: node proposed (rejected untried otherwise)
    valid_depth: jax.Array  # [B] int32: the depth a row drafted to
    target_cache: KVCache
    draft_cache: KVCache | None
    draft_calls: jax.Array  # [] int32
    sampled_from_parent: tuple[bool, ...] = static_field()  # per node: drawn from the draft distribution (else top-k)

    def proposal_probs(self, node: jax.Array, params: sampling.SamplingParams, vocab_size: int) -> jax.Array:
        """q [B, V] of node [B]: the draft distribution where the node was sampled from it, else one-hot."""
        rows = jnp.arange(self.tokens.shape[0])
        one_hot = jax.nn.one_hot(self.tokens[rows, node], vocab_size, dtype=jnp.float32)
        if self.parent_logits is None or not any(self.sampled_from_parent):
            return one_hot
        sampled = jnp.asarray(self.sampled_from_parent)[node]
        return jnp.where(sampled[:, None], sampling.probabilities(self.parent_logits[rows, node], params), one_hot)


@struct.dataclass
class Walk:
    num_accepted: jax.Array  # [B] int32
    path: jax.Array  # [B, D] int32 accepted node per depth, -1 past the end
    emitted: jax.Array  # [B, D + 1] int32: the accepted tokens, then the correction/bonus token
    accepted_at_depth: jax.Array  # [B, D] bool
    tried_at_depth: jax.Array  # [B, D] bool


def _probabilities(logits: jax.Array, params: sampling.SamplingParams) -> jax.Array:
    """`sampling.probabilities` for logits [B, W, V] with per-row parameters."""
    batch, width, vocab = logits.shape
    repeat = lambda x: jnp.repeat(x, width, axis=0)  # noqa: E731
    flat = sampling.SamplingParams(repeat(params.temperature), repeat(params.top_k), repeat(params.top_p), repeat(params.min_p))
    return sampling.probabilities(logits.reshape(batch * width, vocab), flat).reshape(batch, width, vocab)


def _all_greedy(params: sampling.SamplingParams) -> jax.Array:
    return jnp.all(params.temperature == 0)


def _single_child_nodes(template: TreeTemplate):
    """[N] bool (numpy): nodes that are their parent's only child (drawn from the draft distribution)."""
    num_children = (template.children >= 0).sum(axis=1)
    return num_children[[p + 1 for p in template.parents]] == 1


def _accept_greedy(template: TreeTemplate, logits: jax.Array, proposal: Proposal) -> Walk:
    """`_accept` when every row is greedy (p and q one-hot): a draft is accepted iff it is the target's
    argmax; the final token is the argmax after the last accepted node. Same result, no [B, N, V] work."""
    rows = jnp.arange(logits.shape[0])
    choice = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, N + 1]

    def try_child(carry, current, child, token, offered, draw):
        return offered & (token == choice[rows, current + 1]), carry

    path, accepted_at, tried_at, current, _ = _traverse(template, proposal, None, try_child, lambda carry, accepted, chosen: carry)
    return _walk(proposal, path, accepted_at, tried_at, choice[rows, current + 1])


def _accept(template: TreeTemplate, target_probs: jax.Array, proposal: Proposal, params: sampling.SamplingParams, key: jax.Array) -> Walk:
    """Walk the tree from the root with the multi-draft rejection rule (module docstring)."""
    rows = jnp.arange(target_probs.shape[0])

    def try_child(probs, current, child, token, offered, draw):
        q = proposal.proposal_probs(child, params, probs.shape[-1])  # [B, V]
        take = offered & (draw(key) * q[rows, token] < probs[rows, token])
        return take, jnp.where((offered & ~take)[:, None], residual_distribution(probs, q), probs)

    def enter(probs, accepted, chosen):
        return jnp.where(accepted[:, None], target_probs[rows, chosen + 1], probs)

    path, accepted_at, tried_at, _, probs = _traverse(template, proposal, target_probs[:, 0], try_child, enter)
    drawn = jax.random.categorical(jax.random.fold_in(key, 1 << 20), jnp.log(probs), axis=-1)
    final = jnp.where(params.temperature > 0, drawn, jnp.argmax(probs, axis=-1)).astype(jnp.int32)
    return _walk(proposal, path, accepted_at, tried_at, final)


def _traverse(template: TreeTemplate, proposal: Proposal, carry: Any, try_child, enter):
    """Descend the tree from the root, trying each node's children in rank order until one is accepted.

    try_child(carry, current [B], child [B], token [B], offered [B], draw) -> (take [B], carry), where
    draw(key) gives this trial's uniforms; enter(carry, accepted [B], chosen [B]) -> carry after a level.
    Returns path [B, D], accepted_at [B, D], tried_at [B, D], the last accepted node [B] (-1 = root), carry.
    """
    batch = proposal.tokens.shape[0]
    rows = jnp.arange(batch)
    children = jnp.asarray(template.children)
    current = jnp.full((batch,), -1, jnp.int32)
    alive = jnp.ones((batch,), bool)
    path, accepted_at, tried_at = [], [], []
    for depth in range(1, template.max_depth + 1):
        accepted = jnp.zeros((batch,), bool)
        chosen = jnp.full((batch,), -1, jnp.int32)
        tried = jnp.zeros((batch,), bool)
        for rank in range(children.shape[1]):
            child = children[current + 1, rank]
            safe = jnp.maximum(child, 0)
            offered = (child >= 0) & alive & ~accepted & proposal.valid[rows, safe]
            draw = lambda key, trial=depth * 1024 + rank: jax.random.uniform(jax.random.fold_in(key, trial), (batch,))  # noqa: E731
            take, carry = try_child(carry, current, safe, proposal.tokens[rows, safe], offered, draw)
            chosen = jnp.where(take, child, chosen)
            accepted |= take
            tried |= offered
        carry = enter(carry, accepted, chosen)
        path.append(jnp.where(accepted, chosen, -1))
        accepted_at.append(accepted)
        tried_at.append(tried)
        alive &= accepted
        current = jnp.where(accepted, chosen, current)
    stack = lambda xs: jnp.stack(xs, axis=1)  # noqa: E731
    return stack(path), stack(accepted_at), stack(tried_at), current, carry


def _walk(proposal: Proposal, path: jax.Array, accepted_at: jax.Array, tried_at: jax.Array, final: jax.Array) -> Walk:
    """Assemble a Walk: emitted = the accepted path's tokens, then the final (correction/bonus) token."""
    batch = path.shape[0]
    rows = jnp.arange(batch)
    num_accepted = jnp.sum(accepted_at, axis=1, dtype=jnp.int32)
    path_tokens = jnp.where(path >= 0, proposal.tokens[rows[:, None], jnp.maximum(path, 0)], 0)
    emitted = jnp.concatenate([path_tokens, jnp.zeros((batch, 1), jnp.int32)], axis=1).at[rows, num_accepted].set(final)
    return Walk(num_accepted, path, emitted, accepted_at, tried_at)


def residual_distribution(target: jax.Array, proposal: jax.Array) -> jax.Array:
    """norm(max(0, p - q)) per row [B, V]: what is left of p after rejecting a draft from q (p where p == q)."""
    residual = jnp.maximum(target - proposal, 0.0)
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    return jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), target)


def prompt_lookup(
    history: jax.Array,  # [B, H] int32
    pending_index: jax.Array,  # [B] int32: index of the last known token
    max_ngram: int,
    num_tokens: int,
) -> tuple[jax.Array, jax.Array]:  # tokens [B, num_tokens], found [B, num_tokens] bool
    """The `num_tokens` tokens after the earliest earlier occurrence of the last n known tokens, trying
    n = max_ngram down to 1; `found` marks tokens that exist (a match near the end yields fewer)."""
    batch, size = history.shape
    rows = jnp.arange(batch)[:, None]
    starts = jnp.arange(size)[None, :]
    best_start = jnp.zeros((batch,), jnp.int32)
    best_found = jnp.zeros((batch,), bool)
    for n in range(max_ngram, 0, -1):
        pattern_index = pending_index[:, None] - n + 1 + jnp.arange(n)[None, :]
        pattern = history[rows, jnp.clip(pattern_index, 0, size - 1)]  # [B, n]
        match = (starts + n <= pending_index[:, None]) & (pending_index[:, None] - n + 1 >= 0)
        for offset in range(n):
            shifted = jnp.concatenate([history[:, offset:], jnp.full((batch, offset), -1, history.dtype)], axis=1)
            match &= shifted == pattern[:, offset : offset + 1]
        found = jnp.any(match, axis=1)
        start = jnp.argmax(match, axis=1).astype(jnp.int32) + n  # first token after the match
        take = found & ~best_found
        best_start = jnp.where(take, start, best_start)
        best_found |= found
    index = best_start[:, None] + jnp.arange(num_tokens)[None, :]
    found = best_found[:, None] & (index <= pending_index[:, None])
    return jnp.where(found, history[rows, jnp.clip(index, 0, size - 1)], 0), found


def speculative(
    *,
    draft: Model | None = None,
    num_draft_tokens: int = 4,
    tree: tuple[int, ...] | None = None,
    tree_parents: tuple[int, ...] | None = None,
    skip_layers: tuple[int, ...] = (),
    adaptive: bool = False,
    temperature: Any = 0.0,
    top_k: Any = 0,
    top_p: Any = 1.0,
    min_p: Any = 0.0,
) -> Speculative:
    """Draft-model speculative decoding (or self-speculative when only skip_layers is given)."""
    if draft is None and not skip_layers:
        raise ValueError("draft: strategy 'speculative' needs draft=<jspec.Model> (or skip_layers=... for self-speculative)")
    return Speculative(
        draft=draft.without_tokenizer() if isinstance(draft, Model) else draft,
        num_draft_tokens=num_draft_tokens,
        tree=None if tree is None else tuple(tree),
        tree_parents=None if tree_parents is None else tuple(tree_parents),
        skip_layers=tuple(skip_layers),
        adaptive=adaptive,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
    )


def prompt_lookup_strategy(
    *, num_draft_tokens: int = 10, max_ngram: int = 3, adaptive: bool = False, temperature: Any = 0.0, top_k: Any = 0, top_p: Any = 1.0, min_p: Any = 0.0
) -> Speculative:
    """Prompt-lookup decoding: drafts copied from earlier n-gram matches (defaults as Hugging Face's)."""
    return Speculative(
        drafter="prompt_lookup", num_draft_tokens=num_draft_tokens, max_ngram=max_ngram, adaptive=adaptive,
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
    )


def self_speculative(
    *, skip_layers: tuple[int, ...], num_draft_tokens: int = 4, tree: tuple[int, ...] | None = None, adaptive: bool = False,
    temperature: Any = 0.0, top_k: Any = 0, top_p: Any = 1.0, min_p: Any = 0.0,
) -> Speculative:
    """Self-speculative decoding: the target with `skip_layers` left out drafts for itself."""
    return Speculative(
        drafter="layer_skip", skip_layers=tuple(skip_layers), num_draft_tokens=num_draft_tokens,
        tree=None if tree is None else tuple(tree), adaptive=adaptive,
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
    )


register_strategy("speculative", speculative)
register_strategy("prompt_lookup", prompt_lookup_strategy)
register_strategy("self_speculative", self_speculative)
