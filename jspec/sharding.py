"""Meshes: where a model's parameters, caches and batches live when several devices (or hosts) decode together.

Model code names logical axes only (`model.param_axes`, `model.cache_axes`: "batch", "q_heads", "kv_heads",
"mlp", "vocab", ...). A `MeshSharding` maps them to the axes of a `jax.sharding.Mesh` through one rules table:

    batch -> "data"        attention heads, KV heads, MLP hidden, vocabulary -> "model"        the rest replicated

`shard(model, mesh)` places the parameters by those rules and records the mesh on the model (in its kernel
options: how it computes), so that every cache the model creates inside a compiled loop is created sharded,
the Pallas kernels run per shard under `jax.shard_map`, and `jspec.decode` places the batch over "data".

`jspec.load(path, mesh=mesh)` builds the same placement straight from a safetensors checkpoint: `place` reads a
lazy checkpoint tensor (`jspec.checkpoint.lazy`) one addressable device's slice at a time (`place_from`), so no
host holds a whole checkpoint, and each process of a multi-host mesh reads only its own devices' slices.

Divisibility: a sharded axis must divide evenly over its mesh axis (a ValueError names the numbers), except KV
heads: when the model axis has more devices than the model has KV heads, K/V projections and the KV cache are
replicated over "model" (each device keeps every KV head and attends with its own query heads), as large
serving stacks do. Meshes are used with `AxisType.Auto` axes (XLA's sharding propagation inside the loop); a
mesh built with Explicit axes is accepted and rebuilt over the same devices with Auto axes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jspec.checkpoint.lazy import is_lazy
from jspec.validation import ArgumentError

DATA, MODEL = "data", "model"
# logical axis -> mesh axis (or None: replicated). Axes not named here are replicated.
DEFAULT_RULES: Mapping[str, str | None] = {
    "batch": DATA,
    "q_heads": MODEL,
    "kv_heads": MODEL,
    "mlp": MODEL,
    "vocab": MODEL,
}
UNITS = {"q_heads": "attention heads", "kv_heads": "KV heads", "mlp": "MLP hidden units",
         "vocab": "vocabulary entries", "batch": "batch rows", "latent": "MLA latent dims (kv_lora_rank)",
         "rope_dim": "MLA RoPE key dims (qk_rope_head_dim)"}
# Logical axes that are replicated (not an error) when their count does not divide the mesh axis.
REPLICABLE = frozenset({"kv_heads"})


def make_mesh(data: int = 1, model: int | None = None, *, devices: Any = None) -> Mesh:
    """A mesh with axes ("data", "model") of sizes (data, model) over `devices` (default: every device of every
    process, `jax.devices()`); model=None takes the devices left over by `data`. Axes are `AxisType.Auto`."""
    devices = list(jax.devices() if devices is None else devices)
    _check_positive("data", data)
    if model is None:
        if len(devices) % data:
            raise ArgumentError(f"data: {data} does not divide the {len(devices)} devices")
        model = len(devices) // data
    _check_positive("model", model)
    if data * model != len(devices):
        raise ArgumentError(f"make_mesh: data={data} x model={model} = {data * model} devices, but there are "
                            f"{len(devices)} devices (pass devices=... to use a subset)")
    return jax.make_mesh((data, model), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def parse_mesh(text: str) -> Mesh:
    """A mesh from the CLI form "data=2,model=4" (either may be left out; see `make_mesh`)."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        name, _, value = part.partition("=")
        if name.strip() not in (DATA, MODEL) or not value.strip().isdigit() or name.strip() in sizes:
            raise ArgumentError(f"mesh: expected the form data=N,model=M (each at most once), got {text!r}")
        sizes[name.strip()] = int(value)
    if not sizes:
        raise ArgumentError(f"mesh: expected the form data=N,model=M, got {text!r}")
    return make_mesh(sizes.get(DATA, 1), sizes.get(MODEL))


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ArgumentError(f"{name}: expected a positive int (devices along that mesh axis), got {value!r}")


def auto_mesh(mesh: Mesh) -> Mesh:
    """`mesh` with every axis `AxisType.Auto` (the same devices and names)."""
    if not isinstance(mesh, Mesh):
        raise ArgumentError(f"mesh: expected a jax.sharding.Mesh (e.g. jspec.make_mesh(data=2, model=4)), got {mesh!r}")
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def same_mesh(a: Mesh, b: Mesh) -> bool:
    """Whether two meshes place the same devices the same way under the same axis names (axis types aside)."""
    return a.axis_names == b.axis_names and a.devices.shape == b.devices.shape and all(
        x.id == y.id for x, y in zip(a.devices.flat, b.devices.flat)
    )


def describe(mesh: Mesh) -> str:
    return "{" + ", ".join(f"{n}: {s}" for n, s in mesh.shape.items()) + "} over devices " + str(
        [d.id for d in mesh.devices.flat])


@dataclasses.dataclass(frozen=True)
class MeshSharding:
    """A mesh and the rules that map logical axes onto it. Hashable: a model carries it as static metadata.

    counts: the number of units along each logical axis that must divide evenly (heads, not heads x head_dim),
    from the model config (`logical_counts`)."""

    mesh: Mesh
    rules: tuple[tuple[str, Any], ...]
    counts: tuple[tuple[str, int], ...] = ()

    @classmethod
    def create(cls, mesh: Mesh, rules: Mapping[str, Any] | None = None, counts: Mapping[str, int] | None = None):
        mesh = auto_mesh(mesh)
        merged = dict(DEFAULT_RULES)
        if rules is not None:
            if not isinstance(rules, Mapping):
                raise ArgumentError(f"rules: expected a dict of logical axis -> mesh axis name (or None), got {rules!r}")
            merged.update(rules)
        for logical, target in merged.items():
            for axis in _mesh_axes(target):
                if axis not in mesh.axis_names:
                    raise ArgumentError(
                        f"mesh: has axes {tuple(mesh.axis_names)}, but the sharding rules map {logical!r} to {axis!r}; "
                        "build the mesh with jspec.make_mesh(data=, model=) or pass rules= naming its axes")
        return cls(mesh, tuple(sorted(merged.items())), tuple(sorted((counts or {}).items())))

    def axis_size(self, logical: str) -> int:
        """Devices the logical axis is split over by the rules (1: replicated)."""
        return math.prod(self.mesh.shape[a] for a in _mesh_axes(dict(self.rules).get(logical)))

    def spec(self, axes: tuple[str, ...], shape: tuple[int, ...] | None = None) -> PartitionSpec:
        """The PartitionSpec of an array with logical `axes` (and `shape`, checked for divisibility)."""
        rules, counts = dict(self.rules), dict(self.counts)
        used: set[str] = set()
        parts = []
        for index, logical in enumerate(axes):
            target = _mesh_axes(rules.get(logical))
            size = math.prod(self.mesh.shape[a] for a in target)
            if not target or size == 1 or used & set(target):
                parts.append(None)
                continue
            count = counts.get(logical, shape[index] if shape is not None else None)
            if count is not None and count % size:
                if logical in REPLICABLE:
                    parts.append(None)
                    continue
                raise ArgumentError(
                    f"mesh: {count} {UNITS.get(logical, logical)} ({logical!r}) do not divide over mesh axis {'x'.join(target)} of size {size}; "
                    f"use a mesh whose {'x'.join(target)} axis divides {count}, or rules={{{logical!r}: None}} to "
                    "replicate it")
            used.update(target)
            parts.append(target[0] if len(target) == 1 else target)
        return PartitionSpec(*parts)

    def named(self, axes: tuple[str, ...], shape: tuple[int, ...] | None = None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(axes, shape))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def tree_shardings(self, tree: Any, axes: Any) -> Any:
        """A NamedSharding per array leaf of `tree`, from the matching leaf (a tuple of names) of `axes` (the same
        structure; static metadata such as a cache's capacity may differ)."""
        return _map_with_axes(lambda names, leaf: self.named(names, tuple(leaf.shape)), tree, axes)

    def constrain(self, tree: Any, axes: Any) -> Any:
        """`with_sharding_constraint` on every array leaf of `tree` (inside jit) by its logical axes."""
        return _map_with_axes(
            lambda names, leaf: jax.lax.with_sharding_constraint(leaf, self.named(names, tuple(leaf.shape))), tree, axes)


def _map_with_axes(function: Callable, tree: Any, axes: Any) -> Any:
    leaves, treedef = jax.tree.flatten(tree)
    names = jax.tree.leaves(axes, is_leaf=_is_axes)
    if len(names) != len(leaves):
        raise ValueError(f"logical axes: {len(names)} entries for a tree of {len(leaves)} arrays")
    for name, leaf in zip(names, leaves):
        if len(name) != len(leaf.shape):
            raise ValueError(f"logical axes: {name} for an array of shape {tuple(leaf.shape)}")
    return jax.tree.unflatten(treedef, [function(n, leaf) for n, leaf in zip(names, leaves)])


def _mesh_axes(target: Any) -> tuple[str, ...]:
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def _is_axes(value: Any) -> bool:
    return isinstance(value, tuple) and all(isinstance(v, str) for v in value)


def logical_counts(config: Any, batch_size: int | None = None) -> dict[str, int]:
    """Units along each logical axis that must divide evenly (heads are split whole, never inside a head)."""
    counts = {"q_heads": config.num_heads, "kv_heads": config.num_kv_heads, "mlp": config.intermediate_size,
              "vocab": config.vocab_size}
    if batch_size is not None:
        counts["batch"] = batch_size
    return counts


def place(value: Any, sharding: NamedSharding) -> jax.Array:
    """A global array with `sharding` from a host value every process holds whole (numpy, or a jax array on
    addressable devices): each device receives only its slice, also on a multi-host mesh. A lazy tensor
    (`jspec.checkpoint.lazy.LazyTensor`, e.g. a checkpoint tensor not yet read) is read slice by slice instead
    (`place_from`), each distinct slice once."""
    if is_lazy(value):
        return place_from(value.shape, sharding, _read_once(value.read))
    if isinstance(value, jax.Array) and value.is_fully_addressable and len(jax.devices()) == len(jax.local_devices()):
        return jax.device_put(value, sharding)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place_from(shape: tuple[int, ...], sharding: NamedSharding, read: Callable[[tuple[slice, ...]], np.ndarray]):
    """A global array with `sharding`, each addressable device's slice read by `read(index)` (e.g. from a
    memory-mapped file): nothing larger than one device's slice is materialised on the host."""
    return jax.make_array_from_callback(tuple(shape), sharding, read)


def _read_once(read: Callable[[tuple[slice, ...]], np.ndarray]) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """`read` remembering its results by index: devices that replicate a slice (e.g. over "data") share one read.
    `make_array_from_callback` holds every device's slice of one array until it transfers them, so the cache
    costs nothing extra and lives only as long as that call."""
    done: dict[tuple, np.ndarray] = {}

    def cached(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((part.start, part.stop, part.step) for part in index)
        if key not in done:
            done[key] = read(index)
        return done[key]

    return cached


def shard(model: Any, mesh: Mesh, rules: Mapping[str, Any] | None = None) -> Any:
    """The model with its parameters placed on `mesh` by their logical axes (see the module docstring); the mesh
    and rules are recorded on the model so caches and kernels follow. Parameters are never gathered whole on one
    device. A model already sharded on this mesh with these rules is returned as is."""
    plan = MeshSharding.create(mesh, rules, logical_counts(model.config))
    current = model.kernels.sharding
    if current is not None and current == plan:
        return model
    return shard_with(model, plan)


def shard_with(model: Any, plan: MeshSharding) -> Any:
    """The model with every parameter placed by `plan` (`place`: arrays, or lazy tensors read device slice by
    device slice) and `plan` recorded in its kernel options. Every sharding is computed, and so every
    divisibility error raised, before any parameter is placed."""
    shardings = plan.tree_shardings(model.params, model.param_axes)
    params = jax.tree.map(place, model.params, shardings)
    return model.replace(params=params, kernels=model.kernels.replace(sharding=plan))


def to_host(tree: Any) -> Any:
    """numpy copies of the array leaves of `tree`, also for global arrays this process cannot address whole:
    replicated arrays are read from a local device, others gathered across processes."""

    def fetch(leaf: Any) -> Any:
        if not isinstance(leaf, jax.Array):
            return leaf
        if leaf.is_fully_addressable:
            return np.asarray(jax.device_get(leaf))
        if leaf.sharding.is_fully_replicated:
            return np.asarray(leaf.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))

    return jax.tree.map(fetch, tree)
