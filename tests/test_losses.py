"""Sharded contrastive losses equal a single-device B x B computation written here independently."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from align_jax import losses

MESHES = [(8, 1), (4, 2), (2, 4)]
BATCH_AXES = ("data", "fsdp")
B, D = 32, 16


def reference_softmax_loss(images, texts, temperature, smoothing, reduction):
    """Full-batch ALIGN loss: smoothed cross-entropy over B classes, both directions."""
    logits = images @ texts.T / temperature
    targets = (1 - smoothing) * jnp.eye(B, dtype=images.dtype) + smoothing / B
    i2t = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=1)) / B
    t2i = -jnp.sum(targets * jax.nn.log_softmax(logits.T, axis=1)) / B
    return i2t + t2i if reduction == "sum" else (i2t + t2i) / 2


def reference_sigmoid_loss(images, texts, temperature, bias):
    logits = images @ texts.T / temperature + bias
    labels = 2 * jnp.eye(B, dtype=images.dtype) - 1
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / B


@pytest.fixture(scope="module")
def embeddings():
    k1, k2 = jax.random.split(jax.random.key(0))
    unit = lambda x: x / jnp.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    images = unit(jax.random.normal(k1, (B, D)))
    texts = unit(images + 0.7 * jax.random.normal(k2, (B, D)))  # correlated, as after some training
    return images, texts, jnp.float32(0.2)


def sharded(loss_fn, mesh_shape, n_scalars=1):
    mesh = jax.make_mesh(mesh_shape, BATCH_AXES)
    spec = P(BATCH_AXES)
    fn = jax.shard_map(
        functools.partial(loss_fn, axis_name=BATCH_AXES),
        mesh=mesh,
        in_specs=(spec, spec) + (P(),) * n_scalars,
        out_specs=P(),
    )
    step = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(2 + n_scalars))))

    def run(*args):
        specs = (spec, spec) + (P(),) * n_scalars
        return step(*(jax.device_put(a, jax.NamedSharding(mesh, s)) for a, s in zip(args, specs, strict=True)))

    return run


def float64_value_and_grad(fn, *args):
    """The reference in float64, so float32 rounding in it does not count against the code."""
    with jax.enable_x64(True):
        args64 = [np.asarray(a, np.float64) for a in args]
        value, grads = jax.value_and_grad(fn, argnums=tuple(range(len(args))))(*args64)
        return jax.tree.map(lambda x: np.asarray(x, np.float64), (value, grads))


def assert_close(actual, expected):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mesh_shape", MESHES)
@pytest.mark.parametrize("smoothing,reduction", [(0.1, "sum"), (0.0, "mean")])
def test_all_gather_softmax_equals_full_batch(embeddings, mesh_shape, smoothing, reduction):
    loss = functools.partial(losses.softmax_contrastive_loss, label_smoothing=smoothing, reduction=reduction)
    reference = functools.partial(reference_softmax_loss, smoothing=smoothing, reduction=reduction)
    expected = float64_value_and_grad(reference, *embeddings)
    assert_close(sharded(loss, mesh_shape)(*embeddings), expected)


@pytest.mark.parametrize("mesh_shape", MESHES)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_chunked_softmax_equals_full_batch(embeddings, mesh_shape, chunk_size):
    loss = functools.partial(losses.chunked_softmax_contrastive_loss, chunk_size=chunk_size)
    reference = functools.partial(reference_softmax_loss, smoothing=0.1, reduction="sum")
    expected = float64_value_and_grad(reference, *embeddings)
    assert_close(sharded(loss, mesh_shape)(*embeddings), expected)


def test_single_device_forms_equal_full_batch(embeddings):
    expected = float64_value_and_grad(
        functools.partial(reference_softmax_loss, smoothing=0.1, reduction="sum"), *embeddings
    )
    for loss in (losses.softmax_contrastive_loss, losses.chunked_softmax_contrastive_loss):
        assert_close(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*embeddings), expected)


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_sigmoid_equals_full_batch(embeddings, mesh_shape):
    args = (*embeddings, jnp.float32(-2.0))
    expected = float64_value_and_grad(reference_sigmoid_loss, *args)
    assert_close(sharded(losses.sigmoid_contrastive_loss, mesh_shape, n_scalars=2)(*args), expected)


def test_min_temperature_clamps(embeddings):
    images, texts, _ = embeddings
    clamped = losses.softmax_contrastive_loss(images, texts, jnp.float32(0.001), min_temperature=0.01)
    assert float(clamped) == pytest.approx(float(reference_softmax_loss(images, texts, 0.01, 0.1, "sum")), rel=1e-5)


def test_bad_arguments_are_named(embeddings):
    images, texts, t = embeddings
    with pytest.raises(ValueError, match="reduction"):
        losses.softmax_contrastive_loss(images, texts, t, reduction="max")
    with pytest.raises(ValueError, match="chunk_size 5"):
        losses.chunked_softmax_contrastive_loss(images, texts, t, chunk_size=5)


@pytest.mark.parametrize("mesh_shape", [(1, 1), *MESHES])
def test_in_batch_top1_equals_argmax_over_the_full_batch(embeddings, mesh_shape):
    images, texts, _ = embeddings
    logits = np.asarray(images @ texts.T)
    expected = dict(
        i2t_top1=np.mean(logits.argmax(1) == np.arange(B)), t2i_top1=np.mean(logits.argmax(0) == np.arange(B))
    )
    assert 0.2 < expected["i2t_top1"] < 1.0  # the test data is neither trivial nor hopeless
    if mesh_shape == (1, 1):
        actual = losses.in_batch_top1(images, texts)
    else:
        mesh = jax.make_mesh(mesh_shape, BATCH_AXES)
        fn = jax.shard_map(
            functools.partial(losses.in_batch_top1, axis_name=BATCH_AXES),
            mesh=mesh,
            in_specs=(P(BATCH_AXES), P(BATCH_AXES)),
            out_specs=P(),
        )
        sharding = jax.NamedSharding(mesh, P(BATCH_AXES))
        actual = jax.jit(fn)(jax.device_put(images, sharding), jax.device_put(texts, sharding))
    for key, value in expected.items():
        assert float(actual[key]) == pytest.approx(value)
