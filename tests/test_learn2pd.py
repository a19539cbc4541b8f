"""Learn2PD unmasking (dllm_learn2pd; block_diffusion's unmasking="learn2pd") and End-of-Text Prediction
(end_of_text) for diffusion decoding.

Exactness on a tiny random model (threshold 1 is dllm_static / block_diffusion's static rule in every cache mode)
and on the shipped bfloat16 demo models (what users run); on the shipped demo-code-dllm and demo-code-bd and
their filters, on held-out prompts: the oracle filter bounds the learned one, the shipped filters reach the
figures their metadata and the model card state, and EoTP leaves every token unchanged while saving forwards
(also for block_diffusion on demo-code-bd)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jspec
from jspec import bench
from jspec.strategies import learn2pd
from jspec.strategies.unmasking import LEARN2PD_THRESHOLD
from jspec.train.learn2pd import decode_counting_forwards, weights_digest
from jspec.validation import ArgumentError
from conftest import assert_end_of_text_changes_no_token, line_break_tokens, tiny_model

MASK = 96
ASSETS = Path(__file__).resolve().parents[1] / "jspec" / "assets"
HELDOUT_PROMPTS, PROMPT_TOKENS, NEW_TOKENS, BLOCK = 4, 64, 64, 32


def row_forwards(output: jspec.DecodeOutput) -> np.ndarray:  # [B]: forwards each row ran
    return np.asarray(output.stats["block_forwards"]).sum(axis=1)


def agreement(output: jspec.DecodeOutput, reference: np.ndarray) -> float:
    return float(np.mean(np.asarray(output.tokens) == reference))


# --- exactness on a tiny model ---------------------------------------------------------------------------


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_threshold_one_is_static_token_for_token(cache):
    model = tiny_model("llama", seed=3, diffusion="masked", mask_token_id=MASK, shifted_logits=False)
    prompts = [[5, 9, 2, 7], [3, 1, 4, 1, 5, 9, 2], [8]]
    options = dict(max_new_tokens=16, block_size=8, cache=cache, stop_tokens=[])
    static = jspec.decode(model, prompts, "dllm_static", **options)
    mlp = learn2pd.MLPFilter(params=learn2pd.init_mlp(jax.random.key(0)))
    strict = jspec.decode(model, prompts, "dllm_learn2pd", filter=mlp, threshold=1.0, **options)
    np.testing.assert_array_equal(strict.tokens, static.tokens)
    assert row_forwards(strict).tolist() == row_forwards(static).tolist() == [16, 16, 16]
    traces = jspec.trace_count()  # another filter and threshold of the same shapes: the same compiled program
    other = learn2pd.MLPFilter(params=learn2pd.init_mlp(jax.random.key(1)))
    jspec.decode(model, prompts, "dllm_learn2pd", filter=other, threshold=0.5, **options)
    assert jspec.trace_count() == traces
    # per-row thresholds: row 0 at 1 stays static while the others unmask in parallel (the same compiled loop)
    loose = jspec.decode(model, prompts, "dllm_learn2pd", filter=mlp, threshold=[1.0, 0.01, 0.01], **options)
    np.testing.assert_array_equal(loose.tokens[0], static.tokens[0])
    assert np.all(row_forwards(loose)[1:] < 16)


def test_bad_options_raise_naming_the_argument():
    model = tiny_model("llama", seed=3, diffusion="masked", mask_token_id=MASK, shifted_logits=False)
    mlp = learn2pd.MLPFilter(params=learn2pd.init_mlp(jax.random.key(0)))
    options = dict(max_new_tokens=8, block_size=8)
    cases = [
        (dict(filter=mlp, threshold=0.0), "threshold"),
        (dict(filter=mlp, threshold=[0.5, 1.5]), "threshold"),
        (dict(filter="no-such-model"), "filter"),
        (dict(filter=3), "filter"),
        (dict(filter=learn2pd.OracleFilter(reference=jnp.zeros((2, 4), jnp.int32))), "filter"),
        (dict(filter=mlp, end_of_text="yes"), "end_of_text"),
        (dict(filter=mlp.replace(trained_for=("vocab_size", 64))), "filter"),  # not ((field, value), ...)
        (dict(filter=mlp.replace(trained_for=(("width", 64),))), "filter"),
    ]
    for kwargs, name in cases:
        with pytest.raises(ArgumentError, match=f"^{name}:"):
            jspec.decode(model, [[1, 2], [3]], "dllm_learn2pd", **options, **kwargs)
    with pytest.raises(ArgumentError, match="^filter: .*another shape"):  # a shipped filter, for a model of another shape
        jspec.decode(model, [[1, 2], [3]], "dllm_learn2pd", filter="demo-code-dllm", **options)
    with pytest.raises(ArgumentError, match="^unmasking:"):
        jspec.decode(model, [[1, 2]], "masked_diffusion", unmasking="learn2pdx", **options)
    block = tiny_model("llama", seed=1, diffusion="block", diffusion_block_size=8, mask_token_id=MASK, shifted_logits=True)
    with pytest.raises(ArgumentError, match="^end_of_text:"):
        jspec.decode(block, [[1, 2]], "block_diffusion", end_of_text=1, max_new_tokens=8)


@pytest.mark.parametrize("cache", ["none", "block", "sub_block"])
def test_block_diffusion_threshold_one_is_static_token_for_token(cache):
    model = tiny_model("llama", seed=2, diffusion="block", diffusion_block_size=8, mask_token_id=MASK, shifted_logits=True)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [11]]
    options = dict(max_new_tokens=13, sub_block_size=4, cache=cache, stop_tokens=[])
    static = jspec.decode(model, prompts, "block_diffusion", unmasking="static", **options)
    mlp = learn2pd.MLPFilter(params=learn2pd.init_mlp(jax.random.key(0)))
    learned = lambda filter, threshold: jspec.decode(  # noqa: E731  # per-row thresholds: one compiled loop
        model, prompts, "block_diffusion", unmasking="learn2pd", filter=filter, threshold=threshold, **options
    )
    strict = learned(mlp, [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(strict.tokens, static.tokens)
    assert row_forwards(strict).tolist() == row_forwards(static).tolist()
    assert int(strict.stats["model_calls"]) == int(static.stats["model_calls"])
    traces = jspec.trace_count()  # another filter and thresholds of the same shapes: the same compiled program
    other = learn2pd.MLPFilter(params=learn2pd.init_mlp(jax.random.key(1)))
    learned(other, [0.5, 0.5, 0.5])
    # row 0 at 1 stays static while the others unmask in parallel
    loose = learned(mlp, [1.0, 0.01, 0.01])
    assert jspec.trace_count() == traces
    np.testing.assert_array_equal(loose.tokens[0], static.tokens[0])
    assert np.all(row_forwards(loose)[1:] < row_forwards(static)[1:])


def test_block_diffusion_bad_learn2pd_options_raise_naming_the_argument():
    model = tiny_model("llama", seed=1, diffusion="block", diffusion_block_size=8, mask_token_id=MASK, shifted_logits=True)
    mlp = learn2pd.MLPFilter(params=learn2pd.init_mlp(jax.random.key(0)))
    cases = [
        (dict(unmasking="freedave"), "unmasking"),
        (dict(unmasking="learn2pdx"), "unmasking"),
        (dict(unmasking="learn2pd", filter=mlp, threshold=0.0), "threshold"),
        (dict(unmasking="learn2pd", filter=mlp, threshold=[0.5, 1.5]), "threshold"),
        (dict(unmasking="learn2pd", filter="no-such-model"), "filter"),
        (dict(unmasking="learn2pd", filter=3), "filter"),
        (dict(unmasking="learn2pd", filter=learn2pd.OracleFilter(reference=jnp.zeros((2, 4), jnp.int32))), "filter"),
    ]
    for kwargs, name in cases:
        with pytest.raises(ArgumentError, match=f"^{name}:"):
            jspec.decode(model, [[1, 2], [3]], "block_diffusion", max_new_tokens=8, **kwargs)
    with pytest.raises(ArgumentError, match="^filter: .*another shape"):  # the default: demo-code-bd's filter
        jspec.decode(model, [[1, 2], [3]], "block_diffusion", max_new_tokens=8, unmasking="learn2pd")


# --- the shipped bfloat16 models: threshold 1 is static token for token --------------------------------------


def shipped(name: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not (ASSETS / name / learn2pd.FILTER_FILE).is_file(), reason=f"{name}'s filter not built")


@shipped("demo-code-dllm")
def test_dllm_learn2pd_threshold_one_is_static_in_bfloat16():
    model = jspec.load("demo-code-dllm", dtype="bfloat16")
    prompts = bench.heldout_prompts(model.tokenizer, 2, 32)
    for cache in ("none", "dual"):
        options = dict(max_new_tokens=32, block_size=16, cache=cache, stop_tokens=[])
        static = jspec.decode(model, prompts, "dllm_static", **options)
        strict = jspec.decode(model, prompts, "dllm_learn2pd", threshold=1.0, **options)  # the shipped filter
        np.testing.assert_array_equal(strict.tokens, static.tokens, err_msg=cache)
        assert row_forwards(strict).tolist() == row_forwards(static).tolist()


@shipped("demo-code-bd")
def test_block_diffusion_learn2pd_threshold_one_is_static_in_bfloat16():
    model = jspec.load("demo-code-bd", dtype="bfloat16")
    prompts = bench.heldout_prompts(model.tokenizer, 2, 40)  # a prompt tail in the first block: it is decoded
    for cache in ("block", "sub_block"):  # "none" runs the same arithmetic as "block" (test_diffusion.py)
        options = dict(max_new_tokens=40, cache=cache, stop_tokens=[])
        static = jspec.decode(model, prompts, "block_diffusion", unmasking="static", **options)
        strict = jspec.decode(model, prompts, "block_diffusion", unmasking="learn2pd", threshold=1.0, **options)  # the shipped filter
        np.testing.assert_array_equal(strict.tokens, static.tokens, err_msg=cache)
        assert int(strict.stats["model_calls"]) == int(static.stats["model_calls"])


# --- the shipped model and filter --------------------------------------------------------------------------

demo = pytest.mark.skipif(not (ASSETS / "demo-code-dllm" / learn2pd.FILTER_FILE).is_file(), reason="filter not built")


@pytest.fixture(scope="module")
def dllm() -> jspec.Model:
    return jspec.load("demo-code-dllm", dtype="float32")


@pytest.fixture(scope="module")
def heldout(dllm) -> list[list[int]]:
    return bench.heldout_prompts(dllm.tokenizer, HELDOUT_PROMPTS, PROMPT_TOKENS)


@pytest.fixture(scope="module")
def static(dllm, heldout) -> jspec.DecodeOutput:
    return jspec.decode(dllm, heldout, "dllm_static", max_new_tokens=NEW_TOKENS, block_size=BLOCK, stop_tokens=[])


@demo
def test_oracle_bounds_the_learned_filter_and_the_shipped_filter_reaches_its_stated_figures(dllm, heldout, static):
    options = dict(max_new_tokens=NEW_TOKENS, block_size=BLOCK, stop_tokens=[])
    reference = np.asarray(static.tokens)
    oracle = jspec.decode(dllm, heldout, "dllm_learn2pd", filter=learn2pd.OracleFilter(reference=jnp.asarray(reference)), threshold=0.5, **options)
    learned = jspec.decode(dllm, heldout, "dllm_learn2pd", **options)  # the shipped filter at its default threshold
    threshold = jspec.decode(dllm, heldout, "dllm_threshold", threshold=0.9, **options)
    forwards = {name: int(row_forwards(out).sum()) for name, out in (("oracle", oracle), ("learned", learned), ("threshold", threshold), ("static", static))}
    assert forwards["oracle"] <= min(forwards["static"], forwards["threshold"], forwards["learned"]), forwards
    assert forwards["oracle"] < forwards["static"] / 2, forwards
    # the oracle only unmasks through the filter where its prediction is the static token; its fallback (nothing
    # passes: the most confident position) can differ, so it is close to static, not equal (see the README)
    assert agreement(oracle, reference) >= 0.85

    metadata = learn2pd.load_filter(learn2pd.filter_path("demo-code-dllm"))[1]
    assert metadata["model_sha256"] == weights_digest("demo-code-dllm"), "the shipped filter was trained on other demo-code-dllm weights"
    stated = metadata["heldout"]
    assert stated["prompts"] == HELDOUT_PROMPTS and stated["threshold"] == LEARN2PD_THRESHOLD
    tokens_per_forward = float(np.asarray(learned.lengths).sum() / row_forwards(learned).sum())
    assert tokens_per_forward == pytest.approx(stated["tokens_per_forward"], abs=0.01)
    assert agreement(learned, reference) == pytest.approx(stated["agreement_with_static"], abs=0.01)
    card = (ASSETS / "MODEL_CARD.md").read_text()
    assert f"{stated['tokens_per_forward']:.2f} tokens per forward" in card
    assert f"{100 * stated['agreement_with_static']:.1f}% agreement" in card


@pytest.fixture(scope="module")
def line_ends(dllm) -> list[int]:
    return line_break_tokens(dllm)


@demo
@pytest.mark.parametrize("strategy, options", [
    ("dllm_static", dict(cache="none")),
    ("dllm_threshold", dict(threshold=0.7, cache="dual")),  # several positions decided per forward
], ids=["static", "threshold-dual"])  # FreeDave (drafted branches) and block_diffusion in bf16: test_bf16_lossless.py
def test_end_of_text_prediction_is_lossless_and_saves_forwards(dllm, heldout, line_ends, strategy, options):
    options = dict(options, max_new_tokens=NEW_TOKENS, block_size=BLOCK, stop_tokens=line_ends)
    plain = jspec.decode(dllm, heldout, strategy, end_of_text=False, **options)
    early = jspec.decode(dllm, heldout, strategy, end_of_text=True, **options)
    assert np.any(np.asarray(plain.lengths) < NEW_TOKENS)  # rows stop at a line break
    assert_end_of_text_changes_no_token(plain, early)


@pytest.mark.skipif(not (ASSETS / "demo-code-bd" / "config.json").is_file(), reason="demo-code-bd not built")
def test_end_of_text_prediction_in_block_diffusion(heldout, line_ends):
    model = jspec.load("demo-code-bd", dtype="float32")
    options = dict(max_new_tokens=NEW_TOKENS, threshold=0.9, stop_tokens=line_ends)
    plain = jspec.decode(model, heldout, "block_diffusion", end_of_text=False, **options)
    early = jspec.decode(model, heldout, "block_diffusion", end_of_text=True, **options)
    assert_end_of_text_changes_no_token(plain, early)


# --- block_diffusion with demo-code-bd's filter ---------------------------------------------------------------


@pytest.fixture(scope="module")
def bd() -> jspec.Model:
    return jspec.load("demo-code-bd", dtype="float32")


@shipped("demo-code-bd")
def test_block_diffusion_oracle_bounds_the_learned_filter_and_the_shipped_filter_reaches_its_stated_figures(bd, heldout):
    static_tokens, static_forwards = decode_counting_forwards(bd, heldout, "block_diffusion", {"unmasking": "static"}, NEW_TOKENS)
    oracle_forwards, oracle_tokens = 0, []
    for index, prompt in enumerate(heldout):  # each prompt alone: its oracle's reference is its static output
        oracle = learn2pd.OracleFilter(reference=jnp.asarray(static_tokens[index : index + 1]))
        out = jspec.decode(bd, [prompt], "block_diffusion", unmasking="learn2pd", filter=oracle, threshold=0.5,
                           max_new_tokens=NEW_TOKENS, stop_tokens=[])
        oracle_forwards += int(out.stats["model_calls"])
        oracle_tokens.append(np.asarray(out.tokens)[0])
    learned_tokens, learned_forwards = decode_counting_forwards(bd, heldout, "block_diffusion", {"unmasking": "learn2pd"}, NEW_TOKENS)
    assert oracle_forwards <= min(static_forwards, learned_forwards), (oracle_forwards, static_forwards, learned_forwards)
    assert oracle_forwards < static_forwards / 1.5, (oracle_forwards, static_forwards)
    # as for the dllm: the oracle's fallback (nothing passes: the most confident position) can differ from
    # static's choice, so it is close to static, not equal (measured 94.5%)
    assert np.mean(np.stack(oracle_tokens) == static_tokens) >= 0.85

    metadata = learn2pd.load_filter(learn2pd.filter_path("demo-code-bd"))[1]
    assert metadata["model_sha256"] == weights_digest("demo-code-bd"), "the shipped filter was trained on other demo-code-bd weights"
    stated = metadata["heldout"]
    assert stated["prompts"] == HELDOUT_PROMPTS and stated["threshold"] == LEARN2PD_THRESHOLD
    assert learned_tokens.size / learned_forwards == pytest.approx(stated["tokens_per_forward"], abs=0.01)
    assert np.mean(learned_tokens == static_tokens) == pytest.approx(stated["agreement_with_static"], abs=0.01)
    card = (ASSETS / "MODEL_CARD.md").read_text()
    section = card[card.index("## Learn2PD unmasking filter: `demo-code-bd/"):]
    assert f"{stated['tokens_per_forward']:.2f} tokens per forward" in section
    assert f"{100 * stated['agreement_with_static']:.1f}% agreement" in section
