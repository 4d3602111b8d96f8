"""Issue 10's transfer recipes on a small demo run, for tests/test_transfer_recipes.py.

    python -m tests.transfer_recipes ROOT     # prints the figures as one JSON line

Through the training program and the shipped configs, in one process on whatever devices it has:
`configs/demo.py` pretrains a three-stage tiny model at 32 px on small demo data (written into
ROOT/pretrained) and ends with the linear probe of its image embeddings on the labelled split's
`layout` (size and position of the shape, 8 classes); the same probe runs on the tower randomly
initialised; then `configs/finetune_classification.py` and `configs/finetune_retrieval.py`,
shortened, start from the pretrained workdir, and the retrieval evaluator of the latter also
scores the pretrained model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import jax
import ml_collections
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from align_jax import checkpointing, train
from align_jax.config import linear_probe_eval
from align_jax.evaluators import build_evaluators
from align_jax.input import demo_data
from align_jax.models import build_model, init_variables
from align_jax.sharding import make_mesh
from tests import fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE = 32


def config_file(name: str, *args):
    """`get_config(*args)` of `configs/NAME.py`."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def shorten(config: ml_collections.ConfigDict, steps: int, learning_rate: float = 2e-3, batch_size: int = 32):
    """`steps` of AdamW at a constant rate: pretraining and retrieval fine-tuning then compile the
    same step, and the second reads it from the compilation cache."""
    config.batch_size = batch_size
    config.total_steps = steps
    config.optimizer.update(
        name="adamw", learning_rate=learning_rate, weight_decay=1e-4, warmup_steps=0, decay="constant"
    )
    config.log_every = config.checkpoint_every = steps
    config.data.shuffle_buffer = 256
    return config


def restored(workdir: epath.Path, mesh) -> tuple[ml_collections.ConfigDict, object, dict]:
    """(saved config, model, variables replicated over `mesh`) of a workdir's latest checkpoint."""
    config = checkpointing.load_config(workdir)
    model = build_model(config.model)
    shapes = jax.eval_shape(lambda: init_variables(model, config.model, jax.random.key(0)))
    replicated = NamedSharding(mesh, P())
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes)
    return config, model, checkpointing.restore_model(workdir, abstract)


def pretrain(workdir: epath.Path, steps: int = 300) -> dict:
    config = config_file("demo")
    model = fixtures.three_stage_tiny(IMAGE_SIZE, 24)
    model.temperature_init = config.model.temperature_init
    config.model = model
    config.demo_data.update(
        num_train=1024,
        num_eval=64,
        num_shards=4,
        image_size=48,
        num_queries=4,
        num_labelled=(512, 128),
        num_captioned=(256, 128),
    )
    config.evals = ml_collections.ConfigDict(dict(probe=linear_probe_eval(label_field="layout", shots=(5,))))
    shorten(config, steps)
    return train.train_and_evaluate(config, str(workdir))


def random_tower_probe(workdir: epath.Path, mesh) -> dict:
    """The pretraining run's probe on the same tower at its random initialisation."""
    config, model, _ = restored(workdir, mesh)
    config.data.vocab = str(workdir / config.data.vocab)
    [probe] = build_evaluators(config, model, mesh).values()
    return probe.run(init_variables(model, config.model, jax.random.key(0)))


def finetune_classification(pretrained: epath.Path, workdir: epath.Path, steps: int = 300) -> dict:
    config = config_file("finetune_classification", str(pretrained))
    config.model.image_size = IMAGE_SIZE  # a resolution change wants a longer run than a test's
    config.model.image.bn_momentum = 0.9  # running statistics that follow within a short run
    config.data.label_field = "layout"
    config.model.num_classes = len(demo_data.layout_names())
    shorten(config, steps)
    return train.train_and_evaluate(config, str(workdir))


def finetune_retrieval(pretrained: epath.Path, workdir: epath.Path, mesh, steps: int = 100) -> tuple[dict, dict]:
    """(the pretrained model's and the fine-tuned one's held-out retrieval metrics)."""
    config = shorten(config_file("finetune_retrieval", str(pretrained)), steps)
    prepared = train.prepare_config(config, workdir)
    _, model, variables = restored(pretrained, mesh)
    [evaluator] = build_evaluators(prepared, model, mesh).values()
    return evaluator.run(variables), train.train_and_evaluate(config, str(workdir))


def run(root: str) -> dict:
    root = epath.Path(root)
    mesh = make_mesh([("data", -1), ("fsdp", 1)])
    pretrained = pretrain(root / "pretrained")
    before, after = finetune_retrieval(root / "pretrained", root / "retrieval", mesh)
    return dict(
        probe_pretrained=pretrained,
        probe_random=random_tower_probe(root / "pretrained", mesh),
        classification=finetune_classification(root / "pretrained", root / "classification"),
        retrieval_before=before,
        retrieval_after=after,
    )


if __name__ == "__main__":
    train.enable_compilation_cache()
    print(json.dumps(run(sys.argv[1]), sort_keys=True))
