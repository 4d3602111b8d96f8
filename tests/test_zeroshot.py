"""Zero-shot classification: CLIP's templates, prompt ensembling, top-K and mean per-class
recall (ties by class index), and the sharded evaluator.

Metrics are checked on hand-worked cases and against a stable sort of the logits; ensembling
against a NumPy loop; the evaluator (8 emulated devices, padded batches) against the model
applied on one device to images decoded straight from the records and to the tokenized prompts.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import tensorflow as tf
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from align_jax import sharding
from align_jax.evaluators import (
    CLIP_IMAGENET_TEMPLATES,
    ZeroShotEvaluator,
    class_embeddings,
    classification_metrics,
    zeroshot,
)
from align_jax.input import demo_data, image_ops, pipeline, readers
from align_jax.input.text_ops import Tokenizer
from align_jax.models import DualEncoder, build_model, init_variables
from tests import fixtures

# --- templates and ensembling ------------------------------------------------------------------


def test_clip_imagenet_templates_are_the_80_of_the_notebook():
    assert len(CLIP_IMAGENET_TEMPLATES) == len(set(CLIP_IMAGENET_TEMPLATES)) == 80
    assert all(t.count("{}") == 1 for t in CLIP_IMAGENET_TEMPLATES)
    assert CLIP_IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    assert CLIP_IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."


def fake_encode_texts(texts: list[str]) -> np.ndarray:
    """A deterministic, unnormalised embedding of each string (lengths and letter counts), so
    different prompts point in different directions and have different norms."""
    return np.array([[len(t), t.count("a") + 1, t.count("o"), sum(map(ord, t)) % 7 - 3] for t in texts], np.float64)


def reference_ensemble(class_names, templates) -> np.ndarray:
    out = []
    for name in class_names:
        prompts = [fake_encode_texts([template.format(name)])[0] for template in templates]
        prompts = [p / np.linalg.norm(p) for p in prompts]
        mean = np.mean(prompts, axis=0)
        out.append(mean / np.linalg.norm(mean))
    return np.array(out)


def test_class_embeddings_normalise_average_and_renormalise_the_prompts():
    names, templates = ["cat", "dog house", "axolotl"], ["a photo of a {}.", "{}", "itap of my {} again."]
    got = class_embeddings(fake_encode_texts, names, templates)
    assert got.shape == (3, 4)
    np.testing.assert_allclose(got, reference_ensemble(names, templates), rtol=1e-6)


def test_one_template_gives_the_direction_of_its_prompt():
    got = class_embeddings(fake_encode_texts, ["cat"], ["a {} here"])
    want = fake_encode_texts(["a cat here"])
    np.testing.assert_allclose(got, want / np.linalg.norm(want), rtol=1e-6)


@pytest.mark.parametrize("templates,message", [(["no slot"], "exactly one"), ([], "need class names and templates")])
def test_bad_templates_are_named(templates, message):
    with pytest.raises(ValueError, match=message):
        class_embeddings(fake_encode_texts, ["cat"], templates)


# --- classification_metrics --------------------------------------------------------------------


def test_equal_scores_rank_by_class_index():
    # Every score ties, so each row's order is the class order and class j has rank j.
    logits, labels = np.zeros((4, 3), np.float32), np.array([0, 1, 2, 0])
    assert classification_metrics(logits, labels, ks=(1, 2)) == {
        "top1": 2 / 4,  # the rows of class 0
        "top2": 3 / 4,  # and the one of class 1
        "mean_per_class_recall": (1 + 0 + 0) / 3,
    }


def test_a_tie_with_a_lower_class_index_pushes_the_label_down():
    logits = np.array([[0.5, 0.9, 0.9], [0.5, 0.9, 0.9], [0.2, 0.1, 0.0]], np.float32)
    labels = np.array([2, 1, 1])
    # Row 0: classes 1 and 2 tie, class 1 comes first, so label 2 ranks second.
    # Row 1: label 1 wins the tie. Row 2: label 1 ranks second after class 0.
    metrics = classification_metrics(logits, labels, ks=(1, 2, 3))
    assert metrics == {"top1": 1 / 3, "top2": 1.0, "top3": 1.0, "mean_per_class_recall": (0 + 1 / 2) / 2}


def test_top5_with_fewer_than_five_classes_counts_every_row():
    logits = np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]], np.float32)
    labels = np.array([2, 0])  # row 0's label scores last of the three
    assert classification_metrics(logits, labels) == {"top1": 0.5, "top5": 1.0, "mean_per_class_recall": 0.5}


def test_mean_per_class_recall_weighs_each_present_class_equally():
    # Class 0: 6 images, 5 right; class 1: 2 images, 0 right; class 2: absent from the labels.
    right, wrong = [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]
    logits = np.array([right] * 5 + [wrong] + [right] * 2, np.float32)
    labels = np.array([0] * 6 + [1] * 2)
    metrics = classification_metrics(logits, labels, ks=(1,))
    assert metrics["top1"] == 5 / 8
    assert metrics["mean_per_class_recall"] == (5 / 6 + 0) / 2


def reference_metrics(logits: np.ndarray, labels: np.ndarray, ks) -> dict[str, float]:
    """Each row's classes in a stable sort of the negated logits; per-class recall by loop."""
    order = np.argsort(-logits, axis=1, kind="stable")
    hits = {k: np.mean([labels[i] in order[i, :k] for i in range(len(labels))]) for k in ks}
    recalls = [np.mean(order[labels == c, 0] == c) for c in sorted(set(labels.tolist()))]
    return {**{f"top{k}": hits[k] for k in ks}, "mean_per_class_recall": np.mean(recalls)}


def test_metrics_equal_a_stable_sort_of_the_logits():
    rng = np.random.default_rng(0)
    logits = rng.integers(0, 4, (200, 12)).astype(np.float32)  # many ties
    labels = rng.integers(0, 10, 200)  # classes 10 and 11 never the label
    got = classification_metrics(logits, labels, ks=(1, 3, 5))
    assert got == pytest.approx(reference_metrics(logits, labels, (1, 3, 5)), abs=1e-12)


@pytest.mark.parametrize(
    "labels,message", [([0, 3], r"labels must be integer classes in \[0, 3\)"), ([0], "expected logits")]
)
def test_bad_labels_are_named(labels, message):
    with pytest.raises(ValueError, match=message):
        classification_metrics(np.zeros((2, 3)), np.array(labels))


# --- the evaluator -----------------------------------------------------------------------------

GLOBAL_BATCH = 16
TEMPLATES = ("a photo of a {}.", "itap of the {}.")
CLASS_NAMES = demo_data.class_names()  # in label order


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    specs = demo_data.write(
        str(tmp_path_factory.mktemp("demo")), num_train=16, num_eval=40, num_shards=2, image_size=64
    )
    config = fixtures.three_stage_tiny(32, 16)
    model = build_model(config)
    variables = init_variables(model, config, jax.random.key(0))
    data = pipeline.default_config()
    data.vocab = specs["vocab"]
    data.filters.min_image_side = 16
    mesh = sharding.make_mesh([("data", -1), ("fsdp", 1)])
    return dict(specs=specs, config=config, model=model, variables=variables, data=data, mesh=mesh)


def _evaluator(setup, **kwargs) -> ZeroShotEvaluator:
    config = setup["config"]
    return ZeroShotEvaluator(
        setup["model"],
        setup["mesh"],
        data_spec=setup["specs"]["eval"],
        data_config=setup["data"],
        image_size=config.image_size,
        max_text_length=config.max_text_length,
        **{"batch_size": GLOBAL_BATCH, "class_names": CLASS_NAMES, "templates": TEMPLATES, **kwargs},
    )


@pytest.fixture(scope="module")
def reference(setup):
    """Logits and labels from the records decoded one by one, both towers applied on one device
    to everything at once, prompts ensembled in NumPy."""
    config, model, variables = setup["config"], setup["model"], setup["variables"]
    images, labels = [], []
    for path in readers.tfrecord_files(setup["specs"]["eval"].removeprefix("tfrecord:")):
        for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
            example = tf.train.Example.FromString(record).features.feature
            image = image_ops.decode_rgb(example["jpg"].bytes_list.value[0])
            images.append(image_ops.resize_and_center_crop(image, config.image_size).numpy())
            labels.append(example["label"].int64_list.value[0])
    image_embeds = np.asarray(model.apply(variables, np.stack(images), method=DualEncoder.encode_image))
    prompts = [template.format(name) for name in CLASS_NAMES for template in TEMPLATES]
    ids, mask = Tokenizer(setup["data"].vocab, config.max_text_length)(prompts)
    prompt_embeds = np.asarray(model.apply(variables, ids, mask, method=DualEncoder.encode_text), np.float64)
    prompt_embeds = prompt_embeds.reshape(len(CLASS_NAMES), len(TEMPLATES), -1)
    prompt_embeds /= np.linalg.norm(prompt_embeds, axis=-1, keepdims=True)
    class_embeds = prompt_embeds.mean(axis=1)
    class_embeds /= np.linalg.norm(class_embeds, axis=-1, keepdims=True)
    return image_embeds.astype(np.float64) @ class_embeds.T, np.array(labels)


@pytest.fixture(scope="module")
def replicated(setup):
    return jax.device_put(setup["variables"], NamedSharding(setup["mesh"], P()))


def test_evaluator_logits_are_those_of_one_device(setup, reference, replicated):
    want_logits, want_labels = reference
    assert len(want_labels) == 40 and len(set(want_labels.tolist())) > 5  # several classes present
    logits, labels = _evaluator(setup).logits(replicated)
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_allclose(logits, want_logits, atol=1e-5)


def test_evaluator_metrics_are_those_of_the_reference_logits(setup, reference, replicated):
    want_logits, want_labels = reference
    evaluator = _evaluator(setup)
    logits, _ = evaluator.logits(replicated)
    # A random model scores all classes within ~1e-3 of each other. Every metric depends only on
    # where each label's score falls among its row's, which float error cannot change while every
    # other class scores further from the label's score than twice the largest error.
    rows = np.arange(len(want_labels))
    gaps = np.abs(want_logits - want_logits[rows, want_labels][:, None])
    gaps[rows, want_labels] = np.inf
    assert gaps.min() > 2 * np.abs(logits - want_logits).max()
    predicted = want_logits.argmax(axis=1)
    order = np.argsort(-want_logits, axis=1)
    want = {
        "zeroshot/top1": np.mean(predicted == want_labels),
        "zeroshot/top5": np.mean([label in row[:5] for label, row in zip(want_labels, order, strict=True)]),
        "zeroshot/mean_per_class_recall": np.mean(
            [np.mean(predicted[want_labels == c] == c) for c in np.unique(want_labels)]
        ),
        "zeroshot/num_images": 40,
        "zeroshot/skipped": 0,
    }
    metrics = evaluator.run(replicated)
    assert metrics == pytest.approx(want, abs=1e-12)
    # A second pass (a later step in training) compiles nothing new.
    compiled = zeroshot._image_logits._cache_size(), zeroshot._encode_text._cache_size()
    assert evaluator.run(replicated) == metrics
    assert (zeroshot._image_logits._cache_size(), zeroshot._encode_text._cache_size()) == compiled


def test_evaluator_stops_after_max_examples(setup, reference, replicated):
    want_logits, want_labels = reference
    metrics = _evaluator(setup, max_examples=10, prefix="zs10").run(replicated)
    assert metrics["zs10/num_images"] == 10
    assert metrics["zs10/top1"] == np.mean(want_logits[:10].argmax(axis=1) == want_labels[:10])


def test_labels_outside_the_class_names_are_refused(setup, replicated):
    evaluator = _evaluator(setup, class_names=CLASS_NAMES[:4])
    with pytest.raises(ValueError, match=r"labels must be integer classes in \[0, 4\)"):
        evaluator.run(replicated)
