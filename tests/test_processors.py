"""Logit processors and log-probabilities: equal to transformers' (greedy tokens, transition scores, the processed
and warped distribution at every step), kept by speculative decoding (greedy token-identical, sampling
distribution-identical), and bad values raise errors naming the option."""

from __future__ import annotations

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jspec  # noqa: E402
from conftest import tiny_model  # noqa: E402
from jspec.checkpoint.hf import save_hf  # noqa: E402
from transformers.generation import logits_process as hf_process  # noqa: E402

torch.set_num_threads(1)

FP32_TOLERANCE = 1e-4  # log-probabilities, fp32 (differences seen: ~1e-6)
SIGNIFICANCE = 1e-3
PROMPTS = [[5, 17, 3, 17, 5, 9, 17], [9, 2, 44, 2, 9, 2]]
NEW_TOKENS = 12
PENALTIES = dict(repetition_penalty=1.4, presence_penalty=0.6, frequency_penalty=0.4, logit_bias={3: 1.5, 40: -2.0},
                 no_repeat_ngram_size=2)


class PresenceFrequencyPenalty(hf_process.LogitsProcessor):
    """OpenAI / vLLM presence and frequency penalties over the generated tokens (transformers has none)."""

    def __init__(self, prompt_length: int, presence: float, frequency: float):
        self.prompt_length, self.presence, self.frequency = prompt_length, presence, frequency

    def __call__(self, input_ids, scores):
        generated = input_ids[:, self.prompt_length:]
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def hf_processors(prompt_length: int, options: dict, stop: int | None, sampling: dict | None = None):
    """transformers' processors for these options in its own order (`_get_logits_processor`), presence/frequency
    after the repetition penalty (they commute with the -inf processors after them), then the warpers."""
    processors = hf_process.LogitsProcessorList([
        hf_process.SequenceBiasLogitsProcessor({(t,): b for t, b in options["logit_bias"].items()}),
        hf_process.RepetitionPenaltyLogitsProcessor(options["repetition_penalty"]),
        PresenceFrequencyPenalty(prompt_length, options["presence_penalty"], options["frequency_penalty"]),
        hf_process.NoRepeatNGramLogitsProcessor(options["no_repeat_ngram_size"]),
    ])
    if options.get("min_new_tokens"):
        processors.append(hf_process.MinNewTokensLengthLogitsProcessor(prompt_length, options["min_new_tokens"], stop))
    if sampling:
        processors.append(hf_process.TemperatureLogitsWarper(sampling["temperature"]))
        processors.append(hf_process.TopKLogitsWarper(sampling["top_k"]))
    return processors


def hf_step_logprobs(hf_model, prompt: list[int], tokens: list[int], processors) -> np.ndarray:
    """[len(tokens), V]: transformers' processed (and warped) log-softmax before each of `tokens`."""
    sequence = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = hf_model(sequence).logits[0].float()
    rows = []
    for step in range(len(tokens)):
        prefix = sequence[:, : len(prompt) + step]
        scores = processors(prefix, logits[len(prompt) + step - 1][None].clone())
        rows.append(torch.log_softmax(scores, dim=-1)[0].numpy())
    return np.stack(rows)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def models(request, tmp_path_factory):
    model = tiny_model(request.param, seed=2, num_layers=2)
    directory = save_hf(model, tmp_path_factory.mktemp(request.param) / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    hf_model.generation_config.eos_token_id = None
    return model, hf_model


def full_distribution(out, row: int, step: int, vocab: int) -> np.ndarray:
    """The whole distribution of a step from top_logprobs with k = vocab (-inf where filtered)."""
    table = np.full(vocab, -np.inf)
    table[out.top_tokens[row, step]] = out.top_logprobs[row, step]
    return table


def test_greedy_with_processors_equals_transformers_generate(models):
    model, hf_model = models
    vocab = model.config.vocab_size
    plain = jspec.decode(model, PROMPTS, max_new_tokens=NEW_TOKENS, stop_tokens=[])
    stop = int(plain.tokens[0, 1])  # a token greedy emits early: min_new_tokens must hold it back
    options = dict(PENALTIES, min_new_tokens=4)
    out = jspec.decode(model, PROMPTS, max_new_tokens=NEW_TOKENS, stop_tokens=[stop], logprobs=vocab, **options)
    for row, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            hf = hf_model.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), do_sample=False,
                max_new_tokens=NEW_TOKENS, eos_token_id=stop, pad_token_id=stop,
                repetition_penalty=options["repetition_penalty"], no_repeat_ngram_size=options["no_repeat_ngram_size"],
                min_new_tokens=options["min_new_tokens"], sequence_bias={(t,): b for t, b in options["logit_bias"].items()},
                logits_processor=[PresenceFrequencyPenalty(len(prompt), options["presence_penalty"], options["frequency_penalty"])],
                output_scores=True, output_logits=True, return_dict_in_generate=True)
        want = hf.sequences[0, len(prompt):].tolist()
        got = out.sequences()[row]
        assert got == want
        length = len(got)
        transition = hf_model.compute_transition_scores(hf.sequences, hf.scores, normalize_logits=True)[0].numpy()
        np.testing.assert_allclose(out.logprobs[row, :length], transition, atol=FP32_TOLERANCE)
        raw = torch.log_softmax(torch.stack(hf.logits)[:, 0].float(), dim=-1).numpy()[np.arange(length), got]
        np.testing.assert_allclose(out.raw_logprobs[row, :length], raw, atol=FP32_TOLERANCE)
        assert np.all(np.isnan(out.logprobs[row, length:])) and np.all(out.top_tokens[row, length:] == -1)
        processed = hf_step_logprobs(hf_model, prompt, got, hf_processors(len(prompt), options, stop))
        for step in range(length):  # the whole processed log-softmax, banned tokens (-inf) included
            np.testing.assert_allclose(full_distribution(out, row, step, vocab), processed[step], atol=FP32_TOLERANCE)
    assert np.isneginf(full_distribution(out, 0, 0, vocab)[stop])  # min_new_tokens holds the stop token back


def test_sampling_logprobs_and_warped_distribution_equal_transformers(models):
    """The tokens jspec samples, scored by transformers' processors and warpers: the chosen tokens' logprobs
    equal, and so does the whole warped distribution at every step (top-k leaves -inf at the same tokens)."""
    model, hf_model = models
    vocab = model.config.vocab_size
    sampling = dict(temperature=0.7, top_k=6)
    out = jspec.decode(model, PROMPTS, "sample", max_new_tokens=NEW_TOKENS, stop_tokens=[], key=5, logprobs=vocab,
                       **sampling, **PENALTIES)
    for row, prompt in enumerate(PROMPTS):
        tokens = out.sequences()[row]
        warped = hf_step_logprobs(hf_model, prompt, tokens, hf_processors(len(prompt), PENALTIES, None, sampling))
        np.testing.assert_allclose(out.logprobs[row], warped[np.arange(NEW_TOKENS), tokens], atol=FP32_TOLERANCE)
        for step in range(NEW_TOKENS):
            np.testing.assert_allclose(full_distribution(out, row, step, vocab), warped[step], atol=FP32_TOLERANCE)
        assert np.all(np.isfinite(warped[:, :]).sum(axis=1) == sampling["top_k"])


# --- speculative decoding keeps the processors ------------------------------------------------------------

SPECULATIVE = {
    "chain-draft": lambda draft: ("speculative", dict(draft=draft, num_draft_tokens=3)),
    "tree-draft": lambda draft: ("speculative", dict(draft=draft, tree=(2, 2, 1))),
    "prompt-lookup": lambda draft: ("prompt_lookup", dict(num_draft_tokens=4, max_ngram=2)),
}
SPEC_PROMPTS = PROMPTS + [[1], [88, 3, 3, 3, 3, 3], [70, 71, 72, 73, 74, 70, 71]]


@pytest.fixture(scope="module")
def pair():
    return tiny_model("llama", seed=0, num_layers=3), tiny_model("llama", seed=1, num_layers=1)


@pytest.fixture(scope="module")
def autoregressive_reference(pair):
    return jspec.decode(pair[0], SPEC_PROMPTS, max_new_tokens=14, stop_tokens=[4], logprobs=3, min_new_tokens=3,
                        **PENALTIES)


@pytest.mark.parametrize("name", sorted(SPECULATIVE))
def test_speculative_greedy_with_processors_equals_autoregressive(pair, autoregressive_reference, name):
    target, draft = pair
    strategy, options = SPECULATIVE[name](draft)
    want = autoregressive_reference
    got = jspec.decode(target, SPEC_PROMPTS, strategy, max_new_tokens=14, stop_tokens=[4], logprobs=3,
                       min_new_tokens=3, **PENALTIES, **options)
    assert got.sequences() == want.sequences() and got.finish_reasons() == want.finish_reasons()
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=FP32_TOLERANCE)  # NaN past the lengths in both
    np.testing.assert_allclose(got.top_logprobs, want.top_logprobs, atol=FP32_TOLERANCE)
    np.testing.assert_allclose(got.raw_logprobs, want.raw_logprobs, atol=FP32_TOLERANCE)


TOY_VOCAB = 6
SAMPLES = 20_000
TOY_PENALTIES = dict(repetition_penalty=2.5, presence_penalty=1.0, frequency_penalty=0.5, logit_bias={0: 1.0})


def _joint_counts(out) -> dict[tuple, int]:
    counts: dict[tuple, int] = {}
    for row in map(tuple, np.asarray(out.tokens)):
        counts[row] = counts.get(row, 0) + 1
    return counts


def _two_sample_p_value(a: dict, b: dict) -> float:
    from scipy.stats import chi2_contingency

    cells = sorted(set(a) | set(b))
    table = np.array([[a.get(c, 0) for c in cells], [b.get(c, 0) for c in cells]], np.float64)
    sparse = table.sum(axis=0) < 10  # pool sparse cells so the chi-square approximation holds
    table = np.concatenate([table[:, ~sparse], table[:, sparse].sum(axis=1, keepdims=True)], axis=1)
    return float(chi2_contingency(table).pvalue)


@pytest.mark.slow
def test_speculative_sampling_with_processors_matches_autoregressive():
    """The first three tokens of speculative sampling (a draft model chain) with penalties are distributed as
    autoregressive sampling's with the same penalties (two-sample chi-square); the test has power: autoregressive
    sampling without the penalties is told apart."""
    target = tiny_model("llama", seed=3, vocab_size=TOY_VOCAB, init_scale=0.5)
    draft = tiny_model("llama", seed=4, vocab_size=TOY_VOCAB, init_scale=0.5, num_layers=1)
    prompts = [[1, 2, 1]] * SAMPLES
    run = lambda strategy, seed, **options: _joint_counts(jspec.decode(  # noqa: E731
        target, prompts, strategy, max_new_tokens=3, stop_tokens=[], key=seed, temperature=1.0, **options))
    speculative = run("speculative", 1, draft=draft, num_draft_tokens=3, **TOY_PENALTIES)
    autoregressive = run("sample", 2, **TOY_PENALTIES)
    unpenalized = run("sample", 3)
    assert _two_sample_p_value(speculative, autoregressive) > SIGNIFICANCE
    assert _two_sample_p_value(speculative, unpenalized) < SIGNIFICANCE


# --- bad values ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "strategy, options, message",
    [
        ("greedy", dict(repetition_penalty=0.0), "repetition_penalty"),
        ("greedy", dict(repetition_penalty=-1.2), "repetition_penalty"),
        ("sample", dict(presence_penalty=3.0), "presence_penalty"),
        ("greedy", dict(frequency_penalty="high"), "frequency_penalty"),
        ("greedy", dict(logit_bias={97: 1.0}), "logit_bias: token id 97"),
        ("greedy", dict(logit_bias={-1: 1.0}), "logit_bias"),
        ("greedy", dict(logit_bias={3: float("nan")}), "logit_bias"),
        ("greedy", dict(logit_bias=[{3: 1.0}] * 3), "logit_bias"),
        ("greedy", dict(min_new_tokens=-1), "min_new_tokens"),
        ("greedy", dict(min_new_tokens=1.5), "min_new_tokens"),
        ("greedy", dict(no_repeat_ngram_size=-2), "no_repeat_ngram_size"),
        ("greedy", dict(logprobs=-1), "logprobs"),
        ("greedy", dict(logprobs=98), "logprobs"),
        ("greedy", dict(logprobs=True), "logprobs"),
        ("prompt_lookup", dict(repetition_penalty=[1.0, 0.0]), "repetition_penalty"),
        ("dllm_static", dict(logprobs=2), "logprobs: not defined for strategy 'dllm_static'"),
        ("dllm_static", dict(repetition_penalty=1.2), "repetition_penalty: not defined"),
    ],
)
def test_bad_values_raise_errors_naming_the_option(strategy, options, message):
    model = tiny_model("llama")
    with pytest.raises(jspec.ArgumentError, match=message):
        jspec.decode(model, PROMPTS, strategy, max_new_tokens=4, **options)


def test_per_row_values_and_a_strategy_object():
    """Per-row penalties act on their own rows only; generation options also set a strategy object's."""
    model = tiny_model("llama")
    plain = jspec.decode(model, PROMPTS, max_new_tokens=8, stop_tokens=[], logprobs=0)
    per_row = jspec.decode(model, PROMPTS, jspec.Autoregressive(), max_new_tokens=8, stop_tokens=[], logprobs=0,
                           repetition_penalty=[1.0, 3.0], logit_bias=[{}, {int(plain.tokens[1, 0]): -50.0}])
    assert per_row.sequences()[0] == plain.sequences()[0] and per_row.sequences()[1] != plain.sequences()[1]
    assert per_row.top_tokens.shape == (2, 8, 0)
    jax.clear_caches()


def test_speculative_with_processors_equals_autoregressive_in_bfloat16():
    """The lossless claim with processors holds in bfloat16 too (the demo pair cast to it)."""
    target, draft = jspec.load("demo-code", dtype="bfloat16"), jspec.load("demo-code-draft", dtype="bfloat16")
    prompts = ["def fib(n):", "class Stack:\n    def push(self, item):", "import os\n"]
    options = dict(repetition_penalty=1.3, no_repeat_ngram_size=3, logit_bias={13: -1.0}, logprobs=1)
    want = jspec.decode(target, prompts, max_new_tokens=24, **options)
    for strategy, extra in [("speculative", dict(draft=draft, num_draft_tokens=3)), ("prompt_lookup", {})]:
        got = jspec.decode(target, prompts, strategy, max_new_tokens=24, **options, **extra)
        np.testing.assert_array_equal(got.tokens, want.tokens)
        # a verify forward over several tokens rounds differently from one-token forwards in bfloat16: the
        # log-probabilities agree to bfloat16 rounding (measured max 1.3e-3), not to float32's 1e-5
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=5e-3)
