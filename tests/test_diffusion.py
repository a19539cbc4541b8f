"""Diffusion-LM decoding: masked diffusion (dllm_static, dllm_threshold, freedave) and block diffusion.

References are plain Python loops over uncached full forwards, written from the algorithm descriptions
(LLaDA low-confidence remasking; Fast-dLLM v2 block / sub-block decoding), independent of the strategies' code.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jax
import jax.numpy as jnp

import jspec
from jspec import masks
from jspec.models import transformer
from jspec.train import objectives
from conftest import tiny_model

MASK = 96  # the tiny models' last vocabulary entry


def masked_model(seed: int = 1, shifted: bool = False, **overrides) -> jspec.Model:
    return tiny_model("llama", seed=seed, diffusion="masked", mask_token_id=MASK, shifted_logits=shifted, **overrides)


def block_model(seed: int = 1, block_size: int = 8, **overrides) -> jspec.Model:
    return tiny_model("llama", seed=seed, diffusion="block", diffusion_block_size=block_size, mask_token_id=MASK, shifted_logits=True, **overrides)


def _predictions(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # logits [L, V] predicting each position
    logits = logits.astype(np.float64).copy()
    logits[:, MASK] = -np.inf
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    tokens = probs.argmax(-1)
    return tokens, probs[np.arange(len(tokens)), tokens]


REFERENCE_WIDTH = 48  # references run one uncached forward over this many slots; keys past the sequence are masked


@jax.jit
def _reference_forward(model: jspec.Model, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    return transformer.forward(model.params, model.config, tokens, positions, mask=mask)[0][0]


def _full_logits(model: jspec.Model, sequence: list[int], mask: np.ndarray) -> np.ndarray:
    """Logits predicting each position of `sequence` from one uncached forward under mask [L, L]."""
    length = len(sequence)
    assert length <= REFERENCE_WIDTH
    tokens = np.zeros((1, REFERENCE_WIDTH), np.int32)
    tokens[0, :length] = sequence
    padded = np.zeros((REFERENCE_WIDTH, REFERENCE_WIDTH), bool)
    padded[:length, :length] = mask
    padded[length:, 0] = True  # padding queries read something (their logits are dropped)
    logits = np.asarray(_reference_forward(model.without_tokenizer(), jnp.asarray(tokens), jnp.asarray(padded)[None]))[:length]
    return np.concatenate([logits[:1], logits[:-1]]) if model.config.shifted_logits else logits


def reference_masked_static(model: jspec.Model, prompt: list[int], new: int, block_size: int, stop: int | None = None) -> list[int]:
    """LLaDA semi-autoregressive decoding, one token per full bidirectional forward (the most confident)."""
    sequence = list(prompt) + [MASK] * new
    everything = np.ones((len(sequence), len(sequence)), bool)
    start = len(prompt)
    for block in range(new // block_size):
        low, high = start + block * block_size, start + (block + 1) * block_size
        while MASK in sequence[low:high]:
            tokens, confidence = _predictions(_full_logits(model, sequence, everything))
            candidates = [i for i in range(low, high) if sequence[i] == MASK]
            best = max(candidates, key=lambda i: (confidence[i], -i))
            sequence[best] = int(tokens[best])
        if stop is not None and stop in sequence[low:high]:
            generated = sequence[start:high]
            return generated[: generated.index(stop) + 1]
    return sequence[start:]


def reference_block_diffusion(model: jspec.Model, prompt: list[int], new: int, sub_block_size: int, threshold: float) -> list[int]:
    """Fast-dLLM v2 decoding without caches: every forward runs everything under the block-causal mask."""
    block_size = model.config.diffusion_block_size
    limit = len(prompt) + new
    sequence = list(prompt)

    def logits_of(seq: list[int]) -> np.ndarray:  # shifted: row i predicts position i
        blocks = np.arange(len(seq)) // block_size
        return _full_logits(model, seq, blocks[None, :] <= blocks[:, None])

    committed = (len(prompt) // block_size) * block_size
    if committed == len(prompt):
        sequence.append(int(_predictions(logits_of(sequence + [MASK]))[0][committed]))
    while committed < limit:
        high = committed + block_size
        canvas = sequence + [MASK] * (high - len(sequence))
        for sub_low in range(committed, high, sub_block_size):
            sub = [i for i in range(sub_low, sub_low + sub_block_size) if i < limit]
            while any(canvas[i] == MASK for i in sub):
                tokens, confidence = _predictions(logits_of(canvas))
                masked = [i for i in sub if canvas[i] == MASK]
                best = max(masked, key=lambda i: (confidence[i], -i))
                for i in masked:
                    if confidence[i] > threshold or i == best:
                        canvas[i] = int(tokens[i])
        sequence = canvas
        committed = high
        if committed < limit:
            sequence.append(int(_predictions(logits_of(sequence + [MASK]))[0][committed]))
    return sequence[len(prompt) : limit]


PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [11], [3, 1, 4, 1, 5, 9, 2, 6]]


# --- masks ---------------------------------------------------------------------------------------------


def test_block_causal_mask_matches_a_hand_built_example():
    positions = jnp.arange(5)[None, :]
    got = np.asarray(masks.block_causal_mask(positions, positions, 2)[0])
    expected = np.array(
        [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool
    )
    np.testing.assert_array_equal(got, expected)


def test_block_diffusion_training_mask_matches_a_hand_built_example():
    # [noisy 0..3 ; clean 0..3], block size 2
    expected = np.array(
        [
            [1, 1, 0, 0, 0, 0, 0, 0],  # noisy block 0 reads itself
            [1, 1, 0, 0, 0, 0, 0, 0],
            [0, 0, 1, 1, 1, 1, 0, 0],  # noisy block 1 reads itself and clean block 0
            [0, 0, 1, 1, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 1, 0, 0],  # clean block 0 reads clean block 0
            [0, 0, 0, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 1, 1, 1],  # clean block 1 reads clean blocks 0 and 1
            [0, 0, 0, 0, 1, 1, 1, 1],
        ],
        bool,
    )
    np.testing.assert_array_equal(np.asarray(masks.block_diffusion_training_mask(4, 2)), expected)


def test_span_and_context_mask_matches_a_hand_built_example():
    # a 3-entry span written at slots 4..6 of 8; its third entry is past the sequence end; context: slots 0 and 1
    in_sequence = jnp.array([[True, True, False]])
    context = jnp.array([[True, True, False, False]])
    got = np.asarray(masks.span_and_context_mask(in_sequence, 4, 8, context)[0])
    np.testing.assert_array_equal(got, np.array([[1, 1, 0, 0, 1, 1, 0, 0]] * 3, bool))


def test_complementary_training_masks_cover_every_token_exactly_once():
    masked = np.asarray(objectives.complementary_masks(jax.random.key(0), 3, 32, 8, 1e-3))
    first, second = masked[:3], masked[3:]
    np.testing.assert_array_equal(first ^ second, np.ones_like(first))
    assert 0 < first.mean() < 1


# --- masked diffusion -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shifted", [False, True])
def test_dllm_static_equals_the_reference_loop(shifted):
    model = masked_model(shifted=shifted)
    out = jspec.decode(model, PROMPTS, "dllm_static", max_new_tokens=16, block_size=8)
    expected = [reference_masked_static(model, p, 16, 8) for p in PROMPTS]
    assert out.sequences() == expected
    assert int(out.stats["model_calls"]) == 16  # one forward per token, every row in lockstep


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_threshold_one_is_static_and_freedave_is_static_with_fewer_forwards(cache):
    model = masked_model(shifted=True)
    static = jspec.decode(model, PROMPTS, "dllm_static", max_new_tokens=16, block_size=8, cache=cache)
    threshold_one = jspec.decode(model, PROMPTS, "dllm_threshold", max_new_tokens=16, block_size=8, cache=cache, threshold=1.0)
    free = jspec.decode(model, PROMPTS, "freedave", max_new_tokens=16, block_size=8, cache=cache, draft_steps=4)
    assert threshold_one.sequences() == static.sequences()
    assert free.sequences() == static.sequences()
    histogram = np.asarray(free.stats["committed_histogram"])
    assert histogram[0] == 0 and histogram[2:].sum() > 0  # some verifications commit several tokens


@settings(max_examples=5, deadline=None)
@given(
    seed=st.integers(0, 3),
    batch=st.integers(1, 3),
    draft_steps=st.integers(1, 5),
    block_size=st.sampled_from([4, 8]),
    shifted=st.booleans(),
    temperature=st.sampled_from([0.0, 1.0]),
)
def test_freedave_reproduces_static_decoding(seed, batch, draft_steps, block_size, shifted, temperature):
    model = masked_model(seed=seed, shifted=shifted)
    prompts = PROMPTS[:batch]
    options = dict(max_new_tokens=8, block_size=block_size, temperature=temperature, key=seed)
    static = jspec.decode(model, prompts, "dllm_static", **options)
    free = jspec.decode(model, prompts, "freedave", draft_steps=draft_steps, **options)
    assert free.sequences() == static.sequences()
    committed = np.asarray(free.stats["committed_histogram"])
    assert committed.sum() > 0 and np.all(committed[draft_steps + 1 :] == 0)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_fast_dllm_caches_are_exact_for_a_one_layer_model(cache):
    model = masked_model(shifted=True, num_layers=1)
    exact = jspec.decode(model, PROMPTS, "dllm_threshold", max_new_tokens=16, block_size=8, threshold=0.2)
    cached = jspec.decode(model, PROMPTS, "dllm_threshold", max_new_tokens=16, block_size=8, threshold=0.2, cache=cache)
    assert cached.sequences() == exact.sequences()


@pytest.mark.parametrize("strategy,options", [("dllm_threshold", dict(threshold=0.2, cache="dual")), ("freedave", dict(draft_steps=3))])
def test_a_batch_equals_its_rows_decoded_alone(strategy, options):
    model = masked_model(shifted=True)
    batch = jspec.decode(model, PROMPTS, strategy, max_new_tokens=16, block_size=8, **options)
    alone = [jspec.decode(model, [p], strategy, max_new_tokens=16, block_size=8, **options).sequences()[0] for p in PROMPTS]
    assert batch.sequences() == alone


def test_rows_finish_on_a_stop_token_at_the_end_of_its_block():
    model = masked_model(shifted=True)
    free_run = jspec.decode(model, PROMPTS, "dllm_static", max_new_tokens=16, block_size=4).sequences()
    stop = free_run[0][5]  # a token row 0 emits in its second block
    out = jspec.decode(model, PROMPTS, "freedave", max_new_tokens=16, block_size=4, stop_tokens=[stop], draft_steps=3)
    for row, prompt in enumerate(PROMPTS):
        expected = reference_masked_static(model, prompt, 16, 4, stop=stop)
        assert out.sequences()[row] == expected
    assert out.finish_reasons()[0] == "eos"
    assert out.sequences()[0][-1] == stop and len(out.sequences()[0]) <= 6


def test_masked_diffusion_bad_input_raises_clear_errors():
    model = masked_model()
    with pytest.raises(ValueError, match="block_size: 8 does not divide max_new_tokens=12"):
        jspec.decode(model, PROMPTS, "dllm_static", max_new_tokens=12, block_size=8)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"threshold: expected a float in \(0, 1\]"):
            jspec.decode(model, PROMPTS, "dllm_threshold", max_new_tokens=8, block_size=8, threshold=bad)
    with pytest.raises(ValueError, match="no mask token"):
        jspec.decode(tiny_model(), PROMPTS, "freedave", max_new_tokens=8, block_size=8)
    with pytest.raises(ValueError, match="diffusion='masked' model"):
        jspec.decode(block_model(), PROMPTS, "dllm_static", max_new_tokens=8, block_size=8)
    with pytest.raises(ValueError, match="cache: expected one of"):
        jspec.decode(model, PROMPTS, "dllm_static", max_new_tokens=8, block_size=8, cache="suffix")
    with pytest.raises(ValueError, match="draft_steps: expected an int >= 1"):
        jspec.decode(model, PROMPTS, "freedave", max_new_tokens=8, block_size=8, draft_steps=0)
    with pytest.raises(ValueError, match="mask_token_id"):
        tiny_model(diffusion="masked")  # a diffusion model needs a mask token


# --- block diffusion --------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [1.0, 0.3])
def test_block_diffusion_caches_equal_the_uncached_reference(threshold):
    model = block_model(seed=2)
    expected = [reference_block_diffusion(model, p, 13, 4, threshold) for p in PROMPTS]
    for cache in ("none", "block"):
        out = jspec.decode(model, PROMPTS, "block_diffusion", max_new_tokens=13, sub_block_size=4, cache=cache, threshold=threshold)
        assert out.sequences() == expected, cache
    whole_block = jspec.decode(model, PROMPTS, "block_diffusion", max_new_tokens=13, sub_block_size=8, cache="sub_block", threshold=threshold)
    assert whole_block.sequences() == [reference_block_diffusion(model, p, 13, 8, threshold) for p in PROMPTS]


def test_sub_block_cache_is_exact_for_a_one_layer_model_and_saves_work():
    model = block_model(seed=3, num_layers=1)
    options = dict(max_new_tokens=16, sub_block_size=4, threshold=1.0)
    exact = jspec.decode(model, PROMPTS, "block_diffusion", cache="none", **options)
    cached = jspec.decode(model, PROMPTS, "block_diffusion", cache="sub_block", **options)
    assert cached.sequences() == exact.sequences()
    assert int(cached.stats["model_calls"]) > int(exact.stats["model_calls"])  # a full-block run per sub-block


def test_block_diffusion_batch_equals_rows_alone_and_stops_on_eos():
    model = block_model(seed=2)
    options = dict(max_new_tokens=13, sub_block_size=4, threshold=0.3, cache="sub_block")
    first = jspec.decode(model, PROMPTS, "block_diffusion", **options).sequences()
    alone = [jspec.decode(model, [p], "block_diffusion", **options).sequences()[0] for p in PROMPTS]
    assert first == alone
    stop = first[1][3]
    stopped = jspec.decode(model, PROMPTS, "block_diffusion", stop_tokens=[stop], **options)
    row = stopped.sequences()[1]
    assert stopped.finish_reasons()[1] == "eos" and row == first[1][: first[1].index(stop) + 1]


def test_block_diffusion_bad_input_raises_clear_errors():
    model = block_model()
    with pytest.raises(ValueError, match="sub_block_size: 3 does not divide block_size=8"):
        jspec.decode(model, PROMPTS, "block_diffusion", max_new_tokens=8, sub_block_size=3)
    with pytest.raises(ValueError, match="threshold"):
        jspec.decode(model, PROMPTS, "block_diffusion", max_new_tokens=8, threshold=0)
    with pytest.raises(ValueError, match="diffusion='block' model"):
        jspec.decode(masked_model(), PROMPTS, "block_diffusion", max_new_tokens=8)
    with pytest.raises(ValueError, match="no mask token"):
        jspec.decode(tiny_model(), PROMPTS, "block_diffusion", max_new_tokens=8)
    with pytest.raises(ValueError, match="diffusion_block_size"):
        tiny_model(diffusion="block", mask_token_id=MASK)


# --- objectives and checkpoints ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["masked", "block"])
def test_diffusion_objectives_train_and_the_model_round_trips_through_hf(kind, tmp_path):
    model = masked_model(shifted=True) if kind == "masked" else block_model()
    objective = objectives.make_objective(f"{kind}_diffusion", model.config)
    tokens = jax.random.randint(jax.random.key(0), (2, 17), 0, MASK)
    loss_and_grads = jax.jit(jax.value_and_grad(lambda p: objective(p, {"tokens": tokens}, jax.random.key(1)), has_aux=True))
    (loss, metrics), grads = loss_and_grads(model.params)
    assert np.isfinite(float(loss)) and float(metrics["token_count"]) > 0
    assert float(jnp.abs(grads["embed"]).sum()) > 0
    with pytest.raises(ValueError, match="diffusion"):
        objectives.make_objective("block_diffusion" if kind == "masked" else "masked_diffusion", model.config)
    from jspec.checkpoint.hf import load_hf, save_hf

    save_hf(model.without_tokenizer(), tmp_path / "m")
    assert load_hf(tmp_path / "m").config.replace(name=model.config.name) == model.config


def test_adapting_a_model_grows_the_vocabulary_by_the_mask_token_only():
    from jspec.train.trainer import grown_vocabulary

    model = tiny_model(vocab_size=96, tie_embeddings=False)
    grown = grown_vocabulary(model.params, 97)
    np.testing.assert_array_equal(np.asarray(grown["embed"][:96]), np.asarray(model.params["embed"]))
    np.testing.assert_allclose(np.asarray(grown["embed"][96]), np.asarray(model.params["embed"]).mean(0), atol=1e-6)
    assert grown["lm_head"].shape == (model.config.hidden_size, 97)
    tokenizer = jspec.load("demo-code").tokenizer
    with_mask, mask_id = tokenizer.with_special_token("<|mask|>")
    assert mask_id == tokenizer.vocab_size and with_mask.encode("def f(x):\n") == tokenizer.encode("def f(x):\n")
    assert with_mask.with_special_token("<|mask|>") == (with_mask, mask_id)
