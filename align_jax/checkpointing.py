"""Checkpoint layout shared by training, conversion and inference.

A workdir holds `config.json` (the full ConfigDict: `model`, `data.vocab`, ...), the vocab it
names, and `checkpoints/<step>/` written by orbax's CheckpointManager. The model's variables
(`params`, `batch_stats`) are the item `model`, so inference restores them without touching
optimizer state, onto whatever devices it has.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Protocol

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
MODEL_ITEM = "model"  # params and batch_stats: all that inference needs
TRAIN_ITEM = "train"  # optimizer state, step, dropout key
DATA_ITEM = "data"  # each process's input iterator position


def save_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
    path = epath.Path(workdir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {workdir}: not an align_jax workdir or checkpoint")
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def checkpoint_manager(workdir: str | os.PathLike, **options) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        epath.Path(workdir) / CHECKPOINT_DIR,
        options=ocp.CheckpointManagerOptions(**options),
    )


def save_model(workdir: str | os.PathLike, step: int, variables: dict) -> None:
    """Writes `variables` as checkpoint `step` and waits until it is complete on disk."""
    with checkpoint_manager(workdir) as manager:
        manager.save(step, args=ocp.args.Composite(**{MODEL_ITEM: ocp.args.StandardSave(variables)}))
        manager.wait_until_finished()


def restore_model(workdir: str | os.PathLike, abstract_variables: dict, step: int | None = None) -> dict:
    """Restores the model variables of `step` (default: the latest) with the shardings given in
    `abstract_variables` (a tree of `jax.ShapeDtypeStruct`), whatever mesh wrote them."""
    with checkpoint_manager(workdir, read_only=True) as manager:
        if step is None:
            step = manager.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {epath.Path(workdir) / CHECKPOINT_DIR}")
        elif step not in manager.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {workdir}; have {manager.all_steps()}")
        restored = manager.restore(
            step, args=ocp.args.Composite(**{MODEL_ITEM: ocp.args.StandardRestore(abstract_variables)})
        )
    return restored[MODEL_ITEM]


def abstract_on_device(tree, device: jax.Device | None = None):
    """Shape/dtype structs placing every leaf on one device (default: the first local one)."""
    sharding = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


class SavableIterator(Protocol):
    """An input iterator whose exact position can be written into a directory and read back
    (`align_jax.input.pipeline.DataIterator`)."""

    def save(self, directory: str) -> Any: ...

    def restore(self, directory: str) -> None: ...


class IteratorHandler(ocp.CheckpointHandler):
    """Saves the input position of each reader of the global batch (every process its own readers,
    `reader_<r>`) inside the step's directory, so it is committed atomically with the model and
    optimizer state (orbax renames the whole step folder only once every item is written). A
    checkpoint restores on any number of processes that divides the number of readers."""

    def save(self, directory: epath.Path, args: IteratorSave) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        args.iterator.save(os.fspath(directory))

    def restore(self, directory: epath.Path, args: IteratorRestore) -> None:
        args.iterator.restore(os.fspath(directory))


@ocp.args.register_with_handler(IteratorHandler, for_save=True)
@dataclasses.dataclass
class IteratorSave(ocp.args.CheckpointArgs):
    iterator: SavableIterator


@ocp.args.register_with_handler(IteratorHandler, for_restore=True)
@dataclasses.dataclass
class IteratorRestore(ocp.args.CheckpointArgs):
    iterator: SavableIterator


def training_manager(
    workdir: str | os.PathLike,
    *,
    keep: int,
    best_metric: str = "",
    best_mode: str = "max",
    async_save: bool = True,
) -> ocp.CheckpointManager:
    """The training run's checkpoints: the last `keep` steps, plus (with `best_metric`) the best
    one by that evaluation metric. Saves are asynchronous: the arrays are copied off the device,
    then written in the background while training goes on; a step folder appears under its final
    name only when complete, so a crash mid-write never leaves a checkpoint that looks whole."""
    if keep < 1:
        raise ValueError(f"keep_checkpoints must be at least 1, got {keep}")
    if best_mode not in ("max", "min"):
        raise ValueError(f"checkpoint_best.mode must be 'max' or 'min', got {best_mode!r}")
    policies = [ocp.checkpoint_managers.LatestN(n=keep)]
    if best_metric:
        policies.append(
            ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics[best_metric],
                reverse=best_mode == "min",
                n=1,
                keep_checkpoints_without_metrics=False,
            )
        )
    return ocp.CheckpointManager(
        epath.Path(workdir) / CHECKPOINT_DIR,
        options=ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=True,
        ),
    )


def save_training(
    manager: ocp.CheckpointManager,
    step: int,
    model: Any,
    train: Any,
    iterator: SavableIterator | None = None,
    metrics: dict[str, float] | None = None,
) -> None:
    """Starts saving `step` (model variables, training state, input position); returns once the
    arrays are off the device."""
    items = {MODEL_ITEM: ocp.args.StandardSave(model), TRAIN_ITEM: ocp.args.StandardSave(train)}
    if iterator is not None:
        items[DATA_ITEM] = IteratorSave(iterator)
    manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)


def restore_training(
    manager: ocp.CheckpointManager,
    step: int,
    abstract_model: Any,
    abstract_train: Any,
    iterator: SavableIterator | None = None,
) -> tuple[Any, Any]:
    """(model, train) of `step` in the shardings of the abstract trees (any mesh); the iterator,
    if given, is moved to the saved position."""
    items = {
        MODEL_ITEM: ocp.args.StandardRestore(abstract_model),
        TRAIN_ITEM: ocp.args.StandardRestore(abstract_train),
    }
    if iterator is not None:
        items[DATA_ITEM] = IteratorRestore(iterator)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    return restored[MODEL_ITEM], restored[TRAIN_ITEM]
