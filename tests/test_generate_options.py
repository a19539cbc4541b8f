"""Generate options users expect from transformers: beam search (sequences and scores equal transformers'
`generate(num_beams=...)`), stop strings (the row ends where transformers' StopStringCriteria stops, across token
boundaries), several samples per prompt, and clear errors for bad values."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jspec  # noqa: E402
from conftest import tiny_model  # noqa: E402
from jspec.checkpoint.hf import load_hf  # noqa: E402
from jspec.decode import build_prompts  # noqa: E402
from jspec.strategies.base import prefill  # noqa: E402
from jspec.validation import ArgumentError  # noqa: E402
from test_hf import build_hf  # noqa: E402

torch.set_num_threads(1)

SCORE_TOLERANCE = 1e-5  # relative: fp32 logits agree to ~1e-6, summed over a few tokens
PROMPTS = [[5, 17, 3, 99, 42, 7], [9, 2, 44]]  # ragged
NEW_TOKENS = 8
# (num_beams, length_penalty, early_stopping, num_return_sequences); the stop tokens (7, 96) occur mid-beam for
# the Llama model below (its best unstopped beams are 123 27 123 7 ... and 76 19 32 96 ...)
SETTINGS = [(3, 1.0, False, 1), (4, 0.5, True, 2), (2, -1.0, "never", 1), (3, 2.0, "never", 3)]


TINY_PROMPTS = [[5, 17, 3, 90, 42, 7], [9, 2, 44]]  # within the conftest models' vocabulary of 97


def load_pair(family, path):
    """(transformers model, the same model loaded in jspec), fp32."""
    hf_model = build_hf(family)
    hf_model.save_pretrained(path)
    return hf_model, load_hf(path)


def hf_beam_search(hf_model, prompt, stop_tokens, num_beams, length_penalty, early_stopping, returned):
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0,
            eos_token_id=stop_tokens, num_beams=num_beams, length_penalty=length_penalty,
            early_stopping=early_stopping, num_return_sequences=returned, output_scores=True,
            return_dict_in_generate=True)
    lengths = (out.beam_indices >= 0).sum(dim=1).tolist()  # generated tokens per hypothesis
    sequences = [row[len(prompt) : len(prompt) + n].tolist() for row, n in zip(out.sequences, lengths)]
    return sequences, out.sequences_scores.tolist()


@pytest.mark.parametrize("family, stop_tokens", [("llama_gqa", [7]), ("qwen2_bias_tied", [7, 96])])
def test_beam_search_equals_transformers(family, stop_tokens, tmp_path):
    hf_model, model = load_pair(family, tmp_path)
    stopped = 0
    for num_beams, length_penalty, early_stopping, returned in SETTINGS:
        out = jspec.decode(model, PROMPTS, "beam_search", max_new_tokens=NEW_TOKENS, stop_tokens=stop_tokens,
                           num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                           num_return_sequences=returned)
        assert len(out.sequences()) == len(PROMPTS) * returned  # each prompt's hypotheses, best first
        for index, prompt in enumerate(PROMPTS):
            want, want_scores = hf_beam_search(hf_model, prompt, stop_tokens, num_beams, length_penalty,
                                               early_stopping, returned)
            rows = slice(index * returned, (index + 1) * returned)
            assert out.sequences()[rows] == want, (num_beams, length_penalty, early_stopping)
            np.testing.assert_allclose(out.stats["sequence_scores"][rows], want_scores, rtol=SCORE_TOLERANCE)
            stopped += sum(seq[-1] in stop_tokens for seq in want)
            for seq, reason in zip(want, out.finish_reasons()[rows]):
                assert reason == ("eos" if seq[-1] in stop_tokens else "length")
    assert stopped > 0  # some hypotheses ended on a stop token mid-search


def test_beam_search_with_one_beam_is_greedy():
    model = tiny_model("llama")
    greedy = jspec.decode(model, TINY_PROMPTS, max_new_tokens=NEW_TOKENS)
    beams = jspec.decode(model, TINY_PROMPTS, "beam_search", max_new_tokens=NEW_TOKENS, num_beams=1)
    assert beams.sequences() == greedy.sequences()


@pytest.mark.parametrize("family, impl", [("llama", "xla"), ("mistral_window", "xla"), ("llama", "pallas_sparse")])
def test_gather_rows_reorders_every_cache_kind(family, impl):
    """Prefill, permute and repeat the cache rows, decode one token: the logits equal prefilling the permuted
    prompts (full, ring-buffer and sparse entries)."""
    options = {} if impl == "xla" else dict(head_dim=16, attention_impl=impl, sparse_block_size=16,
                                            sparse_kernel_size=8, sparse_kernel_stride=4)
    model = tiny_model(family, **options)
    prompts = build_prompts(model, [[5, 17, 3, 9, 9, 1, 2], [9, 2, 44]], 4,
                                                        cache_size=64 if impl == "xla" else 128)
    rows = jnp.array([1, 0, 1])

    @jax.jit
    def next_logits(model, prompts, rows, token):
        cache = model.new_cache(prompts.batch_size, prompts.cache_size, max_chunk=1)
        _, cache = prefill(model, prompts, cache)
        cache = cache.gather_rows(rows)
        logits, _ = model.forward(token[:, None], cache.lengths[:, None], cache, write_slots=cache.lengths[:, None])
        return logits[:, 0]

    token = jnp.array([11, 12, 13])
    got = next_logits(model, prompts, rows, token)
    permuted = jax.tree.map(lambda x: x[rows] if getattr(x, "ndim", 0) else x, prompts)
    want = next_logits(model, permuted, jnp.arange(3), token)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


# --- stop strings -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    return jspec.load("demo-code")


def _transformers_stop(demo, prompt, tokens, stop):
    """After how many of `tokens` transformers' StopStringCriteria stops (None: never)."""
    from transformers.generation.stopping_criteria import StopStringCriteria

    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=demo.tokenizer.path)
    criteria = StopStringCriteria(tokenizer, stop)
    ids = demo.tokenizer.encode(prompt)
    return next((n for n in range(1, len(tokens) + 1) if criteria(torch.tensor([ids + tokens[:n]]), None)[0]), None)


def test_stop_strings_across_token_boundaries_end_where_transformers_does(demo):
    prompt, budget = "def fib(n):", 40
    full = jspec.decode(demo, [prompt], max_new_tokens=budget).sequences()[0]
    pieces = [demo.tokenizer.decode([t]) for t in full]
    two = next(i for i in range(3, budget - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    three = next(i for i in range(two + 1, budget - 2) if pieces[i] and pieces[i + 2])
    cases = [
        [pieces[two][-2:] + pieces[two + 1][:1]],  # split over two tokens, the last one running past it
        [pieces[three][-1:] + pieces[three + 1] + pieces[three + 2][:1]],  # over three tokens
        ["\n\n", "zzz-never"],  # inside one token, beside a string that never occurs
    ]
    speculative = ("speculative", dict(draft=jspec.load("demo-code-draft"), num_draft_tokens=3))
    for stop, strategies in zip(cases, [[("greedy", {})], [("greedy", {}), speculative], [("greedy", {})]]):
        want = _transformers_stop(demo, prompt, full, stop)
        assert want is not None
        for strategy, options in strategies:  # speculative: several tokens per step, the row cut inside them
            out = jspec.decode(demo, [prompt, prompt], strategy, max_new_tokens=budget, stop=stop, **options)
            assert out.sequences() == [full[:want]] * 2, (stop, strategy)
            assert out.finish_reasons() == ["stop_string"] * 2
            assert out.text == [demo.tokenizer.decode(full[:want])] * 2
            assert any(s in out.text[0] for s in stop)
    streamed = jspec.stream(demo, [prompt], max_new_tokens=budget, stop=cases[0])
    tokens = [token for step in streamed for token in step[0]]
    assert tokens == full[: _transformers_stop(demo, prompt, full, cases[0])]
    assert streamed.output.finish_reasons() == ["stop_string"]


# --- num_samples --------------------------------------------------------------------------------------------


def test_num_samples_rows_differ_reproduce_and_group_per_prompt():
    model = tiny_model("llama")
    prompts = [[5, 17, 3], [9, 2, 44, 61]]
    first = jspec.decode(model, prompts, "sample", max_new_tokens=12, key=7, num_samples=3)
    again = jspec.decode(model, prompts, "sample", max_new_tokens=12, key=7, num_samples=3)
    assert first.sequences() == again.sequences()
    assert len(first.sequences()) == 6
    for group in (first.sequences()[:3], first.sequences()[3:]):
        assert len({tuple(seq) for seq in group}) == 3  # the samples of a prompt differ
    greedy = jspec.decode(model, prompts, max_new_tokens=12, num_samples=2).sequences()
    alone = jspec.decode(model, prompts, max_new_tokens=12).sequences()
    assert greedy == [alone[0], alone[0], alone[1], alone[1]]  # rows grouped per prompt, prompt 0 first


# --- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, name",
    [
        (dict(strategy="beam_search", num_beams=0), "num_beams"),
        (dict(strategy="beam_search", num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (dict(strategy="beam_search", early_stopping="sometimes"), "early_stopping"),
        (dict(strategy="beam_search", length_penalty="long"), "length_penalty"),
        (dict(strategy="beam_search", num_samples=2), "num_samples"),
        (dict(num_samples=0), "num_samples"),
        (dict(num_samples=1.5), "num_samples"),
        (dict(stop=[""]), "stop"),
        (dict(stop=["ok", 3]), "stop"),
        (dict(stop="\n"), "stop"),  # the tiny model has no tokenizer
    ],
)
def test_bad_values_raise_naming_the_argument(options, name):
    model = tiny_model("llama")
    options = dict(options)
    with pytest.raises(ArgumentError, match=f"^{name}"):
        jspec.decode(model, TINY_PROMPTS, options.pop("strategy", "greedy"), max_new_tokens=4, **options)


def test_stop_string_errors_with_a_tokenizer(demo):
    with pytest.raises(ArgumentError, match="^stop"):
        jspec.decode(demo, ["x"], max_new_tokens=2, stop=[""])
    with pytest.raises(ArgumentError, match="^stop: beam_search"):
        jspec.decode(demo, ["x"], "beam_search", max_new_tokens=2, stop=["\n"])
    with pytest.raises(ArgumentError, match="^strategy"):
        jspec.stream(demo, ["x"], "beam_search", max_new_tokens=2)
