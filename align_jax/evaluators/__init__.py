"""Evaluators built from the config: each has `run(variables) -> {name: value}`."""

from align_jax.evaluators.retrieval import RetrievalEvaluator, recall_at_k

__all__ = ["RetrievalEvaluator", "recall_at_k"]
