"""make_tfrecords, learn_vocab and the offline filter pass, end to end with the pipeline."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import tensorflow as tf

from align_jax.input import pipeline, readers
from align_jax.input.text_ops import Tokenizer
from align_jax.tools import filter_shards, learn_vocab


def _png(value: int, size=(24, 24)) -> bytes:
    return tf.io.encode_png(np.full((*size, 3), value, np.uint8)).numpy()


def _config(vocab, **overrides):
    config = pipeline.default_config()
    config.vocab = vocab
    config.filters.min_image_side = 16
    config.update(overrides)
    return config


def _read_all(spec, config):
    ds = pipeline.make_dataset(spec, config, image_size=16, max_text_length=12, batch_size=64, train=False)
    return [{k: v.numpy() for k, v in b.items()} for b in ds]


def test_make_tfrecords_from_csv_skips_missing_images(tmp_path, vocab_path):
    rows = []
    for i in range(4):
        if i != 2:  # row 2 names a file that does not exist
            (tmp_path / f"{i}.png").write_bytes(_png(40 * i))
        rows.append({"image": f"{i}.png", "caption": f"a photo of cat {i}", "vecap": "a rich caption"})
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["image", "caption", "vecap"])
        writer.writeheader()
        writer.writerows(rows)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "align_jax.tools.make_tfrecords",
            "--csv",
            str(tmp_path / "pairs.csv"),
            "--output",
            str(tmp_path / "shards"),
            "--num_shards",
            "2",
            "--extra_columns",
            "vecap",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (report["written"], report["missing_images"], report["shards"]) == (3, 1, 2)
    records = tf.data.TFRecordDataset(sorted(map(str, (tmp_path / "shards").iterdir())))
    parsed = [readers.parse_example(r, ["txt", "vecap"]) for r in records]
    assert sorted(p["txt"].numpy().decode() for p in parsed) == [
        "a photo of cat 0",
        "a photo of cat 1",
        "a photo of cat 3",
    ]
    assert {p["vecap"].numpy() for p in parsed} == {b"a rich caption"}
    batches = _read_all(f"tfrecord:{tmp_path}/shards/*.tfrecord", _config(vocab_path))
    assert sum(len(b["images"]) for b in batches) == 3


def test_learn_vocab_covers_the_corpus(tmp_path):
    captions = ["a red circle on the left", "a blue square on the right", "Café Résumé naïve"] * 50
    (tmp_path / "captions.txt").write_text("\n".join(captions), encoding="utf-8")
    tokens = learn_vocab.learn_vocab(learn_vocab.texts_dataset(text_file=str(tmp_path / "captions.txt")), 300)
    assert tokens[:5] == learn_vocab.RESERVED
    assert {"circle", "square", "cafe", "resume"} <= set(tokens)
    (tmp_path / "vocab.txt").write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    ids, _ = Tokenizer(str(tmp_path / "vocab.txt"), 8)(["a red circle"])
    assert ids[0, 1:4].tolist() == [tokens.index(w) for w in ("a", "red", "circle")]


def test_offline_filters_block_and_pipeline_counts(tmp_path):
    records = []
    for i in range(12):  # "image" is the alt-text of 12 different images: boilerplate
        records.append(readers.encode_example(_png(i), {"txt": "image"}))
    for text in ("a red cat photo", "a blue cat photo", "a green cat photo"):  # one image, three texts
        records.append(readers.encode_example(_png(200), {"txt": text}))
    for i in range(20):  # ten images each for two ordinary alt-texts: kept
        records.append(readers.encode_example(_png(100 + i), {"txt": f"a {'cat' if i % 2 else 'dog'} photo here"}))
    records.append(readers.encode_example(_png(250), {"txt": "a zyzzyva photo here"}))  # rare word, last
    readers.write_tfrecords(records, str(tmp_path / "shards"), 2)
    spec = f"tfrecord:{tmp_path}/shards/*.tfrecord"
    top = 11  # the n-grams seen more than once: a, photo, here, cat, dog, image and 5 bigrams
    report = filter_shards.filter_shards(
        spec, str(tmp_path / "block"), max_images_per_text=10, max_texts_per_image=2, top_ngrams=top
    )
    assert report["examples"] == 36
    assert report["removed"] == {
        "text_shared_by_too_many_images": 12,
        "image_with_too_many_texts": 3,
        "text_with_rare_ngrams": 1,
    }

    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\na\ncat\ndog\nphoto\nhere\n", encoding="utf-8")
    config = _config(str(tmp_path / "vocab.txt"))
    config.filters.min_words = 1
    config.filters.block_list = str(tmp_path / "block")
    batches = _read_all(spec, config)
    assert sum(len(b["images"]) for b in batches) == 20
    counts = pipeline.skip_counts(batches[-1])
    assert (counts["blocked_image"], counts["blocked_text"]) == (3, 13)
