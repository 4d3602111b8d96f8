"""The notebook API: inference.load on a freshly initialised tiny model saved as a workdir (and on
a checkpoint trained on 8 devices), image files and mixed sizes, cosine similarity, zero-shot
classification and image search.

References are computed in NumPy from the model's own embeddings of single arrays (files are
decoded by Pillow), and for the trained checkpoint by applying the model directly to the
variables restored on the 8-device training mesh.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from align_jax import checkpointing, inference
from align_jax.evaluators.zeroshot import CLIP_IMAGENET_TEMPLATES
from align_jax.input import image_ops
from align_jax.input.text_ops import Tokenizer
from align_jax.models import DualEncoder, build_model, init_variables, presets
from align_jax.optim import make_optimizer
from align_jax.sharding import make_mesh
from align_jax.train_step import abstract_train_state
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


# --- image files and arrays of any size -------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _write(path, pixels: np.ndarray) -> str:
    Image.fromarray(pixels).save(path)
    return str(path)


def _pillow_pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _as_array(image) -> np.ndarray:
    return _pillow_pixels(image) if isinstance(image, str) else image


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".gif"])
def test_lossless_image_files_embed_as_their_pixels(loaded, tmp_path, suffix):
    images = fixtures.random_images(3, 64, seed=5)
    paths = [_write(tmp_path / f"{i}{suffix}", image) for i, image in enumerate(images)]
    pixels = np.stack([_pillow_pixels(p) for p in paths])  # GIF: the palette Pillow wrote
    np.testing.assert_allclose(loaded.encode_images(paths), loaded.encode_images(pixels), atol=1e-6)


def test_jpeg_files_embed_as_their_pixels_up_to_the_decoder(loaded, tmp_path):
    images = fixtures.random_images(2, 64, seed=6)
    paths = [_write(tmp_path / f"{i}.jpg", image) for i, image in enumerate(images)]
    pixels = np.stack([_pillow_pixels(p) for p in paths])
    # TF and Pillow may pick different inverse DCTs: pixels then differ by a few levels.
    cosines = np.sum(loaded.encode_images(paths) * loaded.encode_images(pixels), axis=-1)
    assert np.all(cosines > 0.999), cosines


def test_a_list_of_any_sizes_embeds_each_image_as_it_would_alone(loaded, tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(64, 64, 3), (100, 100, 3), (80, 120, 3)]]
    images += [_write(tmp_path / "a.png", fixtures.random_images(1, 90, seed=1)[0]), images[0]]
    alone = np.concatenate([loaded.encode_images(np.asarray(read)[None]) for read in map(_as_array, images)])
    # batch_size 2: the five images span three batches, the last one padded.
    np.testing.assert_allclose(loaded.encode_images(images, batch_size=2), alone, atol=1e-6)


def test_missing_and_undecodable_image_files_are_named(loaded, tmp_path):
    good = _write(tmp_path / "good.png", fixtures.random_images(1, 64)[0])
    with pytest.raises(FileNotFoundError, match="no_such_image.jpg"):
        loaded.encode_images([good, tmp_path / "no_such_image.jpg"])
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(ValueError, match="notes.jpg"):
        loaded.encode_images([good, tmp_path / "notes.jpg"])


def test_a_bare_path_or_bad_pixels_in_a_list_are_rejected(loaded):
    with pytest.raises(TypeError, match="wrap the single path"):
        loaded.encode_images("cat.jpg")
    with pytest.raises(TypeError, match="uint8"):
        loaded.encode_images([np.zeros((64, 64, 3), np.float32)])
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        loaded.encode_images([np.zeros((64, 64), np.uint8)])
    assert loaded.encode_images([]).shape == (0, 64)


# --- similarity and zero-shot classification ----------------------------------------------------


def test_similarity_is_the_cosine_without_temperature(loaded):
    rng = np.random.default_rng(1)
    image, text = rng.normal(size=(3, 64)) * 5, rng.normal(size=(4, 64))  # not unit norm
    expected = _unit(image) @ _unit(text).T
    actual = loaded.similarity(image.astype(np.float32), text.astype(np.float32))
    assert actual.shape == (3, 4) and actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, atol=1e-6)


def _numpy_zero_shot(model, image_embeds, class_names, templates):
    """CLIP ensembling and a softmax of the logits, written out in float64."""
    classes = []
    for name in class_names:
        prompts = np.asarray(model.encode_texts([t.format(name) for t in templates]), np.float64)
        classes.append(_unit(_unit(prompts).mean(axis=0)))
    logits = np.asarray(image_embeds, np.float64) @ np.stack(classes).T / model.temperature
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def test_zero_shot_probs_are_a_softmax_over_prompt_ensembles(loaded):
    images = fixtures.random_images(5, 64, seed=2)
    names, templates = ["cat", "dog", "bird", "red cat"], ["a photo of a {}.", "a {}.", "a small {}!"]
    result = loaded.zero_shot_classify(images, names, templates, top_k=3)
    expected = _numpy_zero_shot(loaded, loaded.encode_images(images), names, templates)
    assert result.probs.shape == (5, 4) and result.top_indices.shape == (5, 3)
    np.testing.assert_allclose(result.probs, expected, rtol=1e-5)
    np.testing.assert_array_equal(result.top_indices, np.argsort(-expected, axis=1, kind="stable")[:, :3])
    assert result.top_labels == [[names[i] for i in row] for row in result.top_indices]
    np.testing.assert_allclose(result.top_probs, np.sort(expected, axis=1)[:, ::-1][:, :3], rtol=1e-5)


def test_zero_shot_defaults_to_the_clip_imagenet_templates_and_caps_top_k(loaded):
    images = fixtures.random_images(2, 64, seed=3)
    default = loaded.zero_shot_classify(images, ["cat", "dog"], top_k=5)
    expected = _numpy_zero_shot(loaded, loaded.encode_images(images), ["cat", "dog"], CLIP_IMAGENET_TEMPLATES)
    np.testing.assert_allclose(default.probs, expected, rtol=1e-5)
    assert default.top_indices.shape == (2, 2)


# --- image search -------------------------------------------------------------------------------


def _numpy_ranking(database: np.ndarray, query: np.ndarray) -> tuple[list[int], np.ndarray]:
    scores = np.asarray(database, np.float64) @ np.asarray(query, np.float64)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return order, scores[order]


@pytest.fixture(scope="module")
def gallery():
    return fixtures.random_images(6, 64, seed=4)


@pytest.fixture(scope="module")
def index(loaded, gallery):
    return loaded.index(gallery)


def _check(results, order, scores):
    assert [i for i, _ in results] == order
    np.testing.assert_allclose([s for _, s in results], scores, atol=1e-6)


def test_text_search_ranks_the_images_by_cosine(loaded, gallery, index):
    order, scores = _numpy_ranking(loaded.encode_images(gallery), loaded.encode_texts(["a red cat"])[0])
    _check(index.search_text("a red cat", k=4), order[:4], scores[:4])


def test_image_search_finds_the_query_image_first(loaded, gallery, index):
    results = index.search_image(gallery[3], k=6)
    order, scores = _numpy_ranking(loaded.encode_images(gallery), loaded.encode_images(gallery[3:4])[0])
    _check(results, order, scores)
    assert results[0][0] == 3 and results[0][1] == pytest.approx(1.0, abs=1e-5)


def test_image_plus_text_query_is_the_normalised_sum_of_the_embeddings(loaded, gallery, index, tmp_path):
    query_image = _write(tmp_path / "query.png", fixtures.random_images(1, 80, seed=9)[0])
    image_embed = loaded.encode_images(_pillow_pixels(query_image)[None])[0].astype(np.float64)
    text_embed = loaded.encode_texts(["a dog on the grass"])[0].astype(np.float64)
    query = (image_embed + text_embed) / np.linalg.norm(image_embed + text_embed)
    order, scores = _numpy_ranking(loaded.encode_images(gallery), query)
    _check(index.search(image=query_image, text="a dog on the grass", k=10), order, scores)  # k > N: all


def test_equal_scores_rank_the_lower_index_first_and_ids_name_the_results(loaded, index):
    duplicated = inference.ImageIndex(loaded, index.embeddings[[2, 0, 2, 0]], ids=["a", "b", "c", "d"])
    ranked = [name for name, _ in duplicated.search_text("a cat", k=4)]  # rows 2 and 0, twice each
    assert ranked in (["a", "c", "b", "d"], ["b", "d", "a", "c"])
    np.testing.assert_array_equal(inference.top_k_indices(np.array([0.5, 0.9, 0.5, 0.9, 0.1]), 3), [1, 3, 0])


def test_bad_queries_and_ids_are_named(loaded, index):
    with pytest.raises(ValueError, match="needs an image, a text or both"):
        index.search()
    with pytest.raises(TypeError, match="one string"):
        index.search(text=["a", "b"])
    with pytest.raises(ValueError, match="2 ids for 6 images"):
        inference.ImageIndex(loaded, index.embeddings, ids=["a", "b"])


# --- a checkpoint trained on 8 devices ----------------------------------------------------------


@pytest.fixture(scope="module")
def trained_workdir(trained_demo_workdir):
    """6 steps on 8 devices with parameters sharded over an fsdp axis of 2 (no evaluators), BatchNorm
    momentum 0: tests/demo_workdir.py, run in the background lane; the notebook's test uses it too."""
    return trained_demo_workdir


def test_checkpoint_trained_on_eight_devices_embeds_on_one_as_on_the_training_mesh(trained_workdir):
    config = checkpointing.load_config(trained_workdir)
    model = build_model(config.model)
    tx, _ = make_optimizer(config.optimizer, config.total_steps)
    abstract, _ = abstract_train_state(model, config.model, tx, make_mesh(config.mesh))
    on_mesh = checkpointing.restore_model(
        trained_workdir, {"params": abstract.params, "batch_stats": abstract.batch_stats}
    )
    assert any(len(leaf.sharding.device_set) == 8 and not leaf.is_fully_replicated for leaf in jax.tree.leaves(on_mesh))

    images = fixtures.random_images(4, config.model.image_size, seed=7)
    texts = ["a small red circle on the left", "a large blue square", "hello world", ""]
    tokenizer = Tokenizer(str(trained_workdir / "vocab.txt"), config.model.max_text_length, config.data.lower_case)
    ids, mask = tokenizer(texts)
    expected_images = jax.jit(lambda v, x: model.apply(v, x, method=DualEncoder.encode_image))(on_mesh, images)
    expected_texts = jax.jit(lambda v, i, m: model.apply(v, i, m, method=DualEncoder.encode_text))(on_mesh, ids, mask)

    distinct = np.asarray(expected_images)
    assert np.abs(distinct[1:] - distinct[0]).max() > 1e-2  # the images embed far apart

    loaded = inference.load(trained_workdir)
    for leaf in jax.tree.leaves(loaded.variables):
        assert leaf.sharding.device_set == {jax.devices()[0]}
    np.testing.assert_allclose(loaded.encode_images(images), np.asarray(expected_images), atol=1e-5)
    np.testing.assert_allclose(loaded.encode_texts(texts), np.asarray(expected_texts), atol=1e-5)
