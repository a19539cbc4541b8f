"""Choosing the draft depth of each speculative step from measured costs and running acceptance (`adaptive="auto"`).

A step that drafts to depth d costs C(d) = verify(d) + draft(d): a target forward over the pending token and the
template's nodes up to depth d, and the drafter's calls (none at depth 0). Under an acceptance rate alpha it emits
E(d) = 1 + alpha + ... + alpha^d = (1 - alpha^(d + 1)) / (1 - alpha) tokens in expectation (ALGORITHMS.md section
1). Each step takes, for the whole batch (the verification forward is shared), the depth with the most expected
tokens per second over the running rows: argmax_d sum_rows E_row(d) / C(d), down to d = 0, a plain autoregressive
step that calls no drafter.

The costs are measured once per (target, drafter, template, batch, cache size, backend) when a strategy is
validated (`measure_step_costs`: the median of jitted calls of every verification width and drafting call), or
given (`Speculative.step_costs`). Each row's acceptance rate is a decayed count of its tried and accepted drafts
(`AcceptanceEstimate`), starting from an optimistic prior. While the batch does not draft, a probe every
`probe_interval` steps runs the drafter's first call only and tries its first draft against the one-token
verification (emitting one token either way, so it costs the drafter's call and no wider forward); the interval
doubles after each probe that does not bring drafting back.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

PRIOR_ACCEPTANCE = 0.6  # the acceptance rate assumed before a row has tried any draft
PRIOR_WEIGHT = 1.0  # ... worth this many observed drafts
DECAY = 0.95  # each observed draft weighs the older ones down by this factor (the rate reaches 0.03 at the lowest)
PROBE_INTERVAL = 8  # steps without drafting before the first probe
MAX_PROBE_INTERVAL = 64
CATCH_UP = PROBE_INTERVAL  # tokens a draft model re-reads before the pending one after steps without drafting


@struct.dataclass
class StepCosts:
    """Seconds (or any one unit) of a step's parts, by depth d = 0..D."""

    verify: jax.Array  # [D + 1] float32: the target forward over the pending token and the nodes up to depth d
    draft: jax.Array  # [D + 1] float32: the drafter's calls drafting to depth d (0 at d = 0)
    probe: jax.Array  # [] float32: the drafter's first call after steps without drafting

    @classmethod
    def memory_bound(cls, max_depth: int, draft_call: float) -> "StepCosts":
        """Every forward costs one unit whatever its width (the memory-bound regime of accelerators); a drafter call
        costs `draft_call` units."""
        depths = np.arange(max_depth + 1)
        draft = np.where(depths > 0, draft_call * np.maximum(depths, 1), 0.0)
        return cls(jnp.ones(max_depth + 1, jnp.float32), jnp.asarray(draft, jnp.float32), jnp.float32(draft_call))


@struct.dataclass
class AcceptanceEstimate:
    """Each row's decayed counts of drafts accepted and tried; the rate is shrunk toward PRIOR_ACCEPTANCE."""

    accepted: jax.Array  # [B] float32
    tried: jax.Array  # [B] float32

    @classmethod
    def create(cls, batch_size: int) -> "AcceptanceEstimate":
        return cls(jnp.zeros((batch_size,), jnp.float32), jnp.zeros((batch_size,), jnp.float32))

    @property
    def rate(self) -> jax.Array:  # [B] float32 in [0, 1]
        return (self.accepted + PRIOR_ACCEPTANCE * PRIOR_WEIGHT) / (self.tried + PRIOR_WEIGHT)

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
        return AcceptanceEstimate(accepted, tried)


def expected_tokens(rate: jax.Array, max_depth: int) -> jax.Array:  # [B] -> [B, D + 1]
    """Tokens a step drafting to depth d = 0..D emits in expectation at acceptance rate `rate`: sum_{i <= d} rate^i."""
    powers = rate[:, None] ** jnp.arange(max_depth + 1, dtype=jnp.float32)[None, :]
    return jnp.cumsum(powers, axis=1)


def choose_depth(rate: jax.Array, running: jax.Array, costs: StepCosts) -> jax.Array:  # [] int32
    """The depth with the most expected tokens per unit of cost over the running rows (0 when none runs)."""
    max_depth = costs.verify.shape[0] - 1
    tokens = jnp.sum(jnp.where(running[:, None], expected_tokens(rate, max_depth), 0.0), axis=0)  # [D + 1]
    return jnp.argmax(tokens / (costs.verify + costs.draft)).astype(jnp.int32)


# --- measuring the costs ----------------------------------------------------------------------------------

_MEASURED: dict[Any, StepCosts] = {}


def measured_costs(key: Any) -> StepCosts | None:
    """The costs `measure_step_costs` measured for this key in this process, or None."""
    return _MEASURED.get(key)


def measure_step_costs(
    key: Any,
    verify: dict[int, Any],  # verification width -> thunk, for some of the widths below (at least the first and last)
    widths: list[int],  # [D + 1]: the verification width at each depth
    root: Any = None,  # thunk: the drafter's first call (None: a drafter with no network)
    levels: list[Any] | None = None,  # [D - 1] thunks: the call drafting below depth d (the same thunk may recur)
    probe: Any = None,  # thunk: the first call after steps without drafting (None: `root`)
    repeats: int = 7,
) -> StepCosts:
    """Time each jitted call once compiled (the fastest of `repeats`: other load on the machine only adds; each
    distinct thunk once) and assemble the costs, remembered under `key`. A width without a thunk is priced by linear
    interpolation between measured widths, and no width costs less than a narrower one."""
    if key in _MEASURED:
        return _MEASURED[key]
    measured: dict[int, float] = {}

    def seconds(thunk) -> float:
        if thunk is None:
            return 0.0
        if id(thunk) not in measured:
            jax.block_until_ready(thunk())
            runs = []
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(thunk())
                runs.append(time.perf_counter() - start)
            measured[id(thunk)] = min(runs)
        return measured[id(thunk)]

    known = sorted(verify)
    verify_seconds = np.maximum.accumulate(np.interp(widths, known, [seconds(verify[width]) for width in known]))
    levels = levels if levels is not None else [None] * (len(widths) - 2)
    level_seconds = np.cumsum([0.0] + [seconds(thunk) for thunk in levels])  # [D]: levels below depth 1..D
    draft = [0.0] + [seconds(root) + level_seconds[depth - 1] for depth in range(1, len(widths))]
    costs = StepCosts(jnp.asarray(verify_seconds, jnp.float32), jnp.asarray(draft, jnp.float32),
                      jnp.float32(seconds(probe if probe is not None else root)))
    _MEASURED[key] = costs
    return costs


def forward_call(model: Any, batch_size: int, cache_size: int, width: int, skip_layers: tuple[int, ...] = ()):
    """A thunk running one jitted forward of `width` tokens per row over a cache half full (default causal mask)."""
    filled = max(min(cache_size // 2, cache_size - width), 0)
    cache = model.new_cache(batch_size, cache_size, max_chunk=width).with_lengths(jnp.full((batch_size,), filled, jnp.int32))
    tokens = jnp.ones((batch_size, width), jnp.int32)
    positions = jnp.broadcast_to(filled + jnp.arange(width, dtype=jnp.int32)[None], (batch_size, width))
    run = jax.jit(lambda m, c: m.forward(tokens, positions, c, skip_layers=skip_layers)[0])
    model = model.without_tokenizer()
    return lambda: run(model, cache)


def forward_calls(model: Any, batch_size: int, cache_size: int, skip_layers: tuple[int, ...] = ()):
    """width -> `forward_call` thunk, one per width (so each width is compiled and timed once)."""
    thunks: dict[int, Any] = {}

    def call(width: int):
        if width not in thunks:
            thunks[width] = forward_call(model, batch_size, cache_size, width, skip_layers)
        return thunks[width]

    return call


@struct.dataclass
class DepthControl:
    """The auto depth's state in a speculative decode: costs, acceptance, and the probing schedule."""

    costs: StepCosts
    acceptance: AcceptanceEstimate
    idle_steps: jax.Array  # [] int32: steps since the drafter last ran
    probe_interval: jax.Array  # [] int32

    @classmethod
    def create(cls, costs: StepCosts, batch_size: int, probe_interval: int) -> "DepthControl":
        return cls(costs, AcceptanceEstimate.create(batch_size), jnp.int32(0), jnp.int32(probe_interval))

    def plan(self, running: jax.Array) -> tuple[jax.Array, jax.Array]:  # depth [] int32, probe [] bool
        """This step's depth for the batch, and whether it probes (depth 0, the drafter's first draft tried)."""
        depth = choose_depth(self.acceptance.rate, running, self.costs)
        return depth, (depth == 0) & (self.idle_steps + 1 >= self.probe_interval) & jnp.any(running)

    def after(self, depth: jax.Array, probe: jax.Array, accepted_at: jax.Array, tried_at: jax.Array,
              base_interval: int) -> "DepthControl":
        """The control after a step at `depth` (probing or not) whose walk accepted / tried these drafts [B, D]."""
        drafted = (depth > 0) | probe
        interval = jnp.where(depth > 0, base_interval,
                             jnp.where(probe, jnp.minimum(2 * self.probe_interval, MAX_PROBE_INTERVAL), self.probe_interval))
        return DepthControl(self.costs, self.acceptance.observe(accepted_at, tried_at),
                            jnp.where(drafted, 0, self.idle_steps + 1).astype(jnp.int32), interval.astype(jnp.int32))
