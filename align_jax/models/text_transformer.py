"""CLIP-style Transformer text tower (Radford et al. 2021, section 2.4): token and learned
position embeddings, pre-LN layers (the ViT encoder's), a final LayerNorm, a causal mask, and
the text embedding taken at the end-of-sequence token.

CLIP finds its EOT token with an argmax over token ids (EOT has the largest id in its BPE
vocabulary); here the end is the last position the attention mask keeps, which works for any
tokenizer that closes the text with a marker, such as the WordPiece one's [SEP].
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from align_jax.models.layers import Encoder

# (hidden, layers, heads, MLP width): CLIP's text towers (ViT-B and ViT-L/14 models); "tiny" for tests.
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (32, 2, 2, 64),
    "base": (512, 12, 8, 2048),
    "large": (768, 12, 12, 3072),
}

POOLINGS = ("eos", "first")


def text_transformer_config(variant: str, vocab_size: int, **overrides: Any) -> ml_collections.ConfigDict:
    """Every field of the `TextTransformer` module for a named size ('tiny', 'base', 'large')."""
    if variant not in SIZES:
        raise ValueError(f"unknown text Transformer size {variant!r}; expected one of {list(SIZES)}")
    hidden, layers, heads, mlp = SIZES[variant]
    config = ml_collections.ConfigDict(
        dict(
            type="transformer",
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            intermediate_size=mlp,
            max_position_embeddings=77,  # CLIP's context length
            causal=True,
            pooling="eos",
            layer_norm_eps=1e-5,
            dropout=0.0,
            activation="gelu",
            remat="none",
            scan_layers=False,
        )
    )
    config.update(overrides)
    return config


def last_valid_index(attention_mask: jax.Array) -> jax.Array:
    """`[N, L]` mask -> `[N]` index of each row's last kept position (0 for an empty row)."""
    positions = jnp.arange(attention_mask.shape[1])
    return jnp.argmax(jnp.where(attention_mask > 0, positions, -1), axis=1)


class TextTransformer(nn.Module):
    """Transformer text encoder returning the final hidden states `[N, L, hidden_size]`;
    `pool` picks the state that the dual encoder projects."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 77
    causal: bool = True
    pooling: str = "eos"
    layer_norm_eps: float = 1e-5
    dropout: float = 0.0
    activation: str = "gelu"
    remat: str = "none"
    scan_layers: bool = False
    dtype: Any = jnp.float32

    @property
    def features(self) -> int:
        return self.hidden_size

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, train: bool = False) -> jax.Array:
        chex.assert_rank([input_ids, attention_mask], 2)
        chex.assert_equal_shape([input_ids, attention_mask])
        length = input_ids.shape[1]
        if length > self.max_position_embeddings:
            raise ValueError(f"text length {length} exceeds max_position_embeddings {self.max_position_embeddings}")
        x = nn.Embed(
            self.vocab_size, self.hidden_size, embedding_init=nn.initializers.normal(0.02), name="token_embedding"
        )(input_ids)
        posemb = self.param(
            "position_embedding",
            nn.initializers.normal(0.01),
            (self.max_position_embeddings, self.hidden_size),
            jnp.float32,
        )
        x = (x + posemb[None, :length]).astype(self.dtype)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        # Padded keys are masked out; with the causal mask they already are for every real token
        # (padding comes last), so the padding mask matters only when `causal` is off.
        mask = (attention_mask > 0)[:, None, None, :]
        if self.causal:
            mask = mask & nn.make_causal_mask(input_ids, dtype=jnp.bool_)
        return Encoder(
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
        )(x, mask, train)

    def pooled(self, input_ids: jax.Array, attention_mask: jax.Array, train: bool = False) -> jax.Array:
        """`[N, D]`: the pooled state the dual encoder embeds (`pool` of the final states)."""
        return self.pool(self(input_ids, attention_mask, train), attention_mask)

    def pool(self, hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """`[N, L, D]` states -> `[N, D]`: at the last kept token ('eos'; under the causal mask
        the only one that has seen the whole text) or at the first ('first')."""
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.pooling == "first":
            return hidden[:, 0]
        index = last_valid_index(attention_mask)
        return jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]
