"""BatchNorm with statistics over the whole (global) batch or per fixed-size group of examples.

ALIGN trained with per-core statistics over 16 examples; coyo-align reproduces that with Keras'
`virtual_batch_size=16` ("ghost batch norm"). With `group_size=None` the statistics span the whole
batch, which under `jit` on a sharded batch is the global batch. Variable names are Flax's
(`scale`, `bias`; `batch_stats/mean`, `batch_stats/var`), so checkpoints and the HF importer do
not depend on the choice.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class BatchNorm(nn.Module):
    use_running_average: bool
    momentum: float = 0.99  # Flax/TF semantics: running = momentum * running + (1 - momentum) * batch
    epsilon: float = 1e-3
    group_size: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)

        if self.use_running_average:
            y = (x.astype(jnp.float32) - running_mean.value) * jax.lax.rsqrt(running_var.value + self.epsilon)
            return (y * scale + bias).astype(self.dtype)

        x32 = x.astype(jnp.float32)
        group = self.group_size or x.shape[0]
        if x.shape[0] % group:
            raise ValueError(f"BatchNorm group_size {group} does not divide the batch of {x.shape[0]} examples")
        grouped = x32.reshape((x.shape[0] // group, group) + x.shape[1:])
        axes = tuple(range(1, grouped.ndim - 1))  # examples of a group and spatial positions
        mean = grouped.mean(axis=axes, keepdims=True)
        var = jnp.square(grouped - mean).mean(axis=axes, keepdims=True)
        y = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        if not self.is_initializing():
            # Running statistics move toward the average of the groups' statistics (as Keras does).
            running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean.reshape(
                -1, features
            ).mean(0)
            running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var.reshape(
                -1, features
            ).mean(0)
        return (y * scale + bias).astype(self.dtype)
