"""Optimizers (LAMB as ALIGN, AdamW), learning-rate schedules, weight-decay masks, freezing.

Weight decay and LAMB's layer-wise trust ratio apply to weight matrices, convolution kernels and
embeddings only: never to BatchNorm/LayerNorm scales and offsets, biases, the temperature or the
sigmoid loss's bias (the usual BERT/LAMB exclusions).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from align_jax.sharding import path_name

OPTIMIZERS = ("lamb", "adamw")
DECAYS = ("linear", "cosine", "constant")
FREEZABLE = {
    "image": ("image_tower", "image_projection"),
    "text": ("text_tower", "text_projection"),
}


def default_config() -> ml_collections.ConfigDict:
    """ALIGN's recipe (paper section 5): LAMB, lr 1e-3 warmed up over 10k steps, then linear
    decay to 0 at 1.2M steps, weight decay 1e-5."""
    return ml_collections.ConfigDict(
        dict(
            name="lamb",
            learning_rate=1e-3,
            warmup_steps=10_000,
            decay="linear",
            end_learning_rate=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-6,
            weight_decay=1e-5,
            grad_clip_norm=0.0,  # 0: no clipping
            freeze="",  # "", "image" (LiT) or "text"
        )
    )


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then linear or cosine decay to `end_learning_rate` at
    `total_steps` (or constant)."""
    if config.decay not in DECAYS:
        raise ValueError(f"optimizer.decay must be one of {DECAYS}, got {config.decay!r}")
    if not 0 <= config.warmup_steps <= total_steps:
        raise ValueError(f"optimizer.warmup_steps {config.warmup_steps} must lie in [0, total_steps={total_steps}]")
    peak, end, warmup = config.learning_rate, config.end_learning_rate, config.warmup_steps
    decay_steps = max(1, total_steps - warmup)
    if config.decay == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif config.decay == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params: Any) -> Any:
    """True for the leaves that take weight decay (and LAMB's trust ratio): tensors of rank >= 2."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def lamb(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    mask: Any = None,
) -> optax.GradientTransformation:
    """LAMB (You et al. 2019) with weight decay and the trust ratio both restricted to `mask`."""
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.add_decayed_weights(weight_decay, mask),
        optax.masked(optax.scale_by_trust_ratio(), mask) if mask is not None else optax.scale_by_trust_ratio(),
        optax.scale_by_learning_rate(learning_rate),
    )


def frozen_labels(params: Any, freeze: str) -> Any:
    """'frozen' or 'trained' per leaf, for `optax.multi_transform`."""
    if freeze not in ("", *FREEZABLE):
        raise ValueError(f"optimizer.freeze must be '', 'image' or 'text', got {freeze!r}")
    frozen = FREEZABLE.get(freeze, ())

    def label(path, _):
        return "frozen" if path_name(path).split("/")[0] in frozen else "trained"

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(
    config: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, learning-rate schedule) from the `optimizer` config section."""
    if config.name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name must be one of {OPTIMIZERS}, got {config.name!r}")
    schedule = learning_rate_schedule(config, total_steps)
    if config.name == "lamb":
        base = lamb(schedule, config.b1, config.b2, config.eps, config.weight_decay, decay_mask)
    else:
        base = optax.adamw(
            schedule, config.b1, config.b2, config.eps, weight_decay=config.weight_decay, mask=decay_mask
        )
    parts = [optax.clip_by_global_norm(config.grad_clip_norm)] if config.grad_clip_norm else []
    tx = optax.chain(*parts, base)
    if config.freeze:
        tx = optax.multi_transform(
            {"trained": tx, "frozen": optax.set_to_zero()}, lambda p: frozen_labels(p, config.freeze)
        )
    return tx, schedule
