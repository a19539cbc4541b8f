"""Lazy tensors: a checkpoint tensor described by shape and dtype, read slice by slice on demand.

A `LazyTensor` has `shape`, `dtype` and `read(index) -> np.ndarray` for a tuple of slices (one per axis, as
`jax.make_array_from_callback` passes them). Transforms compose without reading anything:

    FileTensor      raw bytes of a C-order array in a file; a slice reads only the byte runs it covers (os.pread:
                    nothing stays mapped or resident after the read)
    Transposed      a permutation of the axes: the index is permuted, then the slice is transposed
    Stacked         parts of one shape stacked along a new leading axis: only the parts in the index are read
    Cast            a dtype cast applied to the slice (numpy / ml_dtypes conversion, the same for any slicing)
    Reordered       the rows (leading axis) in another order: a slice reads the block of base rows it covers
    InMemory        an array already in memory (numpy, or a memory map)

Guarantee: for every index, `tensor.read(index)` equals `tensor.read_all()[index]` bit for bit, so a model read
whole and one read slice by slice onto a mesh hold the same values.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

Index = tuple[slice, ...]


class LazyTensor:
    """Base class: subclasses define `shape`, `dtype` and `_read(bounds)` for per-axis (start, stop) bounds."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize

    def read(self, index: Index = ()) -> np.ndarray:
        """The values at `index` (slices; missing trailing axes are whole), as a new C-contiguous array."""
        index = tuple(index)
        if len(index) > self.ndim or not all(isinstance(part, slice) for part in index):
            raise ValueError(f"index: expected at most {self.ndim} slices for shape {self.shape}, got {index!r}")
        index += (slice(None),) * (self.ndim - len(index))
        bounds, steps = [], []
        for part, length in zip(index, self.shape):
            start, stop, step = part.indices(length)
            if step < 1:
                raise ValueError(f"index: negative steps are not supported, got {part!r}")
            bounds.append((start, max(start, stop)))
            steps.append(slice(None, None, step))
        values = self._read(tuple(bounds))
        if any(s.step != 1 for s in steps):  # read the covering block, then take every step-th entry
            values = np.ascontiguousarray(values[tuple(steps)])
        return values

    def read_all(self) -> np.ndarray:
        return self.read(())

    def _read(self, bounds: tuple[tuple[int, int], ...]) -> np.ndarray:
        """The block [start, stop) per dimension; every subclass (InMemory, FileTensor, Transposed, Stacked, Cast)
        defines it: this base is abstract."""
        raise NotImplementedError(f"{type(self).__name__} is a LazyTensor without _read")

    def transpose(self, axes: tuple[int, ...] | None = None) -> "LazyTensor":
        axes = tuple(reversed(range(self.ndim))) if axes is None else tuple(axes)
        return self if axes == tuple(range(self.ndim)) else Transposed(self, axes)

    @property
    def T(self) -> "LazyTensor":  # noqa: N802 (numpy's name)
        return self.transpose()

    def reordered(self, rows: np.ndarray) -> "LazyTensor":
        """The tensor whose row i is row rows[i] of this one (leading axis; e.g. a RoPE row permutation)."""
        return Reordered(self, np.asarray(rows, np.int64))

    def astype(self, dtype: Any) -> "LazyTensor":
        return self if np.dtype(dtype) == np.dtype(self.dtype) else Cast(self, np.dtype(dtype))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={np.dtype(self.dtype).name})"


def _slices(bounds: tuple[tuple[int, int], ...]) -> Index:
    return tuple(slice(start, stop) for start, stop in bounds)


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class InMemory(LazyTensor):
    array: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def _read(self, bounds):
        return np.array(self.array[_slices(bounds)], order="C")


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class FileTensor(LazyTensor):
    """A C-order array of `shape` and `dtype` stored at byte `offset` of the file at `path`."""

    path: Path
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype

    def _read(self, bounds):
        out = np.empty(tuple(stop - start for start, stop in bounds), self.dtype)
        if out.size == 0:
            return out
        itemsize = out.dtype.itemsize
        # axes from `split` on are read whole: one run of bytes per combination of the outer indices
        split = len(bounds)
        while split > 0 and bounds[split - 1] == (0, self.shape[split - 1]):
            split -= 1
        strides = [itemsize * math.prod(self.shape[axis + 1 :]) for axis in range(len(self.shape))]
        if split == 0:
            runs, run_bytes = [self.offset], out.nbytes
        else:
            last = split - 1
            run_bytes = (bounds[last][1] - bounds[last][0]) * strides[last]
            starts = np.zeros((1,), np.int64) + self.offset + bounds[last][0] * strides[last]
            for axis in reversed(range(last)):  # outer axes vary slowest: row-major order, as `out` is laid out
                rows = np.arange(*bounds[axis], dtype=np.int64)[:, None] * strides[axis]
                starts = (rows + starts[None, :]).reshape(-1)
            runs = starts.tolist()
        buffer = memoryview(out.reshape(-1).view(np.uint8))
        descriptor = os.open(self.path, os.O_RDONLY)
        try:
            for number, start in enumerate(runs):
                _pread_into(descriptor, buffer[number * run_bytes : (number + 1) * run_bytes], start, self.path)
        finally:
            os.close(descriptor)
        return out


def _pread_into(descriptor: int, target: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(target):
        count = os.preadv(descriptor, [target[done:]], offset + done)
        if count == 0:
            raise ValueError(f"{path}: the file ends before byte {offset + len(target)} (truncated while reading?)")
        done += count


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class Transposed(LazyTensor):
    base: LazyTensor
    axes: tuple[int, ...]  # result axis i is base axis axes[i]

    def __post_init__(self):
        if sorted(self.axes) != list(range(self.base.ndim)):
            raise ValueError(f"axes: expected a permutation of {self.base.ndim} axes, got {self.axes}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape[axis] for axis in self.axes)

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    def _read(self, bounds):
        base_bounds = [None] * self.ndim
        for result_axis, base_axis in enumerate(self.axes):
            base_bounds[base_axis] = bounds[result_axis]
        return np.ascontiguousarray(self.base._read(tuple(base_bounds)).transpose(self.axes))


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class Stacked(LazyTensor):
    parts: tuple[LazyTensor, ...]

    def __post_init__(self):
        shapes = {(tuple(p.shape), np.dtype(p.dtype)) for p in self.parts}
        if not self.parts or len(shapes) != 1:
            raise ValueError(f"parts: expected at least one tensor, all of one shape and dtype, got {list(self.parts)}")

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.parts), *self.parts[0].shape)

    @property
    def dtype(self) -> np.dtype:
        return self.parts[0].dtype

    def _read(self, bounds):
        (first, end), rest = bounds[0], bounds[1:]
        out = np.empty((end - first, *(stop - start for start, stop in rest)), self.dtype)
        for row, part in enumerate(self.parts[first:end]):
            out[row] = part._read(rest)
        return out


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class Cast(LazyTensor):
    base: LazyTensor
    dtype: np.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.base.shape

    def _read(self, bounds):
        return self.base._read(bounds).astype(self.dtype)


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class Reordered(LazyTensor):
    base: LazyTensor
    rows: np.ndarray  # [n] int: result row i is base row rows[i]

    def __post_init__(self):
        if self.rows.ndim != 1 or (len(self.rows) and (self.rows.min() < 0 or self.rows.max() >= self.base.shape[0])):
            raise ValueError(f"rows: expected row indices in [0, {self.base.shape[0]}), got {self.rows}")

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.base.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    def _read(self, bounds):
        (first, end), rest = bounds[0], bounds[1:]
        wanted = self.rows[first:end]
        if len(wanted) == 0:
            return np.empty((0, *(stop - start for start, stop in rest)), self.dtype)
        low = int(wanted.min())
        block = self.base._read(((low, int(wanted.max()) + 1), *rest))
        return np.ascontiguousarray(block[wanted - low])


def stack(parts: Any) -> Stacked:
    """`jnp.stack` for lazy tensors (for `transformer.stack_layers`)."""
    return Stacked(tuple(parts))


def is_lazy(value: Any) -> bool:
    return isinstance(value, LazyTensor)


def read_rows(tensor: LazyTensor, max_bytes: int = 64 * 1024**2):
    """Yield (first row, block) over `tensor`'s leading axis in blocks of about `max_bytes` (at least one row):
    for comparing or scanning a large tensor without holding it whole."""
    if tensor.ndim == 0:
        yield 0, tensor.read_all()
        return
    row_bytes = max(1, tensor.nbytes // max(1, tensor.shape[0]))
    rows = max(1, max_bytes // row_bytes)
    for first in range(0, tensor.shape[0], rows):
        yield first, tensor.read((slice(first, first + rows),))
