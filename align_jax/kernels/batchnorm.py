"""Training-mode batch norm (+ SiLU) through the native CPU kernels (`batchnorm.cc`): the same
function and gradients as `align_jax.models.norms.batch_norm_train`, with fewer passes over memory.

The kernels work per example; the statistics of each group of examples (the whole batch, or
ghost-batch groups) are combined here from per-example means and sums of squared deviations
(Chan et al.'s pairwise update, exact in float32 where a one-pass variance would cancel), so a
batch sharded over devices gets the same global statistics.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from align_jax import kernels
from align_jax.kernels.partition import per_example_op

# The activations the kernels compute after the affine transform (others use the XLA path).
ACTIVATIONS: dict[object, int] = {None: 0, jax.nn.silu: 1}


def supports(activation: Callable | None) -> bool:
    return activation in ACTIVATIONS


def _ffi(target: str, shape, *arrays, **attrs):
    kernels.load()
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32), vmap_method="sequential")
    return call(*arrays, **{k: np.int64(v) for k, v in attrs.items()})


def _stats_local(x):
    return _ffi("align_jax_batch_norm_stats", (x.shape[0], 2, x.shape[2]), x)


def _apply_local(x, coef, activation):
    return _ffi("align_jax_batch_norm_apply", x.shape, x, coef, activation=activation)


def _grad_stats_local(x, dy, coef, activation):
    return _ffi("align_jax_batch_norm_grad_stats", (x.shape[0], 2, x.shape[2]), x, dy, coef, activation=activation)


def _input_grad_local(x, dy, coef, activation):
    return _ffi("align_jax_batch_norm_input_grad", x.shape, x, dy, coef, activation=activation)


_stats = per_example_op(_stats_local, ("nrc",), "nkc", ())
_apply = per_example_op(_apply_local, ("nrc", "nkc"), "nrc", (2,))
_grad_stats = per_example_op(_grad_stats_local, ("nrc", "nrc", "nkc"), "nkc", (3,))
_input_grad = per_example_op(_input_grad_local, ("nrc", "nrc", "nkc"), "nrc", (3,))


def _per_example(group_size: int, *coefficients: jax.Array) -> jax.Array:
    """`[groups, C]` coefficients -> `[N, K, C]`, each example getting its group's."""
    return jnp.repeat(jnp.stack(coefficients, axis=1), group_size, axis=0)


def _statistics(x3: jax.Array, group_size: int) -> tuple[jax.Array, jax.Array]:
    """Per-group mean and (population) variance `[groups, C]` of `x3 [N, R, C]`."""
    n, rows, c = x3.shape
    stats = _stats(x3).reshape(n // group_size, group_size, 2, c)
    means, m2 = stats[:, :, 0], stats[:, :, 1]
    mean = means.mean(axis=1)
    m2 = m2.sum(axis=1) + rows * jnp.square(means - mean[:, None]).sum(axis=1)
    return mean, m2 / (group_size * rows)


def _forward(x, scale, bias, group_size, epsilon, activation):
    n, c = x.shape[0], x.shape[-1]
    x3 = x.reshape(n, -1, c)
    mean, var = _statistics(x3, group_size)
    a = jax.lax.rsqrt(var + epsilon) * scale
    b = bias - mean * a
    y = _apply(x3, _per_example(group_size, a, b), ACTIVATIONS[activation])
    return y.reshape(x.shape), mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def native_batch_norm_train(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    group_size: int,
    epsilon: float,
    activation: Callable | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(activation(batch-normalised x * scale + bias), mean, var) of float32 `x [N, ..., C]`, the
    statistics `[N // group_size, C]` per group of `group_size` examples; `activation` None or
    SiLU (`supports`)."""
    return _forward(x, scale, bias, group_size, epsilon, activation)


def _fwd(x, scale, bias, group_size, epsilon, activation):
    y, mean, var = _forward(x, scale, bias, group_size, epsilon, activation)
    return (y, mean, var), (x, scale, bias, mean, var)


def _bwd(group_size, epsilon, activation, residuals, cotangents):
    x, scale, bias, mean, var = residuals
    d_out, d_mean, d_var = cotangents
    n, c = x.shape[0], x.shape[-1]
    x3 = x.reshape(n, -1, c)
    dy3 = d_out.astype(jnp.float32).reshape(x3.shape)
    count = group_size * x3.shape[1]
    rstd = jax.lax.rsqrt(var + epsilon)  # [groups, C]
    a = rstd * scale
    b = bias - mean * a
    code = ACTIVATIONS[activation]
    sums = _grad_stats(x3, dy3, _per_example(group_size, a, b, mean, rstd), code)
    sums = sums.reshape(n // group_size, group_size, 2, c).sum(axis=1)
    sum_dz, sum_dz_x_hat = sums[:, 0], sums[:, 1]  # [groups, C]
    # dx = scale * rstd * (dz - (sum_dz + x_hat * sum_dz_x_hat) / count)
    #      + (d_mean + 2 * d_var * (x - mean)) / count      = dz * u + x * v + w
    u = a
    v = -a * rstd * sum_dz_x_hat / count + 2.0 * d_var / count
    w = -a * sum_dz / count + d_mean / count - mean * v
    dx = _input_grad(x3, dy3, _per_example(group_size, a, b, u, v, w), code)
    return dx.reshape(x.shape), sum_dz_x_hat.sum(0), sum_dz.sum(0)


native_batch_norm_train.defvjp(_fwd, _bwd)
