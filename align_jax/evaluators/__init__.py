"""Evaluators built from the config: each has `run(variables) -> {name: value}`."""

from align_jax.evaluators.retrieval import RetrievalEvaluator, recall_at_k
from align_jax.evaluators.zeroshot import (
    CLIP_IMAGENET_TEMPLATES,
    ZeroShotEvaluator,
    class_embeddings,
    classification_metrics,
)

__all__ = [
    "CLIP_IMAGENET_TEMPLATES",
    "RetrievalEvaluator",
    "ZeroShotEvaluator",
    "class_embeddings",
    "classification_metrics",
    "recall_at_k",
]
