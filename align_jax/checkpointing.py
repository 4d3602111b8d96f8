"""Checkpoint layout shared by training, conversion and inference.

A workdir holds `config.json` (the full ConfigDict: `model`, `data.vocab`, ...), the vocab it
names, and `checkpoints/<step>/` written by orbax's CheckpointManager. The model's variables
(`params`, `batch_stats`) are the item `model`, so inference restores them without touching
optimizer state, onto whatever devices it has.

Every checkpoint also holds checksums of its arrays (the item `checksums`), computed on the
devices when it is saved and compared when it is restored: orbax's OCDBT files carry none, and a
flipped bit in them restores silently. A damaged newest checkpoint is set aside and training
resumes from the one before it; a save that fails (a full disk) names its step and leaves the
earlier checkpoints as they were.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from align_jax import distributed

log = logging.getLogger("align_jax.checkpointing")

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"  # damaged checkpoints set aside, beside CHECKPOINT_DIR
MODEL_ITEM = "model"  # params and batch_stats: all that inference needs
TRAIN_ITEM = "train"  # optimizer state, step, dropout key
DATA_ITEM = "data"  # each process's input iterator position
CHECKSUM_ITEM = "checksums"  # {MODEL_ITEM: {leaf path: checksum}, TRAIN_ITEM: ...}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read back; the message names its step."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose arrays differ from the checksums saved with them."""


class CheckpointSaveError(CheckpointError):
    """A save that failed (e.g. no space left); the earlier checkpoints are untouched."""


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """The sum of the array's bits (as uint32 words) times odd position weights, mod 2^32. An odd
    weight is invertible mod 2^32, so any change to a single element changes the sum; random
    damage to several goes unnoticed with probability 2^-32. An integer sum does not depend on
    its order: the value is the same on any mesh."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:  # 8-byte types become a trailing pair of uint32
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    # Row-major element index from iotas: a reshape to 1-D would gather a sharded array.
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * np.uint32(stride % 2**32)
        stride *= bits.shape[axis]
    return jnp.sum(bits * (index * np.uint32(2) + np.uint32(1)), dtype=jnp.uint32)


# One program for a whole tree: compiled once per tree structure (the persistent compilation
# cache keeps it across relaunches).
_tree_checksums = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def checksums(tree: Any) -> dict[str, int]:
    """`{leaf path: checksum}` of a tree of arrays (see `_leaf_checksum`), computed where the
    arrays are."""
    sums = jax.device_get(_tree_checksums(tree))
    return {jax.tree_util.keystr(path): int(value) for path, value in jax.tree_util.tree_leaves_with_path(sums)}


def verify_checksums(step: int, item: str, tree: Any, expected: dict[str, int]) -> None:
    """Raises `CorruptCheckpointError` naming the arrays of `tree` that differ from `expected`
    (`tree` may be part of what was saved)."""
    actual = checksums(tree)
    differ = sorted(k for k in actual if expected.get(k) != actual[k])
    if differ:
        shown = ", ".join(differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")
        raise CorruptCheckpointError(
            f"checkpoint step {step}: {len(differ)} array(s) of {item!r} differ from the checksums saved with "
            f"them: {shown}"
        )


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
    """Writes `variables` (and their checksums) as checkpoint `step` and waits until it is complete
    on disk."""
    items = {
        MODEL_ITEM: ocp.args.StandardSave(variables),
        CHECKSUM_ITEM: ocp.args.JsonSave({MODEL_ITEM: checksums(variables)}),
    }
    with checkpoint_manager(workdir) as manager:
        manager.save(step, args=ocp.args.Composite(**items))
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
        restored = _restore_and_verify(manager, step, {MODEL_ITEM: ocp.args.StandardRestore(abstract_variables)})
    return restored[MODEL_ITEM]


def _restore_and_verify(manager: ocp.CheckpointManager, step: int, items: dict) -> dict:
    """The items of `step`, each checked against the checksums saved with it (checkpoints from
    before checksums are taken as they are). Every process raises if any process failed to read."""
    if (epath.Path(manager.directory) / str(step) / CHECKSUM_ITEM).exists():
        items = {**items, CHECKSUM_ITEM: ocp.args.JsonRestore()}
    error = None
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # what a damaged file raises depends on the file: tensorstore, TF, orbax
        error = e
    if jax.process_count() > 1:  # the checksums below are collective: every process must get there
        read_everywhere = np.all(multihost_utils.process_allgather(np.array(error is None)))
        if error is None and not read_everywhere:
            error = CorruptCheckpointError(f"checkpoint step {step}: another process could not read it")
    if error is not None:
        raise error
    saved = restored[CHECKSUM_ITEM] if CHECKSUM_ITEM in items else {}
    for name in items:
        if name in saved:
            verify_checksums(step, name, restored[name], saved[name])
    return {name: restored[name] for name in items}


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
            # Step folders a killed run left half-written: without this every preemption during
            # a save leaks one on the disk.
            cleanup_tmp_directories=True,
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
    """Starts saving `step` (model variables, training state, input position, checksums); returns
    once the arrays are off the device. Raises `CheckpointSaveError` if this save, or the one
    still being written, fails."""
    finish_saves(manager)
    items = {
        MODEL_ITEM: ocp.args.StandardSave(model),
        TRAIN_ITEM: ocp.args.StandardSave(train),
        CHECKSUM_ITEM: ocp.args.JsonSave({MODEL_ITEM: checksums(model), TRAIN_ITEM: checksums(train)}),
    }
    if iterator is not None:
        items[DATA_ITEM] = IteratorSave(iterator)
    try:
        manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
    except Exception as e:  # tensorstore, TF and the OS each raise their own kind
        raise _save_failed(manager, step, e) from e


def finish_saves(manager: ocp.CheckpointManager) -> None:
    """Waits until the asynchronous save in flight is on disk; raises `CheckpointSaveError` naming
    its step if it failed."""
    in_flight = set(manager.all_steps())
    try:
        manager.wait_until_finished()
    except Exception as e:
        # orbax drops a failed step from its list.
        failed = sorted(in_flight - set(manager.all_steps()))
        raise _save_failed(manager, failed[-1] if failed else None, e) from e


def _save_failed(manager: ocp.CheckpointManager, step: int | None, error: Exception) -> CheckpointSaveError:
    manager.reload()  # what is complete on disk: a step folder is renamed into place only when whole
    what = f"checkpoint step {step}" if step is not None else "a checkpoint"
    return CheckpointSaveError(
        f"saving {what} to {manager.directory} failed: {_brief(error)}; the earlier checkpoints "
        f"{list(manager.all_steps())} are intact"
    )


def _brief(error: Exception) -> str:
    """The exception's type and its message's first line (tensorstore appends its whole spec)."""
    lines = str(error).strip().splitlines() or [""]
    text = lines[0] if len(lines[0]) <= 400 else lines[0][:400] + " ..."
    return f"{type(error).__name__}: {text}"


def restore_training(
    manager: ocp.CheckpointManager,
    step: int,
    abstract_model: Any,
    abstract_train: Any,
    iterator: SavableIterator | None = None,
) -> tuple[Any, Any]:
    """(model, train) of `step` in the shardings of the abstract trees (any mesh), checked against
    their checksums; the iterator, if given, is moved to the saved position."""
    items = {
        MODEL_ITEM: ocp.args.StandardRestore(abstract_model),
        TRAIN_ITEM: ocp.args.StandardRestore(abstract_train),
    }
    if iterator is not None:
        items[DATA_ITEM] = IteratorRestore(iterator)
    restored = _restore_and_verify(manager, step, items)
    return restored[MODEL_ITEM], restored[TRAIN_ITEM]


def restore_latest_training(
    manager: ocp.CheckpointManager,
    abstract_model: Any,
    abstract_train: Any,
    iterator: SavableIterator | None = None,
) -> tuple[int | None, tuple[Any, Any] | None]:
    """`(step, (model, train))` of the newest checkpoint that restores and matches its checksums,
    or `(None, None)` when there is none. Newer checkpoints that fail (truncated, corrupted,
    unreadable) are logged with a warning naming their step, then moved to `CORRUPT_DIR` beside
    the checkpoints once an older one has restored. If none restores, the newest one's error is
    raised and nothing is moved: a config that no longer fits its checkpoints must not look like
    a damaged disk."""
    failed: dict[int, Exception] = {}
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = restore_training(manager, step, abstract_model, abstract_train, iterator)
        except Exception as e:  # see _restore_and_verify
            log.warning("checkpoint step %d in %s cannot be restored: %s", step, manager.directory, _brief(e))
            failed[step] = e
            continue
        if failed:
            moved = [_set_aside(manager, bad) for bad in sorted(failed)]
            manager.reload()
            log.warning(
                "resuming from checkpoint step %d, the newest complete one; the damaged step(s) %s were moved to %s",
                step,
                sorted(failed),
                ", ".join(str(path) for path in moved),
            )
        return step, restored
    if failed:
        raise failed[max(failed)]
    return None, None


def _set_aside(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    """Moves checkpoint `step` out of the manager's directory (kept for inspection)."""
    directory = epath.Path(manager.directory)
    target = directory.parent / CORRUPT_DIR / str(step)
    suffix = 1
    while target.exists():
        target = directory.parent / CORRUPT_DIR / f"{step}.{suffix}"
        suffix += 1
    if jax.process_index() == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        (directory / str(step)).rename(target)
    if jax.process_count() > 1:
        distributed.host_barrier(f"align_jax: checkpoint {step} set aside")
    return target
