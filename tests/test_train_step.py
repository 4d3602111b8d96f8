"""The sharded train step equals one device computing the whole B x B loss (written here).

Meshes data=8, data=4 x fsdp=2 and data=2 x fsdp=4 on 8 emulated devices: the loss and every
gradient leaf, then the parameters after 3 optimizer steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax import optim, sharding, train_step
from align_jax.models import DualEncoder, build_model, init_variables
from tests import fixtures

MESHES = [(8, 1), (4, 2), (2, 4)]
GLOBAL_BATCH = 16
SMOOTHING = 0.1


def _model_config(dropout: bool):
    config = fixtures.three_stage_tiny(32, 8)
    if not dropout:
        config.image.drop_connect_rate = 0.0
        config.text.hidden_dropout = config.text.attention_dropout = 0.0
    return config


def _batch(config, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    lengths = jax.random.randint(k3, (GLOBAL_BATCH, 1), 2, config.max_text_length + 1)
    return dict(
        images=jax.random.uniform(k1, (GLOBAL_BATCH, config.image_size, config.image_size, 3), minval=-1, maxval=1),
        input_ids=jax.random.randint(k2, (GLOBAL_BATCH, config.max_text_length), 5, 100),
        attention_mask=(jnp.arange(config.max_text_length)[None] < lengths).astype(jnp.int32),
    )


def reference_loss(model, params, batch_stats, batch):
    """One device, whole batch: towers in training mode, then the smoothed B x B softmax loss in
    both directions, summed (ALIGN)."""
    variables = {"params": params, "batch_stats": batch_stats}
    images, updates = model.apply(
        variables, batch["images"], train=True, method=DualEncoder.encode_image, mutable=["batch_stats"]
    )
    texts = model.apply(
        variables, batch["input_ids"], batch["attention_mask"], train=True, method=DualEncoder.encode_text
    )
    logits = images @ texts.T / params["temperature"]
    n = logits.shape[0]
    targets = (1 - SMOOTHING) * jnp.eye(n) + SMOOTHING / n
    loss = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=1)) / n
    loss += -jnp.sum(targets * jax.nn.log_softmax(logits.T, axis=1)) / n
    return loss, updates["batch_stats"]


@pytest.fixture(scope="module")
def setup():
    config = _model_config(dropout=False)
    model = build_model(config)
    opt_config = optim.default_config()
    # eps well above float32 noise: some gradients are zero in exact arithmetic (a bias followed
    # by BatchNorm) and Adam would otherwise blow their rounding noise up to lr-sized steps.
    opt_config.update(warmup_steps=1, learning_rate=1e-2, eps=1e-3)
    tx, schedule = optim.make_optimizer(opt_config, total_steps=10)
    # The initial variables, as create_train_state derives them, on one device.
    variables = init_variables(model, config, jax.random.split(jax.random.key(0))[0])
    batches = [_batch(config, seed) for seed in range(3)]
    grad = jax.jit(jax.value_and_grad(lambda p, s, b: reference_loss(model, p, s, b), has_aux=True))
    (loss, _), grads = grad(variables["params"], variables["batch_stats"], batches[0])
    # Three reference optimizer steps on one device.
    params, stats, opt_state = variables["params"], variables["batch_stats"], tx.init(variables["params"])
    for batch in batches:
        (_, stats), g = grad(params, stats, batch)
        updates, opt_state = tx.update(g, opt_state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    return dict(
        config=config,
        model=model,
        variables=variables,
        tx=tx,
        schedule=schedule,
        batches=batches,
        loss=loss,
        grads=grads,
        params_after=params,
        stats_after=stats,
    )


def assert_tree_close(actual, expected, rtol=1e-5):
    """Every leaf equal to rtol, with an absolute floor for elements near zero: rtol times the
    leaf's largest value, and 0.1 rtol times the tree's largest value (some gradients are zero
    in exact arithmetic, e.g. a bias followed by BatchNorm: float32 leaves noise there, which
    Adam then turns into updates of ~1e-7 whose sign depends on the summation order)."""
    flat_actual = jax.tree_util.tree_leaves_with_path(actual)
    flat_expected = [np.asarray(e) for e in jax.tree.leaves(expected)]
    assert len(flat_actual) == len(flat_expected)
    tree_scale = max(np.abs(e).max() for e in flat_expected)
    for (path, a), e in zip(flat_actual, flat_expected, strict=True):
        atol = rtol * max(np.abs(e).max(), 0.1 * tree_scale)
        np.testing.assert_allclose(np.asarray(a), e, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def _state(setup, mesh):
    return train_step.create_train_state(setup["model"], setup["config"], setup["tx"], mesh, jax.random.key(0))


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_loss_and_gradients_equal_single_device_full_batch(setup, mesh_shape):
    mesh = sharding.make_mesh([("data", mesh_shape[0]), ("fsdp", mesh_shape[1])])
    state, _ = _state(setup, mesh)
    assert_tree_close(state.params, setup["variables"]["params"], rtol=0)  # sharded init == 1-device init
    loss_fn = train_step.make_loss_fn(train_step.default_loss_config(), mesh)
    grad_fn = jax.jit(train_step.make_loss_and_grad_fn(setup["model"], loss_fn))
    batch = jax.device_put(setup["batches"][0], sharding.batch_sharding(mesh))
    (loss, (metrics, _)), grads = grad_fn(state.params, state.batch_stats, batch, jax.random.key(1))
    np.testing.assert_allclose(loss, setup["loss"], rtol=1e-5)
    assert_tree_close(grads, setup["grads"])
    assert 0.0 <= float(metrics["i2t_top1"]) <= 1.0


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_three_steps_match_single_device(setup, mesh_shape):
    mesh = sharding.make_mesh([("data", mesh_shape[0]), ("fsdp", mesh_shape[1])])
    state, shardings = _state(setup, mesh)
    if mesh_shape[1] > 1:  # FSDP actually shards the large tensors
        spec = shardings.params["text_tower"]["word_embeddings"]["embedding"].spec
        assert "fsdp" in spec
    step = train_step.make_train_step(
        setup["model"], train_step.default_loss_config(), setup["tx"], setup["schedule"], mesh, shardings
    )
    for batch in setup["batches"]:
        state, metrics = step(state, batch)
    assert int(state.step) == 3
    assert_tree_close(state.params, setup["params_after"])
    assert_tree_close(state.batch_stats, setup["stats_after"])
    assert set(metrics) >= {"loss", "i2t_top1", "t2i_top1", "temperature", "grad_norm", "param_norm", "learning_rate"}
    assert float(metrics["learning_rate"]) == pytest.approx(float(setup["schedule"](2)))


def test_dropout_and_drop_connect_are_the_same_on_1_and_8_devices():
    config = _model_config(dropout=True)
    model = build_model(config)
    tx, schedule = optim.make_optimizer(optim.default_config(), total_steps=20_000)
    batch = _batch(config)
    results = []
    for axes in ([("data", 1), ("fsdp", 1)], [("data", 4), ("fsdp", 2)]):
        devices = jax.devices()[: 1 if axes[0][1] == 1 else 8]
        mesh = sharding.make_mesh(axes, devices)
        state, shardings = train_step.create_train_state(model, config, tx, mesh, jax.random.key(0))
        step = train_step.make_train_step(model, train_step.default_loss_config(), tx, schedule, mesh, shardings)
        _, metrics = step(state, batch)
        results.append(float(metrics["loss"]))
    assert results[0] == pytest.approx(results[1], rel=1e-5)


def test_batch_not_divisible_by_the_data_axes_is_rejected(setup):
    mesh = sharding.make_mesh([("data", 8), ("fsdp", 1)])
    state, shardings = _state(setup, mesh)
    step = train_step.make_train_step(
        setup["model"], train_step.default_loss_config(), setup["tx"], setup["schedule"], mesh, shardings
    )
    batch = jax.tree.map(lambda x: x[:12], setup["batches"][0])
    with pytest.raises(ValueError, match="global batch size 12 is not divisible by the 8 devices"):
        step(state, batch)


def test_unknown_loss_kind_is_named():
    mesh = sharding.make_mesh([("data", 8), ("fsdp", 1)])
    config = train_step.default_loss_config()
    config.kind = "triplet"
    with pytest.raises(ValueError, match="loss.kind"):
        train_step.make_loss_fn(config, mesh)


def test_chunked_loss_in_the_step_equals_single_device_full_batch(setup):
    mesh = sharding.make_mesh([("data", 4), ("fsdp", 2)])
    state, _ = _state(setup, mesh)
    config = train_step.default_loss_config()
    config.update(kind="chunked_softmax", chunk_size=1)
    grad_fn = jax.jit(train_step.make_loss_and_grad_fn(setup["model"], train_step.make_loss_fn(config, mesh)))
    batch = jax.device_put(setup["batches"][0], sharding.batch_sharding(mesh))
    (loss, _), grads = grad_fn(state.params, state.batch_stats, batch, jax.random.key(1))
    np.testing.assert_allclose(loss, setup["loss"], rtol=1e-5)
    assert_tree_close(grads, setup["grads"])


def test_frozen_image_tower_and_sigmoid_loss(setup):
    config = _model_config(dropout=False)
    config.logit_bias_init = -10.0
    model = build_model(config)
    opt_config = optim.default_config()
    opt_config.update(warmup_steps=0, decay="constant", freeze="image")
    tx, schedule = optim.make_optimizer(opt_config, total_steps=10)
    mesh = sharding.make_mesh([("data", 8), ("fsdp", 1)])
    state, shardings = train_step.create_train_state(model, config, tx, mesh, jax.random.key(0))
    before = jax.device_get(state)
    loss_config = train_step.default_loss_config()
    loss_config.kind = "sigmoid"
    step = train_step.make_train_step(model, loss_config, tx, schedule, mesh, shardings, freeze="image")
    state, metrics = step(state, setup["batches"][0])
    after = jax.device_get(state)
    changed = lambda tree_a, tree_b: any(  # noqa: E731
        not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b), strict=True)
    )
    assert not changed(before.params["image_tower"], after.params["image_tower"])
    assert not changed(before.params["image_projection"], after.params["image_projection"])
    assert not changed(before.batch_stats, after.batch_stats)  # a locked tower runs in inference mode
    assert changed(before.params["text_tower"], after.params["text_tower"])
    assert after.params["logit_bias"] != before.params["logit_bias"]
    assert np.isfinite(float(metrics["loss"]))


def test_bfloat16_compute_keeps_float32_state_and_tracks_the_float32_step(setup):
    """bf16 towers: parameters, optimizer state, BatchNorm statistics, embeddings and the loss
    stay float32, and the loss and gradients are those of the float32 step to bf16 precision."""
    config = setup["config"].copy_and_resolve_references()
    config.dtype = "bfloat16"
    model = build_model(config)
    mesh = sharding.make_mesh([("data", 8), ("fsdp", 1)])
    state, shardings = train_step.create_train_state(model, config, setup["tx"], mesh, jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves((state.params, state.batch_stats, state.opt_state))} == {
        jnp.dtype("float32"),
        jnp.dtype("int32"),
    }
    loss_fn = train_step.make_loss_fn(train_step.default_loss_config(), mesh)
    grad_fn = jax.jit(train_step.make_loss_and_grad_fn(model, loss_fn))
    batch = jax.device_put(setup["batches"][0], sharding.batch_sharding(mesh))
    (loss, _), grads = grad_fn(state.params, state.batch_stats, batch, jax.random.key(1))
    assert loss.dtype == jnp.float32 and all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    np.testing.assert_allclose(loss, setup["loss"], rtol=2e-2)
    flat, reference = jax.tree.leaves(grads), jax.tree.leaves(setup["grads"])
    cosine = [
        float(np.vdot(g, r) / (np.linalg.norm(g) * np.linalg.norm(r)))
        for g, r in zip(flat, reference, strict=True)
        if np.linalg.norm(r) > 1e-3 * max(np.linalg.norm(x) for x in reference)
    ]
    assert min(cosine) > 0.95, sorted(cosine)[:5]
    step = train_step.make_train_step(
        model, train_step.default_loss_config(), setup["tx"], setup["schedule"], mesh, shardings
    )
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and state.params["temperature"].dtype == jnp.float32
