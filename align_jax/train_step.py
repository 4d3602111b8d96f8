"""Sharded train state and the jitted contrastive train step.

The towers run under `jit` on the sharded global batch (GSPMD inserts the collectives, and
BatchNorm statistics span the global batch unless `bn_group_size` is set); the loss runs under
`shard_map`, where each device scores its own rows against every device's embeddings. The
classification step (an image tower fine-tuned with a new head) shares the optimizer step and
its shardings; its loss is a plain mean over the global batch.

With `accum_steps = k > 1` the step is GradCache (Gao et al. 2021, "Scaling Deep Contrastive
Learning Batch Size under Memory Limited Setup"): the batch is embedded in k micro-batches with no
activations kept, the loss and its gradients with respect to the embeddings (and the temperature
and logit bias) are taken over the whole batch, then each micro-batch is embedded again and
back-propagated with its slice of those gradients. The gradients are the full-batch ones, while
the towers' activations are those of one micro-batch. Two differences remain:

- BatchNorm statistics are per micro-batch. When `bn_group_size` divides the rows a device holds
  of one micro-batch, `B / (data-parallel devices * k)`, the groups are the full batch's groups
  and the step, running statistics included, equals the full-batch one; with whole-batch
  statistics (`bn_group_size=None`) it becomes ghost BatchNorm over micro-batches of `B / k`.
- Dropout masks are drawn per micro-batch (the step's key folded with the micro-batch index, the
  same in both passes), so they differ from those of the k = 1 step.
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
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from align_jax import losses, perf
from align_jax.models import DualEncoder, ImageClassifier, init_variables, layers
from align_jax.sharding import (
    DEFAULT_RULES,
    batch_axes,
    batch_sharding,
    check_batch_size,
    data_parallel_size,
    infer_shardings,
)

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


def _image_embeddings(model, variables, images, rng, train: bool):
    """`(embeddings, batch_stats)`, the statistics updated in training mode."""
    if train:
        image_embeds, updates = model.apply(
            variables,
            images,
            train=True,
            method=DualEncoder.encode_image,
            mutable=["batch_stats"],
            rngs={"dropout": rng},
        )
        return image_embeds, updates["batch_stats"]
    # A frozen (LiT-locked) tower runs in inference mode and takes no gradient.
    image_embeds = model.apply(variables, images, method=DualEncoder.encode_image)
    return jax.lax.stop_gradient(image_embeds), variables["batch_stats"]


def _text_embeddings(model, variables, batch, rng, train: bool):
    text_embeds = model.apply(
        variables,
        batch["input_ids"],
        batch["attention_mask"],
        train=train,
        method=DualEncoder.encode_text,
        rngs={"dropout": rng},
    )
    return text_embeds if train else jax.lax.stop_gradient(text_embeds)


def _image_and_text_embeddings(model, params, batch_stats, batch, rng, train_image: bool, train_text: bool):
    variables = {"params": params, "batch_stats": batch_stats}
    image_rng, text_rng = jax.random.split(rng)
    image_embeds, batch_stats = _image_embeddings(model, variables, batch["images"], image_rng, train_image)
    text_embeds = _text_embeddings(model, variables, batch, text_rng, train_text)
    return image_embeds, text_embeds, batch_stats


def _loss_of_embeddings(loss_fn: Callable, params, image_embeds, text_embeds):
    bias = params.get("logit_bias", jnp.zeros((), jnp.float32))
    return loss_fn(image_embeds, text_embeds, params["temperature"], bias)


def split_micro_batches(x: jax.Array, accum_steps: int, mesh: Mesh) -> jax.Array:
    """`[B, ...]` -> `[k, B / k, ...]`, micro-batch i made of the i-th block of `B / (n k)` rows of
    each of the n data shards: every micro-batch stays evenly sharded and no row changes device."""
    shards = data_parallel_size(mesh)
    local = x.shape[0] // (shards * accum_steps)
    x = x.reshape(shards, accum_steps, local, *x.shape[1:]).swapaxes(0, 1)
    x = x.reshape(accum_steps, shards * local, *x.shape[3:])
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, batch_axes(mesh))))


def join_micro_batches(x: jax.Array, mesh: Mesh) -> jax.Array:
    """The inverse of `split_micro_batches`: `[k, B / k, ...]` -> `[B, ...]` in the batch's order."""
    shards, accum_steps = data_parallel_size(mesh), x.shape[0]
    local = x.shape[1] // shards
    x = x.reshape(accum_steps, shards, local, *x.shape[2:]).swapaxes(0, 1)
    x = x.reshape(shards * accum_steps * local, *x.shape[3:])
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(batch_axes(mesh))))


def make_loss_and_grad_fn(
    model: DualEncoder,
    loss_fn: Callable,
    freeze: str = "",
    accum_steps: int = 1,
    mesh: Mesh | None = None,
) -> Callable:
    """`(params, batch_stats, batch, rng) -> ((loss, (metrics, new_batch_stats)), grads)`.

    With `accum_steps > 1` the gradients are accumulated over micro-batches (GradCache, see the
    module doc); the `mesh` the batch is sharded over is then needed to split it in place."""
    train_image, train_text = freeze != "image", freeze != "text"
    if not isinstance(accum_steps, int) or accum_steps < 1:
        raise ValueError(f"accum_steps must be a positive integer, got {accum_steps!r}")
    if accum_steps > 1:
        if mesh is None:
            raise ValueError("accum_steps > 1 needs the mesh the batch is sharded over")
        return _make_accumulated_loss_and_grad_fn(model, loss_fn, train_image, train_text, accum_steps, mesh)

    def compute(params, batch_stats, batch, rng):
        image_embeds, text_embeds, batch_stats = _image_and_text_embeddings(
            model, params, batch_stats, batch, rng, train_image, train_text
        )
        loss, metrics = _loss_of_embeddings(loss_fn, params, image_embeds, text_embeds)
        return loss, (metrics, batch_stats)

    return jax.value_and_grad(compute, has_aux=True)


def _make_accumulated_loss_and_grad_fn(
    model: DualEncoder, loss_fn: Callable, train_image: bool, train_text: bool, accum_steps: int, mesh: Mesh
) -> Callable:
    trained = tuple(name for name, train in (("image", train_image), ("text", train_text)) if train)

    def compute(params, batch_stats, batch, rng):
        global_batch, shards = batch["images"].shape[0], data_parallel_size(mesh)
        if global_batch % (shards * accum_steps):
            raise ValueError(
                f"global batch size {global_batch} is not divisible by accum_steps {accum_steps} times "
                f"the {shards} devices of the data axes"
            )
        micro_batches = jax.tree.map(lambda x: split_micro_batches(x, accum_steps, mesh), batch)
        indices = jnp.arange(accum_steps)

        # Pass 1: the embeddings of every micro-batch. Nothing here is differentiated, so no
        # activation outlives its micro-batch.
        def embed(_, inputs):
            micro_batch, i = inputs
            micro_rng = jax.random.fold_in(rng, i)
            return None, _image_and_text_embeddings(
                model, params, batch_stats, micro_batch, micro_rng, train_image, train_text
            )

        _, (image_embeds, text_embeds, micro_stats) = jax.lax.scan(embed, None, (micro_batches, indices))
        # The running update is linear in the batch statistics: the mean of the k updated values
        # is the update by the mean of the micro-batches' (group) statistics.
        new_batch_stats = jax.tree.map(lambda s: s.mean(axis=0), micro_stats) if train_image else batch_stats

        # The loss over the whole batch, rows in the batch's order, and its gradients with respect
        # to the embeddings and to the temperature and logit bias (zeros elsewhere in the tree).
        image_embeds, text_embeds = join_micro_batches(image_embeds, mesh), join_micro_batches(text_embeds, mesh)
        loss_and_grads = jax.value_and_grad(
            functools.partial(_loss_of_embeddings, loss_fn), argnums=(0, 1, 2), has_aux=True
        )
        (loss, metrics), (grads, d_images, d_texts) = loss_and_grads(params, image_embeds, text_embeds)
        cotangents = dict(
            image=split_micro_batches(d_images, accum_steps, mesh),
            text=split_micro_batches(d_texts, accum_steps, mesh),
        )

        # Pass 2: each micro-batch embedded again by the trained towers, with the dropout key of
        # pass 1, and back-propagated with its slice of the embedding gradients.
        def backward(grads, inputs):
            micro_batch, micro_cotangents, i = inputs
            image_rng, text_rng = jax.random.split(jax.random.fold_in(rng, i))

            def embeddings(params):
                variables = {"params": params, "batch_stats": batch_stats}
                out = {}
                if train_image:
                    out["image"], _ = _image_embeddings(model, variables, micro_batch["images"], image_rng, True)
                if train_text:
                    out["text"] = _text_embeddings(model, variables, micro_batch, text_rng, True)
                return out

            _, pullback = jax.vjp(embeddings, params)
            (micro_grads,) = pullback(micro_cotangents)
            return jax.tree.map(jnp.add, grads, micro_grads), None

        trained_cotangents = {name: cotangents[name] for name in trained}
        grads, _ = jax.lax.scan(backward, grads, (micro_batches, trained_cotangents, indices))
        return (loss, (metrics, new_batch_stats)), grads

    return compute


def _jit_step(
    grad_fn: Callable, tx: optax.GradientTransformation, schedule: optax.Schedule, mesh: Mesh, state_shardings
) -> Callable:
    """The optimizer step around `grad_fn` (see `make_loss_and_grad_fn`), jitted with explicit
    shardings and the input state donated."""

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, (metrics, batch_stats)), grads = grad_fn(state.params, state.batch_stats, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(
            metrics,
            loss=loss,
            grad_norm=optax.tree.norm(grads),
            param_norm=optax.tree.norm(params),  # after the update: non-finite means a poisoned state
            learning_rate=schedule(state.step),
        )
        if "temperature" in state.params:
            metrics["temperature"] = state.params["temperature"]
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
        return new_state, metrics

    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding(mesh)),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )


def _with_xla_matmuls(fn: Callable) -> Callable:
    """`fn`, traced with XLA's dots in every 'auto' `FlatDense` (`layers.xla_matmuls`)."""

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with layers.xla_matmuls():
            return fn(*args, **kwargs)

    return traced


def model_flops(step_fn: Callable, lowered: jax.stages.Lowered, state: TrainState, batch: dict) -> float | None:
    """Model FLOPs of one step of `make_train_step`'s `step_fn` (for MFU), given its own `lowered`
    step: from `flops_jitted`, lowered again only when it differs."""
    if step_fn.flops_jitted is step_fn.jitted:
        return perf.step_flops(lowered)
    return perf.step_flops(step_fn.flops_jitted.lower(state, batch))


def _checked_step(jitted: Callable, flops_jitted: Callable, mesh: Mesh) -> Callable:
    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        check_batch_size(batch["images"].shape[0], mesh)
        return jitted(state, batch)

    train_step.jitted = jitted  # for .lower() / cost and memory analysis
    train_step.flops_jitted = flops_jitted
    return train_step


def make_train_step(
    model: DualEncoder,
    loss_config: ml_collections.ConfigDict,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    state_shardings: TrainState,
    freeze: str = "",
    accum_steps: int = 1,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """`train_step(state, batch) -> (state, metrics)`, jitted with explicit shardings; the input
    state is donated. `batch` holds `images [B, H, W, 3]` in [-1, 1], `input_ids` and
    `attention_mask` `[B, L]`. `accum_steps > 1` computes the same step in that many
    micro-batches (see the module doc)."""
    loss_fn = make_loss_fn(loss_config, mesh)
    jitted = _jit_step(
        make_loss_and_grad_fn(model, loss_fn, freeze, accum_steps, mesh), tx, schedule, mesh, state_shardings
    )
    # XLA's cost analysis counts a loop body once, not once per micro-batch, and no FLOPs in an
    # FFI call (the CPU matmuls through MKL), so FLOPs (for MFU) are read from the same step
    # without accumulation and with XLA's dots: model FLOPs, no recomputed forward pass. Only ever
    # lowered, never compiled.
    same_trace = accum_steps == 1 and layers.resolve_matmul_impl("auto", jnp.float32) == "xla"
    flops_jitted = (
        jitted
        if same_trace
        else _jit_step(
            _with_xla_matmuls(make_loss_and_grad_fn(model, loss_fn, freeze)), tx, schedule, mesh, state_shardings
        )
    )
    return _checked_step(jitted, flops_jitted, mesh)


def make_classification_loss_and_grad_fn(
    model: ImageClassifier, label_smoothing: float = 0.0, freeze: str = ""
) -> Callable:
    """`(params, batch_stats, batch, rng) -> ((loss, (metrics, new_batch_stats)), grads)` of the
    label-smoothed softmax cross-entropy of `model(images)` against `labels` over the global
    batch; `metrics` holds the batch's top-1 accuracy. `freeze="image"` runs the tower in
    inference mode (a linear probe trained by gradient descent)."""
    train_tower = freeze != "image"

    def compute(params, batch_stats, batch, rng):
        variables = {"params": params, "batch_stats": batch_stats}
        if train_tower:
            logits, updates = model.apply(
                variables, batch["images"], train=True, mutable=["batch_stats"], rngs={"dropout": rng}
            )
            batch_stats = updates["batch_stats"]
        else:
            logits = model.apply(variables, batch["images"])
        loss = losses.softmax_cross_entropy(logits, batch["labels"], label_smoothing)
        top1 = jnp.mean(jnp.argmax(logits, axis=1) == batch["labels"])
        return loss, (dict(top1=top1), batch_stats)

    return jax.value_and_grad(compute, has_aux=True)


def make_classification_train_step(
    model: ImageClassifier,
    label_smoothing: float,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    state_shardings: TrainState,
    freeze: str = "",
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """`train_step(state, batch) -> (state, metrics)` of an image classifier, as `make_train_step`
    but on `images` and integer `labels [B]` (see `make_classification_loss_and_grad_fn`)."""
    jitted = _jit_step(
        make_classification_loss_and_grad_fn(model, label_smoothing, freeze), tx, schedule, mesh, state_shardings
    )
    return _checked_step(jitted, jitted, mesh)
