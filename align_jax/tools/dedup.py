"""Removes near-duplicates of evaluation images from training shards, as ALIGN did.

    python -m align_jax.tools.dedup --eval "tfrecord:eval/*.tfrecord" --eval csv:flickr30k.csv \\
        --train "shards/*.tfrecord" --out_dir deduped/ [--threshold 12] [--min_similarity 0.9]

ALIGN removed near-duplicates of its evaluation images (ImageNet, Flickr30K, MSCOCO) from its
training data, so that the reported numbers do not reward memorisation. This tool hashes every
evaluation image (any `tfrecord:`, `csv:` or `tfds:` spec, as training reads them), streams the
training shards, and drops each training image that matches one. The filtered shards keep the
input's file names, sharding and record bytes. `report.json` counts what was read, kept and
dropped (read = kept + dropped, per shard and in all; undecodable images are kept and counted),
`duplicates.jsonl` names each dropped record with the evaluation image it matched, the Hamming
distance and the similarity, and `undecodable.jsonl` lists the images that could not be decoded.

Matching has two stages. The index is the 64-bit DCT pHash: grayscale, a 32 x 32 area-resampled
thumbnail, its 2-D DCT-II, one bit per coefficient of the 8 x 8 lowest frequencies (above their
median or not). Those frequencies survive resizing and JPEG re-encoding, while unrelated images
differ in about 32 of the 64 bits. A crop moves content relative to the frame and changes the
low frequencies too (up to ~16 bits for a 5% crop), so each evaluation image is also hashed over
18 crop windows (97% and 94% of each side, at the 9 combinations of start, centre and end): a copy
cropped by up to ~6% of a side is then within a few bits of one of the 19. Every window within
`--threshold` bits (default 12) is a candidate, found by multi-index hashing (`HashIndex`).

The bits alone are not selective enough for large evaluation sets: on the tests' synthetic
images (natural 1/f spectra), 6 of 6 million distinct (training, evaluation) image pairs lie
within 8 bits, which with 200k evaluation images would drop one training image in five. So a
candidate counts only if the coefficients themselves agree: the cosine similarity of the 63 AC
coefficients, each weighted by its frequency (natural images' amplitude falls as 1/f; the weight
lets every frequency count alike), must reach `--min_similarity` (default 0.9). Over the same 6
million pairs the most similar distinct candidate scored 0.88, while 1500 planted copies (resized
0.5x and 1.7x, JPEG quality 15, cropped 2-5%, all three combined) all scored at least 0.97, and
were all within 6 bits. A featureless (single-colour) image has no AC coefficients to compare
and matches nothing.

Undecodable training images are kept: they cannot be compared, the training pipeline skips (and
counts) them anyway, and this tool removes only what it matched. A record without the image
feature, or not a tf.train.Example at all, stops the run with an error naming the shard and
record; so does a missing file or a glob that matches nothing.

This is a single-host pass holding the evaluation side in memory, ~2.9 kB per evaluation image
(19 windows x a hash, 63 float16 coefficients and 4 index entries); training shards are streamed
one at a time, so disjoint shard globs can run as separate processes.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import tensorflow as tf
from google.protobuf.message import DecodeError

from align_jax.input import image_ops, pipeline, readers

HASH_GRID = 32  # thumbnail side the DCT is taken of (pHash's standard)
HASH_FREQUENCIES = 8  # the 8 x 8 lowest frequencies make the 64 bits
HASH_BITS = HASH_FREQUENCIES**2
DEFAULT_THRESHOLD = 12
DEFAULT_MIN_SIMILARITY = 0.9
# Unrelated images differ in ~32 bits (+- 4); beyond this nearly everything is a candidate (and
# multi-index hashing would enumerate too many neighbours to beat a linear scan).
MAX_THRESHOLD = 20
# (side fraction, vertical position, horizontal position) of the windows hashed per evaluation
# image; positions 0, 0.5, 1: start, centre, end. The first is the whole image, as training images
# are hashed.
WHOLE_IMAGE = ((1.0, 0.5, 0.5),)
EVAL_WINDOWS = WHOLE_IMAGE + tuple(
    (scale, y, x) for scale in (0.97, 0.94) for y in (0.0, 0.5, 1.0) for x in (0.0, 0.5, 1.0)
)
# JPEGs are decoded at 1/2, 1/4 or 1/8 scale (in the DCT domain, much cheaper) while the short side
# stays at least this: 4x the thumbnail, so the area resampling still averages many pixels.
_JPEG_MIN_SIDE = 4 * HASH_GRID
_BATCH = 256
_TF_ERROR_NOISE = re.compile(r"\{\{function_node .*?\}\}|\s*\[Op:.*", re.DOTALL)  # op names around TF's reason


# --- hashing -----------------------------------------------------------------------------------


def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix `[n, n]`: `D @ x` is the DCT of the vector x, `D @ X @ D.T`
    the 2-D DCT of X."""
    k = np.arange(n)
    matrix = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n))
    matrix[0] /= np.sqrt(2.0)
    return matrix


_LOW_DCT = dct_matrix(HASH_GRID)[:HASH_FREQUENCIES]  # only the lowest rows are ever needed


def low_frequency_dct(thumbnails: np.ndarray) -> np.ndarray:
    """`[..., 32, 32]` -> the `[..., 8, 8]` lowest-frequency 2-D DCT-II coefficients, as two
    batched matrix products (8 x 32 each side) rather than a full 32 x 32 transform."""
    thumbnails = np.asarray(thumbnails, np.float64)
    if thumbnails.shape[-2:] != (HASH_GRID, HASH_GRID):
        raise ValueError(f"thumbnails must be [..., {HASH_GRID}, {HASH_GRID}], got {thumbnails.shape}")
    return _LOW_DCT @ thumbnails @ _LOW_DCT.T


def phash(thumbnails: np.ndarray) -> np.ndarray:
    """`[..., 32, 32]` grayscale thumbnails -> `[...]` uint64 perceptual hashes.

    Bit `8 * u + v` is set when DCT coefficient (u, v) exceeds the median of the 64. Coefficients
    are rounded to 1e-6 first so that float noise cannot decide a bit (a flat image's AC
    coefficients are then exactly 0, and its hash 1).
    """
    coefficients = np.round(low_frequency_dct(thumbnails), 6)
    coefficients = coefficients.reshape(*coefficients.shape[:-2], HASH_BITS)
    bits = coefficients > np.median(coefficients, axis=-1, keepdims=True)
    return np.packbits(bits, axis=-1, bitorder="little").view("<u8")[..., 0].astype(np.uint64)


# Weight of AC coefficient (u, v): its spatial frequency, which undoes natural images' 1/f
# amplitude so that the similarity is not decided by the two or three lowest frequencies alone.
_AC_WEIGHTS = np.hypot(*np.meshgrid(np.arange(HASH_FREQUENCIES), np.arange(HASH_FREQUENCIES), indexing="ij"))
_AC_WEIGHTS = _AC_WEIGHTS.ravel()[1:]


def dct_features(thumbnails: np.ndarray) -> np.ndarray:
    """`[..., 32, 32]` -> `[..., 63]` float32 unit vectors: the AC coefficients of the 8 x 8
    lowest frequencies, weighted by frequency. Their dot product (cosine similarity) verifies a
    hash match with the magnitudes the hash's bits throw away; brightness and contrast do not
    count. A featureless thumbnail gives the zero vector, similar to nothing."""
    coefficients = low_frequency_dct(thumbnails)
    weighted = coefficients.reshape(*coefficients.shape[:-2], HASH_BITS)[..., 1:] * _AC_WEIGHTS
    norms = np.linalg.norm(weighted, axis=-1, keepdims=True)
    return np.where(norms > 1e-6, weighted / np.maximum(norms, 1e-6), 0.0).astype(np.float32)


def decode_gray(data: tf.Tensor) -> tf.Tensor:
    """JPEG, PNG, GIF or BMP bytes -> float32 luma `[H, W, 1]`. Large JPEGs are decoded
    downscaled in the DCT domain (the hash only needs ~32 px); other formats as the training
    pipeline decodes them. Raises (inside tf.data: drops the element) when undecodable."""

    def jpeg():
        shape = tf.image.extract_jpeg_shape(data)
        short = tf.minimum(shape[0], shape[1])
        branch = tf.reduce_sum(tf.cast(short >= _JPEG_MIN_SIDE * tf.constant([2, 4, 8]), tf.int32))
        return tf.switch_case(
            branch, [functools.partial(tf.io.decode_jpeg, data, channels=3, ratio=r) for r in (1, 2, 4, 8)]
        )

    is_jpeg = tf.strings.substr(data, 0, 3) == b"\xff\xd8\xff"
    rgb = tf.cond(is_jpeg, jpeg, lambda: image_ops.decode_rgb(data))
    rgb.set_shape([None, None, 3])
    return tf.image.rgb_to_grayscale(tf.cast(rgb, tf.float32))


def window_thumbnails(gray: tf.Tensor, windows: Sequence[tuple[float, float, float]]) -> tf.Tensor:
    """`[H, W, 1]` -> `[len(windows), 32, 32]`: each window (side fraction, vertical and
    horizontal position in [0, 1]) cropped and area-resampled to the hash grid."""
    height, width = tf.shape(gray)[0], tf.shape(gray)[1]
    thumbnails = []
    for scale, y_position, x_position in windows:
        crop_h = tf.maximum(1, tf.cast(tf.round(tf.cast(height, tf.float32) * scale), tf.int32))
        crop_w = tf.maximum(1, tf.cast(tf.round(tf.cast(width, tf.float32) * scale), tf.int32))
        y = tf.cast(tf.round(tf.cast(height - crop_h, tf.float32) * y_position), tf.int32)
        x = tf.cast(tf.round(tf.cast(width - crop_w, tf.float32) * x_position), tf.int32)
        crop = gray[y : y + crop_h, x : x + crop_w]
        thumbnails.append(tf.image.resize(crop, (HASH_GRID, HASH_GRID), method="area")[..., 0])
    return tf.stack(thumbnails)


class HashedBatch(NamedTuple):
    keys: list  # one per image, as the caller gave them
    hashes: np.ndarray  # [B, V] uint64 (0 where undecodable)
    features: np.ndarray  # [B, V, 63] float32 (0 where undecodable)
    decoded: np.ndarray  # [B] bool


def _hash_batches(
    images: tf.data.Dataset, keys: Iterable, windows: Sequence[tuple[float, float, float]]
) -> Iterator[HashedBatch]:
    """Hashes a dataset of encoded images in order, `keys` (one per image) aligned with them.

    An image that fails to decode is dropped inside tf.data (so the parallel map never stops) and
    found as a gap in the running index; its key comes back with `decoded` False. (Read errors
    are dropped here too; they surface from `keys`, which read the same files.)
    """
    thumbnails = (
        images.enumerate()
        .map(
            lambda i, image: (i, window_thumbnails(decode_gray(image), windows)),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        .ignore_errors()
        .batch(_BATCH)
        .prefetch(2)
    )
    keys = iter(keys)

    def empty(batch_keys: list) -> HashedBatch:
        count = len(batch_keys)
        return HashedBatch(
            batch_keys,
            np.zeros((count, len(windows)), np.uint64),
            np.zeros((count, len(windows), HASH_BITS - 1), np.float32),
            np.zeros(count, bool),
        )

    position = 0
    for indices, batch in thumbnails.as_numpy_iterator():
        count = int(indices[-1]) + 1 - position
        out = empty(list(itertools.islice(keys, count)))
        if len(out.keys) != count:
            raise RuntimeError(f"{count - len(out.keys)} more images than keys")
        rows = indices - position
        out.hashes[rows], out.features[rows], out.decoded[rows] = phash(batch), dct_features(batch), True
        position += count
        yield out
    while rest := list(itertools.islice(keys, _BATCH)):  # a trailing run of undecodable images
        yield empty(rest)


def hash_images(
    images: Sequence[bytes], windows: Sequence[tuple[float, float, float]] = WHOLE_IMAGE
) -> tuple[np.ndarray, np.ndarray]:
    """Encoded images in memory -> `(hashes [N, V] uint64, features [N, V, 63])` over the
    V = `len(windows)` windows; raises if one is undecodable."""
    dataset = tf.data.Dataset.from_tensor_slices(tf.constant(list(images), tf.string))
    batches = list(_hash_batches(dataset, range(len(images)), windows))
    undecodable = [i for b in batches for i, ok in zip(b.keys, b.decoded, strict=True) if not ok]
    if undecodable:
        raise ValueError(f"images {undecodable[:5]} cannot be decoded")
    if not batches:
        return np.zeros((0, len(windows)), np.uint64), np.zeros((0, len(windows), HASH_BITS - 1), np.float32)
    return np.concatenate([b.hashes for b in batches]), np.concatenate([b.features for b in batches])


# --- search ------------------------------------------------------------------------------------


def _check_threshold(threshold: int) -> None:
    if not 0 <= threshold <= MAX_THRESHOLD:
        raise ValueError(f"threshold must be in [0, {MAX_THRESHOLD}] bits of {HASH_BITS}, got {threshold}")


class HashIndex:
    """Multi-index hashing (Norouzi, Punjani & Fleet, CVPR 2012) over 64-bit hashes.

    Each hash is cut into four 16-bit blocks, and for each block the index holds the hashes
    sorted by that block's value, with the offset of every value in the sort. Write the threshold
    `t = 4 r + a` (0 <= a < 4): two hashes within `t` bits differ in at most `r` bits on one of
    the first `a + 1` blocks or in at most `r - 1` on one of the others (else they would differ in
    `(a + 1)(r + 1) + (3 - a) r = t + 1` bits at least). So a query looks up the buckets of the
    block values within those radii of its own, `M(r) = sum_{k <= r} C(16, k)` per block (1108
    buckets in all at t = 12, 188 at t = 8), and computes the exact distance (XOR and popcount)
    only for the hashes found there. Build: O(N log N) time, O(N) memory. Query: those look-ups
    plus the candidates, ~ N / 65536 per bucket for evenly spread hashes (1.7% of the index at
    t = 12, 0.3% at t = 8) where a linear scan reads all N. Vectorised over a batch of queries;
    on 1.9M hashes (100k images x 19 windows) it takes 1.1 ms of CPU per query at t = 12 and
    0.2 ms at t = 8, where a linear scan (XOR and popcount over all) takes 3-5 ms.
    """

    _BLOCK_BITS = 16
    _MAX_CANDIDATES = 1 << 22  # per vectorised step, to bound memory when buckets are crowded

    def __init__(self, hashes: np.ndarray):
        self.hashes = np.ascontiguousarray(hashes, np.uint64).ravel()
        self._orders, self._offsets = [], []
        for block in range(HASH_BITS // self._BLOCK_BITS):
            values = self._block(self.hashes, block)
            order = np.argsort(values, kind="stable")
            self._orders.append(order.astype(np.int32) if len(order) < 2**31 else order)
            self._offsets.append(np.searchsorted(values[order], np.arange(2**self._BLOCK_BITS + 1)))

    def __len__(self) -> int:
        return len(self.hashes)

    @classmethod
    def _block(cls, hashes: np.ndarray, block: int) -> np.ndarray:
        shift, mask = np.uint64(cls._BLOCK_BITS * block), np.uint64(2**cls._BLOCK_BITS - 1)
        return ((hashes >> shift) & mask).astype(np.int64)

    def matches(self, queries: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every (query, indexed hash) pair within `threshold` bits: `(query positions, index
        positions, distances)`, sorted by query then index position, each pair once."""
        _check_threshold(threshold)
        queries = np.ascontiguousarray(queries, np.uint64).ravel()
        blocks = len(self._orders)
        values = np.arange(2**self._BLOCK_BITS)
        radius, extra = divmod(threshold, blocks)
        # XOR masks within each block's radius (none: a block that need not be searched)
        flips = [values[np.bitwise_count(values) <= (radius if b <= extra else radius - 1)] for b in range(blocks)]
        step = max(1, self._MAX_CANDIDATES // sum(len(f) for f in flips))
        rows = [np.arange(i, min(i + step, len(queries))) for i in range(0, len(queries), step)]
        found = [self._matches(queries, r, flips, threshold) for r in rows]
        pairs = np.unique(np.concatenate([np.zeros(0, np.int64), *found]))
        query_positions, index_positions = pairs // max(1, len(self)), pairs % max(1, len(self))
        distances = np.bitwise_count(queries[query_positions] ^ self.hashes[index_positions]).astype(np.int64)
        return query_positions, index_positions, distances

    def _matches(self, queries: np.ndarray, rows: np.ndarray, flips: list[np.ndarray], threshold: int) -> np.ndarray:
        """Pairs `query * N + index` within the threshold for the queries `rows`; halves the rows
        while their candidates would exceed `_MAX_CANDIDATES`."""
        found = [np.zeros(0, np.int64)]
        for block, (order, offsets, masks) in enumerate(zip(self._orders, self._offsets, flips, strict=True)):
            if not len(masks):
                continue
            neighbours = self._block(queries[rows], block)[:, None] ^ masks[None, :]
            starts, counts = offsets[neighbours], offsets[neighbours + 1] - offsets[neighbours]
            if counts.sum() > self._MAX_CANDIDATES and len(rows) > 1:  # start again, in halves
                half = len(rows) // 2
                return np.concatenate(
                    [self._matches(queries, part, flips, threshold) for part in (rows[:half], rows[half:])]
                )
            starts, counts = starts.ravel(), counts.ravel()
            nonempty = counts > 0
            starts, counts = starts[nonempty], counts[nonempty]
            query = np.repeat(np.repeat(rows, len(masks))[nonempty], counts)
            # Position of each candidate in the sort: its bucket's start plus its rank in the bucket.
            ranks = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            candidate = order[np.repeat(starts, counts) + ranks]
            close = np.bitwise_count(queries[query] ^ self.hashes[candidate]) <= threshold
            found.append(query[close] * len(self) + candidate[close])
        return np.concatenate(found)


class Matches(NamedTuple):
    position: np.ndarray  # [Q] int64: the matched index position, -1 where none
    distance: np.ndarray  # [Q] int64: its Hamming distance, -1 where none
    similarity: np.ndarray  # [Q] float32: its feature similarity, nan where none
    candidate: np.ndarray  # [Q] bool: some indexed hash was within the threshold


def best_matches(
    index: HashIndex,
    index_features: np.ndarray,
    hashes: np.ndarray,
    features: np.ndarray,
    threshold: int = DEFAULT_THRESHOLD,
    min_similarity: float = DEFAULT_MIN_SIMILARITY,
) -> Matches:
    """For each query (`hashes [Q]`, `features [Q, 63]`), the indexed entry within `threshold`
    bits whose features are most similar, if that similarity reaches `min_similarity` (ties: the
    lowest position). The hash finds candidates cheaply; the similarity decides, because the
    64 bits alone let too many unrelated pairs through once the index is large."""
    queries, positions, distances = index.matches(hashes, threshold)
    similarity = np.einsum(
        "nk,nk->n", np.asarray(features, np.float32)[queries], np.asarray(index_features[positions], np.float32)
    )
    candidate = np.zeros(len(hashes), bool)
    candidate[queries] = True
    keep = similarity >= min_similarity
    queries, positions, distances, similarity = queries[keep], positions[keep], distances[keep], similarity[keep]
    order = np.lexsort((positions, -similarity, queries))  # per query: most similar, then lowest position
    queries, positions, distances, similarity = queries[order], positions[order], distances[order], similarity[order]
    first = np.concatenate([[True], queries[1:] != queries[:-1]])[: len(queries)]
    out = Matches(
        np.full(len(hashes), -1, np.int64),
        np.full(len(hashes), -1, np.int64),
        np.full(len(hashes), np.nan, np.float32),
        candidate,
    )
    out.position[queries[first]] = positions[first]
    out.distance[queries[first]] = distances[first]
    out.similarity[queries[first]] = similarity[first]
    return out


def hamming_matches(
    query_hashes: np.ndarray, index_hashes: np.ndarray, threshold: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (query, index) pair of uint64 hashes within `threshold` bits, as `HashIndex.matches`
    (builds the index once; keep a `HashIndex` to query it repeatedly)."""
    return HashIndex(index_hashes).matches(query_hashes, threshold)


# --- sources -----------------------------------------------------------------------------------


def _record_problem(serialized: bytes) -> str | None:
    """Why a record has no usable image feature (None when it has one, merely undecodable)."""
    try:
        example = tf.train.Example.FromString(serialized)
    except DecodeError:
        return "is not a tf.train.Example"
    features = example.features.feature
    if readers.IMAGE_FIELD not in features:
        return f"has no image feature {readers.IMAGE_FIELD!r} (it has {sorted(features)})"
    feature = features[readers.IMAGE_FIELD]
    if feature.WhichOneof("kind") != "bytes_list" or len(feature.bytes_list.value) != 1:
        return f"has a feature {readers.IMAGE_FIELD!r} that is not one bytes value"
    return None


def _tf_reason(error: tf.errors.OpError) -> str:
    """TF's reason for a failed read, without the op names around it."""
    return _TF_ERROR_NOISE.sub("", error.message).strip()


def _tfrecord_records(paths: Sequence[str]) -> Iterator[tuple[int, int, bytes]]:
    """`(file number, record number, serialized record)` of the files in order; a truncated or
    corrupt file raises, naming it."""
    for number, path in enumerate(paths):
        try:
            for record, serialized in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator()):
                yield number, record, serialized
        except tf.errors.OpError as e:
            raise ValueError(f"{path}: {_tf_reason(e)}") from None


def _tfrecord_images(paths: Sequence[str]) -> tf.data.Dataset:
    """The image bytes of every record of the files, in file order: one pipeline for all of them,
    so its functions are traced once (~0.3 s each), not once per file."""
    return tf.data.TFRecordDataset(list(paths)).map(lambda s: readers.parse_example(s, [])["image"])


def _eval_sources(
    spec: str, tfds_data_dir: str, tfds_image_key: str, csv_image_column: str
) -> Iterator[tuple[str, tf.data.Dataset, Iterator[tuple[str, bytes | None]]]]:
    """`(name, images, keys)` per source of a spec (weights ignored). Keys are `(label, serialized
    record or None)`: labels `file#record` (TFRecord), the image path (CSV) or
    `tfds:name:split#index`; TFRecord records come along so that a bad one can be named."""
    for source in readers.parse_spec(spec):
        if source.kind == "tfrecord":
            files = readers.tfrecord_files(source.path)
            keys = ((f"{files[f]}#{r}", s) for f, r, s in _tfrecord_records(files))
            yield source.path, _tfrecord_images(files), keys
        elif source.kind == "csv":
            rows = readers.read_csv_rows(source.path, csv_image_column, [])
            paths = [row["image"] for row in rows]
            missing = [p for p in paths if not p or not tf.io.gfile.exists(p)]
            if missing:
                raise FileNotFoundError(f"{source.path}: {len(missing)} image file(s) not found, e.g. {missing[:3]}")
            images = tf.data.Dataset.from_tensor_slices(tf.constant(paths, tf.string)).map(tf.io.read_file)
            yield source.path, images, ((p, None) for p in paths)
        else:  # tfds, through the pipeline's reader
            config = pipeline.default_config()
            config.captions, config.tfds_data_dir, config.tfds_image_key = {}, tfds_data_dir, tfds_image_key
            name = f"tfds:{source.path}:{source.split}"
            records = pipeline.read_records(name, config, train=False, seed=0, process_index=0, process_count=1)
            images = records.map(lambda r: r["image"])
            yield name, images, ((f"{name}#{i}", None) for i, _ in enumerate(images.as_numpy_iterator()))


class EvalImages(NamedTuple):
    hashes: np.ndarray  # [E, V] uint64, V windows per image
    features: np.ndarray  # [E, V, 63] float16 (half the memory; similarities need ~3 digits)
    labels: list[str]  # of the E decoded images
    undecodable: list[str]  # labels of the images that could not be decoded


def hash_eval_images(
    specs: Sequence[str],
    windows: Sequence[tuple[float, float, float]] = EVAL_WINDOWS,
    tfds_data_dir: str = "",
    tfds_image_key: str = "image",
    csv_image_column: str = "image",
) -> EvalImages:
    """Hashes every image of the evaluation specs over `windows`. Labels are `file#record`
    (TFRecord), the image path (CSV) or `tfds:name:split#index`."""
    hashes, features, labels, undecodable = [], [], [], []
    for spec in specs:
        for name, images, keys in _eval_sources(spec, tfds_data_dir, tfds_image_key, csv_image_column):
            count = len(labels) + len(undecodable)
            for batch in _hash_batches(images, keys, windows):
                for (label, serialized), ok in zip(batch.keys, batch.decoded, strict=True):
                    if not ok and serialized is not None and (problem := _record_problem(serialized)):
                        raise ValueError(f"{label} {problem}")
                    (labels if ok else undecodable).append(label)
                hashes.append(batch.hashes[batch.decoded])
                features.append(batch.features[batch.decoded].astype(np.float16))
            if len(labels) + len(undecodable) == count:
                raise ValueError(f"evaluation source {name} has no records")
    if not labels:
        raise ValueError(f"none of the {len(undecodable)} evaluation images in {list(specs)} could be decoded")
    return EvalImages(np.concatenate(hashes), np.concatenate(features), labels, undecodable)


def train_shards(pattern: str) -> list[str]:
    """The shard files of `--train` (a glob, with or without `tfrecord:`)."""
    return readers.tfrecord_files(pattern.removeprefix("tfrecord:"))


# --- the pass ----------------------------------------------------------------------------------


class _Checked(NamedTuple):
    """A training record and what the search found for it."""

    shard: int
    record: int
    serialized: bytes
    decoded: bool
    position: int  # in the evaluation index, -1: no match
    distance: int
    similarity: float
    candidate: bool  # some evaluation hash was within the threshold


def _checked_records(
    shards: Sequence[str], eval_images: EvalImages, index: HashIndex, threshold: int, min_similarity: float
) -> Iterator[_Checked]:
    """Every record of the shards, in order, with its best evaluation match (one pipeline)."""
    index_features = eval_images.features.reshape(-1, eval_images.features.shape[-1])
    for batch in _hash_batches(_tfrecord_images(shards), _tfrecord_records(shards), WHOLE_IMAGE):
        found = best_matches(index, index_features, batch.hashes[:, 0], batch.features[:, 0], threshold, min_similarity)
        for i, (shard, record, serialized) in enumerate(batch.keys):
            yield _Checked(
                shard,
                record,
                serialized,
                bool(batch.decoded[i]),
                int(found.position[i]),
                int(found.distance[i]),
                float(found.similarity[i]),
                bool(found.candidate[i]),
            )


def _write_shard(
    shard: str, output: str, records: Iterable[_Checked], eval_images: EvalImages, log
) -> tuple[dict, set[int]]:
    """Writes the unmatched `records` of `shard` to `output`; logs every drop and undecodable image
    as a JSON line (`log(kind, entry)`). Returns the counts and the evaluation images matched."""
    counts = dict(read=0, kept=0, dropped=0, undecodable=0, below_similarity=0)
    matched = set()
    windows = eval_images.hashes.shape[1]
    temporary = output + ".incomplete"  # renamed when complete: no half-written shard under the real name
    try:
        with tf.io.TFRecordWriter(temporary) as writer:
            for r in records:
                counts["read"] += 1
                if not r.decoded:
                    if problem := _record_problem(r.serialized):
                        raise ValueError(f"{shard}#{r.record} {problem}")
                    counts["undecodable"] += 1
                    log("undecodable", dict(split="train", shard=shard, record=r.record))
                elif r.position >= 0:
                    counts["dropped"] += 1
                    matched.add(r.position // windows)
                    match = dict(shard=shard, record=r.record, eval=eval_images.labels[r.position // windows])
                    log("duplicates", dict(match, distance=r.distance, similarity=round(r.similarity, 4)))
                    continue
                elif r.candidate:
                    counts["below_similarity"] += 1
                writer.write(r.serialized)
                counts["kept"] += 1
        tf.io.gfile.rename(temporary, output, overwrite=True)
    finally:
        if tf.io.gfile.exists(temporary):
            tf.io.gfile.remove(temporary)
    return counts, matched


def dedup_shards(
    eval_specs: Sequence[str],
    train_pattern: str,
    out_dir: str,
    threshold: int = DEFAULT_THRESHOLD,
    min_similarity: float = DEFAULT_MIN_SIMILARITY,
    tfds_data_dir: str = "",
    tfds_image_key: str = "image",
    csv_image_column: str = "image",
) -> dict:
    """Writes the training shards without the near-duplicates of evaluation images into `out_dir`
    (same file names, same records in the same order, byte for byte) with `report.json`,
    `duplicates.jsonl` and `undecodable.jsonl`; returns the report."""
    if not eval_specs:
        raise ValueError("no evaluation data: give at least one --eval SPEC")
    _check_threshold(threshold)
    if not -1.0 <= min_similarity <= 1.0:
        raise ValueError(f"min_similarity is a cosine similarity, in [-1, 1]; got {min_similarity}")
    shards = train_shards(train_pattern)
    outputs = [os.path.join(out_dir, os.path.basename(shard)) for shard in shards]
    if len(set(outputs)) != len(outputs):
        raise ValueError(f"{train_pattern!r} matches shards with the same file name in different folders")
    clash = [s for s in shards if os.path.abspath(os.path.dirname(s)) == os.path.abspath(out_dir)]
    if clash:
        raise ValueError(f"--out_dir {out_dir} holds the input shards ({clash[0]}); filtered shards would replace them")

    eval_images = hash_eval_images(eval_specs, EVAL_WINDOWS, tfds_data_dir, tfds_image_key, csv_image_column)
    index = HashIndex(eval_images.hashes)
    print(
        f"dedup: {len(eval_images.labels)} evaluation images hashed, {len(eval_images.undecodable)} undecodable",
        file=sys.stderr,
    )
    tf.io.gfile.makedirs(out_dir)
    paths = {kind: os.path.join(out_dir, f"{kind}.jsonl") for kind in ("duplicates", "undecodable")}
    files = {kind: tf.io.gfile.GFile(path, "w") for kind, path in paths.items()}
    for f in files.values():
        f.write("")  # GFile creates the file only on a write: an empty list is still a file
    log = lambda kind, entry: files[kind].write(json.dumps(entry) + "\n")
    per_shard, matched = [], set()
    try:
        for label in eval_images.undecodable:
            log("undecodable", dict(split="eval", image=label))
        by_shard = itertools.groupby(
            _checked_records(shards, eval_images, index, threshold, min_similarity), key=lambda r: r.shard
        )
        group = next(by_shard, None)
        for number, (shard, output) in enumerate(zip(shards, outputs, strict=True)):
            has_records = group is not None and group[0] == number  # else an empty shard
            counts, hit = _write_shard(shard, output, group[1] if has_records else (), eval_images, log)
            matched |= hit
            if has_records:
                group = next(by_shard, None)
            per_shard.append(dict(input=shard, output=output, **counts))
            print(f"dedup: {shard}: {json.dumps(counts)}", file=sys.stderr)
    finally:
        for f in files.values():
            f.close()

    total = {key: sum(s[key] for s in per_shard) for key in per_shard[0] if key not in ("input", "output")}
    report = dict(
        threshold=threshold,
        min_similarity=min_similarity,
        eval_images=len(eval_images.labels),
        eval_undecodable=len(eval_images.undecodable),
        eval_windows=eval_images.hashes.shape[1],
        eval_images_matched=len(matched),
        records_read=total["read"],
        records_kept=total["kept"],
        duplicates_dropped=total["dropped"],
        undecodable_kept=total["undecodable"],
        kept_below_similarity=total["below_similarity"],
        shards=per_shard,
        duplicates_file=paths["duplicates"],
        undecodable_file=paths["undecodable"],
    )
    with tf.io.gfile.GFile(os.path.join(out_dir, "report.json"), "w") as f:
        f.write(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval", action="append", default=[], help="evaluation source spec (repeatable)")
    parser.add_argument("--train", required=True, help="training shards: a TFRecord glob (tfrecord: optional)")
    parser.add_argument("--out_dir", required=True, help="where the filtered shards and the report go")
    parser.add_argument("--threshold", type=int, default=DEFAULT_THRESHOLD, help="candidates: max Hamming distance")
    parser.add_argument(
        "--min_similarity", type=float, default=DEFAULT_MIN_SIMILARITY, help="a candidate matches from this similarity"
    )
    parser.add_argument("--tfds_data_dir", default="")
    parser.add_argument("--tfds_image_key", default="image")
    parser.add_argument("--csv_image_column", default="image")
    args = parser.parse_args(argv)
    try:
        report = dedup_shards(
            args.eval,
            args.train,
            args.out_dir,
            args.threshold,
            args.min_similarity,
            args.tfds_data_dir,
            args.tfds_image_key,
            args.csv_image_column,
        )
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"dedup: {e}") from None
    print(json.dumps({k: v for k, v in report.items() if k != "shards"}))


if __name__ == "__main__":
    main()
