"""BERT tower: the attention mask, exact GELU, dropout only in training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from align_jax.models import bert

CONFIG = bert.bert_config("tiny", vocab_size=50, max_position_embeddings=16)


@pytest.fixture(scope="module")
def tiny_bert():
    model = bert.Bert(**CONFIG)
    ids = jax.random.randint(jax.random.key(1), (3, 10), 0, 50)
    mask = jnp.array([[1] * 10, [1] * 6 + [0] * 4, [1] * 2 + [0] * 8])
    variables = model.init(jax.random.key(0), ids, mask)
    return model, variables, ids, mask


def test_padded_positions_do_not_change_real_ones(tiny_bert):
    model, variables, ids, mask = tiny_bert
    other = jnp.where(mask > 0, ids, (ids + 7) % 50)
    a = model.apply(variables, ids, mask)
    b = model.apply(variables, other, mask)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(a)[real], np.asarray(b)[real], atol=1e-6)
    assert a.shape == (3, 10, CONFIG.hidden_size)


def test_dropout_only_in_training(tiny_bert):
    model, variables, ids, mask = tiny_bert
    eval_a = model.apply(variables, ids, mask)
    eval_b = model.apply(variables, ids, mask, train=False)
    np.testing.assert_array_equal(eval_a, eval_b)
    train = model.apply(variables, ids, mask, train=True, rngs={"dropout": jax.random.key(3)})
    assert not np.allclose(train, eval_a)


def test_gelu_is_the_exact_erf_form():
    x = np.linspace(-4, 4, 41).astype(np.float32)
    reference = 0.5 * x * (1 + erf(x / np.sqrt(2)))
    np.testing.assert_allclose(bert.ACTIVATIONS["gelu"](x), reference, atol=1e-6)
    assert np.abs(bert.ACTIVATIONS["gelu_new"](x) - reference).max() > 1e-4


def test_text_longer_than_position_table_is_rejected(tiny_bert):
    model, variables, *_ = tiny_bert
    ids = jnp.zeros((1, 17), jnp.int32)
    with pytest.raises(ValueError, match="max_position_embeddings 16"):
        model.apply(variables, ids, jnp.ones_like(ids))


def test_heads_must_divide_hidden_size():
    model = bert.Bert(**dict(CONFIG, num_heads=3))
    ids = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="num_heads 3"):
        model.init(jax.random.key(0), ids, jnp.ones_like(ids))


def test_bert_config_sizes():
    assert bert.bert_config("base").hidden_size == 768
    assert bert.bert_config("large").num_layers == 24
    with pytest.raises(ValueError, match="'giant'"):
        bert.bert_config("giant")
