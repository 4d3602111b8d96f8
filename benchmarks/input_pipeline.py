"""Host input pipeline rate against decoding alone, on the same JPEG TFRecords.

    python benchmarks/input_pipeline.py [--images 512] [--height 480 --width 640] [--seconds 20]

Writes JPEG TFRecords of demo scenes at web-photo size, then measures images/s of (a) decoding
only (TFRecord -> parse -> decode JPEG to RGB) and (b) the full training pipeline at 289 px
(decode, header filters, caption choice, resize 346 + random crop 289 + flip, value range,
tokenize to 64 tokens, batching), each with all host cores, alternating (a) and (b). Rates are
divided by the core count. Prints one JSON line last; rewrites its section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--seconds", type=float, default=15.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--no_write", action="store_true")
    args = parser.parse_args()
    common.emulate_devices(1)

    import numpy as np
    import tensorflow as tf

    from align_jax.input import demo_data, pipeline, readers

    cores = os.cpu_count() or 1
    directory = tempfile.mkdtemp(prefix="align_input_bench_")
    rng = np.random.default_rng(0)
    records = []
    for _ in range(args.images):
        scene, attributes = demo_data.make_scene(rng, 128)
        image = tf.image.resize(scene, (args.height, args.width)).numpy()
        image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
        jpeg = tf.io.encode_jpeg(image, quality=90).numpy()
        texts = dict(txt=demo_data.alt_text(attributes, rng), vecap=demo_data.rich_caption(attributes))
        records.append(readers.encode_example(jpeg, texts))
    readers.write_tfrecords(records, directory, 8)
    vocab = os.path.join(directory, "vocab.txt")
    Path(vocab).write_text("".join(t + "\n" for t in demo_data.vocab_tokens()))
    spec = f"tfrecord:{directory}/data-*.tfrecord"

    def decode_only():
        files = readers.tfrecord_files(spec.split(":", 1)[1])
        ds = tf.data.TFRecordDataset(files).repeat()
        ds = ds.map(lambda s: readers.parse_example(s, ["txt"]), num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.map(lambda r: tf.io.decode_jpeg(r["image"], channels=3), num_parallel_calls=tf.data.AUTOTUNE)
        return ds.batch(args.batch_size).prefetch(2)

    def full():
        config = pipeline.default_config()
        config.update(vocab=vocab, captions={"txt": 0.5, "vecap": 0.5}, shuffle_buffer=1024)
        return pipeline.make_dataset(
            spec,
            config,
            image_size=289,
            max_text_length=64,
            batch_size=args.batch_size,
            train=True,
            process_index=0,
            process_count=1,
        )

    def rate(make) -> tuple[float, float]:
        """(images per wall second, images per CPU-second of this process)."""
        iterator = iter(make())
        for _ in range(3):  # warm up: fill buffers, autotune
            next(iterator)
        count, start, cpu_start = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - start < args.seconds:
            batch = next(iterator)
            count += int((batch["images"] if isinstance(batch, dict) else batch).shape[0])
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        del iterator
        gc.collect()
        return count / wall, count / cpu

    rates = {"decode": [], "pipeline": []}
    for _ in range(args.rounds):
        for name, make in (("decode", decode_only), ("pipeline", full)):
            rates[name].append(rate(make))
        print({k: v[-1] for k, v in rates.items()}, file=sys.stderr, flush=True)
    # Per core: images per CPU-second the process used (immune to idle time and to other load
    # on the host); the wall-clock rates over all cores are reported alongside.
    decode = statistics.median(r[1] for r in rates["decode"])
    full_rate = statistics.median(r[1] for r in rates["pipeline"])
    # The host's speed drifts between rounds; each round's pair ran back to back, so the median
    # of the per-round ratios is the fair comparison.
    paired = statistics.median(p[1] / d[1] for d, p in zip(rates["decode"], rates["pipeline"], strict=True))
    result = dict(
        benchmark="input_pipeline",
        machine=common.machine(),
        cores=cores,
        source_image=f"{args.height}x{args.width} JPEG q90",
        pipeline_img_s_per_core=round(full_rate, 1),
        decode_img_s_per_core=round(decode, 1),
        ratio=round(paired, 3),
        pipeline_img_s_wall=round(statistics.median(r[0] for r in rates["pipeline"]), 1),
        decode_img_s_wall=round(statistics.median(r[0] for r in rates["decode"]), 1),
    )
    if not args.no_write:
        common.write_section(
            "Input pipeline (input_pipeline.py)",
            f"`python benchmarks/input_pipeline.py` on {result['machine']}: {args.images} {result['source_image']} "
            f"images in 8 TFRecord shards; medians of {args.rounds} alternating rounds of {args.seconds:g} s. "
            "Per core = images per CPU-second used by the process; wall = images per second on all "
            f"{cores} cores; ratio = median over rounds of pipeline / decode (each pair ran back to back).\n\n"
            "| full pipeline img/s/core | decode-only img/s/core | ratio | full img/s (wall) | decode img/s (wall) |\n"
            "|---|---|---|---|---|\n"
            f"| {result['pipeline_img_s_per_core']} | {result['decode_img_s_per_core']} | {result['ratio']} "
            f"| {result['pipeline_img_s_wall']} | {result['decode_img_s_wall']} |",
        )
    common.print_json(result)


if __name__ == "__main__":
    main()
