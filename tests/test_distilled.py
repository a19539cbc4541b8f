"""The distilled training source (jspec.train.distilled): a teacher's continuations of training prefixes,
deterministic, cached in the run directory, and built from the training split only."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

import jspec
from jspec.train import TrainConfig, corpus, data, distilled
from jspec.train.trainer import prepare_data
from conftest import tiny_model
from test_train import make_corpus_root

decode_module = importlib.import_module("jspec.decode")
SEQ_LEN, PREFIX = 24, 8
SPEC = distilled.DistillSpec(teacher="unused", prefix_tokens=PREFIX, num_sequences=6, seed=3, batch_rows=4)


@pytest.fixture(scope="module")
def teacher() -> jspec.Model:
    return tiny_model(vocab_size=320)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> dict:
    return corpus.build_manifest(make_corpus_root(tmp_path_factory.mktemp("stdlib")), heldout_fraction=0.2)


def test_distill_spec_rejects_bad_fields_by_name():
    with pytest.raises(ValueError, match=r"distill: unknown field\(s\) \['prefix'\]"):
        distilled.DistillSpec.from_dict({"prefix": 8})
    with pytest.raises(ValueError, match="distill.num_sequences"):
        distilled.DistillSpec.from_dict({"num_sequences": 0})
    with pytest.raises(ValueError, match="distill.temperature"):
        distilled.DistillSpec.from_dict({"temperature": -1.0})
    with pytest.raises(ValueError, match="distill.prefix_tokens: expected fewer than seq_len=24"):
        distilled.DistillSpec.from_dict({"prefix_tokens": 24}).continuation_tokens(SEQ_LEN)
    with pytest.raises(ValueError, match="distill: needs dataset 'stdlib'"):
        TrainConfig(dataset="digits", distill={})


def test_distilled_stream_is_the_teachers_greedy_continuations_deterministic_and_cached(teacher, tmp_path):
    train_stream = np.random.default_rng(0).integers(1, 320, size=500).astype(np.int32)
    logs: list[str] = []
    stream = distilled.distilled_stream(train_stream, SEQ_LEN, SPEC, 0, tmp_path / "a", teacher, logs.append)
    examples = stream[:-1].reshape(SPEC.num_sequences, SEQ_LEN)
    assert stream[-1] == 0 and stream.dtype == np.int32
    offsets = distilled.prefix_offsets(len(train_stream), SPEC)
    for row, offset in zip(examples, offsets):  # every prefix is a slice of the training stream
        np.testing.assert_array_equal(row[:PREFIX], train_stream[offset : offset + PREFIX])
    greedy = jspec.decode(teacher, examples[:, :PREFIX], "greedy", max_new_tokens=SEQ_LEN - PREFIX, stop_tokens=[])
    np.testing.assert_array_equal(examples[:, PREFIX:], np.asarray(greedy.tokens))  # the last chunk was padded: same rows
    # Deterministic (a fresh run directory decodes again to the same stream) and cached (the same directory reuses it).
    np.testing.assert_array_equal(distilled.distilled_stream(train_stream, SEQ_LEN, SPEC, 0, tmp_path / "b", teacher, logs.append), stream)
    np.testing.assert_array_equal(distilled.distilled_stream(train_stream, SEQ_LEN, SPEC, 0, tmp_path / "a", teacher, logs.append), stream)
    assert logs[-1].startswith("distill: reusing")
    # The trainer's packed windows at the default stride: one example in each window's first seq_len tokens.
    batches = data.PackedBatches(stream, SEQ_LEN, batch_size=SPEC.num_sequences, seed=0)
    assert batches.num_windows == SPEC.num_sequences
    assert sorted(map(tuple, batches.batch(0)[:, :SEQ_LEN])) == sorted(map(tuple, examples))


def test_prepare_data_distills_from_the_training_split_only(manifest, teacher, tmp_path, monkeypatch):
    teacher_dir = jspec.save(teacher, tmp_path / "teacher")
    corpus.save_manifest(manifest, tmp_path / "manifest.json")
    config = TrainConfig(
        corpus_manifest=str(tmp_path / "manifest.json"), heldout_fraction=0.2, tokenizer_vocab_size=300, seq_len=SEQ_LEN,
        cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "run"),
        distill={"teacher": str(teacher_dir), "prefix_tokens": PREFIX, "num_sequences": 6, "batch_rows": 4, "seed": 3},
    )
    seen = []
    build = distilled.distilled_stream
    monkeypatch.setattr(distilled, "distilled_stream", lambda stream, *a, **k: seen.append(np.array(stream)) or build(stream, *a, **k))
    prepared = prepare_data(config, log=lambda line: None)
    heldout = data.tokenize_documents(prepared.tokenizer, corpus.load_documents(manifest, "heldout"))
    train = data.tokenize_documents(prepared.tokenizer, corpus.load_documents(manifest, "train"))
    assert len(seen) == 1 and np.array_equal(seen[0], train)  # the distilled source's only data input
    np.testing.assert_array_equal(prepared.heldout_stream, heldout)  # evaluation stays on the real held-out text
    examples = prepared.train_stream[:-1].reshape(6, SEQ_LEN)
    offsets = distilled.prefix_offsets(len(train), distilled.DistillSpec.from_dict(config.distill))
    for row, offset in zip(examples, offsets):
        np.testing.assert_array_equal(row[:PREFIX], train[offset : offset + PREFIX])
    assert prepared.corpus_summary["distilled"]["teacher_tokens"] == 6 * (SEQ_LEN - PREFIX)
