"""Depthwise convolution through the native CPU kernels (`depthwise.cc`), with gradients and a
sharding rule (`partition.per_example_op`), so the same `jit`-ed step runs on one device or a CPU
mesh. The kernel gradient is returned per example and summed outside the call, so a sharded batch
needs no collective inside it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from align_jax import kernels
from align_jax.kernels.partition import per_example_op

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


_forward = per_example_op(_forward_local, ("nhwc", "ijc"), "npqc", (2, 3))
_input_gradient = per_example_op(_input_gradient_local, ("npqc", "ijc"), "nhwc", (2, 3, 4))
_kernel_gradient = per_example_op(_kernel_gradient_local, ("nhwc", "npqc"), "nijc", (2, 3, 4))


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
