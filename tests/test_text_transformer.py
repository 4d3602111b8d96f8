"""CLIP-style text Transformer: the causal and padding masks, pooling at the last real token,
and the tower choice in the dual encoder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.models import DualEncoder, build_model, init_variables, presets
from align_jax.models import text_transformer as tt

CONFIG = {
    k: v
    for k, v in tt.text_transformer_config("tiny", vocab_size=50, max_position_embeddings=12).items()
    if k != "type"
}
MASK = jnp.array([[1] * 10, [1] * 6 + [0] * 4, [1] * 2 + [0] * 8])


def _ids(seed=1):
    return jax.random.randint(jax.random.key(seed), (3, 10), 0, 50)


def _init(**fields):
    model = tt.TextTransformer(**dict(CONFIG, **fields))
    return model, model.init(jax.random.key(0), _ids(), MASK)


def test_config_sizes():
    base = tt.text_transformer_config("base", 49408)
    assert (base.type, base.hidden_size, base.num_layers, base.num_heads, base.intermediate_size) == (
        "transformer",
        512,
        12,
        8,
        2048,
    )
    assert (base.vocab_size, base.max_position_embeddings, base.causal, base.pooling) == (49408, 77, True, "eos")
    with pytest.raises(ValueError, match="'giant'"):
        tt.text_transformer_config("giant", 100)


def test_eos_pooling_takes_the_last_kept_token():
    model = tt.TextTransformer(**CONFIG)
    hidden = jnp.arange(4 * 5 * 2, dtype=jnp.float32).reshape(4, 5, 2)
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    pooled = model.apply({}, hidden, mask, method=tt.TextTransformer.pool)
    np.testing.assert_array_equal(pooled, np.asarray(hidden)[[0, 1, 2, 3], [2, 4, 0, 0]])


def test_first_pooling_takes_position_zero():
    model = tt.TextTransformer(**dict(CONFIG, pooling="first"))
    hidden = jnp.arange(3 * 4 * 2, dtype=jnp.float32).reshape(3, 4, 2)
    pooled = model.apply({}, hidden, jnp.ones((3, 4)), method=tt.TextTransformer.pool)
    np.testing.assert_array_equal(pooled, hidden[:, 0])


def test_unknown_pooling_is_named():
    model = tt.TextTransformer(**dict(CONFIG, pooling="mean"))
    with pytest.raises(ValueError, match="'mean'"):
        model.apply({}, jnp.zeros((1, 2, 2)), jnp.ones((1, 2)), method=tt.TextTransformer.pool)


def test_causal_mask_hides_later_tokens():
    ids = _ids()
    later_changed = ids.at[:, 5:].set((ids[:, 5:] + 7) % 50)
    full = jnp.ones_like(ids)
    model, variables = _init()
    a, b = model.apply(variables, ids, full), model.apply(variables, later_changed, full)
    np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-6)
    assert not np.allclose(a[:, 5:], b[:, 5:])
    model, variables = _init(causal=False)
    a, b = model.apply(variables, ids, full), model.apply(variables, later_changed, full)
    assert not np.allclose(a[:, :5], b[:, :5])


@pytest.mark.parametrize("causal", [True, False])
def test_padded_positions_do_not_change_real_ones(causal):
    model, variables = _init(causal=causal)
    ids = _ids()
    other = jnp.where(MASK > 0, ids, (ids + 7) % 50)
    a, b = model.apply(variables, ids, MASK), model.apply(variables, other, MASK)
    real = np.asarray(MASK, bool)
    np.testing.assert_allclose(np.asarray(a)[real], np.asarray(b)[real], atol=1e-6)
    assert a.shape == (3, 10, 32)


def test_text_longer_than_position_table_is_rejected():
    model, variables = _init()
    ids = jnp.zeros((1, 13), jnp.int32)
    with pytest.raises(ValueError, match="max_position_embeddings 12"):
        model.apply(variables, ids, jnp.ones_like(ids))


def test_dual_encoder_projects_the_eos_state():
    config = presets.tiny_vit()
    model = build_model(config)
    variables = init_variables(model, config, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(2), (3, config.max_text_length), 5, config.text.vocab_size)
    mask = (jnp.arange(config.max_text_length)[None] < jnp.array([[16], [5], [2]])).astype(jnp.int32)
    embeds = model.apply(variables, ids, mask, method=DualEncoder.encode_text)
    hidden = model.apply(variables, ids, mask, method=lambda m, i, k: m.text_tower(i, k))
    params = variables["params"]["text_projection"]
    eos = np.asarray(hidden)[[0, 1, 2], [15, 4, 1]]
    expected = eos @ np.asarray(params["kernel"]) + np.asarray(params["bias"])
    expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
    np.testing.assert_allclose(embeds, expected, atol=1e-5)


@pytest.mark.parametrize("tower,field", [("image", "model.image.type"), ("text", "model.text.type")])
def test_unknown_tower_types_are_named(tower, field):
    config = presets.tiny_vit()
    config[tower].type = "lstm"
    with pytest.raises(ValueError, match=f"{field}: unknown {tower} tower 'lstm'"):
        build_model(config)
