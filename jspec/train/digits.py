"""The demo-digits data: scikit-learn's bundled 8x8 handwritten digits (`sklearn.datasets.load_digits()`, read
from the wheel's digits.csv.gz: no download), as token sequences for a class-conditional autoregressive model.

- 1797 images of 64 pixels in 0-16 with a label 0-9. Each becomes [class token, 64 pixel tokens (row-major),
  EOS] (66 tokens; `jspec.images` names the vocabulary), so a training window of seq_len + 1 = 66 tokens is one
  image: the model learns p(pixels | class), and the loss is over the 64 pixels and the EOS.
- Held-out split by row, deterministic: row i is held out when sha256("jspec-heldout-v1:digits/<i>") read as a
  fraction is below `heldout_fraction` (the stdlib corpus's rule, `corpus.split_of`).
- The manifest records the scikit-learn version, the data's sha256 and the split, so a run can tell whether
  another machine's data is the same.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from jspec import images
from jspec.train import corpus as corpus_lib

DATASET = "digits"
SEQUENCE_LENGTH = 1 + images.NUM_PIXELS + 1  # class, pixels, EOS


def load_data() -> tuple[np.ndarray, np.ndarray, str]:
    """(pixels [1797, 64] int 0-16, labels [1797] int 0-9, scikit-learn's version). ValueError if scikit-learn is
    missing (it is in the `images` and `test` extras)."""
    try:
        import sklearn
        from sklearn.datasets import load_digits
    except ImportError:
        raise ValueError(
            "dataset 'digits': needs scikit-learn, which ships the data (pip install 'jspec[images]')"
        ) from None
    bunch = load_digits()
    pixels = np.asarray(bunch.data).astype(np.int64)
    labels = np.asarray(bunch.target).astype(np.int64)
    if pixels.shape[1:] != (images.NUM_PIXELS,) or pixels.min() < 0 or pixels.max() >= images.NUM_LEVELS:
        raise ValueError(f"dataset 'digits': unexpected data from scikit-learn {sklearn.__version__}: {pixels.shape}")
    return pixels, labels, sklearn.__version__


def split(num_rows: int, heldout_fraction: float) -> np.ndarray:
    """[num_rows] bool: True where the row is held out (a pure function of its index and the fraction)."""
    return np.asarray([corpus_lib.split_of(f"{DATASET}/{i}", heldout_fraction) == "heldout" for i in range(num_rows)])


def build_manifest(heldout_fraction: float) -> dict[str, Any]:
    pixels, labels, version = load_data()
    heldout = split(len(labels), heldout_fraction)
    digest = hashlib.sha256(pixels.astype(np.uint8).tobytes() + labels.astype(np.uint8).tobytes()).hexdigest()
    return {
        "format": "jspec-digits-manifest",
        "source": "sklearn.datasets.load_digits (digits.csv.gz in the scikit-learn wheel)",
        "sklearn_version": version,
        "num_rows": int(len(labels)),
        "num_heldout_rows": int(heldout.sum()),
        "heldout_fraction": heldout_fraction,
        "split_salt": corpus_lib.SPLIT_SALT,
        "digest": digest,
    }


def sequences(tokenizer: Any, pixels: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[N, 66] int32: class token, 64 pixel tokens, EOS per image."""
    pixel_ids = np.asarray([tokenizer.token_to_id(t) for t in images.PIXEL_TOKENS], np.int32)
    class_ids = np.asarray([tokenizer.token_to_id(t) for t in images.CLASS_TOKENS], np.int32)
    eos = np.full((len(labels), 1), tokenizer.eos_token_ids[0], np.int32)
    return np.concatenate([class_ids[labels][:, None], pixel_ids[pixels], eos], axis=1)


def heldout_sequences(tokenizer: Any, heldout_fraction: float) -> np.ndarray:
    """The held-out images' sequences [N, 66], in row order (the evaluation slice)."""
    pixels, labels, _ = load_data()
    heldout = split(len(labels), heldout_fraction)
    return sequences(tokenizer, pixels[heldout], labels[heldout])


def prepare(config: Any, log=print):
    """The trainer's data for `dataset: "digits"`: streams of whole images (one window of seq_len + 1 = 66 tokens
    each, windows at stride 66, never packed across images)."""
    from jspec.train.trainer import PreparedData

    if config.seq_len != SEQUENCE_LENGTH - 1:
        raise ValueError(f"seq_len: the digits dataset needs seq_len={SEQUENCE_LENGTH - 1} (one image per window), got {config.seq_len}")
    if config.tokenizer or config.init_from or config.corpus_manifest:
        raise ValueError("dataset 'digits': has its own tokenizer and data; leave tokenizer, init_from and corpus_manifest unset")
    tokenizer = images.digits_tokenizer()
    manifest = build_manifest(config.heldout_fraction)
    pixels, labels, _ = load_data()
    heldout = split(len(labels), config.heldout_fraction)
    train_rows = sequences(tokenizer, pixels[~heldout], labels[~heldout])
    heldout_rows = sequences(tokenizer, pixels[heldout], labels[heldout])
    log(f"data: digits (scikit-learn {manifest['sklearn_version']}): {len(train_rows)} train images, {len(heldout_rows)} held out")
    return PreparedData(
        tokenizer, manifest, train_rows.reshape(-1), heldout_rows.reshape(-1), window_stride=SEQUENCE_LENGTH,
        corpus_summary={k: manifest[k] for k in ("source", "sklearn_version", "num_rows", "num_heldout_rows", "digest")},
        eval_slice=f"held-out digits images (rows split by hash, fraction {config.heldout_fraction}), one window of "
        f"{SEQUENCE_LENGTH} tokens [class, 64 pixels, EOS] per image, targets the 64 pixels and EOS",
    )


# --- measuring a digits model (the model card's figures) ---------------------------------------------------------


def heldout_loss(model: Any, heldout_fraction: float) -> dict[str, float]:
    """The model's mean next-token cross-entropy (nats, float32) over the held-out images' 65 targets each (64
    pixels and EOS), and the same summed per image."""
    import jax
    import jax.numpy as jnp

    from jspec.train.objectives import causal_lm

    windows = jnp.asarray(heldout_sequences(model.tokenizer, heldout_fraction))
    config = model.config.replace(dtype="float32")
    params = jax.tree.map(lambda x: x.astype(jnp.float32), model.params)
    _, metrics = jax.jit(causal_lm(config))(params, {"tokens": windows}, jax.random.key(0))
    loss = float(metrics["loss_sum"]) / float(metrics["token_count"])
    return {"eval_loss": loss, "nats_per_image": float(metrics["loss_sum"]) / len(windows), "eval_images": int(len(windows))}


def real_digits_classifier(heldout_fraction: float) -> tuple[Any, float]:
    """A logistic-regression classifier (scikit-learn) trained on the training split's real images (pixels / 16),
    and its accuracy on the held-out real images."""
    from sklearn.linear_model import LogisticRegression

    pixels, labels, _ = load_data()
    heldout = split(len(labels), heldout_fraction)
    classifier = LogisticRegression(max_iter=5000).fit(pixels[~heldout] / 16.0, labels[~heldout])
    return classifier, float(classifier.score(pixels[heldout] / 16.0, labels[heldout]))


def classifier_rate(model: Any, heldout_fraction: float, samples_per_class: int = 10, strategy: Any = "sample",
                    key: int = 0, **options: Any) -> dict[str, Any]:
    """How often `real_digits_classifier` labels the model's samples as the class they were asked for:
    `samples_per_class` samples of each digit 0-9 with `strategy` (default: autoregressive sampling at
    temperature 1). Returns the rate, the per-class rates, the classifier's accuracy on held-out real images and
    the sampled images [10 * samples_per_class, 8, 8]."""
    classifier, real_accuracy = real_digits_classifier(heldout_fraction)
    sampled, _ = images.generate_digits(model, list(range(images.NUM_CLASSES)), strategy, num_samples=samples_per_class,
                                        key=key, **options)
    predicted = classifier.predict(sampled.reshape(len(sampled), -1) / 16.0)
    wanted = np.repeat(np.arange(images.NUM_CLASSES), samples_per_class)
    return {
        "rate": float(np.mean(predicted == wanted)),
        "per_class": [float(np.mean(predicted[wanted == c] == c)) for c in range(images.NUM_CLASSES)],
        "classifier_heldout_accuracy": real_accuracy,
        "images": sampled,
    }
