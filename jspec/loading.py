"""`jspec.load`: models by name or path.

- a demo model name (`demo-code`, `demo-code-draft`, ...): shipped inside the package (jspec/assets/), no network;
- a Hugging Face model directory (config.json + *.safetensors [+ tokenizer.json]);
- a jspec orbax checkpoint directory (written by `jspec.save`);
- `random:<preset>`: see below.

Names of the form `random:<preset>` build a clearly labelled model with random weights from a preset in
configs/models/ (or a path to a config JSON), with the byte-level stand-in tokenizer. They exist to exercise
the machinery; their text is noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax

from jspec.models.config import TransformerConfig
from jspec.models import transformer
from jspec.models.model import Model
from jspec.tokenizer import ByteTokenizer
from jspec.validation import ArgumentError

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
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


def demo_names() -> list[str]:
    """Models shipped inside the package."""
    return sorted(p.name for p in ASSETS_DIR.iterdir() if (p / "config.json").is_file()) if ASSETS_DIR.is_dir() else []


def load(name_or_path: str | Path, *, dtype: str | None = None, seed: int = 0, mesh: Any = None,
         rules: Mapping[str, Any] | None = None) -> Model:
    """Load a model: a demo name, a Hugging Face directory, a jspec orbax checkpoint, or `random:<preset>`.

    dtype: override the parameter dtype ("float32", "bfloat16", "float16").
    seed: only for `random:` models.
    mesh, rules: place the parameters on a `jax.sharding.Mesh` (axes "data" and "model", e.g.
        `jspec.sharding.make_mesh(data=2, model=4)`) by their logical axes and `rules` (see `jspec.sharding`);
        the result equals `jspec.sharding.shard(load(name_or_path), mesh, rules)` bit for bit, with
        `model.sharding` set. Safetensors checkpoints (demo models, Hugging Face directories) are read straight
        onto the mesh: each process reads from the files only its addressable devices' slices of each tensor
        (`jax.make_array_from_callback`), so no host holds the whole checkpoint, also across hosts. Orbax
        checkpoints and `random:` models are built whole on each host, then sharded.
    A mesh without the rules' axes, or whose axes do not divide the heads, MLP or vocabulary, raises
    `ArgumentError` before any weight is read.
    """
    if isinstance(name_or_path, Path):
        name_or_path = str(name_or_path)
    if not isinstance(name_or_path, str):
        raise ValueError(f"name_or_path: expected a model name or path (str), got {name_or_path!r}")
    if rules is not None and mesh is None:
        raise ArgumentError(f"rules: sharding rules {rules!r} need a mesh (pass mesh=jspec.sharding.make_mesh(...))")
    if name_or_path.startswith(RANDOM_PREFIX):
        config = model_config(name_or_path[len(RANDOM_PREFIX) :])
        if dtype is not None:
            config = config.replace(dtype=dtype)
        tokenizer = ByteTokenizer()
        if config.vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"name_or_path: preset vocab_size {config.vocab_size} is smaller than the byte tokenizer's {tokenizer.vocab_size}"
            )
        _check_mesh(config, mesh, rules)
        return _sharded(Model.random(config, jax.random.key(seed), tokenizer=tokenizer), mesh, rules)
    path = ASSETS_DIR / name_or_path if name_or_path in demo_names() else Path(name_or_path)
    if path.is_dir():
        from jspec.checkpoint import orbax_store

        if orbax_store.is_checkpoint(path):
            return _sharded(orbax_store.restore(path, dtype=dtype), mesh, rules)
        if (path / "config.json").is_file():
            from jspec.checkpoint.hf import load_hf

            return load_hf(path, dtype=dtype, mesh=mesh, rules=rules)
        raise ValueError(f"name_or_path: directory {path} holds neither a jspec checkpoint nor a Hugging Face config.json")
    raise ValueError(
        f"name_or_path: {name_or_path!r} is not a demo model {demo_names()}, a model directory, "
        f"or 'random:<preset>' with a preset in {preset_names()}"
    )


def _check_mesh(config: TransformerConfig, mesh: Any, rules: Mapping[str, Any] | None) -> None:
    """Raise ArgumentError for a mesh the model cannot be placed on, before building any weight."""
    if mesh is not None:
        from jspec import sharding

        plan = sharding.MeshSharding.create(mesh, rules, sharding.logical_counts(config))
        shapes = jax.eval_shape(lambda: transformer.init_params(config, jax.random.key(0)))
        plan.tree_shardings(shapes, transformer.param_logical_axes(config))


def _sharded(model: Model, mesh: Any, rules: Mapping[str, Any] | None) -> Model:
    if mesh is None:
        return model
    from jspec import sharding

    return sharding.shard(model, mesh, rules)


def save(model: Model, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write `model` as a jspec orbax checkpoint that `jspec.load(path)` reads back bit for bit (a recurrent-depth
    model: as a Huginn-0125 directory, `jspec.checkpoint.huginn`, which it also reads back bit for bit in float32).

    path: a new or empty directory. A non-empty one raises ValueError (and is left untouched) unless `overwrite`,
    which replaces it atomically: an interrupted save never leaves a half-written directory, and an interrupted
    overwrite keeps the old content. See `jspec.checkpoint.orbax_store`.
    """
    from jspec.models.recurrent import RecurrentModel

    if isinstance(model, RecurrentModel):  # recurrent-depth models are written in the Huginn-0125 format
        from jspec.checkpoint.huginn import save_huginn

        return save_huginn(model, path, overwrite=overwrite)
    from jspec.checkpoint import orbax_store

    return orbax_store.save(model, path, overwrite=overwrite)
