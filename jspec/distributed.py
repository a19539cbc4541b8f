"""Multi-host runs: every process runs the same program on its own devices, and a mesh spans all of them.

    jspec.distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=rank)   # before any other jax call
    mesh = jspec.make_mesh(data=2, model=4)                                             # every device of every host
    out = jspec.decode(model, prompts, max_new_tokens=64, mesh=mesh)                   # same call, same prompts

Every process passes the same prompts (and a model loaded the same way: `jspec.load(path, mesh=mesh)` reads
only this process's devices' slices) and receives the whole `DecodeOutput`. Prompts that exist only on one
process each (a data loader per host) are first gathered with `gather_prompts`, which returns every process's
rows in process order; `local_rows` picks this process's rows back out of the output.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jspec.validation import ArgumentError


def initialize(coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               **options: Any) -> None:
    """`jax.distributed.initialize` with the same arguments (cluster auto-detection when they are None); call it
    once per process before anything else touches the devices. On one machine (tests), also pass
    `coordinator_bind_address="127.0.0.1:PORT"` to keep the coordinator on the loopback."""
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **options)


def gather_prompts(local_prompts: list[list[int]]) -> tuple[list[list[int]], slice]:
    """Every process's token-id rows, in process order, from this process's rows (a list of token-id lists; each
    process may hold a different number of rows, at least one). Returns (all rows, the slice of them that is this
    process's): pass all rows to `jspec.decode` on every process and read your rows with `local_rows`."""
    from jax.experimental import multihost_utils

    if not isinstance(local_prompts, (list, tuple)) or not local_prompts or not all(
            isinstance(row, (list, tuple, np.ndarray)) and len(row) > 0 for row in local_prompts):
        raise ArgumentError(f"local_prompts: expected a non-empty list of non-empty token-id lists, got {local_prompts!r}")
    counts = np.asarray(multihost_utils.process_allgather(np.int32(len(local_prompts))), np.int64).reshape(-1)
    width = int(np.max(multihost_utils.process_allgather(np.int32(max(len(r) for r in local_prompts)))))
    table = np.full((int(counts.max()), width + 1), -1, np.int32)  # last column: the row's length
    for index, row in enumerate(local_prompts):
        table[index, : len(row)] = row
        table[index, width] = len(row)
    tables = np.asarray(multihost_utils.process_allgather(table))  # [processes, rows, width + 1]
    rows = [list(map(int, tables[p, r, : tables[p, r, width]])) for p in range(len(counts)) for r in range(counts[p])]
    start = int(counts[: jax.process_index()].sum())
    return rows, slice(start, start + len(local_prompts))


def local_rows(output: Any, rows: slice) -> Any:
    """The rows `rows` (from `gather_prompts`) of a `DecodeOutput`."""
    return output.select(rows)
