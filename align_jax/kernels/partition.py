"""Sharding rules for the native kernels: every kernel is per example (and per channel), so under
`jit` over a mesh it keeps its operands' batch and channel sharding and runs on each shard with
every other dimension whole; nothing inside a call communicates.

Known cost: JAX lowers a `custom_partitioning` op to a call keyed by a Python object's id, so a
multi-device program holding these ops has a new persistent-compilation-cache key in every
process and is recompiled after a restart (one-device programs inline the op and are cached).
JAX's `jax_remove_custom_partitioning_ptr_from_cache_key` would drop the id, but the op's static
arguments (stride, padding) are not in the HLO either, so two layers of equal shapes could then
share a cache entry: not used."""

from __future__ import annotations

from collections.abc import Callable

from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def _spec(layout: str, batch, channel) -> P:
    return P(*(batch if d == "n" else channel if d == "c" else None for d in layout))


def _batch_and_channel(sharding, layout: str) -> tuple:
    """The mesh axes of the 'n' and 'c' dimensions of an operand's sharding (None if not named)."""
    if not isinstance(sharding, NamedSharding):
        return None, None
    spec = tuple(sharding.spec) + (None,) * (len(layout) - len(sharding.spec))
    return spec[layout.index("n")], spec[layout.index("c")] if "c" in layout else None


def per_example_op(local_fn: Callable, operands: tuple[str, ...], result: str, static_argnums: tuple[int, ...]):
    """`local_fn(*arrays, *static)` as a custom-partitioned op. `operands` and `result` name each
    dimension by a letter: 'n' the batch, 'c' the channels (both keep the first operand's
    sharding), any other letter a dimension kept whole on every shard."""
    wrapped = custom_partitioning(local_fn, static_argnums=static_argnums)
    whole = "".join(dict.fromkeys(d for d in "".join(operands) + result if d not in "nc"))

    def partition(*args):
        *static, mesh, arg_shapes, result_shape = args
        batch, channel = _batch_and_channel(arg_shapes[0].sharding, operands[0])

        def lower(*arrays):
            return local_fn(*arrays, *static)

        in_shardings = tuple(NamedSharding(mesh, _spec(layout, batch, channel)) for layout in operands)
        return mesh, lower, NamedSharding(mesh, _spec(result, batch, channel)), in_shardings

    def infer(*args):
        *_, mesh, arg_shapes, result_shape = args
        batch, channel = _batch_and_channel(arg_shapes[0].sharding, operands[0])
        return NamedSharding(mesh, _spec(result, batch, channel))

    rule = ", ".join(" ".join(layout) for layout in operands) + " -> " + " ".join(result)
    order = list(dict.fromkeys(rule.replace(",", " ").replace("->", " ").split()))
    wrapped.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer,
        sharding_rule=rule,
        # Shardy wants these in the order the factors first appear in the rule.
        need_replication_factors=tuple(f for f in order if f in whole),
    )
    return wrapped
