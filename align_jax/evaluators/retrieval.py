"""Image-text retrieval: Recall@K in both directions, as CLIP_benchmark defines it.

Text -> image: a caption is a hit when its one image is among the K images it scores highest.
Image -> text: an image is a hit when ANY of its captions is among the K texts it scores highest
(so every caption of an image counts, e.g. the five of COCO or Flickr30k, or the alt-text and the
rewritten caption of a VeCap-style record). Equal scores are ordered by index, so a constant
model scores the same on every run instead of as well as the luck of a sort allows.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from align_jax.evaluators.lockstep import LockstepPass, gather
from align_jax.input import pipeline
from align_jax.models import DualEncoder
from align_jax.sharding import check_batch_size


@jax.jit
def _best_positive_rank(
    queries: jax.Array, keys: jax.Array, query_ids: jax.Array, key_owner: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Per query row: the rank among all keys of its highest-ranked positive (a key whose owner is
    the query's id), in the stable order (score descending, then index ascending), and whether it
    has any positive. The first positive in that order has the smallest rank of them all."""
    # Full float32: bf16 passes on an accelerator would reorder near ties.
    scores = jnp.matmul(queries, keys.T, precision=jax.lax.Precision.HIGHEST)
    positive = key_owner[None, :] == query_ids[:, None]
    best = jnp.argmax(jnp.where(positive, scores, -jnp.inf), axis=1)  # argmax: the lowest index on ties
    best_score = jnp.take_along_axis(scores, best[:, None], axis=1)
    index = jnp.arange(keys.shape[0])
    ahead = (scores > best_score) | ((scores == best_score) & (index[None, :] < best[:, None]))
    return jnp.sum(ahead, axis=1), jnp.any(positive, axis=1)


def best_positive_ranks(
    queries: np.ndarray, keys: np.ndarray, query_ids: np.ndarray, key_owner: np.ndarray, chunk_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the rank (0 = first) of its best-scoring positive key, a key whose owner equals
    the query's id, in the stable order (score descending, then key index ascending), and whether
    it has a positive at all. Computed over query chunks of one fixed shape (the last one
    zero-padded, its padding owning nothing), so only a `[chunk, num_keys]` score block exists at a
    time."""
    chunk = min(chunk_size, len(queries))
    keys, key_owner = jnp.asarray(keys), jnp.asarray(key_owner)
    ranks, has_positive = [], []
    for start in range(0, len(queries), chunk):
        q, ids = queries[start : start + chunk], query_ids[start : start + chunk]
        pad = chunk - len(q)
        q = np.concatenate([q, np.zeros((pad, q.shape[1]), q.dtype)])
        ids = np.concatenate([ids, np.full(pad, -1, ids.dtype)])
        r, p = _best_positive_rank(q, keys, ids, key_owner)
        ranks.append(np.asarray(r)[: chunk - pad])
        has_positive.append(np.asarray(p)[: chunk - pad])
    return np.concatenate(ranks), np.concatenate(has_positive)


def recall_at_k(
    image_embeds: np.ndarray,
    text_embeds: np.ndarray,
    text_to_image: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@K as fractions: `i2t_r{k}` over the images that have a caption, `t2i_r{k}` over
    the captions. `image_embeds` `[N, D]`, `text_embeds` `[M, D]`, `text_to_image` `[M]` (the
    image of each caption). Scores are dot products (the embeddings are unit-norm already)."""
    image_embeds = np.asarray(image_embeds, np.float32)
    text_embeds = np.asarray(text_embeds, np.float32)
    text_to_image = np.asarray(text_to_image, np.int32)
    if image_embeds.ndim != 2 or text_embeds.ndim != 2 or image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(f"expected embeddings [N, D] and [M, D], got {image_embeds.shape} and {text_embeds.shape}")
    if text_to_image.shape != (len(text_embeds),):
        raise ValueError(f"text_to_image must have shape [{len(text_embeds)}], got {text_to_image.shape}")
    if not len(image_embeds) or not len(text_embeds):
        raise ValueError(f"retrieval needs images and texts, got {len(image_embeds)} and {len(text_embeds)}")
    if text_to_image.min() < 0 or text_to_image.max() >= len(image_embeds):
        raise ValueError(f"text_to_image must index the {len(image_embeds)} images")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    image_ids = np.arange(len(image_embeds), dtype=np.int32)
    t2i, _ = best_positive_ranks(text_embeds, image_embeds, text_to_image, image_ids, chunk_size)
    i2t, has_caption = best_positive_ranks(image_embeds, text_embeds, image_ids, text_to_image, chunk_size)
    i2t = i2t[has_caption]
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float(np.mean(i2t < k))
        out[f"t2i_r{k}"] = float(np.mean(t2i < k))
    return out


@functools.partial(jax.jit, static_argnums=0)
def encode_both(
    model: DualEncoder, variables: dict, images: jax.Array, input_ids: jax.Array, attention_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Both towers in inference mode; shared by all evaluators of a model (one compile per shape)."""
    image_embeds = model.apply(variables, images, method=DualEncoder.encode_image)
    text_embeds = model.apply(variables, input_ids, attention_mask, method=DualEncoder.encode_text)
    return image_embeds, text_embeds


class RetrievalEvaluator:
    """Recall@K of a dual encoder on an image-caption set, every caption field of an example
    counted as one more caption of its image.

    The evaluation set is read once per `run` with the input pipeline (filters included: examples
    it drops are reported as `skipped`); batches are padded to one shape, so the embedding
    function compiles once.
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
        caption_fields: Sequence[str] | None = None,
        ks: Sequence[int] = (1, 5, 10),
        max_examples: int = 0,
        prefix: str = "retrieval",
    ):
        check_batch_size(batch_size, mesh)
        if batch_size % jax.process_count():
            raise ValueError(f"batch_size {batch_size} is not divisible by the {jax.process_count()} processes")
        self.model = model
        self.mesh = mesh
        self.ks = tuple(ks)
        self.max_examples = max_examples
        self.prefix = prefix
        self.local_batch_size = batch_size // jax.process_count()
        config = data_config.copy_and_resolve_references()
        fields = list(data_config.captions) if caption_fields is None else list(caption_fields)
        config.captions = {field: 1.0 for field in fields}
        self.num_fields = len(fields)
        self.dataset = pipeline.make_dataset(
            data_spec,
            config,
            image_size=image_size,
            max_text_length=max_text_length,
            batch_size=self.local_batch_size,
            train=False,
            all_captions=True,
        )

    def _padded(self, batch: dict | None) -> dict[str, np.ndarray]:
        """This process's batch zero-padded to the local batch size, captions flattened to rows
        `[b * F, L]`, with the masks of the real images and valid captions."""
        b, f = self.local_batch_size, self.num_fields
        spec = self.dataset.element_spec
        n = 0 if batch is None else len(batch["images"])

        def pad(key):
            shape, dtype = (b, *spec[key].shape[1:]), spec[key].dtype.as_numpy_dtype
            out = np.zeros(shape, dtype)
            if n:
                out[:n] = batch[key]
            return out

        valid_captions = pad("caption_valid")
        return dict(
            images=pad("images"),
            input_ids=pad("input_ids").reshape(b * f, -1),
            attention_mask=pad("attention_mask").reshape(b * f, -1),
            image_valid=np.arange(b) < n,
            text_valid=valid_captions.reshape(b * f),
        )

    def embed(self, variables: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """One pass: `(image_embeds [N, D], text_embeds [M, D], text_to_image [M], skipped)` on
        every host, over the first `max_examples` images (all when 0). `variables` must live on
        the evaluator's mesh (e.g. the train state's, sharded as they are)."""
        images, texts, owners = [], [], []
        num_images = 0
        lockstep = LockstepPass(self.dataset)
        for batch in lockstep:
            padded = self._padded(batch)
            arrays = pipeline.to_global_batch(padded, self.mesh, keys=tuple(padded))
            image_embeds, text_embeds = encode_both(
                self.model, variables, arrays["images"], arrays["input_ids"], arrays["attention_mask"]
            )
            image_valid, text_valid = gather(arrays["image_valid"]), gather(arrays["text_valid"])
            # Caption row r belongs to image row r // F; number the kept images across batches.
            image_number = num_images + np.cumsum(image_valid) - 1
            images.append(gather(image_embeds)[image_valid])
            texts.append(gather(text_embeds)[text_valid])
            owners.append(np.repeat(image_number, self.num_fields)[text_valid])
            num_images += int(image_valid.sum())
            if self.max_examples and num_images >= self.max_examples:
                break
        total_skipped = lockstep.total_skipped()
        if not num_images:
            raise ValueError(f"the retrieval set yielded no examples ({total_skipped} skipped by the filters)")
        image_embeds, text_embeds, text_to_image = (np.concatenate(x) for x in (images, texts, owners))
        if self.max_examples:
            keep = text_to_image < self.max_examples
            image_embeds = image_embeds[: self.max_examples]
            text_embeds, text_to_image = text_embeds[keep], text_to_image[keep]
        return image_embeds, text_embeds, text_to_image, total_skipped

    def run(self, variables: dict) -> dict[str, float]:
        """`{prefix}/i2t_r{k}`, `{prefix}/t2i_r{k}`, `num_images`, `num_texts` and `skipped`."""
        image_embeds, text_embeds, text_to_image, skipped = self.embed(variables)
        metrics = recall_at_k(image_embeds, text_embeds, text_to_image, self.ks)
        metrics.update(num_images=float(len(image_embeds)), num_texts=float(len(text_embeds)), skipped=float(skipped))
        return {f"{self.prefix}/{name}": value for name, value in metrics.items()}
