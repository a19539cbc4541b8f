"""The safetensors format, read and written with numpy only (no `safetensors` package needed).

Layout of a file: an 8-byte little-endian unsigned header length N, then N bytes of UTF-8 JSON
`{name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then the
data buffer: each tensor's raw little-endian bytes in C order at [begin, end) relative to the buffer start.

Guarantees:
- `load_file` validates the whole header before returning anything: the header fits in the file and is a JSON
  object; every dtype is known; every shape is a list of ints >= 0; every tensor's byte count equals
  prod(shape) * itemsize; the tensors tile the data buffer exactly (they start at 0, are contiguous, do not
  overlap, and end where the file ends). Any violation (a truncated or corrupted file) raises ValueError
  naming the file and, where it is one tensor's fault, the tensor.
- Arrays come back memory-mapped and read-only (nothing is read until it is used); `copy=True` reads them
  into memory.
- `save_file` is deterministic: the same tensors and metadata give the same bytes (names sorted, compact
  JSON with sorted keys, header padded with spaces to a multiple of 8 so every tensor is 8-byte aligned).
- `lazy_checkpoint` validates the same way and returns lazy tensors (`jspec.checkpoint.lazy.FileTensor`) whose
  slices are read by byte range, nothing left mapped: for loading onto a mesh without holding the checkpoint.
- Sharded checkpoints (`model.safetensors.index.json` with a `weight_map`) are read by `load_checkpoint` and
  written by `save_checkpoint` when the tensors exceed `max_shard_bytes`, in Hugging Face's naming
  (`model-00001-of-00003.safetensors`).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import ml_dtypes
import numpy as np

from jspec.checkpoint.lazy import FileTensor

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
METADATA_KEY = "__metadata__"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

# safetensors dtype name -> numpy dtype (always little-endian)
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_NAMES_BY_DTYPE = {dtype: name for name, dtype in DTYPES.items()}
_SHARD_PATTERN = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def dtype_name(dtype: Any) -> str:
    """The safetensors name ("F32", "BF16", ...) of a numpy/jax dtype; ValueError if it has none."""
    dtype = np.dtype(dtype)
    name = _NAMES_BY_DTYPE.get(dtype.newbyteorder("<"))
    if name is None:
        raise ValueError(f"safetensors: dtype {dtype} has no safetensors equivalent; supported: {sorted(map(str, _NAMES_BY_DTYPE))}")
    return name


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


# --- reading ------------------------------------------------------------------------------------------


def read_header(path: str | Path) -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
    """Validate a file's header. Returns (tensors {name: {dtype, shape, data_offsets}}, metadata, data start)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"safetensors file {path}: not found")
    file_size = path.stat().st_size
    if file_size < 8:
        raise ValueError(f"safetensors file {path}: {file_size} bytes, too short for the 8-byte header length (truncated?)")
    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        if header_length > MAX_HEADER_BYTES:
            raise ValueError(f"safetensors file {path}: header length {header_length} exceeds the {MAX_HEADER_BYTES}-byte limit (corrupted?)")
        if 8 + header_length > file_size:
            raise ValueError(
                f"safetensors file {path}: header length {header_length} runs past the end of the {file_size}-byte file (truncated?)"
            )
        raw = handle.read(header_length)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"safetensors file {path}: the header is not valid UTF-8 JSON ({error})") from None
    except _DuplicateKey as error:
        raise ValueError(f"safetensors file {path}: the header names {error.args[0]!r} twice (corrupted?)") from None
    if not isinstance(header, dict):
        raise ValueError(f"safetensors file {path}: the header is a JSON {type(header).__name__}, expected an object")
    metadata = header.pop(METADATA_KEY, None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"safetensors file {path}: {METADATA_KEY} must map strings to strings, got {metadata!r}")

    data_start = 8 + header_length
    data_size = file_size - data_start
    spans = []
    for name, info in header.items():
        where = f"safetensors file {path}, tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise ValueError(f"{where}: expected an entry with dtype, shape and data_offsets, got {info!r}")
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{where}: unknown dtype {info['dtype']!r}; known: {sorted(DTYPES)}")
        shape = info["shape"]
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise ValueError(f"{where}: shape must be a list of ints >= 0, got {shape!r}")
        offsets = info["data_offsets"]
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise ValueError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
        expected = math.prod(shape) * DTYPES[info["dtype"]].itemsize
        if offsets[1] - offsets[0] != expected:
            raise ValueError(
                f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, but shape {shape} of "
                f"{info['dtype']} needs {expected}"
            )
        if offsets[1] > data_size:
            raise ValueError(
                f"{where}: data ends at byte {offsets[1]} of the data buffer, but the file holds only {data_size} "
                f"data bytes (truncated?)"
            )
        spans.append((offsets[0], offsets[1], name))

    cursor = 0
    for begin, end, name in sorted(spans):
        if begin != cursor:
            problem = "overlaps the previous tensor" if begin < cursor else f"leaves a gap of {begin - cursor} bytes before it"
            raise ValueError(f"safetensors file {path}, tensor {name!r}: data_offsets [{begin}, {end}] {problem} (corrupted?)")
        cursor = end
    if cursor != data_size:
        raise ValueError(
            f"safetensors file {path}: the tensors cover {cursor} data bytes but the file holds {data_size} "
            "(trailing bytes: corrupted?)"
        )
    return header, metadata, data_start


def load_file(path: str | Path, names: Iterable[str] | None = None, *, copy: bool = False) -> dict[str, np.ndarray]:
    """Tensors of one safetensors file as numpy arrays (all of them, or `names`), validated (see module doc).

    Arrays are read-only memory maps unless `copy=True`.
    """
    path = Path(path)
    header, _, data_start = read_header(path)
    wanted = sorted(header) if names is None else list(names)
    missing = [n for n in wanted if n not in header]
    if missing:
        raise ValueError(f"safetensors file {path}: no tensor(s) {missing}")
    if not wanted:
        return {}
    buffer = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {}
    for name in wanted:
        info = header[name]
        begin, end = info["data_offsets"]
        array = buffer[data_start + begin : data_start + end].view(DTYPES[info["dtype"]]).reshape(info["shape"])
        tensors[name] = np.array(array) if copy else array
    return tensors


def load_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file (validated like `load_file`)."""
    return read_header(path)[1]


def checkpoint_files(directory: str | Path) -> dict[str, Path]:
    """{tensor name: file} for a directory's `model.safetensors`, or the shards of its index file.

    Like transformers, a single `model.safetensors` is preferred when both exist. The index is validated:
    every shard exists and holds exactly the tensors the weight_map assigns to it.
    """
    directory = Path(directory)
    single, index = directory / SINGLE_FILE, directory / INDEX_FILE
    if single.is_file():
        header, _, _ = read_header(single)
        return {name: single for name in header}
    if not index.is_file():
        raise ValueError(f"checkpoint {directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"checkpoint index {index}: expected JSON with a 'weight_map' object ({error!r})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"checkpoint index {index}: 'weight_map' must map tensor names to shard file names")
    files: dict[str, Path] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = directory / shard
        if Path(shard).name != shard:
            raise ValueError(f"checkpoint index {index}: shard {shard!r} is not a file name in the checkpoint directory")
        if not shard_path.is_file():
            listed = sorted(n for n, s in weight_map.items() if s == shard)
            raise ValueError(f"checkpoint index {index}: shard {shard} (holding {listed[:3]}...) is missing")
        header, _, _ = read_header(shard_path)
        for name in sorted(header):
            if weight_map.get(name) != shard:
                raise ValueError(
                    f"checkpoint {directory}: tensor {name!r} is in shard {shard} but the index assigns it to "
                    f"{weight_map.get(name)!r}"
                )
        for name in sorted(n for n, s in weight_map.items() if s == shard):
            if name not in header:
                raise ValueError(f"checkpoint {directory}: tensor {name!r} is listed in the index for {shard} but that shard lacks it")
            files[name] = shard_path
    return files


def lazy_checkpoint(directory: str | Path) -> dict[str, FileTensor]:
    """Every tensor of a directory's safetensors checkpoint (single file or sharded), validated like
    `load_checkpoint`, as lazy tensors (`jspec.checkpoint.lazy.FileTensor`): nothing but the headers is read;
    each slice read later reads only its own bytes."""
    headers: dict[Path, tuple[dict[str, dict[str, Any]], int]] = {}
    tensors = {}
    for name, path in checkpoint_files(directory).items():
        if path not in headers:
            header, _, data_start = read_header(path)
            headers[path] = (header, data_start)
        header, data_start = headers[path]
        info = header[name]
        offset = data_start + info["data_offsets"][0]
        tensors[name] = FileTensor(path, offset, tuple(info["shape"]), DTYPES[info["dtype"]])
    return tensors


def load_checkpoint(directory: str | Path, *, copy: bool = False) -> dict[str, np.ndarray]:
    """Every tensor of a directory's safetensors checkpoint (single file or sharded), validated."""
    by_file: dict[Path, list[str]] = {}
    for name, path in checkpoint_files(directory).items():
        by_file.setdefault(path, []).append(name)
    tensors: dict[str, np.ndarray] = {}
    for path, names in sorted(by_file.items()):
        tensors.update(load_file(path, names, copy=copy))
    return tensors


# --- writing ------------------------------------------------------------------------------------------


def _as_numpy(name: str, value: Any) -> np.ndarray:
    array = np.asarray(value)
    dtype_name(array.dtype)  # raises for dtypes safetensors cannot hold
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)  # a no-op on little-endian hosts
    return array if array.flags.c_contiguous else array.copy(order="C")  # (ascontiguousarray makes 0-d arrays 1-d)


def serialize(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> tuple[bytes, list[np.ndarray]]:
    """The header bytes (length prefix included) and the arrays in file order."""
    arrays = {}
    for name in sorted(tensors):
        if not isinstance(name, str) or name == METADATA_KEY:
            raise ValueError(f"safetensors: invalid tensor name {name!r}")
        arrays[name] = _as_numpy(name, tensors[name])
    header: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError(f"safetensors: metadata must map str to str, got {dict(metadata)!r}")
        header[METADATA_KEY] = dict(sorted(metadata.items()))
    offset = 0
    for name, array in arrays.items():
        header[name] = {"dtype": dtype_name(array.dtype), "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded, list(arrays.values())


def save_file(tensors: Mapping[str, Any], path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors (numpy or jax arrays) to one safetensors file, deterministically (see module doc).

    The file is written beside its destination and renamed into place, so a reader never sees half a file.
    """
    path = Path(path)
    header, arrays = serialize(tensors, metadata)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        handle.write(header)
        for array in arrays:
            handle.write(array.reshape(-1).view(np.uint8).data if array.size else b"")
    os.replace(temporary, path)


def save_checkpoint(
    tensors: Mapping[str, Any],
    directory: str | Path,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write a checkpoint into `directory`: one `model.safetensors`, or, when the tensors' bytes exceed
    `max_shard_bytes`, shards `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`.

    Tensors are assigned to shards in name order, a new shard starting when the next tensor would push the
    current one past the limit (a single tensor larger than the limit gets a shard of its own). Safetensors
    files of an earlier save in the directory (`model.safetensors`, its index, `model-*-of-*` shards) are
    removed so that the directory holds exactly one checkpoint. Returns the files written.
    """
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes: expected a positive int, got {max_shard_bytes!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {name: _as_numpy(name, tensors[name]) for name in sorted(tensors)}
    metadata = dict(metadata or {})
    total = sum(a.nbytes for a in arrays.values())
    groups: list[list[str]] = [[]]
    size = 0
    for name, array in arrays.items():
        if groups[-1] and size + array.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += array.nbytes

    for stale in directory.iterdir():
        if stale.name in (SINGLE_FILE, INDEX_FILE) or _SHARD_PATTERN.match(stale.name):
            stale.unlink()
    if len(groups) == 1:
        path = directory / SINGLE_FILE
        save_file(arrays, path, metadata)
        return [path]
    written, weight_map = [], {}
    for number, names in enumerate(groups, 1):
        shard = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: arrays[n] for n in names}, directory / shard, metadata)
        weight_map.update({n: shard for n in names})
        written.append(directory / shard)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return written + [directory / INDEX_FILE]
