"""Choosing the draft depth of each speculative step from measured costs and running acceptance (`adaptive="auto"`).

A step that drafts to depth d costs C(d): the drafter's calls (none at depth 0), a target forward over the pending
token and the template's nodes up to depth d, the acceptance walk and the bookkeeping. Under an acceptance rate alpha
it emits
E(d) = 1 + alpha + ... + alpha^d = (1 - alpha^(d + 1)) / (1 - alpha) tokens in expectation (ALGORITHMS.md section
1). Each step takes, for the whole batch (the verification forward is shared), the depth under which the batch is
expected to finish soonest: argmin_d C(d) * max_rows R_row / E_row(d), R_row the tokens a running row may still
emit, down to d = 0, a plain autoregressive step that calls no drafter (a draft model reads the prompts only at
the first step that calls it: `DraftModelDrafter.defer_prefill`). A decode returns when its last row
finishes, so tokens that rows with high acceptance would emit early do not shorten it: the row with the most steps
left decides (for one row, or rows alike, this is the depth with the most expected tokens per second, E(d) / C(d)).
To start drafting after a step that did not draft, a depth must be expected to save DRAFT_MARGIN of the plain steps'
time (what the model leaves out and the prior's error made smaller predicted gains losses); drafting goes on while
it is expected to save anything.

The costs are measured once per process and (target config, kernels and mesh, drafter kind and config, template,
batch, cache size, max_new_tokens, backend, sampling regime; on a multi-process mesh, process 0's) when a strategy
is validated (`measure_step_costs`: the strategy's own jitted steps, forced to each depth, from the request's first
state, what a call pays once taken off), or given (`Speculative.step_costs`). Each row's acceptance rate is a
decayed count of its tried and accepted drafts (`AcceptanceEstimate`), starting from a prior measured with the costs
(`StepCosts.acceptance`: the drafts that 32 steps at the deepest depth accepted, from the request's first state;
`measure_prior_acceptance`, once per the costs' key, the weights of the target and the drafter, the sampling
values, the acceptance rule and the processors; PRIOR_ACCEPTANCE where nothing was measured).

While the batch does not draft, a probe every `probe_interval` steps (while a row has that many tokens left) runs the drafter's first call only and
tries its first draft against the one-token verification (emitting one token either way, so it costs the drafter's
call and no wider forward); the interval starts at the larger of `probe_interval` and the steps over which a probe's
extra cost (measured) is PROBE_BUDGET of a plain step's (capped at MAX_PROBE_INTERVAL; MAX_FIRST_PROBE_INTERVAL with
the setup), and doubles after each probe that does not bring drafting back. The first probe's extra cost includes
the drafter's one-off setup (`StepCosts.setup`: a draft model's deferred prefill, measured apart), so a batch that
does not draft from its first step probes later the first time.
"""

from __future__ import annotations

import functools
import time
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

PRIOR_ACCEPTANCE = 0.6  # the acceptance rate assumed before a row has tried any draft, where none was measured
PRIOR_WEIGHT = 1.0  # ... worth this many observed drafts (a measured prior is shrunk toward it with this weight too)
DECAY = 0.95  # each observed draft weighs the older ones down by this factor (the rate reaches prior / 21 at the lowest)
DRAFT_MARGIN = 0.15  # after a step that did not draft, a depth d > 0 is taken only where it is expected to finish in at
# most 1 - this of plain steps' time (see choose_depth)
PROBE_INTERVAL = 8  # steps without drafting before the first probe (at least; see PROBE_BUDGET)
MAX_PROBE_INTERVAL = 64
MAX_FIRST_PROBE_INTERVAL = 256  # ... the first probe of a drafter with a one-off setup (a deferred draft prefill)
PROBE_BUDGET = 0.02  # a probe's extra cost over a plain step, spread over the steps between probes, stays below this
TIE_TOLERANCE = 1e-4  # plain_throughout's margin against rounding (float32's epsilon is 1.2e-7)
CATCH_UP = PROBE_INTERVAL  # tokens a draft model re-reads before the pending one after steps without drafting


@struct.dataclass
class StepCosts:
    """Seconds (or any one unit) of one step, by depth."""

    step: jax.Array  # [D + 1] float32: a step drafting to depth d = 0..D (d = 0: a plain step, no drafter call)
    probe: jax.Array  # [] float32: a plain step that probes (runs the drafter's first call, tries its first draft)
    setup: jax.Array = struct.field(default_factory=lambda: jnp.float32(0.0))  # [] float32: what the drafter's first
    # call pays once on top of its cost (a deferred draft prefill); 0 for a drafter with no such setup
    acceptance: jax.Array = struct.field(default_factory=lambda: jnp.float32(PRIOR_ACCEPTANCE))  # [] float32 in [0, 1]:
    # the acceptance rate a row starts from, before it has tried a draft (measured with the costs)

    @classmethod
    def memory_bound(cls, max_depth: int, draft_call: float) -> "StepCosts":
        """Every target forward costs one unit whatever its width (the memory-bound regime of accelerators) and a
        drafter call `draft_call` units (d calls to draft to depth d)."""
        depths = np.arange(max_depth + 1, dtype=np.float32)
        return cls(jnp.asarray(1.0 + draft_call * depths), jnp.float32(1.0 + draft_call))

    def forcing(self, depth: int) -> "StepCosts":
        """Costs under which `choose_depth` picks `depth` whatever the acceptance."""
        return self.replace(step=jnp.where(jnp.arange(self.step.shape[0]) == depth, 1.0, 1e9).astype(jnp.float32))


@struct.dataclass
class AcceptanceEstimate:
    """Each row's decayed counts of drafts accepted and tried; the rate is shrunk toward the prior."""

    accepted: jax.Array  # [B] float32
    tried: jax.Array  # [B] float32
    prior: jax.Array  # [] float32: the rate before any draft is tried (weight PRIOR_WEIGHT)

    @classmethod
    def create(cls, batch_size: int, prior: jax.Array | float = PRIOR_ACCEPTANCE) -> "AcceptanceEstimate":
        return cls(jnp.zeros((batch_size,), jnp.float32), jnp.zeros((batch_size,), jnp.float32), jnp.float32(prior))

    @property
    def rate(self) -> jax.Array:  # [B] float32 in [0, 1]
        return (self.accepted + self.prior * PRIOR_WEIGHT) / (self.tried + PRIOR_WEIGHT)

    def observe(
        self,
        accepted_at: jax.Array,  # [B, D] bool: the draft at each depth was accepted
        tried_at: jax.Array,  # [B, D] bool: ... was tried
    ) -> "AcceptanceEstimate":
        """The counts after this step's trials, oldest first (each trial decays the counts before it)."""
        accepted, tried = self.accepted, self.tried
        for depth in range(tried_at.shape[1]):
            seen = tried_at[:, depth]
            accepted = jnp.where(seen, DECAY * accepted + accepted_at[:, depth], accepted)
            tried = jnp.where(seen, DECAY * tried + 1.0, tried)
        return self.replace(accepted=accepted, tried=tried)


def expected_tokens(rate: jax.Array, max_depth: int, remaining: jax.Array | None = None) -> jax.Array:  # [B] -> [B, D + 1]
    """Tokens a step drafting to depth d = 0..D emits in expectation at acceptance rate `rate`: sum_{i <= d} rate^i;
    with `remaining` [B] (tokens each row may still emit), only the terms i < remaining count (a row emits no more)."""
    exponents = jnp.arange(max_depth + 1, dtype=jnp.float32)[None, :]
    powers = rate[:, None] ** exponents
    if remaining is not None:
        powers = jnp.where(exponents < remaining[:, None], powers, 0.0)
    return jnp.cumsum(powers, axis=1)


def choose_depth(
    rate: jax.Array,  # [B] float32: each row's acceptance rate
    remaining: jax.Array,  # [B] float32: tokens each row may still emit (0: finished)
    costs: StepCosts,
    drafting: jax.Array | bool = False,  # [] bool: the last step drafted (depth > 0)
) -> jax.Array:  # [] int32
    """The depth under which the batch is expected to finish soonest: argmin_d C(d) * max_rows remaining / E(d),
    E capped at what each row may still emit. To start drafting (after a step that did not draft) a depth d > 0 must
    beat plain steps by DRAFT_MARGIN of their time; drafting goes on while it is expected to beat them at all (so the
    batch does not switch back and forth where the two are close). The model leaves out what drafting costs beside
    its steps (the auto-depth loop's own cost per step over autoregressive decoding's loop, 2-3% on demo-code at batch 1; the draft's catch-up reads after plain steps,
    probes) and the prior acceptance's error (measured on one request), and with these, predicted gains under 10%
    were losses (demo-code at batch 1, T=0.8: prior 0.67 measured against 0.6 over eight prompts, 0.94x of
    autoregressive with no margin). When no row runs, the cheapest depth (so costs that force a depth keep forcing
    it)."""
    max_depth = costs.step.shape[0] - 1
    tokens = expected_tokens(rate, max_depth, remaining)  # [B, D + 1]
    running = remaining[:, None] > 0
    steps_left = jnp.max(jnp.where(running, remaining[:, None] / jnp.where(running, tokens, 1.0), 0.0), axis=0)  # [D + 1]
    steps_left = jnp.where(jnp.any(running), steps_left, 1.0)
    margin = jnp.where((jnp.arange(max_depth + 1) > 0) & ~jnp.asarray(drafting) & jnp.any(running),
                       1.0 / (1.0 - DRAFT_MARGIN), 1.0)
    return jnp.argmin(steps_left * costs.step * margin).astype(jnp.int32)


def plain_throughout(costs: StepCosts, max_new_tokens: int, probe_interval: int) -> bool:
    """True only where every step of a decode under these (concrete) costs is a plain step with no probe, whatever
    its rows do, for rows of at most max_new_tokens new tokens each (the first from the prefill); exact but for the
    tie tolerance below, from `DepthControl`:
    - The acceptance rates start at the prior (costs.acceptance), alike for all rows, and change only when a draft is tried (a drafting
      step or a probe). With rates alike, choose_depth's steps_left(d) is f_d(R_max) with
      f_d(R) = R / E_d(R) nondecreasing in R, and C(d) f_d(R) / (C(0) f_0(R)) = C(d) / (C(0) E_d(R)) does not fall
      as R falls (E_d(R), capped at R, does not rise): if depth 0 wins with a row at max_new_tokens - 1 tokens
      left, it wins at every step that follows.
    - While the drafter has not run, a probe at the k-th step (k = 0, 1, ..., idle for k steps) needs
      k + 1 >= I and a row with max_new_tokens - 1 - k >= I tokens left, I the first probe's interval (with the
      drafter's setup): some step can probe only if max_new_tokens >= 2 I.
    Decided here eagerly for one row, in the loop jitted for a batch: the two may round differently, so here a plain
    step costs TIE_TOLERANCE more (a near-tie, or a probe interval at the edge of a step, counts as drafting or
    probing: the request then runs the auto-depth loop, which is always right). Remembered per (costs,
    max_new_tokens, probe_interval, this module's constants): it runs on the host before every such decode."""
    values = (tuple(np.asarray(costs.step).tolist()), float(costs.probe), float(costs.setup), float(costs.acceptance))
    constants = (PRIOR_WEIGHT, DECAY, DRAFT_MARGIN, PROBE_BUDGET, MAX_PROBE_INTERVAL, MAX_FIRST_PROBE_INTERVAL,
                 TIE_TOLERANCE)
    return _plain_throughout(values, int(max_new_tokens), int(probe_interval), constants)


@functools.lru_cache(maxsize=256)
def _plain_throughout(values: tuple[tuple[float, ...], float, float, float], max_new_tokens: int, probe_interval: int,
                      constants: tuple[float, ...]) -> bool:
    del constants  # read from the module below: passed only to key the memo
    step, probe, setup, acceptance = values
    step = (step[0] * (1 + TIE_TOLERANCE),) + tuple(step[1:])  # makes probes look cheaper and depth 0 dearer
    costs = StepCosts(jnp.asarray(step, jnp.float32), jnp.float32(probe), jnp.float32(setup), jnp.float32(acceptance))
    interval = max(int(first_probe_interval(costs, probe_interval)), int(first_probe_interval(costs, 1, with_setup=True)))
    if max_new_tokens >= 2 * interval:
        return False
    rate = jnp.full((1,), acceptance, jnp.float32)
    return int(choose_depth(rate, jnp.full((1,), max_new_tokens - 1, jnp.float32), costs)) == 0


# --- measuring the costs ----------------------------------------------------------------------------------

_MEASURED: dict[Any, StepCosts] = {}


def measured_costs(key: Any) -> StepCosts | None:
    """The costs `measure_step_costs` measured for this key in this process, or None."""
    return _MEASURED.get(key)


LEAD_STEPS = 4  # steps a timed call runs before the steps that are timed (see measure_step_costs)
STEPS_PER_CALL = 8  # ... and the steps timed after those
ACCEPTANCE_STEPS = 32  # steps at the deepest depth whose drafts measure the prior acceptance


def measure_step_costs(key: Any, step_at: Any, max_depth: int, repeats: int = 5, setup: Any = None,
                       everywhere: bool = False) -> StepCosts:
    """Time step_at(depth, probe) -> (prepare, run) for every depth and the probe: prepare() makes a step's input
    (not timed), run(input, count) runs `count` jitted steps forced to that depth, probing or not, in one call, as
    the decode loop runs them (its input donated, so it updates the caches in place as the loop does; an undonated
    input would add a copy of every cache to each call and hide how much wider steps cost). A setting's time is the
    difference between a call of LEAD_STEPS + STEPS_PER_CALL steps and a call of LEAD_STEPS steps, over
    STEPS_PER_CALL: what a call pays once is taken off, its fixed cost (dispatch, donation: milliseconds for a
    batch's caches, which the compiled loop never pays per step) and the extra cost of its first steps (measured on
    demo-code at batch 8: 1.4 ms on every depth, half a plain step; measured against a call of zero steps, it made
    drafting steps look 15-30% cheaper, relative to a plain step, than they are in a decode). Once compiled, the
    settings run in turn,
    `repeats` rounds; a setting costs the plain step's fastest time (load only adds) times the median over rounds
    of its time relative to the plain step's in the same round (runs close in time share the machine's load, and
    the median drops bursts). A depth never costs less than a shallower one.
    setup: None, or (prepare, run) whose run(input) is the drafter's one-off setup in one small call (a deferred
    draft prefill; its call's fixed cost stays in), timed in the same rounds: `StepCosts.setup`.
    The acceptance is PRIOR_ACCEPTANCE: `measure_prior_acceptance` measures it for given weights and options.
    everywhere: the steps compute on devices of every process (`spans_processes`): the costs are then process 0's
    (`agreed`). Remembered under `key` (what the timing depends on: shapes, kernels and mesh, drafter kind,
    sampling regime, backend)."""
    if key in _MEASURED:
        return _MEASURED[key]
    settings = [step_at(depth, False) for depth in range(max_depth + 1)] + [step_at(0, True)]
    for prepare, run in settings:  # compile, warm up
        jax.block_until_ready(run(prepare(), LEAD_STEPS + STEPS_PER_CALL))
    if setup is not None:
        jax.block_until_ready(setup[1](setup[0]()))

    def timed(prepare: Any, run: Any, count: int) -> float:
        inputs = jax.block_until_ready(prepare())
        start = time.perf_counter()
        jax.block_until_ready(run(inputs, count))
        return time.perf_counter() - start

    times = np.zeros((repeats, len(settings) + 1))  # the last column: the setup (0 without one)
    for round_ in range(repeats):
        for index, (prepare, run) in enumerate(settings):
            lead = timed(prepare, run, LEAD_STEPS)
            times[round_, index] = max(timed(prepare, run, LEAD_STEPS + STEPS_PER_CALL) - lead, 1e-9) / STEPS_PER_CALL
        if setup is not None:
            times[round_, -1] = timed(setup[0], lambda inputs, _: setup[1](inputs), 1)
    costs = times[:, 0].min() * np.median(times / times[:, :1], axis=0)
    steps = np.maximum.accumulate(costs[:-2])
    measured = StepCosts(jnp.asarray(steps, jnp.float32), jnp.float32(max(costs[-2], steps[0])), jnp.float32(costs[-1]))
    measured = agreed(measured) if everywhere else measured
    _MEASURED[key] = measured
    return measured


def spans_processes(tree: Any) -> bool:
    """Whether arrays of `tree` (a model's weights) lie on devices of other processes too: computing with them then
    takes every process (a multi-process mesh), and so can agreeing on a measurement (`agreed`). A process that
    decodes with weights of its own alone (one process's run, or a local decode inside a multi-process job) does not
    wait for the others."""
    return any(isinstance(leaf, jax.Array) and not leaf.is_fully_addressable for leaf in jax.tree.leaves(tree))


def agreed(measurement: Any) -> Any:
    """Float measurements (a pytree of arrays, returned as float32) as process 0 made them, in every process; call
    it only where every process measures (`spans_processes`). Processes time their own steps, and on 2 x 2
    simulated CPU devices their costs differed 3x; deciding on different costs, they would run different programs
    (PlainSteps in one, the auto-depth loop or other depths in another) and wait on each other's collectives
    (tests/test_multihost.py)."""
    from jax.experimental import multihost_utils

    shared = multihost_utils.broadcast_one_to_all(jax.tree.map(np.asarray, measurement))
    return jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float32), shared)


_PRIORS: dict[Any, tuple[tuple[weakref.ref, ...], float]] = {}  # key -> (the weights it was measured with, prior)


def weights_identity(tree: Any) -> tuple[tuple[int, ...], tuple[weakref.ref, ...]] | None:
    """The identity of the arrays in `tree` (a model's and a drafter's weights): their ids, and weak references
    that tell whether they are still those arrays (an id is reused only once its array is gone). None (nothing is
    remembered) when a leaf is traced or is not a jax array (a numpy weight cannot be told apart by identity).
    Weights placed anew for each decode (an unsharded model passed with mesh=) are new arrays each time."""
    leaves = jax.tree.leaves(tree)
    if any(isinstance(leaf, jax.core.Tracer) or not isinstance(leaf, jax.Array) for leaf in leaves):
        return None
    return tuple(map(id, leaves)), tuple(weakref.ref(leaf) for leaf in leaves)


def measured_prior(key: Any, weights: Any) -> float | None:
    """The prior `measure_prior_acceptance` measured under this key for these (still living) weights, or None."""
    found = _PRIORS.get((key, None if weights is None else weights[0]))
    alive = found is not None and weights is not None and all(ref() is not None for ref in found[0])
    return found[1] if alive else None


def measure_prior_acceptance(key: Any, weights: Any, run_deepest: Any, acceptance: Any,
                             everywhere: bool = False) -> float:
    """The acceptance rate a row starts from (`StepCosts.acceptance`): run_deepest() runs ACCEPTANCE_STEPS steps
    at the deepest depth from a request's first state, acceptance(its output) -> (drafts accepted, drafts tried);
    the rate they accepted, shrunk toward PRIOR_ACCEPTANCE with the weight PRIOR_WEIGHT. Remembered under `key`
    (the timing's key and what else the rate depends on: sampling values, acceptance rule, processors) and the
    weights' identity (`weights_identity`; not remembered for traced weights). everywhere: as in
    `measure_step_costs` (process 0's rate)."""
    remembered = measured_prior(key, weights)
    if remembered is not None:
        return remembered
    accepted, tried = (float(count) for count in acceptance(jax.block_until_ready(run_deepest())))
    prior = (accepted + PRIOR_ACCEPTANCE * PRIOR_WEIGHT) / (tried + PRIOR_WEIGHT)
    prior = float(agreed(np.float32(prior))) if everywhere else prior
    if weights is not None:
        for gone in [entry for entry, (refs, _) in _PRIORS.items() if any(ref() is None for ref in refs)]:
            del _PRIORS[gone]
        _PRIORS[(key, weights[0])] = (weights[1], prior)
    return prior


def concrete_values(tree: Any) -> Any:
    """A hashable stand-in for a pytree's values (its structure and every leaf's shape, dtype and bytes), or
    "traced" where a leaf is traced: what a remembered measurement's key holds of options such as temperatures."""
    leaves, structure = jax.tree.flatten(tree)
    if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        return "traced"
    arrays = [np.asarray(leaf) for leaf in leaves]
    return structure, tuple((array.shape, array.dtype.str, array.tobytes()) for array in arrays)


@struct.dataclass
class DepthControl:
    """The auto depth's state in a speculative decode: costs, acceptance, and the probing schedule."""

    costs: StepCosts
    acceptance: AcceptanceEstimate
    idle_steps: jax.Array  # [] int32: steps since the drafter last ran
    probe_interval: jax.Array  # [] int32
    base_interval: jax.Array  # [] int32: the interval after a drafting step
    drafter_ran: jax.Array  # [] bool: the drafter has run (its one-off setup, `StepCosts.setup`, is paid)
    drafting: jax.Array  # [] bool: the last step drafted (depth > 0)

    @classmethod
    def create(cls, costs: StepCosts, batch_size: int, probe_interval: int) -> "DepthControl":
        base = first_probe_interval(costs, probe_interval)
        return cls(costs, AcceptanceEstimate.create(batch_size, costs.acceptance), jnp.int32(0), base, base,
                   jnp.bool_(False), jnp.bool_(False))

    def plan(self, remaining: jax.Array) -> tuple[jax.Array, jax.Array]:  # depth [] int32, probe [] bool
        """This step's depth for the batch, and whether it probes (depth 0, the drafter's first draft tried).
        remaining: [B] tokens each row may still emit (0: finished). Until the drafter has run, a probe also pays its
        setup, so the first one waits for enough steps to spread that over too. A probe also needs a row with at
        least `interval` tokens left: its cost is budgeted over that many steps, and near a decode's end no drafting
        it could bring back would pay for it."""
        depth = choose_depth(self.acceptance.rate, remaining, self.costs, self.drafting)
        interval = jnp.where(self.drafter_ran, self.probe_interval,
                             jnp.maximum(self.probe_interval, first_probe_interval(self.costs, 1, with_setup=True)))
        return depth, (depth == 0) & (self.idle_steps + 1 >= interval) & (jnp.max(remaining) >= interval)

    def after(self, depth: jax.Array, probe: jax.Array, accepted_at: jax.Array, tried_at: jax.Array) -> "DepthControl":
        """The control after a step at `depth` (probing or not) whose walk accepted / tried these drafts [B, D]."""
        drafted = (depth > 0) | probe
        doubled = jnp.maximum(jnp.minimum(2 * self.probe_interval, MAX_PROBE_INTERVAL), self.probe_interval)
        interval = jnp.where(depth > 0, self.base_interval, jnp.where(probe, doubled, self.probe_interval))
        return self.replace(acceptance=self.acceptance.observe(accepted_at, tried_at),
                            idle_steps=jnp.where(drafted, 0, self.idle_steps + 1).astype(jnp.int32),
                            probe_interval=interval.astype(jnp.int32), drafter_ran=self.drafter_ran | drafted,
                            drafting=jnp.asarray(depth > 0))


def first_probe_interval(costs: StepCosts, minimum: int, with_setup: bool = False) -> jax.Array:  # [] int32
    """The larger of `minimum` and the steps over which a probe's extra cost over a plain step (with the drafter's
    one-off setup where `with_setup`) is PROBE_BUDGET of a plain step's (at most MAX_PROBE_INTERVAL; with the setup,
    MAX_FIRST_PROBE_INTERVAL): a cheap probe (a drafter without a network) comes often, a dear one (a draft model
    re-reading the steps it missed, for a batch of rows; reading the prompts first) rarely. The first probe's longer
    cap keeps to the budget where the setup is a few plain steps (demo-code-draft's prefill of 128-token prompts:
    1.6-2.8 of demo-code's steps at batch 1-8, its probe 1-1.6 more: the first probe after 120-220 steps; capped at
    64, the probe cost 3% of a 128-token decode); the batch that waits has not drafted, as under the prior
    acceptance drafting did not pay."""
    extra = jnp.maximum(costs.probe / costs.step[0] - 1.0, 0.0) + (costs.setup / costs.step[0] if with_setup else 0.0)
    cap = MAX_FIRST_PROBE_INTERVAL if with_setup else MAX_PROBE_INTERVAL
    budgeted = jnp.minimum(jnp.ceil(extra / PROBE_BUDGET), cap).astype(jnp.int32)
    return jnp.maximum(jnp.int32(minimum), budgeted)
