"""Writes img2dataset-style TFRecord shards from a CSV of image files and captions.

    python -m align_jax.tools.make_tfrecords --csv pairs.csv --output shards/ --num_shards 16

The image bytes go under `jpg` (whatever their format), the caption column under `txt`, and any
`--extra_columns` under their own names (e.g. a rewritten caption). Image paths are relative to
the CSV or absolute. Rows whose image file is missing are skipped and reported.
"""

from __future__ import annotations

import argparse
import json

import tensorflow as tf

from align_jax.input import readers


def make_tfrecords(
    csv_path: str,
    output: str,
    num_shards: int,
    image_column: str = "image",
    caption_column: str = "caption",
    extra_columns: tuple[str, ...] = (),
) -> dict:
    rows = readers.read_csv_rows(csv_path, image_column, (caption_column, *extra_columns))
    records, missing = [], []
    for row in rows:
        if not row["image"] or not tf.io.gfile.exists(row["image"]):
            missing.append(row["image"])
            continue
        with tf.io.gfile.GFile(row["image"], "rb") as f:
            image = f.read()
        texts = {readers.TEXT_FIELD: row[caption_column], **{c: row[c] for c in extra_columns}}
        records.append(readers.encode_example(image, texts))
    if not records:
        raise ValueError(f"{csv_path}: none of the {len(rows)} rows has an existing image file")
    paths = readers.write_tfrecords(records, output, min(num_shards, len(records)))
    return dict(written=len(records), missing_images=len(missing), first_missing=missing[:5], shards=len(paths))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--num_shards", type=int, default=16)
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--caption_column", default="caption")
    parser.add_argument("--extra_columns", default="", help="comma-separated text columns kept under their names")
    args = parser.parse_args(argv)
    extra = tuple(c for c in args.extra_columns.split(",") if c)
    try:
        report = make_tfrecords(args.csv, args.output, args.num_shards, args.image_column, args.caption_column, extra)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"make_tfrecords: {e}") from None
    print(json.dumps(report))


if __name__ == "__main__":
    main()
