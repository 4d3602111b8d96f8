"""Evaluate a checkpoint: `python -m align_jax.evaluate --workdir DIR [--config.FIELD=VALUE ...]`.

Runs the evaluators of the workdir's saved config (`evals`; by default held-out retrieval on
`data.eval`) on the latest checkpoint (or `--step`), whatever mesh trained it, sharded over the
local devices. Any field of the saved config can be overridden, e.g. another evaluation set with
`--config.data.eval=tfrecord:/data/coco-*.tfrecord`. The metrics go to `DIR/eval_<step>.json`
and, as one JSON object, to the last line of stdout. `--grid_queries 'a red circle|a blue
square'` also writes `DIR/retrieval_grid_<step>.png`: one row per query, its top images left to
right (and the ranking as JSON next to it).
"""

from __future__ import annotations

import json
import logging
import sys

import jax
import ml_collections
import numpy as np
import tensorflow as tf
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from align_jax import checkpointing
from align_jax import config as config_lib
from align_jax.evaluators import build_evaluators
from align_jax.inference import resolve_vocab
from align_jax.input import pipeline
from align_jax.input.text_ops import Tokenizer
from align_jax.models import DualEncoder, build_model, init_variables
from align_jax.sharding import make_mesh

log = logging.getLogger("align_jax.evaluate")


def restore_variables(workdir: epath.Path, config: ml_collections.ConfigDict, mesh, step: int | None) -> tuple:
    """(model, variables replicated over `mesh`, step)."""
    model = build_model(config.model)
    shapes = jax.eval_shape(lambda: init_variables(model, config.model, jax.random.key(0)))
    replicated = NamedSharding(mesh, P())
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes)
    with checkpointing.checkpoint_manager(workdir, read_only=True) as manager:
        step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {workdir / checkpointing.CHECKPOINT_DIR}")
    return model, checkpointing.restore_model(workdir, abstract, step), step


def prepare(workdir: epath.Path, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The saved config made runnable here: the workdir's vocab, a default evaluator."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.vocab = resolve_vocab(workdir, config)
    if not config.get("evals"):
        if config.get("task") == "classification":
            config.evals = ml_collections.ConfigDict(dict(classification=config_lib.classification_eval()))
        else:
            config.evals = ml_collections.ConfigDict(dict(retrieval=config_lib.retrieval_eval()))
    if not config.data.eval and any(not e.get("data") for e in config.evals.values()):
        raise config_lib.ConfigError("config.data.eval: no evaluation set given (--config.data.eval=SPEC)")
    return config


def evaluate(
    workdir: str, config: ml_collections.ConfigDict | None = None, step: int | None = None
) -> dict[str, float]:
    """Metrics of every configured evaluator on the checkpoint; also written to DIR/eval_<step>.json."""
    workdir = epath.Path(workdir).expanduser().resolve()
    config = prepare(workdir, config if config is not None else checkpointing.load_config(workdir))
    mesh = make_mesh([("data", -1), ("fsdp", 1)])
    model, variables, step = restore_variables(workdir, config, mesh, step)
    results = {"step": step}
    for name, evaluator in build_evaluators(config, model, mesh).items():
        metrics = evaluator.run(variables)
        log.info("%s: %s", name, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        results.update(metrics)
    if jax.process_index() == 0:
        (workdir / f"eval_{step}.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    return results


def retrieval_grid(
    workdir: str,
    queries: list[str],
    k: int = 8,
    max_images: int = 2048,
    step: int | None = None,
    config: ml_collections.ConfigDict | None = None,
) -> epath.Path:
    """A PNG of the top-`k` held-out images for each text query (one row per query), from the
    first `max_images` images of `data.eval`; the ranking is written next to it as JSON."""
    workdir = epath.Path(workdir).expanduser().resolve()
    config = prepare(workdir, config if config is not None else checkpointing.load_config(workdir))
    device = jax.local_devices()[0]
    mesh = make_mesh([("data", 1), ("fsdp", 1)], [device])
    model, variables, step = restore_variables(workdir, config, mesh, step)
    size = config.model.image_size
    dataset = pipeline.make_dataset(
        config.data.eval,
        config.data,
        image_size=size,
        max_text_length=config.model.max_text_length,
        batch_size=64,
        train=False,
        process_index=0,
        process_count=1,
    )
    encode_image = jax.jit(lambda v, x: model.apply(v, x, method=DualEncoder.encode_image))
    images, embeds = [], []
    for batch in dataset.as_numpy_iterator():
        if len(batch["images"]):
            images.append(batch["images"])
            embeds.append(np.asarray(encode_image(variables, batch["images"])))
        if sum(len(x) for x in images) >= max_images:
            break
    if not images:
        raise ValueError(f"no images in {config.data.eval}")
    images, embeds = np.concatenate(images)[:max_images], np.concatenate(embeds)[:max_images]
    ids, mask = Tokenizer(config.data.vocab, config.model.max_text_length, config.data.lower_case)(queries)
    texts = np.asarray(model.apply(variables, ids, mask, method=DualEncoder.encode_text))
    scores = texts @ embeds.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    pad = 4
    grid = np.full((len(queries) * (size + pad), min(k, len(images)) * (size + pad), 3), 255, np.uint8)
    for row, indices in enumerate(top):
        for col, index in enumerate(indices):
            grid[row * (size + pad) : row * (size + pad) + size, col * (size + pad) : col * (size + pad) + size] = (
                images[index]
            )
    path = workdir / f"retrieval_grid_{step}.png"
    path.write_bytes(tf.io.encode_png(grid).numpy())
    ranking = [
        {"query": q, "images": [int(i) for i in idx], "scores": [float(scores[r, i]) for i in idx]}
        for r, (q, idx) in enumerate(zip(queries, top, strict=True))
    ]
    path.with_suffix(".json").write_text(json.dumps(ranking, indent=2))
    return path


def _workdir_from_argv(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--workdir="):
            return arg.split("=", 1)[1]
        if arg == "--workdir" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def run() -> None:
    """Console script `align-evaluate`. The saved config is read before flag parsing, so that
    `--config.FIELD=VALUE` overrides it with type checks."""
    from absl import app, flags
    from ml_collections import config_flags

    workdir = _workdir_from_argv(sys.argv)
    if workdir is None:
        sys.exit("usage: python -m align_jax.evaluate --workdir DIR [--step N] [--config.FIELD=VALUE ...]")
    try:
        saved = checkpointing.load_config(epath.Path(workdir).expanduser())
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    config_flags.DEFINE_config_dict("config", saved, "the workdir's saved config, with overrides")
    flags.DEFINE_string("workdir", None, "a training workdir (config.json + checkpoints/)")
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
    flags.DEFINE_string("grid_queries", "", "'|'-separated text queries for a PNG grid of top images")
    flags.DEFINE_integer("grid_k", 8, "images per query in the grid")

    def main(argv):
        del argv
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
        logging.getLogger("absl").setLevel(logging.WARNING)
        flag_values = flags.FLAGS
        try:
            results = evaluate(flag_values.workdir, flag_values.config, flag_values.step)
            if flag_values.grid_queries:
                queries = [q.strip() for q in flag_values.grid_queries.split("|") if q.strip()]
                path = retrieval_grid(
                    flag_values.workdir, queries, flag_values.grid_k, step=flag_values.step, config=flag_values.config
                )
                log.info("retrieval grid written to %s", path)
        except (config_lib.ConfigError, FileNotFoundError, ValueError) as e:
            log.error("%s", e)
            sys.exit(1)
        print(json.dumps(results, sort_keys=True))

    app.run(main)


if __name__ == "__main__":
    run()
