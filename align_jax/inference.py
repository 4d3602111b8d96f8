"""Notebook API: restore a checkpoint, embed images and texts, classify zero-shot, search images.

model = align_jax.inference.load("/path/to/workdir")
image_embeds = model.encode_images(uint8_images)      # [N, D], unit norm; or a list of file paths
text_embeds = model.encode_texts(["a photo of a cat"])
model.similarity(image_embeds, text_embeds)           # [N_images, N_texts] cosines
model.logits(image_embeds, text_embeds)               # the same over the temperature
model.zero_shot_classify(paths, ["cat", "dog"]).top_labels
index = model.index(paths, ids=paths)
index.search(image="beach.jpg", text="snow")          # image+text query (ALIGN section 7)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
from etils import epath

from align_jax import checkpointing
from align_jax.evaluators.zeroshot import CLIP_IMAGENET_TEMPLATES, class_embeddings
from align_jax.input import image_ops
from align_jax.input.text_ops import Tokenizer
from align_jax.models import DualEncoder, build_model, init_variables

# One image: uint8 `[H, W, 3]` pixels or an image file (JPEG, PNG, GIF or BMP).
Image = np.ndarray | str | os.PathLike
# Many images: uint8 `[N, H, W, 3]`, or a sequence of single images of any sizes.
Images = np.ndarray | Sequence[Image]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def read_image(image: Image) -> np.ndarray:
    """A file path or uint8 pixels -> uint8 `[H, W, 3]`, decoded as the input pipeline decodes."""
    if isinstance(image, (str, os.PathLike)):
        path = epath.Path(image)
        if not path.exists():
            raise FileNotFoundError(f"image file not found: {path}")
        try:
            return image_ops.decode_rgb(tf.constant(path.read_bytes())).numpy()
        except tf.errors.OpError as e:
            raise ValueError(f"cannot decode image file {path} (JPEG, PNG, GIF or BMP expected): {e.message}") from e
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8:
        raise TypeError(f"an image must be uint8 pixels, got dtype {pixels.dtype}")
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"an image must have shape [H, W, 3], got {pixels.shape}")
    return pixels


def _bucket(n: int, batch_size: int) -> int:
    """Padded batch size: a power of two up to `batch_size`, so few shapes get compiled."""
    return min(batch_size, 1 << max(0, (n - 1).bit_length()))


def _batched(fn, inputs: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    """Applies `fn` over the leading axis in fixed-size, zero-padded batches."""
    n = len(inputs[0])
    outputs = []
    for start in range(0, n, batch_size):
        chunk = [x[start : start + batch_size] for x in inputs]
        size = _bucket(len(chunk[0]), batch_size)
        pad = size - len(chunk[0])
        chunk = [np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x for x in chunk]
        outputs.append(np.asarray(fn(*chunk))[: size - pad])
    return np.concatenate(outputs)


class AlignModel:
    """A restored dual encoder with its tokenizer and preprocessing."""

    def __init__(self, config: ml_collections.ConfigDict, variables: dict, tokenizer: Tokenizer):
        self.config = config
        self.model: DualEncoder = build_model(config.model)
        self.variables = variables
        self.tokenizer = tokenizer
        self.image_size: int = config.model.image_size
        self._encode_image = jax.jit(lambda v, x: self.model.apply(v, x, method=DualEncoder.encode_image))
        self._encode_text = jax.jit(lambda v, i, m: self.model.apply(v, i, m, method=DualEncoder.encode_text))

    @property
    def temperature(self) -> float:
        return float(self.variables["params"]["temperature"])

    @property
    def embed_dim(self) -> int:
        return self.config.model.embed_dim

    def preprocess_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 `[N, H, W, 3]` -> uint8 `[N, S, S, 3]` at the model resolution (the model scales
        pixels to [-1, 1])."""
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise TypeError(f"images must be uint8 pixels, got dtype {images.dtype}")
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must have shape [N, H, W, 3], got {images.shape}")
        if images.shape[1:3] != (self.image_size, self.image_size):
            images = image_ops.resize_and_center_crop(images, self.image_size).numpy()
        return images

    def _preprocess_one(self, image: Image) -> np.ndarray:
        pixels = read_image(image)
        if pixels.shape[:2] != (self.image_size, self.image_size):
            pixels = image_ops.resize_and_center_crop(pixels, self.image_size).numpy()
        return pixels

    def _encode_pixels(self, pixels: np.ndarray, batch_size: int) -> np.ndarray:
        return _batched(lambda x: self._encode_image(self.variables, x), [pixels], batch_size)

    def encode_images(self, images: Images, batch_size: int = 32) -> np.ndarray:
        """Images -> L2-normalised float32 `[N, D]`.

        `images`: uint8 `[N, H, W, 3]`, or a sequence of image file paths and/or uint8 `[H, W, 3]`
        arrays of any sizes. Files are decoded one batch at a time, so a long list of paths never
        sits in memory as pixels.
        """
        if isinstance(images, (str, os.PathLike)):
            raise TypeError(f"encode_images takes a sequence of images; wrap the single path in a list: [{images!r}]")
        if hasattr(images, "shape"):  # one array (NumPy, JAX or TF) of equal-sized images
            pixels = self.preprocess_images(images)
            if len(pixels) == 0:
                return np.zeros((0, self.embed_dim), np.float32)
            return self._encode_pixels(pixels, batch_size)
        images = list(images)
        if not images:
            return np.zeros((0, self.embed_dim), np.float32)
        chunks = []
        for start in range(0, len(images), batch_size):
            pixels = np.stack([self._preprocess_one(image) for image in images[start : start + batch_size]])
            chunks.append(self._encode_pixels(pixels, batch_size))
        return np.concatenate(chunks)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Strings -> L2-normalised float32 `[N, D]`."""
        ids, mask = self.tokenizer(texts)
        if len(ids) == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        return _batched(lambda i, m: self._encode_text(self.variables, i, m), [ids, mask], batch_size)

    def logits(self, image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
        """`[N_images, N_texts]` similarities divided by the temperature (HF `logits_per_image`)."""
        return np.asarray(image_embeds, np.float32) @ np.asarray(text_embeds, np.float32).T / self.temperature

    def similarity(self, image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
        """`[N_images, N_texts]` cosine similarities in [-1, 1] (no temperature): comparable
        across models, unlike `logits`. Inputs need not be normalised."""
        image_embeds, text_embeds = (_unit(np.asarray(x, np.float32)) for x in (image_embeds, text_embeds))
        return image_embeds @ text_embeds.T

    def zero_shot_classify(
        self,
        images: Images,
        class_names: Sequence[str],
        templates: Sequence[str] | None = None,
        top_k: int = 5,
        batch_size: int = 32,
    ) -> ZeroShotResult:
        """Classifies images among `class_names` by their prompt-ensembled text embeddings (CLIP's
        80 ImageNet templates unless `templates` is given; each has one `{}` for the name)."""
        class_names = list(class_names)
        classes = class_embeddings(
            self.encode_texts, class_names, CLIP_IMAGENET_TEMPLATES if templates is None else templates
        )
        logits = self.logits(self.encode_images(images, batch_size), classes)
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        # Ranked by logit (softmax can round near ties together); equal scores by class index.
        top_indices = np.argsort(-logits, axis=-1, kind="stable")[:, : min(top_k, len(class_names))]
        top_labels = [[class_names[i] for i in row] for row in top_indices]
        return ZeroShotResult(probs=probs, top_indices=top_indices, top_labels=top_labels)

    def index(self, images: Images, ids: Sequence[Hashable] | None = None, batch_size: int = 32) -> ImageIndex:
        """An in-memory image index for text, image and image+text search; results name each
        image by its position, or by `ids` (e.g. the file paths) when given."""
        return ImageIndex(self, self.encode_images(images, batch_size), None if ids is None else list(ids))


@dataclasses.dataclass(frozen=True, eq=False)
class ZeroShotResult:
    """`probs` `[N, C]` (softmax of the logits over the classes); `top_indices` `[N, k]` and
    `top_labels` (N lists of k names), best first."""

    probs: np.ndarray
    top_indices: np.ndarray
    top_labels: list[list[str]]

    @property
    def top_probs(self) -> np.ndarray:
        """`[N, k]` probabilities of `top_indices`."""
        return np.take_along_axis(self.probs, self.top_indices, axis=-1)


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the `k` highest `scores` `[N]`, best first, equal scores by lower index.

    O(N): a partition finds the k-th score, and only the candidates scoring at least that much
    are sorted (all of them, so ties at the boundary still go to the lower index)."""
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros((0,), np.int64)
    threshold = np.partition(scores, len(scores) - k)[len(scores) - k]
    candidates = np.flatnonzero(scores >= threshold)
    return candidates[np.argsort(-scores[candidates], kind="stable")[:k]]


@dataclasses.dataclass(frozen=True, eq=False)
class ImageIndex:
    """Unit-norm image embeddings `[N, D]` to search by text, by image or by both.

    An image+text query is the normalised sum of the two unit-norm embeddings, as in ALIGN
    (Jia et al. 2021, section 7, "image + text" queries: the sum retrieves images like the query
    image that also match the text)."""

    model: AlignModel = dataclasses.field(repr=False)
    embeddings: np.ndarray = dataclasses.field(repr=False)
    ids: list[Hashable] | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "embeddings", np.asarray(self.embeddings, np.float32))
        if self.embeddings.ndim != 2 or self.embeddings.shape[1] != self.model.embed_dim:
            raise ValueError(f"embeddings must be [N, {self.model.embed_dim}], got {self.embeddings.shape}")
        if self.ids is not None and len(self.ids) != len(self.embeddings):
            raise ValueError(f"got {len(self.ids)} ids for {len(self.embeddings)} images")

    def __len__(self) -> int:
        return len(self.embeddings)

    def search_text(self, text: str, k: int = 10) -> list[tuple[Hashable, float]]:
        return self.search(text=text, k=k)

    def search_image(self, image: Image, k: int = 10) -> list[tuple[Hashable, float]]:
        return self.search(image=image, k=k)

    def query_embedding(self, image: Image | None = None, text: str | None = None) -> np.ndarray:
        """Unit-norm `[D]` embedding of an image, a text, or their normalised sum."""
        if image is None and text is None:
            raise ValueError("a query needs an image, a text or both")
        if text is not None and not isinstance(text, str):
            raise TypeError(f"text must be one string, got {type(text).__name__}")
        parts = []
        if image is not None:
            parts.append(self.model.encode_images([image])[0])
        if text is not None:
            parts.append(self.model.encode_texts([text])[0])
        return _unit(np.sum(parts, axis=0))

    def search(self, image: Image | None = None, text: str | None = None, k: int = 10) -> list[tuple[Hashable, float]]:
        """The `k` best `(id or index, cosine similarity)` pairs, best first; equal scores by index."""
        scores = self.embeddings @ self.query_embedding(image, text)  # [N]: the only per-query array
        best = top_k_indices(scores, k)
        names = best.tolist() if self.ids is None else [self.ids[i] for i in best]
        return [(name, float(scores[i])) for name, i in zip(names, best, strict=True)]


def split_checkpoint_path(path: str | os.PathLike) -> tuple[epath.Path, int | None]:
    """A workdir, or one of its `checkpoints/<step>` folders -> (workdir, step or None)."""
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path does not exist: {path}")
    if path.name.isdigit() and path.parent.name == checkpointing.CHECKPOINT_DIR:
        return path.parent.parent, int(path.name)
    return path, None


def resolve_vocab(workdir: epath.Path, config: ml_collections.ConfigDict) -> str:
    """`data.vocab`, looked up next to the checkpoint first (workdirs carry their vocab)."""
    vocab = config.get("data", {}).get("vocab")
    if not vocab:
        raise ValueError(f"{workdir / checkpointing.CONFIG_FILE} names no data.vocab")
    local = workdir / vocab
    return os.fspath(local if local.exists() else epath.Path(vocab))


def load(path: str | os.PathLike, step: int | None = None, device: Any = None) -> AlignModel:
    """Restores the model of a workdir (latest step unless `step`) onto one local device."""
    workdir, path_step = split_checkpoint_path(path)
    config = checkpointing.load_config(workdir)
    if "model" not in config:
        raise ValueError(f"{workdir / checkpointing.CONFIG_FILE} has no 'model' section")
    if config.model.get("num_classes"):
        raise ValueError(
            f"{workdir} holds an image classifier (model.num_classes={config.model.num_classes}), not a dual "
            "encoder; evaluate it with `python -m align_jax.evaluate`"
        )
    model = build_model(config.model)
    shapes = jax.eval_shape(lambda: init_variables(model, config.model, jax.random.key(0)))
    abstract = checkpointing.abstract_on_device(shapes, device)
    variables = checkpointing.restore_model(workdir, abstract, step if step is not None else path_step)
    tokenizer = Tokenizer(
        resolve_vocab(workdir, config),
        config.model.max_text_length,
        lower_case=config.data.get("lower_case", True),
    )
    if tokenizer.vocab_size > config.model.text.vocab_size:
        raise ValueError(
            f"vocab {tokenizer.vocab_path} has {tokenizer.vocab_size} tokens but the text tower "
            f"embeds only {config.model.text.vocab_size}"
        )
    variables = jax.tree.map(jnp.asarray, variables)
    return AlignModel(config, variables, tokenizer)
