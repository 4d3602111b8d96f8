"""The training program.

    python -m align_jax.train --config configs/NAME.py --workdir DIR [--config.batch_size=256 ...]

One command on 1 or N devices: it validates the config, restores the latest complete checkpoint
in DIR (model, optimizer, input position) or starts fresh, trains with periodic logging,
evaluation and asynchronous checkpoints, and on SIGTERM/SIGINT finishes the step, saves and
exits 0 so the next launch resumes. A non-finite loss, gradient or parameter stops the run
without saving over the last good checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from align_jax import checkpointing, distributed, perf, tasks, transfer
from align_jax import config as config_lib
from align_jax.evaluators import build_evaluators
from align_jax.input import demo_data, filters, pipeline
from align_jax.input.text_ops import read_vocab
from align_jax.metric_writer import MetricWriter
from align_jax.models import build_model
from align_jax.optim import make_optimizer
from align_jax.sharding import make_mesh
from align_jax.train_step import TrainState, abstract_train_state, make_init_fn, model_flops

log = logging.getLogger("align_jax.train")
VOCAB_FILE = "vocab.txt"  # the workdir's copy; config.json names it relative to the workdir
DEMO_DATA_DIR = "demo_data"


class NonFiniteError(RuntimeError):
    """The loss, the gradients or the updated parameters stopped being finite."""


def prepare_config(config: ml_collections.ConfigDict, workdir: epath.Path) -> ml_collections.ConfigDict:
    """Resolves what the config leaves to the run (demo data, the vocab size) and validates it."""
    config = ml_collections.ConfigDict(config.to_dict())
    if config.get("demo_data") and not config.data.train:
        # The embedded demo dataset is generated on first use, inside the workdir.
        demo = config.demo_data
        output = workdir / DEMO_DATA_DIR
        specs = demo_data.specs(str(output))
        num_queries = demo.get("num_queries", demo_data.NUM_QUERIES)

        def write_demo_data():
            if not (output / "vocab.txt").exists():
                log.info(
                    "writing the demo dataset (%d train, %d eval images) to %s", demo.num_train, demo.num_eval, output
                )
                demo_data.write(
                    str(output), demo.num_train, demo.num_eval, demo.num_shards, demo.seed, demo.image_size, num_queries
                )
            # The splits beyond `write`'s, and those a folder written before they existed lacks.
            demo_data.write_missing(
                str(output),
                demo.seed,
                demo.image_size,
                num_queries,
                tuple(demo.get("num_labelled", demo_data.NUM_LABELLED)),
                tuple(demo.get("num_captioned", demo_data.NUM_CAPTIONED)),
            )

        # Process 0 writes while the others wait; a host that does not share process 0's disk
        # then writes its own copy (the data is deterministic).
        if jax.process_index() == 0:
            write_demo_data()
        if jax.process_count() > 1:
            distributed.host_barrier("align_jax: demo data written")
            write_demo_data()
        # A fine-tuning config names the demo splits it trains and evaluates on.
        config.data.train = specs[demo.get("train_split", "train")]
        config.data.eval = config.data.eval or specs[demo.get("eval_split", "eval")]
        config.data.vocab = config.data.vocab or specs["vocab"]
        for evaluator in config.evals.values():
            if evaluator.get("type") == "linear_probe":
                evaluator.train_data = evaluator.train_data or specs["labelled_train"]
                evaluator.data = evaluator.data or specs["labelled_test"]
            if evaluator.get("type") == "image_text":
                evaluator.queries = evaluator.queries or specs["queries"]
                evaluator.gallery = evaluator.gallery or specs["gallery"]
    config_lib.validate(config, jax.device_count(), jax.process_count())
    # The text tower's vocabulary follows the vocab file.
    config.model.text.vocab_size = len(read_vocab(config.data.vocab))
    return config


def save_run_config(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
    """config.json plus a copy of the vocab, so the workdir alone is a usable model."""
    (workdir / VOCAB_FILE).write_text(epath.Path(config.data.vocab).read_text())
    saved = ml_collections.ConfigDict(config.to_dict())
    saved.data.vocab = VOCAB_FILE
    path = workdir / checkpointing.CONFIG_FILE
    if path.exists():
        previous = json.loads(path.read_text())
        changed = _changed_fields(previous, saved.to_dict())
        if changed:
            log.warning("config differs from the one saved in %s: %s", path, ", ".join(changed))
    checkpointing.save_config(workdir, saved)


def _changed_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [f for k in keys for f in _changed_fields(old.get(k), new.get(k), f"{prefix}{k}.")]
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        old, new = json.loads(json.dumps(old)), json.loads(json.dumps(new))
    return [] if old == new else [prefix.rstrip(".")]


class StopRequest:
    """SIGTERM / SIGINT set a flag that the loop reads between steps (a second SIGINT aborts)."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: finishing this step, saving a checkpoint, then exiting", self.signal_name)

    def agreed(self) -> bool:
        """Whether any process was asked to stop (all processes must stop at the same step)."""
        if jax.process_count() == 1:
            return self.requested
        return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _check_finite(step: int, metrics: dict, last_saved: int | None) -> None:
    values = jax.device_get({k: metrics[k] for k in ("loss", "grad_norm", "param_norm")})
    what = {"loss": "the loss", "grad_norm": "the gradient norm", "param_norm": "the updated parameters' norm"}
    for name, value in values.items():
        if not np.isfinite(value):
            kept = f"the last good checkpoint (step {last_saved}) is kept" if last_saved else "no checkpoint was saved"
            raise NonFiniteError(f"step {step}: {what[name]} is {float(value)}; stopping without saving ({kept})")


def _skipped(batch: dict) -> dict[str, float]:
    counts = np.asarray(batch["skipped"], np.int64)
    if jax.process_count() > 1:
        counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, counts.shape[-1]).sum(0)
    out = {f"skipped/{name}": float(n) for name, n in zip(filters.SKIP_REASONS, counts, strict=True)}
    out["skipped/total"] = float(counts.sum())
    return out


def _split_state(state: TrainState) -> tuple[dict, dict]:
    """Checkpoint items: the model (what inference restores) and the rest of the training state."""
    model = {"params": state.params, "batch_stats": state.batch_stats}
    train = {"step": state.step, "opt_state": state.opt_state, "rng": jax.random.key_data(state.rng)}
    return model, train


def abstract_checkpoint_items(abstract: TrainState, shardings: TrainState) -> tuple[dict, dict]:
    """`_split_state` of an abstract state: what a checkpoint restores into, on the current mesh."""
    model = {"params": abstract.params, "batch_stats": abstract.batch_stats}
    key_shape = jax.eval_shape(jax.random.key_data, jax.random.key(0)).shape
    train = {
        "step": abstract.step,
        "opt_state": abstract.opt_state,
        "rng": jax.ShapeDtypeStruct(key_shape, np.uint32, sharding=shardings.rng),
    }
    return model, train


def _join_state(model: dict, train: dict) -> TrainState:
    return TrainState(
        step=train["step"],
        params=model["params"],
        batch_stats=model["batch_stats"],
        opt_state=train["opt_state"],
        rng=jax.random.wrap_key_data(train["rng"]),  # the default impl, as jax.random.key made it
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains to `config.total_steps` (resuming if DIR has checkpoints); returns the last
    evaluation's metrics with the step."""
    workdir = epath.Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config = prepare_config(config, workdir)
    is_main = jax.process_index() == 0
    if is_main:
        save_run_config(config, workdir)

    mesh = make_mesh(config.mesh)
    model = build_model(config.model)
    tx, schedule = make_optimizer(config.optimizer, config.total_steps)
    abstract, shardings = abstract_train_state(model, config.model, tx, mesh)
    task = tasks.get(config)
    datasets = task.train_datasets(config)
    iterator = pipeline.DataIterator(datasets, pipeline.resolve_num_readers(config.data, config.batch_size))
    manager = checkpointing.training_manager(
        workdir,
        keep=config.keep_checkpoints,
        best_metric=config.checkpoint_best.metric,
        best_mode=config.checkpoint_best.mode,
    )
    writer = None
    stop = StopRequest()
    try:
        # The newest checkpoint that restores and matches its checksums (a damaged newer one is set aside).
        abstract_model, abstract_train = abstract_checkpoint_items(abstract, shardings)
        start, restored = checkpointing.restore_latest_training(manager, abstract_model, abstract_train, iterator)
        if start is None:
            state = jax.jit(make_init_fn(model, config.model, tx), out_shardings=shardings)(jax.random.key(config.seed))
            if config.init.checkpoint:
                state = transfer.initialise(state, config.init.checkpoint, mesh, task.new_params)
                log.info("model variables from %s (fresh optimizer, step 0)", config.init.checkpoint)
            start = 0
            log.info("starting a new run in %s on %d device(s), mesh %s", workdir, jax.device_count(), dict(mesh.shape))
        else:
            state = _join_state(*restored)
            log.info("resumed from the checkpoint of step %d in %s (mesh %s)", start, workdir, dict(mesh.shape))
        writer = MetricWriter(workdir, enabled=is_main, resume_step=start)
        step_fn = task.make_train_step(config, model, tx, schedule, mesh, shardings)
        evaluators = build_evaluators(config, model, mesh)
        return _loop(config, workdir, state, step_fn, iterator, manager, writer, evaluators, stop, mesh, start)
    finally:
        stop.restore()
        manager.wait_until_finished()  # an async save in flight is completed, never abandoned
        manager.close()
        if writer is not None:
            writer.close()


def _evaluate(evaluators, state, writer, step) -> dict[str, float]:
    results = {}
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    for name, evaluator in evaluators.items():
        start = time.perf_counter()
        metrics = evaluator.run(variables)
        log.info("eval %s at step %d (%.1fs): %s", name, step, time.perf_counter() - start, _format(metrics))
        results.update(metrics)
    if results:
        writer.write(step, results)
    return results


def _format(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())


def _loop(config, workdir, state, step_fn, iterator, manager, writer, evaluators, stop, mesh, start):
    total = config.total_steps
    num_devices = jax.device_count()
    peak = config.device_peak_flops or perf.device_peak_flops()
    flops, compiled_step = None, None
    last_saved = manager.latest_step()
    eval_results: dict[str, float] = {}
    pending = None  # (step, device metrics) of the last step, checked for NaN one step late
    interval: list[dict] = []
    timed_steps, timed_seconds = 0, 0.0
    profiling = False
    done = start
    tic = time.perf_counter()

    def save(step, metrics=None):
        nonlocal last_saved
        if step == last_saved:
            return
        model_vars, train_vars = _split_state(state)
        checkpointing.save_training(manager, step, model_vars, train_vars, iterator, metrics)
        last_saved = step

    for step in range(start, total):
        if step == config.profile.start_step and config.profile.num_steps > 0:
            jax.profiler.start_trace(str(workdir / "profile"))
            profiling = True
        batch = next(iterator)
        global_batch = pipeline.to_global_batch(batch, mesh, tasks.get(config).batch_keys)
        if compiled_step is None:
            lowered = step_fn.jitted.lower(state, global_batch)
            # Model FLOPs from the step without accumulation and with XLA's dots (train_step.py).
            flops = model_flops(step_fn, lowered, state, global_batch) or 0.0
            compiled_step = lowered.compile()
            # Hosts finish compiling at different times; the step's first collective must not
            # wait on a slower host's compile.
            distributed.host_barrier("align_jax: train step compiled")
        state, metrics = compiled_step(state, global_batch)
        if pending is not None:  # the previous step's values: waits for it, not for this one
            _check_finite(*pending, last_saved)
        done = step + 1
        pending = (done, metrics)
        interval.append(metrics)
        if done == start + 1:  # the first step of a launch includes compilation: not timed
            jax.block_until_ready(metrics)
            log.info("first step done in %.1fs (compilation included)", time.perf_counter() - tic)
            tic = time.perf_counter()
        else:
            timed_steps += 1
        if profiling and done >= config.profile.start_step + config.profile.num_steps:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            profiling = False
            log.info("profile of steps %d-%d written to %s", config.profile.start_step, done - 1, workdir / "profile")

        if done % config.log_every == 0 or done == total:
            _check_finite(*pending, last_saved)
            timed_seconds += time.perf_counter() - tic
            fetched = jax.device_get(interval)
            values = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
            values.update(_skipped(batch))
            step_time = timed_seconds / timed_steps if timed_steps else None
            utilisation = None
            if step_time:
                values.update(
                    step_time=step_time,
                    images_per_s=config.batch_size / step_time,
                    images_per_s_per_device=config.batch_size / step_time / num_devices,
                )
                utilisation = perf.mfu(flops, step_time, num_devices, peak)
                if utilisation is not None:
                    values["mfu"] = utilisation
            writer.write(done, values)
            speed = (
                f"{step_time:.3f}s/step  {values['images_per_s']:.1f} img/s ({values['images_per_s_per_device']:.1f}"
                f"/device){f'  MFU {utilisation:.1%}' if utilisation is not None else ''}"
                f"  ETA {perf.format_duration(step_time * (total - done))}"
                if step_time
                else "(timing from the next interval)"
            )
            log.info(
                "step %d/%d  loss %.4f  lr %.3g  %s  skipped %d",
                done,
                total,
                values["loss"],
                values["learning_rate"],
                speed,
                values["skipped/total"],
            )
            interval, timed_steps, timed_seconds = [], 0, 0.0
            tic = time.perf_counter()

        paused = time.perf_counter()  # evaluation and the save's device-to-host copy are not step time
        evaluated = False
        if evaluators and ((config.eval_every and done % config.eval_every == 0) or done == total):
            _check_finite(*pending, last_saved)
            eval_results = _evaluate(evaluators, state, writer, done)
            evaluated = True
        stopping = stop.agreed()
        if done % config.checkpoint_every == 0 or done == total or stopping:
            _check_finite(*pending, last_saved)
            save(done, eval_results if evaluated and config.checkpoint_best.metric else None)
        tic += time.perf_counter() - paused
        if stopping:
            checkpointing.finish_saves(manager)
            log.info("stopped by %s after step %d; checkpoint saved, relaunch to resume", stop.signal_name, done)
            return dict(eval_results, step=done, stopped=True)

    if profiling:
        jax.profiler.stop_trace()
    if start >= total:
        log.info("the checkpoint in %s is already at total_steps=%d", workdir, total)
        if evaluators:
            eval_results = _evaluate(evaluators, state, writer, done)
    checkpointing.finish_saves(manager)  # a failed save is an error naming its step
    return dict(eval_results, step=done)


def enable_compilation_cache() -> None:
    """Persistent XLA cache (default ~/.cache/align_jax/xla; ALIGN_JAX_COMPILE_CACHE overrides, ''
    disables): a relaunch after preemption skips recompiling the step."""
    path = os.environ.get("ALIGN_JAX_COMPILE_CACHE", os.path.expanduser("~/.cache/align_jax/xla"))
    if path and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv: list[str]) -> None:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax reports every save at INFO
    try:
        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    except distributed.DistributedFlagsError as e:
        log.error("%s", e)
        sys.exit(1)
    if jax.process_index() > 0:  # one log for the run: process 0's (errors and warnings from all)
        log.setLevel(logging.WARNING)
    enable_compilation_cache()
    config = FLAGS.config
    try:
        result = train_and_evaluate(config, FLAGS.workdir)
    except (config_lib.ConfigError, NonFiniteError, checkpointing.CheckpointError) as e:
        log.error("%s", e)
        sys.exit(1)
    if jax.process_index() == 0:
        print(json.dumps(result, sort_keys=True))


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "training config file (configs/NAME.py)", lock_config=True)
    flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and config.json (resumed if it has them)")
    flags.DEFINE_string("coordinator_address", None, "multi-process runs: HOST:PORT of process 0's coordinator")
    flags.DEFINE_integer("num_processes", None, "multi-process runs: the number of processes")
    flags.DEFINE_integer("process_id", None, "multi-process runs: this process's index, 0 .. num_processes - 1")
    flags.mark_flags_as_required(["config", "workdir"])
    return flags.FLAGS


FLAGS = None


def run() -> None:
    """Console script `align-train`."""
    global FLAGS
    from absl import app

    FLAGS = _define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
