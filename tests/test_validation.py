"""The validation layer: every bad argument of every public entry point and registered strategy fails before
tracing with an `ArgumentError` (a ValueError and a TypeError) whose message names the argument; bounds fail
fast; cache_size is honoured or refused with a reason."""

from __future__ import annotations

import time

import numpy as np
import pytest

import jspec
from conftest import tiny_model
from jspec.validation import ArgumentError

PROMPTS = [[5, 17, 3], [9, 2, 44, 61, 7]]
DRAFT = {"draft": "DRAFT"}  # replaced by a draft model in the test

# (strategy, options, the argument the message must name)
BAD_OPTIONS = [
    ("sample", dict(temperature="0.8"), "temperature"),
    ("sample", dict(temperature=-1.0), "temperature"),
    ("sample", dict(temperature=[0.5, 0.5, 0.5]), "temperature"),
    ("sample", dict(top_k=2.5), "top_k"),
    ("sample", dict(top_p=0.0), "top_p"),
    ("sample", dict(min_p=True), "min_p"),
    ("speculative", dict(DRAFT, num_draft_tokens=2.5), "num_draft_tokens"),
    ("speculative", dict(DRAFT, num_draft_tokens=0), "num_draft_tokens"),
    ("speculative", dict(DRAFT, num_draft_tokens=1000), "num_draft_tokens"),
    ("speculative", dict(DRAFT, tree=(100, 100)), "tree"),
    ("speculative", dict(DRAFT, tree=3), "tree"),
    ("speculative", dict(DRAFT, tree=(2, 0)), "tree"),
    ("speculative", dict(DRAFT, tree_parents=(-1, 5)), "tree"),
    ("speculative", dict(DRAFT, adaptive="yes"), "adaptive"),
    ("speculative", dict(draft="demo-code-draft"), "draft"),
    ("speculative", dict(DRAFT, temperature="hot"), "temperature"),
    ("self_speculative", dict(skip_layers=1), "skip_layers"),
    ("self_speculative", dict(skip_layers=(5,)), "skip_layers"),
    ("self_speculative", dict(skip_layers=(0.5,)), "skip_layers"),
    ("prompt_lookup", dict(max_ngram=0), "max_ngram"),
    ("prompt_lookup", dict(max_ngram=1000), "max_ngram"),
    ("prompt_lookup", dict(num_draft_tokens=-1), "num_draft_tokens"),
    ("prompt_lookup", dict(unknown_option=1), "unknown_option"),
    ("dllm_static", dict(block_size=2.0), "block_size"),
    ("dllm_static", dict(temperature="0", block_size=4), "temperature"),
    ("dllm_threshold", dict(threshold="0.9", block_size=4), "threshold"),
    ("dllm_threshold", dict(threshold=1.5, block_size=4), "threshold"),
    ("dllm_threshold", dict(cache="everything", block_size=4), "cache"),
    ("freedave", dict(draft_steps=0, block_size=4), "draft_steps"),
    ("block_diffusion", dict(sub_block_size=3), "sub_block_size"),
    ("block_diffusion", dict(threshold=[0.9]), "threshold"),
]


def _model_for(strategy: str) -> jspec.Model:
    if strategy in ("dllm_static", "dllm_threshold", "freedave"):
        return tiny_model("llama", vocab_size=98, mask_token_id=97, diffusion="masked")
    if strategy == "block_diffusion":
        return tiny_model("llama", vocab_size=98, mask_token_id=97, diffusion="block", diffusion_block_size=8,
                          shifted_logits=True)
    return tiny_model("llama")


@pytest.mark.parametrize("strategy, options, argument", BAD_OPTIONS)
@pytest.mark.parametrize("entry", ["decode", "stream"])
def test_bad_strategy_options_name_the_argument(entry, strategy, options, argument):
    model = _model_for(strategy)
    options = {k: (tiny_model("llama", seed=1, num_layers=1) if v == "DRAFT" else v) for k, v in options.items()}
    call = jspec.decode if entry == "decode" else jspec.stream
    with pytest.raises(ValueError) as error:
        call(model, PROMPTS, strategy, max_new_tokens=8, stop_tokens=[], **options)
    assert isinstance(error.value, ArgumentError)
    assert argument in str(error.value)


BAD_DECODE = [
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(max_new_tokens="8"), "max_new_tokens"),
    (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(max_new_tokens=10**9), "max_new_tokens"),
    (dict(max_new_tokens=4096), "max_position_embeddings"),
    (dict(stop_tokens=1.5), "stop_tokens"),
    (dict(stop_tokens="\n"), "stop_tokens"),
    (dict(stop_tokens=[500]), "stop_tokens"),
    (dict(cache_size=0), "cache_size"),
    (dict(cache_size=12.0), "cache_size"),
    (dict(cache_size=4), "cache_size"),  # shorter than the longest prompt
    (dict(cache_size=10**12), "cache_size"),  # does not fit in memory: refused before allocating
    (dict(key="seed"), "key"),
    (dict(prompts=[[5, 1000]]), "prompts"),
    (dict(prompts=[]), "prompts"),
    (dict(prompts=[[]]), "prompts"),
    (dict(prompts=3.5), "prompts"),
    (dict(strategy="beam"), "strategy"),
]


@pytest.mark.parametrize("kwargs, argument", BAD_DECODE)
@pytest.mark.parametrize("entry", ["decode", "stream"])
def test_bad_decode_arguments_name_the_argument(entry, kwargs, argument):
    model = tiny_model("llama")
    call = jspec.decode if entry == "decode" else jspec.stream
    arguments = dict(prompts=PROMPTS, max_new_tokens=8)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=argument):
        call(model, arguments.pop("prompts"), arguments.pop("strategy", "greedy"), **arguments)


@pytest.mark.parametrize("strategy, options", [
    ("speculative", dict(num_draft_tokens=1000)),
    ("speculative", dict(tree=(100, 100))),
    ("greedy", dict(max_new_tokens=10**9)),
    ("greedy", dict(max_new_tokens=10**6)),
])
def test_over_large_requests_fail_fast(strategy, options):
    model = tiny_model("llama")
    options = dict(options)
    if strategy == "speculative":
        options["draft"] = tiny_model("llama", seed=1, num_layers=1)
    max_new_tokens = options.pop("max_new_tokens", 8)
    start = time.perf_counter()
    with pytest.raises(ValueError):
        jspec.decode(model, PROMPTS, strategy, max_new_tokens=max_new_tokens, **options)
    assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize("strategy, options", [
    ("greedy", {}),
    ("sample", {}),
    ("speculative", dict(num_draft_tokens=3)),
    ("speculative", dict(tree=(2, 2))),
    ("prompt_lookup", dict(num_draft_tokens=3)),
    ("self_speculative", dict(skip_layers=(1,), num_draft_tokens=2)),
])
@pytest.mark.parametrize("cache_size", [9, 20])
def test_a_small_cache_finishes_rows_with_cache_full(strategy, options, cache_size):
    """A cache smaller than the padded prompts plus the draft (9) or filling up during decoding (20): rows end with
    finish reason cache_full, never a crash, and what they emitted is the greedy prefix."""
    model = tiny_model("llama")
    if strategy == "speculative":
        options = dict(options, draft=tiny_model("llama", seed=1, num_layers=1))
    out = jspec.decode(model, PROMPTS, strategy, max_new_tokens=32, cache_size=cache_size, stop_tokens=[], **options)
    assert set(out.finish_reasons()) == {"cache_full"}
    if strategy != "sample":
        full = jspec.decode(model, PROMPTS, max_new_tokens=32, stop_tokens=[]).sequences()
        for row, want in zip(out.sequences(), full):
            assert row == want[: len(row)] and len(row) >= 1


@pytest.mark.parametrize("strategy", ["dllm_static", "dllm_threshold", "freedave", "block_diffusion"])
def test_diffusion_strategies_refuse_cache_size_with_a_reason(strategy):
    options = {} if strategy == "block_diffusion" else dict(block_size=4)
    with pytest.raises(ValueError, match="cache_size: strategy .* sizes its own cache"):
        jspec.decode(_model_for(strategy), PROMPTS, strategy, max_new_tokens=8, cache_size=8, **options)


@pytest.mark.parametrize("call, argument", [
    (lambda: jspec.load(123), "name_or_path"),
    (lambda: jspec.load("random:random-tiny", dtype="float64"), "dtype"),
    (lambda: jspec.load("no-such-model"), "name_or_path"),
])
def test_bad_load_arguments_name_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


def test_a_garbage_tokenizer_json_is_a_clear_error(tmp_path):
    from jspec.tokenizer import HFTokenizer
    from jspec.train.data import load_tokenizer

    garbage = tmp_path / "tokenizer.json"
    garbage.write_text('{"model": 1')
    for read in (load_tokenizer, HFTokenizer.from_file):
        with pytest.raises(ValueError, match="tokenizer.json"):
            read(garbage)


def test_argument_error_is_both_value_and_type_error():
    with pytest.raises(TypeError, match="max_new_tokens"):
        jspec.decode(tiny_model("llama"), PROMPTS, max_new_tokens="8")
    assert issubclass(ArgumentError, ValueError)


def test_shape_buckets_bound_the_number_of_compiles():
    """Prompt lengths 5, 17, 30, 60 fall in width buckets 16, 32, 32, 64; batches 1, 3, 5 in 1, 4, 8; max_new_tokens
    9 and 16 share the output bucket 16. decode and stream (its init, step, done and output) compile as predicted,
    and bucketing changes no token."""
    from jspec.decode import trace_count

    model = tiny_model("llama", seed=3)
    rng = np.random.default_rng(0)
    jspec.decode(model, [[1, 2]], max_new_tokens=16, stop_tokens=[])  # warm: width 16, batch 1, output 16
    before = trace_count()
    for length in (5, 17, 30, 60):
        jspec.decode(model, [list(rng.integers(0, 97, length))], max_new_tokens=9, stop_tokens=[])
    assert trace_count() - before == 2  # widths 32 and 64 are new; 16 (and output 16 for 9 tokens) is cached
    before = trace_count()
    for batch in (1, 3, 5, 4, 8, 6):
        out = jspec.decode(model, [[1, 2, 3]] * batch, max_new_tokens=12, stop_tokens=[])
        assert len(out.sequences()) == batch and all(len(row) == 12 for row in out.sequences())
    assert trace_count() - before == 2  # batch buckets 4 and 8 are new
    before = trace_count()
    for _ in jspec.stream(model, [[1, 2, 3]] * 3, max_new_tokens=5, stop_tokens=[]):
        pass
    for _ in jspec.stream(model, [[4, 5]] * 4, max_new_tokens=7, stop_tokens=[]):
        pass
    assert trace_count() - before == 4  # one stream program each of init, step, done, output; the second reuses

    prompts = [list(rng.integers(0, 97, n)) for n in (3, 9, 20)]
    bucketed = jspec.decode(model, prompts, max_new_tokens=11, stop_tokens=[38])
    for prompt, row, reason in zip(prompts, bucketed.sequences(), bucketed.finish_reasons()):
        alone = jspec.decode(model, [prompt], max_new_tokens=11, stop_tokens=[38])
        assert row == alone.sequences()[0] and reason == alone.finish_reasons()[0]
        assert len(row) <= 11


def test_persistent_compilation_cache_serves_a_second_process(tmp_path):
    """With jspec.enable_compilation_cache(dir), a second process running the same decode writes no new entry."""
    import os
    import subprocess
    import sys

    script = (
        "import jspec; jspec.enable_compilation_cache({!r}); "
        "m = jspec.load('random:random-tiny'); "
        "print(jspec.decode(m, [[1, 2, 3]], max_new_tokens=4, stop_tokens=[]).sequences())"
    ).format(str(tmp_path / "cache"))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    outputs, entries = [], []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(done.stdout)
        entries.append(sorted(p.name for p in (tmp_path / "cache").iterdir()))
    assert entries[0] and entries[1] == entries[0] and outputs[1] == outputs[0]


@pytest.mark.parametrize("strategy", ["sample", "speculative"])
def test_per_row_options_of_a_padded_batch_apply_to_the_callers_rows(strategy):
    """3 rows pad to a batch bucket of 4: one temperature per caller row is accepted, and each row decodes as it
    does alone with its own temperature (same key: the padding row changes no draw)."""
    model = tiny_model("llama")
    options = {"draft": tiny_model("llama", seed=1, num_layers=1)} if strategy == "speculative" else {}
    prompts, temperatures = [[1, 2], [3], [4, 5, 6]], [0.0, 0.7, 1.3]
    out = jspec.decode(model, prompts, strategy, max_new_tokens=6, stop_tokens=[], key=4, temperature=temperatures,
                       **options)
    padded = jspec.decode(model, prompts + [[7]], strategy, max_new_tokens=6, stop_tokens=[], key=4,
                          temperature=temperatures + [0.5], **options)
    assert out.sequences() == padded.sequences()[:3]
    with pytest.raises(ValueError, match="temperature: expected a scalar or 3 values"):
        jspec.decode(model, prompts, strategy, max_new_tokens=6, temperature=[0.5] * 4, **options)


def test_a_cache_larger_than_the_device_memory_is_refused_before_allocating(monkeypatch):
    """The cache's size is checked from shapes before anything is allocated: over 90% of the device's memory, the
    call fails naming cache_size, with the GiB it needs; the figure is remembered per shape (a second call does
    not trace the cache again) and another shape is checked on its own."""
    import importlib

    decode = importlib.import_module("jspec.decode")
    model = tiny_model("llama")
    jspec.decode(model, PROMPTS, max_new_tokens=4)  # fits: its size is remembered
    traced, eval_shape = [], decode.jax.eval_shape
    monkeypatch.setattr(decode.jax, "eval_shape", lambda *args: traced.append(1) or eval_shape(*args))
    monkeypatch.setattr(decode, "_device_memory_bytes", lambda: 1024)  # 1 KiB: less than any cache
    for _ in range(2):
        with pytest.raises(ArgumentError, match=r"cache_size: a cache of \d+ slots for 2 rows needs .* GiB per device"):
            jspec.decode(model, PROMPTS, max_new_tokens=4)
    assert not traced  # remembered from the first call
    monkeypatch.setattr(decode, "_device_memory_bytes", lambda: 1 << 40)
    jspec.decode(model, PROMPTS[:1], max_new_tokens=3, cache_size=53)  # a shape no other test makes: traced once
    assert len(traced) == 1
