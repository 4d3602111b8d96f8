"""The embedded demo dataset: rendered scenes of coloured shapes with two captions each.

Nothing is downloaded. Every image holds one or two shapes (shape, colour, size, position) on a
coloured background; `vecap` is a rich, complete description (a "rewritten" caption, as VeCap
makes) and `txt` a noisy alt-text (some attributes only, shuffled, web junk such as "stock
photo" or file names). A small model learns the pairing on CPU in minutes. `label` (the first
shape and its colour) serves classification probes. A composed-query split pairs scenes with a
text asking for one change ("on a black background") and the changed scene, for image+text
query retrieval. Two transfer splits follow: a labelled one (single-object scenes, `label` their
shape and colour, `layout` their size and position; train and test) for linear probes and
classification fine-tuning, and a captioned one (3 to 5 differently phrased captions per scene
under `caption_0` ...; train and test), COCO/Flickr-style, for retrieval fine-tuning.

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
POSITIONS = ("left", "right", "top", "bottom")  # of a lone object; two objects stand left and right
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
    positions = ["left", "right"] if count == 2 else [str(rng.choice(list(POSITIONS)))]
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


def layout(attributes: dict) -> int:
    """The first object's size and position, in `layout_names()` order (what the demo's captions
    teach besides colours and shapes)."""
    first = attributes["objects"][0]
    return list(SIZES).index(first["size"]) * len(POSITIONS) + POSITIONS.index(first["position"])


def layout_names() -> list[str]:
    """Names of the `layout` classes ("small on the left", ...)."""
    return [f"{size} on the {position}" for size in SIZES for position in POSITIONS]


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


LABELLED_SEED_OFFSET = 3  # the labelled split's train (seed + 3) and test (seed + 4) scenes
CAPTIONED_SEED_OFFSET = 5  # the captioned split's train (seed + 5) and test (seed + 6) scenes
NUM_LABELLED = (2048, 512)  # (train, test) scenes of the labelled split
NUM_CAPTIONED = (2048, 512)  # (train, test) scenes of the captioned split
CAPTION_FIELDS = tuple(f"caption_{i}" for i in range(5))  # a captioned scene fills the first 3 to 5
MIN_CAPTIONS = 3


def labelled_records(num_examples: int, seed: int, image_size: int = 128) -> list[bytes]:
    """Single-object scenes with two class fields: `label`, the object's shape and colour
    (`class_names()`; unlike the first shape of a two-shape scene, which is left or right at
    random, the image shows it), and `layout`, its size and position (`layout_names()`). `vecap`
    describes the scene."""
    rng = np.random.default_rng(seed)
    out = []
    for index in range(num_examples):
        attributes = draw_scene(rng)
        attributes["objects"] = attributes["objects"][:1]
        jpeg = tf.io.encode_jpeg(render_scene(attributes, rng, image_size), quality=90).numpy()
        texts = dict(vecap=rich_caption(attributes), key=f"{seed}-{index:07d}")
        out.append(encode_example(jpeg, texts, dict(label=label(attributes), layout=layout(attributes))))
    return out


def caption_variants(attributes: dict) -> list[str]:
    """Five distinct descriptions of a scene, as different annotators would write them: other
    phrasings, object orders and detail (the first is `rich_caption`). None runs past 20 words."""
    background, objects = attributes["background"], attributes["objects"]
    styles = (
        "a {size} {color} {shape} on the {position}",
        "{a_color} {shape} on the {position}",
        "the {size} {shape} in {color} on the {position}",
        "on the {position} {a_color} {size} {shape}",
    )

    def describe(style: int, objects: list[dict]) -> str:
        phrases = []
        for o in objects:
            article = "an" if o["color"][0] in "aeiou" else "a"
            phrases.append(styles[style].format(**o, a_color=f"{article} {o['color']}"))
        return " and ".join(phrases)

    return [
        rich_caption(attributes),
        f"a {background} background with {describe(0, objects)}",
        f"{describe(1, objects[::-1])}, on {background}",
        f"{describe(2, objects)}, on {background}",
        f"{background} background, {describe(3, objects[::-1])}",
    ]


def captioned_records(num_examples: int, seed: int, image_size: int = 128) -> list[bytes]:
    """Scenes with 3 to 5 of their `caption_variants` in random order, under `caption_0`, ...
    (the rest absent), as COCO and Flickr30K give several captions per image."""
    rng = np.random.default_rng(seed)
    out = []
    for index in range(num_examples):
        attributes = draw_scene(rng)
        jpeg = tf.io.encode_jpeg(render_scene(attributes, rng, image_size), quality=90).numpy()
        variants = caption_variants(attributes)
        count = int(rng.integers(MIN_CAPTIONS, len(CAPTION_FIELDS) + 1))
        chosen = rng.choice(len(variants), size=count, replace=False)
        texts = {field: variants[i] for field, i in zip(CAPTION_FIELDS[:count], chosen, strict=True)}
        out.append(encode_example(jpeg, dict(texts, key=f"{seed}-{index:07d}")))
    return out


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
    returns their source specs. `write_missing` adds the labelled and captioned splits."""
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


def specs(output_dir: str) -> dict[str, str]:
    """Source specs of every split of a demo data folder, and its vocab."""

    def spec(prefix: str) -> str:
        return f"tfrecord:{os.path.join(output_dir, prefix + '-*.tfrecord')}"

    return dict(
        train=spec("train"),
        eval=spec("eval"),
        vocab=os.path.join(output_dir, "vocab.txt"),
        **image_text_specs(output_dir),
        labelled_train=spec("labelled-train"),
        labelled_test=spec("labelled-test"),
        captioned_train=spec("captioned-train"),
        captioned_test=spec("captioned-test"),
    )


def write_labelled(
    output_dir: str, num_train: int, num_test: int, seed: int = LABELLED_SEED_OFFSET, image_size: int = 128
) -> None:
    """Writes the labelled split, `labelled-train-*.tfrecord` and then `labelled-test-*.tfrecord`."""
    write_tfrecords(labelled_records(num_train, seed, image_size), output_dir, 2, "labelled-train")
    write_tfrecords(labelled_records(num_test, seed + 1, image_size), output_dir, 1, "labelled-test")


def write_captioned(
    output_dir: str, num_train: int, num_test: int, seed: int = CAPTIONED_SEED_OFFSET, image_size: int = 128
) -> None:
    """Writes the captioned split, `captioned-train-*.tfrecord` and then `captioned-test-*.tfrecord`."""
    write_tfrecords(captioned_records(num_train, seed, image_size), output_dir, 2, "captioned-train")
    write_tfrecords(captioned_records(num_test, seed + 1, image_size), output_dir, 1, "captioned-test")


def write_missing(
    output_dir: str,
    seed: int = 0,
    image_size: int = 128,
    num_queries: int = NUM_QUERIES,
    num_labelled: tuple[int, int] = NUM_LABELLED,
    num_captioned: tuple[int, int] = NUM_CAPTIONED,
) -> list[str]:
    """Writes the splits that a demo data folder lacks (those `write` leaves out, or that a folder
    written before they existed has not got); returns their names. Each split's seed is offset
    from `seed`, so adding one never changes the others."""
    written = []
    if not tf.io.gfile.glob(os.path.join(output_dir, "gallery-*.tfrecord")):  # written last
        write_image_text(output_dir, num_queries, seed + IMAGE_TEXT_SEED_OFFSET, image_size)
        written.append("image_text")
    if not tf.io.gfile.glob(os.path.join(output_dir, "labelled-test-*.tfrecord")):
        write_labelled(output_dir, *num_labelled, seed + LABELLED_SEED_OFFSET, image_size)
        written.append("labelled")
    if not tf.io.gfile.glob(os.path.join(output_dir, "captioned-test-*.tfrecord")):
        write_captioned(output_dir, *num_captioned, seed + CAPTIONED_SEED_OFFSET, image_size)
        written.append("captioned")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--num_train", type=int, default=4096)
    parser.add_argument("--num_eval", type=int, default=512)
    parser.add_argument("--num_shards", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_queries", type=int, default=NUM_QUERIES)
    parser.add_argument("--num_labelled", type=int, nargs=2, default=NUM_LABELLED, metavar=("TRAIN", "TEST"))
    parser.add_argument("--num_captioned", type=int, nargs=2, default=NUM_CAPTIONED, metavar=("TRAIN", "TEST"))
    args = parser.parse_args(argv)
    write(args.output, args.num_train, args.num_eval, args.num_shards, args.seed, args.image_size, args.num_queries)
    write_missing(
        args.output, args.seed, args.image_size, args.num_queries, tuple(args.num_labelled), tuple(args.num_captioned)
    )
    print("\n".join(f"{k}: {v}" for k, v in specs(args.output).items()))


if __name__ == "__main__":
    main()
