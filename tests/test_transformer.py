"""The transformer and its KV cache: incremental decoding reproduces one full forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FAMILIES, tiny_model
from jspec.models import transformer
from jspec import masks

FP32_TOLERANCE = 1e-4  # max abs logit difference, float32
BF16_TOLERANCE = 0.1  # max abs logit difference, bfloat16 (logits of magnitude ~5)


def full_logits(model, row_tokens):
    """Logits [T, V] of one uncached forward over a single sequence."""
    tokens = jnp.asarray(row_tokens, jnp.int32)[None]
    positions = jnp.arange(tokens.shape[1])[None]
    logits, _ = model.forward(tokens, positions)
    return np.asarray(logits[0])


def incremental_logits(model, sequences, prompt_lengths, chunk=1):
    """Prefill each row's prompt (ragged, padded batch), then feed the rest `chunk` tokens at a time.

    Returns per row the logits [len - 1, V] predicting tokens 1..len-1.
    """
    batch = len(sequences)
    total = max(len(s) for s in sequences)
    padded = np.zeros((batch, total), np.int32)
    for b, s in enumerate(sequences):
        padded[b, : len(s)] = s
    prompt_lengths = np.asarray(prompt_lengths)
    width = int(prompt_lengths.max())
    cache = model.new_cache(batch, total + 3)
    positions = np.broadcast_to(np.arange(width), (batch, width))
    slots = np.where(positions < prompt_lengths[:, None], positions, cache.capacity)
    logits, cache = model.forward(jnp.asarray(padded[:, :width]), jnp.asarray(positions), cache, write_slots=jnp.asarray(slots))
    cache = cache.with_lengths(jnp.asarray(prompt_lengths))
    collected = [[np.asarray(logits[b, t]) for t in range(prompt_lengths[b])] for b in range(batch)]
    lengths = prompt_lengths.copy()
    step = jax.jit(lambda m, t, p, c, s: m.forward(t, p, c, write_slots=s))
    while np.any(lengths < [len(s) for s in sequences]):
        idx = lengths[:, None] + np.arange(chunk)[None]
        active = idx < np.array([len(s) for s in sequences])[:, None]
        tokens = np.take_along_axis(padded, np.minimum(idx, total - 1), axis=1)
        slots = np.where(active, idx, cache.capacity)
        logits, cache = step(model, jnp.asarray(tokens), jnp.asarray(idx), cache, jnp.asarray(slots))
        for b in range(batch):
            for t in range(chunk):
                if active[b, t]:
                    collected[b].append(np.asarray(logits[b, t]))
        lengths = lengths + active.sum(1)
        cache = cache.with_lengths(jnp.asarray(lengths))
    return [np.stack(rows) for rows in collected]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_incremental_decode_equals_full_forward_ragged_batch(family):
    model = tiny_model(family)
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 97, n).tolist() for n in (9, 14, 6)]
    got = incremental_logits(model, sequences, prompt_lengths=[3, 7, 1])
    for sequence, logits in zip(sequences, got):
        want = full_logits(model, sequence)
        np.testing.assert_allclose(logits, want, atol=FP32_TOLERANCE, rtol=0)


@pytest.mark.parametrize("chunk", [2, 3])
def test_chunked_decode_equals_full_forward(chunk):
    model = tiny_model("qwen3")
    rng = np.random.default_rng(1)
    sequences = [rng.integers(0, 97, n).tolist() for n in (11, 8)]
    got = incremental_logits(model, sequences, prompt_lengths=[4, 2], chunk=chunk)
    for sequence, logits in zip(sequences, got):
        np.testing.assert_allclose(logits, full_logits(model, sequence), atol=FP32_TOLERANCE, rtol=0)


def test_bfloat16_incremental_matches_full_forward():
    model = tiny_model("llama", dtype="bfloat16")
    sequence = np.random.default_rng(2).integers(0, 97, 10).tolist()
    (got,) = incremental_logits(model, [sequence], prompt_lengths=[4])
    assert model.params["embed"].dtype == jnp.bfloat16
    np.testing.assert_allclose(got, full_logits(model, sequence), atol=BF16_TOLERANCE, rtol=0)


def test_rollback_is_a_length_change():
    """Writing a rejected chunk, rolling back, then writing the true tokens gives the logits of a clean run."""
    model = tiny_model("llama")
    prompt = jnp.asarray([[5, 6, 7, 8]])
    cache = model.new_cache(1, 16)
    _, cache = model.forward(prompt, jnp.arange(4)[None], cache)
    cache = cache.with_lengths(jnp.asarray([4]))
    _, dirty = model.forward(jnp.asarray([[1, 2, 3]]), jnp.arange(4, 7)[None], cache)  # rejected draft, not committed
    logits_after_rollback, _ = model.forward(jnp.asarray([[9, 10]]), jnp.arange(4, 6)[None], dirty)
    want = full_logits(model, [5, 6, 7, 8, 9, 10])[4:]
    np.testing.assert_allclose(np.asarray(logits_after_rollback[0]), want, atol=FP32_TOLERANCE, rtol=0)


def test_out_of_range_slots_are_dropped():
    model = tiny_model("llama")
    cache = model.new_cache(2, 4)
    _, written = model.forward(jnp.asarray([[1, 2], [3, 4]]), jnp.zeros((2, 2), jnp.int32), cache, write_slots=jnp.asarray([[0, 4], [-1, 9]]))
    keys = np.concatenate([np.asarray(entry.keys) for entry in written.entries])  # [layers, B, S, Hkv, Dh]
    assert np.all(np.any(keys[:, 0, 0] != 0, axis=(1, 2)))
    np.testing.assert_array_equal(keys[:, 0, 1:], 0)
    np.testing.assert_array_equal(keys[:, 1], 0)


def test_compact_moves_only_accepted_entries():
    cache = tiny_model("llama").new_cache(2, 8)
    marked = jnp.broadcast_to(jnp.arange(8, dtype=jnp.float32)[None, None, :, None, None], cache.entries[0].keys.shape)
    cache = cache.replace(entries=tuple(entry.replace(keys=marked, values=marked) for entry in cache.entries))
    # row 0 keeps slots 5 and 7 at 3, 4; row 1 keeps slot 6 at 2 (second entry is padding)
    compacted = cache.compact(jnp.asarray([[5, 7], [6, -1]]), jnp.asarray([3, 2])).entries
    np.testing.assert_array_equal(np.asarray(compacted[1].keys[0, 0, :, 0, 0]), [0, 1, 2, 5, 7, 5, 6, 7])
    np.testing.assert_array_equal(np.asarray(compacted[0].values[0, 1, :, 0, 0]), [0, 1, 6, 3, 4, 5, 6, 7])


def test_causal_mask_hand_built():
    got = masks.causal_mask(jnp.asarray([[2, 3]]), 5, sliding_window=2)
    want = np.array([[[0, 1, 1, 0, 0], [0, 0, 1, 1, 0]]], bool)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_prefix_and_block_mask_hand_built():
    # prefix of 2 slots; a 3-token chunk written at slot 3 (slot 2 is stale) with a tree: 0 -> {1, 2}
    tree = jnp.asarray([[1, 0, 0], [1, 1, 0], [1, 0, 1]], bool)
    got = masks.prefix_and_block_mask(jnp.asarray([2]), tree, jnp.asarray([3]), 7)
    want = np.array(
        [
            [[1, 1, 0, 1, 0, 0, 0], [1, 1, 0, 1, 1, 0, 0], [1, 1, 0, 1, 0, 1, 0]],
        ],
        bool,
    )
    np.testing.assert_array_equal(np.asarray(got), want)


def test_skip_layers_equals_a_model_without_them():
    model = tiny_model("llama", num_layers=3)
    tokens, positions = jnp.asarray([[3, 1, 4, 1, 5]]), jnp.arange(5)[None]
    skipped, _ = model.forward(tokens, positions, skip_layers=(1,))
    config = model.config.replace(num_layers=2)
    layers = [transformer.layer_params(model.config, model.params, i) for i in (0, 2)]
    shallow = model.replace(params={**model.params, "groups": transformer.stack_layers(config, layers)}, config=config)
    want, _ = shallow.forward(tokens, positions)
    np.testing.assert_allclose(np.asarray(skipped), np.asarray(want), atol=1e-6)


def test_parameter_count_matches_config():
    for family in FAMILIES:
        model = tiny_model(family)
        assert model.num_parameters() == model.config.num_parameters(), family
