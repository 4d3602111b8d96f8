"""The ALIGN dual encoder: image and text towers, projections, L2 normalisation, temperature;
and the image classifier that transfer builds on its image tower."""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from align_jax.models.bert import Bert
from align_jax.models.efficientnet import EfficientNet
from align_jax.models.text_transformer import TextTransformer
from align_jax.models.vit import ViT

_NORM_EPS = 1e-12


def pixels_to_unit_range(images: jax.Array) -> jax.Array:
    """uint8 pixels -> float32 in [-1, 1] (x / 127.5 - 1; ALIGN uses no mean/std); float input
    is taken to be in [-1, 1] already. Done on the device: the host ships uint8."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 127.5 - 1.0
    return images


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """x / ||x||, as HF does; the floor only guards an all-zero vector."""
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, _NORM_EPS**2))


class DualEncoder(nn.Module):
    """ALIGN: image embedding = pooled image tower (Dense-projected only when its width differs
    from `embed_dim`, as coyo-align does for non-B7 backbones); text embedding = Dense on the
    text tower's pooled state (its `pooled`: [CLS] for BERT, the last token for the CLIP-style
    Transformer); both L2-normalised; logits = similarity / learnable temperature."""

    image_tower: nn.Module
    text_tower: nn.Module
    embed_dim: int
    temperature_init: float = 1.0
    logit_bias_init: float | None = None  # the sigmoid (SigLIP) loss's learnable bias
    dtype: Any = jnp.float32

    def setup(self):
        # Declared always, created only when called: align-base has no image projection.
        self.image_projection = nn.Dense(self.embed_dim, dtype=self.dtype, name="image_projection")
        self.text_projection = nn.Dense(
            self.embed_dim,
            dtype=self.dtype,
            kernel_init=nn.initializers.xavier_uniform(),
            name="text_projection",
        )
        self.temperature = self.param("temperature", nn.initializers.constant(self.temperature_init), (), jnp.float32)
        if self.logit_bias_init is not None:
            self.logit_bias = self.param("logit_bias", nn.initializers.constant(self.logit_bias_init), (), jnp.float32)

    def encode_image(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Images `[N, H, W, 3]`, uint8 pixels or float in [-1, 1] -> unit-norm float32
        embeddings `[N, embed_dim]`."""
        features = self.image_tower(pixels_to_unit_range(images), train=train)
        if features.shape[-1] != self.embed_dim:
            features = self.image_projection(features)
        return l2_normalize(features.astype(jnp.float32))

    def image_features(self, images: jax.Array, train: bool = False) -> jax.Array:
        """The pooled image tower `[N, C]` in float32, before the projection and normalisation
        (what a linear probe reads)."""
        return self.image_tower(pixels_to_unit_range(images), train=train).astype(jnp.float32)

    def encode_text(self, input_ids: jax.Array, attention_mask: jax.Array, train: bool = False) -> jax.Array:
        """Token ids and mask `[N, L]` -> unit-norm float32 embeddings `[N, embed_dim]`."""
        features = self.text_projection(self.text_tower.pooled(input_ids, attention_mask, train=train))
        return l2_normalize(features.astype(jnp.float32))

    def __call__(
        self, images: jax.Array, input_ids: jax.Array, attention_mask: jax.Array, train: bool = False
    ) -> dict[str, jax.Array]:
        image_embeds = self.encode_image(images, train)
        text_embeds = self.encode_text(input_ids, attention_mask, train)
        chex.assert_equal_shape([image_embeds[0], text_embeds[0]])
        out = dict(image_embeds=image_embeds, text_embeds=text_embeds, temperature=self.temperature)
        if self.logit_bias_init is not None:
            out["logit_bias"] = self.logit_bias
        return out


class ImageClassifier(nn.Module):
    """Logits = a linear head on the pooled image tower (how ALIGN transfers its image tower to
    classification). The head starts at zero, as in big_vision's transfer configs: the first steps move
    the head from the pretrained features instead of back-propagating a random projection into
    them. The tower is the dual encoder's (`image_tower`), so its variables load from a
    pretraining checkpoint under the same names."""

    image_tower: nn.Module
    num_classes: int
    dtype: Any = jnp.float32

    def setup(self):
        # Logits in float32 whatever the compute dtype: the loss and the argmax read them.
        self.head = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, dtype=jnp.float32, name="head")

    def image_features(self, images: jax.Array, train: bool = False) -> jax.Array:
        """The pooled image tower `[N, C]` in float32 (what the head and a linear probe read)."""
        return self.image_tower(pixels_to_unit_range(images), train=train).astype(jnp.float32)

    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Images `[N, H, W, 3]` (uint8, or float in [-1, 1]) -> float32 logits `[N, num_classes]`."""
        return self.head(self.image_features(images, train))


def logits_per_image(image_embeds: jax.Array, text_embeds: jax.Array, temperature: jax.Array) -> jax.Array:
    """`[N_images, N_texts]` similarities divided by the temperature (HF's `logits_per_image`)."""
    return image_embeds @ text_embeds.T / temperature


def _module_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """ConfigDict -> module kwargs; lists become tuples so the module stays hashable."""
    return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in config.to_dict().items()}


IMAGE_TOWERS: dict[str, type[nn.Module]] = {"efficientnet": EfficientNet, "vit": ViT}
TEXT_TOWERS: dict[str, type[nn.Module]] = {"bert": Bert, "transformer": TextTransformer}


def build_model(config: ml_collections.ConfigDict) -> DualEncoder | ImageClassifier:
    """The DualEncoder described by a model config (see `align_jax.models.presets`), or with
    `num_classes` > 0 the ImageClassifier of its image tower; a tower config without `type` is
    EfficientNet / BERT (configs written before there was a choice)."""
    dtype = jnp.dtype(config.get("dtype", "float32"))
    image_type = config.image.get("type", "efficientnet")
    text_type = config.text.get("type", "bert")
    if image_type not in IMAGE_TOWERS:
        raise ValueError(f"model.image.type: unknown image tower {image_type!r}; expected one of {list(IMAGE_TOWERS)}")
    if text_type not in TEXT_TOWERS:
        raise ValueError(f"model.text.type: unknown text tower {text_type!r}; expected one of {list(TEXT_TOWERS)}")
    image_fields = {k: v for k, v in _module_fields(config.image).items() if k != "type"}
    text_fields = {k: v for k, v in _module_fields(config.text).items() if k != "type"}
    if image_type == "vit":
        # The input size the position embeddings are laid out for is the model's image size.
        image_fields = {"image_size": config.image_size, **image_fields}
    num_classes = config.get("num_classes", 0)
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"model.num_classes must be a non-negative integer, got {num_classes!r}")
    if num_classes:
        return ImageClassifier(IMAGE_TOWERS[image_type](**image_fields, dtype=dtype), num_classes, dtype)
    return DualEncoder(
        image_tower=IMAGE_TOWERS[image_type](**image_fields, dtype=dtype),
        text_tower=TEXT_TOWERS[text_type](**text_fields, dtype=dtype),
        embed_dim=config.embed_dim,
        temperature_init=config.temperature_init,
        logit_bias_init=config.get("logit_bias_init"),
        dtype=dtype,
    )


def init_variables(model: DualEncoder | ImageClassifier, config: ml_collections.ConfigDict, rng: jax.Array) -> dict:
    """Initial `{'params', 'batch_stats'}` for a batch of one at the configured sizes."""
    images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    if isinstance(model, ImageClassifier):
        return dict(jax.jit(model.init)(rng, images))
    ids = jnp.zeros((1, config.max_text_length), jnp.int32)
    return dict(jax.jit(model.init)(rng, images, ids, jnp.ones_like(ids)))
