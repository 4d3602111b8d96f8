"""EfficientNet structure: HF's channel rounding, block enumeration, padding, drop-connect."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.models import efficientnet as enet

TINY = dict(width_coefficient=0.25, depth_coefficient=0.5)


def test_round_filters_matches_hf_values():
    assert enet.round_filters(32, 2.0, 8) == 64  # B7 stem
    assert enet.round_filters(320, 2.0, 8) == 640  # B7 last stage = align-base embedding
    assert enet.round_filters(320, 1.0, 8) == 320  # B0
    assert enet.round_filters(32, 4.3, 8) == 136  # L2 stem: 137.6 rounds down to 136
    assert enet.round_filters(320, 4.3, 8) == 1376
    assert enet.round_filters(40, 0.25, 8) == 16  # 10 -> 8 would lose > 10%, so 16
    assert enet.round_filters(16, 0.25, 8) == 8  # never below the divisor


def test_block_enumeration_b7_and_b0():
    b7 = enet.block_specs(2.0, 3.1, 8, **enet.BASE_STAGES)
    assert len(b7) == 55
    b0 = enet.block_specs(1.0, 1.0, 8, **enet.BASE_STAGES)
    assert len(b0) == 16
    assert [s.residual for s in b0[:4]] == [False, False, True, False]  # first of a stage never
    assert [s.stride for s in b0[:4]] == [1, 2, 1, 2]
    assert b0[1].in_dim == 16 and b0[2].in_dim == 24  # repeats take the stage's output width
    np.testing.assert_allclose([s.drop_rate for s in b0], [0.2 * i / 16 for i in range(16)])


def test_mismatched_stage_lists_are_rejected():
    stages = dict(enet.BASE_STAGES, strides=(1, 2))
    with pytest.raises(ValueError, match="differ in length"):
        enet.block_specs(1.0, 1.0, 8, **stages)


def test_depthwise_padding_is_hf_not_tf_same():
    assert enet.depthwise_padding(5, 2, adjust=True) == ((1, 2), (1, 2))
    assert enet.depthwise_padding(3, 2, adjust=True) == ((0, 1), (0, 1))
    assert enet.depthwise_padding(5, 2, adjust=False) == ((2, 2), (2, 2))
    assert enet.depthwise_padding(5, 1, adjust=True) == ((2, 2), (2, 2))


def test_stem_output_size_at_odd_resolution():
    # HF pads (0, 1) then a valid stride-2 conv: 289 -> 144 (TF SAME would give 145).
    model = enet.EfficientNet(**TINY)
    x = jnp.zeros((1, 289, 289, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    _, state = jax.eval_shape(
        lambda v: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]), variables
    )
    assert state["intermediates"]["stem_conv"]["__call__"][0].shape == (1, 144, 144, 8)


def test_efficientnet_config_covers_every_module_field():
    config = enet.efficientnet_config("b3", drop_connect_rate=0.1)
    model = enet.EfficientNet(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    assert (model.width_coefficient, model.depth_coefficient, model.drop_connect_rate) == (1.2, 1.4, 0.1)
    with pytest.raises(ValueError, match="'b9'"):
        enet.efficientnet_config("b9")


def test_drop_connect_per_example_drops_whole_examples():
    x = jnp.ones((64, 4, 4, 8))
    out = enet.DropConnect(0.5, "per_example").apply({}, x, False, rngs={"dropout": jax.random.key(0)})
    per_example = np.asarray(out).reshape(64, -1)
    assert set(np.unique(per_example)) == {0.0, 2.0}
    assert (per_example.min(1) == per_example.max(1)).all()
    assert 10 < (per_example[:, 0] == 0).sum() < 54


def test_drop_connect_elementwise_and_deterministic():
    x = jnp.ones((4, 4, 4, 8))
    out = enet.DropConnect(0.5, "elementwise").apply({}, x, False, rngs={"dropout": jax.random.key(0)})
    rows = np.asarray(out).reshape(4, -1)
    assert (rows.min(1) == 0).all() and (rows.max(1) == 2).all()
    np.testing.assert_array_equal(enet.DropConnect(0.5).apply({}, x, True), x)


@pytest.fixture(scope="module")
def tiny_net():
    model = enet.EfficientNet(**TINY)
    images = jax.random.uniform(jax.random.key(1), (4, 33, 33, 3), minval=-1, maxval=1)
    variables = jax.jit(model.init)(jax.random.key(0), images)
    return model, variables, images


def test_eval_output_of_an_example_does_not_depend_on_its_batch(tiny_net):
    model, variables, images = tiny_net
    apply = jax.jit(model.apply)
    whole = apply(variables, images)
    alone = apply(variables, images[:1])
    assert whole.shape == (4, model.features)
    np.testing.assert_allclose(whole[:1], alone, atol=1e-5)


def test_training_updates_batchnorm_statistics_with_flax_momentum(tiny_net):
    model, variables, images = tiny_net
    train_apply = jax.jit(
        lambda v, x: model.apply(
            v,
            x,
            train=True,
            capture_intermediates=True,
            mutable=["batch_stats", "intermediates"],
            rngs={"dropout": jax.random.key(2)},
        )
    )
    _, updates = train_apply(variables, images)
    stem = updates["intermediates"]["stem_conv"]["__call__"][0]
    batch_mean = np.asarray(stem).mean(axis=(0, 1, 2))
    # momentum 0.99 in Flax/TF semantics: the running mean (init 0) moves 1% toward the batch.
    np.testing.assert_allclose(updates["batch_stats"]["stem_bn"]["mean"], 0.01 * batch_mean, rtol=1e-4, atol=1e-7)


def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match="'mish'"):
        enet.EfficientNet(**TINY, activation="mish").init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def _grouped_conv(x, kernel, stride, padding):
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
        precision=jax.lax.Precision.HIGHEST,
    )


@pytest.mark.parametrize(
    "size,kernel_size,stride,padding",
    [
        (9, 3, 1, ((1, 1), (1, 1))),
        (10, 3, 2, ((0, 1), (0, 1))),  # HF's adjusted stride-2 padding
        (11, 5, 2, ((1, 2), (1, 2))),  # odd size: the last padded row is never read
        (12, 5, 2, ((2, 2), (2, 2))),
        (7, 5, 1, ((2, 2), (2, 2))),
        (8, 3, 2, ((0, 0), (1, 0))),  # asymmetric and unpadded axes
    ],
)
def test_shifted_sum_depthwise_equals_grouped_convolution_with_gradients(size, kernel_size, stride, padding):
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (2, size, size + 1, 5))
    kernel = jax.random.normal(keys[1], (kernel_size, kernel_size, 1, 5))
    expected = _grouped_conv(x, kernel, stride, padding)
    actual = enet.shifted_sum_depthwise(x, kernel, stride, padding)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
    cotangent = jax.random.normal(keys[2], expected.shape)

    def loss(fn):
        return lambda x, kernel: jnp.vdot(fn(x, kernel, stride, padding), cotangent)

    want = jax.grad(loss(_grouped_conv), argnums=(0, 1))(x, kernel)
    got = jax.grad(loss(enet.shifted_sum_depthwise), argnums=(0, 1))(x, kernel)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size,padding", [(10, ((0, 1), (0, 1))), (9, ((0, 1), (0, 1))), (8, ((1, 1), (1, 1)))])
def test_stem_im2col_equals_the_convolution_with_gradients(size, padding):
    keys = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(keys[0], (2, size, size + 1, 3))

    def stem(impl):
        return enet.StemConv(8, 3, 2, padding, impl)

    variables = stem("conv").init(keys[1], x)
    assert variables["params"]["kernel"].shape == (3, 3, 3, 8)  # nn.Conv's layout: checkpoints unchanged
    expected = stem("conv").apply(variables, x)
    np.testing.assert_allclose(stem("shifted_sum").apply(variables, x), expected, rtol=1e-5, atol=1e-5)
    cotangent = jax.random.normal(keys[2], expected.shape)

    def grads(impl):
        return jax.grad(lambda v, x: jnp.vdot(stem(impl).apply(v, x), cotangent), argnums=(0, 1))(variables, x)

    for got, want in zip(jax.tree.leaves(grads("shifted_sum")), jax.tree.leaves(grads("conv")), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spatial,channels", [(6, 8), (3, 8)])  # 36 positions >= 2 x 8 channels: folded; 9: not
def test_gated_projection_folded_equals_scaling_x_with_gradients(spatial, channels):
    keys = jax.random.split(jax.random.key(2), 4)
    x = jax.random.normal(keys[0], (3, spatial, spatial, channels))
    gate = jax.nn.sigmoid(jax.random.normal(keys[1], (3, channels)))
    variables = enet.GatedProjection(5, fold=False).init(keys[2], x, gate)
    assert variables["params"]["kernel"].shape == (channels, 5)  # FlatDense's layout: checkpoints unchanged
    kernel = variables["params"]["kernel"]
    expected = ((x * gate[:, None, None, :]).reshape(-1, channels) @ kernel).reshape(3, spatial, spatial, 5)
    cotangent = jax.random.normal(keys[3], expected.shape)

    def value_and_grads(fold):
        def f(v, x, gate):
            return jnp.vdot(enet.GatedProjection(5, fold=fold).apply(v, x, gate), cotangent)

        return enet.GatedProjection(5, fold=fold).apply(variables, x, gate), jax.grad(f, argnums=(0, 1, 2))(
            variables, x, gate
        )

    (unfolded, want), (folded, got) = value_and_grads(False), value_and_grads(True)
    np.testing.assert_allclose(unfolded, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(folded, expected, rtol=1e-5, atol=1e-5)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
