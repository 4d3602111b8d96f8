"""Zero-shot classification: each class is the text embedding of its name written into prompt
templates, and an image is assigned the class whose embedding it scores highest.

Prompts are ensembled as CLIP does (Radford et al. 2021, section 3.1.4, and the notebook
"Prompt_Engineering_for_ImageNet"): every template filled with the class name is embedded and
L2-normalised, the embeddings are averaged and the mean renormalised. Equal scores are ordered by
class index, as retrieval orders them, so a constant model scores the same on every run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from align_jax.evaluators.lockstep import LockstepPass, gather
from align_jax.input import pipeline
from align_jax.input.text_ops import Tokenizer
from align_jax.models import DualEncoder
from align_jax.sharding import check_batch_size

# The 80 ImageNet templates of openai/CLIP's notebooks/imagenet_data.json, in its order.
CLIP_IMAGENET_TEMPLATES = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def class_embeddings(
    encode_texts: Callable[[list[str]], np.ndarray], class_names: Sequence[str], templates: Sequence[str]
) -> np.ndarray:
    """Unit-norm class embeddings `[C, D]`: per class, the renormalised mean of its unit-norm
    prompt embeddings. `encode_texts` maps N strings to `[N, D]`; it is called once, on all C * T
    prompts (class-major), so it can batch them however it likes."""
    class_names, templates = list(class_names), list(templates)
    if not class_names or not templates:
        raise ValueError(f"need class names and templates, got {len(class_names)} and {len(templates)}")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"every template needs exactly one '{{}}' for the class name, got {bad}")
    prompts = [template.format(name) for name in class_names for template in templates]
    embeds = np.asarray(encode_texts(prompts), np.float32)
    if embeds.ndim != 2 or len(embeds) != len(prompts):
        raise ValueError(f"encode_texts must return [{len(prompts)}, D] for {len(prompts)} prompts, got {embeds.shape}")
    embeds = _unit(embeds).reshape(len(class_names), len(templates), -1)
    return _unit(embeds.mean(axis=1))


def _label_ranks(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per row, the position of its label's class in the stable order (score descending, then
    class index ascending): the number of classes placed ahead of it."""
    true_score = np.take_along_axis(logits, labels[:, None], axis=1)
    index = np.arange(logits.shape[1])
    ahead = (logits > true_score) | ((logits == true_score) & (index[None, :] < labels[:, None]))
    return ahead.sum(axis=1)


def classification_metrics(logits: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """`top{k}` accuracy (k beyond the number of classes counts every row a hit) and
    `mean_per_class_recall` (top-1 recall averaged over the classes present in `labels`, so rare
    classes weigh as much as common ones), all as fractions. `logits` `[N, C]`, `labels` `[N]`."""
    logits = np.asarray(logits, np.float32)
    labels = np.asarray(labels)
    if logits.ndim != 2 or labels.shape != (len(logits),):
        raise ValueError(f"expected logits [N, C] and labels [N], got {logits.shape} and {labels.shape}")
    if not len(labels):
        raise ValueError("classification needs at least one example")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels must be integer classes in [0, {logits.shape[1]}), got {np.unique(labels)}")
    ranks = _label_ranks(logits, labels)
    out = {f"top{k}": float(np.mean(ranks < k)) for k in ks}
    present = np.unique(labels)
    out["mean_per_class_recall"] = float(np.mean([np.mean(ranks[labels == c] == 0) for c in present]))
    return out


@functools.partial(jax.jit, static_argnums=0)
def _encode_text(model: DualEncoder, variables: dict, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    return model.apply(variables, input_ids, attention_mask, method=DualEncoder.encode_text)


@functools.partial(jax.jit, static_argnums=0)
def _image_logits(model: DualEncoder, variables: dict, images: jax.Array, class_embeds: jax.Array) -> jax.Array:
    """Cosine similarities `[b, C]` of the images to the classes (the temperature changes no ranking)."""
    image_embeds = model.apply(variables, images, method=DualEncoder.encode_image)
    # Full float32: bf16 passes on an accelerator would reorder near ties.
    return jnp.matmul(image_embeds, class_embeds.T, precision=jax.lax.Precision.HIGHEST)


class ZeroShotEvaluator:
    """Top-1, top-5 and mean per-class recall of a dual encoder used as a zero-shot classifier.

    Each record's integer `label_field` indexes `class_names`. Class embeddings are recomputed on
    every `run` (the text tower changes during training), in padded batches of the evaluation
    batch size; image batches are padded the same way, so each tower compiles once.
    """

    def __init__(
        self,
        model: DualEncoder,
        mesh: jax.sharding.Mesh,
        *,
        data_spec: str,
        data_config: ml_collections.ConfigDict,
        image_size: int,
        max_text_length: int,
        batch_size: int,
        class_names: Sequence[str],
        templates: Sequence[str] | None = None,
        label_field: str = "label",
        max_examples: int = 0,
        prefix: str = "zeroshot",
    ):
        check_batch_size(batch_size, mesh)
        if batch_size % jax.process_count():
            raise ValueError(f"batch_size {batch_size} is not divisible by the {jax.process_count()} processes")
        if not class_names:
            raise ValueError("zero-shot evaluation needs class names")
        self.model = model
        self.mesh = mesh
        self.class_names = list(class_names)
        self.templates = list(CLIP_IMAGENET_TEMPLATES if templates is None else templates)
        self.label_field = label_field
        self.max_examples = max_examples
        self.prefix = prefix
        self.batch_size = batch_size
        self.local_batch_size = batch_size // jax.process_count()
        self.tokenizer = Tokenizer(data_config.vocab, max_text_length, data_config.lower_case)
        images_only = data_config.copy_and_resolve_references()
        images_only.captions = {}  # the texts are the prompts; the records' captions are not read
        self.dataset = pipeline.make_dataset(
            data_spec,
            images_only,
            image_size=image_size,
            max_text_length=max_text_length,
            batch_size=self.local_batch_size,
            train=False,
            label_field=label_field,
        )

    def encode_texts(self, variables: dict, texts: Sequence[str]) -> np.ndarray:
        """Text embeddings `[N, D]` on every host. Every process tokenizes all texts and feeds its
        own rows of each zero-padded global batch."""
        ids, mask = self.tokenizer(texts)
        b, local = self.batch_size, self.local_batch_size
        start_row = jax.process_index() * local
        out = []
        for start in range(0, len(ids), b):
            n = min(b, len(ids) - start)
            rows = {}
            for key, x in (("input_ids", ids), ("attention_mask", mask)):
                padded = np.zeros((b, x.shape[1]), x.dtype)
                padded[:n] = x[start : start + n]
                rows[key] = padded[start_row : start_row + local]
            arrays = pipeline.to_global_batch(rows, self.mesh, keys=tuple(rows))
            embeds = _encode_text(self.model, variables, arrays["input_ids"], arrays["attention_mask"])
            out.append(gather(embeds)[:n])
        return np.concatenate(out)

    def _padded(self, batch: dict | None) -> dict[str, np.ndarray]:
        """This process's images zero-padded to the local batch size, with the mask of real rows."""
        b = self.local_batch_size
        spec = self.dataset.element_spec["images"]
        images = np.zeros((b, *spec.shape[1:]), spec.dtype.as_numpy_dtype)
        labels = np.full(b, -1, np.int32)  # int32: JAX's default integer width
        n = 0 if batch is None else len(batch["images"])
        if n:
            images[:n], labels[:n] = batch["images"], batch["labels"]
        return dict(images=images, labels=labels, valid=np.arange(b) < n)

    def logits(self, variables: dict) -> tuple[np.ndarray, np.ndarray]:
        """One pass: `(logits [N, C], labels [N])` on every host, over the first `max_examples`
        images (all when 0). `variables` must live on the evaluator's mesh."""
        class_embeds = class_embeddings(
            functools.partial(self.encode_texts, variables), self.class_names, self.templates
        )
        # Replicated on the mesh once, instead of copied from the host at every step.
        class_embeds = jax.make_array_from_callback(
            class_embeds.shape, NamedSharding(self.mesh, P()), lambda index: class_embeds[index]
        )
        logits, labels = [], []
        num_images = 0
        lockstep = LockstepPass(self.dataset)
        for batch in lockstep:
            padded = self._padded(batch)
            arrays = pipeline.to_global_batch(padded, self.mesh, keys=tuple(padded))
            valid = gather(arrays["valid"])
            logits.append(gather(_image_logits(self.model, variables, arrays["images"], class_embeds))[valid])
            labels.append(gather(arrays["labels"])[valid])
            num_images += int(valid.sum())
            if self.max_examples and num_images >= self.max_examples:
                break
        self.skipped = lockstep.total_skipped()
        if not num_images:
            raise ValueError(f"the zero-shot set yielded no images ({self.skipped} skipped by the filters)")
        logits, labels = np.concatenate(logits), np.concatenate(labels)
        if self.max_examples:
            logits, labels = logits[: self.max_examples], labels[: self.max_examples]
        return logits, labels

    def run(self, variables: dict) -> dict[str, float]:
        """`{prefix}/top1`, `{prefix}/top5`, `{prefix}/mean_per_class_recall`, `num_images` and
        `skipped` (examples the input filters dropped)."""
        logits, labels = self.logits(variables)
        if labels.min() < 0:
            raise ValueError(f"{(labels < 0).sum()} images have no {self.label_field!r} field")
        metrics = classification_metrics(logits, labels, ks=(1, 5))
        metrics.update(num_images=float(len(labels)), skipped=float(self.skipped))
        return {f"{self.prefix}/{name}": value for name, value in metrics.items()}
