"""Dual encoder: normalised embeddings, projections, temperature-scaled logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.models import (
    DualEncoder,
    build_model,
    init_variables,
    l2_normalize,
    logits_per_image,
    pixels_to_unit_range,
    presets,
)


@pytest.fixture(scope="module")
def tiny_model():
    config = presets.tiny()
    model = build_model(config)
    return config, model, init_variables(model, config, jax.random.key(0))


def _inputs(config, n=3):
    images = jax.random.uniform(jax.random.key(1), (n, config.image_size, config.image_size, 3), minval=-1, maxval=1)
    ids = jax.random.randint(jax.random.key(2), (n, config.max_text_length), 5, config.text.vocab_size)
    return images, ids, jnp.ones_like(ids)


def test_l2_normalize_gives_unit_rows_and_keeps_zero_finite():
    x = jnp.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(l2_normalize(x), [[0.6, 0.8], [0.0, 0.0]])


def test_uint8_pixels_are_scaled_to_unit_range_and_floats_pass_through():
    np.testing.assert_allclose(pixels_to_unit_range(jnp.array([0, 51, 255], jnp.uint8)), [-1.0, -0.6, 1.0], atol=1e-6)
    x = jnp.array([-0.5, 0.25])
    np.testing.assert_array_equal(pixels_to_unit_range(x), x)


def test_logits_are_similarities_over_temperature():
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(4, 8)), rng.normal(size=(3, 8))
    np.testing.assert_allclose(logits_per_image(img, txt, 0.5), img @ txt.T * 2.0, rtol=1e-6)


def test_embeddings_are_unit_norm_and_temperature_starts_at_init(tiny_model):
    config, model, variables = tiny_model
    out = jax.jit(model.apply)(variables, *_inputs(config))
    for key in ("image_embeds", "text_embeds"):
        assert out[key].shape == (3, config.embed_dim) and out[key].dtype == jnp.float32
        np.testing.assert_allclose(jnp.linalg.norm(out[key], axis=-1), 1.0, atol=1e-5)
    assert float(out["temperature"]) == config.temperature_init == 1.0


def test_encode_methods_equal_the_joint_call(tiny_model):
    config, model, variables = tiny_model
    images, ids, mask = _inputs(config)
    joint = model.apply(variables, images, ids, mask)
    np.testing.assert_allclose(model.apply(variables, images, method=DualEncoder.encode_image), joint["image_embeds"])
    np.testing.assert_allclose(model.apply(variables, ids, mask, method=DualEncoder.encode_text), joint["text_embeds"])


def test_gradients_reach_both_towers_and_the_temperature(tiny_model):
    config, model, variables = tiny_model
    images, ids, mask = _inputs(config)

    def loss(params):
        out = model.apply({**variables, "params": params}, images, ids, mask)
        logits = logits_per_image(out["image_embeds"], out["text_embeds"], out["temperature"])
        return -jnp.mean(jnp.diag(jax.nn.log_softmax(logits)))

    grads = jax.jit(jax.grad(loss))(variables["params"])
    assert float(jnp.abs(grads["temperature"])) > 0
    for tower in ("image_tower", "text_tower", "image_projection", "text_projection"):
        assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[tower])) > 0


def test_unknown_tower_type_is_named():
    config = presets.tiny()
    config.image.type = "resnet"
    with pytest.raises(ValueError, match="model.image.type"):
        build_model(config)
