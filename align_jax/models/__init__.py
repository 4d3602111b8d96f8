"""Flax towers and the ALIGN dual encoder."""

from align_jax.models.dual_encoder import (
    DualEncoder,
    ImageClassifier,
    build_model,
    init_variables,
    l2_normalize,
    logits_per_image,
    pixels_to_unit_range,
)

__all__ = [
    "DualEncoder",
    "ImageClassifier",
    "build_model",
    "init_variables",
    "l2_normalize",
    "logits_per_image",
    "pixels_to_unit_range",
]
