"""Vision Transformer image tower (Dosovitskiy et al. 2021, laid out as big_vision's `vit.py`):
patch embedding, learned position embeddings, the pre-LN encoder of `layers.py`, pooling."""

from __future__ import annotations

import math
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from align_jax.models.layers import Encoder

# (hidden, layers, heads, MLP width): ViT paper table 1, "So400m" from SigLIP's shape-optimised
# ViT (Alabdulmohsin et al. 2023); "tiny" is for tests.
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (32, 2, 2, 64),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
    "So400m": (1152, 27, 16, 4304),
}

VIT_POOLINGS = ("gap", "cls")


def vit_config(variant: str, patch_size: int | None = None, **overrides: Any) -> ml_collections.ConfigDict:
    """Every field of the `ViT` module for a named variant, 'B/16' or ('B', 16) alike; the input
    size the position embeddings are laid out for is the model config's `image_size`."""
    size, _, patch = variant.partition("/")
    if size not in SIZES:
        raise ValueError(f"unknown ViT variant {size!r}; expected one of {list(SIZES)}")
    if patch:
        if patch_size is not None and int(patch) != patch_size:
            raise ValueError(f"ViT variant {variant!r} disagrees with patch_size {patch_size}")
        patch_size = int(patch)
    if patch_size is None:
        raise ValueError(f"ViT variant {variant!r} needs a patch size ('{size}/16' or patch_size=16)")
    hidden, layers, heads, mlp = SIZES[size]
    config = ml_collections.ConfigDict(
        dict(
            type="vit",
            patch_size=patch_size,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            intermediate_size=mlp,
            pooling="gap",
            layer_norm_eps=1e-6,
            dropout=0.0,
            activation="gelu",
            remat="none",
            scan_layers=False,
        )
    )
    config.update(overrides)
    return config


def resize_position_embedding(posemb: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """`[1, h*w, D]` embeddings of a square grid -> `[1, grid[0]*grid[1], D]`, bilinearly
    resampled, so a model runs at a resolution other than the one it was built for."""
    old = math.isqrt(posemb.shape[1])
    if old * old != posemb.shape[1]:
        raise ValueError(f"position embeddings of {posemb.shape[1]} tokens are not a square grid")
    if (old, old) == tuple(grid):
        return posemb
    posemb = posemb.reshape(1, old, old, -1)
    posemb = jax.image.resize(posemb, (1, *grid, posemb.shape[-1]), method="bilinear")
    return posemb.reshape(1, grid[0] * grid[1], -1)


class ViT(nn.Module):
    """Vision Transformer returning the pooled tokens `[N, hidden_size]` after the final
    LayerNorm: their mean ('gap') or a learned class token's state ('cls'). Position
    embeddings cover the patches only (big_vision), laid out for `image_size` and resampled
    for other input sizes."""

    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    image_size: int = 224
    pooling: str = "gap"
    layer_norm_eps: float = 1e-6
    dropout: float = 0.0
    activation: str = "gelu"
    remat: str = "none"
    scan_layers: bool = False
    dtype: Any = jnp.float32

    @property
    def features(self) -> int:
        """Width of the pooled output."""
        return self.hidden_size

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        chex.assert_rank(images, 4)
        if self.pooling not in VIT_POOLINGS:
            raise ValueError(f"pooling must be one of {VIT_POOLINGS}, got {self.pooling!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        x = nn.Conv(
            self.hidden_size,
            (self.patch_size, self.patch_size),
            strides=self.patch_size,
            padding="VALID",
            dtype=self.dtype,
            name="patch_embedding",
        )(images.astype(self.dtype))
        n, h, w, d = x.shape
        grid = self.image_size // self.patch_size
        posemb = self.param(
            "position_embedding", nn.initializers.normal(1 / math.sqrt(d)), (1, grid * grid, d), jnp.float32
        )
        x = x.reshape(n, h * w, d) + resize_position_embedding(posemb, (h, w)).astype(self.dtype)
        if self.pooling == "cls":
            cls = self.param("cls_token", nn.initializers.zeros, (1, 1, d), jnp.float32)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (n, 1, d)), x], axis=1)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        x = Encoder(
            self.num_layers,
            self.num_heads,
            self.intermediate_size,
            self.layer_norm_eps,
            self.dropout,
            self.activation,
            self.remat,
            self.scan_layers,
            self.dtype,
            name="encoder",
        )(x, None, train)
        return x[:, 0] if self.pooling == "cls" else jnp.mean(x, axis=1)
