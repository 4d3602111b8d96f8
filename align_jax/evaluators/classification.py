"""Classification accuracy of an image classifier (a fine-tuned tower with its head) on a
labelled image set: top-1, top-5 and mean per-class recall, equal scores ranked by class index
as zero-shot classification ranks them."""

from __future__ import annotations

import functools

import jax
import ml_collections

from align_jax.evaluators.lockstep import labelled_image_pass
from align_jax.evaluators.zeroshot import classification_metrics
from align_jax.input import pipeline
from align_jax.models import ImageClassifier
from align_jax.sharding import check_batch_size


@functools.partial(jax.jit, static_argnums=0)
def _logits(model: ImageClassifier, variables: dict, images: jax.Array) -> jax.Array:
    return model.apply(variables, images)


class ClassificationEvaluator:
    """Accuracy of `model(images)` against each record's integer `label_field`, over one pass of
    `data_spec` in padded batches of one shape sharded over the mesh."""

    def __init__(
        self,
        model: ImageClassifier,
        mesh: jax.sharding.Mesh,
        *,
        data_spec: str,
        data_config: ml_collections.ConfigDict,
        image_size: int,
        batch_size: int,
        label_field: str = "label",
        max_examples: int = 0,
        prefix: str = "classification",
    ):
        check_batch_size(batch_size, mesh)
        if batch_size % jax.process_count():
            raise ValueError(f"batch_size {batch_size} is not divisible by the {jax.process_count()} processes")
        if not isinstance(model, ImageClassifier):
            raise ValueError(f"classification evaluation needs an image classifier (model.num_classes), got {model}")
        self.model = model
        self.mesh = mesh
        self.label_field = label_field
        self.max_examples = max_examples
        self.prefix = prefix
        self.local_batch_size = batch_size // jax.process_count()
        images_only = data_config.copy_and_resolve_references()
        images_only.captions = {}
        self.dataset = pipeline.make_dataset(
            data_spec,
            images_only,
            image_size=image_size,
            max_text_length=0,
            batch_size=self.local_batch_size,
            train=False,
            label_field=label_field,
        )

    def run(self, variables: dict) -> dict[str, float]:
        """`{prefix}/top1`, `top5`, `mean_per_class_recall`, `num_images` and `skipped`."""
        logits, labels, skipped = labelled_image_pass(
            self.dataset,
            self.mesh,
            self.local_batch_size,
            functools.partial(_logits, self.model, variables),
            self.max_examples,
        )
        if labels.min() < 0:
            raise ValueError(f"{int((labels < 0).sum())} images have no {self.label_field!r} field")
        metrics = classification_metrics(logits, labels, ks=(1, 5))
        metrics.update(num_images=float(len(labels)), skipped=float(skipped))
        return {f"{self.prefix}/{name}": value for name, value in metrics.items()}
