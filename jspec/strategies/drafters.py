"""Drafters for speculative decoding: what proposes the draft tree that `Speculative` verifies.

A drafter is a small frozen `flax.struct` dataclass (its static fields select the compiled code; a draft model's
parameters are traced leaves) with four pure functions:

    validate(target, template, prompts) -> None            concrete checks, before tracing
    init(target, prompts, template) -> drafter state       a pytree kept in `SpeculativeState.drafter_state`
    propose(target, state, pending, depth_limit, key, template) -> Proposal
    commit(drafter_state, template, path, lengths) -> drafter state    after the acceptance walk

`propose` may draft into the target cache (layer skip does): whatever it writes past the committed lengths is
overwritten by the verification, which writes every slot the verification reads.

Drafters that draft from the verification forward itself (no network of their own) may also define

    extra_layout(template) -> (offsets [E], visibility [E, N + 1 + E]) or None   tokens of their own in that forward
    observe(drafter_state, verified: Verified) -> drafter state                   after the step, with its outputs

`extra_layout` (numpy, static) adds E tokens after the draft nodes in the verification forward: `Proposal.extra_tokens`
[B, E], at positions lengths + offsets, each seeing the committed prefix and the chunk entries `visibility` marks
(over [pending, nodes, extra]); the nodes never see them, so the verification is unchanged. `observe` receives
that forward's logits (nodes and extra tokens), the accepted lengths and the updated history (Jacobi windows
refresh from them, Lookahead's n-gram pool grows from them). `Proposal.sampled_from_parent`
tells the acceptance walk which nodes were drawn from the draft distribution (q = the draft's warped
distribution) and which were taken as top-k (q one-hot): that is what keeps the walk lossless.

- `DraftModelDrafter(draft)`: a separate draft model with its own KV cache, which may lag the target's by one
  token (each step re-feeds the last committed token and the pending one);
- `LayerSkipDrafter(skip_layers)`: the target with a static subset of layers left out, over the target's cache;
- `PromptLookupDrafter(max_ngram)`: no network; the continuation of the earliest earlier match of the last n
  tokens (n = max_ngram .. 1) in the prompt and output so far (chains only).

The two draft-network drafters share `expand_tree`: one draft forward per level of the template. Caches come only
from `Model.new_cache`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from flax import struct

from jspec import masks, sampling, validation
from jspec.cache import Cache
from jspec.models.model import Model
from jspec.processors import Processing
from jspec.strategies.base import Prompts, prefill_tokens, run_either, run_if, static_field
from jspec.strategies.tree import TreeTemplate
from jspec.validation import ArgumentError

if TYPE_CHECKING:
    from jspec.strategies.speculative import SpeculativeState

DRAFTER_NAMES = ("model", "layer_skip", "prompt_lookup")
MAX_NGRAM = 16  # prompt lookup compares every n-gram length up to this (work grows as max_ngram^2)


@struct.dataclass
class Proposal:
    """A drafted tree, with what the acceptance walk needs to stay lossless."""

    tokens: jax.Array  # [B, N] int32
    parent_logits: jax.Array | None  # [B, N, V] the draft's logits at each node's parent (None: no draft network)
    valid: jax.Array  # [B, N] bool: node proposed (rejected untried otherwise)
    valid_depth: jax.Array  # [B] int32: the depth a row drafted to
    target_cache: Cache  # the target cache after drafting (layer skip drafts into it)
    drafter_state: Any  # the drafter's state after drafting
    draft_calls: jax.Array  # [] int32: draft forward calls made
    sampled_from_parent: tuple[bool, ...] = static_field()  # per node: drawn from the draft distribution (else top-k)
    extra_tokens: jax.Array | None = None  # [B, E] int32: the drafter's own tokens in the verification (extra_layout)
    token_probs: jax.Array | None = None  # [B, N] q(token) of each node (1 where q is one-hot; None: all one-hot)

    def drafted_probs(self, params: sampling.SamplingParams) -> jax.Array:  # [B, N] float32
        """q(token) of each node under the distribution it was drafted from (1 for top-k and copied drafts):
        `token_probs` when the drafter kept them, else from `parent_logits`."""
        if self.token_probs is not None:
            return self.token_probs
        ones = jnp.ones(self.tokens.shape, jnp.float32)
        if self.parent_logits is None or not any(self.sampled_from_parent):
            return ones
        q = jnp.take_along_axis(warped_probabilities(self.parent_logits, params), self.tokens[:, :, None], axis=2)[:, :, 0]
        return jnp.where(jnp.asarray(self.sampled_from_parent)[None, :], q, ones)

    def proposal_probs(self, node: jax.Array, params: sampling.SamplingParams, vocab_size: int) -> jax.Array:
        """q [B, V] of node [B]: the draft distribution where the node was sampled from it, else one-hot."""
        rows = jnp.arange(self.tokens.shape[0])
        one_hot = jax.nn.one_hot(self.tokens[rows, node], vocab_size, dtype=jnp.float32)
        if self.parent_logits is None or not any(self.sampled_from_parent):
            return one_hot
        sampled = jnp.asarray(self.sampled_from_parent)[node]
        return jnp.where(sampled[:, None], sampling.probabilities(self.parent_logits[rows, node], params), one_hot)


@struct.dataclass
class Verified:
    """What one step's verification showed, for a drafter's `observe` (all rows; finished rows included)."""

    logits: jax.Array  # [B, N + 1, V] target logits at (pending, nodes)
    extra_logits: jax.Array | None  # [B, E, V] target logits at the drafter's extra tokens (None: none)
    num_accepted: jax.Array  # [B] int32: nodes accepted this step (0 for finished rows)
    history: jax.Array  # [B, H] int32 after the step: prompt and emitted tokens
    lengths: jax.Array  # [B] int32 after the step: history[b, lengths[b]] is the new pending token
    running: jax.Array  # [B] bool: rows that ran this step
    sampling: sampling.SamplingParams
    key: jax.Array  # independent of the keys of the drafting and of the acceptance walk


class Drafter(Protocol):
    """The contract every drafter implements (see the module docstring)."""

    @property
    def prefill_calls(self) -> int: ...  # draft forward calls `init` makes

    def validate(self, target: Model, template: TreeTemplate, prompts: Prompts) -> None: ...

    def init(self, target: Model, prompts: Prompts, template: TreeTemplate) -> Any: ...

    def propose(
        self,
        target: Model,
        state: SpeculativeState,  # the step's state; its drafter_state is this drafter's
        pending: jax.Array,  # [B] int32: the token at slot cache.lengths[b], not yet in the target cache
        depth_limit: jax.Array,  # [B] int32: deepest depth a row may propose (0 for finished rows)
        key: jax.Array,
        template: TreeTemplate,
    ) -> Proposal: ...

    def commit(
        self,
        drafter_state: Any,
        template: TreeTemplate,
        path: jax.Array,  # [B, D] int32: accepted node per depth, -1 past the end
        lengths: jax.Array,  # [B] int32: committed lengths before the step (the pending token's slot)
    ) -> Any: ...


# --- the draft model ---------------------------------------------------------------------------------------


@struct.dataclass
class DraftModelState:
    """The draft model's KV cache and, while its prefill is deferred, the prompts it has yet to read."""

    cache: Cache
    prompt_tokens: jax.Array | None = None  # [B, T] int32, right-padded (None: the prompts were read at init)
    prompt_lengths: jax.Array | None = None  # [B] int32
    unread: jax.Array | None = None  # [] bool: the prompts are not in the cache yet


@struct.dataclass
class DraftModelDrafter:
    """A separate draft model sharing the target's vocabulary; its state (`DraftModelState`) is its own KV cache.

    defer_prefill: read the prompts into the draft's cache at the first step that drafts rather than at `init`, so
    a decode whose steps never draft (auto depth at a low acceptance or a large batch) never pays for the draft's
    prefill. The cache then holds exactly what an eager prefill leaves there (the steps that did not draft write
    nothing to it), so the tokens are the same either way. None: the strategy chooses (`Speculative` defers under
    adaptive="auto", where the first steps may not draft).
    """

    draft: Model | None
    catch_up: int = static_field(default=1)  # committed tokens re-read before the pending one after idle steps
    defer_prefill: bool | None = static_field(default=None)

    @property
    def prefill_calls(self) -> int:
        return 0 if self.defer_prefill else 1

    def validate(self, target: Model, template: TreeTemplate, prompts: Prompts) -> None:
        if not isinstance(self.draft, Model):
            raise ArgumentError("draft: the 'model' drafter needs a draft model (draft=jspec.load(...))")
        if self.defer_prefill is not None:
            validation.check_bool("defer_prefill", self.defer_prefill)
        if self.draft.config.vocab_size != target.config.vocab_size:
            raise ArgumentError(
                f"draft: vocabulary size {self.draft.config.vocab_size} differs from the target's "
                f"{target.config.vocab_size}; the draft must share the target's tokenizer"
            )

    def init(self, target: Model, prompts: Prompts, template: TreeTemplate) -> DraftModelState:
        max_chunk = max(template.num_nodes, self.catch_up) + 2
        cache = self.draft.new_cache(prompts.batch_size, prompts.cache_size, max_chunk=max_chunk)
        if self.defer_prefill:
            return DraftModelState(cache, prompts.tokens, prompts.lengths, jnp.bool_(True))
        return DraftModelState(prefill_tokens(self.draft, prompts.tokens, prompts.lengths, cache)[1])

    def read_prompts(self, state: DraftModelState) -> DraftModelState:
        """The state with the prompts in the draft's cache: a deferred prefill runs here, once."""
        if state.unread is None:
            return state

        def read(state: DraftModelState) -> DraftModelState:
            _, cache = prefill_tokens(self.draft, state.prompt_tokens, state.prompt_lengths, state.cache)
            return state.replace(cache=cache, unread=jnp.bool_(False))

        return run_if(state.unread, read, state)

    def read_last(self, cache: Cache, history: jax.Array, lengths: jax.Array, window: int) -> tuple[jax.Array, Cache]:
        """Run the draft over the last `window` tokens up to the pending one (history[b, lengths[b]]), writing their
        entries: the draft's logits after the pending token [B, V], and its cache."""
        slots = lengths[:, None] + jnp.arange(1 - window, 1, dtype=jnp.int32)[None, :]  # [B, window]
        tokens = jnp.take_along_axis(history, jnp.maximum(slots, 0), axis=1)
        logits, cache = self.draft.forward(
            tokens, jnp.maximum(slots, 0), cache, write_slots=jnp.where(slots >= 0, slots, cache.capacity),
            output_indices=jnp.full((lengths.shape[0], 1), window - 1, jnp.int32),
        )
        return logits[:, 0], cache

    def propose(self, target, state, pending, depth_limit, key, template) -> Proposal:
        """The draft's cache lags the committed tokens by one (the last committed token is re-read with the pending
        one); after steps that did not draft (auto depth) it lags by more, and the first step back re-reads the last
        `catch_up` committed tokens (entries further back stay as they were: only the proposals can suffer)."""
        lengths = state.cache.lengths
        drafter_state = self.read_prompts(state.drafter_state)
        read = lambda window: lambda operand: self.read_last(operand[1], state.history, lengths, window)  # noqa: E731
        operand = (jnp.zeros((lengths.shape[0], self.draft.config.vocab_size), jnp.float32), drafter_state.cache)
        if self.catch_up > 1 and getattr(state, "depth_control", None) is not None:
            root_logits, cache = run_either(state.depth_control.idle_steps > 0, read(self.catch_up + 1), read(2), operand)
        else:
            root_logits, cache = read(2)(operand)
        drafted = expand_tree(
            self.draft, (), cache, root_logits, lengths, depth_limit, key, template, state.sampling,
            state.processing,
        )
        proposal = network_proposal(template, drafted, depth_limit, target_cache=state.cache,
                                    drafter_state=drafter_state.replace(cache=drafted.cache))
        if state.drafter_state.unread is None:
            return proposal
        return proposal.replace(draft_calls=proposal.draft_calls + state.drafter_state.unread)  # the deferred prefill

    def commit(self, drafter_state: DraftModelState, template: TreeTemplate, path: jax.Array, lengths: jax.Array) -> DraftModelState:
        return drafter_state.replace(cache=keep_accepted_path(drafter_state.cache, template, path, lengths))

    def cost_profile(self, target: Model) -> tuple[Any, float]:
        """What the auto depth's measured costs are remembered by, and a draft call's share of a target forward
        (its parameters' share) for the memory-bound cost model."""
        key = ("model", self.draft.config, self.catch_up, self.defer_prefill)
        return key, self.draft.num_parameters() / target.num_parameters()


# --- the target with layers skipped ------------------------------------------------------------------------


@struct.dataclass
class LayerSkipDrafter:
    """Self-speculative drafting: the target without `skip_layers`, over the target's own cache (no state)."""

    skip_layers: tuple[int, ...] = static_field()
    prefill_calls: ClassVar[int] = 0

    def validate(self, target: Model, template: TreeTemplate, prompts: Prompts) -> None:
        layers = target.config.num_layers
        skip = self.skip_layers
        if not skip or any(not 0 <= i < layers for i in skip) or len(set(skip)) >= layers:
            raise ArgumentError(
                f"skip_layers: expected distinct layer indices in [0, {layers}) leaving at least one layer, got {skip!r}"
            )

    def init(self, target: Model, prompts: Prompts, template: TreeTemplate) -> None:
        return None

    def propose(self, target, state, pending, depth_limit, key, template) -> Proposal:
        lengths = state.cache.lengths
        root_logits, cache = target.forward(
            pending[:, None], lengths[:, None], state.cache, write_slots=lengths[:, None], skip_layers=self.skip_layers
        )
        drafted = expand_tree(
            target, self.skip_layers, cache, root_logits[:, 0], lengths, depth_limit, key, template,
            state.sampling, state.processing,
        )
        return network_proposal(template, drafted, depth_limit, target_cache=drafted.cache, drafter_state=None)

    def commit(self, drafter_state: None, template: TreeTemplate, path: jax.Array, lengths: jax.Array) -> None:
        return None

    def cost_profile(self, target: Model) -> tuple[Any, float]:
        return ("layer_skip", self.skip_layers), 1 - len(self.skip_layers) / target.config.num_layers


# --- prompt lookup -----------------------------------------------------------------------------------------


@struct.dataclass
class PromptLookupDrafter:
    """Drafts copied from the earliest earlier n-gram match in the prompt and output (no network, no state)."""

    max_ngram: int = static_field(default=3)
    prefill_calls: ClassVar[int] = 0

    def validate(self, target: Model, template: TreeTemplate, prompts: Prompts) -> None:
        if not template.is_chain:
            raise ArgumentError("tree: prompt lookup drafts one continuation; use a chain (num_draft_tokens)")
        validation.check_int("max_ngram", self.max_ngram, minimum=1, maximum=MAX_NGRAM)

    def init(self, target: Model, prompts: Prompts, template: TreeTemplate) -> None:
        return None

    def propose(self, target, state, pending, depth_limit, key, template) -> Proposal:
        tokens, found = prompt_lookup(state.history, state.cache.lengths, self.max_ngram, template.num_nodes)
        valid = found & (jnp.asarray(template.depths)[None, :] <= depth_limit[:, None])
        return Proposal(
            tokens, None, valid, jnp.sum(valid, axis=1, dtype=jnp.int32), state.cache, None, jnp.int32(0),
            sampled_from_parent=(),
        )

    def commit(self, drafter_state: None, template: TreeTemplate, path: jax.Array, lengths: jax.Array) -> None:
        return None

    def cost_profile(self, target: Model) -> tuple[Any, float]:
        return ("prompt_lookup", self.max_ngram), 0.0


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
        start = sampling.argmax(match) + n  # first token after the (first) match
        take = found & ~best_found
        best_start = jnp.where(take, start, best_start)
        best_found |= found
    index = best_start[:, None] + jnp.arange(num_tokens)[None, :]
    found = best_found[:, None] & (index <= pending_index[:, None])
    return jnp.where(found, history[rows, jnp.clip(index, 0, size - 1)], 0), found


# --- shared by the drafters --------------------------------------------------------------------------------


def drafter_from_options(
    drafter: str | None, draft: Model | None, skip_layers: tuple[int, ...], max_ngram: int
) -> DraftModelDrafter | LayerSkipDrafter | PromptLookupDrafter:
    """The drafter a name selects: "model", "layer_skip" or "prompt_lookup"; None picks "model" when a draft is
    given (or nothing is), else "layer_skip" when skip_layers are."""
    skip_layers = validation.check_int_sequence("skip_layers", skip_layers, minimum=0, allow_empty=True)
    if drafter is None:
        drafter = "layer_skip" if draft is None and skip_layers else "model"
    choices = {
        "model": lambda: DraftModelDrafter(draft),
        "layer_skip": lambda: LayerSkipDrafter(tuple(skip_layers)),
        "prompt_lookup": lambda: PromptLookupDrafter(max_ngram),
    }
    if drafter not in choices:
        raise ArgumentError(f"drafter: expected one of {DRAFTER_NAMES} or a drafter object, got {drafter!r}")
    return choices[drafter]()


def expand_tree(
    network: Model,
    skip_layers: tuple[int, ...],
    cache: Cache,  # the network's cache, with every slot up to the pending token's (lengths[b]) written
    root_logits: jax.Array,  # [B, V] the network's logits after the pending token
    lengths: jax.Array,  # [B] int32: the pending token's slot and position
    depth_limit: jax.Array,  # [B] int32
    key: jax.Array,
    template: TreeTemplate,
    params: sampling.SamplingParams,
    processing: Processing,
) -> "Drafted":
    """Draft the template level by level with `network` (without `skip_layers`): one forward per level.

    The network's logits at a node are processed (`jspec.processors`) as the target's are at that node (the
    history plus the drafted path to it), so the draft proposes from the distribution the target is verified
    with; `parent_logits` are the processed logits.

    A node that is its parent's only child is drawn from the network's warped distribution there (its argmax
    when every row is greedy); the children of a node with several are its top-k, in rank order. Node i is
    written at slot lengths + 1 + i with position lengths + depth(i) and sees the committed prefix, the pending
    token, its ancestors and itself: for a chain this is the causal mask by slot, so chain levels pass no mask
    (the Pallas decode kernels can serve them). A level at depth >= max(depth_limit) is not run through the
    network (no row proposes its children). `calls` counts the root forward and the levels run.
    """
    batch, vocab = root_logits.shape
    num_nodes = template.num_nodes
    node_logits = jnp.zeros((batch, num_nodes + 1, vocab), jnp.float32).at[:, 0].set(root_logits)  # root, nodes
    tokens = jnp.zeros((batch, num_nodes), jnp.int32)
    parent_logits_all = jnp.zeros((batch, num_nodes, vocab), jnp.float32)
    token_probs = jnp.ones((batch, num_nodes), jnp.float32)
    single_child = single_child_nodes(template)
    greedy = all_greedy(params)
    calls = jnp.int32(1)
    deepest = jnp.max(depth_limit)
    for depth, (start, end) in enumerate(template.levels, start=1):
        parent_positions = [template.parents[n] + 1 for n in range(start, end)]
        parent_logits = processing(node_logits[:, jnp.asarray(parent_positions)], tokens, template, parent_positions)
        max_rank = int(template.sibling_rank[start:end].max()) + 1
        top = jax.lax.top_k(parent_logits, max_rank)[1].astype(jnp.int32)  # [B, W, max_rank]
        ranks = jnp.asarray(template.sibling_rank[start:end])
        ranked = jnp.take_along_axis(top, ranks[None, :, None], axis=2)[:, :, 0]  # [B, W]
        level_key = jax.random.fold_in(key, depth)

        def draw(logits=parent_logits, key=level_key):  # tokens [B, W] from the warped draft, with q(token) [B, W]
            probs = warped_probabilities(logits, params)
            drawn = sampling.draw(key, probs)
            return drawn, jnp.take_along_axis(probs, drawn[:, :, None], axis=2)[:, :, 0]

        sampled, sampled_probs = jax.lax.cond(greedy, lambda ranked=ranked: (ranked, jnp.ones(ranked.shape, jnp.float32)), draw)
        single = jnp.asarray(single_child[start:end])[None, :]
        level_tokens = jnp.where(single, sampled, ranked)  # [B, W]
        tokens = tokens.at[:, start:end].set(level_tokens)
        token_probs = token_probs.at[:, start:end].set(jnp.where(single, sampled_probs, 1.0))
        parent_logits_all = parent_logits_all.at[:, start:end].set(parent_logits)
        if depth == template.max_depth:
            break
        # run this level through the network to get its children's distributions
        slots = lengths[:, None] + 1 + jnp.arange(start, end, dtype=jnp.int32)  # [B, W]
        positions = jnp.broadcast_to(lengths[:, None] + depth, slots.shape)
        mask = None
        if not template.is_chain:
            visibility = jnp.asarray(template.ancestors[start + 1 : end + 1, 1:])  # [W, N]
            mask = masks.prefix_and_block_mask(lengths + 1, visibility, lengths + 1, cache.capacity)

        def run_level(
            operands, level_tokens=level_tokens, mask=mask, slots=slots, positions=positions, start=start, end=end
        ):
            cache, node_logits = operands
            level_logits, cache = network.forward(
                level_tokens, positions, cache, mask, write_slots=slots, skip_layers=skip_layers
            )
            return cache, node_logits.at[:, start + 1 : end + 1].set(level_logits)

        cache, node_logits = run_if(depth < deepest, run_level, (cache, node_logits))
        calls = calls + (depth < deepest)
    return Drafted(tokens, parent_logits_all, token_probs, cache, calls)


class Drafted(NamedTuple):
    """What `expand_tree` drafted."""

    tokens: jax.Array  # [B, N] int32
    parent_logits: jax.Array  # [B, N, V] the network's processed logits at each node's parent
    token_probs: jax.Array  # [B, N] q(token): the warped draft probability where drawn, 1 where taken as top-k
    cache: Cache  # the network's cache with the drafted levels written
    calls: jax.Array  # [] int32: network forward calls


def network_proposal(
    template: TreeTemplate,
    drafted: Drafted,
    depth_limit: jax.Array,  # [B] int32
    target_cache: Cache,  # the target cache after drafting
    drafter_state: Any,  # the drafter's state after drafting
) -> Proposal:
    """The proposal of a draft network that expanded the whole template: every node within a row's depth."""
    valid = jnp.asarray(template.depths)[None, :] <= depth_limit[:, None]
    sampled = tuple(bool(x) for x in single_child_nodes(template))
    valid_depth = jnp.minimum(depth_limit, template.max_depth)
    return Proposal(
        drafted.tokens, drafted.parent_logits, valid, valid_depth, target_cache, drafter_state, drafted.calls,
        sampled_from_parent=sampled, token_probs=drafted.token_probs,
    )


def keep_accepted_path(
    cache: Cache,
    template: TreeTemplate,
    path: jax.Array,  # [B, D] int32: accepted node per depth, -1 past the end
    lengths: jax.Array,  # [B] int32: the pending token's slot; node i was written at lengths + 1 + i
) -> Cache:
    """Move the accepted nodes' entries to slots lengths + 1 + depth - 1 (lengths unchanged). A chain's accepted
    path already sits there, so chains move nothing."""
    if template.is_chain:
        return cache
    return cache.compact(jnp.where(path >= 0, lengths[:, None] + 1 + path, -1), lengths + 1)


def warped_probabilities(logits: jax.Array, params: sampling.SamplingParams) -> jax.Array:
    """`sampling.probabilities` for logits [B, W, V] with per-row parameters."""
    batch, width, vocab = logits.shape
    return sampling.probabilities(logits.reshape(batch * width, vocab), params.per_position(width)).reshape(batch, width, vocab)


def sample_positions(key: jax.Array, logits: jax.Array, params: sampling.SamplingParams) -> jax.Array:
    """`sampling.sample` at every position of logits [B, W, V] with per-row parameters: [B, W] int32."""
    batch, width, vocab = logits.shape
    return sampling.sample(key, logits.reshape(batch * width, vocab), params.per_position(width)).reshape(batch, width)


def all_greedy(params: sampling.SamplingParams) -> jax.Array:  # [] bool
    return jnp.all(params.temperature == 0)


def single_child_nodes(template: TreeTemplate):
    """[N] bool (numpy): nodes that are their parent's only child (drawn from the draft distribution)."""
    num_children = (template.children >= 0).sum(axis=1)
    return num_children[[p + 1 for p in template.parents]] == 1
