"""Sampling: the sampler draws from exactly the distribution `probabilities` states."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jspec import sampling

SIGNIFICANCE = 1e-3  # chi-square tests reject a correct sampler with this probability


def chi_square_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
    from scipy.stats import chisquare

    probs = np.asarray(probs, np.float64) / np.sum(probs, dtype=np.float64)
    support = probs > 0
    assert counts[~support].sum() == 0, "drew a token of probability zero"
    expected = probs[support] * counts.sum()
    return float(chisquare(counts[support], expected).pvalue)


@pytest.mark.parametrize(
    "options",
    [dict(temperature=1.0), dict(temperature=0.7, top_k=4), dict(temperature=1.3, top_p=0.8), dict(temperature=1.0, min_p=0.1)],
)
def test_sample_matches_probabilities(options):
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 12)) * 1.5, jnp.float32)
    num = 40_000
    params = sampling.SamplingParams.broadcast(num, **options)
    draws = jax.jit(sampling.sample)(jax.random.key(1), jnp.broadcast_to(logits, (num, 12)), params)
    counts = np.bincount(np.asarray(draws), minlength=12)
    probs = np.asarray(sampling.probabilities(logits, sampling.SamplingParams.broadcast(1, **options)))[0]
    assert chi_square_p_value(counts, probs) > SIGNIFICANCE


def test_draw_takes_tokens_in_proportion_to_their_weights_and_never_a_zero_weight():
    """`draw` (inverse transform sampling, one uniform per row) on unnormalised weights with zero weights first, last
    and between; and on a 4096-token vocabulary with all but 5 weights zero (a top-k filter), where float rounding
    of the cumulative sums must still never pick a zero-weight token."""
    weights = jnp.asarray([0.0, 3.0, 0.0, 0.5, 1.5, 0.0, 0.0, 2.0, 0.0], jnp.float32)
    num = 40_000
    draws = jax.jit(sampling.draw)(jax.random.key(2), jnp.broadcast_to(weights, (num, weights.shape[0])))
    assert chi_square_p_value(np.bincount(np.asarray(draws), minlength=weights.shape[0]), np.asarray(weights)) > SIGNIFICANCE
    sparse = np.zeros(4096, np.float32)
    sparse[[7, 1000, 2048, 3000, 4095]] = [0.2, 0.1, 0.4, 0.1, 0.2]
    draws = np.asarray(jax.jit(sampling.draw)(jax.random.key(3), jnp.broadcast_to(jnp.asarray(sparse), (20_000, 4096))))
    assert chi_square_p_value(np.bincount(draws, minlength=4096), sparse) > SIGNIFICANCE


def test_argmax_is_jnp_argmax():
    """`sampling.argmax` (two vectorised reductions) gives jnp.argmax's index, the lowest on ties, in float32 and
    bfloat16 (where ties are common), on every leading shape."""
    rng = np.random.default_rng(4)
    for shape in ((1, 4096), (3, 5, 17), (2, 9)):
        values = jnp.asarray(rng.normal(size=shape), jnp.float32)
        np.testing.assert_array_equal(np.asarray(sampling.argmax(values)), np.asarray(jnp.argmax(values, axis=-1)))
        coarse = jnp.round(values * 2).astype(jnp.bfloat16)  # many ties
        np.testing.assert_array_equal(np.asarray(sampling.argmax(coarse)), np.asarray(jnp.argmax(coarse, axis=-1)))
    assert int(sampling.argmax(jnp.full((4,), -jnp.inf))) == 0


def test_chi_square_detects_a_wrong_distribution():
    """The test above has power: draws at temperature 1 fail against the temperature-0.8 distribution."""
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 12)) * 1.5, jnp.float32)
    num = 40_000
    draws = sampling.sample(jax.random.key(1), jnp.broadcast_to(logits, (num, 12)), sampling.SamplingParams.broadcast(num, 1.0))
    counts = np.bincount(np.asarray(draws), minlength=12)
    wrong = np.asarray(sampling.probabilities(logits, sampling.SamplingParams.broadcast(1, 0.8)))[0]
    assert chi_square_p_value(counts, wrong) < SIGNIFICANCE


def test_greedy_is_one_hot_argmax_with_lowest_id_on_ties():
    logits = jnp.asarray([[0.0, 2.0, 2.0, -1.0]])
    params = sampling.SamplingParams.broadcast(1, 0.0, top_k=1)
    np.testing.assert_array_equal(np.asarray(sampling.probabilities(logits, params)), [[0, 1, 0, 0]])
    assert int(sampling.sample(jax.random.key(0), logits, params)[0]) == 1


def test_per_row_parameters():
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(3, 10)), jnp.float32)
    params = sampling.SamplingParams.broadcast(3, [0.0, 1.0, 1.0], top_k=[0, 2, 0], top_p=[1.0, 1.0, 0.5])
    probs = np.asarray(sampling.probabilities(logits, params))
    assert (probs[0] > 0).sum() == 1 and (probs[1] > 0).sum() == 2 and 1 <= (probs[2] > 0).sum() < 10
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)


def test_diffusion_predictions_sample_softmax_over_temperature_keyed_by_row_decision_and_position():
    """Masked diffusion's sampled predictions (`unmasking.predict`) follow softmax(logits / T) without the mask
    token; the noise depends only on (key, row, decision index, slot), so two branches at the same decision index
    draw the same tokens (what FreeDave's equality with static decoding rests on), another index other tokens; a
    greedy row takes the argmax."""
    from jspec.strategies import unmasking

    vocab, mask_id, rows, temperature = 10, 3, 20_000, 0.7
    logits = jnp.asarray(np.random.default_rng(5).normal(size=vocab) * 1.5, jnp.float32)
    batch_logits = jnp.broadcast_to(logits, (rows, 3, 2, vocab))  # [B, K, T, V]
    slots = jnp.broadcast_to(jnp.asarray([7, 8], jnp.int32), (rows, 2))
    decided = jnp.broadcast_to(jnp.asarray([0, 0, 1], jnp.int32), (rows, 3))  # branches 0 and 1 agree, 2 differs
    temperatures = jnp.full((rows,), temperature).at[0].set(0.0)
    tokens, confidence = jax.jit(unmasking.predict, static_argnums=5)(
        batch_logits, slots, decided, temperatures, jax.random.key(6), mask_id)
    tokens = np.asarray(tokens)
    expected = np.asarray(jax.nn.softmax(logits.at[mask_id].set(-jnp.inf) / temperature))
    assert chi_square_p_value(np.bincount(tokens[1:, 0, 0], minlength=vocab), expected) > SIGNIFICANCE
    np.testing.assert_array_equal(tokens[:, 0], tokens[:, 1])
    assert np.mean(tokens[1:, 0] == tokens[1:, 2]) < 0.9  # another decision index: independent draws
    assert np.mean(tokens[1:, 0, 0] == tokens[1:, 0, 1]) < 0.9  # another slot: independent draws
    masked_logits = logits.at[mask_id].set(-jnp.inf)
    assert (tokens[0] == int(jnp.argmax(masked_logits))).all()
    np.testing.assert_allclose(np.asarray(confidence)[1:, 0, 0], np.asarray(jax.nn.softmax(masked_logits))[tokens[1:, 0, 0]], rtol=1e-6)
