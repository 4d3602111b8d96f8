"""Schedules, decay masks, LAMB trust ratios and freezing, on small cases computed by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from align_jax import optim


def _config(**overrides):
    config = optim.default_config()
    config.update(overrides)
    return config


def test_align_defaults():
    config = optim.default_config()
    assert (config.name, config.learning_rate, config.warmup_steps, config.weight_decay) == ("lamb", 1e-3, 10_000, 1e-5)


def test_linear_warmup_then_linear_decay_to_zero():
    schedule = optim.learning_rate_schedule(_config(learning_rate=1e-3, warmup_steps=10), total_steps=110)
    values = [float(schedule(s)) for s in (0, 5, 10, 60, 110)]
    np.testing.assert_allclose(values, [0.0, 5e-4, 1e-3, 5e-4, 0.0], atol=1e-12)


def test_cosine_decay_and_end_value():
    schedule = optim.learning_rate_schedule(
        _config(learning_rate=1.0, warmup_steps=0, decay="cosine", end_learning_rate=0.1), total_steps=100
    )
    np.testing.assert_allclose([float(schedule(s)) for s in (0, 50, 100)], [1.0, 0.55, 0.1], rtol=1e-6)


def test_bad_schedule_values_are_named():
    with pytest.raises(ValueError, match="optimizer.decay"):
        optim.learning_rate_schedule(_config(decay="step"), 100)
    with pytest.raises(ValueError, match="warmup_steps 200"):
        optim.learning_rate_schedule(_config(warmup_steps=200), 100)
    with pytest.raises(ValueError, match="optimizer.name"):
        optim.make_optimizer(_config(name="sgd"), 100)
    with pytest.raises(ValueError, match="optimizer.freeze"):
        optim.frozen_labels({"a": jnp.zeros(1)}, "both")


PARAMS = {
    "image_tower": {"stem_conv": {"kernel": jnp.ones((3, 3, 3, 8))}, "stem_bn": {"scale": jnp.ones(8)}},
    "text_tower": {"layer_0": {"output": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}}},
    "text_projection": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)},
    "temperature": jnp.ones(()),
}


def test_decay_mask_excludes_norms_biases_and_temperature():
    mask = optim.decay_mask(PARAMS)
    assert mask["image_tower"]["stem_conv"]["kernel"] and mask["text_projection"]["kernel"]
    assert mask["text_tower"]["layer_0"]["output"]["kernel"]
    assert not mask["image_tower"]["stem_bn"]["scale"]
    assert not mask["text_tower"]["layer_0"]["output"]["bias"] and not mask["temperature"]


def test_lamb_first_step_by_hand():
    # Step 1 of Adam gives g / (|g| + eps) ~ sign(g); decay adds wd * w; the trust ratio scales
    # the update to ||w|| / ||update|| for masked (rank >= 2) leaves only.
    w = jnp.array([[3.0, 4.0]])  # ||w|| = 5
    b = jnp.array([1.0, -1.0])
    params = {"w": w, "b": b}
    grads = {"w": jnp.array([[1.0, -1.0]]), "b": jnp.array([2.0, 2.0])}
    tx = optim.lamb(0.1, eps=0.0, weight_decay=0.5, mask=optim.decay_mask)
    updates, _ = tx.update(grads, tx.init(params), params)
    adam_w = np.array([[1.0, -1.0]]) + 0.5 * np.asarray(w)  # [[2.5, 1.0]]
    trust = 5.0 / np.linalg.norm(adam_w)
    np.testing.assert_allclose(updates["w"], -0.1 * trust * adam_w, rtol=1e-5)
    np.testing.assert_allclose(updates["b"], [-0.1, -0.1], rtol=1e-5)  # no decay, no trust ratio


def test_freezing_a_tower_zeroes_its_updates_and_keeps_no_state_for_it():
    tx, _ = optim.make_optimizer(_config(name="adamw", warmup_steps=0, freeze="image"), total_steps=10)
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    updates, state = tx.update(grads, tx.init(PARAMS), PARAMS)
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates["image_tower"]))
    assert all(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates["text_tower"]))
    mu = optax.tree_utils.tree_get(state, "mu")
    assert "image_tower" not in mu or not jax.tree.leaves(mu["image_tower"])


def test_gradients_are_clipped_by_global_norm_before_the_optimizer():
    # With eps = 1 Adam's first update is g / (|g| + 1): 100 clipped to 0.5 per element (global
    # norm 1 over 4 elements) gives 1/3, unclipped it would give 100/101.
    config = _config(
        name="adamw",
        warmup_steps=0,
        decay="constant",
        learning_rate=1.0,
        grad_clip_norm=1.0,
        b1=0.0,
        b2=0.0,
        eps=1.0,
        weight_decay=0.0,
    )
    tx, _ = optim.make_optimizer(config, total_steps=10)
    params = {"w": jnp.zeros((2, 2))}
    updates, _ = tx.update({"w": jnp.full((2, 2), 100.0)}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], np.full((2, 2), -1 / 3), rtol=1e-5)
