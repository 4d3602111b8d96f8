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


@pytest.mark.parametrize("remat, scan", [("none", False), ("full", False), ("none", True)])
def test_first_token_only_is_the_cls_row_of_the_full_output_with_gradients(tiny_bert, remat, scan):
    """The cut last layer (or, scanned, the sliced full one) gives the [CLS] state and its
    gradients as the whole-text computation does, on every parameter and with padding."""
    _, variables, ids, mask = tiny_bert
    model = bert.Bert(**dict(CONFIG, remat=remat, scan_layers=scan))
    params = variables["params"]
    if scan:
        from align_jax.models.layers import stack_layers

        params = stack_layers(params, CONFIG.num_layers)
    weights = jax.random.normal(jax.random.key(4), (3, CONFIG.hidden_size))

    def cls_loss(p, first_token_only):
        hidden = model.apply({"params": p}, ids, mask, first_token_only=first_token_only)
        return jnp.sum(jnp.sin(hidden[:, 0] * weights)), hidden

    (full_loss, full), full_grads = jax.value_and_grad(cls_loss, has_aux=True)(params, False)
    (cut_loss, cut), cut_grads = jax.value_and_grad(cls_loss, has_aux=True)(params, True)
    assert full.shape == (3, 10, CONFIG.hidden_size) and cut.shape == (3, 1, CONFIG.hidden_size)
    np.testing.assert_allclose(cut[:, 0], full[:, 0], rtol=1e-5, atol=1e-6)
    pooled = model.apply({"params": params}, ids, mask, method=bert.Bert.pooled)
    np.testing.assert_allclose(pooled, full[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cut_loss, full_loss, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(cut_grads), jax.tree.leaves(full_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
