"""Jacobi, SJD and Lookahead decoding: greedy token-identical to greedy decoding, sampling distribution-identical
to the target (chi-square on the exact joint of the first tokens, with a power check), bad options rejected."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jspec
import test_speculative as speculative_tests
from conftest import tiny_model
from jspec.strategies.base import _REGISTRY
from jspec.strategies.jacobi import GroupedAcceptance, JacobiDrafter
from jspec.strategies.lookahead import LookaheadDrafter, guess_template
from jspec.strategies.speculative import Speculative

PROMPTS = speculative_tests.PROMPTS  # 8 ragged prompts, repeats included

CONFIGS = {
    "jacobi-repeat-3": ("jacobi", dict(num_draft_tokens=3)),
    "jacobi-random-1": ("jacobi", dict(num_draft_tokens=1, init="random")),
    "jacobi-lookup-6": ("jacobi", dict(num_draft_tokens=6, init="prompt_lookup", max_ngram=2)),
    "jacobi-horizon-4": ("jacobi", dict(num_draft_tokens=4, init="repeat_horizon", horizon=2)),
    "sjd-greedy-4": ("sjd", dict(num_draft_tokens=4, temperature=0.0)),
    "lookahead-4-3-3": ("lookahead", dict(window=4, ngram_size=3, guess_set_size=3)),
    "lookahead-3-2-1": ("lookahead", dict(window=3, ngram_size=2, guess_set_size=1)),
    "lookahead-2-4-2": ("lookahead", dict(window=2, ngram_size=4, guess_set_size=2)),
}


PROPERTY_CONFIGS = ["jacobi-repeat-3", "lookahead-4-3-3"]  # checked over random batches below (not twice)


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", seed=0, num_layers=3)


@pytest.mark.parametrize("name", sorted(set(CONFIGS) - set(PROPERTY_CONFIGS)))
def test_greedy_equals_autoregressive(target, name):
    strategy, options = CONFIGS[name]
    want = jspec.decode(target, PROMPTS, max_new_tokens=18, stop_tokens=[])
    got = jspec.decode(target, PROMPTS, strategy, max_new_tokens=18, stop_tokens=[], **options)
    assert got.sequences() == want.sequences()
    stats = got.stats
    generated = np.asarray(stats["tokens_generated"])
    np.testing.assert_array_equal(generated, 1 + np.asarray(stats["emitted_drafts"]) + np.asarray(stats["emitted_corrections"]))
    assert stats["model_calls"] == 1 + max(stats["active_steps"]) and stats["draft_calls"] == 0 and not stats["lossy"]


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    lengths=st.lists(st.integers(1, 10), min_size=1, max_size=8),
    name=st.sampled_from(PROPERTY_CONFIGS),
    seed=st.integers(0, 10_000),
)
def test_property_greedy_equals_autoregressive(target, lengths, name, seed):
    """Batches of 1..8 ragged prompts (rows accept different counts each step)."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 97, n).tolist() for n in lengths]
    strategy, options = CONFIGS[name]
    want = jspec.decode(target, prompts, max_new_tokens=12, stop_tokens=[])
    got = jspec.decode(target, prompts, strategy, max_new_tokens=12, stop_tokens=[], **options)
    assert got.sequences() == want.sequences()


@pytest.mark.parametrize("name", ["jacobi-repeat-3", "lookahead-4-3-3"])
def test_stop_tokens_inside_an_accepted_chunk(target, name):
    free = jspec.decode(target, PROMPTS, max_new_tokens=18, stop_tokens=[])
    stop = int(free.tokens[3, 7])  # row 3 repeats itself: its stop token falls inside accepted drafts
    want = jspec.decode(target, PROMPTS, max_new_tokens=18, stop_tokens=[stop])
    strategy, options = CONFIGS[name]
    got = jspec.decode(target, PROMPTS, strategy, max_new_tokens=18, stop_tokens=[stop], **options)
    assert got.sequences() == want.sequences() and got.finish_reasons() == want.finish_reasons()


def test_demo_code_greedy_equals_autoregressive_in_fewer_calls():
    model = jspec.load("demo-code")
    prompts = ["def fib(n):", "class Stack:\n    def __init__(self):"]
    want = jspec.decode(model, prompts, max_new_tokens=48)
    jacobi = jspec.decode(model, prompts, "jacobi", max_new_tokens=48, num_draft_tokens=4)
    lookahead = jspec.decode(model, prompts, "lookahead", max_new_tokens=48, window=4, ngram_size=4, guess_set_size=4)
    assert jacobi.sequences() == want.sequences() and lookahead.sequences() == want.sequences()
    assert lookahead.stats["model_calls"] < want.stats["model_calls"]


# --- sampling: the output distribution is the target's (chi-square helpers of test_speculative) -----------------

SAMPLING_CONFIGS = {
    "sjd-random": ("sjd", dict(num_draft_tokens=3)),
    "sjd-repeat": ("sjd", dict(num_draft_tokens=2, init="repeat")),
    "lookahead": ("lookahead", dict(window=3, ngram_size=3, guess_set_size=2)),
}


@pytest.fixture(scope="module")
def toy():
    return tiny_model("llama", seed=3, vocab_size=speculative_tests.VOCAB, init_scale=0.5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sjd-random", "lookahead"])
def test_sampling_reproduces_the_target_distribution(toy, name):
    strategy, options = SAMPLING_CONFIGS[name]
    p_value, out = speculative_tests._p_value(toy, [1, 2, 3], strategy, options)
    assert p_value > speculative_tests.SIGNIFICANCE
    histogram = np.asarray(out.stats["accepted_histogram"])
    assert histogram[0] > 0 and histogram[1:].sum() > 0  # rejections and acceptances both happened


@struct.dataclass
class TargetAsProposal:
    """A broken acceptance rule for the power check: q mismatched (the target's own p in place of the distribution
    the guess was drawn from), so every guess the target allows is accepted."""

    def masses(self, probs, q, token, embeddings):
        p = probs[jnp.arange(token.shape[0]), token]
        return p, p


def _broken_factory(strategy: str):
    """The registered factory of `strategy`, building it with the broken rule."""
    original = _REGISTRY[strategy]

    @functools.wraps(original)  # same options (the registry reads them from the signature)
    def factory(**options):
        return original(**options).replace(relaxed=TargetAsProposal())

    return factory


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sjd-random", "lookahead"])
def test_a_broken_acceptance_rule_is_detected(toy, name, monkeypatch):
    """Power check: the same test, with fewer samples, rejects a rule whose q is not the guess's."""
    strategy, options = SAMPLING_CONFIGS[name]
    monkeypatch.setattr(speculative_tests, "SAMPLES", 8_000)
    monkeypatch.setitem(_REGISTRY, "broken", _broken_factory(strategy))
    p_value, out = speculative_tests._p_value(toy, [1, 2, 3], "broken", options)
    assert np.asarray(out.stats["accepted_histogram"])[1:].sum() > 0
    assert p_value < speculative_tests.SIGNIFICANCE


def test_lossy_gsd_is_reported_and_changes_only_acceptance(toy):
    exact = jspec.decode(toy, [[1, 2, 3]] * 64, "sjd", max_new_tokens=6, stop_tokens=[], num_draft_tokens=3)
    relaxed = jspec.decode(toy, [[1, 2, 3]] * 64, "sjd", max_new_tokens=6, stop_tokens=[], num_draft_tokens=3,
                           lossy=True, relaxed="gsd", prob_gap=0.5, embed_distance=None)
    assert relaxed.stats["lossy"] is True and exact.stats["lossy"] is False
    assert np.all(np.asarray(relaxed.lengths) == 6)
    assert sum(relaxed.stats["emitted_drafts"]) > sum(exact.stats["emitted_drafts"])  # larger groups accept more


def test_grouped_acceptance_masses():
    """GSD's group: the guess and its neighbours in probability order within prob_gap (no embedding filter)."""
    probs = jnp.asarray([[0.30, 0.28, 0.02, 0.40]])
    q = jnp.asarray([[0.0, 1.0, 0.0, 0.0]])
    rule = GroupedAcceptance(prob_gap=0.05, embed_distance=None, group_size=4)
    p_mass, q_mass = rule.masses(probs, q, jnp.asarray([1]), jnp.zeros((4, 2)))
    np.testing.assert_allclose([float(p_mass[0]), float(q_mass[0])], [0.58, 1.0], rtol=1e-6)  # tokens 0 and 1


def test_lookahead_mask_and_template():
    drafter = LookaheadDrafter(window=3, ngram_size=3, guess_set_size=2)
    template = guess_template(2, 3)
    assert template.parents == (-1, -1, 0, 1)
    offsets, visibility = drafter.extra_layout(template)
    np.testing.assert_array_equal(offsets, [1, 2, 3, 2, 3, 4])  # level 0 then level 1, columns 0..2
    # level 1, column 1 sees pending, level 0 columns 0..1 and itself; never a guess
    np.testing.assert_array_equal(np.flatnonzero(visibility[4]), [0, 5, 6, 9])
    assert not visibility[:, 1:5].any()


@pytest.mark.parametrize(
    "strategy, options, message",
    [
        ("jacobi", dict(num_draft_tokens=0), "num_draft_tokens"),
        ("sjd", dict(num_draft_tokens=0), "num_draft_tokens"),
        ("lookahead", dict(window=0), "window"),
        ("lookahead", dict(ngram_size=1), "ngram_size"),
        ("lookahead", dict(guess_set_size=0), "guess_set_size"),
        ("lookahead", dict(guess_set_size=40, ngram_size=5), "guess_set_size"),
        ("jacobi", dict(init="zeros"), "init"),
        ("sjd", dict(init=3), "init"),
        ("sjd", dict(init="repeat_horizon", horizon=0), "horizon"),
        ("sjd", dict(relaxed="gsd"), "lossy=True"),
        ("sjd", dict(lossy=True), "relaxed"),
        ("sjd", dict(lossy=True, relaxed="lantern"), "relaxed"),
        ("sjd", dict(lossy=True, relaxed="gsd", prob_gap=0.0), "prob_gap"),
        ("sjd", dict(lossy="yes", relaxed="gsd"), "lossy"),
        ("sjd", dict(temperature=-1.0), "temperature"),
        ("jacobi", dict(temperature=0.5), "unknown option"),
    ],
)
def test_bad_input_raises_a_clear_error(target, strategy, options, message):
    with pytest.raises(jspec.validation.ArgumentError, match=message):
        jspec.decode(target, PROMPTS[:2], strategy, max_new_tokens=4, **options)


def test_a_jacobi_window_must_be_a_chain(target):
    strategy = Speculative(drafter=JacobiDrafter(), tree=(2, 1))
    with pytest.raises(ValueError, match="chain"):
        jspec.decode(target, PROMPTS[:2], strategy, max_new_tokens=4)
    jax.clear_caches()


@pytest.mark.parametrize("strategy, options", [("jacobi", dict(num_draft_tokens=4)), ("sjd", dict(temperature=0.0)),
                                               ("lookahead", dict(window=3, ngram_size=3, guess_set_size=2))])
def test_logit_processors_and_logprobs_equal_greedy_with_them(strategy, options):
    """The issue-20 options (processors, logprobs) apply to every verified position, so greedy equality holds with
    them too, log-probabilities included."""
    model = tiny_model("llama", seed=3)
    processors = dict(repetition_penalty=1.5, no_repeat_ngram_size=2, logit_bias={5: -2.0}, logprobs=2)
    want = jspec.decode(model, PROMPTS, max_new_tokens=12, **processors)
    got = jspec.decode(model, PROMPTS, strategy, max_new_tokens=12, **processors, **options)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    np.testing.assert_array_equal(got.top_tokens, want.top_tokens)
