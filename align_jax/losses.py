"""Contrastive losses for a batch sharded over devices.

Each function sees one device's rows (`[b, D]` image and text embeddings) and, given `axis_name`
(the mesh axes the batch is sharded over, inside `shard_map`), scores them against the columns of
*every* device, so each example has the whole global batch B as negatives (ALIGN section 4).
Without `axis_name` they are the plain single-device losses. All return the global loss,
identical on every device, and gradients flow back through the gather to the device that owns
each embedding.

- `softmax_contrastive_loss`: all-gather the columns, `[b, B]` logits per direction.
- `chunked_softmax_contrastive_loss`: the same value and gradients, but the columns travel round a
  ring of `ppermute`s in blocks with an online logsumexp, and the backward pass recomputes the
  blocks: at most `b x chunk` logits are alive, so memory grows linearly in B.
- `sigmoid_contrastive_loss`: SigLIP's pairwise sigmoid loss with a learnable bias.

`softmax_cross_entropy` is the classification loss of transfer (fine-tuning with a new head).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

AxisName = str | Sequence[str] | None

REDUCTIONS = ("sum", "mean")


def _axis(axis_name: AxisName):
    return tuple(axis_name) if isinstance(axis_name, (list, tuple)) else axis_name


def _layout(rows: jax.Array, axis_name: AxisName) -> tuple[int, jax.Array | int, int]:
    """(number of devices, this device's index, global batch) along the batch axes."""
    if axis_name is None:
        return 1, 0, rows.shape[0]
    n = jax.lax.axis_size(_axis(axis_name))
    return n, jax.lax.axis_index(_axis(axis_name)), n * rows.shape[0]


def _direction_weight(reduction: str) -> float:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    # ALIGN sums the image->text and text->image losses; HF averages them.
    return 1.0 if reduction == "sum" else 0.5


def _smoothed_cross_entropy(lse: jax.Array, positive: jax.Array, row_sum: jax.Array, smoothing: float, classes: int):
    """Cross-entropy against (1 - e) one-hot + e / classes, from per-row logsumexp, positive
    logit and sum of logits."""
    return lse - (1.0 - smoothing) * positive - (smoothing / classes) * row_sum


def clamp_temperature(temperature: jax.Array, min_temperature: float | None) -> jax.Array:
    """Optional lower clamp (open_clip clamps the logit scale at 100, i.e. temperature 0.01)."""
    return temperature if min_temperature is None else jnp.maximum(temperature, min_temperature)


def softmax_contrastive_loss(
    image_embeds: jax.Array,
    text_embeds: jax.Array,
    temperature: jax.Array,
    *,
    label_smoothing: float = 0.1,
    reduction: str = "sum",
    min_temperature: float | None = None,
    axis_name: AxisName = None,
) -> jax.Array:
    """Normalised-softmax loss, image->text plus text->image, over the global batch."""
    weight = _direction_weight(reduction)
    t = clamp_temperature(temperature, min_temperature)
    _, index, global_batch = _layout(image_embeds, axis_name)
    if axis_name is None:
        all_images, all_texts = image_embeds, text_embeds
    else:
        all_images = jax.lax.all_gather(image_embeds, _axis(axis_name), tiled=True)
        all_texts = jax.lax.all_gather(text_embeds, _axis(axis_name), tiled=True)
    labels = index * image_embeds.shape[0] + jnp.arange(image_embeds.shape[0])
    total = 0.0
    for rows, columns in ((image_embeds, all_texts), (text_embeds, all_images)):
        logits = rows @ columns.T / t
        positive = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
        ce = _smoothed_cross_entropy(
            jax.nn.logsumexp(logits, axis=1), positive, logits.sum(axis=1), label_smoothing, global_batch
        )
        total = total + ce.sum()
    if axis_name is not None:
        total = jax.lax.psum(total, _axis(axis_name))
    return weight * total / global_batch


def _varying(x: jax.Array, axis_name: AxisName) -> jax.Array:
    """Marks a per-device-identical value as per-device (shard_map's type check for loop carries)."""
    return x if axis_name is None else jax.lax.pcast(x, _axis(axis_name), to="varying")


def _ring_permutation(n: int) -> list[tuple[int, int]]:
    return [(j, (j + 1) % n) for j in range(n)]


def _blocks(x: jax.Array, chunk: int) -> jax.Array:
    """`[b, D]` -> `[b // chunk, chunk, D]`."""
    return x.reshape(x.shape[0] // chunk, chunk, x.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _ring_softmax_sums(images, texts, t, smoothing, axis_name, chunk):
    return _ring_softmax_forward(images, texts, t, smoothing, axis_name, chunk)[0]


def _ring_softmax_forward(images, texts, t, smoothing, axis_name, chunk):
    """Sum over this device's rows of both directions' smoothed cross-entropies."""
    n, _, global_batch = _layout(images, axis_name)
    b = images.shape[0]

    def scan_columns(rows, columns_blocks, state):
        def body(state, columns):
            m, s, zsum = state
            z = rows @ columns.T / t
            m_new = jnp.maximum(m, z.max(axis=1))
            s = s * jnp.exp(m - m_new) + jnp.exp(z - m_new[:, None]).sum(axis=1)
            return (m_new, s, zsum + z.sum(axis=1)), None

        return jax.lax.scan(body, state, columns_blocks)[0]

    init = tuple(_varying(jnp.full((b,), value, images.dtype), axis_name) for value in (-jnp.inf, 0.0, 0.0))

    def step(i, carry):
        image_chunk, text_chunk, i2t, t2i = carry
        i2t = scan_columns(images, _blocks(text_chunk, chunk), i2t)
        t2i = scan_columns(texts, _blocks(image_chunk, chunk), t2i)
        if axis_name is not None:
            perm = _ring_permutation(n)
            image_chunk = jax.lax.ppermute(image_chunk, _axis(axis_name), perm)
            text_chunk = jax.lax.ppermute(text_chunk, _axis(axis_name), perm)
        return image_chunk, text_chunk, i2t, t2i

    _, _, (m1, s1, zsum1), (m2, s2, zsum2) = jax.lax.fori_loop(0, n, step, (images, texts, init, init))
    positive = jnp.sum(images * texts, axis=1) / t  # the positive pair lives on this device
    lse_i2t, lse_t2i = m1 + jnp.log(s1), m2 + jnp.log(s2)
    total = _smoothed_cross_entropy(lse_i2t, positive, zsum1, smoothing, global_batch).sum()
    total += _smoothed_cross_entropy(lse_t2i, positive, zsum2, smoothing, global_batch).sum()
    return total, (images, texts, t, lse_i2t, lse_t2i, zsum1, zsum2, positive)


def _ring_softmax_backward(smoothing, axis_name, chunk, residuals, g):
    """Recomputes each block of logits; column gradients ride the ring back to their owner."""
    images, texts, t, lse_i2t, lse_t2i, zsum_i2t, zsum_t2i, positive = residuals
    n, _, global_batch = _layout(images, axis_name)
    uniform = smoothing / global_batch

    def block_grads(rows, lse, columns):
        """For logits z = rows @ columns.T / t: d rows and d columns of sum(CE) without its
        positive term (added below), and each row's softmax-weighted logit sum."""
        z = rows @ columns.T / t
        p = jnp.exp(z - lse[:, None])
        dz = g * (p - uniform)
        return dz @ columns / t, dz.T @ rows / t, jnp.sum(p * z, axis=1)

    def over_blocks(rows, lse, columns):
        def body(acc, block):
            d_rows, expected_z = acc
            dr, dc, ez = block_grads(rows, lse, block)
            return (d_rows + dr, expected_z + ez), dc

        init = (jnp.zeros_like(rows), jnp.zeros_like(lse))
        (d_rows, expected_z), d_columns = jax.lax.scan(body, init, _blocks(columns, chunk))
        return d_rows, d_columns.reshape(columns.shape), expected_z

    def step(i, carry):
        image_chunk, text_chunk, d_image_chunk, d_text_chunk, d_images, d_texts, ez_i2t, ez_t2i = carry
        dr, dc, ez = over_blocks(images, lse_i2t, text_chunk)
        d_images, d_text_chunk, ez_i2t = d_images + dr, d_text_chunk + dc, ez_i2t + ez
        dr, dc, ez = over_blocks(texts, lse_t2i, image_chunk)
        d_texts, d_image_chunk, ez_t2i = d_texts + dr, d_image_chunk + dc, ez_t2i + ez
        if axis_name is not None:
            perm = _ring_permutation(n)
            image_chunk, text_chunk, d_image_chunk, d_text_chunk = (
                jax.lax.ppermute(x, _axis(axis_name), perm)
                for x in (image_chunk, text_chunk, d_image_chunk, d_text_chunk)
            )
        return image_chunk, text_chunk, d_image_chunk, d_text_chunk, d_images, d_texts, ez_i2t, ez_t2i

    zeros = jnp.zeros_like(images), jnp.zeros_like(texts)
    init = (images, texts, *zeros, *zeros, jnp.zeros_like(lse_i2t), jnp.zeros_like(lse_t2i))
    # After n steps and n permutes every column gradient is back on the device that owns it.
    _, _, d_image_cols, d_text_cols, d_images, d_texts, ez_i2t, ez_t2i = jax.lax.fori_loop(0, n, step, init)
    # The positive term -(1 - e) * <image_r, text_r> / t, once per direction.
    positive_scale = -2.0 * (1.0 - smoothing) * g / t
    d_images = d_images + d_image_cols + positive_scale * texts
    d_texts = d_texts + d_text_cols + positive_scale * images
    # dCE/dt = -(1/t) * (E_softmax[z] - E_target[z]) per row; the difference is taken per row
    # before summing, which keeps float32 cancellation small.
    gap = 0.0
    for expected_z, zsum in ((ez_i2t, zsum_i2t), (ez_t2i, zsum_t2i)):
        gap = gap + (expected_z - uniform * zsum - (1.0 - smoothing) * positive)
    d_t = -g * jnp.sum(gap) / t
    return d_images, d_texts, d_t


_ring_softmax_sums.defvjp(_ring_softmax_forward, _ring_softmax_backward)


def chunked_softmax_contrastive_loss(
    image_embeds: jax.Array,
    text_embeds: jax.Array,
    temperature: jax.Array,
    *,
    label_smoothing: float = 0.1,
    reduction: str = "sum",
    min_temperature: float | None = None,
    axis_name: AxisName = None,
    chunk_size: int | None = None,
) -> jax.Array:
    """`softmax_contrastive_loss` with O(local batch x chunk) logits memory (see module doc).

    `chunk_size` columns are scored at a time (default: one device's local batch); it must
    divide the local batch.
    """
    weight = _direction_weight(reduction)
    b = image_embeds.shape[0]
    chunk = chunk_size or b
    if b % chunk:
        raise ValueError(f"chunk_size {chunk} does not divide the local batch {b}")
    # Per-device from here on: its gradient is then summed over devices by autodiff.
    t = _varying(clamp_temperature(temperature, min_temperature).astype(image_embeds.dtype), axis_name)
    total = _ring_softmax_sums(image_embeds, text_embeds, t, float(label_smoothing), _axis(axis_name), chunk)
    _, _, global_batch = _layout(image_embeds, axis_name)
    if axis_name is not None:
        total = jax.lax.psum(total, _axis(axis_name))
    return weight * total / global_batch


def sigmoid_contrastive_loss(
    image_embeds: jax.Array,
    text_embeds: jax.Array,
    temperature: jax.Array,
    bias: jax.Array,
    *,
    min_temperature: float | None = None,
    axis_name: AxisName = None,
) -> jax.Array:
    """SigLIP (Zhai et al. 2023): every pair is a binary problem, logit = similarity /
    temperature + bias; summed over all B x B pairs and divided by B."""
    t = clamp_temperature(temperature, min_temperature)
    _, index, global_batch = _layout(image_embeds, axis_name)
    all_texts = text_embeds if axis_name is None else jax.lax.all_gather(text_embeds, _axis(axis_name), tiled=True)
    logits = image_embeds @ all_texts.T / t + bias
    labels = index * image_embeds.shape[0] + jnp.arange(image_embeds.shape[0])
    signs = jnp.where(jnp.arange(global_batch)[None, :] == labels[:, None], 1.0, -1.0)
    total = -jnp.sum(jax.nn.log_sigmoid(signs * logits))
    if axis_name is not None:
        total = jax.lax.psum(total, _axis(axis_name))
    return total / global_batch


def in_batch_top1(image_embeds: jax.Array, text_embeds: jax.Array, *, axis_name: AxisName = None) -> dict:
    """Image->text and text->image top-1 accuracy over the global batch (is the paired example
    the best match among all B?), from a ring of blocks: no `[b, B]` matrix is held."""
    n, _, global_batch = _layout(image_embeds, axis_name)
    image_embeds, text_embeds = jax.lax.stop_gradient((image_embeds, text_embeds))
    positive = jnp.sum(image_embeds * text_embeds, axis=1)
    own_pair = jnp.eye(image_embeds.shape[0], dtype=bool)

    def best_other(rows, columns, is_own_chunk):
        """Best score among the chunk's columns, leaving out each row's own pair."""
        z = rows @ columns.T
        return jnp.where(is_own_chunk & own_pair, -jnp.inf, z).max(axis=1)

    def step(i, carry):
        image_chunk, text_chunk, best_i2t, best_t2i = carry
        best_i2t = jnp.maximum(best_i2t, best_other(image_embeds, text_chunk, i == 0))
        best_t2i = jnp.maximum(best_t2i, best_other(text_embeds, image_chunk, i == 0))
        if axis_name is not None:
            perm = _ring_permutation(n)
            image_chunk = jax.lax.ppermute(image_chunk, _axis(axis_name), perm)
            text_chunk = jax.lax.ppermute(text_chunk, _axis(axis_name), perm)
        return image_chunk, text_chunk, best_i2t, best_t2i

    lowest = _varying(jnp.full(positive.shape, -jnp.inf, positive.dtype), axis_name)
    _, _, best_i2t, best_t2i = jax.lax.fori_loop(0, n, step, (image_embeds, text_embeds, lowest, lowest))
    counts = jnp.stack([jnp.sum(positive > best_i2t), jnp.sum(positive > best_t2i)]).astype(jnp.float32)
    if axis_name is not None:
        counts = jax.lax.psum(counts, _axis(axis_name))
    return dict(i2t_top1=counts[0] / global_batch, t2i_top1=counts[1] / global_batch)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Mean cross-entropy of classification `logits` `[B, C]` against integer `labels` `[B]`,
    the targets smoothed to (1 - e) one-hot + e / C (Szegedy et al. 2016, as big_vision's
    transfer configs use). Under `jit` on a sharded batch the mean is the global batch's."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [B, C] and labels [B], got {logits.shape} and {labels.shape}")
    logits = logits.astype(jnp.float32)
    positive = jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), axis=1)[:, 0]
    ce = _smoothed_cross_entropy(
        jax.nn.logsumexp(logits, axis=1), positive, logits.sum(axis=1), label_smoothing, logits.shape[1]
    )
    return ce.mean()
