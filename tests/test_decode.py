"""`jspec.decode` with the autoregressive strategies."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jspec
from conftest import FAMILIES, naive_greedy, padded, tiny_model, uncached_logits
from jspec import bench, sampling


PROMPTS = [[5, 17, 3], [9, 2, 44, 61, 7, 12, 30, 8], [1], [88, 3, 3, 3, 3, 3]]


def test_greedy_equals_naive_argmax_loop(model):
    out = jspec.decode(model, PROMPTS, max_new_tokens=12)
    for prompt, row in zip(PROMPTS, out.sequences()):
        assert row == naive_greedy(model, prompt, 12)
    assert out.finish_reasons() == ["length"] * 4
    assert out.stats["model_calls"] == 12 and out.stats["tokens_generated"] == [12] * 4


@pytest.mark.parametrize("strategy", ["greedy", "sample"])
def test_batch_equals_rows_decoded_alone(model, strategy):
    batched = jspec.decode(model, PROMPTS, strategy, max_new_tokens=10, key=3, temperature=0.0) if strategy == "sample" else jspec.decode(model, PROMPTS, max_new_tokens=10)
    for index, prompt in enumerate(PROMPTS):
        alone = jspec.decode(model, [prompt], max_new_tokens=10)
        assert alone.sequences()[0] == batched.sequences()[index]


def test_int_array_with_prompt_lengths_equals_ragged_lists(model):
    width = max(map(len, PROMPTS))
    array = np.zeros((len(PROMPTS), width), np.int32)
    for i, p in enumerate(PROMPTS):
        array[i, : len(p)] = p
    from_array = jspec.decode(model, array, max_new_tokens=6, prompt_lengths=[len(p) for p in PROMPTS])
    from_lists = jspec.decode(model, PROMPTS, max_new_tokens=6)
    np.testing.assert_array_equal(from_array.tokens, from_lists.tokens)


def test_sampling_is_reproducible_and_keyed(model):
    kwargs = dict(max_new_tokens=16, temperature=1.0)
    first = jspec.decode(model, PROMPTS, "sample", key=jax.random.key(7), **kwargs)
    again = jspec.decode(model, PROMPTS, "sample", key=jax.random.key(7), **kwargs)
    other = jspec.decode(model, PROMPTS, "sample", key=jax.random.key(8), **kwargs)
    np.testing.assert_array_equal(first.tokens, again.tokens)
    assert not np.array_equal(first.tokens, other.tokens)


def _step_logits(model, prompt, emitted):
    """Naive logits [N, V] at each emitted token's step."""
    logits = uncached_logits(model, padded(list(prompt) + list(emitted)))
    return np.asarray(logits[len(prompt) - 1 : len(prompt) - 1 + len(emitted)])


@pytest.mark.parametrize(
    "option, value",
    [("top_k", 3), ("top_p", 0.3), ("min_p", 0.4)],
)
def test_filters_never_emit_excluded_tokens(option, value):
    model = tiny_model("llama", init_scale=0.15)  # flatter distributions, so the filters matter
    out = jspec.decode(model, PROMPTS, "sample", max_new_tokens=24, key=11, temperature=1.0, **{option: value})
    for prompt, row in zip(PROMPTS, out.sequences()):
        logits = _step_logits(model, prompt, row)
        params = sampling.SamplingParams.broadcast(len(row), 1.0, **{option: value})
        allowed = np.isfinite(np.asarray(jax.jit(sampling.warp_logits)(jnp.asarray(logits), params)))
        assert allowed[np.arange(len(row)), row].all(), option
        assert (allowed.sum(1) < allowed.shape[1]).all()  # the filter excluded something, so the check has teeth
    params = sampling.SamplingParams.broadcast(1, 1.0, **{option: value})
    # and the filter is exactly the stated rule (computed here independently with numpy)
    logits = _step_logits(model, PROMPTS[0], out.sequences()[0])[0]
    probs = np.exp(logits - logits.max()); probs /= probs.sum()
    order = np.argsort(-logits)
    if option == "top_k":
        want = logits >= logits[order[value - 1]]
    elif option == "top_p":
        before = np.cumsum(probs[order]) - probs[order]
        want = logits >= logits[order][before < value].min()
    else:
        want = probs >= value * probs.max()
    got = np.isfinite(np.asarray(sampling.warp_logits(jnp.asarray(logits)[None], params)[0]))
    np.testing.assert_array_equal(got, want)


def test_stop_token_finishes_one_row_and_the_others_go_on(model):
    free = jspec.decode(model, PROMPTS, max_new_tokens=10, stop_tokens=[])
    stop = int(free.tokens[0, 3])
    first_stop = [next((i for i, t in enumerate(row) if t == stop), None) for row in free.sequences()]
    stopped = jspec.decode(model, PROMPTS, max_new_tokens=10, stop_tokens=[stop])
    for row, (full, cut) in enumerate(zip(free.sequences(), stopped.sequences())):
        if first_stop[row] is None:
            assert cut == full and stopped.finish_reasons()[row] == "length"
        else:
            assert cut == full[: first_stop[row] + 1] and stopped.finish_reasons()[row] == "eos"
    assert stopped.finish_reasons()[0] == "eos" and "length" in stopped.finish_reasons()


def test_per_row_stop_tokens(model):
    free = jspec.decode(model, PROMPTS[:2], max_new_tokens=8, stop_tokens=[])
    stops = [[int(free.tokens[0, 2])], [int(free.tokens[1, 5])]]
    out = jspec.decode(model, PROMPTS[:2], max_new_tokens=8, stop_tokens=stops)
    assert out.lengths.tolist() == [free.sequences()[0].index(stops[0][0]) + 1, free.sequences()[1].index(stops[1][0]) + 1]


def test_cache_full_stops_cleanly(model):
    full = jspec.decode(model, PROMPTS, max_new_tokens=20)
    out = jspec.decode(model, PROMPTS, max_new_tokens=20, cache_size=12)
    for prompt, row, reference, reason in zip(PROMPTS, out.sequences(), full.sequences(), out.finish_reasons()):
        # a row can hold 12 - len(prompt) more tokens in the cache; one more is emitted from the last logits
        assert len(row) == 12 - len(prompt) + 1 and reason == "cache_full"
        assert row == reference[: len(row)]


def test_second_call_with_same_shapes_does_not_recompile(model):
    jspec.decode(model, [[1, 2, 3], [4, 5]], "sample", max_new_tokens=8, temperature=0.5)
    before = jspec.trace_count()
    jspec.decode(model, [[7, 8, 9, 10], [11]], "sample", max_new_tokens=8, temperature=0.9, top_p=0.5, top_k=4, key=2)
    jspec.decode(model, [[7, 8], [11, 12, 13]], "greedy", max_new_tokens=8)
    assert jspec.trace_count() == before
    jspec.decode(model, [[7, 8], [11, 12, 13]], "greedy", max_new_tokens=9)  # same output bucket (16): no compile
    assert jspec.trace_count() == before
    jspec.decode(model, [[7, 8], [11, 12, 13]], "greedy", max_new_tokens=17)  # the next bucket (32) compiles
    assert jspec.trace_count() == before + 1


def test_stream_yields_the_decode_tokens(model):
    want = jspec.decode(model, PROMPTS, "sample", max_new_tokens=9, key=5, temperature=0.8)
    stream = jspec.stream(model, PROMPTS, "sample", max_new_tokens=9, key=5, temperature=0.8)
    pieces = [[] for _ in PROMPTS]
    for step in stream:
        for row, new in enumerate(step):
            pieces[row].extend(new)
    assert pieces == want.sequences() == stream.output.sequences()


def test_text_prompts_with_a_tokenizer():
    model = jspec.load("random:random-tiny")
    out = jspec.decode(model, ["héllo wörld", "x"], max_new_tokens=5)
    assert len(out.text) == 2 and out.lengths.tolist() == [5, 5]
    assert jspec.decode(model, "héllo wörld", max_new_tokens=5).sequences()[0] == out.sequences()[0]


def test_zero_new_tokens(model):
    out = jspec.decode(model, PROMPTS, max_new_tokens=0)
    assert out.tokens.shape == (4, 0) and out.lengths.tolist() == [0] * 4


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(prompts=[[1, 2], []]), "prompts: row 1 is empty"),
        (dict(prompts=[]), "prompts"),
        (dict(prompts=[[1, 2, 97]]), "outside the vocabulary"),
        (dict(prompts=[[1, -3]]), "outside the vocabulary"),
        (dict(prompts=np.ones((2, 3), np.float32)), "dtype float32"),
        (dict(prompts=np.ones((3,), np.int32)), "shape [B, T]"),
        (dict(prompts="text"), "tokenizer"),
        (dict(prompts=[[1, 2.5]]), "row 0"),
        (dict(prompts=[[1] * 20], cache_size=10), "cache_size"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(max_new_tokens=2.0), "max_new_tokens"),
        (dict(strategy="beam"), "unknown strategy 'beam'"),
        (dict(strategy="greedy", temperature=0.5), "unknown option(s) ['temperature']"),
        (dict(strategy="sample", temprature=0.5), "temprature"),
        (dict(strategy="sample", temperature=-1.0), "temperature"),
        (dict(strategy="sample", top_p=0.0), "top_p"),
        (dict(strategy="sample", top_k=-2), "top_k"),
        (dict(strategy="sample", min_p=1.0), "min_p"),
        (dict(strategy="sample", temperature=[0.5, 0.7, 0.9]), "one per row"),
        (dict(stop_tokens=[500]), "stop_tokens"),
        (dict(prompts=np.ones((2, 3), np.int32), prompt_lengths=[3, 4]), "prompt_lengths"),
        (dict(key="seed"), "key"),
    ],
)
def test_bad_input_raises_a_clear_error(model, kwargs, argument):
    kwargs = {"prompts": [[1, 2, 3]], "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError) as error:
        jspec.decode(model, **kwargs)
    assert argument in str(error.value)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    family=st.sampled_from(sorted(FAMILIES)),
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    max_new=st.integers(1, 8),
    seed=st.integers(0, 1000),
)
def test_property_batched_greedy_equals_naive_loop(family, lengths, max_new, seed):
    model = tiny_model(family, seed=seed % 3)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 97, n).tolist() for n in lengths]
    out = jspec.decode(model, prompts, max_new_tokens=max_new)
    for prompt, row in zip(prompts, out.sequences()):
        assert row == naive_greedy(model, prompt, max_new)


def test_tied_head_copy_holds_embed_t_and_changes_no_token():
    """With `KernelOptions.head_copy` (the default on CPU), decoding a tied-embedding model multiplies by a [D, V]
    copy of embed.T, made once per embedding array; greedy, sampled (decode and stream) and speculative decodes (the draft's head
    copied too) give the tied model's tokens: the naive argmax loop's, and those of `head_copy=False`. The shipped
    demo-code (tied, float32) decodes held-out prompts to the same tokens both ways."""
    import importlib

    from jspec.models.model import with_head_copy
    from jspec.strategies.base import resolve_strategy

    model = tiny_model("qwen2", head_copy=True)  # tied embeddings; copied on any backend (None: on CPU)
    copied = with_head_copy(model)
    assert model.config.tie_embeddings and not copied.config.tie_embeddings
    np.testing.assert_array_equal(np.asarray(copied.params["lm_head"]), np.asarray(model.params["embed"]).T)
    assert with_head_copy(model).params["lm_head"] is copied.params["lm_head"]  # made once
    plain, untied = model.with_kernels(head_copy=False), tiny_model("llama")
    assert with_head_copy(plain) is plain and with_head_copy(untied) is untied
    draft = tiny_model("qwen2", seed=1, head_copy=True)
    _, resolved = importlib.import_module("jspec.decode").for_decoding(model, resolve_strategy("speculative", {"draft": draft}))
    assert "lm_head" in resolved.drafter.draft.params and not resolved.drafter.draft.config.tie_embeddings
    runs = [("sample", dict(temperature=0.8, key=2)), ("speculative", dict(draft=draft, num_draft_tokens=3))]
    for strategy, options in runs:
        plain_options = {**options, "draft": draft.with_kernels(head_copy=False)} if "draft" in options else options
        want = jspec.decode(plain, PROMPTS, strategy, max_new_tokens=10, **plain_options).sequences()
        assert jspec.decode(model, PROMPTS, strategy, max_new_tokens=10, **options).sequences() == want
        if strategy == "sample":
            stream = jspec.stream(model, PROMPTS, strategy, max_new_tokens=10, **options)
            assert [row for step in stream for row in step] and stream.output.sequences() == want
    greedy = jspec.decode(model, PROMPTS, max_new_tokens=10).sequences()
    assert greedy == [naive_greedy(model, prompt, 10) for prompt in PROMPTS]

    demo = jspec.load("demo-code")
    prompts = bench.heldout_prompts(demo.tokenizer, 2, 64)
    assert (jspec.decode(demo, prompts, max_new_tokens=32, stop_tokens=[]).sequences()
            == jspec.decode(demo.with_kernels(head_copy=False), prompts, max_new_tokens=32, stop_tokens=[]).sequences())
