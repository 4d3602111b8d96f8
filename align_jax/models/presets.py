"""Named model configurations: the two from the ALIGN paper / HF, and small ones for CPU work.

A model config holds every field the towers take, so a config saved as JSON describes the
model completely; `image_size` and `max_text_length` are the inputs the model was built for.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from align_jax.models.bert import bert_config
from align_jax.models.efficientnet import efficientnet_config
from align_jax.models.text_transformer import text_transformer_config
from align_jax.models.vit import vit_config

BERT_VOCAB_SIZE = 30522  # bert-base-uncased, as used by ALIGN and kakaobrain/align-base


def model_config(
    image: ml_collections.ConfigDict,
    text: ml_collections.ConfigDict,
    embed_dim: int,
    image_size: int,
    max_text_length: int,
) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            image=image,
            text=text,
            embed_dim=embed_dim,
            temperature_init=1.0,
            logit_bias_init=None,  # set (e.g. -10) to train with the sigmoid loss
            image_size=image_size,
            max_text_length=max_text_length,
            dtype="float32",
        )
    )


def align_base() -> ml_collections.ConfigDict:
    """kakaobrain/align-base: EfficientNet-B7 at 289 px + BERT-base, 640-d embeddings."""
    return model_config(efficientnet_config("b7"), bert_config("base", BERT_VOCAB_SIZE), 640, 289, 64)


def align_l2() -> ml_collections.ConfigDict:
    """The paper's largest: EfficientNet-L2 + BERT-Large; embedding = the L2 last-stage width."""
    return model_config(efficientnet_config("l2"), bert_config("large", BERT_VOCAB_SIZE), 1376, 289, 64)


def small() -> ml_collections.ConfigDict:
    """EfficientNet-B0 at 224 px + a 4-layer, 256-wide BERT; text length 32 (CPU benchmarks)."""
    return model_config(efficientnet_config("b0"), bert_config("small", BERT_VOCAB_SIZE), 320, 224, 32)


def tiny() -> ml_collections.ConfigDict:
    """A few-hundred-thousand-parameter model for tests and the CPU demo; its image width (80)
    differs from the embedding size, so it also exercises the image projection."""
    image = efficientnet_config("b0", width_coefficient=0.25, depth_coefficient=0.5)
    return model_config(image, bert_config("tiny", 1024), 64, 64, 16)


def vit_b16_bert_base() -> ml_collections.ConfigDict:
    """ALIGN with a ViT-B/16 image tower at 224 px (as in LiT/CLIP) + BERT-base; the embedding is
    the ViT width, so, like align-base, the image tower needs no projection."""
    return model_config(vit_config("B/16"), bert_config("base", BERT_VOCAB_SIZE), 768, 224, 64)


def clip_b16() -> ml_collections.ConfigDict:
    """CLIP ViT-B/16's shape: ViT-B/16 at 224 px + the 512-wide causal Transformer text tower,
    512-d embeddings (here with the WordPiece vocabulary)."""
    return model_config(vit_config("B/16"), text_transformer_config("base", BERT_VOCAB_SIZE), 512, 224, 64)


def tiny_vit() -> ml_collections.ConfigDict:
    """The ViT / Transformer counterpart of `tiny`: 32-wide towers at 32 px with 8 px patches."""
    return model_config(vit_config("tiny/8"), text_transformer_config("tiny", 1024), 32, 32, 16)


PRESETS: dict[str, Callable[[], ml_collections.ConfigDict]] = {
    "align_base": align_base,
    "align_l2": align_l2,
    "small": small,
    "tiny": tiny,
    "vit_b16_bert_base": vit_b16_bert_base,
    "clip_b16": clip_b16,
    "tiny_vit": tiny_vit,
}


def get(name: str) -> ml_collections.ConfigDict:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]()
