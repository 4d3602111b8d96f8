"""Host input pipeline: readers, decoding, filters, caption mixing, sharding, resume, bad data."""

from __future__ import annotations

import csv
import io

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from align_jax import sharding
from align_jax.input import demo_data, filters, image_ops, pipeline, readers
from align_jax.input.text_ops import Tokenizer

IMAGE_SIZE, TEXT_LENGTH = 32, 16


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    directory = tmp_path_factory.mktemp("demo")
    specs = demo_data.write(str(directory), num_train=96, num_eval=24, num_shards=4, image_size=64)
    return directory, specs


def _config(vocab, **overrides):
    config = pipeline.default_config()
    config.vocab = vocab
    config.filters.min_image_side = 16
    config.shuffle_buffer = 32
    config.update(overrides)
    return config


def _dataset(spec, config, batch_size=8, train=True, **kwargs):
    return pipeline.make_dataset(
        spec, config, image_size=IMAGE_SIZE, max_text_length=TEXT_LENGTH, batch_size=batch_size, train=train, **kwargs
    )


def _encode(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buffer, fmt)
    return buffer.getvalue()


# --- specs and readers ---------------------------------------------------------------------


def test_spec_parsing():
    [a, b] = readers.parse_spec("0.7*tfrecord:/d/a-*.tfrecord, 0.3*tfds:coco_captions:validation")
    assert (a.kind, a.path, a.weight) == ("tfrecord", "/d/a-*.tfrecord", 0.7)
    assert (b.kind, b.path, b.split, b.weight) == ("tfds", "coco_captions", "validation", 0.3)
    assert readers.parse_spec("csv:/x.csv")[0].weight == 1.0


@pytest.mark.parametrize(
    "spec,message",
    [
        ("", "empty"),
        ("/data/x.tfrecord", "malformed"),
        ("parquet:/x", "unknown data source kind 'parquet'"),
        ("-1*csv:/x.csv", "positive"),
    ],
)
def test_malformed_specs_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        readers.parse_spec(spec)


def test_missing_files_are_named(tmp_path, vocab_path):
    with pytest.raises(FileNotFoundError, match="no TFRecord files match"):
        _dataset(f"tfrecord:{tmp_path}/none-*.tfrecord", _config(vocab_path))
    with pytest.raises(FileNotFoundError, match="CSV file not found"):
        _dataset(f"csv:{tmp_path}/none.csv", _config(vocab_path))
    with pytest.raises(FileNotFoundError, match="vocab"):
        _dataset(f"tfrecord:{tmp_path}/none-*.tfrecord", _config(str(tmp_path / "no_vocab.txt")))


def _keys(spec, config, process_index, process_count):
    config = config.copy_and_resolve_references()
    config.captions = {"txt": 1.0, "key": 0.0}
    records = pipeline.read_records(spec, config, False, 0, process_index, process_count)
    return [r["key"].numpy().decode() for r in records]


@pytest.mark.parametrize("by", ["file", "example"])
def test_two_processes_get_disjoint_shares_covering_the_data(demo, by):
    directory, specs = demo
    spec = specs["train"] if by == "file" else f"tfrecord:{directory}/train-00000-of-00004.tfrecord"
    config = _config(specs["vocab"])
    everything = _keys(spec, config, 0, 1)
    first, second = _keys(spec, config, 0, 2), _keys(spec, config, 1, 2)
    assert not set(first) & set(second)
    assert sorted(first + second) == sorted(everything) and len(everything) == (96 if by == "file" else 24)


def test_csv_reader_with_relative_paths(tmp_path, vocab_path):
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(6):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(_encode(np.full((20, 24, 3), i * 40, np.uint8), "PNG"))
        rows.append({"image": f"imgs/{i}.png", "txt": f"a photo of {i} cats"})
    with open(tmp_path / "data.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["image", "txt"])
        writer.writeheader()
        writer.writerows(rows)
    batch = next(iter(_dataset(f"csv:{tmp_path}/data.csv", _config(vocab_path), batch_size=6, train=False)))
    assert batch["images"].shape == (6, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert batch["images"].dtype == tf.uint8 and abs(batch["images"][3].numpy().mean() - 120) <= 1
    with pytest.raises(ValueError, match="missing column"):
        _dataset(f"csv:{tmp_path}/data.csv", _config(vocab_path, captions={"caption": 1.0}))


def test_tfds_reader(tmp_path, vocab_path):
    import tensorflow_datasets as tfds

    class TinyCaptions(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict({"image": tfds.features.Image(), "txt": tfds.features.Text()})
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(10):
                yield i, {"image": np.full((20, 20, 3), 10 * i, np.uint8), "txt": f"a grey square number {i}"}

    TinyCaptions(data_dir=str(tmp_path)).download_and_prepare()
    config = _config(vocab_path, tfds_data_dir=str(tmp_path))
    batch = next(iter(_dataset("tfds:tiny_captions:train", config, batch_size=10, train=False)))
    assert batch["images"].shape == (10, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert int(batch["attention_mask"].numpy().sum(1).min()) >= 6


# --- images ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt,mode",
    [("JPEG", None), ("PNG", None), ("PNG", "L"), ("PNG", "LA"), ("PNG", "RGBA"), ("GIF", None), ("BMP", None)],
)
def test_decode_formats_to_rgb_and_read_sizes_from_headers(fmt, mode):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 255, (21, 34, 3), dtype=np.uint8)
    data = _encode(array, fmt, mode)
    assert image_ops.image_size_from_header(tf.constant(data)).numpy().tolist() == [21, 34]
    decoded = image_ops.decode_rgb(tf.constant(data)).numpy()
    assert decoded.shape == (21, 34, 3) and decoded.dtype == np.uint8
    if (fmt, mode) in (("PNG", None), ("BMP", None)):
        np.testing.assert_array_equal(decoded, array)


def test_alpha_is_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black
    decoded = image_ops.decode_rgb(tf.constant(_encode(rgba, "PNG"))).numpy()
    assert (decoded == 255).all()


@pytest.mark.parametrize(
    "fmt,size,out,resize", [("JPEG", (50, 70), 24, 29), ("JPEG", (720, 1000), 289, 346), ("PNG", (50, 70), 24, 29)]
)
def test_training_crops_are_seeded_span_the_centre_and_flip(fmt, size, out, resize):
    # Left half black, right half white: a crop covering 289/346 of the width always spans the
    # middle, and flips put white on either side. 720 px JPEGs take the 2x DCT-downscale path.
    array = np.zeros((*size, 3), np.uint8)
    array[:, size[1] // 2 :] = 255
    data = tf.constant(_encode(array, fmt))
    crop = lambda i: image_ops.decode_random_crop(data, out, resize, tf.constant([0, i], tf.int64)).numpy()  # noqa: E731
    crops = [crop(i) for i in range(12)]
    np.testing.assert_array_equal(crops[3], crop(3))
    assert all(c.shape == (out, out, 3) and c.dtype == np.uint8 for c in crops)
    assert all(c.min() < 30 and c.max() > 225 for c in crops)
    white_right = [c[:, -1].mean() > c[:, 0].mean() for c in crops]
    assert any(white_right) and not all(white_right)
    assert len({c.tobytes() for c in crops}) > 4


# --- filters ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "height_width,reason",
    [
        ([200, 600], None),
        ([199, 400], "image_too_small"),
        ([200, 601], "bad_aspect_ratio"),
        ([601, 200], "bad_aspect_ratio"),
        ([10000, 10000], "image_too_large"),
        ([-1, -1], "undecodable_image"),
    ],
)
def test_image_filters(height_width, reason):
    code = int(filters.image_reason(tf.constant(height_width, tf.int64), filters.default_config()))
    assert code == (filters.REASON_CODE[reason] if reason else 0)


@pytest.mark.parametrize(
    "text,word_filters,reason",
    [
        (b"one two three", True, None),
        (b"one two", True, "too_few_words"),
        (b"one two", False, None),
        (b" ".join([b"w"] * 20), True, None),
        (b" ".join([b"w"] * 21), True, "too_many_words"),
        (b"", True, "empty_caption"),
        (b" \t\n ", False, "empty_caption"),
        (b"caf\xe9 au lait here", True, "invalid_utf8"),
        ("café \ufffd fine".encode(), True, None),
    ],
)
def test_caption_filters(text, word_filters, reason):
    code = int(filters.caption_reason(tf.constant(text), word_filters, filters.default_config()))
    assert code == (filters.REASON_CODE[reason] if reason else 0)


# --- mixing, determinism, resume -------------------------------------------------------------


def test_caption_mixing_follows_the_weights(tmp_path, vocab_path):
    image = _encode(np.full((20, 20, 3), 128, np.uint8), "PNG")
    record = readers.encode_example(image, {"txt": "alt text cat", "vecap": "a rich dog caption"})
    readers.write_tfrecords([record] * 8, str(tmp_path), 1)
    config = _config(vocab_path, captions={"txt": 0.25, "vecap": 0.75})
    ds = _dataset(f"tfrecord:{tmp_path}/*.tfrecord", config, batch_size=100)
    cat = config_vocab_id(vocab_path, "cat")
    draws = np.concatenate([(b["input_ids"].numpy() == cat).any(axis=1) for b in ds.take(20)])
    n, p = draws.size, 0.25
    assert abs(draws.mean() - p) < 4 * np.sqrt(p * (1 - p) / n)


def test_an_example_with_one_bad_caption_uses_the_other(tmp_path, vocab_path):
    image = _encode(np.full((20, 20, 3), 128, np.uint8), "PNG")
    readers.write_tfrecords(
        [readers.encode_example(image, {"txt": "", "vecap": "a rich dog caption"})] * 4, str(tmp_path), 1
    )
    config = _config(vocab_path, captions={"txt": 0.9, "vecap": 0.1})
    batch = next(iter(_dataset(f"tfrecord:{tmp_path}/*.tfrecord", config, batch_size=16)))
    assert (batch["input_ids"].numpy() == config_vocab_id(vocab_path, "dog")).any(axis=1).all()
    assert pipeline.skip_counts({k: v.numpy() for k, v in batch.items()})["empty_caption"] == 0


def config_vocab_id(vocab_path, token):
    return open(vocab_path, encoding="utf-8").read().splitlines().index(token)


def test_same_seed_same_batches_and_different_seed_differs(demo):
    _, specs = demo
    config = _config(specs["vocab"], captions={"txt": 0.5, "vecap": 0.5})
    take = lambda seed: [b["images"].numpy() for b in _dataset(specs["train"], config, seed=seed).take(3)]  # noqa: E731
    a, b, c = take(0), take(0), take(1)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iterator_resumes_exactly(demo, tmp_path):
    _, specs = demo
    config = _config(specs["vocab"], captions={"txt": 0.5, "vecap": 0.5})
    iterator = pipeline.DataIterator(_dataset(specs["train"], config))
    for _ in range(5):
        next(iterator)
    iterator.save(str(tmp_path / "position"))
    expected = [next(iterator) for _ in range(15)]  # crosses an epoch boundary (96 examples)
    resumed = pipeline.DataIterator(_dataset(specs["train"], config))
    resumed.restore(str(tmp_path / "position"))
    for want, got in zip(expected, (next(resumed) for _ in range(15)), strict=True):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


def test_readers_make_the_same_global_batches_on_any_number_of_processes(demo, tmp_path):
    _, specs = demo
    config = _config(specs["vocab"], captions={"txt": 0.5, "vecap": 0.5}, num_readers=4)
    assert list(pipeline.local_readers(4, 1, 2)) == [2, 3]
    with pytest.raises(ValueError, match="num_readers 4 is not divisible by the 3 processes"):
        pipeline.local_readers(4, 0, 3)
    with pytest.raises(ValueError, match="batch_size 10 is not divisible by data.num_readers 4"):
        pipeline.make_reader_datasets(
            specs["train"], config, batch_size=10, image_size=IMAGE_SIZE, max_text_length=TEXT_LENGTH, train=True
        )
    # One process running all four readers; two processes running two each (emulated here by
    # building each process's readers explicitly): the global batches are the same.
    one = pipeline.DataIterator(
        pipeline.make_reader_datasets(
            specs["train"], config, batch_size=16, image_size=IMAGE_SIZE, max_text_length=TEXT_LENGTH, train=True
        ),
        num_readers=4,
    )

    def process_readers(index):
        return pipeline.DataIterator(
            {
                r: _dataset(specs["train"], config, batch_size=4, process_index=r, process_count=4)
                for r in pipeline.local_readers(4, index, 2)
            }
        )

    two = [process_readers(0), process_readers(1)]
    for _ in range(3):
        batch = next(one)
        halves = [next(it) for it in two]
        assert batch["images"].shape[0] == 16
        for key in ("images", "input_ids", "attention_mask"):
            np.testing.assert_array_equal(batch[key], np.concatenate([h[key] for h in halves]))
        np.testing.assert_array_equal(batch["skipped"], halves[0]["skipped"] + halves[1]["skipped"])
    # Positions saved by the two "processes" restore in the one, reader by reader (into its
    # iterators, which have moved on since: a restore replaces a position, whatever it was).
    for it in two:
        it.save(str(tmp_path / "position"))
    expected = [np.concatenate([next(it)["input_ids"] for it in two]) for _ in range(4)]
    next(one)
    one.restore(str(tmp_path / "position"))
    for want in expected:
        np.testing.assert_array_equal(next(one)["input_ids"], want)
    # A position saved before readers existed (one per process, `process_<i>`) is reader i's.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for f in (tmp_path / "position").glob("reader_0.*"):
        (legacy / f.name.replace("reader_0", "process_0")).write_bytes(f.read_bytes())
    single = pipeline.DataIterator(
        {0: _dataset(specs["train"], config, batch_size=4, process_index=0, process_count=4)}
    )
    single.restore(str(legacy))
    reference = pipeline.DataIterator(
        {0: _dataset(specs["train"], config, batch_size=4, process_index=0, process_count=4)}
    )
    reference.restore(str(tmp_path / "position"))
    np.testing.assert_array_equal(next(single)["input_ids"], next(reference)["input_ids"])
    # Positions saved with another number of readers are shares of other data: refused, whether
    # the readers are more (reader 5 of 8) or fewer (reader 0 of 2, which has a file of that name).
    for reader, count in ((5, 8), (0, 2)):
        other = pipeline.DataIterator(
            {reader: _dataset(specs["train"], config, process_index=reader, process_count=count)}, num_readers=count
        )
        with pytest.raises(FileNotFoundError, match=rf"not those of reader {reader} of {count}: .*num_readers=4"):
            other.restore(str(tmp_path / "position"))


# --- bad records -----------------------------------------------------------------------------


def test_a_shard_with_ten_percent_bad_records_is_read_with_exact_skip_counts(tmp_path, vocab_path):
    rng = np.random.default_rng(0)
    good_image = lambda: _encode(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8), "JPEG")  # noqa: E731
    jpeg = good_image()
    huge = tf.io.encode_jpeg(tf.zeros((10000, 10000, 3), tf.uint8), quality=10).numpy()
    bad = {
        "undecodable_image": [
            (rng.bytes(500), "random bytes as an image"),
            (jpeg[: len(jpeg) // 2], "a truncated jpeg image"),
            (b"", "a zero byte image"),
            (b"\xff\xd8\xff\xe0\x00\x10JFIF", "a jpeg header and nothing else"),
        ],
        "image_too_large": [(huge, "a ten thousand pixel square")],
        "empty_caption": [(good_image(), ""), (good_image(), "   \t ")],
        "invalid_utf8": [(good_image(), b"caf\xe9 au \xff lait")],
        "too_few_words": [(good_image(), "cat")],
        "too_many_words": [(good_image(), " ".join(["cat"] * 21))],
    }
    records = []
    for _, cases in bad.items():
        for image, text in cases:
            records.append(readers.encode_example(image, {"txt": text}))
            records += [readers.encode_example(good_image(), {"txt": "a photo of a cat"}) for _ in range(9)]
    assert len(records) == 100  # 10% bad
    readers.write_tfrecords(records, str(tmp_path), 1)
    config = _config(vocab_path)
    batches = [
        {k: v.numpy() for k, v in b.items()}
        for b in _dataset(f"tfrecord:{tmp_path}/*.tfrecord", config, batch_size=16, train=False)
    ]
    assert sum(len(b["images"]) for b in batches) == 90
    counts = pipeline.skip_counts(batches[-1])
    assert counts == {name: len(bad.get(name, [])) for name in filters.SKIP_REASONS}


def test_global_batch_is_sharded_over_the_data_axes(demo):
    _, specs = demo
    mesh = sharding.make_mesh([("data", 4), ("fsdp", 2)])
    batch = next(pipeline.DataIterator(_dataset(specs["train"], _config(specs["vocab"]), batch_size=16)))
    arrays = pipeline.to_global_batch(batch, mesh)
    assert arrays["images"].shape == (16, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert arrays["images"].sharding == sharding.batch_sharding(mesh)
    np.testing.assert_array_equal(jax.device_get(arrays["input_ids"]), batch["input_ids"])


def test_drops_at_the_end_of_a_finite_pass_are_counted(tmp_path, vocab_path):
    good = readers.encode_example(_encode(np.full((20, 20, 3), 9, np.uint8), "PNG"), {"txt": "a photo of a cat"})
    bad = readers.encode_example(b"not an image", {"txt": "a photo of a cat"})
    readers.write_tfrecords([good] * 5 + [bad] * 3, str(tmp_path), 1)
    batches = [
        {k: v.numpy() for k, v in b.items()}
        for b in _dataset(f"tfrecord:{tmp_path}/*.tfrecord", _config(vocab_path), batch_size=5, train=False)
    ]
    assert [len(b["images"]) for b in batches] == [5, 0]  # the last batch only reports
    assert pipeline.skip_counts(batches[-1])["undecodable_image"] == 3


# --- every caption, for retrieval evaluation ------------------------------------------------


def _numpy_batches(ds) -> list[dict[str, np.ndarray]]:
    return [{k: v.numpy() for k, v in b.items()} for b in ds]


def test_all_captions_keeps_every_field_in_order_tokenized_separately(demo):
    _, specs = demo
    config = _config(specs["vocab"], captions={"txt": 1.0, "vecap": 1.0})
    batches = _numpy_batches(_dataset(specs["eval"], config, batch_size=8, train=False, all_captions=True))
    ids = np.concatenate([b["input_ids"] for b in batches])
    mask = np.concatenate([b["attention_mask"] for b in batches])
    valid = np.concatenate([b["caption_valid"] for b in batches])
    assert ids.shape == mask.shape == (24, 2, TEXT_LENGTH) and ids.dtype == mask.dtype == np.int32
    assert valid.shape == (24, 2) and valid.dtype == bool

    # Reference: the raw records in reading order, each field tokenized on its own; the alt-text
    # field is subject to the 3..20 word filter, and a caption that fails it reads as empty text.
    records = list(pipeline.read_records(specs["eval"], config, False, 0, 0, 1))
    texts = {f: [r[f].numpy().decode() for r in records] for f in ("txt", "vecap")}
    want_valid = np.stack([[3 <= len(t.split()) <= 20 for t in texts["txt"]], [True] * 24], axis=1)
    np.testing.assert_array_equal(valid, want_valid)
    tokenizer = Tokenizer(specs["vocab"], TEXT_LENGTH)
    for column, field in enumerate(("txt", "vecap")):
        kept = [text if ok else "" for text, ok in zip(texts[field], want_valid[:, column], strict=True)]
        want_ids, want_mask = tokenizer(kept)
        np.testing.assert_array_equal(ids[:, column], want_ids)
        np.testing.assert_array_equal(mask[:, column], want_mask)

    # Images are those of the one-caption pass.
    single = _numpy_batches(_dataset(specs["eval"], config, batch_size=8, train=False))
    np.testing.assert_array_equal(
        np.concatenate([b["images"] for b in batches]), np.concatenate([b["images"] for b in single])
    )


def test_all_captions_marks_failed_captions_and_drops_examples_with_none(tmp_path, vocab_path):
    image = _encode(np.full((20, 20, 3), 128, np.uint8), "PNG")
    cases = [  # (image, txt, vecap) -> caption_valid, or None when the example is dropped
        ((image, "", "a rich dog caption"), [False, True]),
        ((image, "a photo of a cat", "   "), [True, False]),
        ((image, b"caf\xe9 au lait here", "a blue bird"), [False, True]),
        ((image, "a photo of a cat", "a blue bird"), [True, True]),
        ((image, "", " "), None),
        ((b"not an image", "a photo of a cat", "a blue bird"), None),
    ]
    records = [readers.encode_example(img, {"txt": txt, "vecap": vecap}) for (img, txt, vecap), _ in cases]
    readers.write_tfrecords(records, str(tmp_path), 1)
    config = _config(vocab_path, captions={"txt": 1.0, "vecap": 1.0})
    batches = _numpy_batches(
        _dataset(f"tfrecord:{tmp_path}/*.tfrecord", config, batch_size=16, train=False, all_captions=True)
    )
    valid = np.concatenate([b["caption_valid"] for b in batches])
    np.testing.assert_array_equal(valid, [v for _, v in cases if v is not None])
    ids = np.concatenate([b["input_ids"] for b in batches])
    empty_ids, _ = Tokenizer(vocab_path, TEXT_LENGTH)([""])
    np.testing.assert_array_equal(ids[~valid], np.repeat(empty_ids, (~valid).sum(), axis=0))
    counts = pipeline.skip_counts(batches[-1])
    assert counts["empty_caption"] == 1 and counts["undecodable_image"] == 1 and sum(counts.values()) == 2


def test_all_captions_is_for_evaluation_only(demo):
    _, specs = demo
    with pytest.raises(ValueError, match="all_captions"):
        _dataset(specs["train"], _config(specs["vocab"]), train=True, all_captions=True)


def test_training_crops_without_flip_keep_the_orientation():
    image = np.zeros((80, 80, 3), np.uint8)
    image[:, :40] = 255  # left half white: a mirror image is easy to tell
    data = tf.io.encode_png(image)
    crops = {
        flip: [
            image_ops.decode_random_crop(data, 32, 40, tf.constant([0, i], tf.int64), flip=flip).numpy()
            for i in range(8)
        ]
        for flip in (True, False)
    }
    assert all(c[:, :4].mean() > 200 and c[:, -4:].mean() < 50 for c in crops[False])
    assert any(c[:, :4].mean() < 50 for c in crops[True])  # some flipped


def _labels_from_records(pattern):
    labels = []
    for path in sorted(tf.io.gfile.glob(pattern)):
        for record in tf.data.TFRecordDataset(path):
            example = tf.train.Example.FromString(record.numpy())
            labels.append(example.features.feature["label"].int64_list.value[0])
    return labels


def _no_captions(vocab):
    config = _config(vocab)
    config.captions = {}
    return config


def test_label_field_comes_through_with_and_without_captions(demo):
    directory, specs = demo
    expected = _labels_from_records(str(directory / "eval-*.tfrecord"))
    rich = _config(specs["vocab"])
    rich.captions = {"vecap": 1.0}  # always passes the filters, so no example is dropped
    with_text = list(_dataset(specs["eval"], rich, train=False, label_field="label"))
    labels_only = list(_dataset(specs["eval"], _no_captions(""), train=False, label_field="label"))
    assert [int(x) for b in with_text for x in b["labels"]] == expected
    assert [int(x) for b in labels_only for x in b["labels"]] == expected
    assert "input_ids" in with_text[0] and set(labels_only[0]) == {"images", "labels", "skipped"}
    np.testing.assert_array_equal(
        np.concatenate([b["images"] for b in with_text]), np.concatenate([b["images"] for b in labels_only])
    )


def test_a_record_without_the_label_gets_the_missing_value(tmp_path, vocab_path):
    image = tf.io.encode_png(np.zeros((32, 32, 3), np.uint8)).numpy()
    records = [
        readers.encode_example(image, {"txt": "a b c"}, {"label": 3}),
        readers.encode_example(image, {"txt": "a b c"}),
    ]
    readers.write_tfrecords(records, str(tmp_path), 1)
    (batch,) = list(_dataset(f"tfrecord:{tmp_path}/*.tfrecord", _config(vocab_path), train=False, label_field="label"))
    assert np.asarray(batch["labels"]).tolist() == [3, readers.MISSING_INT]


def test_captions_can_be_empty_only_with_a_label_field(demo):
    _, specs = demo
    with pytest.raises(ValueError, match="data.captions"):
        _dataset(specs["eval"], _no_captions(specs["vocab"]), train=False)


def test_demo_class_names_follow_the_label_of_the_first_shape():
    rng = np.random.default_rng(0)
    names = demo_data.class_names()
    assert len(names) == len(set(names)) == len(demo_data.SHAPES) * len(demo_data.COLORS)
    for _ in range(20):
        _, attributes = demo_data.make_scene(rng, 32)
        first = attributes["objects"][0]
        assert names[demo_data.label(attributes)] == f"{first['color']} {first['shape']}"
