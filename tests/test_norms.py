"""Ghost-batch BatchNorm equals BatchNorm applied to each group on its own."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.models.norms import BatchNorm, batch_norm_train


def _apply(module, x, variables):
    return module.apply(variables, x, mutable=["batch_stats"])


def test_grouped_statistics_equal_per_group_statistics():
    x = jax.random.normal(jax.random.key(0), (16, 3, 3, 5)) * 2 + 1
    variables = BatchNorm(use_running_average=False).init(jax.random.key(1), x)
    variables = {
        "params": {"scale": np.linspace(0.5, 1.5, 5), "bias": np.linspace(-1, 1, 5)},
        "batch_stats": variables["batch_stats"],
    }
    grouped, grouped_stats = _apply(BatchNorm(False, group_size=4), x, variables)
    per_group = [_apply(BatchNorm(False), x[i : i + 4], variables) for i in range(0, 16, 4)]
    np.testing.assert_allclose(grouped, np.concatenate([y for y, _ in per_group]), rtol=1e-5, atol=1e-6)
    for name in ("mean", "var"):
        expected = np.mean([s["batch_stats"][name] for _, s in per_group], axis=0)
        np.testing.assert_allclose(grouped_stats["batch_stats"][name], expected, rtol=1e-5, atol=1e-7)


def test_whole_batch_statistics_match_numpy():
    x = np.asarray(jax.random.normal(jax.random.key(0), (8, 2, 2, 3))) * 3 + 2
    module = BatchNorm(False, momentum=0.9, epsilon=1e-3)
    variables = module.init(jax.random.key(1), x)
    y, stats = _apply(module, x, variables)
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-3), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(stats["batch_stats"]["var"], 0.9 + 0.1 * var, rtol=1e-5)


def test_inference_uses_running_statistics():
    x = np.ones((2, 1, 1, 3), np.float32) * 5
    variables = {
        "params": {"scale": np.full(3, 2.0), "bias": np.zeros(3)},
        "batch_stats": {"mean": np.full(3, 1.0), "var": np.full(3, 4.0 - 1e-3)},
    }
    np.testing.assert_allclose(BatchNorm(True).apply(variables, x), np.full((2, 1, 1, 3), 4.0), rtol=1e-6)


def test_group_size_must_divide_the_batch():
    x = np.zeros((6, 2, 2, 3), np.float32)
    module = BatchNorm(False, group_size=4)
    with pytest.raises(ValueError, match="group_size 4 does not divide the batch of 6"):
        module.init(jax.random.key(0), x)


def _textbook_batch_norm(x, scale, bias, group_size, epsilon, activation):
    groups = x.reshape((x.shape[0] // group_size, group_size) + x.shape[1:])
    axes = tuple(range(1, groups.ndim - 1))
    mean = groups.mean(axis=axes, keepdims=True)
    var = ((groups - mean) ** 2).mean(axis=axes, keepdims=True)
    y = ((groups - mean) / jnp.sqrt(var + epsilon)).reshape(x.shape) * scale + bias
    flat = (x.shape[0] // group_size, x.shape[-1])
    return (activation(y) if activation else y), mean.reshape(flat), var.reshape(flat)


@pytest.mark.parametrize("group_size,activation", [(8, jax.nn.swish), (2, None), (4, jax.nn.relu)])
def test_batch_norm_train_values_and_gradients_equal_the_textbook_composition(group_size, activation):
    keys = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(keys[0], (8, 3, 4, 5)) * 2 + 1
    scale = jax.random.normal(keys[1], (5,))
    bias = jax.random.normal(keys[2], (5,))
    cotangents = [
        jax.random.normal(k, s.shape)
        for k, s in zip(keys[3:], _textbook_batch_norm(x, scale, bias, group_size, 1e-3, activation), strict=True)
    ]

    def loss(fn):
        def value(x, scale, bias):
            outputs = fn(x, scale, bias, group_size, 1e-3, activation)
            return sum(jnp.vdot(o, c) for o, c in zip(outputs, cotangents, strict=True))

        return value

    for got, want in zip(
        batch_norm_train(x, scale, bias, group_size, 1e-3, activation),
        _textbook_batch_norm(x, scale, bias, group_size, 1e-3, activation),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    got = jax.grad(loss(batch_norm_train), argnums=(0, 1, 2))(x, scale, bias)
    want = jax.grad(loss(_textbook_batch_norm), argnums=(0, 1, 2))(x, scale, bias)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_fused_activation_equals_activation_after_the_norm():
    x = jax.random.normal(jax.random.key(0), (4, 2, 2, 3))
    plain = BatchNorm(False)
    fused = BatchNorm(False, activation=jax.nn.swish)
    variables = plain.init(jax.random.key(1), x)
    for train in (True, False):
        a, _ = BatchNorm(not train).apply(variables, x, mutable=["batch_stats"])
        b, _ = BatchNorm(not train, activation=jax.nn.swish).apply(variables, x, mutable=["batch_stats"])
        np.testing.assert_allclose(b, jax.nn.swish(a), rtol=1e-6, atol=1e-6)
    assert fused.init(jax.random.key(1), x).keys() == variables.keys()
