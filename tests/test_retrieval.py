"""Retrieval Recall@K (CLIP_benchmark's definition, ties by index) and the sharded evaluator.

Recall is checked on hand-worked cases and against a brute-force stable sort of the full score
matrix; the evaluator (8 emulated devices, padded batches) against the same model applied on one
device to the examples read without padding.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from align_jax import sharding
from align_jax.evaluators import RetrievalEvaluator, recall_at_k, retrieval
from align_jax.evaluators.lockstep import LockstepPass
from align_jax.input import demo_data, pipeline
from align_jax.models import DualEncoder, build_model, init_variables
from tests import fixtures

# --- recall_at_k -----------------------------------------------------------------------------


def reference_recall(images: np.ndarray, texts: np.ndarray, text_to_image: np.ndarray, ks) -> dict[str, float]:
    """The whole score matrix, each row sorted (score descending, ties by index: a stable sort of
    the negated scores); a query's rank is the position of its (best) positive in that order."""
    scores = images @ texts.T

    def positions(s):  # positions[q, j]: where column j lands in row q's order
        order = np.argsort(-s, axis=1, kind="stable")
        out = np.empty_like(order)
        np.put_along_axis(out, order, np.broadcast_to(np.arange(s.shape[1]), s.shape), axis=1)
        return out

    t2i = positions(scores.T)[np.arange(len(texts)), text_to_image]
    i2t_positions = positions(scores)
    i2t = np.array([i2t_positions[n, text_to_image == n].min() for n in np.unique(text_to_image)])
    return {**{f"i2t_r{k}": np.mean(i2t < k) for k in ks}, **{f"t2i_r{k}": np.mean(t2i < k) for k in ks}}


def test_equal_scores_rank_by_index():
    # Every score ties, so each ranking is the index order.
    images, texts = np.ones((3, 2), np.float32), np.ones((4, 2), np.float32)
    text_to_image = np.array([2, 0, 1, 2])
    # t2i: the caption of image j has rank j -> ranks [2, 0, 1, 2].
    # i2t: image 0's caption is text 1 (rank 1), image 1's is text 2 (rank 2), image 2's best is text 0 (rank 0).
    assert recall_at_k(images, texts, text_to_image, ks=(1, 2, 3)) == {
        "i2t_r1": 1 / 3,
        "t2i_r1": 1 / 4,
        "i2t_r2": 2 / 3,
        "t2i_r2": 2 / 4,
        "i2t_r3": 1.0,
        "t2i_r3": 1.0,
    }


def test_an_image_is_found_when_any_of_its_captions_is():
    images = np.array([[1, 0], [0, 1], [0.6, 0.8]], np.float32)
    texts = np.array([[1, 0], [0, 1], [0.8, 0.6], [0, 1]], np.float32)
    text_to_image = np.array([0, 0, 2, 1])  # image 0 has two captions, one of them far off
    # Scores, image x text: [[1, 0, .8, 0], [0, 1, .6, 1], [.6, .8, .96, .8]].
    # i2t: image 0 ranks its text 0 first; image 1 ties texts 1 and 3, and text 1 (lower index,
    # not its own) comes first, so its caption ranks second; image 2 ranks text 2 first.
    # t2i: text 1 scores image 0 last (0 < .8 < 1); the other captions rank their image first.
    assert recall_at_k(images, texts, text_to_image, ks=(1, 2, 3)) == {
        "i2t_r1": 2 / 3,
        "t2i_r1": 3 / 4,
        "i2t_r2": 1.0,
        "t2i_r2": 3 / 4,
        "i2t_r3": 1.0,
        "t2i_r3": 1.0,
    }


def test_images_without_captions_are_left_out_of_image_to_text():
    images = np.array([[1, 0], [0, 1], [-1, 0]], np.float32)
    texts = np.array([[0, 1], [1, 0]], np.float32)
    metrics = recall_at_k(images, texts, np.array([0, 1]), ks=(1,))
    # Both captioned images rank their caption second; image 2 has none and does not count.
    assert metrics == {"i2t_r1": 0.0, "t2i_r1": 0.0}


@pytest.mark.parametrize("kind", ["small integers (many ties)", "unit gaussians"])
def test_chunked_recall_equals_a_brute_force_sort(kind):
    rng = np.random.default_rng(0)
    num_images, num_texts, dim = 300, 900, 8
    if kind.startswith("small"):  # integer dot products: exact in float32 in any summation order
        images = rng.integers(-2, 3, (num_images, dim)).astype(np.float32)
        texts = rng.integers(-2, 3, (num_texts, dim)).astype(np.float32)
    else:
        images = rng.normal(size=(num_images, dim)).astype(np.float32)
        texts = rng.normal(size=(num_texts, dim)).astype(np.float32)
        images /= np.linalg.norm(images, axis=1, keepdims=True)
        texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    # Some images get several captions, 20 get none; captions sit near their image.
    text_to_image = rng.integers(0, num_images - 20, num_texts)
    texts += images[text_to_image]
    ks = (1, 5, 10, 50)
    got = recall_at_k(images, texts, text_to_image, ks=ks, chunk_size=64)
    want = reference_recall(images, texts, text_to_image, ks)
    assert got == pytest.approx(want, abs=0)
    assert 0.05 < got["t2i_r1"] < 0.95  # neither trivial nor hopeless


@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
def test_chunk_size_does_not_change_the_result(chunk_size):
    rng = np.random.default_rng(1)
    images, texts = rng.normal(size=(23, 4)).astype(np.float32), rng.normal(size=(41, 4)).astype(np.float32)
    text_to_image = rng.integers(0, 23, 41)
    assert recall_at_k(images, texts, text_to_image, chunk_size=chunk_size) == pytest.approx(
        reference_recall(images, texts, text_to_image, (1, 5, 10)), abs=0
    )


@pytest.mark.parametrize(
    "shapes,message",
    [
        (((3, 4), (2, 4), (3,)), "text_to_image must have shape"),
        (((3, 4), (2, 5), (2,)), "expected embeddings"),
        (((3, 4), (2, 4), (2,)), "must index the 3 images"),
    ],
)
def test_bad_inputs_are_named(shapes, message):
    (n, d), (m, e), (t,) = shapes
    with pytest.raises(ValueError, match=message):
        recall_at_k(np.zeros((n, d)), np.zeros((m, e)), np.full(t, 3 if "index" in message else 0))


# --- the evaluator -----------------------------------------------------------------------------

GLOBAL_BATCH = 16
FIELDS = ("txt", "vecap")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    specs = demo_data.write(
        str(tmp_path_factory.mktemp("demo")), num_train=16, num_eval=40, num_shards=4, image_size=64
    )
    config = fixtures.three_stage_tiny(32, 16)
    model = build_model(config)
    variables = init_variables(model, config, jax.random.key(0))
    data = pipeline.default_config()
    data.vocab = specs["vocab"]
    data.captions = {field: 1.0 for field in FIELDS}
    # The demo images are 64 px. Word filters on both fields with 4..12 words leave some
    # captions invalid (short alt-texts, two-shape descriptions) and one example with none.
    data.filters.update(min_image_side=16, word_filter_fields=FIELDS, min_words=4, max_words=12)
    mesh = sharding.make_mesh([("data", -1), ("fsdp", 1)])
    return dict(specs=specs, config=config, model=model, variables=variables, data=data, mesh=mesh)


def _evaluator(setup, **kwargs) -> RetrievalEvaluator:
    config = setup["config"]
    return RetrievalEvaluator(
        setup["model"],
        setup["mesh"],
        data_spec=setup["specs"]["eval"],
        data_config=setup["data"],
        image_size=config.image_size,
        max_text_length=config.max_text_length,
        **{"batch_size": GLOBAL_BATCH, **kwargs},
    )


@pytest.fixture(scope="module")
def reference(setup):
    """Every example read in one unpadded batch; the model applied on one device."""
    config, model, variables = setup["config"], setup["model"], setup["variables"]
    ds = pipeline.make_dataset(
        setup["specs"]["eval"],
        setup["data"],
        image_size=config.image_size,
        max_text_length=config.max_text_length,
        batch_size=64,
        train=False,
        all_captions=True,
        process_index=0,
        process_count=1,
    )
    [batch] = [b for b in ds.as_numpy_iterator() if len(b["images"])]
    valid = batch["caption_valid"]
    images = model.apply(variables, batch["images"], method=DualEncoder.encode_image)
    texts = model.apply(
        variables, batch["input_ids"][valid], batch["attention_mask"][valid], method=DualEncoder.encode_text
    )
    text_to_image = np.nonzero(valid)[0]  # row-major: the image of each valid caption, in order
    return np.asarray(images), np.asarray(texts), text_to_image, valid


@pytest.fixture(scope="module")
def replicated(setup):
    return jax.device_put(setup["variables"], NamedSharding(setup["mesh"], P()))


def test_evaluator_embeds_every_valid_caption_as_one_device_does(setup, reference, replicated):
    images, texts, text_to_image, valid = reference
    assert valid.shape == (39, 2) and 0 < valid.sum() < 78  # the data exercise both masks
    got_images, got_texts, got_text_to_image, skipped = _evaluator(setup).embed(replicated)
    np.testing.assert_allclose(got_images, images, atol=1e-5)
    np.testing.assert_allclose(got_texts, texts, atol=1e-5)
    np.testing.assert_array_equal(got_text_to_image, text_to_image)
    assert skipped == 1


def test_evaluator_metrics_are_recall_of_those_embeddings(setup, reference, replicated):
    images, texts, text_to_image, _ = reference
    evaluator = _evaluator(setup, ks=(1, 5))
    metrics = evaluator.run(replicated)
    want = {f"retrieval/{k}": v for k, v in recall_at_k(images, texts, text_to_image, ks=(1, 5)).items()}
    want.update({"retrieval/num_images": 39, "retrieval/num_texts": len(texts), "retrieval/skipped": 1})
    assert metrics == pytest.approx(want, abs=0)
    # A second pass (a later step in training) compiles nothing new.
    compiled = retrieval.encode_both._cache_size()
    assert evaluator.run(replicated) == metrics
    assert retrieval.encode_both._cache_size() == compiled


def test_evaluator_stops_after_max_examples(setup, reference, replicated):
    images, texts, text_to_image, _ = reference
    metrics = _evaluator(setup, max_examples=10).run(replicated)
    first = text_to_image < 10
    want = recall_at_k(images[:10], texts[first], text_to_image[first])
    assert metrics["retrieval/num_images"] == 10 and metrics["retrieval/num_texts"] == first.sum()
    assert {k: metrics[f"retrieval/{k}"] for k in want} == pytest.approx(want, abs=0)


def test_evaluator_on_chosen_caption_fields_with_a_final_empty_batch(setup, reference, replicated):
    images, texts, _, valid = reference
    # Alt-texts only: the 16 examples whose alt-text fails are dropped (one had no valid caption
    # at all); the 24 left fill three batches of 8 exactly, so the pass ends with a batch that
    # holds only the skip counts.
    metrics = _evaluator(setup, caption_fields=["txt"], prefix="alt", batch_size=8).run(replicated)
    is_alt_text = np.tile([True, False], len(valid))[valid.ravel()]
    want = recall_at_k(images[valid[:, 0]], texts[is_alt_text], np.arange(valid[:, 0].sum()))
    assert metrics["alt/num_images"] == metrics["alt/num_texts"] == 24
    assert metrics["alt/skipped"] == 16
    assert {k: metrics[f"alt/{k}"] for k in want} == pytest.approx(want, abs=0)


def test_lockstep_pass_yields_the_batches_with_rows_and_counts_every_skip(setup):
    data = setup["data"].copy_and_resolve_references()
    data.captions = {"txt": 1.0}  # short alt-texts fail the word filters: some examples are skipped
    dataset = pipeline.make_dataset(
        setup["specs"]["eval"], data, image_size=32, max_text_length=16, batch_size=8, train=False
    )
    plain = list(dataset.as_numpy_iterator())
    lockstep = LockstepPass(dataset)
    yielded = list(lockstep)
    assert [len(b["images"]) for b in yielded] == [len(b["images"]) for b in plain if len(b["images"])]
    assert lockstep.total_skipped() == int(plain[-1]["skipped"].sum()) > 0
    assert sum(len(b["images"]) for b in yielded) + lockstep.total_skipped() == 40
