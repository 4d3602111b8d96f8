"""Issue 10's transfer recipes end to end on a small demo run, through the training program and
the shipped configs: the linear probe of a pretrained tower beats the same probe of a randomly
initialised one by a wide margin, classification fine-tuning beats the probe, and retrieval
fine-tuning raises held-out recall.

One tiny model is pretrained (module fixture) with `configs/demo.py` on small demo data; the
fine-tuning runs start from its workdir with `configs/finetune_classification.py` and
`configs/finetune_retrieval.py`, shortened.
"""

from __future__ import annotations

import importlib.util
import os

import jax
import ml_collections
import pytest
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
WIDE_MARGIN = 0.2


def _config_file(name: str, *args):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def _shorten(config, steps: int, learning_rate: float, batch_size: int = 32):
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


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[epath.Path, dict]:
    """The demo recipe on small demo data with a three-stage tiny model at 32 px, evaluated at the
    end by the linear probe of its image embeddings on the labelled split's `layout` (size and
    position of the shape, 8 classes): (workdir, final metrics)."""
    workdir = epath.Path(tmp_path_factory.mktemp("pretrained"))
    config = _config_file("demo")
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
    _shorten(config, steps=300, learning_rate=2e-3)
    result = train.train_and_evaluate(config, str(workdir))
    return workdir, result


def _restored(workdir):
    config = checkpointing.load_config(workdir)
    model = build_model(config.model)
    shapes = jax.eval_shape(lambda: init_variables(model, config.model, jax.random.key(0)))
    return config, model, checkpointing.restore_model(workdir, checkpointing.abstract_on_device(shapes))


@pytest.fixture(scope="module")
def probes(pretrained) -> dict[str, dict[str, float]]:
    """The probe's metrics on the pretrained tower and on the same tower randomly initialised."""
    workdir, result = pretrained
    config, model, _ = _restored(workdir)
    config.data.vocab = str(workdir / config.data.vocab)
    [probe] = build_evaluators(config, model, make_mesh([("data", -1), ("fsdp", 1)])).values()
    return dict(pretrained=result, random=probe.run(init_variables(model, config.model, jax.random.key(0))))


def test_probe_of_the_pretrained_tower_beats_a_random_tower_widely(probes):
    pretrained, random = probes["pretrained"]["probe/top1"], probes["random"]["probe/top1"]
    assert pretrained - random >= WIDE_MARGIN, (pretrained, random)
    assert probes["pretrained"]["probe/num_classes"] == len(demo_data.layout_names())


def test_classification_finetuning_beats_the_probe(pretrained, probes, tmp_path):
    config = _config_file("finetune_classification", str(pretrained[0]))
    config.model.image_size = IMAGE_SIZE  # a resolution change wants a longer run than a test's
    config.model.image.bn_momentum = 0.9  # running statistics that follow within 300 steps
    config.data.label_field = "layout"
    config.model.num_classes = len(demo_data.layout_names())
    _shorten(config, steps=300, learning_rate=2e-3)
    result = train.train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 300 and result["classification/num_images"] == 128
    assert result["classification/top1"] > probes["pretrained"]["probe/top1"]


def test_retrieval_finetuning_raises_held_out_recall(pretrained, tmp_path):
    config = _config_file("finetune_retrieval", str(pretrained[0]))
    _shorten(config, steps=100, learning_rate=2e-3)
    prepared = train.prepare_config(config, epath.Path(tmp_path))
    _, model, variables = _restored(pretrained[0])
    mesh = make_mesh([("data", -1), ("fsdp", 1)])
    [evaluator] = build_evaluators(prepared, model, mesh).values()
    before = evaluator.run(jax.device_put(variables, NamedSharding(mesh, P())))
    after = train.train_and_evaluate(config, str(tmp_path))
    assert before["retrieval/num_texts"] == after["retrieval/num_texts"] > 128 * 3

    def mean_recall(metrics):
        return sum(metrics[f"retrieval/{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)) / 6

    assert mean_recall(after) > mean_recall(before) + 0.05, (before, after)
