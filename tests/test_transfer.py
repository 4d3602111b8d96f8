"""Starting a run from a pretrained checkpoint: which variables are taken, ViT position embeddings
resampled for another resolution, a converted HF checkpoint as the source, the config checks,
and the fine-tuning configs built on a checkpoint."""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import ml_collections
import numpy as np
import optax
import pytest

from align_jax import checkpointing, sharding, train_step, transfer
from align_jax import config as config_lib
from align_jax.input import demo_data
from align_jax.models import build_model, init_variables, presets
from align_jax.models.vit import resize_position_embedding
from align_jax.tools import convert_hf
from tests import fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save_checkpoint(path, model_config, step=5, seed=1, **extra):
    """A workdir holding the model variables of `model_config` at `step`; returns them."""
    model = build_model(model_config)
    variables = init_variables(model, model_config, jax.random.key(seed))
    # Non-trivial BatchNorm statistics, so that copying them is seen.
    variables = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.25 if "batch_stats" in jax.tree_util.keystr(p) else x, variables
    )
    config = ml_collections.ConfigDict(dict(model=model_config, **extra))
    checkpointing.save_config(path, config)
    checkpointing.save_model(path, step, variables)
    return jax.device_get(variables)


def _fresh_state(model_config, mesh):
    model = build_model(model_config)
    state, _ = train_step.create_train_state(model, model_config, optax.adam(1e-3), mesh, jax.random.key(7))
    return state


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def dual_encoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("pretrained")
    config = fixtures.three_stage_tiny(32, 8)
    return path, config, _save_checkpoint(path, config)


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh([("data", 4), ("fsdp", 2)])


def test_a_classifier_takes_the_image_tower_and_keeps_its_zero_head(dual_encoder, mesh):
    path, config, saved = dual_encoder
    classifier_config = ml_collections.ConfigDict(config.to_dict())
    classifier_config.num_classes = 7
    fresh = _fresh_state(classifier_config, mesh)
    state = transfer.initialise(fresh, path, mesh, new_params=("head",))
    for part in ("params", "batch_stats"):
        got, want = _flat(jax.device_get(getattr(state, part)["image_tower"])), _flat(saved[part]["image_tower"])
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{part}{name}")
    assert not np.any(np.asarray(state.params["head"]["kernel"])) and state.params["head"]["kernel"].shape[1] == 7
    assert int(state.step) == 0
    # The optimizer state is the fresh one (Adam's moments at zero), and the shardings are kept.
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(fresh.params), strict=True):
        assert a.sharding == b.sharding


def test_a_dual_encoder_takes_every_variable(tmp_path, mesh):
    config = presets.tiny_vit()
    saved = _save_checkpoint(tmp_path, config)
    state = transfer.initialise(_fresh_state(config, mesh), tmp_path, mesh)
    got = _flat(jax.device_get({"params": state.params, "batch_stats": state.batch_stats}))
    want = _flat(saved)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_vit_position_embeddings_are_resampled_for_another_image_size(tmp_path, mesh):
    source = presets.tiny_vit()  # 32 px, 8 px patches: a 4 x 4 grid
    saved = _save_checkpoint(tmp_path, source)
    target = ml_collections.ConfigDict(source.to_dict())
    target.image_size, target.num_classes = 48, 3  # a 6 x 6 grid
    state = transfer.initialise(_fresh_state(target, mesh), tmp_path, mesh, new_params=("head",))
    posemb = saved["params"]["image_tower"]["position_embedding"]
    got = np.asarray(state.params["image_tower"]["position_embedding"])
    assert posemb.shape == (1, 16, 32) and got.shape == (1, 36, 32)
    np.testing.assert_allclose(got, resize_position_embedding(posemb, (6, 6)), rtol=1e-6)
    patch = saved["params"]["image_tower"]["patch_embedding"]["kernel"]
    np.testing.assert_array_equal(np.asarray(state.params["image_tower"]["patch_embedding"]["kernel"]), patch)


def test_match_names_what_does_not_fit():
    leaf = lambda *shape: jax.ShapeDtypeStruct(shape, np.float32)  # noqa: E731
    target = {"params": {"image_tower": {"w": leaf(3, 4), "position_embedding": leaf(1, 9, 2)}, "head": {"k": leaf(4)}}}
    source = {"params": {"image_tower": {"w": leaf(3, 4), "position_embedding": leaf(1, 4, 2)}, "temperature": leaf()}}
    plan = transfer.match(target, source, new_params=("head",))
    assert plan == {
        "params/image_tower/w": "copy",
        "params/image_tower/position_embedding": "resize",
        "params/head/k": "init",
    }
    with pytest.raises(ValueError, match="the checkpoint has no params/head/k"):
        transfer.match(target, source)
    source["params"]["image_tower"]["w"] = leaf(3, 5)
    with pytest.raises(ValueError, match=r"params/image_tower/w has shape \(3, 5\) in the checkpoint but the model"):
        transfer.match(target, source, new_params=("head",))
    source["params"]["image_tower"]["position_embedding"] = leaf(1, 5, 2)  # not a square grid
    with pytest.raises(ValueError, match="position_embedding has shape"):
        transfer.match(
            {"params": {"position_embedding": leaf(1, 9, 2)}}, {"params": {"position_embedding": leaf(1, 5, 2)}}
        )


def test_locate_takes_a_step_folder_or_the_latest(dual_encoder, tmp_path):
    path, _, _ = dual_encoder
    workdir, step, config = transfer.locate(path)
    assert (workdir, step) == (path.resolve(), 5) and "model" in config
    assert transfer.locate(path / "checkpoints" / "5")[:2] == (path.resolve(), 5)
    with pytest.raises(FileNotFoundError, match="checkpoint path does not exist"):
        transfer.locate(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        transfer.locate(tmp_path)


def test_validate_names_init_checkpoint(dual_encoder, tmp_path):
    path, model_config, _ = dual_encoder
    config = config_lib.base_config()
    config.model = ml_collections.ConfigDict(model_config.to_dict())
    config.batch_size = 16
    config.data.train = f"tfrecord:{tmp_path}/*.tfrecord"
    demo_data.write_labelled(str(tmp_path), 2, 1, image_size=32)  # any TFRecord will do
    config.data.vocab = fixtures.write_vocab(tmp_path / "vocab.txt")
    config.init.checkpoint = str(path)
    config_lib.validate(config, num_devices=8)
    config.init.checkpoint = str(tmp_path / "missing")
    with pytest.raises(config_lib.ConfigError, match="config.init.checkpoint: checkpoint path does not exist"):
        config_lib.validate(config, num_devices=8)
    config.init.checkpoint = str(path)
    config.model.embed_dim = 32  # the checkpoint's text projection is 64 wide
    with pytest.raises(config_lib.ConfigError, match="config.init.checkpoint: the checkpoint does not fit the model"):
        config_lib.validate(config, num_devices=8)


def test_a_converted_hf_checkpoint_is_a_fine_tuning_source(tmp_path):
    """tools/convert_hf's output (its own config.json: model, vocab, no training settings) is what
    a fine-tuning config builds on, and its variables fit a classifier of its tower."""
    from tests.hf_reference import build_hf_model

    hf_dir, out = tmp_path / "hf", tmp_path / "converted"
    build_hf_model("odd", hf_dir, seed=3)
    converted = convert_hf.convert(hf_dir, out)
    config = config_lib.finetune_config(str(out))
    assert _plain(config.model) == _plain(converted.model)
    assert config.data.vocab == str(out.resolve() / "vocab.txt") and "demo_data" not in config
    config.task, config.model.num_classes = "classification", 4
    transfer.check_compatible(config, new_params=("head",))
    config.model.image.width_coefficient = 0.5
    with pytest.raises(ValueError, match="the checkpoint does not fit the model"):
        transfer.check_compatible(config, new_params=("head",))


def _plain(config: ml_collections.ConfigDict) -> dict:
    """As saved in config.json (tuples become lists)."""
    return json.loads(json.dumps(config.to_dict()))


def _load_config_file(name: str, *args: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def test_finetuning_configs_build_on_the_checkpoint(dual_encoder, tmp_path):
    _, model_config, _ = dual_encoder
    workdir = tmp_path / "demo_run"
    (workdir).mkdir()
    fixtures.write_vocab(workdir / "vocab.txt")
    demo = ml_collections.ConfigDict(dict(num_train=8, num_eval=4, num_shards=2, image_size=48, seed=0))
    data = config_lib.base_config().data
    data.update(train="tfrecord:/old/train-*", eval="tfrecord:/old/eval-*", vocab="vocab.txt", random_flip=False)
    _save_checkpoint(workdir, model_config, data=data, demo_data=demo)

    classification = _load_config_file("finetune_classification", str(workdir))
    assert classification.task == "classification" and classification.init.checkpoint == str(workdir)
    assert classification.model.num_classes == len(demo_data.class_names())
    assert _plain(classification.model.image) == _plain(model_config.image)
    assert (classification.data.train, classification.data.eval) == ("", "")  # the demo splits fill them
    assert classification.data.vocab == str(workdir.resolve() / "vocab.txt") and not classification.data.random_flip
    assert classification.demo_data.train_split == "labelled_train" and classification.demo_data.num_train == 8
    pretraining = _load_config_file("demo")
    assert classification.optimizer.learning_rate < pretraining.optimizer.learning_rate

    retrieval = _load_config_file("finetune_retrieval", str(workdir / "checkpoints" / "5"))
    assert retrieval.task == "contrastive" and _plain(retrieval.model) == _plain(model_config)
    assert dict(retrieval.data.captions) == {field: 1.0 for field in demo_data.CAPTION_FIELDS}
    assert retrieval.demo_data.train_split == "captioned_train"
    assert retrieval.optimizer.learning_rate < pretraining.optimizer.learning_rate
    assert tuple(retrieval.evals.retrieval.caption_fields) == demo_data.CAPTION_FIELDS
