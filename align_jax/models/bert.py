"""BERT text tower (post-LayerNorm, exact GELU), computing what HF's `AlignTextModel` computes.

`remat` and `scan_layers` are as in `align_jax.models.layers`. With `scan_layers=True` the layers'
parameters are stacked under `layers` instead of `layer_{i}`: to load converted HF weights or an
unscanned checkpoint into a scanned model, pass its text tower through `layers.stack_layers`.
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from align_jax.models.layers import FlatDense, remat_block, repeat_layers

# (hidden, layers, heads, intermediate)
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (64, 2, 2, 128),
    "small": (256, 4, 4, 1024),
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
}

ACTIVATIONS = {
    "gelu": functools.partial(nn.gelu, approximate=False),  # BERT/HF "gelu" is the exact erf form
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "relu": nn.relu,
    "swish": nn.swish,
    "silu": nn.swish,
}

weight_init = nn.initializers.normal(0.02)  # BERT's initializer_range


def bert_config(size: str, vocab_size: int = 30522, **overrides: Any) -> ml_collections.ConfigDict:
    """Every field of the `Bert` module for a named size ('tiny', 'small', 'base', 'large')."""
    if size not in SIZES:
        raise ValueError(f"unknown BERT size {size!r}; expected one of {list(SIZES)}")
    hidden, layers, heads, intermediate = SIZES[size]
    config = ml_collections.ConfigDict(
        dict(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            intermediate_size=intermediate,
            max_position_embeddings=512,
            type_vocab_size=2,
            layer_norm_eps=1e-12,
            hidden_dropout=0.1,
            attention_dropout=0.1,
            activation="gelu",
            remat="none",
            scan_layers=False,
        )
    )
    config.update(overrides)
    return config


class SelfAttention(nn.Module):
    num_heads: int
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, train: bool, query_rows: int | None = None) -> jax.Array:
        """Attention of the first `query_rows` positions (all when None) over every position."""
        hidden = x.shape[-1]
        if hidden % self.num_heads:
            raise ValueError(f"hidden size {hidden} is not a multiple of num_heads {self.num_heads}")
        head_dim = hidden // self.num_heads
        dense = functools.partial(FlatDense, hidden, dtype=self.dtype, kernel_init=weight_init)
        split = lambda t: t.reshape(t.shape[:-1] + (self.num_heads, head_dim))  # noqa: E731
        q = split(dense(name="query")(x if query_rows is None else x[:, :query_rows]))
        k = split(dense(name="key")(x))
        v = split(dense(name="value")(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(self.dtype)
        # HF adds the dtype's lowest value at padded keys; identical after the softmax.
        big_neg = jnp.finfo(scores.dtype).min
        scores = jnp.where(mask[:, None, None, :] > 0, scores, big_neg)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
        probs = nn.Dropout(self.dropout)(probs, deterministic=not train)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return dense(name="output")(out.reshape(out.shape[:2] + (hidden,)))


class TransformerLayer(nn.Module):
    num_heads: int
    intermediate_size: int
    layer_norm_eps: float
    hidden_dropout: float
    attention_dropout: float
    activation: str
    dtype: Any = jnp.float32
    # Only the first `query_rows` positions come out (keys and values still span the text): the
    # last layer when only [CLS] is read. Same parameters.
    query_rows: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
        hidden = x.shape[-1]
        norm = functools.partial(nn.LayerNorm, epsilon=self.layer_norm_eps, dtype=self.dtype)
        drop = functools.partial(nn.Dropout, self.hidden_dropout, deterministic=not train)
        attention = SelfAttention(self.num_heads, self.attention_dropout, self.dtype, name="attention")
        y = attention(x, mask, train, self.query_rows)
        if self.query_rows is not None:
            x = x[:, : self.query_rows]
        x = norm(name="attention_ln")(x + drop()(y))
        y = FlatDense(self.intermediate_size, dtype=self.dtype, kernel_init=weight_init, name="intermediate")(x)
        y = ACTIVATIONS[self.activation](y)
        y = FlatDense(hidden, dtype=self.dtype, kernel_init=weight_init, name="output")(y)
        return norm(name="output_ln")(x + drop()(y))


class Bert(nn.Module):
    """BERT encoder returning the final hidden states `[N, L, hidden_size]`."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    activation: str = "gelu"
    remat: str = "none"  # 'none', 'full' or 'dots' (see align_jax.models.vit)
    scan_layers: bool = False
    dtype: Any = jnp.float32

    @property
    def features(self) -> int:
        return self.hidden_size

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array, train: bool = False, first_token_only: bool = False
    ) -> jax.Array:
        """Final hidden states `[N, L, D]`; `[N, 1, D]` with `first_token_only` (all that `pool`
        reads): the last layer then projects, attends from and runs its MLP on the [CLS] row
        alone, ~(1 - 1/L) of a layer's FLOPs less (7% of BERT-base at length 64). Scanned layers
        share one shape, so there the last layer computes every row and the first is kept."""
        chex.assert_rank([input_ids, attention_mask], 2)
        chex.assert_equal_shape([input_ids, attention_mask])
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {list(ACTIVATIONS)}")
        length = input_ids.shape[1]
        if length > self.max_position_embeddings:
            raise ValueError(f"text length {length} exceeds max_position_embeddings {self.max_position_embeddings}")
        embed = functools.partial(nn.Embed, features=self.hidden_size, embedding_init=weight_init)
        x = embed(self.vocab_size, name="word_embeddings")(input_ids)
        x = x + embed(self.max_position_embeddings, name="position_embeddings")(jnp.arange(length))[None]
        # Single-segment input: token type 0 everywhere, as HF does when none is given.
        x = x + embed(self.type_vocab_size, name="token_type_embeddings")(jnp.zeros_like(input_ids))
        x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="embeddings_ln")(x)
        x = nn.Dropout(self.hidden_dropout)(x, deterministic=not train).astype(self.dtype)
        fields = dict(
            num_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            layer_norm_eps=self.layer_norm_eps,
            hidden_dropout=self.hidden_dropout,
            attention_dropout=self.attention_dropout,
            activation=self.activation,
            dtype=self.dtype,
        )
        cut_last = first_token_only and not self.scan_layers
        x = repeat_layers(
            TransformerLayer,
            fields,
            self.num_layers - cut_last,
            x,
            attention_mask,
            train=train,
            remat=self.remat,
            scan=self.scan_layers,
        )
        if cut_last:
            last = remat_block(TransformerLayer, self.remat, static_argnums=(3,))
            return last(**fields, query_rows=1, name=f"layer_{self.num_layers - 1}")(x, attention_mask, train)
        return x[:, :1] if first_token_only else x

    def pooled(self, input_ids: jax.Array, attention_mask: jax.Array, train: bool = False) -> jax.Array:
        """`[N, D]`: the pooled state the dual encoder embeds, with the last layer on [CLS] alone."""
        return self.pool(self(input_ids, attention_mask, train, first_token_only=True), attention_mask)

    def pool(self, hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """`[N, L, D]` states -> `[N, D]`: the [CLS] state, as ALIGN (and HF) embed text."""
        del attention_mask
        return hidden[:, 0]
