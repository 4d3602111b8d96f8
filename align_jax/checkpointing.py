"""Checkpoint layout shared by training, conversion and inference.

A workdir holds `config.json` (the full ConfigDict: `model`, `data.vocab`, ...), the vocab it
names, and `checkpoints/<step>/` written by orbax's CheckpointManager. The model's variables
(`params`, `batch_stats`) are the item `model`, so inference restores them without touching
optimizer state, onto whatever devices it has.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
MODEL_ITEM = "model"


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
