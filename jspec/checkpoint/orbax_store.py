"""Orbax checkpoints of a `jspec.Model`: parameters, config, tokenizer and a validating manifest.

Layout of a checkpoint directory:

    manifest.json    format name and version, the config, the tokenizer kind, and per parameter leaf its
                     path, shape, dtype and sha256 (of the little-endian bytes)
    config.json      the TransformerConfig (the same dict as in the manifest; for people and other tools)
    tokenizer.json   when the model carries an HFTokenizer
    params/          the parameter pytree, written by orbax's StandardCheckpointer

Guarantees:
- Atomic: everything is written into a temporary sibling directory (`.<name>.tmp-<random>`) and renamed onto
  `path` only when complete. An interrupted save leaves at most that temporary directory, which `restore`
  does not accept (it has no manifest at the requested path), and never a half-written `path`.
- Nothing is destroyed unasked: a non-empty directory at `path` is refused unless `overwrite=True`, and an
  interrupted overwrite keeps the old content (`jspec.checkpoint.directories`).
- Exact: `restore(save(model))` gives bit-identical parameters (float32, bfloat16, float16) with the same
  config and tokenizer; every leaf is checked against its recorded shape, dtype and sha256.
- A missing, partial, corrupted or mismatched checkpoint raises ValueError naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

import jax
import jax.numpy as jnp

from jspec.checkpoint.directories import check_destination, replace_directory, write_directory  # noqa: F401 (re-export)
from jspec.models import transformer
from jspec.models.config import TransformerConfig
from jspec.models.model import Model
from jspec.tokenizer import ByteTokenizer, HFTokenizer

FORMAT = "jspec-orbax-model"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARAMS_DIR = "params"


def leaf_path_name(path: tuple) -> str:
    parts = []
    for entry in path:
        for attr in ("key", "idx", "name"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def leaf_sha256(leaf: Any) -> str:
    array = np.asarray(jax.device_get(leaf))
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def describe_params(params: Any) -> list[dict[str, Any]]:
    """Per leaf: path, shape, dtype and sha256, in flattening order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    return [
        {"path": leaf_path_name(path), "shape": list(leaf.shape), "dtype": str(jnp.dtype(leaf.dtype)), "sha256": leaf_sha256(leaf)}
        for path, leaf in leaves
    ]


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` looks like a jspec orbax model checkpoint (has a manifest of this format)."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def _tokenizer_entry(tokenizer: Any) -> dict[str, Any] | None:
    if tokenizer is None:
        return None
    if isinstance(tokenizer, HFTokenizer):
        return {
            "type": "hf",
            "file": "tokenizer.json",
            "eos_token_ids": list(tokenizer.eos_token_ids),
            "bos_token_id": tokenizer.bos_token_id,
        }
    if isinstance(tokenizer, ByteTokenizer):
        return {"type": "byte"}
    raise ValueError(f"model.tokenizer: cannot save a {type(tokenizer).__name__}; expected HFTokenizer, ByteTokenizer or None")


def save(model: Model, path: str | Path, *, overwrite: bool = False, _before_rename=None) -> Path:
    """Write `model` to the directory `path` atomically (see the module docstring). Returns the absolute path.

    path: a new or empty directory; a non-empty one raises ValueError unless `overwrite`, which replaces it
    atomically: the old content stays in place until the new checkpoint is complete, and stays if writing fails
    (`jspec.checkpoint.directories`).
    """
    import orbax.checkpoint as ocp

    if not isinstance(model, Model):
        raise ValueError(f"model: expected a jspec.Model, got {type(model).__name__}")
    check_destination(path, overwrite=overwrite)  # before any work
    tokenizer_entry = _tokenizer_entry(model.tokenizer)
    params = jax.device_get(model.params)
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "tokenizer": tokenizer_entry,
        "num_parameters": int(sum(np.size(leaf) for leaf in jax.tree.leaves(params))),
        "leaves": describe_params(params),
    }

    def write(tmp: Path) -> None:
        checkpointer = ocp.StandardCheckpointer()
        try:
            checkpointer.save(tmp / PARAMS_DIR, params)
            checkpointer.wait_until_finished()
        finally:
            checkpointer.close()
        (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        if tokenizer_entry is not None and tokenizer_entry["type"] == "hf":
            model.tokenizer.save(tmp / "tokenizer.json")
            manifest["tokenizer"]["sha256"] = hashlib.sha256((tmp / "tokenizer.json").read_bytes()).hexdigest()
        # The manifest is written last: a directory without one is never a checkpoint.
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")

    return write_directory(path, write, overwrite=overwrite, _before_rename=_before_rename)


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {str(path)!r}: does not exist")
    if not path.is_dir():
        raise ValueError(f"checkpoint {str(path)!r}: is not a directory")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(
            f"checkpoint {str(path)!r}: no {MANIFEST} (not a jspec orbax checkpoint, or a save that did not finish)"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"checkpoint {str(path)!r}: {MANIFEST} is unreadable or corrupted ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"checkpoint {str(path)!r}: {MANIFEST} is not a {FORMAT!r} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {str(path)!r}: format version {manifest.get('version')!r}, this jspec reads version {FORMAT_VERSION}"
        )
    for key in ("config", "leaves"):
        if key not in manifest:
            raise ValueError(f"checkpoint {str(path)!r}: {MANIFEST} lacks {key!r}")
    return manifest


def restore(path: str | Path, dtype: str | None = None, *, verify: bool = True) -> Model:
    """Read a checkpoint written by `save`. dtype: cast the parameters (and the config's dtype) after reading.

    verify: check every leaf's sha256 against the manifest (cheap next to reading; turn off only for speed).
    Raises ValueError naming what is wrong for a missing, partial, corrupted or mismatched checkpoint.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    manifest = read_manifest(path)
    try:
        config = TransformerConfig.from_dict(manifest["config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"checkpoint {str(path)!r}: the manifest's config is invalid ({error})") from None
    config_file = path / "config.json"
    if config_file.is_file():
        try:
            on_disk = json.loads(config_file.read_text())
        except ValueError as error:
            raise ValueError(f"checkpoint {str(path)!r}: config.json is corrupted ({error})") from None
        if on_disk != manifest["config"]:
            differing = sorted(k for k in set(on_disk) | set(manifest["config"]) if on_disk.get(k) != manifest["config"].get(k))
            raise ValueError(f"checkpoint {str(path)!r}: config.json differs from the manifest in {differing}")

    expected = jax.eval_shape(lambda: transformer.init_params(config.replace(dtype="float32"), jax.random.key(0)))
    expected_leaves, treedef = jax.tree_util.tree_flatten_with_path(expected)
    recorded = manifest["leaves"]
    names = [leaf_path_name(p) for p, _ in expected_leaves]
    if [entry["path"] for entry in recorded] != names:
        missing = sorted(set(names) - {e["path"] for e in recorded})
        extra = sorted({e["path"] for e in recorded} - set(names))
        raise ValueError(
            f"checkpoint {str(path)!r}: parameter leaves do not match the config (missing {missing[:5]}, unexpected {extra[:5]})"
        )
    abstract_leaves = []
    for (leaf_path, shape_struct), entry in zip(expected_leaves, recorded):
        if list(shape_struct.shape) != list(entry["shape"]):
            raise ValueError(
                f"checkpoint {str(path)!r}: leaf {entry['path']!r} has shape {entry['shape']}, the config implies {list(shape_struct.shape)}"
            )
        abstract_leaves.append(jax.ShapeDtypeStruct(tuple(entry["shape"]), jnp.dtype(entry["dtype"])))
    abstract = jax.tree_util.tree_unflatten(treedef, abstract_leaves)

    params_dir = path / PARAMS_DIR
    if not params_dir.is_dir():
        raise ValueError(f"checkpoint {str(path)!r}: the {PARAMS_DIR}/ directory is missing (partial checkpoint)")
    checkpointer = ocp.StandardCheckpointer()
    try:
        params = checkpointer.restore(params_dir, abstract)
    except Exception as error:  # orbax/tensorstore raise many types for unreadable data
        message = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
        raise ValueError(f"checkpoint {str(path)!r}: the parameters could not be read (truncated or corrupted?): {message}") from None
    finally:
        checkpointer.close()

    restored_leaves, restored_def = jax.tree_util.tree_flatten_with_path(params)
    if restored_def != treedef:
        raise ValueError(f"checkpoint {str(path)!r}: the parameter tree read back differs from the manifest's")
    for (_, leaf), entry in zip(restored_leaves, recorded):
        if list(leaf.shape) != list(entry["shape"]) or str(jnp.dtype(leaf.dtype)) != entry["dtype"]:
            raise ValueError(
                f"checkpoint {str(path)!r}: leaf {entry['path']!r} read back as {leaf.dtype}{list(leaf.shape)}, "
                f"the manifest says {entry['dtype']}{entry['shape']}"
            )
        if verify and leaf_sha256(leaf) != entry["sha256"]:
            raise ValueError(f"checkpoint {str(path)!r}: leaf {entry['path']!r} fails its checksum (corrupted data)")

    tokenizer = _restore_tokenizer(path, manifest.get("tokenizer"), config)
    if dtype is not None:
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype: expected 'float32', 'bfloat16' or 'float16', got {dtype!r}")
        params = jax.tree.map(lambda x: x.astype(dtype), params)
        config = config.replace(dtype=dtype)
    params = jax.tree.map(jnp.asarray, params)
    return Model(params=params, config=config, tokenizer=tokenizer)


def _restore_tokenizer(path: Path, entry: dict[str, Any] | None, config: TransformerConfig) -> Any:
    if entry is None:
        return None
    if entry.get("type") == "byte":
        return ByteTokenizer()
    if entry.get("type") != "hf":
        raise ValueError(f"checkpoint {str(path)!r}: unknown tokenizer type {entry.get('type')!r}")
    file = path / entry.get("file", "tokenizer.json")
    if not file.is_file():
        raise ValueError(f"checkpoint {str(path)!r}: {file.name} is missing (the manifest lists one)")
    data = file.read_bytes()
    if "sha256" in entry and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(f"checkpoint {str(path)!r}: {file.name} fails its checksum (corrupted or replaced)")
    try:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as error:
        raise ValueError(f"checkpoint {str(path)!r}: {file.name} cannot be read ({error})") from None
    eos = tuple(entry.get("eos_token_ids", config.eos_token_ids))
    return HFTokenizer(tokenizer, eos_token_ids=eos, bos_token_id=entry.get("bos_token_id"), path=str(file))
