"""Notebook API: restore a checkpoint and embed images and texts.

model = align_jax.inference.load("/path/to/workdir")
image_embeds = model.encode_images(uint8_images)      # [N, D], unit norm
text_embeds = model.encode_texts(["a photo of a cat"])
logits = model.logits(image_embeds, text_embeds)      # [N_images, N_texts]
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from align_jax import checkpointing
from align_jax.input import image_ops
from align_jax.input.text_ops import Tokenizer
from align_jax.models import DualEncoder, build_model, init_variables


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

    def encode_images(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """uint8 `[N, H, W, 3]` images -> L2-normalised float32 `[N, D]`."""
        pixels = self.preprocess_images(images)
        if len(pixels) == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        return _batched(lambda x: self._encode_image(self.variables, x), [pixels], batch_size)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Strings -> L2-normalised float32 `[N, D]`."""
        ids, mask = self.tokenizer(texts)
        if len(ids) == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        return _batched(lambda i, m: self._encode_text(self.variables, i, m), [ids, mask], batch_size)

    def logits(self, image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
        """`[N_images, N_texts]` similarities divided by the temperature (HF `logits_per_image`)."""
        return np.asarray(image_embeds, np.float32) @ np.asarray(text_embeds, np.float32).T / self.temperature


def _split_path(path: str | os.PathLike) -> tuple[epath.Path, int | None]:
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
    workdir, path_step = _split_path(path)
    config = checkpointing.load_config(workdir)
    if "model" not in config:
        raise ValueError(f"{workdir / checkpointing.CONFIG_FILE} has no 'model' section")
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
