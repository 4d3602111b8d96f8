"""inference.load on a freshly initialised tiny model saved as a workdir."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest

from align_jax import checkpointing, inference
from align_jax.input import image_ops
from align_jax.models import build_model, init_variables, presets
from tests import fixtures


def _make_workdir(path, vocab_path):
    model_config = presets.tiny()
    model = build_model(model_config)
    variables = init_variables(model, model_config, jax.random.key(0))
    config = ml_collections.ConfigDict(dict(model=model_config, data=dict(vocab=vocab_path)))
    checkpointing.save_config(path, config)
    checkpointing.save_model(path, 3, variables)
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, vocab_path):
    return _make_workdir(tmp_path_factory.mktemp("workdir"), vocab_path)


@pytest.fixture(scope="module")
def loaded(workdir):
    return inference.load(workdir)


def test_load_from_workdir_or_step_folder_is_the_same(workdir, loaded):
    by_step = inference.load(workdir / "checkpoints" / "3")
    for a, b in zip(jax.tree.leaves(loaded.variables), jax.tree.leaves(by_step.variables), strict=True):
        np.testing.assert_array_equal(a, b)
    assert loaded.temperature == 1.0 and loaded.embed_dim == 64


def test_embeddings_are_unit_norm_float32(loaded):
    images = fixtures.random_images(3, loaded.image_size)
    image = loaded.encode_images(images)
    text = loaded.encode_texts(["a photo of a cat", "a dog", ""])
    for emb in (image, text):
        assert emb.shape == (3, 64) and emb.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(loaded.logits(image, text), image @ text.T / loaded.temperature, rtol=1e-6)


def test_other_resolutions_are_resized_and_centre_cropped(loaded):
    big = fixtures.random_images(2, 100, seed=3)
    native = image_ops.resize_and_center_crop(big, loaded.image_size).numpy()
    np.testing.assert_allclose(loaded.encode_images(big), loaded.encode_images(native), atol=1e-6)
    assert loaded.preprocess_images(big).shape == (2, 64, 64, 3)


def test_empty_inputs_give_empty_embeddings(loaded):
    assert loaded.encode_texts([]).shape == (0, 64)
    assert loaded.encode_images(np.zeros((0, 64, 64, 3), np.uint8)).shape == (0, 64)


def test_bad_image_input_is_named(loaded):
    with pytest.raises(TypeError, match="uint8"):
        loaded.encode_images(np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        loaded.encode_images(np.zeros((64, 64, 3), np.uint8))


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        inference.load(tmp_path / "nowhere")


def test_vocab_larger_than_the_text_tower_is_rejected(tmp_path):
    big_vocab = fixtures.write_vocab(tmp_path / "big.txt", fixtures.TEST_VOCAB + [f"w{i}" for i in range(2000)])
    workdir = _make_workdir(tmp_path / "workdir", big_vocab)
    with pytest.raises(ValueError, match="embeds only 1024"):
        inference.load(workdir)


def test_vocab_is_found_next_to_the_checkpoint(tmp_path, vocab_path):
    workdir = _make_workdir(tmp_path / "workdir", "vocab.txt")
    fixtures.write_vocab(workdir / "vocab.txt")
    assert inference.load(workdir).tokenizer.vocab_path == str(workdir / "vocab.txt")
