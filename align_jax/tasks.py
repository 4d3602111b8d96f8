"""What a run trains (`config.task`): the parts of the training program that differ between
pretraining and transfer, so that the loop (mesh, checkpoints, resume, logging, evaluation) is
one and the same.

- `contrastive`: the dual encoder on image-caption pairs (ALIGN pretraining; retrieval
  fine-tuning is the same task started from a pretrained checkpoint, `init.checkpoint`).
- `classification`: the image tower with a new linear head of `model.num_classes` outputs,
  softmax cross-entropy with `loss.label_smoothing` on the integer field `data.label_field` of
  `data.train` (ALIGN's transfer to classification; `configs/finetune_classification.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections
import optax
import tensorflow as tf
from jax.sharding import Mesh

from align_jax import train_step
from align_jax.input import pipeline


class Task:
    """A training task: the batch fields its step reads, its training input and its step."""

    name: str
    batch_keys: tuple[str, ...]  # what the step reads from a batch
    evaluators: tuple[str, ...]  # the evaluator types that apply to the task's model
    # Top-level parameters that a pretrained checkpoint does not provide (they keep their
    # initialisation when `init.checkpoint` starts the run).
    new_params: tuple[str, ...] = ()

    def input_options(self, config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, dict]:
        """The data config and the extra `pipeline.make_dataset` arguments of the training input."""
        return config.data, {}

    def train_datasets(self, config: ml_collections.ConfigDict) -> dict[int, tf.data.Dataset]:
        """This process's readers of the training input (`pipeline.make_reader_datasets`)."""
        data, options = self.input_options(config)
        return pipeline.make_reader_datasets(
            config.data.train,
            data,
            batch_size=config.batch_size,
            image_size=config.model.image_size,
            max_text_length=config.model.max_text_length,
            train=True,
            seed=config.seed,
            **options,
        )

    def make_train_step(
        self,
        config: ml_collections.ConfigDict,
        model,
        tx: optax.GradientTransformation,
        schedule: optax.Schedule,
        mesh: Mesh,
        shardings: train_step.TrainState,
    ) -> Callable:
        raise NotImplementedError


class Contrastive(Task):
    name = "contrastive"
    batch_keys = pipeline.MODEL_INPUTS
    evaluators = ("retrieval", "zeroshot", "image_text", "linear_probe")

    def make_train_step(self, config, model, tx, schedule, mesh, shardings):
        return train_step.make_train_step(
            model,
            config.loss,
            tx,
            schedule,
            mesh,
            shardings,
            config.optimizer.freeze,
            accum_steps=config.get("accum_steps", 1),
        )


class Classification(Task):
    name = "classification"
    batch_keys = ("images", "labels")
    evaluators = ("classification", "linear_probe")
    new_params = ("head",)

    def input_options(self, config):
        images_only = config.data.copy_and_resolve_references()
        images_only.captions = {}  # no text is read, checked or tokenized
        return images_only, dict(label_field=config.data.label_field)

    def make_train_step(self, config, model, tx, schedule, mesh, shardings):
        return train_step.make_classification_train_step(
            model, config.loss.label_smoothing, tx, schedule, mesh, shardings, config.optimizer.freeze
        )


TASKS: dict[str, Task] = {task.name: task for task in (Contrastive(), Classification())}


def get(config: ml_collections.ConfigDict) -> Task:
    """The task of a training config (`contrastive` for configs written before there was a choice)."""
    name = config.get("task", "contrastive")
    if name not in TASKS:
        raise ValueError(f"task must be one of {tuple(TASKS)}, got {name!r}")
    return TASKS[name]
