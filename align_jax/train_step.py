"""Sharded train state and the jitted contrastive train step.

The towers run under `jit` on the sharded global batch (GSPMD inserts the collectives, and
BatchNorm statistics span the global batch unless `bn_group_size` is set); the loss runs under
`shard_map`, where each device scores its own rows against every device's embeddings.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from align_jax import losses
from align_jax.models import DualEncoder, init_variables
from align_jax.sharding import DEFAULT_RULES, batch_axes, batch_sharding, check_batch_size, infer_shardings

LOSSES = ("softmax", "chunked_softmax", "sigmoid")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


def default_loss_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            kind="softmax",  # "softmax" (all-gather), "chunked_softmax" (O(B) memory) or "sigmoid"
            label_smoothing=0.1,
            reduction="sum",  # ALIGN sums the two directions; HF averages ("mean")
            min_temperature=None,  # optional lower clamp of the learnable temperature
            chunk_size=None,  # chunked_softmax: columns scored at a time (default: a local batch)
        )
    )


def make_loss_fn(config: ml_collections.ConfigDict, mesh: Mesh) -> Callable:
    """`(image_embeds, text_embeds, temperature, logit_bias) -> (loss, metrics)` over the global
    batch, as a `shard_map` over the mesh's data-like axes."""
    if config.kind not in LOSSES:
        raise ValueError(f"loss.kind must be one of {LOSSES}, got {config.kind!r}")
    axes = batch_axes(mesh)
    common = dict(min_temperature=config.min_temperature, axis_name=axes)
    if config.kind == "softmax":
        loss = functools.partial(
            losses.softmax_contrastive_loss,
            label_smoothing=config.label_smoothing,
            reduction=config.reduction,
            **common,
        )
    elif config.kind == "chunked_softmax":
        loss = functools.partial(
            losses.chunked_softmax_contrastive_loss,
            label_smoothing=config.label_smoothing,
            reduction=config.reduction,
            chunk_size=config.chunk_size,
            **common,
        )
    else:
        loss = functools.partial(losses.sigmoid_contrastive_loss, **common)

    def local(image_embeds, text_embeds, temperature, logit_bias):
        args = (image_embeds, text_embeds, temperature) + ((logit_bias,) if config.kind == "sigmoid" else ())
        return loss(*args), losses.in_batch_top1(image_embeds, text_embeds, axis_name=axes)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes), P(), P()), out_specs=(P(), P()))


def make_init_fn(
    model: DualEncoder, model_config: ml_collections.ConfigDict, tx: optax.GradientTransformation
) -> Callable[[jax.Array], TrainState]:
    """`rng -> TrainState` at step 0 (pure, so it can be traced for shapes or jitted into shardings)."""

    def init(rng):
        params_rng, dropout_rng = jax.random.split(rng)
        variables = init_variables(model, model_config, params_rng)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
            rng=dropout_rng,
        )

    return init


def abstract_train_state(
    model: DualEncoder,
    model_config: ml_collections.ConfigDict,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Any = None,
) -> tuple[TrainState, TrainState]:
    """Shapes, dtypes and shardings of the state without allocating it (a checkpoint restores
    into these, whatever mesh wrote it), and the shardings alone."""
    abstract = jax.eval_shape(make_init_fn(model, model_config, tx), jax.random.key(0))
    shardings = infer_shardings(abstract, mesh, rules or DEFAULT_RULES)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    return abstract, shardings


def create_train_state(
    model: DualEncoder,
    model_config: ml_collections.ConfigDict,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rng: jax.Array,
    rules: Any = None,
) -> tuple[TrainState, TrainState]:
    """The initial state, created directly in its shardings (never whole on one device), and
    those shardings."""
    _, shardings = abstract_train_state(model, model_config, tx, mesh, rules)
    return jax.jit(make_init_fn(model, model_config, tx), out_shardings=shardings)(rng), shardings


def _image_and_text_embeddings(model, params, batch_stats, batch, rng, train_image: bool, train_text: bool):
    variables = {"params": params, "batch_stats": batch_stats}
    image_rng, text_rng = jax.random.split(rng)
    if train_image:
        image_embeds, updates = model.apply(
            variables,
            batch["images"],
            train=True,
            method=DualEncoder.encode_image,
            mutable=["batch_stats"],
            rngs={"dropout": image_rng},
        )
        batch_stats = updates["batch_stats"]
    else:  # a frozen (LiT-locked) tower runs in inference mode and takes no gradient
        image_embeds = jax.lax.stop_gradient(model.apply(variables, batch["images"], method=DualEncoder.encode_image))
    text_embeds = model.apply(
        variables,
        batch["input_ids"],
        batch["attention_mask"],
        train=train_text,
        method=DualEncoder.encode_text,
        rngs={"dropout": text_rng},
    )
    if not train_text:
        text_embeds = jax.lax.stop_gradient(text_embeds)
    return image_embeds, text_embeds, batch_stats


def make_loss_and_grad_fn(model: DualEncoder, loss_fn: Callable, freeze: str = "") -> Callable:
    """`(params, batch_stats, batch, rng) -> ((loss, (metrics, new_batch_stats)), grads)`."""

    def compute(params, batch_stats, batch, rng):
        image_embeds, text_embeds, batch_stats = _image_and_text_embeddings(
            model, params, batch_stats, batch, rng, freeze != "image", freeze != "text"
        )
        bias = params.get("logit_bias", jnp.zeros((), jnp.float32))
        loss, metrics = loss_fn(image_embeds, text_embeds, params["temperature"], bias)
        return loss, (metrics, batch_stats)

    return jax.value_and_grad(compute, has_aux=True)


def make_train_step(
    model: DualEncoder,
    loss_config: ml_collections.ConfigDict,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    state_shardings: TrainState,
    freeze: str = "",
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """`train_step(state, batch) -> (state, metrics)`, jitted with explicit shardings; the input
    state is donated. `batch` holds `images [B, H, W, 3]` in [-1, 1], `input_ids` and
    `attention_mask` `[B, L]`."""
    grad_fn = make_loss_and_grad_fn(model, make_loss_fn(loss_config, mesh), freeze)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, (metrics, batch_stats)), grads = grad_fn(state.params, state.batch_stats, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(
            metrics,
            loss=loss,
            temperature=state.params["temperature"],
            grad_norm=optax.tree.norm(grads),
            param_norm=optax.tree.norm(params),  # after the update: non-finite means a poisoned state
            learning_rate=schedule(state.step),
        )
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
        return new_state, metrics

    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding(mesh)),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        check_batch_size(batch["images"].shape[0], mesh)
        return jitted(state, batch)

    train_step.jitted = jitted  # for .lower() / cost and memory analysis
    return train_step
