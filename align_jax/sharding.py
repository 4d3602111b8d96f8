"""Device mesh, partition rules and batch sharding.

The mesh comes from the config as `[(axis, size), ...]` with at most one size of -1 ("the rest").
The batch is sharded over the data-like axes (`data` and `fsdp`); parameters are placed by
`(regex over the whole parameter path, rule)` pairs, first match wins, where a rule is:

- `"replicate"`: a full copy on every device;
- `"fsdp"`: sharded over the `fsdp` axis along the tensor's largest dimension that it divides,
  when the tensor is large enough to be worth it (else replicated);
- a tuple of axis names (or None) per dimension, as a `PartitionSpec`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
# Tensors smaller than this stay replicated under the FSDP rule: sharding them saves little
# memory and costs a collective each.
FSDP_MIN_SIZE = 2**14
# Default rules: shard everything large over fsdp (a no-op when the fsdp axis has size 1).
DEFAULT_RULES = ((".*", "fsdp"),)


def mesh_shape(axes: Sequence[tuple[str, int]], num_devices: int) -> dict[str, int]:
    """Resolves sizes (one may be -1) against the device count; errors name the numbers."""
    axes = [(str(name), int(size)) for name, size in axes]
    names = [name for name, _ in axes]
    if len(set(names)) != len(names):
        raise ValueError(f"mesh axes repeat a name: {names}")
    missing = [a for a in BATCH_AXES if a not in names]
    if missing:
        raise ValueError(f"mesh must name the axes {list(BATCH_AXES)}; missing {missing} in {axes}")
    free = [name for name, size in axes if size == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: only one axis may have size -1, got {free}")
    bad = [(name, size) for name, size in axes if size == 0 or size < -1]
    if bad:
        raise ValueError(f"mesh: axis sizes must be positive or -1, got {bad}")
    fixed = math.prod(size for _, size in axes if size != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"mesh {axes}: the fixed axes need a multiple of {fixed} devices, but there are {num_devices}"
            )
        return {name: (num_devices // fixed if size == -1 else size) for name, size in axes}
    if fixed != num_devices:
        raise ValueError(f"mesh {axes} has {fixed} devices, but there are {num_devices}")
    return dict(axes)


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with the configured axes."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(axes, len(devices))
    # Auto axes: the towers are partitioned by GSPMD from the parameter and batch shardings;
    # only the loss is written per device (shard_map).
    axis_types = (AxisType.Auto,) * len(shape)
    if devices == list(jax.devices()):
        return jax.make_mesh(tuple(shape.values()), tuple(shape), axis_types=axis_types)
    return Mesh(np.asarray(devices).reshape(tuple(shape.values())), tuple(shape), axis_types=axis_types)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (example) axis over the data-like axes; everything else replicated."""
    return NamedSharding(mesh, P(batch_axes(mesh)))


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    n = data_parallel_size(mesh)
    if global_batch % n:
        raise ValueError(
            f"global batch size {global_batch} is not divisible by the {n} devices of the data axes "
            f"{dict((a, mesh.shape[a]) for a in batch_axes(mesh))}"
        )


def fsdp_spec(shape: Sequence[int], mesh: Mesh, min_size: int = FSDP_MIN_SIZE) -> P:
    """Shards the largest dimension divisible by the fsdp axis size; small tensors replicated."""
    size = mesh.shape.get("fsdp", 1)
    if size == 1 or math.prod(shape) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def path_name(path: tuple) -> str:
    """'params/image_tower/block_0/expand_conv/kernel' for a tree path."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _spec_for(name: str, shape: Sequence[int], rules: Sequence[tuple[str, Any]], mesh: Mesh) -> P:
    for pattern, rule in rules:
        if re.fullmatch(pattern, name):
            if rule == "replicate":
                return P()
            if rule == "fsdp":
                return fsdp_spec(shape, mesh)
            spec = P(*rule)
            if len(spec) > len(shape):
                raise ValueError(f"partition rule {pattern!r} -> {rule} has more axes than {name} {tuple(shape)}")
            for dim, axis in enumerate(spec):
                axes = (axis,) if isinstance(axis, str) else (axis or ())
                ways = math.prod(mesh.shape[a] for a in axes)
                if shape[dim] % ways:
                    raise ValueError(
                        f"partition rule {pattern!r}: dimension {dim} of {name} {tuple(shape)} is not "
                        f"divisible by {ways} ({axis})"
                    )
            return spec
    return P()


def infer_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """A NamedSharding per leaf of `tree` (arrays or ShapeDtypeStructs) from the rules; the first
    rule whose regex matches the whole path applies; unmatched leaves are replicated."""

    def leaf(path, x):
        shape = getattr(x, "shape", ())
        return NamedSharding(mesh, _spec_for(path_name(path), shape, rules, mesh))

    return jax.tree_util.tree_map_with_path(leaf, tree)
