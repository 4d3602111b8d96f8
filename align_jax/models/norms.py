"""BatchNorm with statistics over the whole (global) batch or per fixed-size group of examples.

ALIGN trained with per-core statistics over 16 examples; coyo-align reproduces that with Keras'
`virtual_batch_size=16` ("ghost batch norm"). With `group_size=None` the statistics span the whole
batch, which under `jit` on a sharded batch is the global batch. Variable names are Flax's
(`scale`, `bias`; `batch_stats/mean`, `batch_stats/var`), so checkpoints and the HF importer do
not depend on the choice.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from align_jax import kernels
from align_jax.kernels import batchnorm as native_batchnorm

Activation = Callable[[jax.Array], jax.Array]


def _group_sum(v: jax.Array) -> jax.Array:
    """Sum of `[groups, M, C]` over each group's M rows: `[groups, C]`. One group is summed over
    both leading axes: XLA:CPU (jax 0.10) runs a `[1, M, C]` sum over axis 1 alone about 10x
    slower than the same sum over axes (0, 1) (benchmarks/RESULTS.md)."""
    if v.shape[0] == 1:
        return v.sum(axis=(0, 1))[None]
    return v.sum(axis=1)


def _normalize(x, scale, bias, group_size, epsilon, activation):
    """(activation(normalised x * scale + bias), per-group mean, per-group variance), the
    statistics `[groups, C]` over each group's examples and positions (two-pass variance)."""
    n, c = x.shape[0], x.shape[-1]
    grouped = x.astype(jnp.float32).reshape(n // group_size, -1, c)  # [groups, group * H * W, C]
    count = grouped.shape[1]
    mean = _group_sum(grouped) / count
    var = _group_sum(jnp.square(grouped - mean[:, None])) / count
    # x * a + b with per-channel a, b: the centred input then feeds only the variance's sum.
    a = jax.lax.rsqrt(var + epsilon) * scale
    y = grouped * a[:, None] + (bias - mean * a)[:, None]
    if activation is not None:
        y = activation(y)
    return y.reshape(x.shape).astype(x.dtype), mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def batch_norm_train(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    group_size: int,
    epsilon: float,
    activation: Activation | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode batch norm, optionally followed by an activation, over `[N, ..., C]`.

    The same function as the textbook composition, with a hand-written backward pass: it keeps only
    `x` and the statistics (autodiff keeps the centred input, the normalised one and the
    activation's intermediates, each as large as `x`) and computes the input gradient in one
    reduction pass and one element-wise pass, recomputing the normalisation and activation on
    the fly. On CPU, where these layers are memory-bound, that is most of an EfficientNet's
    backward pass (benchmarks/RESULTS.md)."""
    return _normalize(x, scale, bias, group_size, epsilon, activation)


def _batch_norm_fwd(x, scale, bias, group_size, epsilon, activation):
    out, mean, var = _normalize(x, scale, bias, group_size, epsilon, activation)
    return (out, mean, var), (x, scale, bias, mean, var)


def _batch_norm_bwd(group_size, epsilon, activation, residuals, cotangents):
    # The barrier keeps XLA from merging this pass's recomputation with the forward's identical
    # expressions, which would store the centred and normalised inputs and the activation's
    # intermediates from the forward pass until now (three more activation-sized arrays).
    x, mean, var = jax.lax.optimization_barrier(residuals[:1] + residuals[3:])
    scale, bias = residuals[1:3]
    d_out, d_mean, d_var = cotangents
    n, c = x.shape[0], x.shape[-1]
    grouped = x.astype(jnp.float32).reshape(n // group_size, -1, c)
    count = grouped.shape[1]
    rstd = jax.lax.rsqrt(var + epsilon)[:, None]
    centred = grouped - mean[:, None]
    x_hat = centred * rstd
    dy = d_out.astype(jnp.float32).reshape(grouped.shape)
    if activation is not None:
        _, activation_vjp = jax.vjp(activation, x_hat * scale + bias)
        (dy,) = activation_vjp(dy)
    sum_dy = _group_sum(dy)  # [groups, C]
    sum_dy_x_hat = _group_sum(dy * x_hat)
    dx = scale * rstd * (dy - (sum_dy[:, None] + x_hat * sum_dy_x_hat[:, None]) / count)
    # The statistics are outputs too (they feed the running averages): their cotangents, usually 0.
    dx = dx + (d_mean[:, None] + 2.0 * d_var[:, None] * centred) / count
    return dx.reshape(x.shape).astype(x.dtype), sum_dy_x_hat.sum(0), sum_dy.sum(0)


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)


BATCH_NORM_IMPLS = ("auto", "xla", "native")


def resolve_impl(impl: str, dtype: Any, activation: Activation | None) -> str:
    """What `BatchNorm(impl=...)` runs in training mode."""
    if impl != "auto":
        return impl
    if (
        jax.default_backend() == "cpu"
        and jnp.dtype(dtype) == jnp.float32
        and native_batchnorm.supports(activation)
        and kernels.available()
    ):
        return "native"
    return "xla"


class BatchNorm(nn.Module):
    use_running_average: bool
    momentum: float = 0.99  # Flax/TF semantics: running = momentum * running + (1 - momentum) * batch
    epsilon: float = 1e-3
    group_size: int | None = None
    dtype: Any = jnp.float32
    activation: Activation | None = None  # applied after the affine transform, fused in training
    # Training-mode lowering: 'xla' (`batch_norm_train`), 'native' (C++ CPU kernels,
    # align_jax.kernels.batchnorm) or 'auto' (native on CPU for float32 inputs and activations it
    # supports, when the kernels build here; else xla).
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)

        if self.use_running_average:
            y = (x.astype(jnp.float32) - running_mean.value) * jax.lax.rsqrt(running_var.value + self.epsilon)
            y = y * scale + bias
            if self.activation is not None:
                y = self.activation(y)
            return y.astype(self.dtype)

        group = self.group_size or x.shape[0]
        if x.shape[0] % group:
            raise ValueError(f"BatchNorm group_size {group} does not divide the batch of {x.shape[0]} examples")
        if self.impl not in BATCH_NORM_IMPLS:
            raise ValueError(f"BatchNorm impl must be one of {BATCH_NORM_IMPLS}, got {self.impl!r}")
        if resolve_impl(self.impl, x.dtype, self.activation) == "native":
            if x.dtype != jnp.float32 or not native_batchnorm.supports(self.activation):
                raise ValueError(
                    f"BatchNorm impl='native' needs float32 input and no activation or SiLU, got {x.dtype}"
                )
            kernels.load()  # raises NativeKernelError naming why it cannot be built
            y, mean, var = native_batchnorm.native_batch_norm_train(
                x, scale, bias, group, self.epsilon, self.activation
            )
        else:
            y, mean, var = batch_norm_train(x, scale, bias, group, self.epsilon, self.activation)
        if not self.is_initializing():
            # Running statistics move toward the average of the groups' statistics (as Keras does).
            running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean.mean(0)
            running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var.mean(0)
        return y.astype(self.dtype)
