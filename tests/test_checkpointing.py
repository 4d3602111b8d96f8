"""Workdir layout: config JSON and orbax model checkpoints, restored onto any device layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from align_jax import checkpointing


def test_config_round_trips_through_json(tmp_path):
    config = ml_collections.ConfigDict(dict(model=dict(embed_dim=64, stages=(1, 2)), data=dict(vocab="vocab.txt")))
    checkpointing.save_config(tmp_path, config)
    loaded = checkpointing.load_config(tmp_path)
    assert loaded.model.embed_dim == 64 and list(loaded.model.stages) == [1, 2] and loaded.data.vocab == "vocab.txt"


def test_missing_and_corrupt_config_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        checkpointing.load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        checkpointing.load_config(tmp_path)


def test_model_saved_from_a_sharded_mesh_restores_on_one_device(tmp_path):
    mesh = jax.make_mesh((8,), ("data",))
    kernel = jax.device_put(jnp.arange(64.0).reshape(16, 4), NamedSharding(mesh, P("data")))
    variables = {"params": {"kernel": kernel, "temperature": jnp.float32(0.5)}, "batch_stats": {"mean": jnp.ones(3)}}
    checkpointing.save_model(tmp_path, 7, variables)

    abstract = checkpointing.abstract_on_device(variables)
    restored = checkpointing.restore_model(tmp_path, abstract)
    assert restored["params"]["kernel"].sharding == jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    np.testing.assert_array_equal(restored["params"]["kernel"], np.arange(64.0).reshape(16, 4))
    assert float(restored["params"]["temperature"]) == 0.5
    np.testing.assert_array_equal(restored["batch_stats"]["mean"], np.ones(3))


def test_latest_step_is_the_default_and_missing_steps_are_named(tmp_path):
    for step in (1, 5):
        checkpointing.save_model(tmp_path, step, {"params": {"w": jnp.full((2,), float(step))}})
    abstract = checkpointing.abstract_on_device({"params": {"w": jnp.zeros(2)}})
    assert float(checkpointing.restore_model(tmp_path, abstract)["params"]["w"][0]) == 5.0
    assert float(checkpointing.restore_model(tmp_path, abstract, step=1)["params"]["w"][0]) == 1.0
    with pytest.raises(FileNotFoundError, match="step 3"):
        checkpointing.restore_model(tmp_path, abstract, step=3)


def test_empty_workdir_has_no_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpointing.restore_model(tmp_path, {"params": {}})
