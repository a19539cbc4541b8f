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

Logit processors (`jspec.processors`: penalties, logit bias, no_repeat_ngram_size, min_new_tokens) are applied to
the target's logits at every verified position, with the history at that position being the emitted tokens plus
the draft tokens on its path: a verified position is processed exactly as autoregressive decoding processes it,
so p above is the processed (then warped) target distribution and the guarantees hold with processors on. The
draft network's distributions are processed the same way (better proposals; correctness does not depend on it).
A drafter may still propose a token a processor bans (prompt lookup copying a banned n-gram, say): p gives it
probability 0, so verification rejects it. Log-probabilities (`logprobs=k`) are the target's: each emitted token
is scored under the processed, warped target distribution at its position, as autoregressive decoding scores it.

Drafters are objects behind one protocol (`jspec.strategies.drafters`): a draft model with its own KV cache,
the target with layers skipped, or prompt lookup. The acceptance walk, the verification and the compaction
of the accepted path are the same for all of them.

With `adaptive=True` a row's draft depth moves within [1, depth of the template]: one deeper after a step
that accepted every draft, one shallower otherwise. Nodes below a row's depth are not proposed (they are
rejected without being tried), so the output distribution is unchanged; draft model calls stop at the
deepest row's depth. The verification chunk keeps its static size.

With `adaptive="auto"` (or `num_draft_tokens="auto"`) each step drafts the whole batch to the depth under which it
is expected to finish soonest (the row with the most steps left decides; for one row: the most expected tokens per
second), from call costs measured once per model and shape and each row's running acceptance
(`jspec.strategies.auto_depth`), down to depth 0: a plain step, which is autoregressive decoding's own step
(`autoregressive.decode_one_token`: no drafter call, no acceptance walk, no [B, N + 1, V] buffers; it samples with
autoregressive decoding's key, so a decode of plain steps only is autoregressive decoding's, sampled tokens
included; a request whose costs plan plain steps throughout runs autoregressive decoding's loop, `PlainSteps`).
A drafting step verifies only as wide as the chosen depth (one compiled forward per depth), and
finished rows do not count in the choice; rows of a batch share the step's depth (the forward is shared; what a
row does not draft it does not verify). The choices between plain and drafting steps and between widths run as
while loops of zero or one trip (`base.run_if`), not `lax.cond`/`lax.switch`, under which XLA:CPU copied every KV
cache each step. A step whose verification stops short of the accepted
path's children (a probe: one draft tried against a one-token verification) emits the accepted drafts without a
bonus token; a rejection still draws the correction, so every emitted token is an exact sample either way.

Batches are ragged: every row has its own cache length, positions and accepted length; only the accepted
path's KV entries are kept (compacted in place), in target and draft caches; no realignment copies. A chain
verifies under the default causal-by-slot mask (for a chain it equals the tree mask), so it can run through the
Pallas decode kernels; trees pass their ancestor mask.
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jspec import masks, processors, sampling, validation
from jspec.cache import Cache, scatter_rows
from jspec.models.model import Model
from jspec.strategies.base import (
    DecodeOutput,
    OutputBuffer,
    Prompts,
    mark_cache_full,
    prefill,
    register_strategy,
    run_either,
    run_if,
    run_indexed,
    static_field,
    tokens_left,
)
from jspec.strategies import auto_depth
from jspec.strategies.autoregressive import Autoregressive, AutoregressiveState, decode_one_token, emit_sampled
from jspec.strategies.drafters import (
    Drafter,
    DraftModelDrafter,
    LayerSkipDrafter,
    PromptLookupDrafter,
    Proposal,
    Verified,
    all_greedy,
    drafter_from_options,
    keep_accepted_path,
    prompt_lookup,  # noqa: F401  (re-exported: the n-gram matcher lived here)
    warped_probabilities,
)
from jspec.strategies.tree import TreeTemplate
from jspec.validation import ArgumentError


@struct.dataclass
class SpeculativeState:
    cache: Cache  # target cache; lengths[b] = committed tokens (all but the pending one)
    drafter_state: Any  # the drafter's own state (a draft model's `DraftModelState`; None: layer skip, prompt lookup)
    history: jax.Array  # [B, H] int32: prompt and emitted tokens; history[b, cache.lengths[b]] is pending
    output: OutputBuffer
    sampling: sampling.SamplingParams
    processing: processors.Processing
    stop_tokens: jax.Array  # [B, K]
    key: jax.Array
    step: jax.Array  # [] int32
    draft_depth: jax.Array  # [B] int32: the depth a row drafts to (adaptive), <= template depth
    stats: dict[str, jax.Array]
    depth_control: auto_depth.DepthControl | None = None  # adaptive="auto": costs, acceptance, probing


def forced_steps(strategy: "Speculative", model: Model, state: SpeculativeState, count: jax.Array) -> SpeculativeState:
    """`count` steps of an auto-depth strategy in one loop, each with the probing schedule `state`'s depth control
    has (so every step probes, or none does; its costs force the depth): what `auto_depth.measure_step_costs`
    times."""
    held = state.depth_control

    def body(_: Any, current: SpeculativeState) -> SpeculativeState:
        control = current.depth_control.replace(idle_steps=held.idle_steps, probe_interval=held.probe_interval)
        return strategy.step(model, current.replace(depth_control=control))

    return jax.lax.fori_loop(0, count, body, state)


@struct.dataclass
class Speculative:
    """Speculative decoding with a pluggable drafter (see the module docstring for the guarantees).

    drafter: a drafter object (`DraftModelDrafter`, `LayerSkipDrafter`, `PromptLookupDrafter`), or the name of
        one built from the shorthands below: "model", "layer_skip" or "prompt_lookup" (default: "model" with a
        draft, else "layer_skip" when skip_layers is given). After construction it is always an object.
    num_draft_tokens: the chain length (ignored when `tree` is given), or "auto": a chain of AUTO_CHAIN_LENGTH
        drafts with adaptive="auto".
    tree: branching factor per depth, e.g. (3, 2, 1, 1): a static tree of top-k children.
    tree_parents: an explicit template instead (parent of each node, -1 = root, breadth-first).
    adaptive: adapt each row's draft depth (True: one deeper after a full acceptance, one shallower otherwise), or
        "auto": each step drafts (the whole batch) to the depth under which it is expected to finish soonest, from
        measured call costs and each row's running acceptance, down to plain autoregressive steps
        (`jspec.strategies.auto_depth`); the verification forward is only as wide as that depth.
    step_costs: with adaptive="auto", the costs to decide with and the acceptance rate rows start from
        (`auto_depth.StepCosts`); None: measured once per model, drafter, shape and sampling regime when the strategy
        is validated (the acceptance: the drafts of the deepest measured steps, from the first request's prompts).
    temperature, top_k, top_p, min_p: sampling (traced; 0 temperature = greedy).
    generation: logit processors and log-probabilities (`jspec.processors`; set through `jspec.decode`'s options).
    relaxed: None (exact acceptance, lossless), or a relaxed acceptance rule with `masses(p, q, token, embeddings)`
        (`jspec.strategies.jacobi.GroupedAcceptance`): LOSSY, reported as stats["lossy"] = True.
    Shorthands (constructor only): draft, the draft model ("model"; must share the target's vocabulary);
    skip_layers, the layers the self-speculative draft leaves out; max_ngram, the longest n-gram prompt
    lookup matches.
    """

    name: ClassVar[str] = "speculative"
    shape_buckets: ClassVar[bool] = True  # batch and max_new_tokens may be bucketed (padding rows, traced limits)
    drafter: Drafter | str | None = None  # a pytree: a draft model's parameters are traced leaves
    num_draft_tokens: int | str = static_field(default=4)
    tree: tuple[int, ...] | None = static_field(default=None)
    tree_parents: tuple[int, ...] | None = static_field(default=None)
    adaptive: bool | str = static_field(default=False)
    temperature: Any = 0.0
    top_k: Any = 0
    top_p: Any = 1.0
    min_p: Any = 0.0
    generation: processors.GenerationOptions = struct.field(default_factory=processors.GenerationOptions)
    relaxed: Any = None  # a pytree: its thresholds are traced
    step_costs: auto_depth.StepCosts | None = None
    draft: dataclasses.InitVar[Model | None] = None
    skip_layers: dataclasses.InitVar[tuple[int, ...]] = ()
    max_ngram: dataclasses.InitVar[int] = 3

    def __post_init__(self, draft: Model | None, skip_layers: tuple[int, ...], max_ngram: int) -> None:
        if isinstance(self.adaptive, np.bool_):  # a static field: np.True_ == True shares True's compiled loop
            object.__setattr__(self, "adaptive", bool(self.adaptive))
        if self.drafter is None or isinstance(self.drafter, str):
            object.__setattr__(self, "drafter", drafter_from_options(self.drafter, draft, skip_layers, max_ngram))
        elif draft is not None or skip_layers != () or max_ngram != 3:
            raise ArgumentError("drafter: give a drafter object or the draft / skip_layers / max_ngram shorthands, not both")
        if self.auto and getattr(self.drafter, "catch_up", None) == 1:  # a draft model re-reads what idle steps skipped
            object.__setattr__(self, "drafter", self.drafter.replace(catch_up=auto_depth.CATCH_UP))
        if hasattr(self.drafter, "defer_prefill") and self.drafter.defer_prefill is None:  # first steps may not draft
            object.__setattr__(self, "drafter", self.drafter.replace(defer_prefill=self.auto))

    # --- configuration -----------------------------------------------------------------------------

    @property
    def template(self) -> TreeTemplate:
        if self.tree_parents is not None:
            return TreeTemplate(tuple(self.tree_parents))
        if self.tree is not None:
            return TreeTemplate.from_branching(tuple(self.tree))
        return TreeTemplate.chain(AUTO_CHAIN_LENGTH if self.num_draft_tokens == "auto" else self.num_draft_tokens)

    @property
    def auto(self) -> bool:
        """Whether each step's depth is chosen from costs and acceptance (adaptive="auto")."""
        return self.adaptive == "auto" or (self.num_draft_tokens == "auto" and self.tree is None and self.tree_parents is None)

    def validate(self, model: Model, prompts: Prompts) -> None:
        check_draft_shape(self.num_draft_tokens, self.tree, self.tree_parents)
        if self.adaptive != "auto":
            validation.check_bool("adaptive", self.adaptive)
        template = self.template  # raises for a template that is not a tree
        self.drafter.validate(model, template, prompts)
        if self.auto and (self.extra_layout is not None or not hasattr(self.drafter, "cost_profile")):
            raise ArgumentError("adaptive: 'auto' needs a drafter with a cost profile (cost_profile) and no tokens of its "
                                f"own in the verification; {type(self.drafter).__name__} has not")
        if self.step_costs is not None:
            depths = template.max_depth + 1
            costs = self.step_costs
            valid = isinstance(costs, auto_depth.StepCosts) and np.shape(costs.step) == (depths,)
            setup, prior = (np.asarray(costs.setup), np.asarray(costs.acceptance)) if valid else (None, None)
            if not (self.auto and valid and setup.shape == () and np.isfinite(setup) and setup >= 0
                    and prior.shape == () and 0 <= prior <= 1):
                validation.fail("step_costs", f"with adaptive='auto', a jspec.strategies.auto_depth.StepCosts with {depths} "
                                f"step costs (depths 0..{depths - 1}), a finite setup >= 0 and an acceptance in [0, 1]", costs)
        sampling.validate_sampling_options(
            prompts.num_rows, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p
        )
        self.generation.validate(model.config.vocab_size, prompts.num_rows)
        if self.auto and self.step_costs is None:  # last: bad options are reported before anything is measured
            self.measure_costs(model, prompts)

    @property
    def extra_layout(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The drafter's own tokens in the verification forward (offsets [E], visibility [E, N + 1 + E]), or None."""
        layout = getattr(self.drafter, "extra_layout", None)
        return None if layout is None else layout(self.template)

    @property
    def chunk_width(self) -> int:
        """Tokens of one verification forward: pending, the draft nodes and the drafter's extra tokens."""
        extra = self.extra_layout
        return self.template.num_nodes + 1 + (0 if extra is None else len(extra[0]))

    def cache_headroom(self) -> int:
        return self.chunk_width

    def verified_nodes(self) -> list[int]:
        """[D + 1]: the template's nodes up to each depth d (a prefix: nodes are numbered breadth-first)."""
        depths = self.template.depths
        return [int(np.sum(depths <= depth)) for depth in range(self.template.max_depth + 1)]

    def measure_costs(self, model: Model, prompts: Prompts) -> auto_depth.StepCosts:
        """The auto depth's step costs for this model, drafter and shape, measured once per process: this strategy's
        jitted steps from the request's first state, forced to each depth, a call's fixed cost taken off
        (`auto_depth.measure_step_costs`); with the prior acceptance, measured by 32 more steps at the deepest depth
        from that state, once per process, shape, weights (target and drafter), sampling values, acceptance rule and
        processors (`auto_depth.measure_prior_acceptance`). On a multi-process mesh both are process 0's."""
        found = self._measured_costs(model, prompts)
        if found is not None:
            return found
        key, _ = self._cost_profile(model, prompts)
        prior_key, weights = self._prior_profile(model, key)
        model = model.without_tokenizer()
        start = importlib.import_module("jspec.decode")._start  # init, with a bucket's padding rows finished (their
        # drafts would enter the measured prior acceptance)
        state = jax.jit(start)(model, self, prompts, jax.random.key(0))
        setup = None
        if getattr(self.drafter, "defer_prefill", False):  # a decode reads the prompts once: timed apart, not per step
            read = jax.jit(lambda drafter, drafter_state: drafter.read_prompts(drafter_state), donate_argnums=1)
            unread = state.drafter_state
            setup = (lambda: jax.tree.map(jnp.copy, unread)), (lambda inputs: read(self.drafter, inputs))
            state = state.replace(drafter_state=read(self.drafter, jax.tree.map(jnp.copy, unread)))
        steps = jax.jit(forced_steps, donate_argnums=2)
        control = state.depth_control

        def step_at(depth: int, probe: bool):
            forced = control.replace(costs=control.costs.forcing(depth), idle_steps=jnp.int32(1 << 20 if probe else 0),
                                     probe_interval=jnp.int32(1 if probe else 1 << 20))
            prepare = lambda: jax.tree.map(jnp.copy, state.replace(depth_control=forced))  # noqa: E731
            return prepare, lambda inputs, count: steps(self, model, inputs, jnp.int32(count))

        deepest = step_at(self.template.max_depth, False)
        everywhere = auto_depth.spans_processes((model.params, self.drafter))  # a multi-process mesh: process 0's
        with warnings.catch_warnings():  # a buffer the step does not update cannot be donated: harmless
            warnings.filterwarnings("ignore", "Some donated buffers were not usable")
            costs = auto_depth.measure_step_costs(key, step_at, self.template.max_depth, setup=setup,
                                                  everywhere=everywhere)
            prior = auto_depth.measure_prior_acceptance(
                prior_key, weights, lambda: deepest[1](deepest[0](), auto_depth.ACCEPTANCE_STEPS),
                acceptance=lambda out: (jnp.sum(out.stats["accepted_by_depth"]), jnp.sum(out.stats["tried_by_depth"])),
                everywhere=everywhere)
        return costs.replace(acceptance=jnp.float32(prior))

    def measured(self, model: Model, prompts: Prompts) -> "Speculative":
        """This strategy with the auto depth's costs for this request in `step_costs` (a traced field: the compiled
        loop takes them as inputs, so a loop compiled for another request's costs, greedy ones say, does not keep
        those); itself when not auto; with step_costs given, it keeps them. `jspec.decode` calls it after `validate`.
        Where those costs plan plain steps only for the whole request (`auto_depth.plain_throughout`), the request
        runs them as `PlainSteps`: autoregressive decoding's loop, without the per-step planning and the drafter's
        state (the same tokens, log-probabilities and stats, but draft_calls: see PlainSteps)."""
        if not self.auto:
            return self
        strategy = self if self.step_costs is not None else self.replace(step_costs=self.costs(model, prompts))
        return PlainSteps(strategy) if strategy.plain_throughout(prompts) else strategy

    def plain_throughout(self, prompts: Prompts) -> bool:
        """True only where every step of this request is a plain step with no probe, whatever its rows do
        (concrete costs; a drafter that learns from every verification drafts at every step), and the cache never
        ends a row before its limit (a plain step needs a verification's chunk_width free slots, autoregressive decoding one)."""
        costs, limits = self.step_costs, prompts.row_limits
        if not self.auto or costs is None or any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((costs, limits))):
            return False
        new_tokens = int(np.max(np.asarray(limits), initial=0))  # the most any row may emit (a bucket's capacity or less)
        roomy = prompts.tokens.shape[1] + new_tokens - 1 + self.chunk_width <= prompts.cache_size
        return (roomy and getattr(self.drafter, "observe", None) is None
                and auto_depth.plain_throughout(costs, new_tokens, self.probe_interval))

    def costs(self, model: Model, prompts: Prompts) -> auto_depth.StepCosts:
        """step_costs, else the measured ones with their prior (validate measures them), else the memory-bound model
        (every forward one unit, a drafter call its share of the target's parameters)."""
        if self.step_costs is not None:
            return self.step_costs
        found = self._measured_costs(model, prompts)
        return found if found is not None else auto_depth.StepCosts.memory_bound(self.template.max_depth,
                                                                                 self._cost_profile(model, prompts)[1])

    def _measured_costs(self, model: Model, prompts: Prompts) -> auto_depth.StepCosts | None:
        """The costs and prior `measure_costs` measured for this request's profile in this process, or None."""
        key, _ = self._cost_profile(model, prompts)
        costs, prior = auto_depth.measured_costs(key), auto_depth.measured_prior(*self._prior_profile(model, key))
        return None if costs is None or prior is None else costs.replace(acceptance=jnp.float32(prior))

    def _prior_profile(self, model: Model, key: Any) -> tuple[Any, Any]:
        """What the measured prior acceptance is remembered by beyond the costs' key: the sampling values, the
        acceptance rule and the processors (`auto_depth.concrete_values`), and the weights of the target and the
        drafter (`auto_depth.weights_identity`)."""
        options = (self.temperature, self.top_k, self.top_p, self.min_p, self.relaxed, self.generation)
        return (key, auto_depth.concrete_values(options)), auto_depth.weights_identity((model.params, self.drafter))

    def _cost_profile(self, model: Model, prompts: Prompts) -> tuple[Any, float]:
        drafter_key, share = self.drafter.cost_profile(model)
        key = (model.config, model.kernels, drafter_key, self.template.parents, prompts.batch_size, prompts.cache_size,
               prompts.max_new_tokens, jax.default_backend(), self._sampling_regime())
        return key, share

    def _sampling_regime(self) -> tuple[bool, bool] | str:
        """What the sampling options change in a step's cost: (all greedy, top-k / top-p sorting); "traced" when
        they are not concrete. Greedy steps skip warping and the sampled walk, so their costs say nothing of these."""
        values = (self.temperature, self.top_k, self.top_p)
        if any(isinstance(value, jax.core.Tracer) for value in values):
            return "traced"
        temperature, top_k, top_p = (np.asarray(value) for value in values)
        return bool(np.all(temperature == 0)), bool(np.any(top_k > 0) or np.any(top_p < 1))

    # --- the state machine ---------------------------------------------------------------------------

    def init(self, model: Model, prompts: Prompts, key: jax.Array) -> SpeculativeState:
        batch = prompts.batch_size
        template = self.template
        cache = model.new_cache(batch, prompts.cache_size, max_chunk=self.chunk_width)
        logits, cache = prefill(model, prompts, cache)
        params = sampling.SamplingParams.broadcast(batch, self.temperature, self.top_k, self.top_p, self.min_p)
        processing = processors.Processing.create(self.generation, prompts, model.config.vocab_size, template.max_depth + 1)
        output = OutputBuffer.create(batch, prompts.max_new_tokens, prompts.limits, self.generation.logprobs)
        first, output, processing = emit_sampled(
            jax.random.fold_in(key, 0), logits, jnp.ones((batch,), bool), output, processing, params,
            prompts.stop_tokens, self.generation.logprobs)
        width = max(prompts.cache_size, prompts.tokens.shape[1])  # a cache smaller than the padded prompts is legal
        history = jnp.full((batch, width + self.chunk_width + 1), -1, jnp.int32)
        history = history.at[:, : prompts.tokens.shape[1]].set(prompts.tokens)
        history = scatter_rows(history, first[:, None], prompts.lengths[:, None])
        depth = template.max_depth
        return SpeculativeState(
            cache=cache,
            drafter_state=self.drafter.init(model, prompts, template),
            history=history,
            output=mark_cache_full(output, cache.lengths, cache.capacity, self.chunk_width),
            sampling=params,
            processing=processing,
            stop_tokens=prompts.stop_tokens,
            key=key,
            step=jnp.int32(1),
            draft_depth=jnp.full((batch,), depth, jnp.int32),
            depth_control=auto_depth.DepthControl.create(self.costs(model, prompts), batch, self.probe_interval) if self.auto else None,
            stats=self.initial_stats(batch),
        )

    def initial_stats(self, batch: int) -> dict[str, jax.Array]:
        """The counters a decode starts from (after the prefill call)."""
        depth = self.template.max_depth
        return {
            "model_calls": jnp.int32(1),
            "draft_calls": jnp.int32(self.drafter.prefill_calls),
            "active_steps": jnp.zeros((batch,), jnp.int32),
            "emitted_drafts": jnp.zeros((batch,), jnp.int32),  # accepted draft tokens in the output
            "emitted_corrections": jnp.zeros((batch,), jnp.int32),  # correction / bonus tokens in the output
            "accepted_histogram": jnp.zeros((depth + 1,), jnp.int32),
            "accepted_by_depth": jnp.zeros((depth,), jnp.int32),
            "tried_by_depth": jnp.zeros((depth,), jnp.int32),
            **({"depth_histogram": jnp.zeros((depth + 1,), jnp.int32), "probes": jnp.int32(0)} if self.auto else {}),
        }

    @property
    def probe_interval(self) -> int:
        """The fewest steps without drafting before a probe (every step for a drafter without a network: it costs
        nothing); `auto_depth.first_probe_interval` raises it where the measured probe is dear."""
        return 1 if isinstance(self.drafter, PromptLookupDrafter) else auto_depth.PROBE_INTERVAL

    def step(self, model: Model, state: SpeculativeState) -> SpeculativeState:
        control = state.depth_control
        if control is None:
            return self.drafting_step(model, state)
        remaining = tokens_left(state.output, state.cache.lengths, state.cache.capacity, self.chunk_width)
        depth, probe = control.plan(remaining.astype(jnp.float32))  # the batch's depth this step
        if getattr(self.drafter, "observe", None) is not None:  # a drafter that learns from every verification
            return self.drafting_step(model, state, depth, probe)
        return run_either((depth == 0) & ~probe, lambda state: self.plain_step(model, state),
                          lambda state: self.drafting_step(model, state, depth, probe), state)

    def plain_step(self, model: Model, state: SpeculativeState) -> SpeculativeState:
        """A step that drafts nothing (auto depth 0, no probe): autoregressive decoding's own step
        (`decode_one_token`: a one-token forward, the processed, warped next token sampled), with no drafter call, no
        acceptance walk and no [B, N + 1, V] buffers. It emits what a drafting step at depth 0 emits: greedy, the
        same token; sampling, an exact sample of the same distribution. It samples with the step's key as
        autoregressive decoding does, so a decode of plain steps only is autoregressive decoding's, token for token,
        sampled tokens and log-probabilities included."""
        running = ~state.output.finished
        lengths = state.cache.lengths
        pending = jnp.take_along_axis(state.history, lengths[:, None], axis=1)[:, 0]
        token, cache, output, processing = decode_one_token(
            model, state.cache, pending, running, jax.random.fold_in(state.key, state.step), state.output, state.processing,
            state.sampling, state.stop_tokens, self.generation.logprobs)
        history = scatter_rows(state.history, token[:, None], jnp.where(running, lengths + 1, -1)[:, None])
        kept = output.lengths - state.output.lengths
        no_trials = jnp.zeros((running.shape[0], self.template.max_depth), bool)  # [B, D]
        control = state.depth_control.after(jnp.int32(0), jnp.bool_(False), no_trials, no_trials)
        stats = dict(state.stats)
        stats["model_calls"] = stats["model_calls"] + 1
        stats["active_steps"] = stats["active_steps"] + running
        stats["emitted_corrections"] = stats["emitted_corrections"] + kept
        stats["accepted_histogram"] = stats["accepted_histogram"].at[0].add(jnp.sum(running, dtype=jnp.int32))
        stats["depth_histogram"] = stats["depth_histogram"].at[0].add(1)
        return state.replace(
            depth_control=control,
            cache=cache,
            history=history,
            output=mark_cache_full(output, cache.lengths, cache.capacity, self.chunk_width),
            processing=processing,
            step=state.step + 1,
            stats=stats,
        )

    def drafting_step(self, model: Model, state: SpeculativeState, verified_depth: jax.Array | None = None,
                      probe: jax.Array | None = None) -> SpeculativeState:
        """Draft, verify, walk, commit. verified_depth [] int32 and probe [] bool: the auto depth's plan (None: the
        template's depth); a probe drafts one token and verifies none."""
        template = self.template
        running = ~state.output.finished
        lengths = state.cache.lengths
        pending = jnp.take_along_axis(state.history, lengths[:, None], axis=1)[:, 0]
        step_key = jax.random.fold_in(state.key, state.step)
        draft_key, walk_key = jax.random.split(step_key)
        extra = self.extra_layout
        control = state.depth_control
        if control is None:
            depth_limit = jnp.where(running, state.draft_depth, 0)
            proposal = self.drafter.propose(model, state, pending, depth_limit, draft_key, template)
            extra = None if extra is None else (proposal.extra_tokens, *extra)
            chunk_logits, cache = verify(model, template, proposal.target_cache, lengths, pending, proposal.tokens, running, extra)
            verified_depth = template.max_depth
        else:
            depth_limit = jnp.where(running, jnp.where(probe, 1, verified_depth), 0)
            def propose(proposal: Proposal) -> Proposal:  # drafts into the caches the (idle) proposal carries
                drafting = state.replace(cache=proposal.target_cache, drafter_state=proposal.drafter_state)
                return self.drafter.propose(model, drafting, pending, depth_limit, draft_key, template)

            shapes = jax.eval_shape(lambda: self.drafter.propose(model, state, pending, depth_limit, draft_key, template))
            idle = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
            idle = idle.replace(target_cache=state.cache, drafter_state=state.drafter_state)
            proposal = run_if((verified_depth > 0) | probe, propose, idle)
            chunk_logits, cache = verify_to_depth(model, template, self.verified_nodes(), verified_depth,
                                                  proposal.target_cache, lengths, pending, proposal.tokens, running)
        logits = chunk_logits[:, : template.num_nodes + 1]
        processed = state.processing(logits, proposal.tokens, template)  # [B, N + 1, V]
        embeddings = None if self.relaxed is None else model.params["embed"]
        walk = acceptance_walk(template, processed, proposal, state.sampling, walk_key, self.relaxed, embeddings)
        num_accepted = jnp.where(running, walk.num_accepted, 0)
        # the correction / bonus token exists where the verification reached the last accepted node's children
        num_emitted = num_accepted + (num_accepted <= verified_depth)

        # commit: keep the accepted path's entries, emit path + correction/bonus
        new_lengths = jnp.where(running, lengths + num_emitted, lengths)
        cache = keep_accepted_path(cache, template, walk.path, lengths).with_lengths(new_lengths)
        drafter_state = self.drafter.commit(proposal.drafter_state, template, walk.path, lengths)

        emitted = walk.emitted  # [B, D + 1]
        history_slots = jnp.where(
            running[:, None] & (jnp.arange(emitted.shape[1]) < num_emitted[:, None]),
            lengths[:, None] + 1 + jnp.arange(emitted.shape[1]),
            state.history.shape[1],
        )
        history = scatter_rows(state.history, emitted, history_slots)
        scores = None
        if self.generation.logprobs is not None:  # each emitted token scored at its position on the path
            at = jnp.concatenate([jnp.zeros_like(walk.path[:, :1]), jnp.maximum(walk.path + 1, 0)], axis=1)[:, :, None]
            scores = processors.token_scores(jnp.take_along_axis(logits, at, axis=1), jnp.take_along_axis(processed, at, axis=1),
                                             emitted, state.sampling, self.generation.logprobs)
        output = state.output.append(emitted, jnp.where(running, num_emitted, 0), state.stop_tokens, scores)
        kept = output.lengths - state.output.lengths  # emitted this step after stop tokens / length limit
        processing = state.processing.append(emitted, kept)
        kept_drafts = jnp.minimum(num_accepted, kept)
        output = mark_cache_full(output, new_lengths, cache.capacity, self.chunk_width)
        observe = getattr(self.drafter, "observe", None)
        if observe is not None:
            drafter_state = observe(drafter_state, Verified(
                logits=processed, extra_logits=None if extra is None else chunk_logits[:, template.num_nodes + 1 :],
                num_accepted=num_accepted, history=history, lengths=new_lengths, running=running,
                sampling=state.sampling, key=jax.random.fold_in(step_key, 2),
            ))

        draft_depth = state.draft_depth
        if self.adaptive is True:
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
        if control is not None:
            control = control.after(verified_depth, probe, walk.accepted_at_depth & running[:, None],
                                    walk.tried_at_depth & running[:, None])
            stats["depth_histogram"] = stats["depth_histogram"].at[verified_depth].add(1)
            stats["probes"] = stats["probes"] + probe
        return state.replace(
            depth_control=control,
            cache=cache,
            drafter_state=drafter_state,
            history=history,
            output=output,
            processing=processing,
            step=state.step + 1,
            draft_depth=draft_depth,
            stats=stats,
        )

    def done(self, state: SpeculativeState) -> jax.Array:
        return state.output.finished

    def output(self, state: SpeculativeState) -> DecodeOutput:
        return state.output.decode_output(self.final_stats(state.stats, state.step, state.output.lengths))

    def final_stats(self, counters: dict[str, jax.Array], steps: jax.Array, lengths: jax.Array) -> dict[str, jax.Array]:
        """The decode's stats from its counters, its step count and the rows' output lengths [B]."""
        stats = dict(counters)
        stats["steps"] = steps
        stats["tokens_generated"] = lengths
        # tokens per target call: every row's first token comes from the prefill call
        stats["mean_accepted_length"] = lengths / jnp.maximum(stats["active_steps"] + 1, 1)
        stats["acceptance_rate_by_depth"] = stats["accepted_by_depth"] / jnp.maximum(stats["tried_by_depth"], 1)
        stats["lossy"] = jnp.asarray(self.relaxed is not None)  # a relaxed acceptance changes the distribution
        return stats


@struct.dataclass
class PlainStepsState(AutoregressiveState):
    first_lengths: jax.Array  # [B] int32: the rows' output lengths after the prefill
    active_steps: jax.Array  # [B] int32: steps each row ran


@struct.dataclass
class PlainSteps:
    """An auto-depth speculative request whose plan is plain steps throughout (`auto_depth.plain_throughout`),
    run as what those steps are: autoregressive decoding (`Speculative.plain_step` is its step), in its own loop,
    without the per-step planning, probing schedule and drafter state. Its cache is the loop's (the request's size,
    laid out for a verification chunk: a sliding window's ring included), so the tokens, log-probabilities, finish
    reasons and stats are those the auto-depth loop gives, bit for bit (tests/test_speculative.py compares them), but
    draft_calls: 0, as the drafter never runs (the loop counts a draft prefill made at init, `defer_prefill=False`)."""

    speculative: Speculative
    name: ClassVar[str] = "speculative"

    @property
    def plain(self) -> Autoregressive:
        s = self.speculative
        return Autoregressive(s.temperature, s.top_k, s.top_p, s.min_p, s.generation)

    def validate(self, model: Model, prompts: Prompts) -> None:
        self.speculative.validate(model, prompts)

    def cache_headroom(self) -> int:
        return self.speculative.cache_headroom()

    def init(self, model: Model, prompts: Prompts, key: jax.Array) -> PlainStepsState:
        cache = model.new_cache(prompts.batch_size, prompts.cache_size, max_chunk=self.speculative.chunk_width)
        decoding = self.plain.start(model, prompts, key, cache)  # the loop's cache: a sliding window's ring included
        fields = {field.name: getattr(decoding, field.name) for field in dataclasses.fields(decoding)}
        return PlainStepsState(**fields, first_lengths=decoding.output.lengths,
                               active_steps=jnp.zeros((prompts.batch_size,), jnp.int32))

    def step(self, model: Model, state: PlainStepsState) -> PlainStepsState:
        running = ~state.output.finished
        return self.plain.step(model, state).replace(active_steps=state.active_steps + running)

    def done(self, state: PlainStepsState) -> jax.Array:
        return self.plain.done(state)

    def output(self, state: PlainStepsState) -> DecodeOutput:
        stats = self.speculative.initial_stats(state.active_steps.shape[0])
        stats["model_calls"] = state.model_calls
        stats["draft_calls"] = jnp.int32(0)  # the drafter never runs (the loop counts an eager draft prefill)
        stats["active_steps"] = state.active_steps
        stats["emitted_corrections"] = state.output.lengths - state.first_lengths
        stats["accepted_histogram"] = stats["accepted_histogram"].at[0].set(jnp.sum(state.active_steps, dtype=jnp.int32))
        stats["depth_histogram"] = stats["depth_histogram"].at[0].set(state.step - 1)
        return state.output.decode_output(self.speculative.final_stats(stats, state.step, state.output.lengths))


def verify_to_depth(
    model: Model,
    template: TreeTemplate,
    verified_nodes: list[int],  # [D + 1] static: the nodes up to each depth (a prefix of the template)
    depth: jax.Array,  # [] int32: verify the nodes up to this depth
    cache: Cache,
    lengths: jax.Array,  # [B] int32
    pending: jax.Array,  # [B] int32
    tokens: jax.Array,  # [B, N] int32
    running: jax.Array,  # [B] bool
) -> tuple[jax.Array, Cache]:  # logits [B, N + 1, V] (zero past the verified nodes), cache
    """`verify` over the pending token and the nodes up to a traced depth: one compiled forward per depth, of that
    width, selected by `run_indexed` (a shallow step does not pay for the template's full width; the cache is
    written in place)."""

    def branch(nodes: int):
        def run(operand: tuple[jax.Array, Cache]) -> tuple[jax.Array, Cache]:
            logits, written = verify(model, template, operand[1], lengths, pending, tokens, running, num_nodes=nodes)
            return jnp.pad(logits, ((0, 0), (0, template.num_nodes - nodes), (0, 0))), written
        return run

    empty = jnp.zeros((pending.shape[0], template.num_nodes + 1, model.config.vocab_size), jnp.float32)
    return run_indexed(depth, [branch(nodes) for nodes in verified_nodes], (empty, cache))


def verify(
    model: Model,
    template: TreeTemplate,
    cache: Cache,  # target cache; slots past lengths may hold drafts (overwritten here)
    lengths: jax.Array,  # [B] int32: committed lengths, the pending token's slot
    pending: jax.Array,  # [B] int32
    tokens: jax.Array,  # [B, N] int32: the drafted nodes
    running: jax.Array,  # [B] bool: finished rows write nowhere (slot = capacity, dropped)
    extra: tuple[jax.Array, np.ndarray, np.ndarray] | None = None,  # a drafter's tokens [B, E], offsets, visibility
    num_nodes: int | None = None,  # static: verify only the first nodes (a breadth-first prefix); None: all
) -> tuple[jax.Array, Cache]:  # logits [B, n + 1 + E, V] at (pending, nodes, extra), cache with them written
    """One target forward over [pending, nodes], each node at position lengths + depth and slot lengths + 1 + i.

    Every query sees the committed prefix, the root (pending), its ancestors and itself. For a chain that is the
    causal mask by slot (slot lengths + t sees the slots up to its own), so a chain passes no mask and short
    chains run through the Pallas decode kernels; a tree passes its ancestor mask. `extra` appends a drafter's
    own tokens (Lookahead's window) at positions lengths + offsets [E], slots after the nodes, each seeing the
    prefix and the chunk entries of its visibility row [E, N + 1 + E]; no node sees them, so the nodes' logits
    are those of the plain verification.
    """
    nodes = template.num_nodes if num_nodes is None else num_nodes
    offsets = np.asarray([0, *template.depths.tolist()], np.int32)[: nodes + 1]  # [n + 1]
    visibility = template.ancestors[: nodes + 1, : nodes + 1]
    chunk = jnp.concatenate([pending[:, None], tokens[:, :nodes]], axis=1)  # [B, n + 1]
    if extra is not None:
        extra_tokens, extra_offsets, extra_visibility = extra
        offsets = np.concatenate([offsets, np.asarray(extra_offsets, np.int32)])
        hidden = np.zeros((nodes + 1, len(extra_offsets)), bool)  # nodes never see the extra tokens
        visibility = np.concatenate([np.concatenate([visibility, hidden], axis=1), extra_visibility], axis=0)
        chunk = jnp.concatenate([chunk, extra_tokens], axis=1)
    width = chunk.shape[1]
    slots = jnp.where(running[:, None], lengths[:, None] + jnp.arange(width, dtype=jnp.int32), cache.capacity)
    mask = None
    if not (template.is_chain and extra is None):
        mask = masks.prefix_and_block_mask(lengths, jnp.asarray(visibility), lengths, cache.capacity)
    return model.forward(chunk, lengths[:, None] + jnp.asarray(offsets), cache, mask, write_slots=slots)


@struct.dataclass
class Walk:
    num_accepted: jax.Array  # [B] int32
    path: jax.Array  # [B, D] int32 accepted node per depth, -1 past the end
    emitted: jax.Array  # [B, D + 1] int32: the accepted tokens, then the correction/bonus token
    accepted_at_depth: jax.Array  # [B, D] bool
    tried_at_depth: jax.Array  # [B, D] bool


def acceptance_walk(
    template: TreeTemplate,
    logits: jax.Array,  # [B, N + 1, V] processed target logits at (pending, nodes)
    proposal: Proposal,
    params: sampling.SamplingParams,
    key: jax.Array,
    relaxed: Any = None,
    embeddings: jax.Array | None = None,
) -> Walk:
    """The acceptance walk of one step: greedy (exact match) when every row is greedy, else the multi-draft
    rejection rule; a chain (with exact acceptance) takes the prefix-match / Leviathan-Chen walk, which gives the
    tree walk's result on a chain with the same key, without per-node [B, V] work."""
    chain = template.is_chain and relaxed is None
    greedy = (lambda: _accept_greedy_chain(logits, proposal)) if chain else (lambda: _accept_greedy(template, logits, proposal))
    if chain:
        sampled = lambda: _accept_chain(warped_probabilities(logits, params), proposal, params, key)  # noqa: E731
    else:
        sampled = lambda: _accept(template, warped_probabilities(logits, params), proposal, params, key, relaxed, embeddings)  # noqa: E731
    return jax.lax.cond(all_greedy(params), greedy, sampled)


def _accept_greedy_chain(logits: jax.Array, proposal: Proposal) -> Walk:
    """`_accept_greedy` for a chain: the drafts accepted are the longest prefix equal to the target's argmaxes."""
    choice = sampling.argmax(logits)  # [B, N + 1]
    matches = proposal.valid & (proposal.tokens == choice[:, :-1])  # [B, N]
    return _chain_walk(proposal, matches, lambda num_accepted: jnp.take_along_axis(choice, num_accepted[:, None], axis=1)[:, 0])


def _accept_chain(target_probs: jax.Array, proposal: Proposal, params: sampling.SamplingParams, key: jax.Array) -> Walk:
    """`_accept` for a chain (Leviathan / Chen speculative sampling) on the probabilities it needs: draft i is
    accepted when u_i * q_i(d_i) < p_i(d_i), the first rejection draws from norm(max(0, p - q)) at its position only,
    and a full acceptance (or a row's last valid draft) draws from p there. The uniforms and the final draw use the
    keys `_accept` uses, so both walks give the same tokens for the same inputs."""
    batch, num_nodes = proposal.tokens.shape
    rows = jnp.arange(batch)
    p_token = jnp.take_along_axis(target_probs[:, :-1], proposal.tokens[:, :, None], axis=2)[:, :, 0]  # [B, N]
    uniforms = jnp.stack([jax.random.uniform(jax.random.fold_in(key, depth * 1024), (batch,))
                          for depth in range(1, num_nodes + 1)], axis=1)  # [B, N]: `_traverse`'s draws (rank 0)
    takes = proposal.valid & (uniforms * proposal.drafted_probs(params) < p_token)

    def final_token(num_accepted):  # [B] -> [B]
        stopped_at = jnp.minimum(num_accepted, num_nodes - 1)
        rejected = (num_accepted < num_nodes) & proposal.valid[rows, stopped_at]  # tried and rejected
        probs = target_probs[rows, num_accepted]  # [B, V]
        q = proposal.proposal_probs(stopped_at, params, probs.shape[-1])
        return _final_token(jnp.where(rejected[:, None], residual_distribution(probs, q), probs), params, key)

    return _chain_walk(proposal, takes, final_token)


def _final_token(probs: jax.Array, params: sampling.SamplingParams, key: jax.Array) -> jax.Array:
    """The correction / bonus token [B] of both acceptance walks from the distribution probs [B, V] where the walk
    stopped: drawn with the walk's final key where sampling, its argmax where greedy."""
    drawn = sampling.draw(jax.random.fold_in(key, 1 << 20), probs)
    return jnp.where(params.temperature > 0, drawn, sampling.argmax(probs))


def _chain_walk(proposal: Proposal, takes: jax.Array, final_token) -> Walk:
    """The Walk of a chain whose draft i passes its test where takes [B, N] (a prefix of them is accepted);
    final_token(num_accepted [B]) -> [B] the correction / bonus token."""
    accepted_at = jnp.cumprod(takes, axis=1).astype(bool)  # [B, N]
    num_accepted = jnp.sum(accepted_at, axis=1, dtype=jnp.int32)
    depth = jnp.arange(takes.shape[1])[None, :]
    tried_at = proposal.valid & (depth <= num_accepted[:, None])
    path = jnp.where(accepted_at, depth, -1)
    return _walk(proposal, path, accepted_at, tried_at, final_token(num_accepted))


def _accept_greedy(template: TreeTemplate, logits: jax.Array, proposal: Proposal) -> Walk:
    """`_accept` when every row is greedy (p and q one-hot): a draft is accepted iff it is the target's
    argmax; the final token is the argmax after the last accepted node. Same result, no [B, N, V] work."""
    rows = jnp.arange(logits.shape[0])
    choice = sampling.argmax(logits)  # [B, N + 1]

    def try_child(carry, current, child, token, offered, draw):
        return offered & (token == choice[rows, current + 1]), carry

    path, accepted_at, tried_at, current, _ = _traverse(template, proposal, None, try_child, lambda carry, accepted, chosen: carry)
    return _walk(proposal, path, accepted_at, tried_at, choice[rows, current + 1])


def _accept(
    template: TreeTemplate, target_probs: jax.Array, proposal: Proposal, params: sampling.SamplingParams, key: jax.Array,
    relaxed: Any = None, embeddings: jax.Array | None = None,
) -> Walk:
    """Walk the tree from the root with the multi-draft rejection rule (module docstring). A child is accepted when
    u * q(token) < p(token); a `relaxed` rule replaces those two masses by its own (lossy)."""
    rows = jnp.arange(target_probs.shape[0])

    def try_child(probs, current, child, token, offered, draw):
        q = proposal.proposal_probs(child, params, probs.shape[-1])  # [B, V]
        if relaxed is None:
            p_mass, q_mass = probs[rows, token], q[rows, token]
        else:
            p_mass, q_mass = relaxed.masses(probs, q, token, embeddings)
        take = offered & (draw(key) * q_mass < p_mass)
        return take, jnp.where((offered & ~take)[:, None], residual_distribution(probs, q), probs)

    def enter(probs, accepted, chosen):
        return jnp.where(accepted[:, None], target_probs[rows, chosen + 1], probs)

    path, accepted_at, tried_at, _, probs = _traverse(template, proposal, target_probs[:, 0], try_child, enter)
    return _walk(proposal, path, accepted_at, tried_at, _final_token(probs, params, key))


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


MAX_DRAFT_DEPTH = 16  # drafting unrolls one forward per depth: compile time and memory grow with it
AUTO_CHAIN_LENGTH = 4  # num_draft_tokens="auto": the deepest chain (one compiled verification per depth up to it)
MAX_DRAFT_NODES = 128  # verification runs every node as a token of one forward


def check_draft_shape(num_draft_tokens: Any, tree: Any, tree_parents: Any) -> None:
    """Raise `ArgumentError` unless the draft is a chain or tree jspec can compile in bounded time and memory:
    depth <= MAX_DRAFT_DEPTH and nodes <= MAX_DRAFT_NODES."""
    limit = f" (at most {MAX_DRAFT_DEPTH} draft levels), or 'auto'"
    if num_draft_tokens != "auto":
        validation.check_int("num_draft_tokens", num_draft_tokens, minimum=1, maximum=MAX_DRAFT_DEPTH, why=limit)
    if tree is not None:
        try:
            branching = validation.check_int_sequence("tree", tree, minimum=1)
        except validation.ArgumentError:
            validation.fail("tree", "branching factors >= 1 per depth (a list or tuple of ints, e.g. (3, 2, 1))", tree)
        if len(branching) > MAX_DRAFT_DEPTH:
            validation.fail("tree", f"at most {MAX_DRAFT_DEPTH} branching factors (draft levels)", tree)
        nodes = int(np.sum(np.cumprod(branching)))
        if nodes > MAX_DRAFT_NODES:
            validation.fail("tree", f"a tree of at most {MAX_DRAFT_NODES} nodes (this one has {nodes})", tree)
    if tree_parents is not None:
        parents = validation.check_int_sequence("tree_parents", tree_parents, minimum=-1, maximum=MAX_DRAFT_NODES)
        if len(parents) > MAX_DRAFT_NODES:
            validation.fail("tree_parents", f"at most {MAX_DRAFT_NODES} nodes", tree_parents)
        if TreeTemplate(parents).max_depth > MAX_DRAFT_DEPTH:
            validation.fail("tree_parents", f"a tree at most {MAX_DRAFT_DEPTH} levels deep", tree_parents)


def speculative(
    *,
    draft: Model | None = None,
    num_draft_tokens: int | str = 4,
    tree: tuple[int, ...] | None = None,
    tree_parents: tuple[int, ...] | None = None,
    skip_layers: tuple[int, ...] = (),
    adaptive: bool | str = False,
    temperature: Any = 0.0,
    top_k: Any = 0,
    top_p: Any = 1.0,
    min_p: Any = 0.0,
    step_costs: auto_depth.StepCosts | None = None,
) -> Speculative:
    """Draft-model speculative decoding (or self-speculative when only skip_layers is given)."""
    check_draft_shape(num_draft_tokens, tree, tree_parents)
    skip_layers = validation.check_int_sequence("skip_layers", skip_layers, minimum=0, allow_empty=True)
    if draft is not None and not isinstance(draft, Model):
        validation.fail("draft", "a jspec.Model (e.g. jspec.load('demo-code-draft'))", draft)
    if draft is None and not skip_layers:
        raise ArgumentError("draft: strategy 'speculative' needs draft=<jspec.Model> (or skip_layers=... for self-speculative)")
    if draft is None:
        drafter = LayerSkipDrafter(tuple(skip_layers))
    else:
        drafter = DraftModelDrafter(draft.without_tokenizer() if isinstance(draft, Model) else draft)
    return Speculative(
        drafter=drafter,
        num_draft_tokens=num_draft_tokens,
        tree=None if tree is None else tuple(tree),
        tree_parents=None if tree_parents is None else tuple(tree_parents),
        adaptive=adaptive,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        step_costs=step_costs,
    )


def prompt_lookup_strategy(
    *, num_draft_tokens: int | str = 10, max_ngram: int = 3, adaptive: bool | str = False, temperature: Any = 0.0, top_k: Any = 0,
    top_p: Any = 1.0, min_p: Any = 0.0, step_costs: auto_depth.StepCosts | None = None,
) -> Speculative:
    """Prompt-lookup decoding: drafts copied from earlier n-gram matches (defaults as Hugging Face's)."""
    check_draft_shape(num_draft_tokens, None, None)
    return Speculative(
        drafter=PromptLookupDrafter(max_ngram), num_draft_tokens=num_draft_tokens, adaptive=adaptive,
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, step_costs=step_costs,
    )


def self_speculative(
    *, skip_layers: tuple[int, ...], num_draft_tokens: int | str = 4, tree: tuple[int, ...] | None = None, adaptive: bool | str = False,
    temperature: Any = 0.0, top_k: Any = 0, top_p: Any = 1.0, min_p: Any = 0.0, step_costs: auto_depth.StepCosts | None = None,
) -> Speculative:
    """Self-speculative decoding: the target with `skip_layers` left out drafts for itself."""
    check_draft_shape(num_draft_tokens, tree, None)
    skip_layers = validation.check_int_sequence("skip_layers", skip_layers, minimum=0)
    return Speculative(
        drafter=LayerSkipDrafter(tuple(skip_layers)), num_draft_tokens=num_draft_tokens,
        tree=None if tree is None else tuple(tree), adaptive=adaptive,
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, step_costs=step_costs,
    )


register_strategy("speculative", speculative, generation_options=True)
register_strategy("prompt_lookup", prompt_lookup_strategy, generation_options=True)
register_strategy("self_speculative", self_speculative, generation_options=True)
