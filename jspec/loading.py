"""`jspec.load`: models by name or path.

Names of the form `random:<preset>` build a clearly labelled model with random weights from a preset in
configs/models/ (or a path to a config JSON), with the byte-level stand-in tokenizer. They exist to exercise
the machinery; their text is noise.
"""

from __future__ import annotations

from pathlib import Path

import jax

from jspec.models.config import TransformerConfig
from jspec.models.model import Model
from jspec.tokenizer import ByteTokenizer

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
RANDOM_PREFIX = "random:"


def preset_names() -> list[str]:
    """Model presets in configs/models/ (usable as `random:<name>`)."""
    return sorted(p.stem for p in (CONFIGS_DIR / "models").glob("*.json"))


def model_config(name_or_path: str) -> TransformerConfig:
    """A preset config by name (configs/models/<name>.json) or from a JSON file path."""
    path = Path(name_or_path)
    if not path.suffix == ".json":
        path = CONFIGS_DIR / "models" / f"{name_or_path}.json"
    if not path.is_file():
        raise ValueError(f"model config: no preset or file {name_or_path!r}; presets are {preset_names()}")
    return TransformerConfig.from_json(path)


def load(name_or_path: str, *, dtype: str | None = None, seed: int = 0) -> Model:
    """Load a model.

    name_or_path: `random:<preset or config.json>` for a random-weight model with the byte tokenizer.
    dtype: override the parameter dtype ("float32", "bfloat16", "float16").
    """
    if not isinstance(name_or_path, str):
        raise ValueError(f"name_or_path: expected a model name or path (str), got {name_or_path!r}")
    if name_or_path.startswith(RANDOM_PREFIX):
        config = model_config(name_or_path[len(RANDOM_PREFIX) :])
        if dtype is not None:
            config = config.replace(dtype=dtype)
        tokenizer = ByteTokenizer()
        if config.vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"name_or_path: preset vocab_size {config.vocab_size} is smaller than the byte tokenizer's {tokenizer.vocab_size}"
            )
        return Model.random(config, jax.random.key(seed), tokenizer=tokenizer)
    raise ValueError(
        f"name_or_path: {name_or_path!r} is not a known model; use 'random:<preset>' with a preset in {preset_names()}"
    )
