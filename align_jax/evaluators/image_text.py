"""Image+text query retrieval: a query image plus a text saying what to change ("on a black
background", "blue circle") should find the target image in a gallery.

ALIGN (Jia et al. 2021, section 7) queries its image index with the sum of an image embedding and
a text embedding. Here a query is `normalise(image + text_weight * text)` and the metric is
Recall@K of its target among the gallery images, ranked as in retrieval (stable order on ties).
The image-only and text-only queries are scored too: composition is only useful where it beats
both, and those two numbers say by how much.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from align_jax.evaluators.lockstep import LockstepPass, gather
from align_jax.evaluators.retrieval import best_positive_ranks, encode_both
from align_jax.input import pipeline
from align_jax.models import DualEncoder
from align_jax.sharding import check_batch_size


def composed_queries(image_embeds: np.ndarray, text_embeds: np.ndarray, text_weight: float = 1.0) -> np.ndarray:
    """`normalise(image + text_weight * text)` per row; both inputs `[N, D]`."""
    image_embeds, text_embeds = np.asarray(image_embeds, np.float32), np.asarray(text_embeds, np.float32)
    if image_embeds.shape != text_embeds.shape or image_embeds.ndim != 2:
        raise ValueError(f"expected two [N, D] arrays of one shape, got {image_embeds.shape} and {text_embeds.shape}")
    summed = image_embeds + text_weight * text_embeds
    return summed / np.maximum(np.linalg.norm(summed, axis=1, keepdims=True), 1e-12)


def query_recall_at_k(
    queries: np.ndarray,
    gallery: np.ndarray,
    targets: np.ndarray,
    gallery_ids: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """`r{k}`: the fraction of queries whose target (a gallery image with the query's target id;
    when several share it, the best placed counts) is among the K gallery images they score
    highest. `queries` `[N, D]`, `gallery` `[M, D]`, `targets` `[N]`, `gallery_ids` `[M]`."""
    queries, gallery = np.asarray(queries, np.float32), np.asarray(gallery, np.float32)
    targets, gallery_ids = np.asarray(targets, np.int64), np.asarray(gallery_ids, np.int64)
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"expected embeddings [N, D] and [M, D], got {queries.shape} and {gallery.shape}")
    if targets.shape != (len(queries),) or gallery_ids.shape != (len(gallery),):
        raise ValueError(
            f"expected targets [{len(queries)}] and gallery ids [{len(gallery)}], "
            f"got {targets.shape} and {gallery_ids.shape}"
        )
    if not len(queries) or not len(gallery):
        raise ValueError(f"image+text retrieval needs queries and a gallery, got {len(queries)} and {len(gallery)}")
    if targets.min() < 0:
        raise ValueError(f"{int((targets < 0).sum())} queries have no target id (ids must be >= 0)")
    if gallery_ids.min() < 0:
        raise ValueError(f"{int((gallery_ids < 0).sum())} gallery images have no id (ids must be >= 0)")
    missing = ~np.isin(targets, gallery_ids)
    if missing.any():
        raise ValueError(
            f"{int(missing.sum())} of {len(targets)} queries have a target id that is not in the gallery, "
            f"e.g. {targets[missing][:5].tolist()}"
        )
    # Ids are any integers (the evaluator's pass keeps them in int32); renumbered 0..U-1 for ranking.
    unique, gallery_owner = np.unique(gallery_ids, return_inverse=True)
    query_owner = np.searchsorted(unique, targets)
    ranks, _ = best_positive_ranks(
        queries, gallery, query_owner.astype(np.int32), gallery_owner.astype(np.int32), chunk_size
    )
    return {f"r{k}": float(np.mean(ranks < k)) for k in ks}


@functools.partial(jax.jit, static_argnums=0)
def _encode_image(model: DualEncoder, variables: dict, images: jax.Array) -> jax.Array:
    return model.apply(variables, images, method=DualEncoder.encode_image)


def _padded(batch: dict | None, spec: dict, rows: int, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The `keys` of this process's batch zero-padded to `rows`, and `valid`, the real rows."""
    n = 0 if batch is None else len(batch["images"])
    out = {}
    for key in keys:
        dtype = np.int32 if key == "labels" else spec[key].dtype.as_numpy_dtype  # JAX's default int width
        out[key] = np.zeros((rows, *spec[key].shape[1:]), dtype)
        if n:
            if key == "labels" and np.abs(batch[key]).max() > np.iinfo(np.int32).max:
                raise ValueError(f"ids beyond the int32 range in {batch[key][np.abs(batch[key]) > 2**31 - 1][:3]}")
            out[key][:n] = batch[key]
    out["valid"] = np.arange(rows) < n
    return out


class ImageTextEvaluator:
    """Recall@K of composed image+text queries against a gallery of images with integer ids.

    Query records hold an image, a modifier text (`modifier_field`) and the id of their target
    (`target_field`); gallery records an image and its id (`id_field`). Both sets are read with the
    input pipeline (its filters apply: a query with an empty modifier is skipped and counted), in
    padded batches of one shape, so each tower compiles once.
    """

    def __init__(
        self,
        model: DualEncoder,
        mesh: jax.sharding.Mesh,
        *,
        queries_spec: str,
        gallery_spec: str,
        data_config: ml_collections.ConfigDict,
        image_size: int,
        max_text_length: int,
        batch_size: int,
        modifier_field: str = "modifier",
        target_field: str = "target",
        id_field: str = "id",
        text_weight: float = 1.0,
        ks: Sequence[int] = (1, 5, 10),
        max_examples: int = 0,
        prefix: str = "image_text",
    ):
        check_batch_size(batch_size, mesh)
        if batch_size % jax.process_count():
            raise ValueError(f"batch_size {batch_size} is not divisible by the {jax.process_count()} processes")
        self.model = model
        self.mesh = mesh
        self.text_weight = text_weight
        self.ks = tuple(ks)
        self.max_examples = max_examples
        self.prefix = prefix
        self.local_batch_size = batch_size // jax.process_count()
        common = dict(
            image_size=image_size, max_text_length=max_text_length, batch_size=self.local_batch_size, train=False
        )
        with_modifier = data_config.copy_and_resolve_references()
        with_modifier.captions = {modifier_field: 1.0}
        self.queries = pipeline.make_dataset(queries_spec, with_modifier, label_field=target_field, **common)
        images_only = data_config.copy_and_resolve_references()
        images_only.captions = {}
        self.gallery = pipeline.make_dataset(gallery_spec, images_only, label_field=id_field, **common)

    def _pass(self, dataset, encode, keys: Sequence[str], limit: int = 0) -> tuple[list[np.ndarray], int]:
        """`[embeddings..., labels]` over one lockstep pass (the first `limit` rows when set) and
        the examples the filters skipped."""
        columns = None
        num_rows = 0
        lockstep = LockstepPass(dataset)
        for batch in lockstep:
            padded = _padded(batch, dataset.element_spec, self.local_batch_size, (*keys, "labels"))
            arrays = pipeline.to_global_batch(padded, self.mesh, keys=tuple(padded))
            valid = gather(arrays["valid"])
            outputs = [*encode(arrays), arrays["labels"]]
            rows = [gather(x)[valid] for x in outputs]
            columns = [[r] for r in rows] if columns is None else [c + [r] for c, r in zip(columns, rows, strict=True)]
            num_rows += int(valid.sum())
            if limit and num_rows >= limit:
                break
        skipped = lockstep.total_skipped()
        if not num_rows:
            raise ValueError(f"the image+text query set yielded no examples ({skipped} skipped by the filters)")
        return [np.concatenate(c)[: limit or None] for c in columns], skipped

    def embed(self, variables: dict) -> dict[str, np.ndarray | int]:
        """Query image and text embeddings, targets, gallery embeddings and ids, on every host."""
        (query_images, query_texts, targets), query_skipped = self._pass(
            self.queries,
            lambda a: encode_both(self.model, variables, a["images"], a["input_ids"], a["attention_mask"]),
            ("images", "input_ids", "attention_mask"),
            self.max_examples,
        )
        (gallery, gallery_ids), gallery_skipped = self._pass(
            self.gallery, lambda a: [_encode_image(self.model, variables, a["images"])], ("images",)
        )
        return dict(
            query_images=query_images,
            query_texts=query_texts,
            targets=targets,
            gallery=gallery,
            gallery_ids=gallery_ids,
            skipped=query_skipped + gallery_skipped,
        )

    def run(self, variables: dict) -> dict[str, float]:
        """`{prefix}/r{k}` of the composed queries, `{prefix}/image_only_r{k}` and
        `{prefix}/text_only_r{k}` of the two halves alone, `num_queries`, `num_gallery`, `skipped`."""
        e = self.embed(variables)
        recall = functools.partial(
            query_recall_at_k, gallery=e["gallery"], targets=e["targets"], gallery_ids=e["gallery_ids"], ks=self.ks
        )
        metrics = recall(composed_queries(e["query_images"], e["query_texts"], self.text_weight))
        for name, queries in (("image_only", e["query_images"]), ("text_only", e["query_texts"])):
            metrics.update({f"{name}_{k}": v for k, v in recall(queries).items()})
        metrics.update(
            num_queries=float(len(e["targets"])), num_gallery=float(len(e["gallery"])), skipped=float(e["skipped"])
        )
        return {f"{self.prefix}/{name}": value for name, value in metrics.items()}
