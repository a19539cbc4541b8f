"""The training pipeline: corpus manifest and split, tokenizer, packed batches, objectives, the trainer
(loss goes down; resume continues exactly), and the `jspec train` command."""

from __future__ import annotations

import json
import random
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jspec
from jspec.checkpoint import orbax_store
from jspec.train import TrainConfig, corpus, data, objectives, train
from jspec.train import trainer as trainer_lib
from jspec.train.trainer import PreparedData

WORDS = ["value", "index", "result", "items", "name", "path", "count", "self", "node", "token", "size", "data"]


def _fake_module(rng: random.Random, number: int) -> str:
    lines = [f'"""Module {number}: généré — ✓ データ."""', "import os", ""]
    for f in range(rng.randint(3, 8)):
        args = ", ".join(rng.sample(WORDS, rng.randint(1, 3)))
        lines.append(f"def {rng.choice(WORDS)}_{f}({args}):")
        for _ in range(rng.randint(2, 5)):
            a, b = rng.sample(WORDS, 2)
            lines.append(f"    {a} = {b} + {rng.randint(0, 99)}")
        lines.append(f"    return {rng.choice(WORDS)}\n")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory) -> Path:
    return make_corpus_root(tmp_path_factory.mktemp("stdlib"))


def make_corpus_root(root: Path) -> Path:
    """A small source tree shaped like the stdlib: packages, a test directory and site-packages to skip."""
    rng = random.Random(0)
    for number in range(60):
        package = root / f"pkg{number % 4}"
        package.mkdir(parents=True, exist_ok=True)
        (package / f"mod{number}.py").write_text(_fake_module(rng, number), encoding="utf-8")
    for skipped in ("test", "site-packages", "pkg1/tests", "__pycache__"):
        (root / skipped).mkdir(parents=True, exist_ok=True)
        (root / skipped / "skipped.py").write_text("x = 1\n")
    (root / "notes.txt").write_text("not python\n")
    return root


@pytest.fixture(scope="module")
def manifest(corpus_root) -> dict:
    return corpus.build_manifest(corpus_root, heldout_fraction=0.2)


@pytest.fixture(scope="module")
def tokenizer(manifest):
    return make_tokenizer(manifest)


@pytest.fixture(scope="module")
def prepared(manifest, tokenizer) -> PreparedData:
    return make_prepared(manifest, tokenizer)


def make_tokenizer(manifest: dict):
    return data.train_tokenizer(corpus.load_documents(manifest, "train"), vocab_size=320, min_frequency=1)


def make_prepared(manifest: dict, tokenizer) -> PreparedData:
    return PreparedData(
        tokenizer=tokenizer,
        manifest=manifest,
        train_stream=data.tokenize_documents(tokenizer, corpus.load_documents(manifest, "train")),
        heldout_stream=data.tokenize_documents(tokenizer, corpus.load_documents(manifest, "heldout")),
    )


# --- corpus --------------------------------------------------------------------------------------------


def test_manifest_lists_sources_and_skips_tests(manifest):
    paths = [f["path"] for f in manifest["files"]]
    assert len(paths) == 60 and paths == sorted(paths)
    assert not any("skipped" in p or p.endswith(".txt") for p in paths)
    assert manifest["python_version"] and manifest["num_files"] == 60
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in manifest["files"])


def test_heldout_split_is_disjoint_deterministic_and_by_file(manifest, corpus_root):
    train_files = set(corpus.iter_files(manifest, "train"))
    heldout_files = set(corpus.iter_files(manifest, "heldout"))
    assert train_files and heldout_files and not train_files & heldout_files
    assert train_files | heldout_files == {f["path"] for f in manifest["files"]}
    again = corpus.build_manifest(corpus_root, heldout_fraction=0.2)
    assert again["digest"] == manifest["digest"] and set(corpus.iter_files(again, "heldout")) == heldout_files
    # A file's split depends on its path only, not on which other files exist.
    assert all(corpus.split_of(p, 0.2) == "heldout" for p in heldout_files)
    train_texts, heldout_texts = corpus.load_documents(manifest, "train"), corpus.load_documents(manifest, "heldout")
    assert not set(train_texts) & set(heldout_texts)


def test_manifest_round_trip_and_verification(manifest, corpus_root, tmp_path):
    corpus.save_manifest(manifest, tmp_path / "m.json")
    assert corpus.load_manifest(tmp_path / "m.json") == manifest
    changed = json.loads(json.dumps(manifest))
    changed["files"][0]["sha256"] = "0" * 64
    with pytest.raises(ValueError, match=f"{changed['files'][0]['path']!r} differs from the manifest"):
        corpus.load_documents(changed, changed["files"][0]["split"])


def test_shipped_manifest_reads_this_stdlib():
    shipped = json.loads((Path(jspec.__file__).parent / "assets" / "demo-code" / "corpus_manifest.json").read_text())
    assert "root" not in shipped and corpus.manifest_root(shipped) == corpus.stdlib_root()
    with pytest.raises(ValueError, match="root: the corpus manifest records no root directory"):
        corpus.manifest_root({"source": "elsewhere", "files": []})


def test_stdlib_manifest():
    manifest = corpus.build_manifest()
    paths = [f["path"] for f in manifest["files"]]
    assert manifest["num_files"] > 100 and manifest["num_heldout_files"] > 0
    assert "os.py" in paths and not any(part in corpus.EXCLUDED_DIRS for p in paths for part in p.split("/")[:-1])


# --- tokenizer -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "def f(x):\n    return x ** 2  # square\n",
        "naïve café — ünïcødé ✓ 日本語テキスト 🚀🐍\r\n\ttabs and  double  spaces ",
        "\x00\x01 control \u200b zero-width \U0010ffff",
        "",
    ],
)
def test_tokenizer_round_trips_exactly(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_tokenizer_is_byte_level_bpe_with_eos(tokenizer, manifest, tmp_path):
    assert tokenizer.vocab_size == 320
    eos = tokenizer.token_to_id(data.EOS_TOKEN)
    assert tokenizer.eos_token_ids == (eos,)
    # Like GPT-2's, the special token's literal text encodes as the token; the round trip stays exact.
    assert tokenizer.encode("<|endoftext|>") == [eos]
    assert tokenizer.decode(tokenizer.encode("a<|endoftext|>b")) == "a<|endoftext|>b"
    assert len(tokenizer.encode("return value")) < len("return value")  # merges learned
    again = data.train_tokenizer(corpus.load_documents(manifest, "train"), vocab_size=320, min_frequency=1)
    assert data.tokenizer_digest(again) == data.tokenizer_digest(tokenizer)  # deterministic
    tokenizer.save(tmp_path / "tokenizer.json")
    assert data.load_tokenizer(tmp_path / "tokenizer.json") == tokenizer


# --- packing -------------------------------------------------------------------------------------------


def test_stream_has_eos_between_documents(tokenizer):
    texts = ["a = 1\n", "b = 2\n"]
    stream = data.tokenize_documents(tokenizer, texts)
    eos = tokenizer.eos_token_ids[0]
    assert list(stream) == tokenizer.encode(texts[0]) + [eos] + tokenizer.encode(texts[1]) + [eos]


def test_packing_is_deterministic_and_covers_each_window_once_per_epoch(prepared):
    stream = prepared.train_stream
    batches = data.PackedBatches(stream, seq_len=16, batch_size=4, seed=3)
    same = data.PackedBatches(stream, seq_len=16, batch_size=4, seed=3)
    other = data.PackedBatches(stream, seq_len=16, batch_size=4, seed=4)
    for step in range(5):
        np.testing.assert_array_equal(batches.batch(step), same.batch(step))
    assert any(not np.array_equal(batches.batch(s), other.batch(s)) for s in range(5))
    batch = batches.batch(2)
    assert batch.shape == (4, 17) and batch.dtype == np.int32
    for row, index in zip(batch, batches.window_indices(2)):  # windows are stream slices at stride seq_len
        np.testing.assert_array_equal(row, stream[index * 16 : index * 16 + 17])
    steps_per_epoch = batches.num_windows // 4
    seen = np.concatenate([batches.window_indices(s) for s in range(steps_per_epoch)])
    assert len(set(seen.tolist())) == len(seen)  # no window twice within an epoch


def test_packing_resumes_at_any_step(prepared):
    batches = data.PackedBatches(prepared.train_stream, seq_len=16, batch_size=5, seed=0)
    epoch_steps = batches.num_windows // 5 + 2  # run past an epoch boundary
    uninterrupted = [b for _, b in zip(range(epoch_steps + 3), batches.iterate(0))]
    resumed = data.PackedBatches(prepared.train_stream, seq_len=16, batch_size=5, seed=0)
    tail = [b for _, b in zip(range(3 + 3), resumed.iterate(epoch_steps - 3))]
    for a, b in zip(uninterrupted[epoch_steps - 3 :], tail):
        np.testing.assert_array_equal(a, b)


def test_eval_windows_are_the_stream_in_order(prepared):
    windows = data.eval_windows(prepared.heldout_stream, 16, max_windows=3)
    assert windows.shape == (3, 17)
    np.testing.assert_array_equal(windows[1], prepared.heldout_stream[16:33])


def test_bad_packing_arguments_raise(prepared):
    with pytest.raises(ValueError, match="seq_len"):
        data.PackedBatches(prepared.train_stream, seq_len=0, batch_size=2)
    with pytest.raises(ValueError, match="hold no window"):
        data.PackedBatches(prepared.train_stream[:4], seq_len=16, batch_size=2)


# --- trainer -------------------------------------------------------------------------------------------


def tiny_recipe(tmp_path, **overrides) -> TrainConfig:
    values = dict(
        name="tiny",
        model=dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64, tie_embeddings=True),
        seq_len=32,
        batch_size=4,
        steps=6,
        learning_rate=3e-3,
        warmup_steps=2,
        checkpoint_every=3,
        log_every=1,
        eval_every=0,
        eval_windows=4,
        final_eval_windows=8,
        out_dir=str(tmp_path / "run"),
    )
    values.update(overrides)
    return TrainConfig(**values)


def test_loss_decreases(tmp_path, prepared):
    lines = []
    result = train(tiny_recipe(tmp_path, steps=40, learning_rate=1e-2, log_every=10, checkpoint_every=40), data=prepared, log=lines.append)
    losses = [row["loss"] for row in result.history]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    assert result.eval_loss is not None and result.eval_loss < losses[0]
    assert result.eval_perplexity == pytest.approx(np.exp(result.eval_loss))
    assert result.tokens_seen == 40 * 4 * 32
    assert any("tok/s" in line and "loss" in line for line in lines)
    # The final model is saved as an orbax checkpoint and restores to the same parameters.
    restored = orbax_store.restore(tmp_path / "run" / "model")
    for a, b in zip(jax.tree.leaves(result.model.params), jax.tree.leaves(restored.params)):
        np.testing.assert_array_equal(a, b)
    summary = json.loads((tmp_path / "run" / "result.json").read_text())
    assert summary["steps"] == 40 and summary["eval_loss"] == result.eval_loss


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_resume_continues_exactly(tmp_path, prepared, compute_dtype):
    recipe = tiny_recipe(tmp_path / "a", compute_dtype=compute_dtype)
    full = train(recipe, data=prepared, log=lambda line: None)
    interrupted_recipe = tiny_recipe(tmp_path / "b", compute_dtype=compute_dtype)
    first = train(interrupted_recipe, data=prepared, stop_at_step=3, log=lambda line: None)
    assert first.steps == 3 and first.eval_loss is None
    trainer_lib._COMPILED.clear()  # the resumed run compiles afresh, as a new process would
    resumed = train(interrupted_recipe, data=prepared, resume=True, log=lambda line: None)
    full_losses = [row["loss"] for row in full.history]
    resumed_losses = [row["loss"] for row in resumed.history]
    assert len(full_losses) == len(resumed_losses) == 6
    assert resumed_losses == full_losses  # exactly, steps 4..6 included
    for a, b in zip(jax.tree.leaves(full.model.params), jax.tree.leaves(resumed.model.params)):
        np.testing.assert_array_equal(a, b)
    assert resumed.eval_loss == full.eval_loss


def test_existing_run_needs_resume_and_a_matching_recipe(tmp_path, prepared):
    train(tiny_recipe(tmp_path, steps=3), data=prepared, log=lambda line: None)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(tiny_recipe(tmp_path, steps=3), data=prepared, log=lambda line: None)
    with pytest.raises(ValueError, match="differs from the checkpoint's in \\['learning_rate'\\]"):
        train(tiny_recipe(tmp_path, steps=3, learning_rate=1e-4), data=prepared, resume=True, log=lambda line: None)


def test_objectives_are_pluggable(tmp_path, prepared):
    calls = []

    def first_token_objective(config, weight=1.0):
        causal = objectives.causal_lm(config)

        def objective(params, batch, key):
            calls.append(key.shape)
            loss, metrics = causal(params, {"tokens": batch["tokens"][:, :9]}, key)
            return weight * loss, metrics

        return objective

    objectives.register_objective("test_short_causal", first_token_objective)
    result = train(
        tiny_recipe(tmp_path, steps=2, objective="test_short_causal", objective_options={"weight": 0.5}),
        data=prepared,
        log=lambda line: None,
    )
    assert calls and result.eval_tokens == 8 * 8  # 8 eval windows x 8 targets: evaluation used the plugged objective
    with pytest.raises(ValueError, match="unknown 'nope'"):
        objectives.make_objective("nope", None)


def test_causal_lm_loss_matches_a_direct_computation():
    from conftest import tiny_model

    model = tiny_model("llama")
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, model.config.vocab_size)
    loss, metrics = objectives.causal_lm(model.config)(model.params, {"tokens": tokens}, jax.random.key(0))
    logits, _ = model.forward(tokens[:, :-1], jnp.broadcast_to(jnp.arange(8), (2, 8)))
    expected = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert float(metrics["token_count"]) == 16


def test_recipes_load():
    for name in ("demo-code", "demo-code-draft"):
        recipe = TrainConfig.from_recipe(name)
        assert recipe.name == name and recipe.seq_len == 256 and recipe.tokenizer_vocab_size == 4096
    with pytest.raises(ValueError, match="no recipe"):
        TrainConfig.from_recipe("no-such-recipe")
    with pytest.raises(ValueError, match="unknown field"):
        TrainConfig.from_dict({"nme": "typo"})


def write_cli_recipe(tmp_path: Path, manifest: dict, tokenizer, **overrides) -> str:
    """A tiny recipe file for `jspec train --recipe`, reading the manifest and tokenizer saved beside it."""
    corpus.save_manifest(manifest, tmp_path / "manifest.json")
    tokenizer.save(tmp_path / "tokenizer.json")
    recipe = tiny_recipe(tmp_path, **overrides).to_dict()
    recipe.update(corpus_manifest=str(tmp_path / "manifest.json"), tokenizer=str(tmp_path / "tokenizer.json"), cache_dir=str(tmp_path / "cache"), heldout_fraction=0.2)
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    return str(tmp_path / "recipe.json")


def test_cli_train(tmp_path, manifest, tokenizer, capsys):
    from jspec.cli import main

    recipe = write_cli_recipe(tmp_path, manifest, tokenizer)
    out = tmp_path / "cli-run"
    assert main(["train", "--recipe", recipe, "--out", str(out), "--steps", "2", "--stop-at", "1"]) == 0
    assert main(["train", "--recipe", recipe, "--out", str(out), "--steps", "2", "--resume"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["eval_loss"] > 0
    assert orbax_store.restore(out / "model").tokenizer == tokenizer


def test_agreement_and_heldout_measure():
    from conftest import tiny_model
    from jspec.train import demo

    target, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    windows = np.asarray(jax.random.randint(jax.random.key(1), (3, 9), 0, target.config.vocab_size), np.int32)
    same = demo.measure(target, target, windows, batch_size=2)
    assert same["top1_agreement"] == 1.0 and same["eval_tokens"] == 24
    assert same[demo.TARGET]["eval_loss"] == pytest.approx(same[demo.DRAFT]["eval_loss"])
    loss, _ = objectives.causal_lm(target.config)(target.params, {"tokens": jnp.asarray(windows)}, jax.random.key(0))
    assert same[demo.TARGET]["eval_loss"] == pytest.approx(float(loss), rel=1e-5)
    different = demo.measure(target, other, windows, batch_size=2)
    assert 0.0 <= different["top1_agreement"] < 1.0


@pytest.mark.skipif(not (Path(__file__).resolve().parents[1] / "jspec/assets/demo-code/config.json").is_file(), reason="demo models not built")
def test_shipped_demo_models():
    from jspec.checkpoint.hf import load_hf
    from jspec.train import demo

    target, draft = load_hf(demo.ASSETS_DIR / demo.TARGET), load_hf(demo.ASSETS_DIR / demo.DRAFT)
    assert 5e6 <= target.num_parameters() <= 20e6 and 0.5e6 <= draft.num_parameters() <= 2e6
    assert target.tokenizer == draft.tokenizer and target.config.vocab_size == draft.config.vocab_size == 4096
    eos = target.tokenizer.token_to_id(data.EOS_TOKEN)
    assert target.config.eos_token_ids == draft.config.eos_token_ids == (eos,)
    text = "def f(x):\n    return 'héllo ✓'\n"
    assert target.tokenizer.decode(target.tokenizer.encode(text)) == text
    shipped = sum(p.stat().st_size for p in demo.ASSETS_DIR.rglob("*") if p.is_file())
    assert shipped < demo.MAX_SHIPPED_BYTES
    manifest = json.loads((demo.ASSETS_DIR / demo.TARGET / "corpus_manifest.json").read_text())
    assert manifest["num_files"] == len(manifest["files"]) > 100
    # The target predicts stdlib-style code far better than chance.
    tokens = jnp.asarray([target.tokenizer.encode("import os\nimport sys\n\n\ndef main():\n    return 0\n")], jnp.int32)
    loss, _ = objectives.causal_lm(target.config)(target.params, {"tokens": tokens}, jax.random.key(0))
    assert float(loss) < 0.6 * np.log(4096)


CARD_MARGIN = 0.01  # nats: the card's figures are fp32 on the shipped weights; only summation order may differ


def test_model_card_ends_with_the_sections_a_rewrite_writes(monkeypatch):
    """Rewriting MODEL_CARD.md (demo.rewrite_card, a demo export) keeps every section after the two code models':
    they are generated from the model directories, hand-written text included (CARD_NOTES files), so nothing in
    the card is lost by a rewrite (the recurrent section and the diffusion stage notes once were). The diffusion
    section's own figures take 40 s to measure: the card's text stands in for them here (test_diffusion_demo.py
    re-measures them)."""
    from jspec.train import demo

    card = (demo.ASSETS_DIR / "MODEL_CARD.md").read_text()
    generated = card[card.index("## Diffusion demo models") : card.index("Stage 2 against stage 1")]
    monkeypatch.setattr(demo, "diffusion_card_section", lambda assets: generated.split("\n")[:-1])
    tail = "\n".join(demo.other_models_card_sections(demo.ASSETS_DIR))
    assert card.endswith(tail)
    for heading in ("## Diffusion demo models", "Stage 2 against stage 1", "## Learn2PD unmasking filter",
                    "## Recurrent-depth demo model", "## MLA demo model", "## Limitations"):
        assert heading in tail, heading


def _card_row(card: str, label: str) -> list[float]:
    import re

    line = next(line for line in card.splitlines() if line.startswith(f"| {label} |"))
    return [float(cell.replace(",", "").rstrip("%")) for cell in re.findall(r"\|\s*([\d.,%]+)\s*(?=\|)", line)]


@pytest.mark.slow
def test_demo_models_load_by_name_and_reach_the_model_card_heldout_loss():
    """`jspec.load("demo-code")` / `("demo-code-draft")` reproduce the card's held-out loss and agreement on the
    card's held-out slice (the stdlib files held out by the manifest, windows of 257 tokens)."""
    import jspec
    from jspec.train import demo

    target, draft = jspec.load("demo-code"), jspec.load("demo-code-draft")
    card = (demo.ASSETS_DIR / "MODEL_CARD.md").read_text()
    manifest = json.loads((demo.ASSETS_DIR / demo.TARGET / "corpus_manifest.json").read_text())
    windows = demo.heldout_windows({**manifest, "root": str(corpus.stdlib_root())}, target.tokenizer, 256)
    measured = demo.measure(target, draft, windows)
    target_loss, draft_loss = _card_row(card, "Held-out loss (nats/token, fp32)")
    assert measured[demo.TARGET]["eval_loss"] == pytest.approx(target_loss, abs=CARD_MARGIN)
    assert measured[demo.DRAFT]["eval_loss"] == pytest.approx(draft_loss, abs=CARD_MARGIN)
    stated_agreement = float(card.split("**Draft top-1 agreement with the target** on the held-out slice: **")[1].split("%")[0])
    assert 100 * measured["top1_agreement"] == pytest.approx(stated_agreement, abs=0.5)


# --- the demo export never destroys what is in its assets directory, and never writes into the package unasked ---


def test_build_demo_writes_outside_the_package_by_default(tmp_path):
    from jspec.cli import build_parser
    from jspec.train import demo

    args = build_parser().parse_args(["build-demo"])  # the CLI's defaults
    assert demo.resolve_assets(args.out_root, args.assets, args.into_package) == Path("runs").absolute() / "assets"
    assert demo.resolve_assets(tmp_path) == tmp_path / "assets"
    assert demo.ASSETS_DIR not in demo.resolve_assets(tmp_path).parents
    assert demo.resolve_assets(tmp_path, into_package=True) == demo.ASSETS_DIR
    assert demo.resolve_assets(tmp_path, tmp_path / "mine") == tmp_path / "mine"
    with pytest.raises(ValueError, match="^assets_dir: .*given together with into_package"):
        demo.resolve_assets(tmp_path, tmp_path / "mine", into_package=True)


@pytest.fixture
def finished_demo_runs(tmp_path, tokenizer, monkeypatch):
    """Finished (tiny) runs of demo-code and demo-code-draft under tmp_path/runs, with the corpus check and the
    card's measurements stubbed out (they need the real stdlib corpus): what `demo.export` reads and writes."""
    from conftest import tiny_model
    from jspec.checkpoint.directories import write_text_atomically
    from jspec.train import demo

    runs = tmp_path / "runs"
    for seed, name in enumerate(demo.NAMES):
        (runs / name).mkdir(parents=True)
        (runs / name / "result.json").write_text(json.dumps({"corpus": {"digest": "stub"}, "seed": seed}))
        (runs / name / "recipe.json").write_text(json.dumps({"heldout_fraction": 0.2}))
        orbax_store.save(tiny_model("llama", seed=seed).replace(tokenizer=tokenizer), runs / name / "model")
    monkeypatch.setattr(demo.corpus_lib, "build_manifest", lambda **_: {"digest": "stub", "root": "/", "files": []})
    monkeypatch.setattr(demo, "measure_and_write_card", lambda assets, *_: write_text_atomically(assets / "MODEL_CARD.md", "card\n"))
    return runs


def _demo_snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _old_assets(directory: Path) -> dict[str, bytes]:
    """An assets directory as a user may have it: an older demo-code export and a file of their own."""
    from conftest import tiny_model
    from jspec.checkpoint.hf import save_hf

    save_hf(tiny_model("llama", seed=7), directory / "demo-code")
    (directory / "notes.txt").write_text("mine\n")
    return _demo_snapshot(directory)


def test_demo_export_refuses_a_non_empty_assets_dir_and_overwrite_replaces_only_its_entries(finished_demo_runs, tmp_path):
    from jspec.checkpoint.hf import load_hf
    from jspec.train import demo

    assets = tmp_path / "assets"
    before = _old_assets(assets)
    with pytest.raises(ValueError, match=r"^assets_dir \(--assets\): directory .* is not empty .*--overwrite"):
        demo.export(finished_demo_runs, assets)
    with pytest.raises(ValueError, match="is not empty"):
        demo.build(finished_demo_runs, assets)
    assert _demo_snapshot(assets) == before
    demo.export(finished_demo_runs, assets, overwrite=True)
    assert (assets / "notes.txt").read_text() == "mine\n" and (assets / "MODEL_CARD.md").read_text() == "card\n"
    for name in demo.NAMES:
        exported = load_hf(assets / name)
        trained = orbax_store.restore(finished_demo_runs / name / "model")
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(exported.params), jax.tree.leaves(trained.params)))
    assert sorted(p.name for p in assets.iterdir()) == ["MODEL_CARD.md", "demo-code", "demo-code-draft", "notes.txt"]


def test_demo_export_interrupted_in_the_swap_keeps_the_old_model(finished_demo_runs, tmp_path, monkeypatch):
    from jspec.checkpoint import directories
    from jspec.checkpoint.hf import load_hf
    from jspec.train import demo

    assets = tmp_path / "assets"
    before = _old_assets(assets)
    swap = directories.replace_directory

    def interrupt():
        raise KeyboardInterrupt

    def interrupted_swap(source, destination):
        # only the export's swap onto demo-code (save_hf's inner swap onto the empty temporary goes through)
        swap(source, destination, _between_renames=interrupt if destination.name == demo.TARGET else None)

    monkeypatch.setattr(directories, "replace_directory", interrupted_swap)
    with pytest.raises(KeyboardInterrupt):
        demo.export(finished_demo_runs, assets, overwrite=True)
    after = _demo_snapshot(assets)
    assert {k: v for k, v in after.items() if not k.startswith("demo-code-draft/")} == before  # the draft went first
    assert load_hf(assets / "demo-code").config.vocab_size > 0
    assert not [p.name for p in assets.iterdir() if p.name.startswith(".")]  # no temporary directory left
