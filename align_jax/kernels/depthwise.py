"""Depthwise convolution through the native CPU kernels (`depthwise.cc`), with gradients and a
sharding rule, so the same `jit`-ed step runs on one device or an emulated / real CPU mesh.

Each of the three kernel calls is per example and per channel: under `jit` over a mesh it keeps
the batch (and channel) sharding of its inputs and runs on every shard, with the spatial
dimensions whole (`custom_partitioning` with a Shardy rule); the kernel gradient is returned per
example and summed outside, so a sharded batch needs no collective inside the call.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from align_jax import kernels

Padding = tuple[tuple[int, int], tuple[int, int]]


def output_size(size: int, k: int, stride: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - k) // stride + 1


def _ffi(target: str, shape: tuple[int, ...], a: jax.Array, b: jax.Array, stride: int, padding: Padding):
    kernels.load()
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32), vmap_method="sequential")
    return call(a, b, stride=np.int64(stride), pad_top=np.int64(padding[0][0]), pad_left=np.int64(padding[1][0]))


def _forward_local(x, kernel, stride, padding):
    k_h, k_w, _ = kernel.shape
    n, h, w, c = x.shape
    shape = (n, output_size(h, k_h, stride, padding[0]), output_size(w, k_w, stride, padding[1]), c)
    return _ffi("align_jax_depthwise_forward", shape, x, kernel, stride, padding)


def _input_gradient_local(dy, kernel, stride, padding, spatial):
    shape = (dy.shape[0], *spatial, dy.shape[3])
    return _ffi("align_jax_depthwise_input_gradient", shape, dy, kernel, stride, padding)


def _kernel_gradient_local(x, dy, stride, padding, kernel_size):
    shape = (x.shape[0], *kernel_size, x.shape[3])
    return _ffi("align_jax_depthwise_kernel_gradient", shape, x, dy, stride, padding)


def _batch_and_channel(sharding, ndim: int) -> tuple:
    """The (batch, channel) mesh axes of an operand's sharding; None when it is not a named one."""
    if not isinstance(sharding, NamedSharding):
        return None, None
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return spec[0], spec[-1]


def _partitioned(local_fn, rule: str, first_rank: int, second_rank: int, static_argnums: tuple[int, ...]):
    """`local_fn(a, b, *static)` as a custom-partitioned op: the batch and channel dimensions keep
    the first operand's sharding, every other dimension is whole on each shard."""
    wrapped = custom_partitioning(local_fn, static_argnums=static_argnums)

    def specs(batch, channel):
        first = P(batch, None, None, channel)
        second = P(batch, None, None, channel) if second_rank == 4 else P(None, None, channel)
        return first, second, P(batch, None, None, channel)

    def partition(*args):
        *static, mesh, arg_shapes, result_shape = args
        batch, channel = _batch_and_channel(arg_shapes[0].sharding, first_rank)
        first, second, out = specs(batch, channel)

        def lower(a, b):
            return local_fn(a, b, *static)

        shardings = (NamedSharding(mesh, first), NamedSharding(mesh, second))
        return mesh, lower, NamedSharding(mesh, out), shardings

    def infer(*args):
        *_, mesh, arg_shapes, result_shape = args
        batch, channel = _batch_and_channel(arg_shapes[0].sharding, first_rank)
        return NamedSharding(mesh, specs(batch, channel)[2])

    wrapped.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer,
        sharding_rule=rule,
        # Spatial and kernel dimensions stay whole, listed in the rule's order (Shardy requires it).
        need_replication_factors=tuple(f for f in dict.fromkeys(rule.replace(",", " ").split()) if f in "hwijpq"),
    )
    return wrapped


_forward = _partitioned(_forward_local, "n h w c, i j c -> n p q c", 4, 3, (2, 3))
_input_gradient = _partitioned(_input_gradient_local, "n p q c, i j c -> n h w c", 4, 3, (2, 3, 4))
_kernel_gradient = _partitioned(_kernel_gradient_local, "n h w c, n p q c -> n i j c", 4, 4, (2, 3, 4))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def native_depthwise(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding) -> jax.Array:
    """Depthwise convolution of `x [N, H, W, C]` (float32) with `kernel [KH, KW, C]`, explicit
    `padding ((top, bottom), (left, right))`: the grouped convolution's result, from the native
    CPU kernels (call `align_jax.kernels.available()` first)."""
    return _forward(x, kernel, stride, _as_padding(padding))


def _as_padding(padding) -> Padding:
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def _native_fwd(x, kernel, stride, padding):
    return native_depthwise(x, kernel, stride, padding), (x, kernel)


def _native_bwd(stride, padding, residuals, g):
    x, kernel = residuals
    padding = _as_padding(padding)
    g = g.astype(jnp.float32)
    dx = _input_gradient(g, kernel, stride, padding, tuple(x.shape[1:3]))
    dk = _kernel_gradient(x, g, stride, padding, tuple(kernel.shape[:2])).sum(axis=0)
    return dx, dk


native_depthwise.defvjp(_native_fwd, _native_bwd)
