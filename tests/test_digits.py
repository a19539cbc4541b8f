"""The shipped demo-digits model, jspec.images (class prompts, pictures, the PNG writer), the digits data in the
trainer, its export, and `jspec generate --prompt-class ... --png ...`."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest

import jspec
from jspec import cli, images

ASSETS = Path(__file__).resolve().parents[1] / "jspec" / "assets"
shipped = pytest.mark.skipif(not (ASSETS / "demo-digits" / "config.json").is_file(), reason="demo-digits not built")
pytest.importorskip("sklearn", reason="scikit-learn (the images and test extras) ships the digits data")


@pytest.fixture(scope="module")
def digits_model() -> jspec.Model:
    return jspec.load("demo-digits")


def read_png(data: bytes) -> tuple[dict, np.ndarray]:
    """A PNG's IHDR fields and its pixel rows, decoded with zlib alone (filter type 0 rows), checking every CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind, body = data[offset + 4 : offset + 8], data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append((kind, body))
        offset += 12 + length
    assert [k for k, _ in chunks][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, color, compression, filtering, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    header = dict(width=width, height=height, depth=depth, color=color, rest=(compression, filtering, interlace))
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    channels = {0: 1, 2: 3}[color]
    rows = np.frombuffer(raw, np.uint8).reshape(height, 1 + width * channels)
    assert np.all(rows[:, 0] == 0)  # filter type None on every row
    return header, rows[:, 1:].reshape((height, width) if channels == 1 else (height, width, 3))


# --- the shipped model ---------------------------------------------------------------------------------------


@shipped
def test_shipped_digits_model_loads_with_its_vocabulary_and_card(digits_model):
    tokenizer = digits_model.tokenizer
    assert digits_model.config.vocab_size == len(images.DIGITS_TOKENS) == 29
    assert [tokenizer.token_to_id(t) for t in images.DIGITS_TOKENS] == list(range(29))
    assert digits_model.config.eos_token_ids == (tokenizer.token_to_id(images.EOS_TOKEN),)
    assert 1e5 < digits_model.num_parameters() < 5e6
    assert images.class_prompt(digits_model, 3) == [tokenizer.token_to_id("<digit_3>")] == tokenizer.encode("<digit_3>")
    assert images.class_prompts(digits_model, [0, 9]) == [[17], [26]]
    card = (ASSETS / "demo-digits" / "MODEL_CARD.md").read_text()
    result = json.loads((ASSETS / "demo-digits" / "training_result.json").read_text())
    read_png((ASSETS / "demo-digits" / "samples.png").read_bytes())
    assert f"**{result['eval_loss']:.3f}**" in card  # the card's held-out loss is the run's (both fp32)


@shipped
def test_shipped_digits_model_reaches_its_heldout_loss(digits_model):
    from jspec.train import digits

    recipe = json.loads((ASSETS / "demo-digits" / "training_recipe.json").read_text())
    result = json.loads((ASSETS / "demo-digits" / "training_result.json").read_text())
    measured = digits.heldout_loss(digits_model, recipe["heldout_fraction"])
    assert measured["eval_images"] == result["corpus"]["num_heldout_rows"] == result["eval_windows"]
    assert measured["eval_loss"] == pytest.approx(result["eval_loss"], abs=1e-4)
    assert measured["eval_loss"] < 0.5 * np.log(images.NUM_LEVELS)  # far better than uniform pixels


MIN_RATE = 0.8


@pytest.fixture(scope="module")
def classifier():
    """Logistic regression trained here on all 1797 real images (not shipped)."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    real = load_digits()
    fitted = LogisticRegression(max_iter=5000).fit(real.data / 16.0, real.target)
    assert fitted.score(real.data / 16.0, real.target) > 0.95
    return fitted


def labelled_as_asked(model, classifier, strategy: str, **options) -> tuple[float, jspec.DecodeOutput]:
    """The share of 100 samples (10 per digit, temperature 1) the classifier labels as the digit asked for."""
    pictures, output = images.generate_digits(model, list(range(10)), strategy, num_samples=10, key=0, temperature=1.0,
                                              **options)
    assert pictures.shape == (100, 8, 8) and all(len(row) == 64 for row in output.sequences())
    predicted = classifier.predict(pictures.reshape(100, 64) / 16.0)
    return float(np.mean(predicted == np.repeat(np.arange(10), 10))), output


@shipped
def test_samples_look_like_the_digits_asked_for(digits_model, classifier):
    """At least 80% of 100 samples (autoregressive sampling at temperature 1) are labelled as the digit asked for."""
    rate, output = labelled_as_asked(digits_model, classifier, "sample")
    pixel_ids = {digits_model.tokenizer.token_to_id(t) for t in images.PIXEL_TOKENS}
    not_pixels = sum(token not in pixel_ids for row in output.sequences() for token in row)
    assert not_pixels < 0.01 * 6400  # sampling at temperature 1 draws a class token now and then (drawn as background)
    print(f"demo-digits: {rate:.0%} of 100 samples labelled as asked")
    assert rate >= MIN_RATE
    assert len({tuple(row) for row in output.sequences()}) > 90  # samples, not copies of one picture per class


@shipped
def test_sjd_samples_are_as_recognisable_as_autoregressive_ones(digits_model, classifier):
    """SJD (lossless in distribution) draws digits labelled as asked at the autoregressive rate, within sampling
    noise: |difference| <= 3 standard errors of a difference of two rates over 100 samples each."""
    autoregressive, _ = labelled_as_asked(digits_model, classifier, "sample")
    sjd, output = labelled_as_asked(digits_model, classifier, "sjd", init="repeat_horizon", horizon=8)
    noise = 3 * np.sqrt(2 * autoregressive * (1 - autoregressive) / 100)
    print(f"demo-digits: autoregressive {autoregressive:.0%}, sjd {sjd:.0%} (noise bound {noise:.2f}), "
          f"sjd target calls {output.stats['model_calls']}")
    assert abs(sjd - autoregressive) <= max(noise, 0.05)
    assert not output.stats["lossy"]


# --- jspec.images ------------------------------------------------------------------------------------------


def test_png_bytes_decode_back_to_the_pixels(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (13, 21), dtype=np.uint8)
    header, pixels = read_png(images.png_bytes(grey))
    assert header == dict(width=21, height=13, depth=8, color=0, rest=(0, 0, 0)) and np.array_equal(pixels, grey)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    header, pixels = read_png(images.write_png(tmp_path / "rgb.png", rgb).read_bytes())
    assert (header["width"], header["height"], header["color"]) == (7, 5, 2) and np.array_equal(pixels, rgb)


def test_image_grid_tiles_the_samples_and_writes_a_png(tmp_path):
    tokenizer = images.digits_tokenizer()
    levels = np.arange(64).reshape(8, 8) % 17
    rows = [levels.reshape(-1).tolist(), [16] * 10 + [27, 20], []]  # a full image, a short row with EOS and a class token
    pictures = images.tokens_to_images(tokenizer, rows)
    assert np.array_equal(pictures[0], levels)
    assert pictures[1].reshape(-1).tolist() == [16] * 10 + [0] * 54 and not pictures[2].any()
    grid = images.image_grid(pictures, columns=2, scale=3, gap=1)
    assert grid.shape == (1 + 2 * (24 + 1), 1 + 2 * (24 + 1)) and grid.dtype == np.uint8
    assert np.array_equal(grid[1:25, 1:25], np.kron(255 - np.round(levels * 255 / 16), np.ones((3, 3))).astype(np.uint8))
    assert np.all(grid[26:50, 26:50] == 128)  # the missing fourth tile is the gap colour
    header, pixels = read_png(images.write_png(tmp_path / "grid.png", grid).read_bytes())
    assert (header["width"], header["height"]) == (51, 51) and np.array_equal(pixels, grid)


def test_bad_arguments_raise_clear_errors():
    tokenizer = images.digits_tokenizer()
    for digit in (-1, 10, 3.0, True, "3"):
        with pytest.raises(jspec.ArgumentError, match=r"^digit: expected an int"):
            images.class_prompt(tokenizer, digit)
    with pytest.raises(ValueError, match=r"^digit: "):
        images.class_token(12)
    with pytest.raises(jspec.ArgumentError, match=r"^digits: "):
        images.class_prompts(tokenizer, 3)
    with pytest.raises(jspec.ArgumentError, match=r"^model: 'random-tiny' is not an image model"):
        images.class_prompt(jspec.load("random:random-tiny"), 3)
    with pytest.raises(jspec.ArgumentError, match=r"^images: "):
        images.image_grid(np.zeros((8, 8)))
    with pytest.raises(jspec.ArgumentError, match=r"^pixels: "):
        images.png_bytes(np.zeros((4, 4), np.float32))


# --- the data, the trainer and the export ------------------------------------------------------------------


def test_digits_sequences_and_windows_are_whole_images():
    from jspec.train import data, digits

    tokenizer = images.digits_tokenizer()
    pixels, labels, _ = digits.load_data()
    assert pixels.shape == (1797, 64) and pixels.max() == 16 and sorted(set(labels.tolist())) == list(range(10))
    rows = digits.sequences(tokenizer, pixels[:5], labels[:5])
    assert rows.shape == (5, 66) and rows[:, 0].tolist() == [17 + d for d in labels[:5]] and np.all(rows[:, -1] == 27)
    assert np.array_equal(rows[:, 1:-1], pixels[:5])  # pixel level v is token id v
    held = digits.split(1797, 0.1)
    assert np.array_equal(held, digits.split(1797, 0.1)) and 120 < held.sum() < 240
    batches = data.PackedBatches(rows.reshape(-1), seq_len=65, batch_size=3, seed=0, stride=66)
    assert batches.num_windows == 5
    assert sorted(map(tuple, np.concatenate([batches.batch(0), batches.batch(1)[:2]]))) == sorted(map(tuple, rows))
    assert np.array_equal(data.eval_windows(rows.reshape(-1), 65, stride=66), rows)


@pytest.fixture(scope="module")
def tiny_digits_run(tmp_path_factory):
    """A 3-step run of the demo-digits recipe with a tiny model (the real data and tokenizer)."""
    from jspec.train import TrainConfig, train

    root = tmp_path_factory.mktemp("digits-runs")
    tiny = dict(name="demo-digits", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64)
    config = TrainConfig.from_recipe("demo-digits", steps=3, warmup_steps=1, batch_size=4, eval_every=0,
                                     out_dir=str(root / "demo-digits"), model=tiny)
    result = train(config, log=lambda line: None)
    return root, result


def test_training_on_digits_reports_the_heldout_images(tiny_digits_run):
    from jspec.train import digits

    root, result = tiny_digits_run
    summary = json.loads((root / "demo-digits" / "result.json").read_text())
    assert summary["eval_windows"] == summary["corpus"]["num_heldout_rows"] and summary["eval_tokens"] == 65 * summary["eval_windows"]
    assert "held-out digits images" in summary["eval_slice"] and summary["corpus"]["num_rows"] == 1797
    assert result.model.tokenizer == images.digits_tokenizer() and result.model.config.vocab_size == 29
    assert digits.heldout_loss(result.model, 0.1)["eval_loss"] == pytest.approx(result.eval_loss, abs=1e-4)


def test_build_demo_exports_digits_with_card_and_samples(tiny_digits_run, tmp_path):
    from jspec.checkpoint.hf import load_hf
    from jspec.train import demo

    root, result = tiny_digits_run
    assets = tmp_path / "assets"
    demo.build(root, assets, only=[demo.DIGITS])  # the run is finished: nothing is trained, demo-digits is exported
    exported = load_hf(assets / demo.DIGITS)
    assert exported.tokenizer == result.model.tokenizer
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(exported.params), jax.tree.leaves(result.model.params)))
    card = (assets / demo.DIGITS / "MODEL_CARD.md").read_text()
    assert "Samples labelled as asked" in card and "samples.png" in card
    header, _ = read_png((assets / demo.DIGITS / "samples.png").read_bytes())
    assert header["width"] == header["height"] == 1 + 10 * (32 + 1)
    with pytest.raises(ValueError, match="^only: unknown demo model"):
        demo.build(root, tmp_path / "other", only=["demo-pictures"])


# --- the command line --------------------------------------------------------------------------------------


@shipped
def test_generate_prompt_class_writes_a_png_of_the_samples(tmp_path, capsys, digits_model):
    path = tmp_path / "digits.png"
    argv = ["generate", "--model", "demo-digits", "--prompt-class", "3", "--prompt-class", "7", "--num-samples", "4",
            "--strategy", "sample", "--seed", "5", "--png", str(path), "--json"]
    assert cli.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    want, _ = images.generate_digits(digits_model, [3, 7], "sample", num_samples=4, key=5)
    assert printed["prompt_index"] == [0] * 4 + [1] * 4
    header, pixels = read_png(path.read_bytes())
    assert np.array_equal(pixels, images.image_grid(want, columns=4))  # a row of 4 samples per class


@shipped
@pytest.mark.parametrize("strategy, options", [("jacobi", dict(init="repeat_horizon", horizon=8)),
                                               ("lookahead", dict(window=5, ngram_size=4, guess_set_size=5))])
def test_jacobi_and_lookahead_greedy_equal_greedy_on_digits(digits_model, strategy, options):
    prompts = [images.class_prompt(digits_model, digit) for digit in (0, 3, 7, 9)]
    greedy = jspec.decode(digits_model, prompts, max_new_tokens=64)
    out = jspec.decode(digits_model, prompts, strategy, max_new_tokens=64, **options)
    np.testing.assert_array_equal(out.tokens, greedy.tokens)
    assert out.stats["model_calls"] < greedy.stats["model_calls"]
