"""Evaluators built from the config: each has `run(variables) -> {name: value}`."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from align_jax.evaluators.classification import ClassificationEvaluator
from align_jax.evaluators.image_text import ImageTextEvaluator, composed_queries, query_recall_at_k
from align_jax.evaluators.linear_probe import (
    LinearProbeEvaluator,
    RidgeClassifier,
    few_shot_indices,
    fit_ridge,
    linear_probe_metrics,
)
from align_jax.evaluators.retrieval import RetrievalEvaluator, recall_at_k
from align_jax.evaluators.zeroshot import (
    CLIP_IMAGENET_TEMPLATES,
    ZeroShotEvaluator,
    class_embeddings,
    classification_metrics,
)

__all__ = [
    "CLIP_IMAGENET_TEMPLATES",
    "ClassificationEvaluator",
    "ImageTextEvaluator",
    "LinearProbeEvaluator",
    "RetrievalEvaluator",
    "RidgeClassifier",
    "ZeroShotEvaluator",
    "build_evaluators",
    "class_embeddings",
    "classification_metrics",
    "composed_queries",
    "few_shot_indices",
    "fit_ridge",
    "linear_probe_metrics",
    "query_recall_at_k",
    "recall_at_k",
]


def build_evaluators(config: ml_collections.ConfigDict, model, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """`config.evals` (name -> `retrieval_eval(...)`, `zeroshot_eval(...)`, `image_text_eval(...)`,
    `linear_probe_eval(...)` or `classification_eval(...)` of `align_jax.config`) -> evaluators,
    keyed by name (their metrics are prefixed with it)."""
    evaluators = {}
    for name, cfg in config.evals.items():
        if cfg.type == "linear_probe":
            evaluators[name] = LinearProbeEvaluator(
                model,
                mesh,
                train_spec=cfg.train_data,
                test_spec=cfg.data,
                data_config=config.data,
                image_size=config.model.image_size,
                batch_size=cfg.batch_size or config.batch_size,
                label_field=cfg.label_field,
                num_classes=cfg.num_classes,
                features=cfg.features,
                shots=tuple(cfg.shots),
                l2_regs=tuple(cfg.l2_regs),
                validation_fraction=cfg.validation_fraction,
                seed=cfg.seed,
                max_train_examples=cfg.max_train_examples,
                max_examples=cfg.max_examples,
                prefix=name,
            )
            continue
        if cfg.type == "image_text":
            evaluators[name] = ImageTextEvaluator(
                model,
                mesh,
                queries_spec=cfg.queries,
                gallery_spec=cfg.gallery,
                data_config=config.data,
                image_size=config.model.image_size,
                max_text_length=config.model.max_text_length,
                batch_size=cfg.batch_size or config.batch_size,
                modifier_field=cfg.modifier_field,
                target_field=cfg.target_field,
                id_field=cfg.id_field,
                text_weight=cfg.text_weight,
                max_examples=cfg.max_examples,
                prefix=name,
            )
            continue
        common = dict(
            data_spec=cfg.data or config.data.eval,
            data_config=config.data,
            image_size=config.model.image_size,
            max_text_length=config.model.max_text_length,
            batch_size=cfg.batch_size or config.batch_size,
            max_examples=cfg.max_examples,
            prefix=name,
        )
        if cfg.type == "retrieval":
            fields = tuple(cfg.caption_fields) or None
            evaluators[name] = RetrievalEvaluator(model, mesh, caption_fields=fields, **common)
        elif cfg.type == "classification":
            del common["max_text_length"]
            label_field = cfg.label_field or config.data.get("label_field", "label")
            evaluators[name] = ClassificationEvaluator(model, mesh, label_field=label_field, **common)
        elif cfg.type == "zeroshot":
            evaluators[name] = ZeroShotEvaluator(
                model,
                mesh,
                class_names=list(cfg.class_names),
                templates=list(cfg.templates) or None,
                label_field=cfg.label_field,
                **common,
            )
        else:
            raise ValueError(f"config.evals.{name}.type: unknown evaluator {cfg.type!r}")
    return evaluators
