"""Data sources named by spec strings, read into a common record: `image` (encoded bytes) plus
one string per caption field.

- `tfrecord:GLOB`: tf.train.Example records as img2dataset writes them: image bytes under `jpg`,
  the caption under `txt`, any other text fields (a rewritten caption, a key) alongside.
- `tfds:NAME[:SPLIT]`: a prepared TFDS dataset (under the configured data dir); its image
  feature is read undecoded and its text features by name.
- `csv:PATH`: a CSV with an image path column (relative to the CSV or absolute) and caption
  columns.

A mixture is several specs with weights: `"0.7*tfrecord:/data/a-*.tfrecord,0.3*csv:/data/b.csv"`.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
from collections.abc import Sequence

import tensorflow as tf

IMAGE_FIELD = "jpg"
TEXT_FIELD = "txt"
KINDS = ("tfrecord", "tfds", "csv")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    kind: str
    path: str  # glob, CSV path or TFDS name
    split: str = "train"
    weight: float = 1.0


def parse_spec(spec: str) -> list[SourceSpec]:
    """`[w*]kind:path[,[w*]kind:path...]` -> sources; errors quote the offending part."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty data source spec: {spec!r}")
    sources = []
    for part in (p.strip() for p in spec.split(",")):
        match = re.fullmatch(r"(?:(?P<weight>[0-9.eE+-]+)\*)?(?P<kind>[a-z]+):(?P<path>.+)", part)
        if not match:
            raise ValueError(f"malformed data source {part!r} in {spec!r}; expected KIND:PATH with KIND in {KINDS}")
        kind, path = match["kind"], match["path"]
        if kind not in KINDS:
            raise ValueError(f"unknown data source kind {kind!r} in {spec!r}; expected one of {KINDS}")
        try:
            weight = float(match["weight"]) if match["weight"] else 1.0
        except ValueError:
            raise ValueError(f"malformed weight in {part!r}") from None
        if weight <= 0:
            raise ValueError(f"data source weight must be positive, got {weight} in {part!r}")
        split = "train"
        if kind == "tfds" and ":" in path:
            path, split = path.split(":", 1)
        sources.append(SourceSpec(kind, path, split, weight))
    return sources


def tfrecord_files(pattern: str) -> list[str]:
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no TFRecord files match {pattern!r}")
    return files


MISSING_INT = -1  # value of an absent integer field (e.g. a record without a class label)


def example_features(caption_fields: Sequence[str], int_fields: Sequence[str] = ()) -> dict:
    features = {IMAGE_FIELD: tf.io.FixedLenFeature([], tf.string, default_value="")}
    for field in caption_fields:
        features[field] = tf.io.FixedLenFeature([], tf.string, default_value="")
    for field in int_fields:
        features[field] = tf.io.FixedLenFeature([], tf.int64, default_value=MISSING_INT)
    return features


def parse_example(serialized: tf.Tensor, caption_fields: Sequence[str], int_fields: Sequence[str] = ()) -> dict:
    """A serialized tf.train.Example -> `{'image': bytes, field: text, ..., int field: int64}`;
    absent text fields are '', absent integer fields `MISSING_INT`."""
    parsed = tf.io.parse_single_example(serialized, example_features(caption_fields, int_fields))
    return {"image": parsed[IMAGE_FIELD], **{f: parsed[f] for f in (*caption_fields, *int_fields)}}


def encode_example(image: bytes, texts: dict[str, str | bytes], extra: dict[str, int] | None = None) -> bytes:
    """The img2dataset record: image bytes under `jpg`, texts as bytes features, ints as int64."""
    feature = {IMAGE_FIELD: tf.train.Feature(bytes_list=tf.train.BytesList(value=[image]))}
    for name, text in texts.items():
        value = text.encode("utf-8") if isinstance(text, str) else text
        feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    for name, number in (extra or {}).items():
        feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(number)]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_tfrecords(records: Sequence[bytes], output_dir: str, num_shards: int, prefix: str = "data") -> list[str]:
    """Writes serialized records round-robin into `num_shards` files `prefix-0000i-of-0000N.tfrecord`."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, got {num_shards}")
    tf.io.gfile.makedirs(output_dir)
    paths = [os.path.join(output_dir, f"{prefix}-{i:05d}-of-{num_shards:05d}.tfrecord") for i in range(num_shards)]
    writers = [tf.io.TFRecordWriter(p) for p in paths]
    try:
        for i, record in enumerate(records):
            writers[i % num_shards].write(record)
    finally:
        for writer in writers:
            writer.close()
    return paths


def read_csv_rows(path: str, image_column: str, caption_fields: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV with absolute image paths; errors name the file and the missing column."""
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"CSV file not found: {path}")
    with tf.io.gfile.GFile(path, "r") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in (image_column, *caption_fields) if c not in columns]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; it has {columns}")
        base = os.path.dirname(os.path.abspath(path))
        rows = []
        for row in reader:
            image = row[image_column] or ""
            image = image if os.path.isabs(image) or not image else os.path.join(base, image)
            rows.append({"image": image, **{f: row[f] or "" for f in caption_fields}})
    return rows
