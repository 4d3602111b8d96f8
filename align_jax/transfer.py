"""Starting a run from a pretrained checkpoint (`config.init.checkpoint`): an align_jax workdir,
one of its `checkpoints/<step>` folders, or a `tools/convert_hf` output. Its model variables
(parameters and BatchNorm statistics) replace the new run's initial ones; the optimizer state,
the step, the dropout key and the data position start anew (fine-tuning, not resuming).

Variables are matched by name: an image classifier takes the `image_tower` of a dual encoder and
keeps its new head; a dual encoder takes everything. When the run's image size differs from the
checkpoint's, a ViT's position embeddings are resampled to the new patch grid
(`vit.resize_position_embedding`); EfficientNet is fully convolutional with a mean pool, so only
its input size changes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from etils import epath
from jax.sharding import Mesh

from align_jax import checkpointing
from align_jax.inference import resolve_vocab, split_checkpoint_path
from align_jax.models import build_model, init_variables
from align_jax.models.vit import resize_position_embedding
from align_jax.sharding import DEFAULT_RULES, infer_shardings, path_name
from align_jax.train_step import TrainState

POSITION_EMBEDDING = "position_embedding"  # the ViT leaf resampled for another image size


def locate(path: str | os.PathLike) -> tuple[epath.Path, int, ml_collections.ConfigDict]:
    """`(workdir, step, saved config)` of a checkpoint path: the step it names, else the
    workdir's latest. Raises FileNotFoundError or ValueError saying what is missing."""
    workdir, step = split_checkpoint_path(epath.Path(path).expanduser().resolve())
    config = checkpointing.load_config(workdir)
    if "model" not in config:
        raise ValueError(f"{workdir / checkpointing.CONFIG_FILE} has no 'model' section")
    with checkpointing.checkpoint_manager(workdir, read_only=True) as manager:
        steps = manager.all_steps()
    if step is None:
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {workdir / checkpointing.CHECKPOINT_DIR}")
        step = max(steps)
    elif step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {workdir}; have {sorted(steps)}")
    return workdir, step, config


def source_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """The saved config of the checkpoint at `path`, its `data.vocab` made absolute (a workdir
    names its copy of the vocab relative to itself)."""
    workdir, _, config = locate(path)
    config = ml_collections.ConfigDict(config.to_dict())
    if config.get("data", {}).get("vocab"):
        config.data.vocab = resolve_vocab(workdir, config)
    return config


def _abstract_variables(model_config: ml_collections.ConfigDict) -> dict:
    model = build_model(model_config)
    return jax.eval_shape(lambda: init_variables(model, model_config, jax.random.key(0)))


def _flat(tree: Any) -> dict[str, Any]:
    return {path_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _resizable(name: str, source_shape: tuple[int, ...], target_shape: tuple[int, ...]) -> bool:
    """Whether a leaf is a ViT position embedding `[1, h*w, D]` that resamples to `target_shape`."""
    if name.rsplit("/", 1)[-1] != POSITION_EMBEDDING or len(source_shape) != 3 or len(target_shape) != 3:
        return False
    tokens = (source_shape[1], target_shape[1])
    square = all(math.isqrt(t) ** 2 == t for t in tokens)
    return square and source_shape[::2] == target_shape[::2]


def match(target: Any, source: Any, new_params: Sequence[str] = ()) -> dict[str, str]:
    """How each leaf of the `target` variables is filled from the `source` (both trees of
    arrays or shape structs, `{'params', 'batch_stats'}`): `"copy"`, `"resize"` (a ViT position
    embedding for another patch grid) or `"init"` (a top-level parameter in `new_params` that the
    source lacks). Raises ValueError naming the leaves that cannot be filled."""
    source = _flat(source)
    plan, problems = {}, []
    for name, leaf in _flat(target).items():
        if name in source:
            source_shape, target_shape = tuple(source[name].shape), tuple(leaf.shape)
            if source_shape == target_shape:
                plan[name] = "copy"
            elif _resizable(name, source_shape, target_shape):
                plan[name] = "resize"
            else:
                problems.append(f"{name} has shape {source_shape} in the checkpoint but the model needs {target_shape}")
        elif name.split("/")[0] == "params" and name.split("/")[1] in new_params:
            plan[name] = "init"
        else:
            problems.append(f"the checkpoint has no {name}")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ValueError(f"the checkpoint does not fit the model: {shown}")
    return plan


def check_compatible(config: ml_collections.ConfigDict, new_params: Sequence[str] = ()) -> None:
    """Raises ValueError (or FileNotFoundError) unless `config.init.checkpoint` exists and holds
    every variable of `config.model` (see `match`); reads shapes only."""
    _, _, saved = locate(config.init.checkpoint)
    match(_abstract_variables(config.model), _abstract_variables(saved.model), new_params)


def initialise(state: TrainState, path: str | os.PathLike, mesh: Mesh, new_params: Sequence[str] = ()) -> TrainState:
    """`state` (freshly initialised, in its shardings on `mesh`) with its parameters and BatchNorm
    statistics read from the checkpoint at `path`, except the `new_params` it lacks."""
    workdir, step, saved = locate(path)
    target = {"params": state.params, "batch_stats": state.batch_stats}
    source_shapes = _abstract_variables(saved.model)
    plan = match(target, source_shapes, new_params)
    # Restored in the default shardings of this mesh (FSDP-sharded when it has an fsdp axis), so
    # no device holds a whole large model; what the target does not take is then dropped.
    shardings = infer_shardings(source_shapes, mesh, DEFAULT_RULES)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), source_shapes, shardings)
    source = _flat(checkpointing.restore_model(workdir, abstract, step))

    def fill(path, leaf):
        name = path_name(path)
        if plan[name] == "init":
            return leaf
        value = source[name]
        if plan[name] == "resize":
            grid = math.isqrt(leaf.shape[1])
            value = resize_position_embedding(value, (grid, grid))
        return jax.device_put(value.astype(leaf.dtype), leaf.sharding)

    filled = jax.tree_util.tree_map_with_path(fill, target)
    return state.replace(params=filled["params"], batch_stats=filled["batch_stats"])
