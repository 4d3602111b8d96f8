"""The host input pipeline: source -> per-process share -> shuffle -> filter -> decode ->
augment -> caption choice (or, for retrieval evaluation, every caption) -> batch -> tokenize ->
global array on the mesh.

Bad examples never stop training: a check or a decode that fails drops the example, and every
drop is counted by reason (`filters.SKIP_REASONS`; failures that raise inside tf.data are found
as gaps in the running example index). Each batch carries the process's cumulative counts under
`skipped`; a finite (evaluation) pass ends with a marker record, so its last batch carries the
counts of the whole pass (that batch may hold no examples). All randomness (shuffles, crops,
flips, caption choice) is seeded, so batches are reproducible, and the iterator's position can be
saved and restored exactly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from align_jax.input import filters, image_ops, readers
from align_jax.input.text_ops import Tokenizer
from align_jax.sharding import batch_sharding

MODEL_INPUTS = ("images", "input_ids", "attention_mask")
# Caption checks run on blocks of this many examples: one pass of string ops per block instead
# of per example (tf.data's per-op cost dominates such small ops).
_CHECK_BLOCK = 256
_UNDECODABLE = filters.REASON_CODE["undecodable_image"] - 1


def default_config() -> ml_collections.ConfigDict:
    """The `data` section of a training config."""
    return ml_collections.ConfigDict(
        dict(
            train="",  # source spec, e.g. "tfrecord:/data/shards-*.tfrecord"
            eval="",
            vocab="",  # WordPiece vocab file; the text tower's vocab size follows it
            lower_case=True,
            captions={"txt": 1.0},  # caption field -> sampling weight (VeCap-style mixing)
            label_field="label",  # the integer class field that the classification task trains on
            csv_image_column="image",
            tfds_data_dir="",
            tfds_image_key="image",
            resize_size=0,  # training resize before the random crop; 0: 346/289 of image_size
            random_flip=True,  # ALIGN flips; turn off when captions name left and right
            # Input streams making up the global batch, each reading 1/num_readers of the data;
            # every process runs num_readers / process_count of them. 0: one per process. Fixing
            # it makes the batches (and a checkpoint's data position) independent of how many
            # processes run: a 64-host run resumes on 32 hosts, or on one, at the same example.
            num_readers=0,
            shuffle_buffer=10_000,
            num_parallel_calls=-1,  # -1: tf.data AUTOTUNE
            prefetch=2,
            filters=filters.default_config(),
        )
    )


def _parallel(config) -> int:
    return tf.data.AUTOTUNE if config.num_parallel_calls in (-1, None) else int(config.num_parallel_calls)


def _tfrecord_source(
    source, fields, train, seed, process_index, process_count, config, int_fields=()
) -> tf.data.Dataset:
    files = readers.tfrecord_files(source.path)
    if len(files) >= process_count:  # by file: each process opens only its own shards
        files = files[process_index::process_count]
        ds = tf.data.Dataset.from_tensor_slices(files)
        if train:
            ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True).repeat()
        ds = ds.interleave(
            tf.data.TFRecordDataset,
            cycle_length=min(16, len(files)),
            num_parallel_calls=_parallel(config),
            deterministic=True,
        )
    else:  # by example
        ds = tf.data.TFRecordDataset(files).shard(process_count, process_index)
        if train:
            ds = ds.repeat()
    return ds.map(lambda s: readers.parse_example(s, fields, int_fields), num_parallel_calls=_parallel(config))


def _csv_source(source, fields, train, seed, process_index, process_count, config, int_fields=()) -> tf.data.Dataset:
    rows = readers.read_csv_rows(source.path, config.csv_image_column, [*fields, *int_fields])
    if not rows:
        raise ValueError(f"CSV file {source.path} has no rows")
    columns = {key: [row[key] for row in rows] for key in ("image", *fields, *int_fields)}
    ds = tf.data.Dataset.from_tensor_slices(columns).shard(process_count, process_index)
    if train:
        ds = ds.repeat()

    def read(row):
        # A missing or unreadable image file (or a non-integer label) raises here and is counted
        # as undecodable.
        ints = {f: tf.strings.to_number(row[f], tf.int64) for f in int_fields}
        return {**row, **ints, "image": tf.io.read_file(row["image"])}

    return ds.map(read, num_parallel_calls=_parallel(config))


def _tfds_source(source, fields, train, seed, process_index, process_count, config, int_fields=()) -> tf.data.Dataset:
    builder = tfds.builder(source.path, data_dir=config.tfds_data_dir or None)
    split = tfds.split_for_jax_process(source.split, process_index=process_index, process_count=process_count)
    image_key = config.tfds_image_key
    ds = builder.as_dataset(
        split=split,
        decoders={image_key: tfds.decode.SkipDecoding()},
        shuffle_files=train,
        read_config=tfds.ReadConfig(shuffle_seed=seed),
    )
    missing = [k for k in (image_key, *fields, *int_fields) if k not in builder.info.features]
    if missing:
        raise ValueError(
            f"TFDS dataset {source.path!r} has no feature(s) {missing}; it has {list(builder.info.features)}"
        )
    if train:
        ds = ds.repeat()
    return ds.map(
        lambda ex: {
            "image": ex[image_key],
            **{f: tf.cast(ex[f], tf.string) for f in fields},
            **{f: tf.cast(ex[f], tf.int64) for f in int_fields},
        }
    )


_SOURCES = {"tfrecord": _tfrecord_source, "csv": _csv_source, "tfds": _tfds_source}


def read_records(
    spec: str,
    config: ml_collections.ConfigDict,
    train: bool,
    seed: int,
    process_index: int,
    process_count: int,
    int_fields: Sequence[str] = (),
) -> tf.data.Dataset:
    """Records `{'image': bytes, field: text, int field: int64}` of this process's share, mixed
    by weight."""
    fields = list(config.captions)
    sources = readers.parse_spec(spec)
    datasets = [
        _SOURCES[s.kind](s, fields, train, seed + i, process_index, process_count, config, tuple(int_fields))
        for i, s in enumerate(sources)
    ]
    if len(datasets) == 1:
        return datasets[0]
    weights = [s.weight / sum(x.weight for x in sources) for s in sources]
    return tf.data.Dataset.sample_from_datasets(datasets, weights, seed=seed, stop_on_empty_dataset=False)


def _block_tables(config) -> tuple[tf.lookup.StaticHashTable | None, tf.lookup.StaticHashTable | None]:
    """Image fingerprints and texts (web-safe base64) to drop, from `align_jax.tools.filter_shards`."""
    if not config.block_list:
        return None, None
    tables = []
    for name, dtype in (("blocked_images.txt", tf.int64), ("blocked_texts.txt", tf.string)):
        path = os.path.join(config.block_list, name)
        if not tf.io.gfile.exists(path):
            raise FileNotFoundError(f"block list file not found: {path}")
        with tf.io.gfile.GFile(path, "rb") as f:
            lines = [line.rstrip(b"\n") for line in f if line.strip()]
        try:
            keys = [int(x) for x in lines] if dtype == tf.int64 else lines
        except ValueError:
            raise ValueError(f"{path}: expected one integer image fingerprint a line") from None
        if not keys:
            tables.append(None)
            continue
        tables.append(
            tf.lookup.StaticHashTable(
                tf.lookup.KeyValueTensorInitializer(tf.constant(keys, dtype), tf.ones(len(keys), tf.int32)), 0
            )
        )
    return tables[0], tables[1]


def image_fingerprint(image_bytes: tf.Tensor) -> tf.Tensor:
    """64-bit content hash of the encoded image (the offline filters key images by it)."""
    return tf.strings.to_hash_bucket_fast(image_bytes, 2**63 - 1)


def _caption_codes(examples, fields, config, blocked_texts) -> tf.Tensor:
    """A reason code per example and caption field, int32 `[n, fields]` (0: the caption is usable)."""
    codes = []
    for field in fields:
        code = filters.caption_reason(examples[field], field in config.filters.word_filter_fields, config.filters)
        if blocked_texts is not None:
            blocked = blocked_texts.lookup(tf.io.encode_base64(examples[field])) > 0
            code = tf.where((code == 0) & blocked, filters.REASON_CODE["blocked_text"], code)
        codes.append(code)
    return tf.stack(codes, axis=1)


def _example_reasons(codes: tf.Tensor) -> tf.Tensor:
    """An example with no usable caption is dropped for its first field's reason."""
    return tf.where(tf.reduce_any(codes == 0, axis=1), 0, codes[:, 0])


def _caption_choice(examples, fields, weights, config, blocked_texts, seed):
    """For a batch of examples: one valid caption per example drawn by weight (fresh on every
    use: the draw is keyed by the running index), and the example's reason code."""
    codes = _caption_codes(examples, fields, config, blocked_texts)
    valid = tf.cast(codes == 0, tf.float32)
    usable = tf.reduce_any(valid > 0, axis=1)
    # With nothing usable any draw will do (the example is dropped).
    probs = tf.constant(weights, tf.float32) * tf.where(usable[:, None], valid, tf.ones_like(valid))
    cumulative = tf.math.cumsum(probs, axis=1) / tf.reduce_sum(probs, axis=1, keepdims=True)
    draw_seed = tf.stack([tf.cast(seed, tf.int64), examples["index"][0]])
    u = tf.random.stateless_uniform(tf.shape(usable), draw_seed)
    choice = tf.minimum(tf.reduce_sum(tf.cast(cumulative <= u[:, None], tf.int32), axis=1), len(fields) - 1)
    captions = tf.gather(tf.stack([examples[f] for f in fields], axis=1), choice, batch_dims=1)
    return captions, _example_reasons(codes)


def _count(state, element, num_reasons):
    """Running counts: the element's own reason, plus any indices missing since the last element
    (examples whose processing raised)."""
    next_index, counts = state
    lost = element["index"] - next_index
    update = tf.one_hot(element["reason"] - 1, num_reasons, dtype=tf.int64)  # reason 0 -> zeros
    update += tf.one_hot(_UNDECODABLE, num_reasons, dtype=tf.int64) * lost
    counts = counts + update
    return (element["index"] + 1, counts), {**element, "skipped": counts}


def make_dataset(
    spec: str,
    config: ml_collections.ConfigDict,
    *,
    image_size: int,
    max_text_length: int,
    batch_size: int,
    train: bool,
    seed: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    all_captions: bool = False,
    label_field: str | None = None,
) -> tf.data.Dataset:
    """Batches of this process's share: `images` uint8 `[b, S, S, 3]` (the model scales them to
    [-1, 1] on the device), `input_ids` and `attention_mask` int32 `[b, L]`, `skipped` int64
    `[len(SKIP_REASONS)]` (cumulative).

    With `all_captions` (evaluation only: retrieval scores every caption of an image), no caption
    is drawn: `input_ids` and `attention_mask` are `[b, F, L]` for the F fields of
    `config.captions` in order, and `caption_valid` bool `[b, F]` marks the captions that pass
    the caption filters (the others are tokenized as empty text). An example is kept when its
    image passes and at least one caption is valid.

    With `label_field` (an integer field, e.g. a class for classification evaluation) batches
    also hold `labels` int64 `[b]` (`readers.MISSING_INT` where a record has none); with it,
    `config.captions` may be empty: then no text is checked or tokenized and batches hold no
    `input_ids` / `attention_mask`."""
    if all_captions and train:
        raise ValueError("all_captions=True is for evaluation; it needs train=False")
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    fields = list(config.captions)
    weights = [float(config.captions[f]) for f in fields]
    if (fields or not label_field) and (not fields or min(weights) < 0 or sum(weights) <= 0):
        raise ValueError(f"data.captions needs at least one field with a positive weight, got {dict(config.captions)}")
    int_fields = (label_field,) if label_field else ()
    tokenizer = Tokenizer(config.vocab, max_text_length, config.lower_case) if fields else None
    resize_size = config.resize_size or image_ops.eval_resize_size(image_size)
    blocked_images, blocked_texts = _block_tables(config.filters)
    num_reasons = len(filters.SKIP_REASONS)
    parallel = _parallel(config)

    ds = read_records(spec, config, train, seed, process_index, process_count, int_fields)
    ds = ds.map(lambda r: {**r, "end_marker": tf.constant(False)})
    if train:
        ds = ds.shuffle(config.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    else:  # carries the final counts through every stage into the last batch, then is removed
        marker_image = tf.io.encode_png(tf.zeros((1, 1, 3), tf.uint8))
        marker = {
            "image": marker_image,
            **{f: "" for f in fields},
            **{f: tf.constant(readers.MISSING_INT, tf.int64) for f in int_fields},
            "end_marker": True,
        }
        ds = ds.concatenate(tf.data.Dataset.from_tensors(marker))
    ds = ds.enumerate()

    def check_captions(examples):
        """Caption filters, then the caption draw (or every caption with its validity), vectorised
        over a block of examples."""
        out = dict(index=examples["index"], image=examples["image"], end_marker=examples["end_marker"])
        out.update({f: examples[f] for f in int_fields})
        if not fields:  # images and labels only
            out["caption_reason"] = tf.zeros_like(examples["index"], tf.int32)
            return out
        if not all_captions:
            out["caption"], out["caption_reason"] = _caption_choice(
                examples, fields, weights, config, blocked_texts, seed
            )
            return out
        codes = _caption_codes(examples, fields, config, blocked_texts)
        valid = codes == 0
        # A failed caption (possibly invalid UTF-8) must never reach the tokenizer.
        out["caption"] = tf.where(valid, tf.stack([examples[f] for f in fields], axis=1), "")
        out["caption_valid"] = valid
        out["caption_reason"] = _example_reasons(codes)
        return out

    ds = ds.map(lambda index, example: {**example, "index": index})
    ds = ds.batch(_CHECK_BLOCK).map(check_captions, num_parallel_calls=parallel, deterministic=True).unbatch()

    def check_and_decode(example):
        """Image filters from the header; only a kept example is decoded. An image that fails to
        parse or decode raises, and the example is dropped (and counted by the scan below)."""
        index = example["index"]
        height_width = image_ops.image_size_from_header(example["image"])
        reason = filters.image_reason(height_width, config.filters)
        if blocked_images is not None:
            blocked = blocked_images.lookup(image_fingerprint(example["image"])) > 0
            reason = tf.where((reason == 0) & blocked, filters.REASON_CODE["blocked_image"], reason)
        reason = tf.where(reason == 0, example["caption_reason"], reason)
        reason = tf.where(example["end_marker"], 0, reason)

        def decode():
            if train:
                crop_seed = tf.stack([tf.cast(seed, tf.int64), index])
                return image_ops.decode_random_crop(
                    example["image"], image_size, resize_size, crop_seed, height_width, config.random_flip
                )
            return image_ops.resize_and_center_crop(image_ops.decode_rgb(example["image"]), image_size)

        image = tf.cond(reason == 0, decode, lambda: tf.zeros((image_size, image_size, 3), tf.uint8))
        out = dict(index=index, images=image, reason=reason)
        carried = ("caption", "caption_valid", "end_marker", *int_fields)
        return dict(out, **{k: example[k] for k in carried if k in example})

    ds = ds.map(check_and_decode, num_parallel_calls=parallel, deterministic=True).ignore_errors()
    init = (tf.constant(0, tf.int64), tf.zeros([num_reasons], tf.int64))
    ds = ds.scan(init, lambda s, e: _count(s, e, num_reasons))
    ds = ds.filter(lambda e: e["reason"] == 0)

    def finish(batch):
        skipped = batch["skipped"][-1]
        out = dict(images=batch["images"])
        if label_field:
            out["labels"] = batch[label_field]
        if not fields:
            pass
        elif not all_captions:
            out["input_ids"], out["attention_mask"] = tokenizer.tokenize(batch["caption"])
        else:
            ids, mask = tokenizer.tokenize(tf.reshape(batch["caption"], [-1]))  # [b * F]
            shape = [-1, len(fields), max_text_length]
            out.update(input_ids=tf.reshape(ids, shape), attention_mask=tf.reshape(mask, shape))
            out["caption_valid"] = batch["caption_valid"]
        if not train:
            keep = tf.logical_not(batch["end_marker"])
            out = {k: tf.boolean_mask(v, keep) for k, v in out.items()}
        return dict(out, skipped=skipped)

    ds = ds.batch(batch_size, drop_remainder=train, num_parallel_calls=parallel, deterministic=True)
    ds = ds.map(finish, num_parallel_calls=parallel, deterministic=True)
    options = tf.data.Options()
    options.deterministic = True
    # Image decoding carries assertion ops that tf.data marks as state; they hold none that a
    # saved iterator would need, so saving the position ignores them.
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    return ds.with_options(options).prefetch(config.prefetch)


def resolve_num_readers(config: ml_collections.ConfigDict, batch_size: int, process_count: int | None = None) -> int:
    """`config.num_readers` (0: one per process), checked against the processes and the batch."""
    process_count = jax.process_count() if process_count is None else process_count
    num_readers = config.get("num_readers", 0) or process_count
    if not isinstance(num_readers, int) or num_readers < 1 or num_readers % process_count:
        raise ValueError(
            f"data.num_readers {num_readers!r} is not a positive multiple of the {process_count} processes"
        )
    if batch_size % num_readers:
        raise ValueError(f"batch_size {batch_size} is not divisible by data.num_readers {num_readers}")
    return num_readers


def local_readers(num_readers: int, process_index: int | None = None, process_count: int | None = None) -> range:
    """The reader indices this process runs: a contiguous block, so the global batch is the
    readers' batches in reader order, whatever the number of processes."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if num_readers % process_count:
        raise ValueError(f"data.num_readers {num_readers} is not divisible by the {process_count} processes")
    per_process = num_readers // process_count
    return range(process_index * per_process, (process_index + 1) * per_process)


def make_reader_datasets(
    spec: str, config: ml_collections.ConfigDict, *, batch_size: int, **kwargs
) -> dict[int, tf.data.Dataset]:
    """This process's readers of the global batch `batch_size` (`config.num_readers`, see
    `default_config`): reader r reads share r of num_readers and yields batch_size / num_readers
    rows. `kwargs` go to `make_dataset`."""
    num_readers = resolve_num_readers(config, batch_size)
    return {
        r: make_dataset(
            spec, config, batch_size=batch_size // num_readers, process_index=r, process_count=num_readers, **kwargs
        )
        for r in local_readers(num_readers)
    }


class DataIterator:
    """NumPy batches from one or several readers (concatenated in reader order, skip counts
    summed), with a position that can be saved and restored exactly, reader by reader.
    `num_readers`, the readers of the whole run (all processes), lets `restore` refuse positions
    saved with another number of readers: those are shares of other data."""

    def __init__(self, datasets: tf.data.Dataset | dict[int, tf.data.Dataset], num_readers: int | None = None):
        if isinstance(datasets, tf.data.Dataset):
            datasets = {jax.process_index(): datasets}
        self.num_readers = num_readers
        self._iterators = {r: iter(ds) for r, ds in sorted(datasets.items())}
        self._checkpoints = {r: tf.train.Checkpoint(iterator=it) for r, it in self._iterators.items()}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batches = [{k: v.numpy() for k, v in next(it).items()} for it in self._iterators.values()]
        if len(batches) == 1:
            return batches[0]
        return {
            k: sum(b[k] for b in batches) if k == "skipped" else np.concatenate([b[k] for b in batches])
            for k in batches[0]
        }

    def save(self, directory: str) -> list[str]:
        """Writes each reader's position (shuffle buffers included) as `directory/reader_<r>`."""
        return [c.write(os.path.join(directory, f"reader_{r}")) for r, c in self._checkpoints.items()]

    def restore(self, directory: str) -> None:
        saved = sorted(f.split(".")[0] for f in tf.io.gfile.listdir(directory) if f.endswith(".index"))
        # Checkpoints from before readers hold one position per process (`process_<i>`): process i
        # read share i of the process count, i.e. reader i.
        kind = "reader" if any(name.startswith("reader_") for name in saved) else "process"
        count = sum(name.startswith(f"{kind}_") for name in saved)
        for r, checkpoint in self._checkpoints.items():
            prefix = os.path.join(directory, f"{kind}_{r}")
            if (self.num_readers is not None and count != self.num_readers) or not tf.io.gfile.exists(
                prefix + ".index"
            ):
                raise FileNotFoundError(
                    f"{directory} holds the input positions {saved}, not those of reader {r} of "
                    f"{self.num_readers or '?'}: the checkpoint was written with data.num_readers={count}; set it "
                    "so (it divides by the process count), or restore the model alone and start a fresh data pass"
                )
            checkpoint.read(prefix).assert_consumed()


def skip_counts(batch: dict) -> dict[str, int]:
    return {name: int(n) for name, n in zip(filters.SKIP_REASONS, batch["skipped"], strict=True)}


def to_global_batch(batch: dict, mesh: jax.sharding.Mesh, keys: Sequence[str] = MODEL_INPUTS) -> dict:
    """This process's rows -> global arrays sharded over the mesh's data axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k])) for k in keys}
