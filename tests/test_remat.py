"""Rematerialisation and scanned layers change memory and compile time, never the maths: the
same parameter tree (remat) or the same parameters stacked (scan), the same outputs and
gradients as the plain towers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.models import bert, build_model, efficientnet, init_variables, layers, presets, text_transformer, vit
from tests import fixtures

BATCH = 4


def _dual_config(kind: str, remat: str):
    """Both towers of a tiny dual encoder with `remat`; dropout on, to check it draws the same
    masks when recomputed."""
    if kind == "efficientnet_bert":
        config = fixtures.three_stage_tiny(32, 8)
    else:
        config = presets.tiny_vit()
        config.image.dropout = config.text.dropout = 0.1
    config.image.remat = config.text.remat = remat
    return config


def _dual_inputs(config):
    k1, k2 = jax.random.split(jax.random.key(1))
    images = jax.random.uniform(k1, (BATCH, config.image_size, config.image_size, 3), minval=-1, maxval=1)
    ids = jax.random.randint(k2, (BATCH, config.max_text_length), 5, config.text.vocab_size)
    lengths = jnp.array([[config.max_text_length], [5], [3], [2]])
    return images, ids, (jnp.arange(config.max_text_length)[None] < lengths).astype(jnp.int32)


def _loss_and_grads(model, variables, inputs):
    """A contrastive-style scalar in training mode (BatchNorm on batch statistics, dropout on)."""

    def loss(params):
        out, updates = model.apply(
            {**variables, "params": params},
            *inputs,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(7)},
        )
        logits = out["image_embeds"] @ out["text_embeds"].T / out["temperature"]
        return -jnp.mean(jnp.diag(jax.nn.log_softmax(logits))), (out, updates)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])


@pytest.fixture(scope="module", params=["efficientnet_bert", "vit_transformer"])
def plain(request):
    config = _dual_config(request.param, "none")
    model = build_model(config)
    variables = init_variables(model, config, jax.random.key(0))
    return request.param, variables, _loss_and_grads(model, variables, _dual_inputs(config))


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_keeps_the_parameter_tree_outputs_and_gradients(plain, remat):
    kind, variables, ((loss, (out, updates)), grads) = plain
    config = _dual_config(kind, remat)
    model = build_model(config)
    shapes = jax.eval_shape(lambda: init_variables(model, config, jax.random.key(0)))
    assert jax.tree.structure(shapes) == jax.tree.structure(variables)
    assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(jnp.shape, variables)
    (loss_r, (out_r, updates_r)), grads_r = _loss_and_grads(model, variables, _dual_inputs(config))
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves((out_r, updates_r, grads_r)), jax.tree.leaves((out, updates, grads)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_unknown_remat_mode_is_named():
    config = presets.tiny_vit()
    config.text.remat = "offload"
    model = build_model(config)
    with pytest.raises(ValueError, match="remat must be one of .* got 'offload'"):
        init_variables(model, config, jax.random.key(0))


# Each Transformer tower, tiny, with the submodule that holds its layers (None: the tower itself).
TOWERS = {
    "bert": (bert.Bert, {**bert.bert_config("tiny", 50, max_position_embeddings=8)}, None),
    "vit": (vit.ViT, {**vit.vit_config("tiny/4", dropout=0.1), "image_size": 16}, "encoder"),
    "transformer": (
        text_transformer.TextTransformer,
        {**text_transformer.text_transformer_config("tiny", 50, max_position_embeddings=8, dropout=0.1)},
        "encoder",
    ),
}


def _tower(name, **fields):
    cls, config, _ = TOWERS[name]
    return cls(**{k: v for k, v in dict(config, **fields).items() if k != "type"})


def _tower_inputs(name):
    if name == "vit":
        return (jax.random.uniform(jax.random.key(1), (3, 16, 16, 3), minval=-1, maxval=1),)
    ids = jax.random.randint(jax.random.key(1), (3, 8), 0, 50)
    return ids, jnp.array([[1] * 8, [1] * 5 + [0] * 3, [1] * 2 + [0] * 6])


def _residual_count(model, inputs) -> int:
    """Elements kept from the forward pass for the backward one (the VJP closure's arrays)."""
    variables = jax.eval_shape(model.init, jax.random.key(0), *inputs)
    vjp = jax.eval_shape(lambda v: jax.vjp(lambda v: model.apply(v, *inputs), v)[1], variables)
    return sum(x.size for x in jax.tree.leaves(vjp))


@pytest.mark.parametrize("name", ["efficientnet", "bert", "vit", "transformer"])
def test_remat_keeps_fewer_activations_for_the_backward_pass(name):
    """The equivalence above would hold for a remat that did nothing; this is the point of it:
    'full' keeps the least, 'dots' keeps the projections too, 'none' keeps everything."""
    if name == "efficientnet":
        fields = dict(fixtures.three_stage_tiny(32, 8).image)
        make = lambda remat: efficientnet.EfficientNet(**dict(fields, remat=remat))  # noqa: E731
        inputs = (jnp.zeros((2, 32, 32, 3)),)
    else:
        make = lambda remat: _tower(name, remat=remat)  # noqa: E731
        inputs = _tower_inputs(name)
    counts = {remat: _residual_count(make(remat), inputs) for remat in ("none", "full", "dots")}
    assert counts["full"] < counts["dots"] < counts["none"], counts


def _map_layers(params, name, fn):
    """`params` with `fn` applied to the dict that holds the tower's layers."""
    encoder = TOWERS[name][2]
    return fn(params) if encoder is None else {**params, encoder: fn(params[encoder])}


@pytest.mark.parametrize("name", sorted(TOWERS))
def test_scanned_layers_equal_the_unrolled_ones_on_stacked_parameters(name):
    plain_model = _tower(name)
    inputs = _tower_inputs(name)
    params = plain_model.init(jax.random.key(0), *inputs)["params"]
    num_layers = plain_model.num_layers
    stacked = _map_layers(params, name, lambda p: layers.stack_layers(p, num_layers))
    # The scanned tower's own parameter tree is the stacked layout.
    scanned_model = _tower(name, scan_layers=True, remat="dots")
    shapes = jax.eval_shape(scanned_model.init, jax.random.key(0), *inputs)["params"]
    assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(jnp.shape, stacked)
    assert jax.tree.leaves(_map_layers(shapes, name, lambda p: p["layers"]))[0].shape[0] == num_layers
    # Round trip.
    unstacked = _map_layers(stacked, name, lambda p: layers.unstack_layers(p, num_layers))
    for a, b in zip(jax.tree.leaves(unstacked), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)

    def output_sum(model, p):
        out = model.apply({"params": p}, *inputs)
        return jnp.sum(jnp.sin(out)), out

    grad = lambda model: jax.jit(jax.grad(lambda p: output_sum(model, p), has_aux=True))  # noqa: E731
    plain_grads, plain_out = grad(plain_model)(params)
    scanned_grads, scanned_out = grad(scanned_model)(stacked)
    np.testing.assert_allclose(scanned_out, plain_out, rtol=1e-6, atol=1e-6)
    expected = _map_layers(plain_grads, name, lambda p: layers.stack_layers(p, num_layers))
    for a, b in zip(jax.tree.leaves(scanned_grads), jax.tree.leaves(expected), strict=True):
        # Float32 noise of the other summation order, relative to the leaf's scale.
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(b).max()))


def test_scanned_layers_train_with_dropout():
    model = _tower("transformer", scan_layers=True)
    inputs = _tower_inputs("transformer")
    variables = model.init(jax.random.key(0), *inputs)
    eval_out = model.apply(variables, *inputs)
    train_out = model.apply(variables, *inputs, train=True, rngs={"dropout": jax.random.key(3)})
    assert train_out.shape == eval_out.shape and not np.allclose(train_out, eval_out)


def test_stacking_names_missing_layers():
    with pytest.raises(KeyError, match="layer_2"):
        layers.stack_layers({"layer_0": {}, "layer_1": {}}, 3)
    with pytest.raises(KeyError, match="'layers'"):
        layers.unstack_layers({"layer_0": {}}, 1)
