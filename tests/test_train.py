"""The training program end to end on demo data: resume after SIGKILL and SIGTERM, restore onto
other meshes, 1 vs 8 devices, config errors, NaN stops, logs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow as tf

from align_jax import checkpointing, evaluate, train
from align_jax import config as config_lib
from align_jax.input import demo_data
from align_jax.input.readers import encode_example, write_tfrecords
from align_jax.metric_writer import read_metrics
from align_jax.models import build_model, init_variables
from align_jax.optim import learning_rate_schedule, make_optimizer
from align_jax.sharding import make_mesh
from align_jax.train_step import abstract_train_state
from tests import background, train_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(REPO, "tests", "train_config.py")


_DEMO_DIR: dict[str, str] = {}
_DEMO_DIR_LOCK = threading.Lock()


def _demo_dir(tmp_path_factory) -> str:
    """The demo data of every run of this module, written once by whichever needs it first (the
    background jobs or the in-process tests)."""
    with _DEMO_DIR_LOCK:
        if "path" not in _DEMO_DIR:
            path = str(tmp_path_factory.mktemp("demo"))
            demo_data.write(path, num_train=192, num_eval=24, num_shards=4, image_size=64)
            # A fifth shard of undecodable images: training skips and counts them.
            texts = dict(txt="a red circle photo", vecap="a small red circle on the left, on a white background")
            bad = [
                encode_example(data, texts) for data in (b"", b"\xff\xd8\xff\xe0 truncated", b"not an image", b"GIF89a")
            ]
            write_tfrecords(bad, path, 1, "train-bad")
            _DEMO_DIR["path"] = path
        return _DEMO_DIR["path"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> str:
    return _demo_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(demo_dir, tmp_path_factory):
    """An uninterrupted 6-step run on 8 devices (in this process) with a final evaluation."""
    workdir = tmp_path_factory.mktemp("reference")
    config = train_config.get_config(demo_dir)
    config.profile.start_step, config.profile.num_steps = 2, 1  # tracing does not change the numbers
    config.device_peak_flops = 1e11  # a CPU has no known peak; with one, the log reports MFU
    result = train.train_and_evaluate(config, str(workdir))
    return dict(workdir=workdir, result=result)


def _model_variables(workdir, step=None):
    config = checkpointing.load_config(workdir)
    model = build_model(config.model)
    shapes = jax.eval_shape(lambda: init_variables(model, config.model, jax.random.key(0)))
    return checkpointing.restore_model(workdir, checkpointing.abstract_on_device(shapes), step)


def _assert_bitwise_equal(a, b):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def _command(demo_dir, workdir, *overrides):
    return [
        sys.executable,
        "-m",
        "align_jax.train",
        f"--config={CONFIG_FILE}:{demo_dir}",
        f"--workdir={workdir}",
        *overrides,
    ]


def _env(device_count=8):
    return background.env(device_count)


def _run(command, env=None, timeout=600):
    proc = background.run(command, env=env or _env(), timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_run_writes_checkpoints_config_vocab_and_evaluates(reference):
    workdir, result = reference["workdir"], reference["result"]
    assert result["step"] == 6
    assert 0.0 <= result["retrieval/i2t_r1"] <= 1.0 and result["retrieval/num_images"] == 24
    assert 0.0 <= result["zeroshot/top1"] <= 1.0 and result["zeroshot/num_images"] == 24
    with checkpointing.checkpoint_manager(workdir, read_only=True) as manager:
        assert manager.all_steps() == [3, 6]
    saved = checkpointing.load_config(workdir)
    assert saved.data.vocab == "vocab.txt" and (workdir / "vocab.txt").exists()
    # The text tower's vocabulary follows the vocab file.
    assert saved.model.text.vocab_size == len((workdir / "vocab.txt").read_text().splitlines())


def test_profile_trace_is_written(reference):
    assert list((reference["workdir"] / "profile").rglob("*.xplane.pb"))


def test_jsonl_and_tensorboard_hold_the_training_scalars(reference):
    records = read_metrics(reference["workdir"])
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5, 6]
    expected = {"loss", "learning_rate", "step_time", "images_per_s", "images_per_s_per_device", "skipped/total"}
    assert expected <= set(train_records[-1])
    assert all(np.isfinite(r["loss"]) for r in train_records)
    assert all(0 < r["mfu"] < 1 for r in train_records[1:])  # from step 2: the first includes compilation
    # The input filters' skip counts reach the training metrics (the bad shard's images).
    assert train_records[-1]["skipped/undecodable_image"] > 0
    assert train_records[-1]["skipped/total"] == train_records[-1]["skipped/undecodable_image"]
    assert any("retrieval/t2i_r5" in r for r in records)

    tags = set()
    for path in tf.io.gfile.glob(str(reference["workdir"] / "tensorboard" / "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags |= {v.tag for v in event.summary.value}
    assert expected | {"retrieval/i2t_r1"} <= tags


# --- the subprocess runs, in the background lane (tests/background.py) from the session's start ---


def _sigkilled_and_resumed(tmp_path_factory) -> Path:
    demo_dir = _demo_dir(tmp_path_factory)
    workdir = tmp_path_factory.mktemp("sigkill") / "killed"
    proc = background.popen(
        _command(demo_dir, workdir), env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.time() + 600
        while not (workdir / "checkpoints" / "3").exists():  # orbax renames a step folder once complete
            assert proc.poll() is None, proc.stderr.read()[-4000:]
            assert time.time() < deadline, "no checkpoint within 600 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    with checkpointing.checkpoint_manager(workdir, read_only=True) as manager:
        assert 6 not in manager.all_steps(), "the run finished before the kill; the test proved nothing"

    _run(_command(demo_dir, workdir))
    return workdir


def _sigtermed_and_relaunched(tmp_path_factory) -> dict:
    demo_dir = _demo_dir(tmp_path_factory)
    workdir = tmp_path_factory.mktemp("sigterm") / "terminated"
    proc = background.popen(
        _command(demo_dir, workdir, "--config.checkpoint_every=100"),
        env=_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 600
    metrics = workdir / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None, proc.stderr.read()[-4000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-4000:]
    with checkpointing.checkpoint_manager(workdir, read_only=True) as manager:
        (saved,) = manager.all_steps()  # checkpoint_every=100: only the SIGTERM save
    assert 1 <= saved < 6, "SIGTERM arrived after the run finished; the test proved nothing"
    assert "SIGTERM received" in stderr

    proc = _run(_command(demo_dir, workdir, "--config.checkpoint_every=100"))
    return dict(workdir=workdir, saved=saved, relaunch_stderr=proc.stderr)


def _one_device_run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("one_device") / "one_device"
    _run(_command(_demo_dir(tmp_path_factory), workdir), env=_env(device_count=1))
    return workdir


def _two_process_run_resumed_in_one(tmp_path_factory) -> dict:
    """jax.distributed on localhost: 2 processes x 4 CPU devices (gloo collectives) train the same
    mesh as the 1-process 8-device reference, each process reading its own reader (one of the
    config's two) of the data; then one process resumes their step-3 checkpoint."""
    demo_dir = _demo_dir(tmp_path_factory)
    root = tmp_path_factory.mktemp("two_processes")
    workdir = root / "two_processes"
    port = _free_port()
    procs = [
        background.popen(
            _command(
                demo_dir,
                workdir,
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            env=_env(device_count=4),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=600))
    finally:
        for proc in procs:
            proc.kill()
    for proc, (_, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stderr[-4000:]

    # The 2-process checkpoint of step 3 (model, optimizer, both readers' positions) restores in
    # one process, which then finishes the run.
    resumed = root / "resumed_in_one"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")
    proc = _run(_command(demo_dir, resumed))
    return dict(workdir=workdir, outputs=outputs, resumed=resumed, resumed_stderr=proc.stderr)


BACKGROUND_JOBS = {
    "one_device_run": _one_device_run,
    "two_process_run": _two_process_run_resumed_in_one,
    "sigkill_run": _sigkilled_and_resumed,
    "sigterm_run": _sigtermed_and_relaunched,
}


one_device_run = background.result_fixture("one_device_run")
two_process_run = background.result_fixture("two_process_run")
sigkill_run = background.result_fixture("sigkill_run")
sigterm_run = background.result_fixture("sigterm_run")


def test_sigkill_then_resume_gives_bitwise_equal_parameters(sigkill_run, reference):
    workdir = sigkill_run
    _assert_bitwise_equal(_model_variables(workdir), _model_variables(reference["workdir"]))
    # The metrics file was cut back to the resumed step, so it holds each step once.
    steps = [r["step"] for r in read_metrics(workdir) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_sigterm_saves_exits_zero_and_the_relaunch_continues(sigterm_run, reference):
    run = sigterm_run
    assert f"resumed from the checkpoint of step {run['saved']}" in run["relaunch_stderr"]
    _assert_bitwise_equal(_model_variables(run["workdir"]), _model_variables(reference["workdir"]))


def test_one_device_run_matches_eight_devices(one_device_run, reference):
    workdir = one_device_run
    assert checkpointing.load_config(workdir).mesh == checkpointing.load_config(reference["workdir"]).mesh
    _assert_equal_up_to_summation_order(
        _model_variables(workdir), _model_variables(reference["workdir"]), reference["workdir"]
    )


def _assert_equal_up_to_summation_order(a, b, workdir):
    """For runs whose cross-device sums run in another order (1 vs 8 devices, 2 processes vs 1):
    every leaf agrees to rtol 1e-4, atol 1e-5 (they agree to ~1e-7 in practice), except biases
    whose gradient is zero in exact arithmetic (attention key biases; the biases of a BatchNorm
    whose output reaches another BatchNorm through a 1x1 convolution). Those hold float32
    rounding noise that Adam turns into steps of ~1e-2 learning rates, different in each run, so
    for them both runs must only stay within the noise budget: a tenth of the sum of the
    run's learning rates, the distance Adam moves a leaf with a real gradient (~lr a step)."""
    config = checkpointing.load_config(workdir)
    schedule = learning_rate_schedule(config.optimizer, config.total_steps)
    noise_budget = 0.1 * sum(float(schedule(step)) for step in range(config.total_steps))
    noise_leaves = []
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        x, y, name = np.asarray(x), np.asarray(y), jax.tree_util.keystr(path)
        is_bias = path[0].key == "params" and path[-1].key == "bias"
        if is_bias and max(np.abs(x).max(), np.abs(y).max()) <= noise_budget:
            noise_leaves.append(name)
            continue
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=name)
    # The tiny preset's zero-gradient BatchNorm biases; not every bias (that would excuse a run
    # that did not learn).
    num_biases = sum(path[-1].key == "bias" for path, _ in jax.tree_util.tree_leaves_with_path(a["params"]))
    assert len(noise_leaves) < num_biases / 4, noise_leaves


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_and_their_checkpoint_resumes_in_one(two_process_run, reference):
    """(see _two_process_run_resumed_in_one)"""
    run = two_process_run
    workdir, resumed = run["workdir"], run["resumed"]
    (out0, err0), (out1, err1) = run["outputs"]
    # One log and one result line for the run: process 0's.
    assert "step 6/6" in err0 and "step 6/6" not in err1
    result = json.loads(out0.strip().splitlines()[-1])
    assert not [line for line in out1.splitlines() if line.startswith("{")]  # (gloo prints its own lines)
    # Same parameters as one process on 8 devices, up to the order of the cross-process sums.
    one = _model_variables(reference["workdir"])
    _assert_equal_up_to_summation_order(_model_variables(workdir), one, reference["workdir"])
    # The evaluators ran on both processes' shares of the held-out set.
    for key in ("retrieval/num_images", "zeroshot/num_images", "retrieval/i2t_r1", "zeroshot/top1"):
        assert result[key] == pytest.approx(reference["result"][key]), key
    losses = [r["loss"] for r in read_metrics(workdir) if "loss" in r]
    expected = [r["loss"] for r in read_metrics(reference["workdir"]) if "loss" in r]
    np.testing.assert_allclose(losses, expected, rtol=1e-5)  # the losses agree closer than the parameters

    # The 2-process checkpoint of step 3 (model, optimizer, both readers' positions) restored in
    # one process, which then finished the run as the reference did.
    assert "resumed from the checkpoint of step 3" in run["resumed_stderr"]
    _assert_equal_up_to_summation_order(_model_variables(resumed), one, reference["workdir"])


def test_distributed_flags_go_together(demo_dir, tmp_path):
    proc = subprocess.run(
        _command(demo_dir, tmp_path / "w", "--num_processes=2"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 1
    assert "--coordinator_address, --num_processes and --process_id must be given together" in proc.stderr


@pytest.mark.parametrize("mesh", [[("data", 1), ("fsdp", 1)], [("data", 4), ("fsdp", 1)], [("data", 2), ("fsdp", 2)]])
def test_checkpoint_from_eight_devices_restores_on_other_meshes(demo_dir, reference, mesh):
    config = train.prepare_config(train_config.get_config(demo_dir), reference["workdir"])
    model = build_model(config.model)
    tx, _ = make_optimizer(config.optimizer, config.total_steps)

    def restore(devices, axes):
        abstract, shardings = abstract_train_state(model, config.model, tx, make_mesh(axes, devices))
        abstract_model, abstract_train = train.abstract_checkpoint_items(abstract, shardings)
        with checkpointing.training_manager(reference["workdir"], keep=3) as manager:
            return checkpointing.restore_training(manager, 6, abstract_model, abstract_train)

    devices = jax.devices()[: np.prod([size for _, size in mesh])]
    expected = restore(jax.devices(), [("data", -1), ("fsdp", 1)])
    actual = restore(devices, mesh)
    for leaf in jax.tree.leaves(actual):
        assert set(leaf.sharding.device_set) <= set(devices)
    _assert_bitwise_equal(actual, expected)


@pytest.mark.parametrize(
    "override, field",
    [
        (dict(model=dict(image=dict(type="resnet"))), "config.model"),
        (dict(mesh=(("data", 3), ("fsdp", 1))), "config.mesh"),
        (dict(batch_size=12), "config.batch_size"),
        (dict(data=dict(train="tfrecord:/nonexistent/shard-*.tfrecord")), "config.data.train"),
        (dict(data=dict(train="")), "config.data.train"),
        (dict(data=dict(vocab="/nonexistent/vocab.txt")), "config.data.vocab"),
        (dict(total_steps=0), "config.total_steps"),
        (dict(optimizer=dict(warmup_steps=100)), "config.optimizer.warmup_steps"),
        (dict(data=dict(num_readers=3)), "config.data.num_readers"),
    ],
)
def test_wrong_config_fails_before_training_naming_the_field(demo_dir, tmp_path, override, field):
    config = train_config.get_config(demo_dir)
    config.update_from_flattened_dict(_flatten(override))
    with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.")):
        train.train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_a_config_error_on_the_command_line_exits_1_with_the_field(demo_dir, tmp_path):
    proc = subprocess.run(
        _command(demo_dir, tmp_path, "--config.batch_size=12"), env=_env(), capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 1
    assert "config.batch_size: 12 is not divisible by the 8 devices" in proc.stderr


def test_non_finite_values_stop_the_run_and_keep_the_last_good_checkpoint(demo_dir, reference, tmp_path):
    workdir = tmp_path / "diverged"
    shutil.copytree(reference["workdir"], workdir)
    before = _model_variables(workdir, 6)
    config = train_config.get_config(demo_dir)
    config.total_steps = 9
    config.optimizer.learning_rate = float("inf")
    with pytest.raises(train.NonFiniteError, match=r"step 7: the (loss|gradient norm|updated parameters' norm) is"):
        train.train_and_evaluate(config, str(workdir))
    with checkpointing.checkpoint_manager(workdir, read_only=True) as manager:
        assert manager.latest_step() == 6
    _assert_bitwise_equal(_model_variables(workdir, 6), before)


def test_keep_best_keeps_the_best_checkpoint_besides_the_latest(tmp_path):
    with checkpointing.training_manager(tmp_path, keep=1, best_metric="retrieval/i2t_r1") as manager:
        for step, score in [(1, 0.9), (2, 0.1), (3, 0.2), (4, None)]:
            metrics = None if score is None else {"retrieval/i2t_r1": score}
            checkpointing.save_training(manager, step, {"w": np.full(2, step)}, {"step": np.int32(step)}, None, metrics)
        manager.wait_until_finished()
        assert manager.all_steps() == [1, 4]


@pytest.mark.parametrize("name", ["align_base", "align_l2", "small", "tiny", "demo"])
def test_shipped_configs_load_and_their_models_build(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    assert config.batch_size % 8 == 0 and config.total_steps > config.optimizer.warmup_steps
    model = build_model(config.model)
    shapes = jax.eval_shape(lambda: init_variables(model, config.model, jax.random.key(0)))
    assert {"image_tower", "text_tower", "temperature"} <= set(shapes["params"])


def test_align_base_config_is_the_paper_recipe():
    config = config_lib.base_config()
    assert (config.batch_size, config.total_steps, config.model.image_size, config.model.embed_dim) == (
        16384,
        1_200_000,
        289,
        640,
    )
    assert config.optimizer.name == "lamb" and config.optimizer.learning_rate == 1e-3
    assert config.optimizer.warmup_steps == 10_000 and config.optimizer.weight_decay == 1e-5
    assert config.loss.label_smoothing == 0.1 and config.model.temperature_init == 1.0
    assert config.model.max_text_length == 64


def test_evaluate_reproduces_the_training_evaluation(reference):
    results = evaluate.evaluate(str(reference["workdir"]))
    assert results["step"] == 6
    for key in ("retrieval/i2t_r1", "retrieval/t2i_r5", "zeroshot/top1", "zeroshot/mean_per_class_recall"):
        assert results[key] == reference["result"][key]
    saved = json.loads((reference["workdir"] / "eval_6.json").read_text())
    assert saved == results


def test_evaluate_command_overrides_the_data_and_writes_a_grid(demo_dir, reference, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(reference["workdir"], workdir)
    train_shards = f"tfrecord:{os.path.join(demo_dir, 'train-0*.tfrecord')}"
    proc = _run(
        [
            sys.executable,
            "-m",
            "align_jax.evaluate",
            f"--workdir={workdir}",
            f"--config.data.eval={train_shards}",
            "--config.evals.retrieval.max_examples=40",
            "--grid_queries=a red circle|a blue square",
            "--grid_k=3",
        ]
    )
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["retrieval/num_images"] == 40  # from the training shards, not the 24 held-out
    grid = tf.io.decode_png((workdir / "retrieval_grid_6.png").read_bytes()).numpy()
    assert grid.shape == (2 * (64 + 4), 3 * (64 + 4), 3)
    ranking = json.loads((workdir / "retrieval_grid_6.json").read_text())
    assert [r["query"] for r in ranking] == ["a red circle", "a blue square"]
    assert all(r["scores"] == sorted(r["scores"], reverse=True) for r in ranking)


def test_evaluate_without_a_checkpoint_is_a_clear_error(tmp_path, reference):
    shutil.copy(reference["workdir"] / "config.json", tmp_path / "config.json")
    shutil.copy(reference["workdir"] / "vocab.txt", tmp_path / "vocab.txt")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        evaluate.evaluate(str(tmp_path))
