"""ViT image tower: pooled output, position-embedding resampling, mixed precision, its place in
the dual encoder (presets, sharding, a sharded train step)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from align_jax import optim, sharding, train_step
from align_jax.models import build_model, init_variables, presets, vit

TINY = {k: v for k, v in vit.vit_config("tiny/4").items() if k != "type"}


def _images(n=2, size=16, seed=1):
    return jax.random.uniform(jax.random.key(seed), (n, size, size, 3), minval=-1, maxval=1)


@pytest.fixture(scope="module")
def tiny_vit():
    model = vit.ViT(**TINY, image_size=16)
    return model, model.init(jax.random.key(0), _images())


def test_vit_config_standard_variants():
    b16 = vit.vit_config("B/16")
    assert (b16.type, b16.patch_size, b16.hidden_size, b16.num_layers, b16.num_heads, b16.intermediate_size) == (
        "vit",
        16,
        768,
        12,
        12,
        3072,
    )
    assert vit.vit_config("B", 16) == b16
    assert vit.vit_config("B/32").patch_size == 32
    s16, l14 = vit.vit_config("S/16"), vit.vit_config("L/14")
    assert (s16.hidden_size, s16.num_layers, s16.num_heads, s16.intermediate_size) == (384, 12, 6, 1536)
    assert (l14.patch_size, l14.hidden_size, l14.num_layers, l14.num_heads, l14.intermediate_size) == (
        14,
        1024,
        24,
        16,
        4096,
    )


@pytest.mark.parametrize(
    "args,message",
    [(("Q/16",), "'Q'"), (("B",), "needs a patch size"), (("B/16", 32), "disagrees with patch_size 32")],
)
def test_vit_config_errors_name_the_value(args, message):
    with pytest.raises(ValueError, match=message):
        vit.vit_config(*args)


def test_gap_pools_tokens_into_one_vector_per_image(tiny_vit):
    model, variables = tiny_vit
    out = model.apply(variables, _images(3))
    assert out.shape == (3, 32) and out.dtype == jnp.float32
    assert "cls_token" not in variables["params"]
    # 16 px / 4 px patches: a 4 x 4 grid of position embeddings.
    assert variables["params"]["position_embedding"].shape == (1, 16, 32)


def test_cls_pooling_adds_a_class_token_and_returns_its_state():
    model = vit.ViT(**dict(TINY, pooling="cls"), image_size=16)
    variables = model.init(jax.random.key(0), _images())
    assert variables["params"]["cls_token"].shape == (1, 1, 32)
    out, state = model.apply(variables, _images(), capture_intermediates=True, mutable=["intermediates"])
    final = state["intermediates"]["encoder"]["final_ln"]["__call__"][0]
    assert final.shape == (2, 17, 32)  # the class token, then 16 patches
    np.testing.assert_array_equal(out, final[:, 0])


def test_unknown_pooling_is_named():
    model = vit.ViT(**dict(TINY, pooling="map"), image_size=16)
    with pytest.raises(ValueError, match="'map'"):
        model.init(jax.random.key(0), _images())


def test_position_embeddings_are_resampled_for_other_image_sizes(tiny_vit):
    model, variables = tiny_vit
    assert model.apply(variables, _images(2, size=32)).shape == (2, 32)
    # Bilinear resampling keeps a plane a plane: a ramp over the 4 x 4 grid stays a ramp on 8 x 8.
    ramp = jnp.broadcast_to(jnp.arange(4.0)[None, None, :], (1, 4, 4)).reshape(1, 16, 1)
    resized = np.asarray(vit.resize_position_embedding(ramp, (8, 8))).reshape(8, 8)
    np.testing.assert_allclose(resized[:, 2:6], np.broadcast_to(np.arange(0.75, 2.5, 0.5), (8, 4)), atol=1e-6)
    np.testing.assert_array_equal(vit.resize_position_embedding(ramp, (4, 4)), ramp)


def test_dropout_only_in_training():
    model = vit.ViT(**dict(TINY, dropout=0.5), image_size=16)
    variables = model.init(jax.random.key(0), _images())
    eval_out = model.apply(variables, _images())
    np.testing.assert_array_equal(eval_out, model.apply(variables, _images(), train=False))
    train_out = model.apply(variables, _images(), train=True, rngs={"dropout": jax.random.key(3)})
    assert not np.allclose(train_out, eval_out)


def test_heads_must_divide_hidden_size():
    model = vit.ViT(**dict(TINY, num_heads=3), image_size=16)
    with pytest.raises(ValueError, match="num_heads 3"):
        model.init(jax.random.key(0), _images())


@pytest.fixture(scope="module")
def tiny_vit_dual_encoder():
    config = presets.tiny_vit()
    model = build_model(config)
    return config, model, init_variables(model, config, jax.random.key(0))


def _dual_inputs(config, n=3):
    images = _images(n, config.image_size)
    ids = jax.random.randint(jax.random.key(2), (n, config.max_text_length), 5, config.text.vocab_size)
    lengths = jnp.array([config.max_text_length, 5, 2])[:n, None]
    return images, ids, (jnp.arange(config.max_text_length)[None] < lengths).astype(jnp.int32)


def test_tiny_vit_preset_gives_unit_norm_float32_embeddings(tiny_vit_dual_encoder):
    config, model, variables = tiny_vit_dual_encoder
    assert (config.image.type, config.text.type) == ("vit", "transformer")
    assert set(variables) == {"params"}  # no BatchNorm anywhere
    out = jax.jit(model.apply)(variables, *_dual_inputs(config))
    for key in ("image_embeds", "text_embeds"):
        assert out[key].shape == (3, config.embed_dim) and out[key].dtype == jnp.float32
        np.testing.assert_allclose(jnp.linalg.norm(out[key], axis=-1), 1.0, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_embeddings(tiny_vit_dual_encoder):
    _, _, variables = tiny_vit_dual_encoder
    config = presets.tiny_vit()
    config.dtype = "bfloat16"
    model = build_model(config)
    shapes = jax.eval_shape(lambda: init_variables(model, config, jax.random.key(0)))
    assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    images, ids, mask = _dual_inputs(config)
    features = model.apply(variables, images, method=lambda m, x: m.image_tower(x))
    assert features.dtype == jnp.bfloat16
    out = jax.jit(model.apply)(variables, images, ids, mask)
    for key in ("image_embeds", "text_embeds"):
        assert out[key].dtype == jnp.float32
        np.testing.assert_allclose(jnp.linalg.norm(out[key], axis=-1), 1.0, atol=1e-3)


def test_fsdp_shards_the_large_vit_tensors_over_their_width():
    config = presets.vit_b16_bert_base()
    config.image.update(vit.vit_config("S/16", num_layers=1))
    model = build_model(config)
    shapes = jax.eval_shape(lambda: init_variables(model, config, jax.random.key(0)))
    mesh = sharding.make_mesh([("data", 4), ("fsdp", 2)])
    specs = jax.tree.map(lambda s: s.spec, sharding.infer_shardings(shapes, mesh))["params"]["image_tower"]
    layer = specs["encoder"]["layer_0"]
    assert layer["attention"]["query"]["kernel"] == P("fsdp", None, None)  # [384, 6, 64]
    assert layer["attention"]["out"]["kernel"] == P(None, None, "fsdp")  # [6, 64, 384]
    assert layer["mlp_in"]["kernel"] == P(None, "fsdp")  # [384, 1536]
    assert specs["position_embedding"] == P(None, None, "fsdp")  # [1, 196, 384]
    assert specs["patch_embedding"]["kernel"] == P(None, None, None, "fsdp")  # [16, 16, 3, 384]
    assert layer["attention_ln"]["scale"] == P()  # small: replicated


def test_sharded_train_step_on_tiny_vit_with_remat_and_scan():
    config = presets.tiny_vit()
    config.image.update(remat="dots", scan_layers=True, dropout=0.1)
    config.text.update(remat="full", scan_layers=True, dropout=0.1)
    model = build_model(config)
    opt_config = optim.default_config()
    opt_config.warmup_steps = 1
    tx, schedule = optim.make_optimizer(opt_config, total_steps=10)
    mesh = sharding.make_mesh([("data", 4), ("fsdp", 2)])
    state, shardings = train_step.create_train_state(model, config, tx, mesh, jax.random.key(0))
    step = train_step.make_train_step(model, train_step.default_loss_config(), tx, schedule, mesh, shardings)
    images, ids, mask = _dual_inputs(config, 3)
    batch = dict(
        images=_images(8, config.image_size),
        input_ids=jnp.tile(ids, (3, 1))[:8],
        attention_mask=jnp.tile(mask, (3, 1))[:8],
    )
    state, metrics = step(state, batch)
    assert int(state.step) == 1
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
