"""Gradient accumulation (GradCache): k micro-batches give the full-batch step.

The reference is the k = 1 step on the same mesh (itself checked against one device computing
the whole B x B loss in test_train_step.py). BatchNorm statistics are taken per group of 2
examples, which divides the 64 / (8 devices * k) rows each device holds of a micro-batch for
k <= 4, so the micro-batches' groups are the full batch's groups.

Tolerance: accumulation sums the parameter gradients in another order (per micro-batch, then
over micro-batches), so leaves agree to float32 rounding, rtol 1e-5; `assert_tree_close` adds an
absolute floor for leaves that are zero in exact arithmetic (a bias followed by BatchNorm), where
only rounding noise is left to compare.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax import config as config_lib
from align_jax import optim, perf, sharding, train_step
from align_jax.models import DualEncoder, build_model
from tests import fixtures
from tests.test_train_step import assert_tree_close

GLOBAL_BATCH = 64
BN_GROUP = 2
SMOOTHING = 0.1
_COLLECTIVE = re.compile(r"(all-to-all|all-gather|all-reduce|reduce-scatter|collective-permute)(-start)?\(")


def _model_config(dropout: bool = False, logit_bias: bool = False):
    config = fixtures.three_stage_tiny(32, 8)
    config.image.bn_group_size = BN_GROUP
    if not dropout:
        config.image.drop_connect_rate = 0.0
        config.text.hidden_dropout = config.text.attention_dropout = 0.0
    if logit_bias:
        config.logit_bias_init = -10.0
    return config


def _batch(config, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    lengths = jax.random.randint(k3, (GLOBAL_BATCH, 1), 2, config.max_text_length + 1)
    return dict(
        images=jax.random.uniform(k1, (GLOBAL_BATCH, config.image_size, config.image_size, 3), minval=-1, maxval=1),
        input_ids=jax.random.randint(k2, (GLOBAL_BATCH, config.max_text_length), 5, 100),
        attention_mask=(jnp.arange(config.max_text_length)[None] < lengths).astype(jnp.int32),
    )


def _mesh(data: int, fsdp: int):
    return sharding.make_mesh([("data", data), ("fsdp", fsdp)])


def _optimizer(freeze: str = ""):
    opt_config = optim.default_config()
    # eps well above float32 noise, as in test_train_step.py: Adam would otherwise blow the
    # rounding noise of gradients that are zero in exact arithmetic up to lr-sized steps.
    opt_config.update(warmup_steps=1, learning_rate=1e-2, eps=1e-3, freeze=freeze)
    return optim.make_optimizer(opt_config, total_steps=10)


def _loss_and_grads(model, config, mesh, accum_steps, loss_config=None, freeze="", seed=0):
    tx, _ = _optimizer(freeze)
    state, _ = train_step.create_train_state(model, config, tx, mesh, jax.random.key(0))
    loss_fn = train_step.make_loss_fn(loss_config or train_step.default_loss_config(), mesh)
    grad_fn = jax.jit(train_step.make_loss_and_grad_fn(model, loss_fn, freeze, accum_steps, mesh))
    batch = jax.device_put(_batch(config, seed), sharding.batch_sharding(mesh))
    args = (state.params, state.batch_stats, batch, jax.random.key(1))
    compiled = grad_fn.lower(*args).compile()
    (loss, (metrics, batch_stats)), grads = compiled(*args)
    return dict(loss=loss, metrics=metrics, batch_stats=batch_stats, grads=grads, state=state, hlo=compiled.as_text())


@pytest.fixture(scope="module")
def model():
    return build_model(_model_config())


@pytest.fixture(scope="module")
def full_batch(model):
    """The k = 1 loss and gradients per mesh."""
    return {shape: _loss_and_grads(model, _model_config(), _mesh(*shape), 1) for shape in [(8, 1), (4, 2)]}


# Each k on one mesh (a compile each; the micro-batch scan is the same code for every k and mesh).
@pytest.mark.parametrize("mesh_shape, accum_steps", [((8, 1), 2), ((4, 2), 4)], ids=["data8-k2", "data4_fsdp2-k4"])
def test_accumulated_loss_gradients_and_batch_stats_equal_the_full_batch(model, full_batch, mesh_shape, accum_steps):
    expected = full_batch[mesh_shape]
    actual = _loss_and_grads(model, _model_config(), _mesh(*mesh_shape), accum_steps)
    np.testing.assert_allclose(actual["loss"], expected["loss"], rtol=1e-5)
    assert_tree_close(actual["grads"], expected["grads"])
    assert_tree_close(actual["batch_stats"], expected["batch_stats"])
    # Splitting the batch into micro-batches moves no image between devices.
    assert "all-to-all" not in actual["hlo"]
    assert not [line for line in actual["hlo"].splitlines() if "32,32,3]" in line and _COLLECTIVE.search(line)]
    for name, value in expected["metrics"].items():  # top-1 counts: equal unless a near-tie flips
        assert float(actual["metrics"][name]) == pytest.approx(float(value), abs=1.5 / GLOBAL_BATCH)


def test_micro_batches_keep_every_row_on_its_device():
    mesh = _mesh(4, 2)
    rows = jax.device_put(jnp.arange(GLOBAL_BATCH), sharding.batch_sharding(mesh))
    split = jax.jit(lambda x: train_step.split_micro_batches(x, 4, mesh))
    micro = split(rows)
    assert micro.shape == (4, GLOBAL_BATCH // 4)
    # Device d holds rows [8d, 8d + 8) of the batch; micro-batch i gives it rows 8d + 2i, 8d + 2i + 1.
    for shard in micro.addressable_shards:
        d = sharding.batch_sharding(mesh).devices_indices_map(rows.shape)[shard.device][0].start // 8
        expected = 8 * d + 2 * np.arange(4)[:, None] + np.arange(2)[None, :]
        np.testing.assert_array_equal(np.asarray(shard.data), expected)
    hlo = split.lower(rows).compile().as_text()
    assert "all-to-all" not in hlo and "all-gather" not in hlo and "collective-permute" not in hlo
    joined = jax.jit(lambda x: train_step.join_micro_batches(x, mesh))(micro)
    np.testing.assert_array_equal(np.asarray(joined), np.arange(GLOBAL_BATCH))


def test_two_accumulated_train_steps_equal_two_full_batch_steps(model):
    config = _model_config()
    tx, schedule = _optimizer()
    mesh = _mesh(4, 2)
    results = []
    for accum_steps in (1, 4):
        state, shardings = train_step.create_train_state(model, config, tx, mesh, jax.random.key(0))
        step = train_step.make_train_step(
            model, train_step.default_loss_config(), tx, schedule, mesh, shardings, accum_steps=accum_steps
        )
        losses = []
        for seed in range(2):
            state, metrics = step(state, _batch(config, seed))
            losses.append(float(metrics["loss"]))
        results.append((jax.device_get(state), losses))
    (expected, expected_losses), (actual, actual_losses) = results
    assert int(actual.step) == 2
    np.testing.assert_allclose(actual_losses, expected_losses, rtol=1e-5)
    assert_tree_close(actual.params, expected.params)
    assert_tree_close(actual.batch_stats, expected.batch_stats)


@pytest.mark.parametrize("kind", ["chunked_softmax", "sigmoid"])
def test_other_loss_kinds_accumulate_exactly(kind):
    config = _model_config(logit_bias=kind == "sigmoid")
    model = build_model(config)
    loss_config = train_step.default_loss_config()
    loss_config.update(kind=kind, chunk_size=2 if kind == "chunked_softmax" else None)
    mesh = _mesh(4, 2)
    expected, actual = (_loss_and_grads(model, config, mesh, k, loss_config) for k in (1, 4))
    np.testing.assert_allclose(actual["loss"], expected["loss"], rtol=1e-5)
    assert_tree_close(actual["grads"], expected["grads"])
    if kind == "sigmoid":
        assert float(actual["grads"]["logit_bias"]) != 0.0


def test_frozen_image_tower_accumulates_only_the_text_tower(model, full_batch):
    mesh = _mesh(8, 1)
    expected, actual = (_loss_and_grads(model, _model_config(), mesh, k, freeze="image") for k in (1, 2))
    np.testing.assert_allclose(actual["loss"], expected["loss"], rtol=1e-5)
    assert_tree_close(actual["grads"], expected["grads"])
    for name in ("image_tower", "image_projection"):
        assert all(not np.any(g) for g in jax.tree.leaves(actual["grads"][name]))
    # A locked tower runs in inference mode: its statistics are returned untouched.
    for a, b in zip(jax.tree.leaves(actual["batch_stats"]), jax.tree.leaves(actual["state"].batch_stats), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _micro_batch_rows(accum_steps: int, shards: int) -> list[np.ndarray]:
    """Rows of micro-batch i: the i-th block of B / (shards * k) rows of each shard."""
    local = GLOBAL_BATCH // (shards * accum_steps)
    starts = np.arange(shards)[:, None] * (GLOBAL_BATCH // shards) + np.arange(local)[None, :]
    return [(starts + i * local).ravel() for i in range(accum_steps)]


def test_dropout_masks_are_the_same_in_both_passes():
    """With dropout on, the accumulated gradients are those of the loss whose micro-batch i is
    embedded with the step's key folded with i (written here with plain autodiff): a second pass
    with other masks would back-propagate through a different network."""
    config = _model_config(dropout=True)
    model = build_model(config)
    mesh, accum_steps, rng = _mesh(8, 1), 2, jax.random.key(1)
    actual = _loss_and_grads(model, config, mesh, accum_steps)
    batch = _batch(config)
    rows = _micro_batch_rows(accum_steps, 8)

    def reference_loss(params, batch_stats):
        variables = {"params": params, "batch_stats": batch_stats}
        images, texts = [], []
        for i, index in enumerate(rows):
            image_rng, text_rng = jax.random.split(jax.random.fold_in(rng, i))
            images.append(
                model.apply(
                    variables,
                    batch["images"][index],
                    train=True,
                    method=DualEncoder.encode_image,
                    mutable=["batch_stats"],
                    rngs={"dropout": image_rng},
                )[0]
            )
            texts.append(
                model.apply(
                    variables,
                    batch["input_ids"][index],
                    batch["attention_mask"][index],
                    train=True,
                    method=DualEncoder.encode_text,
                    rngs={"dropout": text_rng},
                )
            )
        order = np.argsort(np.concatenate(rows))
        images, texts = jnp.concatenate(images)[order], jnp.concatenate(texts)[order]
        logits = images @ texts.T / params["temperature"]
        n = logits.shape[0]
        targets = (1 - SMOOTHING) * jnp.eye(n) + SMOOTHING / n
        loss = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=1)) / n
        return loss - jnp.sum(targets * jax.nn.log_softmax(logits.T, axis=1)) / n

    state = jax.device_get(actual["state"])
    loss, grads = jax.jit(jax.value_and_grad(reference_loss))(state.params, state.batch_stats)
    np.testing.assert_allclose(actual["loss"], loss, rtol=1e-5)
    assert_tree_close(actual["grads"], grads)


def test_flops_for_mfu_are_those_of_the_full_batch_step(model):
    """XLA's cost analysis counts a loop body once: the accumulated step's own count would be
    about 1/k of the work, so the step exposes the full-batch program for counting."""
    config = _model_config()
    tx, schedule = _optimizer()
    mesh = _mesh(8, 1)
    abstract, shardings = train_step.abstract_train_state(model, config, tx, mesh)
    batch = jax.eval_shape(lambda: _batch(config))
    flops = {}
    for accum_steps in (1, 4):
        step = train_step.make_train_step(
            model, train_step.default_loss_config(), tx, schedule, mesh, shardings, accum_steps=accum_steps
        )
        flops[accum_steps] = perf.step_flops(step.flops_jitted.lower(abstract, batch))
        if accum_steps == 4:
            assert perf.step_flops(step.jitted.lower(abstract, batch)) < 0.6 * flops[1]
    assert flops[4] == flops[1]


@pytest.mark.parametrize(
    "accum_steps, message",
    [(0, "must be a positive integer"), (-2, "must be a positive integer"), (3, "not divisible")],
)
def test_wrong_accum_steps_is_named(accum_steps, message):
    config = config_lib.base_config()
    config.accum_steps = accum_steps
    with pytest.raises(config_lib.ConfigError, match=rf"config\.accum_steps: .*{message}"):
        config_lib.validate(config, num_devices=8)


def test_batch_not_divisible_by_micro_batches_is_rejected(model):
    mesh = _mesh(8, 1)
    loss_fn = train_step.make_loss_fn(train_step.default_loss_config(), mesh)
    grad_fn = train_step.make_loss_and_grad_fn(model, loss_fn, accum_steps=3, mesh=mesh)
    batch = jax.eval_shape(lambda: _batch(_model_config()))
    with pytest.raises(ValueError, match="not divisible by accum_steps 3 times the 8 devices"):
        jax.eval_shape(grad_fn, {}, {}, batch, jax.random.key(0))
