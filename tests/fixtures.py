"""Data the tests make for themselves: a small WordPiece vocab and random images."""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np

from align_jax.models import presets

TRAINED_DEMO_NUM_EVAL = 24  # held-out images of the trained demo workdir (tests/demo_workdir.py)

_WORDS = (
    "a photo of the an cat dog bird on in with and is at red blue green small big "
    "run play photograph un cafe resume naive hello world straße 中 文 日 本 語 😀 σ ς ﬁ"
).split()
_SUFFIXES = "##s ##ing ##ed ##able ##aff ##ord ##graph ##er ##est ##ly".split()

TEST_VOCAB: list[str] = list(
    dict.fromkeys(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        + list(string.punctuation)
        + list(string.ascii_lowercase)
        + ["##" + c for c in string.ascii_lowercase]
        + list(string.digits)
        + ["##" + c for c in string.digits]
        + _WORDS
        + _SUFFIXES
    )
)


def write_vocab(path: Path, tokens: list[str] = TEST_VOCAB) -> str:
    path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    return str(path)


def random_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 `[n, size, size, 3]` images with smooth structure (not pure noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (n, 4, 4, 3))
    yy, xx = np.meshgrid(np.linspace(0, 3, size), np.linspace(0, 3, size), indexing="ij")
    y0, x0 = np.floor(yy).astype(int).clip(0, 2), np.floor(xx).astype(int).clip(0, 2)
    fy, fx = (yy - y0)[..., None], (xx - x0)[..., None]
    img = (
        coarse[:, y0, x0] * (1 - fy) * (1 - fx)
        + coarse[:, y0 + 1, x0] * fy * (1 - fx)
        + coarse[:, y0, x0 + 1] * (1 - fy) * fx
        + coarse[:, y0 + 1, x0 + 1] * fy * fx
    )
    img += rng.normal(0, 20, img.shape)
    return img.clip(0, 255).astype(np.uint8)


def three_stage_tiny(image_size: int, max_text_length: int):
    """The tiny preset cut to three image stages (four blocks, one residual): XLA compiles on a
    small CPU take long enough, and the tests that use it need the towers' behaviour, not depth."""
    config = presets.tiny()
    config.image_size, config.max_text_length = image_size, max_text_length
    config.image.update(
        kernel_sizes=(3, 5, 3),
        in_channels=(32, 16, 24),
        out_channels=(16, 24, 40),
        strides=(1, 2, 2),
        num_block_repeats=(1, 2, 1),
        expand_ratios=(1, 6, 6),
        depth_coefficient=1.0,
    )
    return config
