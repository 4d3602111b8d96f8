"""Mesh construction, partition rules and batch-size checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from align_jax import sharding


def test_minus_one_takes_the_remaining_devices():
    assert sharding.mesh_shape([("data", -1), ("fsdp", 2)], 8) == {"data": 4, "fsdp": 2}
    mesh = sharding.make_mesh([("data", 2), ("fsdp", -1)])
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert sharding.data_parallel_size(mesh) == 8


@pytest.mark.parametrize(
    "axes,message",
    [
        ([("data", 4), ("fsdp", 4)], "has 16 devices, but there are 8"),
        ([("data", -1), ("fsdp", 3)], "multiple of 3 devices, but there are 8"),
        ([("data", -1), ("fsdp", -1)], "only one axis may have size -1"),
        ([("data", 8)], r"missing \['fsdp'\]"),
        ([("data", 0), ("fsdp", 8)], "positive or -1"),
    ],
)
def test_meshes_that_do_not_fit_name_the_numbers(axes, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(axes)


def test_batch_not_divisible_by_the_data_axes_is_named():
    mesh = sharding.make_mesh([("data", 4), ("fsdp", 2)])
    sharding.check_batch_size(16, mesh)
    with pytest.raises(ValueError, match="global batch size 12 is not divisible by the 8 devices"):
        sharding.check_batch_size(12, mesh)


def test_fsdp_rule_shards_the_largest_divisible_dimension():
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
    assert sharding.fsdp_spec((256, 1024), mesh) == P(None, "fsdp")
    assert sharding.fsdp_spec((1026, 256), mesh) == P(None, "fsdp")  # 1026 is not divisible by 4
    assert sharding.fsdp_spec((3, 3, 1, 2050), mesh) == P()  # nothing divisible
    assert sharding.fsdp_spec((64,), mesh) == P()  # small: replicated
    no_fsdp = sharding.make_mesh([("data", 8), ("fsdp", 1)])
    assert sharding.fsdp_spec((256, 1024), no_fsdp) == P()


def test_rules_first_full_match_wins():
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
    tree = {
        "params": {
            "text_tower": {"word_embeddings": {"embedding": jnp.zeros((512, 64))}},
            "image_tower": {"kernel": jnp.zeros((256, 256))},
            "temperature": jnp.zeros(()),
        }
    }
    rules = [
        (r"params/text_tower/.*", ("fsdp", None)),
        (r".*/image_tower/.*", "replicate"),
        (r".*", "fsdp"),
    ]
    specs = jax.tree.map(lambda s: s.spec, sharding.infer_shardings(tree, mesh, rules))
    assert specs["params"]["text_tower"]["word_embeddings"]["embedding"] == P("fsdp", None)
    assert specs["params"]["image_tower"]["kernel"] == P()
    assert specs["params"]["temperature"] == P()


def test_explicit_rule_that_does_not_divide_is_named():
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
    with pytest.raises(ValueError, match="dimension 0 of params/w .* not divisible by 4"):
        sharding.infer_shardings({"params": {"w": jnp.zeros((6, 8))}}, mesh, [(".*", ("fsdp", None))])


def test_batch_sharding_splits_examples_over_data_axes():
    mesh = sharding.make_mesh([("data", 4), ("fsdp", 2)])
    x = jax.device_put(jnp.zeros((16, 3)), sharding.batch_sharding(mesh))
    assert {s.data.shape for s in x.addressable_shards} == {(2, 3)}
