"""A training corpus every machine has: the Python standard library's own sources.

`build_manifest()` walks `sysconfig.get_paths()["stdlib"]`, keeps the `*.py` files outside test directories and
site-packages, and records the Python version with the sorted file list (relative path, size, sha256). The
manifest is what makes a corpus rebuildable: `load_documents(manifest)` reads exactly those files and raises if
any differs (a different Python patch release ships different sources; rebuild the manifest there instead).

The held-out split is by file and deterministic: a file is held out when the hash of its relative path falls
below `heldout_fraction` (`split_of`), so the split does not depend on which other files exist.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sysconfig
from pathlib import Path
from typing import Any, Iterable

MANIFEST_VERSION = 1
# Directory names never descended into: test suites (their data files are odd, and they are huge), installed
# third-party packages, byte-code caches.
EXCLUDED_DIRS = ("test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__")
# Files larger than this are generated data (pydoc_data/topics.py is one 700 KB string), not code.
MAX_FILE_BYTES = 400_000
DEFAULT_HELDOUT_FRACTION = 0.05
SPLIT_SALT = "jspec-heldout-v1"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relative_path: str, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> str:
    """"heldout" or "train", a pure function of the file's relative path (posix form) and the fraction."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction: expected a float in [0, 1), got {heldout_fraction!r}")
    digest = hashlib.sha256(f"{SPLIT_SALT}:{relative_path}".encode()).digest()
    value = int.from_bytes(digest[:8], "big") / 2.0**64
    return "heldout" if value < heldout_fraction else "train"


def _excluded_dir(name: str) -> bool:
    return name in EXCLUDED_DIRS or name.startswith("test_") or name.startswith(".")


def file_sha256(path: Path) -> str:
    """sha256 (hex) of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_manifest(root: str | Path | None = None, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> dict[str, Any]:
    """Walk `root` (default: this interpreter's stdlib) and describe the corpus. Deterministic for a given tree."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise ValueError(f"root: {str(root)!r} is not a directory")
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not _excluded_dir(d))
        for name in names:
            if not name.endswith(".py"):
                continue
            path = Path(directory) / name
            if path.is_symlink() or not path.is_file():
                continue
            size = path.stat().st_size
            if size == 0 or size > MAX_FILE_BYTES:
                continue
            relative = path.relative_to(root).as_posix()
            try:
                path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                continue
            files.append({"path": relative, "size": size, "sha256": file_sha256(path), "split": split_of(relative, heldout_fraction)})
    files.sort(key=lambda entry: entry["path"])
    digest = hashlib.sha256("\n".join(f"{f['path']} {f['sha256']}" for f in files).encode()).hexdigest()
    return {
        "format": "jspec-corpus-manifest",
        "version": MANIFEST_VERSION,
        "source": "python-stdlib",
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "root": str(root),
        "excluded_dirs": list(EXCLUDED_DIRS),
        "max_file_bytes": MAX_FILE_BYTES,
        "heldout_fraction": heldout_fraction,
        "split_salt": SPLIT_SALT,
        "num_files": len(files),
        "num_bytes": sum(f["size"] for f in files),
        "num_heldout_files": sum(f["split"] == "heldout" for f in files),
        "digest": digest,
        "files": files,
    }


def save_manifest(manifest: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def load_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"corpus manifest: no file at {str(path)!r}")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != "jspec-corpus-manifest" or manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"corpus manifest {str(path)!r}: not a version-{MANIFEST_VERSION} jspec corpus manifest")
    return manifest


def split_files(manifest: dict[str, Any], split: str) -> list[dict[str, Any]]:
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split: expected 'train', 'heldout' or 'all', got {split!r}")
    return [f for f in manifest["files"] if split == "all" or f["split"] == split]


def manifest_root(manifest: dict[str, Any]) -> Path:
    """The directory a manifest's paths are relative to (see `load_documents`); ValueError when it names none."""
    if manifest.get("root"):
        return Path(manifest["root"])
    if manifest.get("source") == "python-stdlib":
        return stdlib_root()
    raise ValueError("root: the corpus manifest records no root directory and is not a python-stdlib manifest; pass "
                     "the directory its files are relative to")


def load_documents(
    manifest: dict[str, Any], split: str, root: str | Path | None = None, verify: bool = True
) -> list[str]:
    """The texts of the split's files, in manifest (sorted path) order.

    verify: check every file's sha256 against the manifest and raise ValueError naming the first that differs
    or is missing (the corpus would not be the one the manifest describes).
    root: where the listed files are; None: the manifest's "root", else (a shipped manifest records none) this
    interpreter's stdlib for a "python-stdlib" manifest.
    """
    root = Path(root) if root is not None else manifest_root(manifest)
    texts = []
    for entry in split_files(manifest, split):
        path = root / entry["path"]
        if not path.is_file():
            raise ValueError(
                f"corpus: {entry['path']!r} listed in the manifest is missing under {str(root)!r} "
                f"(manifest built with Python {manifest['python_version']}; this is {platform.python_version()})"
            )
        data = path.read_bytes()
        if verify and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ValueError(
                f"corpus: {entry['path']!r} differs from the manifest's sha256 (manifest built with Python "
                f"{manifest['python_version']}; this is {platform.python_version()}); rebuild the manifest"
            )
        texts.append(data.decode("utf-8"))
    return texts


def manifest_summary(manifest: dict[str, Any]) -> str:
    return (
        f"Python {manifest['python_version']} stdlib: {manifest['num_files']} files, {manifest['num_bytes']:,} bytes, "
        f"{manifest['num_heldout_files']} held out (fraction {manifest['heldout_fraction']}), digest {manifest['digest'][:16]}"
    )


def iter_files(manifest: dict[str, Any], split: str) -> Iterable[str]:
    return (f["path"] for f in split_files(manifest, split))
