"""Writing output directories without destroying what a user saved.

Guarantees, for every writer built on `write_directory` (`jspec.save`, `save_hf`, the demo export):
- Refusal: a destination that is a non-empty directory is left untouched (a ValueError names the argument, the
  directory and the way out) unless the caller passes `overwrite=True`; a destination that is a file, or that
  holds the current working directory, is refused even then. A missing path or an empty directory is written.
- Atomic replace: the new content is written into a fresh hidden sibling (`.<name>.tmp-<random>`) and moved onto
  the destination by two renames only when complete. An error at any point (while writing, or between the two
  renames) leaves the old content at the destination and removes the temporary sibling; a process killed between
  the two renames leaves the old content in a hidden `.<name>.old-<random>` sibling, never a half-written path.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

OVERWRITE_HINT = "pass overwrite=True (CLI: --overwrite) to replace it, or choose a new or empty directory"


def _sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{uuid.uuid4().hex[:12]}"


def check_destination(path: str | Path, *, overwrite: bool, argument: str = "path") -> Path:
    """The absolute `path`, if a writer may put a directory there (see the module docstring); else ValueError
    naming `argument`, the directory and the way out."""
    path = Path(path).absolute()
    if path.is_file() or (path.exists() and not path.is_dir()):
        raise ValueError(f"{argument}: {str(path)!r} is a file, not a directory; choose a directory path")
    if not path.is_dir() or not any(path.iterdir()):
        return path
    if not overwrite:
        entries = sorted(p.name for p in path.iterdir())
        shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
        where = f"{argument}: directory {str(path)!r}"
        raise ValueError(f"{where} already exists and is not empty (holds {shown}); {OVERWRITE_HINT}")
    cwd = Path.cwd().resolve()
    if cwd == path.resolve() or path.resolve() in cwd.parents:
        raise ValueError(f"{argument}: {str(path)!r} holds the current working directory; refusing to replace it")
    return path


def replace_directory(source: Path, destination: Path, *, _between_renames: Callable[[], None] | None = None) -> None:
    """Move the finished directory `source` onto `destination`, replacing what was there (see the module
    docstring): on an error between the two renames the old directory is moved back before the error propagates.

    _between_renames: tests only; called after the old directory moved aside, before the new one moves in.
    """
    if not destination.exists():
        os.rename(source, destination)
        return
    old = _sibling(destination, "old")
    os.rename(destination, old)
    try:
        if _between_renames is not None:
            _between_renames()
        os.rename(source, destination)
    except BaseException:
        os.rename(old, destination)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_directory(
    path: str | Path,
    write: Callable[[Path], None],
    *,
    overwrite: bool = False,
    argument: str = "path",
    _before_rename: Callable[[Path], None] | None = None,
) -> Path:
    """Create the directory `path` by calling `write(tmp)` on a fresh temporary sibling, then moving it onto `path`
    with `replace_directory`. Checks `path` first (`check_destination`). Returns the absolute path.

    _before_rename: tests only; called with the finished temporary directory to simulate an interruption.
    """
    path = check_destination(path, overwrite=overwrite, argument=argument)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        tmp.mkdir()
        write(tmp)
        if _before_rename is not None:
            _before_rename(tmp)
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_text_atomically(path: Path, text: str) -> None:
    """Replace the file `path` by `text` in one rename: readers see the old file or the new one, never a part."""
    tmp = _sibling(path, "tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
