"""Image+text query retrieval: composition, Recall@K on hand-made cases, the evaluator on the demo
data's composed-query split, and the demo generator's scene changes."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from align_jax import config as config_lib
from align_jax import sharding
from align_jax.evaluators import ImageTextEvaluator, build_evaluators, composed_queries, query_recall_at_k
from align_jax.input import demo_data, pipeline
from align_jax.input.readers import encode_example, write_tfrecords
from align_jax.models import DualEncoder, build_model, init_variables
from tests import fixtures


def test_composed_query_is_the_normalised_weighted_sum():
    image = np.array([[1.0, 0.0], [0.6, 0.8]])
    text = np.array([[0.0, 1.0], [0.6, 0.8]])
    np.testing.assert_allclose(composed_queries(image, text), [[0.5**0.5, 0.5**0.5], [0.6, 0.8]], rtol=1e-6)
    # text_weight 3: (1, 3) / sqrt(10)
    np.testing.assert_allclose(composed_queries(image[:1], text[:1], 3.0), [[0.1**0.5, 0.9**0.5]], rtol=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        composed_queries(image, text[:1])


def test_recall_on_a_hand_computed_case_with_ties_and_shared_ids():
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [0.8, 0.6]])
    gallery_ids = np.array([10, 11, 12, 13])
    queries = np.array([[1.0, 0.0], [1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    # Scores of query 0 and 1: 1.0, 0.0, 0.8, 0.8 -> order 10, 12, 13, 11.
    # Query 2 ties ids 12 and 13 at 1.0: index order puts 12 first, so target 13 is at rank 1.
    targets = np.array([10, 11, 13, 11])
    out = query_recall_at_k(queries, gallery, targets, gallery_ids, ks=(1, 2, 4))
    # ranks: query 0 -> 0, query 1 -> 3, query 2 -> 1, query 3 -> 0
    assert out == {"r1": 0.5, "r2": 0.75, "r4": 1.0}
    # Two gallery images with the target's id: the better placed one counts.
    out = query_recall_at_k(queries[1:2], gallery, np.array([7]), np.array([10, 7, 12, 7]), ks=(1, 2))
    assert out == {"r1": 0.0, "r2": 0.0}  # id 7 at indices 1 and 3: ranks 3 and 2
    out = query_recall_at_k(queries[1:2], gallery, np.array([7]), np.array([10, 11, 7, 7]), ks=(1, 2))
    assert out == {"r1": 0.0, "r2": 1.0}


def test_recall_chunked_equals_unchunked():
    rng = np.random.default_rng(0)
    queries, gallery = rng.normal(size=(37, 8)), rng.normal(size=(50, 8))
    targets, ids = rng.integers(0, 50, 37), np.arange(50) * 3
    targets = ids[targets]
    whole = query_recall_at_k(queries, gallery, targets, ids, chunk_size=1000)
    assert query_recall_at_k(queries, gallery, targets, ids, chunk_size=5) == whole
    scores = queries @ gallery.T
    ranks = [
        (np.argsort(-s, kind="stable") == np.nonzero(ids == t)[0][0]).nonzero()[0][0]
        for s, t in zip(scores, targets, strict=True)
    ]
    assert whole["r5"] == pytest.approx(np.mean(np.array(ranks) < 5))


@pytest.mark.parametrize(
    "targets, ids, message",
    [
        ([0, 5], [0, 1, 2], "1 of 2 queries have a target id that is not in the gallery"),
        ([0, 1], [0, 1, -1], "1 gallery images have no id"),
        ([0], [0, 1, 2], r"expected targets \[2\]"),
        ([0, -1], [0, 1, 2], "1 queries have no target id"),
    ],
)
def test_bad_inputs_are_named(targets, ids, message):
    with pytest.raises(ValueError, match=message):
        query_recall_at_k(np.ones((2, 4)), np.ones((3, 4)), np.array(targets), np.array(ids))


def test_modify_scene_changes_exactly_one_attribute_and_says_which():
    rng = np.random.default_rng(1)
    for _ in range(200):
        scene = demo_data.draw_scene(rng)
        changed, text = demo_data.modify_scene(scene, rng)
        before = [scene["background"]] + [(o["shape"], o["color"], o["size"]) for o in scene["objects"]]
        after = [changed["background"]] + [(o["shape"], o["color"], o["size"]) for o in changed["objects"]]
        diffs = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
        assert len(diffs) == 1
        (b, a) = diffs[0]
        if isinstance(a, str):
            assert text == f"on a {a} background"
        else:
            changed_part = [y for x, y in zip(b, a, strict=True) if x != y]
            assert len(changed_part) == 1 and changed_part[0] in text.split()
            assert text.endswith(f"{a[1]} {a[0]}")  # "[size] colour shape" of the changed object
        assert [o["offset"] for o in scene["objects"]] == [o["offset"] for o in changed["objects"]]


# --- the evaluator -----------------------------------------------------------------------------

NUM_QUERIES = 11
GLOBAL_BATCH = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("image_text")
    queries, gallery = demo_data.image_text_records(NUM_QUERIES, seed=3, image_size=48)
    # One query with an empty modifier: skipped by the caption filters and counted.
    queries.append(encode_example(demo_data.image_text_records(1, 9, 48)[0][0], dict(modifier=""), dict(target=0)))
    write_tfrecords(queries, str(folder), 2, "queries")
    write_tfrecords(gallery, str(folder), 3, "gallery")
    config = fixtures.three_stage_tiny(32, 16)
    model = build_model(config)
    variables = init_variables(model, config, jax.random.key(0))
    data = pipeline.default_config()
    data.vocab = fixtures.write_vocab(folder / "vocab.txt", demo_data.vocab_tokens())
    data.filters.min_image_side = 16
    mesh = sharding.make_mesh([("data", -1), ("fsdp", 1)])
    specs = demo_data.image_text_specs(str(folder))
    evaluator = ImageTextEvaluator(
        model,
        mesh,
        queries_spec=specs["queries"],
        gallery_spec=specs["gallery"],
        data_config=data,
        image_size=config.image_size,
        max_text_length=config.max_text_length,
        batch_size=GLOBAL_BATCH,
        prefix="it",
    )
    replicated = jax.device_put(variables, NamedSharding(mesh, P()))
    evaluator_data = data.copy_and_resolve_references()
    evaluator_data.captions = {"modifier": 1.0}
    return dict(
        evaluator=evaluator,
        variables=variables,
        replicated=replicated,
        model=model,
        data=data,
        evaluator_data=evaluator_data,
        config=config,
        specs=specs,
    )


def test_evaluator_embeds_every_query_and_gallery_image(setup):
    e = setup["evaluator"].embed(setup["replicated"])
    n = NUM_QUERIES
    assert e["query_images"].shape == e["query_texts"].shape == (n, 64)
    assert e["gallery"].shape == (2 * n, 64) and e["skipped"] == 1
    np.testing.assert_array_equal(e["targets"], np.arange(n))
    np.testing.assert_array_equal(np.sort(e["gallery_ids"]), np.arange(2 * n))
    # The gallery's unchanged scenes are the query images' own bytes: equal embeddings, although
    # they went through different batches (and padding) of the two passes.
    unchanged = e["gallery"][np.argsort(e["gallery_ids"])][n:]
    np.testing.assert_allclose(unchanged, e["query_images"], rtol=1e-5, atol=1e-6)
    # The query texts and images, embedded as one device does in one unpadded batch.
    ds = pipeline.make_dataset(
        setup["specs"]["queries"],
        setup["evaluator_data"],
        image_size=32,
        max_text_length=16,
        batch_size=64,
        train=False,
        process_index=0,
        process_count=1,
        label_field="target",
    )
    [batch] = [b for b in ds.as_numpy_iterator() if len(b["images"])]
    model, variables = setup["model"], setup["variables"]
    texts = model.apply(variables, batch["input_ids"], batch["attention_mask"], method=DualEncoder.encode_text)
    images = model.apply(variables, batch["images"], method=DualEncoder.encode_image)
    order = np.argsort(batch["labels"])
    np.testing.assert_allclose(e["query_texts"], np.asarray(texts)[order], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(e["query_images"], np.asarray(images)[order], rtol=1e-5, atol=1e-6)


def test_evaluator_metrics_follow_from_its_embeddings(setup):
    evaluator = setup["evaluator"]
    metrics = evaluator.run(setup["replicated"])
    e = evaluator.embed(setup["replicated"])
    recall = lambda q: query_recall_at_k(q, e["gallery"], e["targets"], e["gallery_ids"])  # noqa: E731
    expected = {f"it/{k}": v for k, v in recall(composed_queries(e["query_images"], e["query_texts"])).items()}
    expected.update({f"it/image_only_{k}": v for k, v in recall(e["query_images"]).items()})
    expected.update({f"it/text_only_{k}": v for k, v in recall(e["query_texts"]).items()})
    expected.update({"it/num_queries": 11.0, "it/num_gallery": 22.0, "it/skipped": 1.0})
    assert metrics == expected
    # An image-only query finds its own unchanged scene first, never the target.
    assert metrics["it/image_only_r1"] == 0.0


def test_evaluator_is_built_from_the_config_and_its_sources_checked(setup):
    config = config_lib.base_config()
    config.model = setup["config"]
    config.data = setup["data"]
    config.data.train = setup["specs"]["gallery"]
    config.batch_size = GLOBAL_BATCH
    config.evals.q = config_lib.image_text_eval(queries=setup["specs"]["queries"], max_examples=5)
    with pytest.raises(config_lib.ConfigError, match="config.evals.q.gallery: no data source"):
        config_lib.validate(config, num_devices=8)
    config.evals.q.gallery = setup["specs"]["gallery"]
    config_lib.validate(config, num_devices=8)
    [(name, evaluator)] = build_evaluators(config, setup["model"], setup["evaluator"].mesh).items()
    metrics = evaluator.run(setup["replicated"])
    assert name == "q" and metrics["q/num_queries"] == 5.0 and metrics["q/num_gallery"] == 22.0


def test_demo_config_writes_and_wires_the_composed_query_split(tmp_path):
    import importlib.util
    import os

    from etils import epath

    from align_jax import train

    path = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "demo.py")
    spec = importlib.util.spec_from_file_location("demo_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.demo_data.update(
        num_train=16, num_eval=8, num_shards=2, image_size=48, num_queries=6, num_labelled=(8, 4), num_captioned=(8, 4)
    )
    prepared = train.prepare_config(config, epath.Path(tmp_path))
    specs = demo_data.image_text_specs(str(tmp_path / train.DEMO_DATA_DIR))
    assert (prepared.evals.image_text.queries, prepared.evals.image_text.gallery) == (
        specs["queries"],
        specs["gallery"],
    )
    data = prepared.data.copy_and_resolve_references()
    data.captions = {}
    counts = {}
    for split, field in (("queries", "target"), ("gallery", "id")):
        ds = pipeline.make_dataset(
            specs[split],
            data,
            image_size=32,
            max_text_length=8,
            batch_size=64,
            train=False,
            label_field=field,
            process_index=0,
            process_count=1,
        )
        counts[split] = sum(len(b["labels"]) for b in ds.as_numpy_iterator())
    assert counts == {"queries": 6, "gallery": 12}
    # A workdir whose demo data predates the split gets it on the next run.
    for f in (tmp_path / train.DEMO_DATA_DIR).glob("[qg][ua]*-*.tfrecord"):
        f.unlink()
    train.prepare_config(config, epath.Path(tmp_path))
    assert len(list((tmp_path / train.DEMO_DATA_DIR).glob("queries-*.tfrecord"))) == 1
