"""The de-duplication tool: the perceptual hash against a direct DCT, the multi-index search
against a brute-force scan, and the pass over shards with planted near-duplicates of evaluation
images (resized, re-encoded, cropped, all three) among distinct natural-looking images."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from align_jax.input import readers
from align_jax.tools import dedup

# --- images --------------------------------------------------------------------------------------


def _natural_image(rng: np.random.Generator) -> np.ndarray:
    """A random RGB image with natural images' 1/f amplitude spectrum (correlated colour
    channels) and one to three flat shapes on it; independent draws are unrelated images."""
    height, width = (int(s) for s in rng.integers(96, 200, size=2))
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    frequency = np.hypot(fy, fx)
    frequency[0, 0] = np.inf  # no DC: the mean is set below
    spectra = (rng.normal(size=(3, *frequency.shape)) + 1j * rng.normal(size=(3, *frequency.shape))) / frequency
    field = np.stack([np.fft.irfft2(s, s=(height, width)) for s in spectra], -1) @ rng.normal(size=(3, 3))
    image = 128 + 45 * (field - field.mean()) / field.std()
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    for _ in range(int(rng.integers(1, 4))):
        cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.25)
        kind = rng.integers(3)
        if kind == 0:
            mask = (y - cy) ** 2 + (x - cx) ** 2 <= r**2
        elif kind == 1:
            mask = (np.abs(y - cy) <= r) & (np.abs(x - cx) <= 0.6 * r)
        else:
            mask = (y - cy <= r) & (y - cy >= -r) & (np.abs(x - cx) <= (y - cy + r) * 0.6)
        image[mask] = rng.integers(0, 256, 3)
    return np.clip(image, 0, 255).astype(np.uint8)


def _encode(image: np.ndarray, fmt: str = "JPEG", quality: int = 90) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return out.getvalue()


def _resize(image: np.ndarray, factor: float) -> np.ndarray:
    height, width = image.shape[:2]
    size = (round(width * factor), round(height * factor))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))


def _crop(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """2-5% of each side removed, split at random between its two ends."""
    height, width = image.shape[:2]
    crop_h, crop_w = (round(side * (1 - rng.uniform(0.02, 0.05))) for side in (height, width))
    y, x = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
    return image[y : y + crop_h, x : x + crop_w]


def _near_duplicates(image: np.ndarray, rng: np.random.Generator) -> dict[str, bytes]:
    return {
        "resized_0.5x": _encode(_resize(image, 0.5)),
        "resized_1.7x_png": _encode(_resize(image, 1.7), "PNG"),
        "jpeg_quality_15": _encode(image, quality=15),
        "cropped": _encode(_crop(image, rng)),
        "cropped_resized_jpeg_25": _encode(_resize(_crop(image, rng), rng.choice([0.6, 1.4])), quality=25),
    }


def _read(path) -> list[bytes]:
    return list(tf.data.TFRecordDataset(str(path)).as_numpy_iterator())


# --- the hash ------------------------------------------------------------------------------------


def _direct_dct(x: np.ndarray, u: int, v: int) -> float:
    """DCT-II coefficient (u, v) of a square array by its definition, orthonormal scaling."""
    n = x.shape[0]
    i = np.arange(n)
    scale = [np.sqrt(1 / n) if k == 0 else np.sqrt(2 / n) for k in (u, v)]
    basis = np.outer(np.cos(np.pi * (2 * i + 1) * u / (2 * n)), np.cos(np.pi * (2 * i + 1) * v / (2 * n)))
    return scale[0] * scale[1] * float((x * basis).sum())


def test_low_frequency_dct_equals_the_definition():
    thumbnails = np.random.default_rng(0).uniform(0, 255, (3, 32, 32))
    got = dedup.low_frequency_dct(thumbnails)
    want = np.array([[[_direct_dct(t, u, v) for v in range(8)] for u in range(8)] for t in thumbnails])
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-9)


def test_phash_bit_k_is_coefficient_k_above_the_median():
    thumbnails = np.random.default_rng(1).uniform(0, 255, (4, 32, 32))
    for thumbnail, got in zip(thumbnails, dedup.phash(thumbnails), strict=True):
        coefficients = [_direct_dct(thumbnail, k // 8, k % 8) for k in range(64)]
        median = np.median(coefficients)
        assert int(got) == sum(1 << k for k, c in enumerate(coefficients) if c > median)
    assert dedup.phash(np.full((32, 32), 77.0)) == 1  # featureless: only the DC bit


def test_edits_keep_hash_and_features_close_while_distinct_images_differ():
    rng = np.random.default_rng(2)
    images = [_natural_image(rng) for _ in range(40)]
    edits = [
        edit
        for image in images[:8]
        for edit in (_encode(_resize(image, 0.5)), _encode(_resize(image, 1.7), "PNG"), _encode(image, quality=15))
    ]
    hashes, features = (a[:, 0] for a in dedup.hash_images([_encode(image) for image in images] + edits))
    hashes, edited_hashes = hashes[:40], hashes[40:].reshape(8, 3)
    features, edited_features = features[:40], features[40:].reshape(8, 3, -1)
    assert np.bitwise_count(edited_hashes ^ hashes[:8, None]).max() <= 6
    assert np.einsum("iek,ik->ie", edited_features, features[:8]).min() >= dedup.DEFAULT_MIN_SIMILARITY
    pairs = np.triu_indices(len(images), 1)
    distances = np.bitwise_count(hashes[:, None] ^ hashes[None, :])[pairs]
    assert distances.min() > 8 and 28 <= distances.mean() <= 36  # about half of the 64 bits
    assert (features @ features.T)[pairs].max() < dedup.DEFAULT_MIN_SIMILARITY


# --- the search ----------------------------------------------------------------------------------


def _brute_force_pairs(queries, hashes, threshold) -> set[tuple[int, int, int]]:
    return {
        (q, i, (int(a) ^ int(b)).bit_count())
        for q, a in enumerate(queries)
        for i, b in enumerate(hashes)
        if (int(a) ^ int(b)).bit_count() <= threshold
    }


def _near(rng, centres: np.ndarray, copies: int, max_flips: int) -> np.ndarray:
    """`copies` of each centre with up to `max_flips` random bits flipped."""
    out = []
    for centre in centres:
        for _ in range(copies):
            flips = rng.choice(64, int(rng.integers(0, max_flips + 1)), replace=False)
            out.append(int(centre) ^ sum(1 << int(b) for b in flips))
    return np.array(out, np.uint64)


@pytest.mark.parametrize("threshold", [0, 3, 8, 12, 13, 14, 20])
def test_multi_index_search_finds_exactly_the_pairs_a_linear_scan_finds(threshold):
    rng = np.random.default_rng(threshold)
    centres = rng.integers(0, 2**64, 30, dtype=np.uint64)
    # Clusters, as an image's windows make, spread so that pairs fall on both sides of the threshold.
    hashes = _near(rng, centres, copies=8, max_flips=threshold // 2 + 2)
    queries = np.concatenate([_near(rng, centres[:20], 3, threshold // 2 + 2), rng.integers(0, 2**64, 20, np.uint64)])
    index = dedup.HashIndex(hashes)
    index._MAX_CANDIDATES = 50  # forces the query batch to be split, as crowded buckets would
    q, i, d = index.matches(queries, threshold)
    want = _brute_force_pairs(queries, hashes, threshold)
    assert set(zip(q.tolist(), i.tolist(), d.tolist(), strict=True)) == want
    assert len(q) == len(want)  # each pair once
    just_outside = _brute_force_pairs(queries, hashes, threshold + 4) - want
    assert len(want) > 20 and len(just_outside) > 20


def test_a_hash_candidate_matches_only_with_similar_features_and_the_most_similar_wins():
    rng = np.random.default_rng(6)
    a, b, c = np.linalg.qr(rng.normal(size=(63, 3)))[0].T  # orthonormal directions
    features = rng.normal(size=(10, 63))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    hashes = rng.integers(0, 2**63, 10, np.uint64)
    features[3] = features[9] = a
    hashes[9] = hashes[3] ^ np.uint64(0b11)  # entry 9: entry 3's features, 2 bits away
    features[5] = b
    features[7], features[8] = np.cos(0.3) * c + np.sin(0.3) * b, np.cos(0.1) * c + np.sin(0.1) * b
    hashes[8] = hashes[7]
    queries = np.array([hashes[3], hashes[5] ^ np.uint64(1), hashes[7] ^ np.uint64(0b101), ~hashes[0]], np.uint64)
    query_features = np.stack([a, c, c, features[0]])

    found = dedup.best_matches(dedup.HashIndex(hashes), features, queries, query_features, 12, 0.9)
    # 0: entries 3 and 9 are equally similar (1.0): the lower position wins, not the fewer bits.
    # 1: within 1 bit of entry 5 but orthogonal to it: a candidate, not a match.
    # 2: 2 bits from entries 7 and 8 (similarity cos 0.3 and cos 0.1): the more similar one.
    # 3: every bit flipped: not even a candidate.
    assert found.position.tolist() == [3, -1, 8, -1]
    assert found.distance.tolist() == [0, -1, 2, -1]
    assert found.candidate.tolist() == [True, True, True, False]
    np.testing.assert_allclose(found.similarity[[0, 2]], [1.0, np.cos(0.1)], rtol=1e-5)
    assert np.isnan(found.similarity[[1, 3]]).all()


def test_threshold_outside_the_range_is_refused():
    with pytest.raises(ValueError, match="threshold must be in"):
        dedup.hamming_matches(np.zeros(1, np.uint64), np.zeros(1, np.uint64), dedup.MAX_THRESHOLD + 1)


# --- the pass over shards ------------------------------------------------------------------------

NUM_EVAL_TFRECORD, NUM_EVAL_CSV, NUM_PLANTED_SOURCES, NUM_DISTINCT = 40, 10, 16, 320


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Evaluation images in a TFRecord shard (and one undecodable) and a CSV of PNG files;
    training shards holding distinct images, the five near-duplicates of 16 evaluation images (8
    from each source) and two undecodable images, in a random order over three shards; and the
    tool's output on them."""
    root = tmp_path_factory.mktemp("dedup")
    rng = np.random.default_rng(3)
    eval_images = [_natural_image(rng) for _ in range(NUM_EVAL_TFRECORD + NUM_EVAL_CSV)]
    eval_records = [readers.encode_example(_encode(eval_images[i]), {"txt": "e"}) for i in range(NUM_EVAL_TFRECORD)]
    eval_records.append(readers.encode_example(b"not an image", {"txt": "a broken evaluation image"}))
    readers.write_tfrecords(eval_records, str(root / "eval"), 1)
    eval_labels = [f"{root}/eval/data-00000-of-00001.tfrecord#{i}" for i in range(NUM_EVAL_TFRECORD)]
    (root / "csv").mkdir()
    with open(root / "csv" / "eval.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["image", "caption"])
        writer.writeheader()
        for i, image in enumerate(eval_images[NUM_EVAL_TFRECORD:]):
            (root / "csv" / f"{i}.png").write_bytes(_encode(image, "PNG"))
            writer.writerow({"image": f"{i}.png", "caption": f"csv eval {i}"})
            eval_labels.append(str(root / "csv" / f"{i}.png"))

    train = []  # (image bytes, the evaluation label it copies or None, what it is)
    half = NUM_PLANTED_SOURCES // 2
    planted_from = [*range(half), *range(NUM_EVAL_TFRECORD, NUM_EVAL_TFRECORD + half)]
    for source in planted_from:
        for kind, data in _near_duplicates(eval_images[source], rng).items():
            train.append((data, eval_labels[source], kind))
    for _ in range(NUM_DISTINCT):
        train.append((_encode(_natural_image(rng), quality=int(rng.integers(30, 95))), None, "distinct"))
    train += [(b"not an image", None, "undecodable"), (b"", None, "undecodable")]
    order = rng.permutation(len(train))
    records = [
        readers.encode_example(train[j][0], {"txt": f"train {j}", "kind": train[j][2]}, {"id": int(j)}) for j in order
    ]
    expected = {records[k]: train[j][1] for k, j in enumerate(order)}
    readers.write_tfrecords(records, str(root / "train"), 3)
    report = dedup.dedup_shards(
        [f"tfrecord:{root}/eval/*.tfrecord", f"csv:{root}/csv/eval.csv"],
        f"{root}/train/*.tfrecord",
        str(root / "out"),
    )
    return dict(root=root, expected=expected, report=report)


def test_every_planted_near_duplicate_is_dropped_and_no_distinct_image(corpus):
    report, expected = corpus["report"], corpus["expected"]
    with open(report["duplicates_file"]) as f:
        dropped = [json.loads(line) for line in f]
    by_location = {}
    for shard in report["shards"]:
        for number, record in enumerate(_read(shard["input"])):
            by_location[shard["input"], number] = record
    matched = {by_location[d["shard"], d["record"]]: d for d in dropped}
    planted = {record: label for record, label in expected.items() if label is not None}
    assert set(matched) == set(planted)  # all planted ones, and nothing else
    for record, match in matched.items():
        assert match["eval"] == planted[record]
        assert 0 <= match["distance"] <= report["threshold"] and match["similarity"] >= report["min_similarity"]
    assert report["eval_images_matched"] == NUM_PLANTED_SOURCES
    assert report["eval_images"] == NUM_EVAL_TFRECORD + NUM_EVAL_CSV


def test_report_counts_add_up(corpus):
    report = corpus["report"]
    assert report["records_read"] == len(corpus["expected"])
    assert report["duplicates_dropped"] == 5 * NUM_PLANTED_SOURCES
    assert report["undecodable_kept"] == 2
    assert report["records_read"] == report["records_kept"] + report["duplicates_dropped"]
    for shard in report["shards"]:
        assert shard["read"] == shard["kept"] + shard["dropped"] == len(_read(shard["input"]))
    for key, total in (("read", "records_read"), ("kept", "records_kept"), ("dropped", "duplicates_dropped")):
        assert sum(s[key] for s in report["shards"]) == report[total]
    assert report["eval_undecodable"] == 1
    with open(report["undecodable_file"]) as f:
        undecodable = [json.loads(line) for line in f]
    assert undecodable[0] == dict(split="eval", image=f"{corpus['root']}/eval/data-00000-of-00001.tfrecord#40")
    assert [u["split"] for u in undecodable[1:]] == ["train", "train"]
    on_disk = json.loads((corpus["root"] / "out" / "report.json").read_text())
    assert on_disk == report


def test_filtered_shards_keep_the_other_records_byte_for_byte(corpus):
    report, expected = corpus["report"], corpus["expected"]
    assert sorted(p.name for p in (corpus["root"] / "out").glob("*.tfrecord")) == sorted(
        p.name for p in (corpus["root"] / "train").glob("*.tfrecord")
    )
    for shard in report["shards"]:
        kept = [record for record in _read(shard["input"]) if expected[record] is None]
        assert _read(shard["output"]) == kept


# --- the command line and bad input --------------------------------------------------------------


def test_command_line_end_to_end_with_a_tfds_evaluation_set(tmp_path, capsys):
    import tensorflow_datasets as tfds

    rng = np.random.default_rng(4)
    images = [_natural_image(rng) for _ in range(6)]

    class TinyEval(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({"image": tfds.features.Image()}))

        def _split_generators(self, dl_manager):
            return {"test": self._generate_examples()}

        def _generate_examples(self):
            yield from ((i, {"image": image}) for i, image in enumerate(images))

    TinyEval(data_dir=str(tmp_path / "tfds")).download_and_prepare()
    train = [_encode(_resize(_crop(images[2], rng), 0.7), quality=30)] + [
        _encode(_natural_image(rng)) for _ in range(5)
    ]
    readers.write_tfrecords([readers.encode_example(t, {"txt": "x"}) for t in train], str(tmp_path / "train"), 2)
    args = ["--eval", "tfds:tiny_eval:test", "--tfds_data_dir", str(tmp_path / "tfds")]
    args += ["--train", f"tfrecord:{tmp_path}/train/*.tfrecord"]
    dedup.main([*args, "--out_dir", str(tmp_path / "out")])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["records_read"], report["records_kept"], report["duplicates_dropped"]) == (6, 5, 1)
    [match] = [json.loads(line) for line in (tmp_path / "out" / "duplicates.jsonl").read_text().splitlines()]
    tfds_index = int(match["eval"].rsplit("#", 1)[1])  # TFDS may store examples in any order
    assert match["eval"].startswith("tfds:tiny_eval:test#")
    assert len(_read(tmp_path / "out" / "data-00000-of-00002.tfrecord")) == 2  # record 0 dropped
    stored = tfds.builder("tiny_eval", data_dir=str(tmp_path / "tfds")).as_dataset(split="test")
    stored_images = [example["image"].numpy() for example in stored]
    assert np.array_equal(stored_images[tfds_index], images[2])

    # A stricter similarity keeps the copy (its hash is still a candidate, and counted as such).
    dedup.main([*args, "--min_similarity", "0.999", "--out_dir", str(tmp_path / "strict")])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["duplicates_dropped"], report["kept_below_similarity"], report["records_kept"]) == (0, 1, 6)


def _run(argv) -> str:
    with pytest.raises(SystemExit) as error:
        dedup.main(argv)
    return str(error.value.code)


def test_bad_input_is_named(tmp_path):
    rng = np.random.default_rng(5)
    image = _encode(_natural_image(rng))
    readers.write_tfrecords([readers.encode_example(image, {"txt": "a"})], str(tmp_path / "eval"), 1)
    readers.write_tfrecords([readers.encode_example(image, {"txt": "b"})], str(tmp_path / "train"), 1)
    good_eval, good_train = f"tfrecord:{tmp_path}/eval/*.tfrecord", f"{tmp_path}/train/*.tfrecord"
    out = ["--out_dir", str(tmp_path / "out")]

    message = _run(["--eval", f"tfrecord:{tmp_path}/nowhere/*.tfrecord", "--train", good_train, *out])
    assert "no TFRecord files match" in message and "nowhere" in message
    message = _run(["--eval", good_eval, "--train", f"{tmp_path}/empty-*.tfrecord", *out])
    assert "no TFRecord files match" in message and "empty-*" in message
    assert "at least one --eval" in _run(["--train", good_train, *out])
    assert "threshold must be in" in _run(["--eval", good_eval, "--train", good_train, "--threshold", "40", *out])
    message = _run(["--eval", good_eval, "--train", good_train, "--out_dir", str(tmp_path / "train")])
    assert "holds the input shards" in message

    (tmp_path / "pairs.csv").write_text("image,caption\nmissing.png,a caption\n")
    message = _run(["--eval", f"csv:{tmp_path}/pairs.csv", "--train", good_train, *out])
    assert "not found" in message and "missing.png" in message

    no_image = tf.train.Example(
        features=tf.train.Features(feature={"txt": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"c"]))})
    ).SerializeToString()
    readers.write_tfrecords([readers.encode_example(image, {"txt": "d"}), no_image], str(tmp_path / "bad"), 1)
    message = _run(["--eval", good_eval, "--train", f"{tmp_path}/bad/*.tfrecord", *out])
    assert "bad/data-00000-of-00001.tfrecord#1 has no image feature 'jpg' (it has ['txt'])" in message
    message = _run(["--eval", f"tfrecord:{tmp_path}/bad/*.tfrecord", "--train", good_train, *out])
    assert "bad/data-00000-of-00001.tfrecord#1 has no image feature 'jpg'" in message

    shard = tmp_path / "train" / "data-00000-of-00001.tfrecord"
    (tmp_path / "truncated").mkdir()
    (tmp_path / "truncated" / shard.name).write_bytes(shard.read_bytes()[:-100])
    message = _run(["--eval", good_eval, "--train", f"{tmp_path}/truncated/*.tfrecord", *out])
    assert f"truncated/{shard.name}: truncated record" in message
    assert not list((tmp_path / "out").glob("*.tfrecord*"))  # no partial shard left behind
