"""Speculative decoding: lossless for greedy (token-identical) and for sampling (distribution-identical)."""

from __future__ import annotations

import importlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jspec
from conftest import tiny_model
from jspec import sampling
from jspec.strategies import speculative as speculative_module
from jspec.strategies.base import FinishReason
from jspec.strategies.tree import TreeTemplate

PROMPTS = [[5, 17, 3], [9, 2, 44, 61, 7, 12, 30, 8], [1], [88, 3, 3, 3, 3, 3], [4, 4, 4, 4], [70, 71, 72, 73, 74, 70, 71], [2, 9], [60] * 5]


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("llama", seed=0, num_layers=3)
    draft = tiny_model("llama", seed=1, num_layers=1)
    return target, draft


STRATEGIES = {
    "chain-draft": lambda draft: ("speculative", dict(draft=draft, num_draft_tokens=3)),
    "chain-self-as-draft": lambda draft: ("speculative", dict(num_draft_tokens=5, draft="target")),
    "tree-draft": lambda draft: ("speculative", dict(draft=draft, tree=(3, 2, 1))),
    "tree-self-as-draft": lambda draft: ("speculative", dict(draft="target", tree=(2, 2, 1))),
    "adaptive-chain": lambda draft: ("speculative", dict(draft=draft, num_draft_tokens=4, adaptive=True)),
    "prompt-lookup": lambda draft: ("prompt_lookup", dict(num_draft_tokens=4, max_ngram=2)),
    "prompt-lookup-adaptive": lambda draft: ("prompt_lookup", dict(num_draft_tokens=6, adaptive=True)),
    "layer-skip-chain": lambda draft: ("self_speculative", dict(skip_layers=(1,), num_draft_tokens=3)),
    "layer-skip-tree": lambda draft: ("self_speculative", dict(skip_layers=(0, 2), tree=(2, 2))),
}


def _resolve(name, pair):
    target, draft = pair
    strategy, options = STRATEGIES[name](draft)
    if options.get("draft") == "target":
        options["draft"] = target
    return strategy, options


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_greedy_equals_autoregressive(pair, name):
    target = pair[0]
    want = jspec.decode(target, PROMPTS, max_new_tokens=18, stop_tokens=[])
    strategy, options = _resolve(name, pair)
    got = jspec.decode(target, PROMPTS, strategy, max_new_tokens=18, stop_tokens=[], **options)
    assert got.sequences() == want.sequences()
    if "self-as-draft" in name:  # a draft equal to the target accepts every draft token
        assert got.stats["model_calls"] < want.stats["model_calls"] / 2


def test_numpy_bool_adaptive_adapts_like_true(pair):
    """adaptive=np.True_ is adaptive=True (it once compiled a non-adapting loop, then shared it with True)."""
    target, draft = pair
    calls = {}
    for flag in (np.True_, True, False):
        out = jspec.decode(target, PROMPTS, "speculative", draft=draft, num_draft_tokens=4, adaptive=flag, max_new_tokens=18,
                           stop_tokens=[])
        calls[repr(flag)] = int(out.stats["draft_calls"])
    assert calls["np.True_"] == calls["True"] != calls["False"]


@pytest.mark.parametrize("name", ["chain-draft", "tree-draft", "prompt-lookup", "layer-skip-chain"])
def test_stats_add_up(pair, name):
    target = pair[0]
    strategy, options = _resolve(name, pair)
    out = jspec.decode(target, PROMPTS, strategy, max_new_tokens=15, stop_tokens=[], **options)
    stats = out.stats
    generated = np.asarray(stats["tokens_generated"])
    # every row: the prefill token + emitted accepted drafts + emitted corrections/bonus tokens
    np.testing.assert_array_equal(generated, 1 + np.asarray(stats["emitted_drafts"]) + np.asarray(stats["emitted_corrections"]))
    # one correction/bonus per step, except a final step whose chunk the length limit cut before it
    corrections, steps = np.asarray(stats["emitted_corrections"]), np.asarray(stats["active_steps"])
    assert np.all((corrections == steps) | ((corrections == steps - 1) & (generated == 15)))
    histogram = np.asarray(stats["accepted_histogram"])
    assert histogram.sum() == np.sum(stats["active_steps"])
    assert stats["model_calls"] == stats["steps"] == 1 + max(stats["active_steps"])
    np.testing.assert_allclose(stats["mean_accepted_length"], generated / (np.asarray(stats["active_steps"]) + 1), rtol=1e-6)
    rates = np.asarray(stats["acceptance_rate_by_depth"])
    assert np.all((rates >= 0) & (rates <= 1)) and len(rates) == len(histogram) - 1


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    lengths=st.lists(st.integers(1, 10), min_size=1, max_size=8),
    drafter=st.sampled_from(["model", "layer_skip", "prompt_lookup"]),
    shape=st.sampled_from([(1,), (2,), (4,), (6,), (2, 1), (3, 2), (2, 2, 2), (1, 3)]),
    adaptive=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_property_greedy_equals_autoregressive(pair, lengths, drafter, shape, adaptive, seed):
    target, draft = pair
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 97, n).tolist() for n in lengths]
    tree = None if len(shape) == 1 else shape
    options = dict(num_draft_tokens=shape[0] if tree is None else 4, adaptive=adaptive)
    if drafter == "model":
        strategy = jspec.strategies.Speculative(draft=draft, tree=tree, **options)
    elif drafter == "layer_skip":
        strategy = jspec.strategies.Speculative(drafter="layer_skip", skip_layers=(int(rng.integers(0, 3)),), tree=tree, **options)
    else:
        strategy = jspec.strategies.Speculative(drafter="prompt_lookup", max_ngram=int(rng.integers(1, 4)), **options)
    want = jspec.decode(target, prompts, max_new_tokens=12, stop_tokens=[])
    got = jspec.decode(target, prompts, strategy, max_new_tokens=12, stop_tokens=[])
    assert got.sequences() == want.sequences()


def test_stop_tokens_inside_an_accepted_chunk(pair):
    """A stop token among accepted drafts ends the row right there, exactly as in autoregressive decoding."""
    target = pair[0]
    free = jspec.decode(target, PROMPTS, max_new_tokens=16, stop_tokens=[])
    stop = int(free.tokens[1, 6])
    want = jspec.decode(target, PROMPTS, max_new_tokens=16, stop_tokens=[stop])
    got = jspec.decode(target, PROMPTS, "speculative", max_new_tokens=16, stop_tokens=[stop], draft=target, num_draft_tokens=5)
    assert got.sequences() == want.sequences() and got.finish_reasons() == want.finish_reasons()


# --- sampling: the output distribution is the target's --------------------------------------------------

VOCAB = 6
SAMPLES = 40_000  # enough to detect a 2% total-variation error at the significance below (see the power check)
SIGNIFICANCE = 1e-3
SAMPLING = dict(temperature=0.8, top_k=5)


def _exact_joint(model, prompt, num_tokens, options):
    """The target's exact joint distribution over the next `num_tokens` tokens {tuple: probability}.

    Every prefix of every length is scored in one batched causal forward (prefixes right-padded: causal
    attention makes the padding inert), then the warped next-token distributions are chained.
    """
    prefixes = [()]
    for _ in range(num_tokens - 1):
        prefixes += [p + (t,) for p in prefixes if len(p) == _ for t in range(VOCAB)]
    width = len(prompt) + num_tokens
    batch = np.zeros((len(prefixes), width), np.int32)
    for row, prefix in enumerate(prefixes):
        batch[row, : len(prompt) + len(prefix)] = list(prompt) + list(prefix)
    logits, _ = model.forward(jnp.asarray(batch), jnp.broadcast_to(jnp.arange(width)[None], batch.shape))
    last = jnp.asarray([len(prompt) + len(p) - 1 for p in prefixes])
    params = sampling.SamplingParams.broadcast(len(prefixes), **options)
    next_probs = np.asarray(sampling.probabilities(logits[jnp.arange(len(prefixes)), last], params), np.float64)
    conditional = dict(zip(prefixes, next_probs))
    joint = {(): 1.0}
    for _ in range(num_tokens):
        joint = {p + (t,): mass * conditional[p][t] for p, mass in joint.items() for t in range(VOCAB) if conditional[p][t] > 0}
    return joint


def _p_value(model, prompt, strategy_name, options, num_tokens=3):
    out = jspec.decode(model, [prompt] * SAMPLES, strategy_name, max_new_tokens=num_tokens, stop_tokens=[], key=123, **SAMPLING, **options)
    observed = {}
    for row in map(tuple, np.asarray(out.tokens)):
        observed[row] = observed.get(row, 0) + 1
    exact = _exact_joint(model, prompt, num_tokens, SAMPLING)
    assert set(observed) <= set(exact), "sampled a sequence of probability zero"
    from scipy.stats import chisquare

    cells = sorted(exact, key=exact.get, reverse=True)
    expected = np.array([exact[c] for c in cells]) * SAMPLES
    counts = np.array([observed.get(c, 0) for c in cells], np.float64)
    small = expected < 5  # pool sparse cells so the chi-square approximation holds
    expected = np.append(expected[~small], expected[small].sum()) if small.any() else expected
    counts = np.append(counts[~small], counts[small].sum()) if small.any() else counts
    counts *= expected.sum() / counts.sum()
    return chisquare(counts, expected).pvalue, out


@pytest.fixture(scope="module")
def toy_pair():
    target = tiny_model("llama", seed=3, vocab_size=VOCAB, init_scale=0.5)
    draft = tiny_model("llama", seed=4, vocab_size=VOCAB, init_scale=0.5, num_layers=1)
    return target, draft


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_sampling_reproduces_the_target_distribution(toy_pair, shape):
    target, draft = toy_pair
    options = dict(draft=draft, num_draft_tokens=3) if shape == "chain" else dict(draft=draft, tree=(3, 2))
    p_value, out = _p_value(target, [1, 2, 3], "speculative", options)
    assert p_value > SIGNIFICANCE
    histogram = np.asarray(out.stats["accepted_histogram"])
    assert histogram[0] > 0 and histogram[1:].sum() > 0  # rejections and acceptances both happened


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_a_broken_acceptance_rule_is_detected(toy_pair, shape, monkeypatch):
    """Power check: resampling from the target after a rejection (a common bug) is rejected by the test."""
    target, draft = toy_pair
    monkeypatch.setattr(speculative_module, "residual_distribution", lambda target_probs, proposal: target_probs)
    jax.clear_caches()
    try:
        options = dict(draft=draft, num_draft_tokens=3) if shape == "chain" else dict(draft=draft, tree=(3, 2))
        p_value, _ = _p_value(target, [1, 2, 3], "speculative", options)
    finally:
        jax.clear_caches()
    assert p_value < SIGNIFICANCE


def test_sampling_is_keyed_and_reproducible(pair):
    target, draft = pair
    run = lambda key: jspec.decode(target, PROMPTS, "speculative", draft=draft, max_new_tokens=10, key=key, temperature=1.0).tokens  # noqa: E731
    np.testing.assert_array_equal(run(1), run(1))
    assert not np.array_equal(run(1), run(2))


# --- pieces ----------------------------------------------------------------------------------------------


def test_prompt_lookup_hand_built():
    history = jnp.asarray(
        [
            [1, 2, 3, 9, 8, 1, 2, 3, -1, -1],  # last 3 tokens "1 2 3" occur at 0 -> propose 9 8 1 ...
            [5, 6, 7, 5, 6, 4, 6, -1, -1, -1],  # "4 6" absent, "6" first occurs at 1 -> propose 7 5 6
            [1, 2, 3, 4, -1, -1, -1, -1, -1, -1],  # nothing matches
        ],
        jnp.int32,
    )
    tokens, found = speculative_module.prompt_lookup(history, jnp.asarray([7, 6, 3]), max_ngram=3, num_tokens=4)
    np.testing.assert_array_equal(np.asarray(found), [[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(tokens)[:2], [[9, 8, 1, 2], [7, 5, 6, 4]])


def test_tree_template_structure():
    template = TreeTemplate.from_branching((2, 2))
    assert template.parents == (-1, -1, 0, 0, 1, 1)
    assert template.levels == ((0, 2), (2, 6))
    np.testing.assert_array_equal(template.children[0], [0, 1])
    np.testing.assert_array_equal(template.children[2], [4, 5])
    np.testing.assert_array_equal(template.sibling_rank, [0, 1, 0, 1, 0, 1])
    # node 4 (child of node 1) sees the root, node 1 and itself
    np.testing.assert_array_equal(np.flatnonzero(template.ancestors[5]), [0, 2, 5])
    assert TreeTemplate.chain(3).is_chain and not template.is_chain


@pytest.mark.parametrize("num_nodes", [1, 2, 5, 8])
def test_a_chain_tree_mask_is_the_causal_mask_by_slot(num_nodes):
    """Why chains verify and draft with mask=None: over the committed prefix and a chain written at lengths + t,
    the tree (ancestor) mask equals the default causal-by-slot mask, for verification and every drafting level."""
    from jspec import masks

    template, capacity = TreeTemplate.chain(num_nodes), 24
    lengths = jnp.asarray([1, 5, 9, capacity - num_nodes - 1])
    tree_mask = masks.prefix_and_block_mask(lengths, jnp.asarray(template.ancestors), lengths, capacity)
    causal = masks.causal_mask(lengths[:, None] + jnp.arange(num_nodes + 1), capacity)
    np.testing.assert_array_equal(tree_mask, causal)
    for start, end in template.levels[:-1]:
        visibility = jnp.asarray(template.ancestors[start + 1 : end + 1, 1:])
        level_mask = masks.prefix_and_block_mask(lengths + 1, visibility, lengths + 1, capacity)
        np.testing.assert_array_equal(level_mask, masks.causal_mask(lengths[:, None] + 1 + jnp.arange(start, end), capacity))


@pytest.mark.parametrize(
    "strategy, options, message",
    [
        ("speculative", dict(num_draft_tokens=4), "draft"),
        ("speculative", dict(draft="other-vocab"), "vocabulary size"),
        ("speculative", dict(draft="draft", num_draft_tokens=0), "num_draft_tokens"),
        ("speculative", dict(draft="draft", tree_parents=(0, -1)), "tree"),
        ("speculative", dict(draft="draft", tree_parents=(-1, 0, -1)), "breadth-first"),
        ("speculative", dict(draft="draft", tree=(2, 0)), "branching"),
        ("speculative", dict(draft="draft", temperature=-1.0), "temperature"),
        ("self_speculative", dict(skip_layers=(7,)), "skip_layers"),
        ("self_speculative", dict(skip_layers=(0, 1, 2)), "skip_layers"),
        ("prompt_lookup", dict(max_ngram=0), "max_ngram"),
        ("speculative", dict(draft="draft", drafters=2), "unknown option"),
        ("speculative", dict(draft="draft", num_draft_tokens="many"), "num_draft_tokens"),
        ("speculative", dict(draft="draft", adaptive="sometimes"), "adaptive"),
        ("speculative", dict(draft="draft", step_costs=(1.0, 2.0)), "step_costs"),
        ("speculative", dict(draft="draft", num_draft_tokens="auto", step_costs="negative setup"), "step_costs"),
        ("speculative", dict(draft="draft", num_draft_tokens="auto", step_costs="acceptance above 1"), "acceptance in"),
    ],
)
def test_bad_input_raises_a_clear_error(pair, strategy, options, message):
    target, draft = pair
    from jspec.strategies.auto_depth import StepCosts

    models = {"draft": draft, "other-vocab": tiny_model("llama", vocab_size=50),
              "negative setup": StepCosts(jnp.ones(5), jnp.float32(1.0), jnp.float32(-1.0)),
              "acceptance above 1": StepCosts(jnp.ones(5), jnp.float32(1.0), jnp.float32(0.0), jnp.float32(1.5))}
    options = {k: models.get(v, v) if isinstance(v, str) else v for k, v in options.items()}
    with pytest.raises(ValueError, match=message):
        jspec.decode(target, PROMPTS[:2], strategy, max_new_tokens=4, **options)


def test_calibration_picks_the_layer_that_keeps_agreement():
    """A model whose layer 1 is an exact no-op: calibration must choose it, with agreement 1."""
    from jspec.strategies.calibration import calibrate_skip_layers

    from jspec.models import transformer

    model = tiny_model("llama", num_layers=3)
    layers = [transformer.layer_params(model.config, model.params, i) for i in range(3)]
    layers[1] = {**layers[1], "o": jnp.zeros_like(layers[1]["o"]), "down": jnp.zeros_like(layers[1]["down"])}
    model = model.replace(params={**model.params, "groups": transformer.stack_layers(model.config, layers)})
    tokens = np.random.default_rng(0).integers(0, 97, (4, 24))
    skip, agreement = calibrate_skip_layers(model, tokens, 1)
    assert skip == (1,) and agreement == 1.0
    with pytest.raises(ValueError, match="num_skip"):
        calibrate_skip_layers(model, tokens, 3)


@pytest.mark.parametrize("temperature, top_k, keep_token_probs", [(0.0, 0, True), (1.0, 0, True), (0.7, 3, True), (0.7, 3, False)])
def test_chain_walk_equals_the_tree_walk_on_a_chain(temperature, top_k, keep_token_probs):
    """The chain walks (prefix match; Leviathan / Chen on the drafted tokens' probabilities) give the tree walk's
    tokens, accepted lengths and per-depth counts on a chain, with the same key, rows of every draft depth."""
    from jspec.strategies.drafters import Proposal

    batch, num_nodes, vocab = 64, 4, 8
    rng = np.random.default_rng(0)
    template = TreeTemplate.chain(num_nodes)
    params = sampling.SamplingParams.broadcast(batch, np.where(np.arange(batch) % 5 == 0, 0.0, temperature), top_k)
    draft_logits = jnp.asarray(rng.normal(size=(batch, num_nodes, vocab)) * 2, jnp.float32)
    draft_probs = speculative_module.warped_probabilities(draft_logits, params)
    tokens = jax.random.categorical(jax.random.key(1), jnp.log(draft_probs), axis=-1).astype(jnp.int32)  # [B, N]
    # the target agrees with the draft often (shifted draft logits), so every accepted length occurs
    target_logits = jnp.concatenate([draft_logits, draft_logits[:, :1]], axis=1) + jnp.asarray(rng.normal(size=(batch, num_nodes + 1, vocab)), jnp.float32)
    depth = jnp.asarray(rng.integers(0, num_nodes + 1, batch))
    valid = jnp.arange(num_nodes)[None, :] < depth[:, None]
    kept_probs = None if keep_token_probs is False else jnp.take_along_axis(draft_probs, tokens[:, :, None], axis=2)[:, :, 0]
    proposal = Proposal(tokens, draft_logits, valid, depth, None, None, jnp.int32(0), sampled_from_parent=(True,) * num_nodes,
                        token_probs=kept_probs)  # without them (SJD's proposals) q(token) comes from the parent logits
    key = jax.random.key(7)
    if temperature == 0:
        params = sampling.SamplingParams.broadcast(batch)
        chain = speculative_module._accept_greedy_chain(target_logits, proposal)
        tree = speculative_module._accept_greedy(template, target_logits, proposal)
    else:
        probs = speculative_module.warped_probabilities(target_logits, params)
        chain = speculative_module._accept_chain(probs, proposal, params, key)
        tree = speculative_module._accept(template, probs, proposal, params, key)
    for field in ("num_accepted", "path", "emitted", "accepted_at_depth", "tried_at_depth"):
        np.testing.assert_array_equal(getattr(chain, field), getattr(tree, field), err_msg=field)
    assert len(set(np.asarray(chain.num_accepted).tolist())) >= 3  # the walks were compared on several outcomes


# --- auto depth ------------------------------------------------------------------------------------------

def _never_drafting_costs(max_depth):
    """Costs under which no depth beats a plain step (a verification of k tokens costs k + 9 forwards)."""
    from jspec.strategies.auto_depth import StepCosts

    widths = np.arange(1, max_depth + 2, dtype=np.float32)
    return StepCosts(jnp.asarray(np.where(widths > 1, widths + 9, 1.0)), jnp.float32(1.1))


def test_measured_step_costs_leave_out_a_calls_fixed_cost():
    """A jitted call's fixed cost (dispatch, donating a batch's caches) is paid once per call, never per step in the
    compiled loop; left in, it made every depth look alike (the decode loop's depth 4 cost 2.9x a plain step at
    batch 8 where single-step calls measured 2.3x) and deep drafting look cheap. So is the extra cost of a call's
    first step (1.4 ms at batch 8 on demo-code, on every depth): timed against a call of zero steps, it made drafting
    steps look 15-20% cheaper than in a decode. Simulated steps: a call costs 60 ms, its first step 20 ms more, and
    each step 5 ms times depth + 1 (sleeps, no compute: what is measured is the arithmetic of the measurement; a
    millisecond of scheduling jitter is 3% of the shortest difference)."""
    import time
    from jspec.strategies import auto_depth

    def step_at(depth, probe):
        per_step = 0.005 * (depth + 1) * (1.5 if probe else 1.0)
        return (lambda: None), (lambda inputs, count: time.sleep(0.060 + 0.020 * (count > 0) + count * per_step))

    setup = (lambda: None), (lambda inputs: time.sleep(0.010))  # a one-off call: its own time, nothing taken off
    costs = auto_depth.measure_step_costs(("test", "fixed cost"), step_at, max_depth=4, repeats=3, setup=setup)
    assert float(costs.acceptance) == pytest.approx(auto_depth.PRIOR_ACCEPTANCE)  # measured apart (measure_prior_acceptance)
    relative = np.asarray(costs.step) / float(costs.step[0])
    np.testing.assert_allclose(relative, [1, 2, 3, 4, 5], rtol=0.2)  # with the fixed cost in: [1, 1.25, 1.5, ...];
    # with the first step's extra in: [1, 1.67, 2.33, 3, 3.67] (8 steps against a call of none)
    assert float(costs.probe) / float(costs.step[0]) == pytest.approx(1.5, rel=0.2)
    assert float(costs.setup) / float(costs.step[0]) == pytest.approx(2.0, rel=0.3)


def test_the_prior_acceptance_is_measured_with_the_costs(pair, monkeypatch):
    """The rate a row's acceptance starts from is measured with the step costs, from the drafts of 32 steps at the
    deepest depth (the request's first state, greedy): a draft that is the target has every draft accepted, a random
    one few; given costs keep the fixed prior. It is remembered per weights and sampling values, not per shape
    alone: a random draft of the target's shape, measured after the target itself (same shapes, so the timed costs
    are reused), gets its own low rate; the target's is remembered while its weights live (not measured again, also
    across jspec.decode calls), and measured again at another temperature."""
    from jspec.strategies import auto_depth

    decode_module = importlib.import_module("jspec.decode")
    target, draft = pair
    measurements = []
    measure = auto_depth.measure_prior_acceptance

    def counted(key, weights, run_deepest, **options):  # counts the 32-step runs that measure a prior
        return measure(key, weights, lambda: measurements.append(key) or run_deepest(), **options)

    monkeypatch.setattr(auto_depth, "measure_prior_acceptance", counted)

    def prior(drafter_model, **options):
        strategy = speculative_module.speculative(draft=drafter_model, num_draft_tokens="auto", **options)
        request = decode_module.build_prompts(target, PROMPTS, 24, None, [], None, strategy)
        runs = decode_module.validated(strategy, target, request)  # measures, once per process, shape and weights
        return float(getattr(runs, "speculative", runs).step_costs.acceptance)  # PlainSteps holds the strategy

    assert prior(target) > 0.97 and prior(draft) < 0.4
    timed, runs = len(auto_depth._MEASURED), len(measurements)
    assert prior(tiny_model("llama", seed=5, num_layers=3)) < 0.4  # the target's shape, other weights
    assert len(auto_depth._MEASURED) == timed and len(measurements) == runs + 1
    assert prior(target) > 0.97 and len(measurements) == runs + 1  # remembered: not measured again
    prior(draft, temperature=0.3)
    timed, runs = len(auto_depth._MEASURED), len(measurements)
    prior(draft, temperature=1.2)  # the same sampling regime, another temperature: the timings kept, the prior measured
    assert len(auto_depth._MEASURED) == timed and len(measurements) == runs + 1
    assert prior(draft, step_costs=_never_drafting_costs(4)) == pytest.approx(auto_depth.PRIOR_ACCEPTANCE)
    assert len(measurements) == runs + 1
    # across jspec.decode calls (the models prepared for decoding each time): measured once
    fresh = tiny_model("llama", seed=6, num_layers=1)
    for _ in range(2):
        jspec.decode(target, PROMPTS, "speculative", draft=fresh, num_draft_tokens="auto", max_new_tokens=4)
    assert len(measurements) == runs + 2


def test_the_prior_acceptances_arithmetic():
    """The prior is the deepest steps' accepted / tried drafts shrunk toward PRIOR_ACCEPTANCE with the weight
    PRIOR_WEIGHT, remembered per key and living weights (simulated counts; a measurement is a call of run)."""
    from jspec.strategies import auto_depth

    calls = []

    def run():
        calls.append(1)
        return (30.0, 40.0)  # what the acceptance function reads: drafts accepted and tried

    weights = [jnp.ones(3), jnp.zeros(2)]
    identity = auto_depth.weights_identity(weights)
    key = ("test", "arithmetic")
    prior = auto_depth.measure_prior_acceptance(key, identity, run, acceptance=lambda counts: counts)
    assert prior == pytest.approx((30 + auto_depth.PRIOR_ACCEPTANCE * auto_depth.PRIOR_WEIGHT) / (40 + auto_depth.PRIOR_WEIGHT))
    assert auto_depth.measure_prior_acceptance(key, identity, run, acceptance=lambda counts: counts) == prior
    assert len(calls) == 1 and auto_depth.measured_prior(key, identity) == prior
    assert auto_depth.measured_prior(key, auto_depth.weights_identity([jnp.ones(3)])) is None
    ids = identity[0]
    del weights, identity  # the weights are gone: new arrays may get their ids, but not their prior
    assert auto_depth.measured_prior(key, (ids, ())) is None


def test_auto_depth_lets_the_row_with_the_most_steps_left_decide():
    """A decode returns when its last row finishes: drafting that pays only for rows with high acceptance does not
    shorten it (measured at batch 8 on CPU: 0.80-0.90x of autoregressive when the depth maximised the batch's
    expected tokens per second, 1.00x since). For one row the choice is the most expected tokens per cost."""
    from jspec.strategies.auto_depth import DRAFT_MARGIN, StepCosts, choose_depth, expected_tokens

    costs = StepCosts(jnp.asarray([1.0, 1.6, 2.0, 2.4, 2.7]), jnp.float32(1.2))
    remaining = jnp.asarray([100.0, 100.0])
    mixed = jnp.asarray([0.95, 0.2])  # drafting to depth 4 would emit most tokens per cost, for the batch's sum
    tokens = np.asarray(expected_tokens(mixed, 4)).sum(axis=0)
    assert int(np.argmax(tokens / np.asarray(costs.step))) == 4
    assert int(choose_depth(mixed, remaining, costs)) == 0  # but the second row would take 1.2x as long at depth 4
    # once the slow row is nearly done, the other row's many steps left decide
    assert int(choose_depth(mixed, jnp.asarray([100.0, 3.0]), costs)) == 4
    margin = np.where(np.arange(5) > 0, 1 - DRAFT_MARGIN, 1.0)  # drafting must save DRAFT_MARGIN of the time
    for rate in (0.3, 0.6, 0.7, 0.8, 0.95):  # one row: the depth with the most expected tokens per cost, so weighed
        one = jnp.asarray([rate])
        per_cost = np.asarray(expected_tokens(one, 4))[0] / np.asarray(costs.step)
        assert int(choose_depth(one, jnp.asarray([50.0]), costs)) == int(np.argmax(per_cost * margin))
    one = jnp.asarray([0.6])  # depth 2 expects 1.96 tokens for 1.96 of a plain step's cost, less half the margin ...
    cheaper = StepCosts(jnp.asarray([1.0, 1.6, 1.96 * (1 - DRAFT_MARGIN / 2), 2.4, 2.7]), jnp.float32(1.2))
    assert int(choose_depth(one, jnp.asarray([50.0]), cheaper)) == 0  # ... a gain under the margin does not start drafting
    assert int(choose_depth(one, jnp.asarray([50.0]), cheaper, drafting=True)) == 2  # ... but kept while drafting
    cheapest = cheaper.replace(step=cheaper.step.at[2].set(1.96 * (1 - 2 * DRAFT_MARGIN)))
    assert int(choose_depth(one, jnp.asarray([50.0]), cheapest)) == 2
    assert int(choose_depth(jnp.asarray([0.95]), jnp.asarray([1.0]), costs)) == 0  # one token left: drafting cannot help
    assert int(choose_depth(mixed, jnp.zeros(2), costs)) == 0  # no row runs: the cheapest depth ...
    assert int(choose_depth(mixed, jnp.zeros(2), costs.forcing(3))) == 3  # ... so costs that force a depth still do


def test_auto_depth_counts_the_tokens_a_full_cache_leaves():
    """A row's tokens left (what auto depth weighs) end at its length limit or where its cache fills, whichever
    comes first (a row about to end CACHE_FULL is not a long row), and are 0 once it has finished."""
    from jspec.strategies.base import FinishReason, OutputBuffer, tokens_left

    output = OutputBuffer.create(3, 100, limits=jnp.asarray([100, 20, 100]))
    output = output.finish(jnp.asarray([False, False, True]), FinishReason.EOS)
    left = tokens_left(output, jnp.asarray([60, 10, 10]), capacity=70, slots_needed=5)
    np.testing.assert_array_equal(np.asarray(left), [6, 20, 0])  # 70 - 5 - 60 + 1; the limit; finished
    assert int(tokens_left(output, jnp.asarray([69, 10, 10]), 70, 5)[0]) == 0  # never negative


def test_probes_stay_within_their_budget():
    """A probe that costs little more than a plain step comes after the minimum interval, a dear one after enough
    steps that its extra cost is PROBE_BUDGET of theirs (at most MAX_PROBE_INTERVAL; a larger minimum stays); the
    interval doubles after a probe that does not bring drafting back and returns to its start after drafting. The
    first probe waits longer where the drafter's first call pays a one-off setup (a deferred draft prefill), up to
    MAX_FIRST_PROBE_INTERVAL. A probe needs a row with at least the interval's tokens left."""
    from jspec.strategies import auto_depth as ad

    def interval(probe, minimum=8):
        return int(ad.first_probe_interval(ad.StepCosts(jnp.asarray([1.0, 1.5]), jnp.float32(probe)), minimum))

    assert interval(1.0) == 8 and interval(1.05, minimum=1) == 3  # 0.05 / 0.02 -> 3 steps
    assert interval(1.25) == 13 and interval(3.0) == ad.MAX_PROBE_INTERVAL and interval(3.0, minimum=1 << 20) == 1 << 20
    with_setup = ad.StepCosts(jnp.asarray([1.0, 1.5]), jnp.float32(2.0), jnp.float32(2.0))  # (1 + 2) / 0.02 -> 150
    assert int(ad.first_probe_interval(with_setup, 8, with_setup=True)) == 150  # over MAX_PROBE_INTERVAL: kept
    assert int(ad.first_probe_interval(with_setup.replace(setup=jnp.float32(9.0)), 8, True)) == ad.MAX_FIRST_PROBE_INTERVAL
    control = ad.DepthControl.create(ad.StepCosts(jnp.asarray([1.0, 1.5]), jnp.float32(1.25)), 2, 8)
    none = jnp.zeros((2, 1), bool)
    probed = control.after(jnp.int32(0), jnp.bool_(True), none, none)
    drafted = probed.after(jnp.int32(1), jnp.bool_(False), none, none)
    assert (int(control.probe_interval), int(probed.probe_interval), int(drafted.probe_interval)) == (13, 26, 13)
    # until the drafter has run, a probe also pays its setup (a deferred draft prefill): (0.05 + 0.5) / 0.02 -> 28
    # steps; after that first probe the interval doubles from the base one (8 -> 16), after drafting it is the base
    first = ad.DepthControl.create(ad.StepCosts(jnp.asarray([1.0, 2.0]), jnp.float32(1.05), jnp.float32(0.5)), 2, 8)

    def first_probe(control, left=100.0):  # the first idle step that probes (the costs never make depth 1 pay)
        return next((step for step in range(1, 40)
                     if bool(control.replace(idle_steps=jnp.int32(step - 1)).plan(jnp.asarray([5.0, left]))[1])), None)

    probed, drafted = (first.after(jnp.int32(depth), jnp.bool_(depth == 0), none, none) for depth in (0, 1))
    assert (first_probe(first), first_probe(probed), first_probe(drafted)) == (28, 16, 8)
    # no probe once no row has as many tokens left as the interval: its cost could not be spread over them
    assert (first_probe(first, left=28.0), first_probe(first, left=27.0), first_probe(drafted, left=7.0)) == (28, None, None)


@pytest.mark.parametrize("name", ["chain-random-draft", "tree-self-as-draft", "prompt-lookup"])
def test_auto_depth_greedy_equals_autoregressive(pair, name):
    """num_draft_tokens="auto" / adaptive="auto" equal greedy autoregressive decoding; a useless (random) draft is
    dropped for plain steps, a perfect one (the target itself, drafting for free) drafts to the full depth."""
    from jspec.strategies.auto_depth import StepCosts

    target, draft = pair
    strategy, options = {
        # fixed costs (a draft call 0.3 of a forward): what the depth choice does with them must not depend on timing
        "chain-random-draft": ("speculative", dict(draft=draft, num_draft_tokens="auto",
                                                   step_costs=StepCosts.memory_bound(4, 0.3))),
        "tree-self-as-draft": ("speculative", dict(draft=target, tree=(2, 1, 1), adaptive="auto",
                                                   step_costs=StepCosts.memory_bound(3, 0.0))),
        "prompt-lookup": ("prompt_lookup", dict(num_draft_tokens="auto")),  # costs measured: only tokens asserted
    }[name]
    want = jspec.decode(target, PROMPTS, max_new_tokens=24, stop_tokens=[])
    got = jspec.decode(target, PROMPTS, strategy, max_new_tokens=24, stop_tokens=[], **options)
    assert got.sequences() == want.sequences()
    depths, steps = np.asarray(got.stats["depth_histogram"]), int(got.stats["steps"]) - 1
    assert depths.sum() == steps and got.stats["model_calls"] == got.stats["steps"]
    if name == "chain-random-draft":  # after a few steps the batch stops drafting; probes are rare
        assert depths[0] >= 0.75 * steps and got.stats["probes"] <= 3
        assert got.stats["draft_calls"] <= 1 + 4 * (steps - depths[0]) + got.stats["probes"]
    if name == "tree-self-as-draft":
        assert depths[-1] >= 0.75 * steps and got.stats["model_calls"] < want.stats["model_calls"] / 2


@pytest.mark.slow
@pytest.mark.parametrize("costs", ["memory-bound", "never-drafting"])
def test_auto_depth_sampling_reproduces_the_target_distribution(toy_pair, costs, monkeypatch):
    """Sampling with auto depth is the target's distribution, for steps at every depth and for probes (a draft tried
    against a one-token verification, no bonus token)."""
    from jspec.strategies import auto_depth

    target, draft = toy_pair
    step_costs = auto_depth.StepCosts.memory_bound(4, 0.1) if costs == "memory-bound" else _never_drafting_costs(4)
    monkeypatch.setattr(auto_depth, "PROBE_INTERVAL", 1)  # probe every step that does not draft
    monkeypatch.setattr(auto_depth, "PROBE_BUDGET", float("inf"))  # ... however dear the probe
    jax.clear_caches()
    try:
        p_value, out = _p_value(target, [1, 2, 3], "speculative", dict(draft=draft, num_draft_tokens="auto", step_costs=step_costs), 4)
    finally:
        jax.clear_caches()
    assert p_value > SIGNIFICANCE
    depths = np.asarray(out.stats["depth_histogram"])
    if costs == "memory-bound":
        assert depths[1:].sum() > 0 and np.asarray(out.stats["accepted_histogram"])[1:].sum() > 0
    else:
        assert depths[1:].sum() == 0 and 0 < out.stats["probes"] <= depths[0]  # the interval doubles after each probe


@pytest.mark.parametrize("drafter", ["model", "prompt-lookup"])
def test_auto_depth_plain_steps_are_autoregressive_steps(pair, drafter, monkeypatch):
    """When the auto depth never drafts (costs under which no depth pays, no probes), every step is autoregressive
    decoding's own step: a ragged batch sampled at T=0.8 with a processor and log-probabilities gives autoregressive
    sampling's tokens and scores exactly (same key), with no drafter call and no verification wider than one token."""
    target, draft = pair
    monkeypatch.setattr(speculative_module.Speculative, "probe_interval", property(lambda self: 1 << 20))
    monkeypatch.setattr(speculative_module.Speculative, "plain_throughout", lambda self, prompts: False)  # the loop
    jax.clear_caches()  # the interval is read when tracing
    strategy, options = {
        "model": ("speculative", dict(draft=draft, num_draft_tokens="auto")),
        "prompt-lookup": ("prompt_lookup", dict(num_draft_tokens="auto")),
    }[drafter]
    common = dict(max_new_tokens=16, stop_tokens=[3], key=7, temperature=0.8, top_k=20, repetition_penalty=1.3, logprobs=2)
    want = jspec.decode(target, PROMPTS, "sample", **common)
    try:
        got = jspec.decode(target, PROMPTS, strategy, step_costs=_never_drafting_costs(4), **common, **options)
    finally:
        jax.clear_caches()
    assert got.sequences() == want.sequences()
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), rtol=1e-5, atol=1e-5)
    steps = int(got.stats["steps"]) - 1
    assert int(got.stats["depth_histogram"][0]) == steps and int(got.stats["probes"]) == 0
    assert int(got.stats["draft_calls"]) == 0  # not even the draft model's prefill: it waits for a drafting step


def test_plain_throughout_counts_a_tie_as_drafting_and_follows_the_modules_constants(monkeypatch):
    """The host-side decision is evaluated eagerly for one row, the loop's jitted for a batch: at an exact tie
    between a plain step and drafting (which rounding may break either way) the request is not planned plain (it
    runs the loop, which is always right); a clear margin is. The decision is remembered, but not across changed
    constants (DRAFT_MARGIN here)."""
    from jspec.strategies import auto_depth

    prior = auto_depth.PRIOR_ACCEPTANCE
    tie = (1 + prior) * (1 - auto_depth.DRAFT_MARGIN)  # depth 1's cost at which it ties with plain steps to start

    def costs(depth_one):
        return auto_depth.StepCosts(jnp.asarray([1.0, depth_one, 9.0, 9.0, 9.0]), jnp.float32(1.1))

    assert not auto_depth.plain_throughout(costs(tie), 15, 8)
    assert auto_depth.plain_throughout(costs(tie * 1.001), 15, 8)
    assert not auto_depth.plain_throughout(costs(tie * 1.001), 16, 8)  # a step could probe
    monkeypatch.setattr(auto_depth, "DRAFT_MARGIN", 0.0)
    assert not auto_depth.plain_throughout(costs(tie * 1.001), 15, 8)  # without the margin, depth 1 starts


@pytest.mark.parametrize("temperature, dtype, family", [(0.0, "float32", "llama"), (0.8, "float32", "llama"),
                                                         (0.8, "bfloat16", "llama"), (0.8, "float32", "mistral_window")])
def test_a_request_planned_plain_throughout_runs_autoregressive_decodings_loop(pair, temperature, dtype, family,
                                                                              monkeypatch):
    """Where the costs plan plain steps only for a whole request (no depth pays under the prior acceptance, and no
    step can probe: max_new_tokens < 2 x the first probe's interval, here 8), the request runs autoregressive
    decoding's loop (`PlainSteps`) and gives what the auto-depth loop gives: tokens, log-probabilities, finish
    reasons and every stat, in float32 and bfloat16, for a batch with padding rows (5 rows in a bucket of 8) and a
    stop token, and for sliding-window layers (whose ring is sized by the verification chunk in both). One more new
    token and a step can probe: the request runs the auto-depth loop, and it does probe (the bound is tight)."""
    decode_module = importlib.import_module("jspec.decode")
    target, draft = pair if (dtype, family) == ("float32", "llama") else (
        tiny_model(family, seed=0, num_layers=3, dtype=dtype), tiny_model(family, seed=1, num_layers=1, dtype=dtype))
    strategy = speculative_module.speculative(draft=draft, num_draft_tokens="auto", step_costs=_never_drafting_costs(4),
                                              temperature=temperature)
    prompts = PROMPTS if temperature == 0 else PROMPTS[:5]  # 5 rows: 3 padding rows in the batch bucket
    common = dict(stop_tokens=[] if temperature == 0 else [3, 54], key=7, logprobs=2, repetition_penalty=1.3)

    def runs(new_tokens):  # the strategy a request runs
        request = decode_module.build_prompts(target, prompts, new_tokens, None, common["stop_tokens"], None, strategy)
        return type(decode_module.validated(strategy, target, request)).__name__

    assert (runs(15), runs(16)) == ("PlainSteps", "Speculative")
    planned = jspec.decode(target, prompts, strategy, max_new_tokens=15, **common)
    probing = jspec.decode(target, prompts, strategy, max_new_tokens=16, **common)
    assert int(probing.stats["probes"]) >= 1
    eager = strategy.replace(drafter=strategy.drafter.replace(defer_prefill=False))  # the draft reads the prompts at init
    planned_eager = jspec.decode(target, prompts, eager, max_new_tokens=15, **common) if temperature == 0 else None
    monkeypatch.setattr(speculative_module.Speculative, "plain_throughout", lambda self, prompts: False)
    looped = jspec.decode(target, prompts, strategy, max_new_tokens=15, **common)
    if planned_eager is not None:  # the loop counts that prefill; PlainSteps never runs the draft
        looped_eager = jspec.decode(target, prompts, eager, max_new_tokens=15, **common)
        assert planned_eager.sequences() == looped_eager.sequences() == looped.sequences()
        assert (int(planned_eager.stats["draft_calls"]), int(looped_eager.stats["draft_calls"])) == (0, 1)
    assert int(looped.stats["probes"]) == 0 and sum(looped.stats["depth_histogram"][1:]) == 0
    assert planned.sequences() == looped.sequences()
    np.testing.assert_array_equal(np.asarray(planned.logprobs), np.asarray(looped.logprobs))
    np.testing.assert_array_equal(np.asarray(planned.finish_reason), np.asarray(looped.finish_reason))
    assert planned.stats.keys() == looped.stats.keys()
    for name in looped.stats:
        np.testing.assert_array_equal(np.asarray(planned.stats[name]), np.asarray(looped.stats[name]), err_msg=name)
    if temperature:  # both reasons occur: rows stop at the stop token and rows run to their limit
        assert {FinishReason.EOS, FinishReason.LENGTH} <= set(np.asarray(planned.finish_reason).tolist())


@pytest.mark.parametrize("costs, dtype", [("drafting-first", "float32"), ("probing-later", "float32"),
                                         ("drafting-first", "bfloat16")])
def test_a_deferred_draft_prefill_changes_no_token(pair, costs, dtype):
    """Under auto depth the draft model reads the prompts at the first step that drafts, not at init (a decode that
    never drafts never pays for it). Steps that do not draft write nothing to the draft's cache, so it holds what
    an eager prefill leaves there: sampled tokens, log-probabilities and every stat equal the eager prefill's, for
    a decode that drafts from its first step and for one whose first drafter call is a later probe, in float32 and
    in bfloat16 (the prefill inside the loop computes the cache bit for bit as before it)."""
    from jspec.strategies.auto_depth import StepCosts

    target, draft = pair if dtype == "float32" else (tiny_model("llama", seed=0, num_layers=3, dtype=dtype),
                                                      tiny_model("llama", seed=1, num_layers=1, dtype=dtype))
    step_costs = StepCosts.memory_bound(4, 0.3) if costs == "drafting-first" else _never_drafting_costs(4)
    deferred = speculative_module.speculative(draft=draft, num_draft_tokens="auto", step_costs=step_costs, temperature=0.8)
    eager = deferred.replace(drafter=deferred.drafter.replace(defer_prefill=False))
    assert deferred.drafter.defer_prefill is True and eager.drafter.defer_prefill is False
    with pytest.raises(ValueError, match="defer_prefill: expected True or False"):
        bad = deferred.replace(drafter=deferred.drafter.replace(defer_prefill="yes"))
        jspec.decode(target, PROMPTS[:1], bad, max_new_tokens=2)
    common = dict(max_new_tokens=24, stop_tokens=[3], key=7, logprobs=2)
    want, got = (jspec.decode(target, PROMPTS, strategy, **common) for strategy in (eager, deferred))
    assert got.sequences() == want.sequences()
    np.testing.assert_array_equal(np.asarray(got.logprobs), np.asarray(want.logprobs))
    assert want.stats.keys() == got.stats.keys()
    for name in want.stats:
        np.testing.assert_array_equal(np.asarray(got.stats[name]), np.asarray(want.stats[name]), err_msg=name)
    depths = np.asarray(got.stats["depth_histogram"])
    if costs == "drafting-first":
        assert depths[1:].sum() > 0
    else:
        assert depths[1:].sum() == 0 and int(got.stats["probes"]) > 0 and int(got.stats["draft_calls"]) == 1 + int(got.stats["probes"])
