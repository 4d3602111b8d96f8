"""The training config: every field with its default (ALIGN's recipe), and the checks that run
before training so a wrong value fails in seconds, naming the field, instead of hours in.

Config files in `configs/` start from `base_config()` and change only what differs.
"""

from __future__ import annotations

import math

import jax
import ml_collections
import tensorflow as tf

from align_jax import optim, sharding, tasks, train_step, transfer
from align_jax.evaluators.linear_probe import DEFAULT_L2_REGS, FEATURES
from align_jax.input import pipeline, readers
from align_jax.input.text_ops import read_vocab
from align_jax.models import build_model, presets

EVALUATORS = ("retrieval", "zeroshot", "image_text", "linear_probe", "classification")


def base_config() -> ml_collections.ConfigDict:
    """ALIGN-base as in the paper (section 5): EfficientNet-B7 + BERT-base at 289 px, 640-d
    embeddings, global batch 16384, LAMB at 1e-3 with 10k warmup steps and linear decay to 0 at
    1.2M steps, weight decay 1e-5, label smoothing 0.1, temperature initialised at 1.0."""
    config = ml_collections.ConfigDict()
    # What is trained: "contrastive" (the dual encoder, ALIGN) or "classification" (the image tower
    # with a new linear head of model.num_classes outputs on data.train's data.label_field; see
    # align_jax/tasks.py and configs/finetune_classification.py).
    config.task = "contrastive"
    # A checkpoint whose model variables start a new run (fine-tuning): a workdir, one of its
    # checkpoints/<step> folders or a tools/convert_hf output ('' = random initialisation). The
    # optimizer, step and data position start anew; a classifier takes its image tower only.
    config.init = ml_collections.ConfigDict(dict(checkpoint=""))
    config.seed = 0  # parameters, dropout and the input pipeline's shuffles, crops and caption draws
    config.batch_size = 16384  # global, over all devices and processes
    # Micro-batches per step (GradCache): the same gradients as the whole batch at about 1/k of
    # the activation memory; batch_size must divide by data-parallel devices * accum_steps.
    config.accum_steps = 1
    config.total_steps = 1_200_000
    # Device mesh: (axis, size) pairs; one size may be -1 (the remaining devices). The default uses
    # every device for data parallelism, so one command runs on 1 or N devices.
    config.mesh = (("data", -1), ("fsdp", 1))
    config.model = presets.align_base()
    config.data = pipeline.default_config()
    config.optimizer = optim.default_config()
    config.loss = train_step.default_loss_config()

    config.log_every = 100  # steps between console / TensorBoard / JSONL lines
    config.checkpoint_every = 1000  # steps between (asynchronous) checkpoints
    config.keep_checkpoints = 3  # the most recent ones kept
    # Also keep the best checkpoint by an evaluation metric ('' = off), e.g. "retrieval/i2t_r1".
    config.checkpoint_best = ml_collections.ConfigDict(dict(metric="", mode="max"))
    config.eval_every = 10_000  # steps between evaluations (0: only at the end); needs config.evals
    config.evals = ml_collections.ConfigDict()  # name -> evaluator config (see retrieval_eval)
    # jax.profiler trace of steps [start_step, start_step + num_steps) into WORKDIR/profile (-1: off).
    config.profile = ml_collections.ConfigDict(dict(start_step=-1, num_steps=5))
    # Peak FLOP/s of one device for the MFU estimate; 0 looks the device up (known TPUs and GPUs).
    config.device_peak_flops = 0.0
    return config


def retrieval_eval(**overrides) -> ml_collections.ConfigDict:
    """An image<->text retrieval evaluator on the held-out split (`data.eval` unless `data` is set)."""
    config = ml_collections.ConfigDict(
        dict(
            type="retrieval",
            data="",  # source spec; '' = data.eval
            caption_fields=(),  # caption fields per image (several allowed); () = data.captions
            batch_size=0,  # global; 0 = the training batch size
            max_examples=0,  # 0 = the whole split
        )
    )
    config.update(overrides)
    return config


def zeroshot_eval(**overrides) -> ml_collections.ConfigDict:
    """Zero-shot classification: class names written into prompt templates, prompt-ensembled."""
    config = ml_collections.ConfigDict(
        dict(
            type="zeroshot",
            data="",  # source spec of labelled images; '' = data.eval
            class_names=(),  # in label order: record label i is class_names[i]
            templates=(),  # '{}' marks the class name; () = the 80 CLIP ImageNet templates
            label_field="label",  # integer field of the records
            batch_size=0,
            max_examples=0,
        )
    )
    config.update(overrides)
    return config


def image_text_eval(**overrides) -> ml_collections.ConfigDict:
    """Image+text query retrieval (ALIGN section 7): a query image plus a modifier text, embedded
    as the normalised sum of the two embeddings, should find its target image in a gallery."""
    config = ml_collections.ConfigDict(
        dict(
            type="image_text",
            queries="",  # source spec of query records: image, modifier text, target id
            gallery="",  # source spec of gallery records: image and its id
            modifier_field="modifier",
            target_field="target",  # integer field of a query: the id of its target image
            id_field="id",  # integer field of a gallery image
            text_weight=1.0,  # query = normalise(image + text_weight * text)
            batch_size=0,  # global; 0 = the training batch size
            max_examples=0,  # queries scored; 0 = all
        )
    )
    config.update(overrides)
    return config


def linear_probe_eval(**overrides) -> ml_collections.ConfigDict:
    """A linear probe: a ridge classifier fitted on frozen image features of a labelled train
    split, top-1 on its test split, and few-shot variants (see evaluators/linear_probe.py)."""
    config = ml_collections.ConfigDict(
        dict(
            type="linear_probe",
            train_data="",  # source spec of the labelled images the classifier is fitted on
            data="",  # source spec of the labelled test images
            label_field="label",  # integer field of the records
            num_classes=0,  # 0 = one more than the largest label
            features="embedding",  # the unit-norm joint embedding, or "pooled" (the tower, unprojected)
            shots=(1, 5, 10),  # few-shot variants: examples per class; () = none
            l2_regs=DEFAULT_L2_REGS,  # ridge strengths per example, chosen on a held-out slice of train
            validation_fraction=0.2,  # of the train split, held out to choose the strength
            seed=0,  # the held-out slice and the few-shot examples
            batch_size=0,  # global; 0 = the training batch size
            max_train_examples=0,  # 0 = the whole train split
            max_examples=0,  # test examples; 0 = the whole split
        )
    )
    config.update(overrides)
    return config


def classification_eval(**overrides) -> ml_collections.ConfigDict:
    """Top-1 / top-5 of an image classifier (the classification task's model) on labelled images."""
    config = ml_collections.ConfigDict(
        dict(
            type="classification",
            data="",  # source spec of labelled images; '' = data.eval
            label_field="",  # integer class field; '' = data.label_field (what the classifier learned)
            batch_size=0,
            max_examples=0,
        )
    )
    config.update(overrides)
    return config


def finetune_config(checkpoint: str) -> ml_collections.ConfigDict:
    """The base of a fine-tuning config: `base_config()` starting from `checkpoint` (a workdir,
    a checkpoints/<step> folder or a convert_hf output), with its model, its data settings (the
    training and evaluation sets left to the new config), its vocab and, for a demo run, its
    demo data (written again into the new workdir)."""
    saved = transfer.source_config(checkpoint)
    config = base_config()
    config.init.checkpoint = str(checkpoint)
    config.model = saved.model
    config.data.update({k: v for k, v in saved.get("data", {}).items() if k not in ("train", "eval")})
    if saved.get("demo_data"):
        config.demo_data = saved.demo_data
    return config


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


def _check(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config.{field}: {message}")


def _check_source(spec: str, field: str, config: ml_collections.ConfigDict) -> None:
    _check(bool(spec), field, "no data source given (e.g. tfrecord:/data/shards-*.tfrecord)")
    try:
        sources = readers.parse_spec(spec)
        for source in sources:
            if source.kind == "tfrecord":
                readers.tfrecord_files(source.path)
            elif source.kind == "csv":
                _check(tf.io.gfile.exists(source.path), field, f"CSV file not found: {source.path}")
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"config.{field}: {e}") from e


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None, process_count: int = 1) -> None:
    """Raises `ConfigError` naming the first field that cannot work on this machine."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    for field in ("batch_size", "total_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
        value = config.get(field)
        _check(isinstance(value, int) and value > 0, field, f"must be a positive integer, got {value!r}")
    _check(config.eval_every >= 0, "eval_every", f"must be >= 0, got {config.eval_every}")

    try:
        build_model(config.model)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ConfigError(f"config.model: {e}") from e
    _check(config.get("task", "contrastive") in tasks.TASKS, "task", f"must be one of {tuple(tasks.TASKS)}")
    task = tasks.get(config)
    if task.name == "classification":
        _check(config.model.get("num_classes", 0) > 0, "model.num_classes", "the classification task needs classes")
        _check(bool(config.data.get("label_field")), "data.label_field", "the classification task needs a label field")
        _check(
            config.get("accum_steps", 1) == 1, "accum_steps", "gradient accumulation is for the contrastive task only"
        )
    else:
        _check(
            not config.model.get("num_classes", 0),
            "model.num_classes",
            f"must be 0 for the {task.name} task (a classifier has no text tower)",
        )

    try:
        shape = sharding.mesh_shape(config.mesh, num_devices)
    except ValueError as e:
        raise ConfigError(f"config.mesh: {e}") from e
    _check(
        all(axis in shape for axis in sharding.BATCH_AXES),
        "mesh",
        f"needs the axes {sharding.BATCH_AXES}, got {tuple(shape)}",
    )
    data_parallel = math.prod(shape[a] for a in sharding.BATCH_AXES)
    _check(
        config.batch_size % data_parallel == 0,
        "batch_size",
        f"{config.batch_size} is not divisible by the {data_parallel} devices of the data axes {dict(shape)}",
    )
    accum_steps = config.get("accum_steps", 1)
    _check(
        isinstance(accum_steps, int) and accum_steps > 0,
        "accum_steps",
        f"must be a positive integer, got {accum_steps!r}",
    )
    _check(
        config.batch_size % (data_parallel * accum_steps) == 0,
        "accum_steps",
        f"batch_size {config.batch_size} is not divisible by the {data_parallel} data-parallel devices "
        f"times accum_steps {accum_steps}",
    )
    try:
        pipeline.resolve_num_readers(config.data, config.batch_size, process_count)
    except ValueError as e:
        raise ConfigError(f"config.data.num_readers: {e}") from e

    try:
        optim.make_optimizer(config.optimizer, config.total_steps)
    except ValueError as e:
        raise ConfigError(f"config.{e}" if str(e).startswith("optimizer.") else f"config.optimizer: {e}") from e
    _check(config.loss.kind in train_step.LOSSES, "loss.kind", f"must be one of {train_step.LOSSES}")

    _check_source(config.data.train, "data.train", config)
    _check(bool(config.data.vocab), "data.vocab", "no WordPiece vocab file given")
    try:
        read_vocab(config.data.vocab)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"config.data.vocab: {e}") from e

    for name, evaluator in config.evals.items():
        _check(evaluator.get("type") in EVALUATORS, f"evals.{name}.type", f"must be one of {EVALUATORS}")
        _check(
            evaluator.type in task.evaluators,
            f"evals.{name}.type",
            f"{evaluator.type!r} does not apply to the {task.name} task; use one of {task.evaluators}",
        )
        if evaluator.type == "linear_probe":
            _check_linear_probe(evaluator, f"evals.{name}", task, config)
            continue
        if evaluator.type == "zeroshot":
            _check(len(evaluator.class_names) > 0, f"evals.{name}.class_names", "no class names given")
        if evaluator.type == "image_text":
            _check_source(evaluator.queries, f"evals.{name}.queries", config)
            _check_source(evaluator.gallery, f"evals.{name}.gallery", config)
            continue
        spec = evaluator.get("data") or config.data.eval
        _check_source(spec, f"evals.{name}.data" if evaluator.get("data") else "data.eval", config)
    if config.checkpoint_best.metric:
        _check(bool(config.evals), "checkpoint_best.metric", "needs an evaluator in config.evals")

    if config.get("init", {}).get("checkpoint"):
        try:
            transfer.check_compatible(config, task.new_params)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"config.init.checkpoint: {e}") from e


def _check_linear_probe(evaluator: ml_collections.ConfigDict, field: str, task, config) -> None:
    _check_source(evaluator.train_data, f"{field}.train_data", config)
    _check_source(evaluator.data, f"{field}.data", config)
    _check(evaluator.features in FEATURES, f"{field}.features", f"must be one of {FEATURES}")
    _check(
        evaluator.features != "embedding" or task.name == "contrastive",
        f"{field}.features",
        "an image classifier has no joint embedding; use 'pooled'",
    )
    shots = tuple(evaluator.shots)
    _check(all(isinstance(k, int) and k > 0 for k in shots), f"{field}.shots", f"must be positive integers: {shots}")
    l2_regs = tuple(evaluator.l2_regs)
    _check(bool(l2_regs) and min(l2_regs) > 0, f"{field}.l2_regs", f"must be positive numbers: {l2_regs}")
    _check(
        len(l2_regs) == 1 or 0 < evaluator.validation_fraction < 1,
        f"{field}.validation_fraction",
        f"must lie in (0, 1) to choose among the l2_regs, got {evaluator.validation_fraction}",
    )
    _check(evaluator.num_classes >= 0, f"{field}.num_classes", f"must be >= 0, got {evaluator.num_classes}")
