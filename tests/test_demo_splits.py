"""The demo data's transfer splits: the labelled one (one shape per scene, its class fields read
back from the pixels), the captioned one (3 to 5 phrasings per scene, one drawn per use by the
pipeline), and how a demo folder gets the splits it lacks."""

from __future__ import annotations

import pathlib
import shutil

import numpy as np
import pytest
import tensorflow as tf

from align_jax.input import demo_data, pipeline, readers
from align_jax.input.text_ops import Tokenizer

SIZE = 64


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("demo"))
    demo_data.write(path, num_train=8, num_eval=4, num_shards=2, image_size=SIZE, num_queries=2)
    written = demo_data.write_missing(path, image_size=SIZE, num_labelled=(40, 12), num_captioned=(30, 10))
    assert written == ["labelled", "captioned"]  # `write` wrote the composed-query split
    return path


def _records(spec: str, fields=(), int_fields=()) -> list[dict]:
    [source] = readers.parse_spec(spec)
    out = []
    for path in readers.tfrecord_files(source.path):
        for serialized in tf.data.TFRecordDataset(path):
            parsed = readers.parse_example(serialized, fields, int_fields)
            out.append({k: v.numpy() for k, v in parsed.items()})
    return out


def test_labelled_split_classes_are_what_the_image_shows(folder):
    specs = demo_data.specs(folder)
    train, test = (
        _records(specs["labelled_train"], int_fields=("label", "layout")),
        _records(specs["labelled_test"], int_fields=("label", "layout")),
    )
    assert (len(train), len(test)) == (40, 12)
    colors, names = list(demo_data.COLORS.values()), demo_data.layout_names()
    for record in train + test:
        image = tf.io.decode_jpeg(record["image"]).numpy().astype(np.float32)
        # The background is the most common colour; the object is every pixel far from it.
        corners = image[[0, 0, -1, -1], [0, -1, 0, -1]]
        background = np.median(corners, axis=0)
        obj = np.abs(image - background).sum(-1) > 120
        colour = image[obj].mean(0)
        shape_index, colour_index = divmod(int(record["label"]), len(colors))
        assert np.argmin(np.abs(np.array(colors) - colour).sum(1)) == colour_index
        assert 0 <= shape_index < len(demo_data.SHAPES)
        size, position = names[int(record["layout"])].split(" on the ")
        ys, xs = np.nonzero(obj)
        centre = np.array([ys.mean(), xs.mean()]) / SIZE
        expected = dict(left=(0.5, 0.27), right=(0.5, 0.73), top=(0.27, 0.5), bottom=(0.73, 0.5))[position]
        assert np.abs(centre - expected).max() < 0.12, (position, centre)
        # Small and large objects differ in area by (0.22 / 0.13)^2 ~ 2.9x.
        area = obj.mean()
        assert (area < 0.08) == (size == "small"), (size, area)


def test_caption_variants_are_five_distinct_descriptions_naming_every_object():
    scene = dict(
        background="gray",
        objects=[
            dict(shape="cross", color="orange", size="small", position="left"),
            dict(shape="circle", color="blue", size="large", position="right"),
        ],
    )
    variants = demo_data.caption_variants(scene)
    assert len(set(variants)) == 5 and variants[0] == demo_data.rich_caption(scene)
    for caption in variants:
        words = caption.replace(",", " ").split()
        assert {"orange", "cross", "blue", "circle", "gray"} <= set(words), caption
        assert len(words) <= 20 and "a orange" not in caption


def test_captioned_split_has_three_to_five_captions_in_the_first_fields(folder):
    fields = demo_data.CAPTION_FIELDS
    records = _records(demo_data.specs(folder)["captioned_train"], fields)
    assert len(records) == 30
    counts = []
    for record in records:
        captions = [record[f].decode() for f in fields]
        n = sum(bool(c) for c in captions)
        counts.append(n)
        assert 3 <= n <= 5 and all(captions[:n]) and not any(captions[n:])
        assert len(set(captions[:n])) == n
    assert set(counts) == {3, 4, 5}


def test_the_pipeline_draws_one_caption_per_image_per_use(folder):
    """Over 6 passes of a 30-scene split, every drawn caption is one of its scene's, each scene
    gets several of them, and the same seed draws the same ones."""
    specs = demo_data.specs(folder)
    config = pipeline.default_config()
    config.vocab = f"{folder}/vocab.txt"
    config.captions = {field: 1.0 for field in demo_data.CAPTION_FIELDS}
    config.filters.min_image_side = 16
    config.shuffle_buffer = 1  # the split's order, so rows map to records
    config.random_flip = False
    tokenizer = Tokenizer(config.vocab, 24)
    records = _records(specs["captioned_train"], demo_data.CAPTION_FIELDS)
    allowed = []
    for record in records:
        ids, _ = tokenizer([record[f].decode() for f in demo_data.CAPTION_FIELDS if record[f]])
        allowed.append({tuple(row) for row in ids})

    def draws(seed):
        ds = pipeline.make_dataset(
            specs["captioned_train"],
            config,
            image_size=32,
            max_text_length=24,
            batch_size=30,
            train=True,
            seed=seed,
            process_index=0,
            process_count=1,
        )
        return [b["input_ids"].numpy() for b in ds.take(6)]

    first = draws(0)
    # Shards are interleaved in the training order: match each row to its record by its caption.
    seen = [set() for _ in records]
    for batch in first:
        for row in map(tuple, batch):
            owners = [i for i, ok in enumerate(allowed) if row in ok]
            assert owners, "a drawn caption that is no record's"
            for i in owners:
                seen[i].add(row)
    assert np.mean([len(s) for s in seen]) > 2
    for a, b in zip(first, draws(0), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, draws(1), strict=True))


def test_missing_splits_are_added_and_present_ones_left_alone(folder, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(folder, copy)
    kept = {p.name: p.read_bytes() for p in copy.glob("*.tfrecord") if not p.name.startswith("captioned")}
    for path in copy.glob("captioned-*.tfrecord"):
        path.unlink()
    assert demo_data.write_missing(str(copy), image_size=SIZE, num_labelled=(40, 12), num_captioned=(30, 10)) == [
        "captioned"
    ]
    assert {p.name: p.read_bytes() for p in copy.glob("*.tfrecord") if not p.name.startswith("captioned")} == kept
    rewritten = {p.name: p.read_bytes() for p in copy.glob("captioned-*.tfrecord")}
    original = {p.name: p.read_bytes() for p in pathlib.Path(folder).glob("captioned-*.tfrecord")}
    assert rewritten == original  # deterministic: the same seed writes the same split
    assert demo_data.write_missing(str(copy), image_size=SIZE) == []
