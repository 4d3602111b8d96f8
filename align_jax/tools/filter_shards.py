"""ALIGN's corpus-level noise filters (paper section 3) as an offline pass over the shards.

    python -m align_jax.tools.filter_shards --data "tfrecord:shards/*.tfrecord" --output blocklist/

Counts, over the whole corpus, how many distinct images share each alt-text, how many distinct
alt-texts each image has, and how often each unigram and bigram occurs; then blocks alt-texts
shared by more than `--max_images_per_text` images (boilerplate such as "image" or "1920x1080"),
images with more than `--max_texts_per_image` alt-texts, and alt-texts containing a unigram or
bigram outside the `--top_ngrams` most frequent. Writes `blocked_texts.txt` (web-safe base64 of
the text), `blocked_images.txt` (content fingerprints) and `report.json` (examples each filter
removes); point `data.filters.block_list` at the folder and the pipeline skips and counts them.

This is a single-host pass that keeps its counts in memory: fine for millions of examples, not
for ALIGN's 1.8B (shard it by text hash and merge the counts for that).
"""

from __future__ import annotations

import argparse
import collections
import json
import os

import tensorflow as tf

from align_jax.input import readers
from align_jax.input.pipeline import image_fingerprint
from align_jax.input.text_ops import normalize


def _records(data: str, field: str):
    """(fingerprint, text) pairs, in batches through TF so hashing matches the pipeline."""
    for source in readers.parse_spec(data):
        if source.kind != "tfrecord":
            raise ValueError(f"filter_shards reads tfrecord: sources, got {source.kind!r}")
        ds = tf.data.TFRecordDataset(readers.tfrecord_files(source.path))
        ds = ds.map(lambda s: readers.parse_example(s, [field])).batch(1024)
        for batch in ds:
            prints = image_fingerprint(batch["image"]).numpy()
            words = normalize(batch[field]).numpy()
            yield from zip(prints.tolist(), batch[field].numpy().tolist(), words.tolist(), strict=True)


def ngrams(normalized: bytes) -> set[bytes]:
    words = normalized.split()
    return set(words) | {a + b" " + b for a, b in zip(words, words[1:], strict=False)}


def filter_shards(
    data: str,
    output: str,
    field: str = readers.TEXT_FIELD,
    max_images_per_text: int = 10,
    max_texts_per_image: int = 1000,
    top_ngrams: int = 100_000_000,
) -> dict:
    images_of_text: dict[bytes, set[int]] = collections.defaultdict(set)
    texts_of_image: dict[int, set[bytes]] = collections.defaultdict(set)
    ngram_counts: collections.Counter = collections.Counter()
    pairs = []
    for fingerprint, text, normalized in _records(data, field):
        images_of_text[text].add(fingerprint)
        texts_of_image[fingerprint].add(text)
        grams = ngrams(normalized)
        ngram_counts.update(grams)
        pairs.append((fingerprint, text, grams))
    frequent = {g for g, _ in ngram_counts.most_common(top_ngrams)}
    shared = {t for t, images in images_of_text.items() if len(images) > max_images_per_text}
    crowded = {i for i, texts in texts_of_image.items() if len(texts) > max_texts_per_image}
    rare = {t for _, t, grams in pairs if not grams <= frequent}

    removed = collections.Counter()
    for fingerprint, text, _ in pairs:  # each example counts once, under the first filter it hits
        if fingerprint in crowded:
            removed["image_with_too_many_texts"] += 1
        elif text in shared:
            removed["text_shared_by_too_many_images"] += 1
        elif text in rare:
            removed["text_with_rare_ngrams"] += 1
    tf.io.gfile.makedirs(output)
    with tf.io.gfile.GFile(os.path.join(output, "blocked_texts.txt"), "w") as f:
        for text in sorted(shared | rare):
            f.write(tf.io.encode_base64(text).numpy().decode() + "\n")
    with tf.io.gfile.GFile(os.path.join(output, "blocked_images.txt"), "w") as f:
        f.write("".join(f"{i}\n" for i in sorted(crowded)))
    report = dict(
        examples=len(pairs),
        kept=len(pairs) - sum(removed.values()),
        removed=dict(removed),
        blocked_texts=len(shared | rare),
        blocked_images=len(crowded),
    )
    with tf.io.gfile.GFile(os.path.join(output, "report.json"), "w") as f:
        f.write(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="tfrecord:GLOB source(s)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--field", default=readers.TEXT_FIELD)
    parser.add_argument("--max_images_per_text", type=int, default=10)
    parser.add_argument("--max_texts_per_image", type=int, default=1000)
    parser.add_argument("--top_ngrams", type=int, default=100_000_000)
    args = parser.parse_args(argv)
    try:
        report = filter_shards(
            args.data, args.output, args.field, args.max_images_per_text, args.max_texts_per_image, args.top_ngrams
        )
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"filter_shards: {e}") from None
    print(json.dumps(report))


if __name__ == "__main__":
    main()
