"""The embedded demo dataset: rendered scenes of coloured shapes with two captions each.

Nothing is downloaded. Every image holds one or two shapes (shape, colour, size, position) on a
coloured background; `vecap` is a rich, complete description (a "rewritten" caption, as VeCap
makes) and `txt` a noisy alt-text (some attributes only, shuffled, web junk such as "stock
photo" or file names). A small model learns the pairing on CPU in minutes. `label` (the first
shape and its colour) serves classification probes. A composed-query split pairs scenes with a
text asking for one change ("on a black background") and the changed scene, for image+text
query retrieval.

    python -m align_jax.input.demo_data --output /tmp/align_demo_data
"""

from __future__ import annotations

import argparse
import os
import string

import numpy as np
import tensorflow as tf

from align_jax.input.readers import encode_example, write_tfrecords
from align_jax.input.text_ops import SPECIAL_TOKENS

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {"white": (245, 245, 245), "gray": (150, 150, 150), "black": (25, 25, 25)}
SIZES = {"small": 0.13, "large": 0.22}
JUNK = ("stock photo", "img", "jpg", "download", "free", "hd wallpaper", "photo", "picture", "image", "1920x1080")
CONNECTIVES = "a an and on the of with left right top bottom background next to in".split()


def _shape_mask(shape: str, cy: float, cx: float, radius: float, size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dy, dx = y - cy, x - cx
    if shape == "circle":
        return dy**2 + dx**2 <= radius**2
    if shape == "square":
        return (np.abs(dy) <= radius * 0.85) & (np.abs(dx) <= radius * 0.85)
    if shape == "triangle":
        return (dy <= radius * 0.8) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) * 0.6)
    return (
        ((np.abs(dy) <= radius * 0.3) | (np.abs(dx) <= radius * 0.3)) & (np.abs(dy) <= radius) & (np.abs(dx) <= radius)
    )


def draw_scene(rng: np.random.Generator) -> dict:
    """Random scene attributes: a background and one or two objects (shape, colour, size,
    position, and a small jitter of the position, `offset`, as fractions of the image side)."""
    background = str(rng.choice(list(BACKGROUNDS)))
    count = int(rng.integers(1, 3))
    positions = ["left", "right"] if count == 2 else [str(rng.choice(["left", "right", "top", "bottom"]))]
    if count == 2 and rng.random() < 0.5:
        positions = positions[::-1]
    objects = []
    for position in positions:
        shape, color, scale = str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), str(rng.choice(list(SIZES)))
        offset = (float(rng.uniform(-0.05, 0.05)), float(rng.uniform(-0.05, 0.05)))
        objects.append(dict(shape=shape, color=color, size=scale, position=position, offset=offset))
    return dict(background=background, objects=objects)


def render_scene(attributes: dict, rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """The image `[size, size, 3]` uint8 of scene attributes, with fresh sensor noise."""
    image = np.empty((size, size, 3), np.float32)
    image[:] = BACKGROUNDS[attributes["background"]]
    for o in attributes["objects"]:
        cy, cx = {"left": (0.5, 0.27), "right": (0.5, 0.73), "top": (0.27, 0.5), "bottom": (0.73, 0.5)}[o["position"]]
        cy, cx = (cy + o["offset"][0]) * size, (cx + o["offset"][1]) * size
        image[_shape_mask(o["shape"], cy, cx, SIZES[o["size"]] * size, size)] = COLORS[o["color"]]
    image += rng.normal(0, 6, image.shape)  # sensor noise, so JPEG has something to do
    return np.clip(image, 0, 255).astype(np.uint8)


def make_scene(rng: np.random.Generator, size: int = 128) -> tuple[np.ndarray, dict]:
    """One image `[size, size, 3]` uint8 and its attributes."""
    attributes = draw_scene(rng)
    return render_scene(attributes, rng, size), attributes


MODIFICATIONS = ("background", "color", "shape", "size")
NUM_QUERIES = 256  # composed queries in the demo's image+text split
IMAGE_TEXT_SEED_OFFSET = 2  # the split's seed after the training (seed) and held-out (seed + 1) ones


def modify_scene(attributes: dict, rng: np.random.Generator) -> tuple[dict, str]:
    """The scene with one attribute changed, and the text that asks for the change (in the
    captions' words: "on a black background", "blue circle", "red triangle", "large red circle")."""
    out = dict(background=attributes["background"], objects=[dict(o) for o in attributes["objects"]])
    kind = str(rng.choice(MODIFICATIONS))

    def other(current: str, choices) -> str:
        return str(rng.choice([c for c in choices if c != current]))

    if kind == "background":
        out["background"] = other(out["background"], list(BACKGROUNDS))
        return out, f"on a {out['background']} background"
    o = out["objects"][int(rng.integers(len(out["objects"])))]
    if kind == "color":
        o["color"] = other(o["color"], list(COLORS))
    elif kind == "shape":
        o["shape"] = other(o["shape"], SHAPES)
    else:
        o["size"] = other(o["size"], list(SIZES))
    words = [o["size"]] if kind == "size" else []
    return out, " ".join([*words, o["color"], o["shape"]])


def rich_caption(attributes: dict) -> str:
    parts = [f"a {o['size']} {o['color']} {o['shape']} on the {o['position']}" for o in attributes["objects"]]
    return " and ".join(parts) + f", on a {attributes['background']} background"


def alt_text(attributes: dict, rng: np.random.Generator) -> str:
    """Web-like alt-text: some attributes, in any order, with junk around them."""
    words = []
    for o in attributes["objects"]:
        words += [o["color"], o["shape"]] if rng.random() < 0.8 else [o["shape"]]
        if rng.random() < 0.3:
            words.append(o["size"])
    rng.shuffle(words)
    if rng.random() < 0.5:
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(JUNK)))
    if rng.random() < 0.2:
        words.append(f"img_{int(rng.integers(1000, 9999))}.jpg")
    return " ".join(words)


def label(attributes: dict) -> int:
    first = attributes["objects"][0]
    return SHAPES.index(first["shape"]) * len(COLORS) + list(COLORS).index(first["color"])


def class_names() -> list[str]:
    """Names of the `label` classes, in label order ("red circle", ...)."""
    return [f"{color} {shape}" for shape in SHAPES for color in COLORS]


def records(num_examples: int, seed: int, image_size: int = 128) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for index in range(num_examples):
        image, attributes = make_scene(rng, image_size)
        jpeg = tf.io.encode_jpeg(image, quality=90).numpy()
        texts = dict(txt=alt_text(attributes, rng), vecap=rich_caption(attributes), key=f"{seed}-{index:07d}")
        out.append(encode_example(jpeg, texts, dict(label=label(attributes))))
    return out


def image_text_records(num_queries: int, seed: int, image_size: int = 128) -> tuple[list[bytes], list[bytes]]:
    """Composed-query triples: query records (`jpg` a scene, `modifier` the change, `target` the id
    of the changed scene) and gallery records (`jpg`, `id`): the changed scenes (ids 0..N-1) and,
    as distractors that an image-only query would find first, the unchanged ones (ids N..2N-1)."""
    rng = np.random.default_rng(seed)
    queries, targets, references = [], [], []
    for index in range(num_queries):
        attributes = draw_scene(rng)
        reference = tf.io.encode_jpeg(render_scene(attributes, rng, image_size), quality=90).numpy()
        changed, modifier = modify_scene(attributes, rng)
        target = tf.io.encode_jpeg(render_scene(changed, rng, image_size), quality=90).numpy()
        key = f"{seed}-{index:07d}"
        queries.append(encode_example(reference, dict(modifier=modifier, key=key), dict(target=index)))
        targets.append(encode_example(target, dict(key=key), dict(id=index)))
        references.append(encode_example(reference, dict(key=key), dict(id=num_queries + index)))
    return queries, targets + references


def vocab_tokens() -> list[str]:
    """A WordPiece vocab covering the demo captions (every word whole) and any other text
    (single characters and their continuations)."""
    words = set(CONNECTIVES) | set(SHAPES) | set(COLORS) | set(BACKGROUNDS) | set(SIZES)
    words |= {w for junk in JUNK for w in junk.split()}
    chars = list(string.ascii_lowercase + string.digits)
    return (
        list(SPECIAL_TOKENS)
        + ["[MASK]"]
        + list(string.punctuation)
        + chars
        + ["##" + c for c in chars]
        + sorted(words - set(chars))
    )


def write(
    output_dir: str,
    num_train: int = 4096,
    num_eval: int = 512,
    num_shards: int = 8,
    seed: int = 0,
    image_size: int = 128,
    num_queries: int = NUM_QUERIES,
) -> dict[str, str]:
    """Writes `train-*.tfrecord`, `eval-*.tfrecord`, the composed-query split and `vocab.txt`;
    returns their source specs."""
    tf.io.gfile.makedirs(output_dir)
    write_tfrecords(records(num_train, seed, image_size), output_dir, num_shards, "train")
    write_tfrecords(records(num_eval, seed + 1, image_size), output_dir, max(1, num_shards // 4), "eval")
    specs = write_image_text(output_dir, num_queries, seed + IMAGE_TEXT_SEED_OFFSET, image_size)
    vocab = os.path.join(output_dir, "vocab.txt")
    with tf.io.gfile.GFile(vocab, "w") as f:
        f.write("".join(t + "\n" for t in vocab_tokens()))
    return dict(
        train=f"tfrecord:{os.path.join(output_dir, 'train-*.tfrecord')}",
        eval=f"tfrecord:{os.path.join(output_dir, 'eval-*.tfrecord')}",
        vocab=vocab,
        **specs,
    )


def image_text_specs(output_dir: str) -> dict[str, str]:
    """Source specs of the composed-query split (`queries`, `gallery`) in a demo data folder."""
    return dict(
        queries=f"tfrecord:{os.path.join(output_dir, 'queries-*.tfrecord')}",
        gallery=f"tfrecord:{os.path.join(output_dir, 'gallery-*.tfrecord')}",
    )


def write_image_text(
    output_dir: str, num_queries: int = NUM_QUERIES, seed: int = IMAGE_TEXT_SEED_OFFSET, image_size: int = 128
) -> dict[str, str]:
    """Writes the composed-query split `queries-*.tfrecord` and `gallery-*.tfrecord`."""
    queries, gallery = image_text_records(num_queries, seed, image_size)
    write_tfrecords(queries, output_dir, 1, "queries")
    write_tfrecords(gallery, output_dir, 2, "gallery")
    return image_text_specs(output_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--num_train", type=int, default=4096)
    parser.add_argument("--num_eval", type=int, default=512)
    parser.add_argument("--num_shards", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_queries", type=int, default=NUM_QUERIES)
    args = parser.parse_args(argv)
    specs = write(
        args.output, args.num_train, args.num_eval, args.num_shards, args.seed, args.image_size, args.num_queries
    )
    print("\n".join(f"{k}: {v}" for k, v in specs.items()))


if __name__ == "__main__":
    main()
