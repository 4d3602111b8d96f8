"""The reliability suite: what align_jax survives, measured (RELIABILITY.md states it).

- Faults: the training program (`python -m align_jax.train`, real orbax async checkpoints, real
  tf.data) is SIGKILLed at points drawn from a seeded RNG, one of them while an asynchronous
  checkpoint write is in flight, and relaunched each time; before the last launch a bit of its
  newest checkpoint is flipped. It must end with the parameters of an uninterrupted run, bit for
  bit. A full disk while saving must fail naming the step and leave earlier checkpoints intact.
- Bad input: arbitrary strings into the tokenizer, random bytes as images, malformed configs
  (hypothesis, derandomized so every run tries the same cases).
- Determinism: the same seed gives the same metrics file; another seed other losses.
- Safe loading: nothing in the package unpickles or evaluates data.

The runs use "the demo config": the tests' tiny training config (tests/train_config.py) on one
CPU device, as `make demo` runs on a laptop, on demo data with a shard of undecodable images.
The runs go on in two background lanes, kills and relaunches in one, the runs that are not
killed in the other, while the in-process tests run: a small CI machine's two cores stay busy.

`ALIGN_JAX_RELIABILITY_REPORT=PATH` writes the figures the suite measured as JSON to PATH.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import logging
import os
import random
import re
import resource
import signal
import string
import subprocess
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from align_jax import checkpointing, train
from align_jax import config as config_lib
from align_jax.input import demo_data, pipeline
from align_jax.input.readers import encode_example, write_tfrecords
from align_jax.input.text_ops import Tokenizer
from align_jax.metric_writer import read_metrics
from align_jax.models.dual_encoder import IMAGE_TOWERS, TEXT_TOWERS
from tests import fixtures, train_config
from tests.test_train import REPO, _assert_bitwise_equal, _command, _env, _model_variables

REPORT_ENV = "ALIGN_JAX_RELIABILITY_REPORT"
TOTAL_STEPS = train_config.get_config().total_steps
# Every step is checkpointed, so every step has an asynchronous write to interrupt.
OVERRIDES = ("--config.checkpoint_every=1",)
DEVICES = 1
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a step folder still being written
KILL_SEED = 9
# Kill i lands at a step drawn from KILL_WINDOWS[i]: increasing, so every launch gets past the
# step its predecessor resumed from, and the last one leaves at least two complete checkpoints
# (one to damage, one to fall back to).
KILL_WINDOWS = ((1, 2), (3, 4), (4, TOTAL_STEPS))
KINDS = ("after a step", "after a step", "during an async checkpoint write")
# Wall-clock fields of the metrics; everything else in metrics.jsonl is a function of the seed.
TIMING_FIELDS = {"step_time", "images_per_s", "images_per_s_per_device", "mfu"}
FILE_SIZE_LIMIT = 64 * 1024  # bytes: the "disk" the out-of-disk run gets after two checkpoints
RUN_TIMEOUT_S = 1200  # one launch, on a loaded 2-core machine
# The same cases on every run (derandomized, no example database), no per-example time limit.
PROPERTY_TESTS = settings(derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])
UNSAFE_IMPORTS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib", "torch"}


# --- shared runs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report():
    """Figures the tests measure, written as JSON to $ALIGN_JAX_RELIABILITY_REPORT at the end."""
    figures: dict = {}
    yield figures
    path = os.environ.get(REPORT_ENV)
    if path:
        Path(path).write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, report) -> str:
    """Demo data plus a shard of undecodable images, which training skips and counts."""
    path = str(tmp_path_factory.mktemp("reliability_data"))
    demo_data.write(path, num_train=192, num_eval=24, num_shards=4, image_size=64)
    rng = np.random.default_rng(0)
    jpeg = _encode(np.full((64, 64, 3), 200, np.uint8), "JPEG")
    bad_images = [
        b"",
        rng.bytes(700),
        jpeg[: len(jpeg) // 2],
        b"\xff\xd8\xff\xe0\x00\x10JFIF",
        b"\x89PNG\r\n\x1a\n" + rng.bytes(100),
        b"GIF89a",
        b"not an image",
        rng.bytes(5000),
    ]
    texts = dict(txt="a red circle photo", vecap="a small red circle on the left, on a white background")
    write_tfrecords([encode_example(image, texts) for image in bad_images], path, 1, "train-bad")
    report["training_data"] = dict(records=192 + len(bad_images), bad_images=len(bad_images))
    return path


class Launch:
    """One training process; a thread collects its stderr, so the test can watch its progress."""

    started_so_far: list[Launch] = []  # to stop any still running when the module ends
    closing = threading.Event()  # set when the module ends: no more launches

    def __init__(self, data_dir: str, workdir: Path, *overrides: str, shell_prefix: str = ""):
        if Launch.closing.is_set():
            raise RuntimeError("the test module has finished; no more training runs")
        command = _command(data_dir, workdir, *OVERRIDES, *overrides)
        if shell_prefix:  # run through sh, which then execs the training in the same process
            command = ["sh", "-c", f'{shell_prefix}; exec "$@"', "sh", *command]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            command, env=_env(DEVICES), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        Launch.started_so_far.append(self)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def logged(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def wait_for(self, condition, what: str, timeout: float = RUN_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"the run ended before {what}:\n{self.stderr[-4000:]}"
            assert time.monotonic() < deadline, f"no {what} within {timeout} s"
            time.sleep(0.002)

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
        returncode = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=60)
        return returncode

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.wait(timeout=120) == -signal.SIGKILL

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.wait(timeout=120)


def _complete_steps(workdir: Path) -> list[int]:
    """Checkpoints on disk under their final name (orbax renames a step folder once complete)."""
    directory = workdir / checkpointing.CHECKPOINT_DIR
    return sorted(int(p.name) for p in directory.glob("*") if p.name.isdigit()) if directory.exists() else []


def _tmp_dirs(workdir: Path) -> dict[str, tuple[int, int]]:
    """Step folders being written (or left half-written by a kill): name -> (inode, ctime)."""
    directory = workdir / checkpointing.CHECKPOINT_DIR
    if not directory.exists():
        return {}
    found = {}
    for entry in os.scandir(directory):
        if TMP_SUFFIX in entry.name:
            try:
                stat = entry.stat()
            except FileNotFoundError:  # renamed into place meanwhile
                continue
            found[entry.name] = (stat.st_ino, stat.st_ctime_ns)
    return found


def _write_started(workdir: Path, step: int, stale: dict[str, tuple[int, int]]) -> bool:
    """Whether this launch has begun writing checkpoint `step` (a folder left by an earlier kill
    under the same name does not count)."""
    return any(
        name.startswith(f"{step}{TMP_SUFFIX}") and stale.get(name) != identity
        for name, identity in _tmp_dirs(workdir).items()
    )


def _file_hashes(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _complete_run(data_dir: str, workdir: Path, *overrides: str, saved_once: threading.Event | None = None) -> dict:
    """A run to the end; `saved_once` is set when its first checkpoint is complete (or it failed)."""
    launch = Launch(data_dir, workdir, *overrides)
    try:
        if saved_once is not None:
            launch.wait_for(lambda: 1 in _complete_steps(workdir), "a first checkpoint")
            saved_once.set()
        returncode = launch.wait()
    finally:
        if saved_once is not None:
            saved_once.set()
        launch.stop()
    assert returncode == 0, launch.stderr[-4000:]
    return dict(workdir=workdir, stderr=launch.stderr)


def _other_seed_run(data_dir: str, workdir: Path) -> dict:
    """A run with another seed which, where the OS allows (Linux), runs out of disk: its files may
    not grow past FILE_SIZE_LIMIT from the moment its second checkpoint is complete (one run for
    two tests keeps the suite within CI's time). RLIMIT_FSIZE, set from outside with prlimit,
    makes the kernel refuse a write past the limit as it refuses one on a full disk (EFBIG, "File
    too large", instead of ENOSPC); `trap '' XFSZ` keeps the signal that comes with it from
    killing the run first, so the failing write reaches the program, which must report it."""
    disk_full = hasattr(resource, "prlimit")
    launch = Launch(data_dir, workdir, "--config.seed=1", shell_prefix="trap '' XFSZ")
    complete, hashes = [], {}
    try:
        if disk_full:
            launch.wait_for(lambda: 2 in _complete_steps(workdir), "a second checkpoint")
            resource.prlimit(launch.proc.pid, resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, resource.RLIM_INFINITY))
            complete = _complete_steps(workdir)
            hashes = {step: _file_hashes(workdir / checkpointing.CHECKPOINT_DIR / str(step)) for step in complete}
        returncode = launch.wait()
    finally:
        launch.stop()
    return dict(
        workdir=workdir,
        disk_full=disk_full,
        returncode=returncode,
        stderr=launch.stderr,
        complete=complete,
        hashes=hashes,
    )


@pytest.fixture(scope="module", autouse=True)
def _start_background_runs_first(request):
    """With the module's first test, when any selected test needs them: the in-process tests then
    run beside them."""
    selected = [item for item in request.session.items if item.module is request.module]
    if any("background" in item.fixturenames for item in selected):
        request.getfixturevalue("background")


@pytest.fixture(scope="module")
def background(data_dir, tmp_path_factory):
    """Every training run of the module, started with its first test in two lanes (threads, each
    running one process at a time) beside the in-process tests: the kill-and-relaunch sequence;
    and the reference, the same seed again, and another seed that runs out of disk."""
    root = tmp_path_factory.mktemp("runs")
    kill_lane, run_lane = ThreadPoolExecutor(max_workers=1), ThreadPoolExecutor(max_workers=1)
    compiled = threading.Event()  # the reference run has saved a checkpoint: its programs are cached
    runs: dict[str, Future] = {
        "faults": kill_lane.submit(_fault_injected_run, data_dir, root / "faults", compiled),
        "reference": run_lane.submit(_complete_run, data_dir, root / "reference", saved_once=compiled),
        "same_seed": run_lane.submit(_complete_run, data_dir, root / "same_seed"),
        "other_seed": run_lane.submit(_other_seed_run, data_dir, root / "other_seed"),
    }
    yield runs
    Launch.closing.set()
    for lane in (kill_lane, run_lane):
        lane.shutdown(wait=False, cancel_futures=True)
    for launch in Launch.started_so_far:  # runs still going when a test failed early
        launch.stop()
    for lane in (kill_lane, run_lane):
        lane.shutdown(wait=True)


def _result(background: dict[str, Future], name: str) -> dict:
    return background[name].result(timeout=4 * RUN_TIMEOUT_S)


def _flip_one_bit(workdir: Path, step: int) -> Path:
    """Flips one bit in the middle of the largest file of the checkpoint's model item (orbax's
    OCDBT data): silent corruption, which orbax itself does not notice."""
    path = _largest_model_file(workdir, step)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    return path


def _launch_and_kill(data_dir: str, workdir: Path, kind: str, window: tuple[int, int], rng: random.Random) -> dict:
    """Launches the run (it resumes from the newest complete checkpoint) and SIGKILLs it at a step
    drawn from `window`: after that step is logged, or while its checkpoint is being written."""
    resumed_from = max(_complete_steps(workdir), default=0)
    stale = _tmp_dirs(workdir)
    low = max(window[0], resumed_from + 1)
    launch = Launch(data_dir, workdir)
    try:
        if kind == "after a step":
            step = rng.randint(low, min(window[1], TOTAL_STEPS - 1))
            launch.wait_for(lambda: launch.logged(f"step {step}/{TOTAL_STEPS} "), f"step {step}")
            time.sleep(rng.uniform(0.0, 0.5))  # anywhere in the next step, a save or the log
        else:
            step = rng.randint(low, window[1])
            launch.wait_for(lambda: _write_started(workdir, step, stale), f"the write of checkpoint {step}")
            time.sleep(rng.uniform(0.0, 0.02))  # well within the write, which takes 0.3 s or more
        launch.kill()
    finally:
        launch.stop()
    return dict(
        kind=kind,
        step=step,
        resumed_from=resumed_from,
        resumed_as_logged=not resumed_from or launch.logged(f"resumed from the checkpoint of step {resumed_from} "),
        seconds_after_launch=round(time.monotonic() - launch.started, 1),
        complete_after=_complete_steps(workdir),
        writes_interrupted=sorted(name for name, identity in _tmp_dirs(workdir).items() if stale.get(name) != identity),
    )


def _fault_injected_run(data_dir: str, workdir: Path, compiled: threading.Event) -> dict:
    """SIGKILLs the demo run at len(KINDS) points drawn from a seeded RNG, relaunching after each;
    then flips a bit of the newest checkpoint and relaunches to the end. Starts once `compiled`
    is set: with an empty compilation cache, the two lanes would compile the same programs."""
    compiled.wait(timeout=RUN_TIMEOUT_S)
    rng = random.Random(KILL_SEED)
    kinds = list(KINDS)
    rng.shuffle(kinds)
    kills = [
        _launch_and_kill(data_dir, workdir, kind, window, rng) for window, kind in zip(KILL_WINDOWS, kinds, strict=True)
    ]
    damaged = max(_complete_steps(workdir))
    flipped = _flip_one_bit(workdir, damaged)
    final = Launch(data_dir, workdir)
    try:
        final.wait_for(lambda: final.logged("first step done"), "a first step")
        relaunch_s = time.monotonic() - final.started
        returncode = final.wait()
    finally:
        final.stop()
    assert returncode == 0, final.stderr[-4000:]
    return dict(
        workdir=workdir, kills=kills, damaged=damaged, flipped=flipped, relaunch_s=relaunch_s, stderr=final.stderr
    )


@pytest.fixture(scope="module")
def fault_run(background, report) -> dict:
    run = _result(background, "faults")
    report["faults"] = dict(
        kill_seed=KILL_SEED,
        kills=run["kills"],
        launches=len(run["kills"]) + 1,
        seconds_from_the_last_launch_to_its_first_step=round(run["relaunch_s"], 1),
        corrupted_checkpoint=dict(step=run["damaged"], file=str(run["flipped"].relative_to(run["workdir"]))),
    )
    return run


def _training_records(workdir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in read_metrics(workdir)]


# --- safe loading ----------------------------------------------------------------------------------


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def unsafe_loads(source: str, filename: str = "<source>") -> list[str]:
    """Places where `source` could run code hidden in data: pickle and its kin (also through
    torch.load, joblib, np.load(allow_pickle=True), pandas.read_pickle), eval/exec, YAML's
    object-building loaders, Keras models and TF SavedModels."""
    findings = []

    def found(node, what):
        findings.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UNSAFE_IMPORTS:
                    found(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_IMPORTS:
            found(node, f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            last = name.rsplit(".", 1)[-1]
            keywords = {k.arg: k.value for k in node.keywords}
            if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
                found(node, f"{name}()")
            elif "allow_pickle" in keywords and not (
                isinstance(keywords["allow_pickle"], ast.Constant) and keywords["allow_pickle"].value is False
            ):
                found(node, f"{name}(allow_pickle=...)")
            elif (
                name.endswith(("torch.load", "saved_model.load", "keras.models.load_model"))
                or last == "read_pickle"
                or name.startswith("yaml.")
                and last in ("unsafe_load", "unsafe_load_all", "full_load", "full_load_all")
            ):
                found(node, f"{name}()")
            elif name in ("yaml.load", "yaml.load_all") and not _dotted(keywords.get("Loader", ast.Name(""))).endswith(
                "SafeLoader"
            ):
                found(node, f"{name}() without a SafeLoader")
    return findings


def test_the_package_never_unpickles_or_evaluates_data(report):
    files = sorted(Path(REPO, "align_jax").rglob("*.py"))
    assert len(files) > 30
    findings = [f for path in files for f in unsafe_loads(path.read_text(), str(path.relative_to(REPO)))]
    assert findings == []
    # Hugging Face weights come in through safetensors (NumPy arrays, no code), nothing else.
    convert = ast.parse(Path(REPO, "align_jax", "tools", "convert_hf.py").read_text())
    modules = {n.module for n in ast.walk(convert) if isinstance(n, ast.ImportFrom)}
    assert "safetensors.numpy" in modules
    report["safe_loading"] = dict(files_scanned=len(files), unsafe_loads_found=0)


@pytest.mark.parametrize(
    "source",
    [
        "import pickle\npickle.loads(data)",
        "from cloudpickle import loads",
        "import torch",
        "state = torch.load(path)",
        "import joblib",
        "import numpy as np\nnp.load(path, allow_pickle=True)",
        "import pandas as pd\npd.read_pickle(path)",
        "config = eval(text)",
        "exec(code)",
        "import yaml\nyaml.load(text, Loader=yaml.Loader)",
        "import yaml\nyaml.unsafe_load(text)",
        "import yaml\nyaml.load(text)",
        "import tensorflow as tf\ntf.keras.models.load_model(path)",
        "import tensorflow as tf\ntf.saved_model.load(path)",
    ],
)
def test_the_safe_loading_check_catches_each_unsafe_load(source):
    assert len(unsafe_loads(source)) == 1, unsafe_loads(source)


def test_the_safe_loading_check_passes_safe_loads():
    source = """
import ast, re, yaml, numpy as np
from safetensors.numpy import load_file
model.eval()
np.load(path)
np.load(path, allow_pickle=False)
yaml.safe_load(text)
yaml.load(text, Loader=yaml.SafeLoader)
ast.literal_eval(text)
re.compile(pattern)
load_file(path)
"""
    assert unsafe_loads(source) == []


# --- checkpoint integrity, in process ---------------------------------------------------------------


def _numpy_checksum(array: np.ndarray) -> int:
    """`checkpointing._leaf_checksum` in plain NumPy: the bits times 2 * index + 1, summed mod 2^32."""
    bits = np.ascontiguousarray(array).view(np.uint32).reshape(-1).astype(np.uint64)
    weights = 2 * np.arange(bits.size, dtype=np.uint64) + 1
    return int(np.sum(bits * weights % 2**32) % 2**32)


def test_checksums_are_the_numpy_ones_on_any_mesh_and_see_one_flipped_bit():
    values = np.random.default_rng(0).normal(size=(16, 12)).astype(np.float32)
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
    sharded = jax.device_put(values, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", "data")))
    expected = _numpy_checksum(values)
    assert checkpointing.checksums({"w": sharded}) == {"['w']": expected}
    assert checkpointing.checksums({"w": jnp.asarray(values)}) == {"['w']": expected}
    for row, column, bit in ((0, 0, 0), (7, 3, 31), (15, 11, 16)):
        flipped = values.copy()
        flipped.view(np.uint32)[row, column] ^= 1 << bit
        assert checkpointing.checksums({"w": flipped})["['w']"] == _numpy_checksum(flipped) != expected


def _save_three(directory: Path) -> dict[int, dict]:
    """Checkpoints 1-3 of a small training state; returns each step's model variables."""
    saved = {}
    with checkpointing.training_manager(directory, keep=3) as manager:
        for step in (1, 2, 3):
            rng = np.random.default_rng(step)
            model = {"params": {"kernel": jnp.asarray(rng.normal(size=(64, 32)).astype(np.float32))}}
            checkpointing.save_training(manager, step, model, {"step": jnp.int32(step)})
            saved[step] = model
        checkpointing.finish_saves(manager)
    return saved


def _largest_model_file(workdir: Path, step: int) -> Path:
    files = [p for p in (workdir / checkpointing.CHECKPOINT_DIR / str(step) / "model").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def _truncate(workdir: Path, step: int) -> None:
    path = _largest_model_file(workdir, step)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _remove_manifest(workdir: Path, step: int) -> None:
    (workdir / checkpointing.CHECKPOINT_DIR / str(step) / "model" / "manifest.ocdbt").unlink()


def _remove_files(workdir: Path, step: int) -> None:
    for path in (workdir / checkpointing.CHECKPOINT_DIR / str(step)).rglob("*"):
        if path.is_file():
            path.unlink()


DAMAGE = {
    "one flipped bit": _flip_one_bit,
    "a data file cut in half": _truncate,
    "a missing OCDBT manifest": _remove_manifest,
    "a step folder without files": _remove_files,
}


def _abstract_items(model: dict) -> tuple[dict, dict]:
    return checkpointing.abstract_on_device(model), checkpointing.abstract_on_device({"step": jnp.int32(0)})


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_restore_skips_a_damaged_newest_checkpoint_with_a_warning(tmp_path, caplog, damage, report):
    saved = _save_three(tmp_path)
    DAMAGE[damage](tmp_path, 3)
    abstract_model, abstract_train = _abstract_items(saved[3])
    with caplog.at_level(logging.WARNING, logger="align_jax.checkpointing"):
        with checkpointing.training_manager(tmp_path, keep=3) as manager:
            step, (model, train_items) = checkpointing.restore_latest_training(manager, abstract_model, abstract_train)
            assert manager.all_steps() == [1, 2]
    assert step == 2 and int(train_items["step"]) == 2
    _assert_bitwise_equal(model, saved[2])
    assert "checkpoint step 3 in" in caplog.text and "cannot be restored" in caplog.text
    assert (tmp_path / checkpointing.CORRUPT_DIR / "3").is_dir()
    report.setdefault("checkpoint_damage_detected", []).append(damage)


def test_when_no_checkpoint_restores_the_newest_error_is_raised_and_nothing_moved(tmp_path):
    _save_three(tmp_path)
    for step in (1, 2, 3):
        _flip_one_bit(tmp_path, step)
    abstract_model, abstract_train = _abstract_items({"params": {"kernel": jnp.zeros((64, 32))}})
    with checkpointing.training_manager(tmp_path, keep=3) as manager:
        with pytest.raises(checkpointing.CorruptCheckpointError, match=r"checkpoint step 3: 1 array\(s\) of 'model'"):
            checkpointing.restore_latest_training(manager, abstract_model, abstract_train)
    assert _complete_steps(tmp_path) == [1, 2, 3] and not (tmp_path / checkpointing.CORRUPT_DIR).exists()


def test_inference_restore_refuses_a_corrupted_checkpoint(tmp_path):
    variables = {"params": {"w": jnp.arange(4096.0)}}
    checkpointing.save_model(tmp_path, 5, variables)
    _flip_one_bit(tmp_path, 5)
    with pytest.raises(checkpointing.CorruptCheckpointError, match=r"checkpoint step 5: .*\['params'\]\['w'\]"):
        checkpointing.restore_model(tmp_path, checkpointing.abstract_on_device(variables))


# --- bad input -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(vocab_path) -> Tokenizer:
    return Tokenizer(vocab_path, max_length=16)


CAPTIONS = st.one_of(
    st.text(max_size=300),  # any Unicode scalar value
    st.lists(st.sampled_from(fixtures.TEST_VOCAB), max_size=40).map(" ".join),  # real tokens, often truncated
    st.text(st.characters(categories=["Cc", "Cf", "Co", "Mn", "Zs", "Zl", "Zp"]), max_size=50),
    st.text(st.sampled_from("a\u0301 \t"), min_size=1000, max_size=4000),  # words of over 100 characters
)


@settings(PROPERTY_TESTS, max_examples=100)
@given(texts=st.lists(CAPTIONS, min_size=1, max_size=8))
@example(texts=["", " ", "[CLS] [SEP] [PAD]", "\x00\ufffd\u200b", "ﬁ" * 500])
def test_any_string_tokenizes_to_in_range_ids_of_bounded_length(tokenizer, texts, report):
    ids, mask = tokenizer(texts)
    length = tokenizer.max_length
    assert ids.shape == mask.shape == (len(texts), length) and ids.dtype == mask.dtype == np.int32
    assert ids.min() >= 0 and ids.max() < tokenizer.vocab_size
    for row, row_mask in zip(ids, mask, strict=True):
        n = int(row_mask.sum())
        assert 2 <= n <= length
        assert row_mask.tolist() == [1] * n + [0] * (length - n)
        assert row[0] == tokenizer.cls_id and row[n - 1] == tokenizer.sep_id
        assert set(row[n:].tolist()) <= {tokenizer.pad_id}
        assert not {tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id} & set(row[1 : n - 1].tolist())
    single_ids, _ = tokenizer(texts[:1])  # a string's ids do not depend on the rest of the batch
    np.testing.assert_array_equal(single_ids[0], ids[0])
    report["tokenizer_strings_tried"] = report.get("tokenizer_strings_tried", 0) + len(texts)


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt)
    return buffer.getvalue()


def _pil_decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        return True
    except Exception:  # PIL raises many kinds for bad data
        return False


MAGIC_NUMBERS = (
    b"\xff\xd8\xff",
    b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
    b"\x89PNG\r\n\x1a\n",
    b"GIF89a",
    b"GIF87a",
    b"BM",
)
RANDOM_IMAGES = st.one_of(
    st.binary(max_size=3000),
    st.tuples(st.sampled_from(MAGIC_NUMBERS), st.binary(max_size=3000)).map(b"".join),  # a real header, then noise
)
IMAGE_REASONS = ("undecodable_image", "image_too_large", "image_too_small", "bad_aspect_ratio")
IMAGE_SIZE = 24


@settings(PROPERTY_TESTS, max_examples=6)
@given(blobs=st.lists(RANDOM_IMAGES, min_size=8, max_size=40))
def test_random_bytes_as_images_are_skipped_and_counted_and_no_good_record_is_lost(
    vocab_path, tmp_path_factory, blobs, report
):
    assume(not any(_pil_decodes(b) for b in blobs))  # random bytes, not by chance an image
    colours = [(i * 37 % 256, i * 91 % 256, 255 - i * 53 % 256) for i in range(len(blobs) + 1)]
    good = [_encode(np.full((IMAGE_SIZE, IMAGE_SIZE, 3), c, np.uint8), "PNG") for c in colours]
    images = [image for pair in zip(good[:-1], blobs, strict=True) for image in pair] + good[-1:]  # bad between good
    directory = tmp_path_factory.mktemp("random_images")
    write_tfrecords([encode_example(image, {"txt": "a photo of a cat"}) for image in images], str(directory), 1)
    config = pipeline.default_config()
    config.vocab, config.filters.min_image_side = vocab_path, 16
    dataset = pipeline.make_dataset(
        f"tfrecord:{directory}/*.tfrecord",
        config,
        image_size=IMAGE_SIZE,
        max_text_length=16,
        batch_size=64,
        train=False,
    )
    batches = [{k: v.numpy() for k, v in batch.items()} for batch in dataset]
    kept = np.concatenate([b["images"] for b in batches])
    counts = pipeline.skip_counts(batches[-1])
    figures = report.setdefault("random_images", dict(tried=0, skipped_and_counted=0, good_records_lost=0))
    figures["tried"] += len(blobs)
    figures["skipped_and_counted"] += sum(counts.values())
    figures["good_records_lost"] += len(good) - len(kept)
    # Every good record comes through, in order, with its own pixels; every bad one is counted.
    np.testing.assert_array_equal(kept[:, 0, 0], np.array(colours, np.uint8))
    assert sum(counts.values()) == len(blobs)
    assert {name for name, n in counts.items() if n} <= set(IMAGE_REASONS), counts


def _mesh_fits(sizes: tuple[int, int], num_devices: int) -> bool:
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        return False
    fixed = int(np.prod([s for s in sizes if s != -1]))
    return num_devices % fixed == 0 if -1 in sizes else fixed == num_devices


MESH_SIZES = st.sampled_from([-2, -1, 0, 1, 2, 3, 4, 5, 8, 16])
# Half of the meshes drawn are among those that fit 8 devices, so the batch check is reached too.
MESHES = st.one_of(
    st.sampled_from([(-1, 1), (1, -1), (-1, 2), (8, 1), (4, 2), (2, 4), (1, 8)]), st.tuples(MESH_SIZES, MESH_SIZES)
)
BATCH_SIZES = st.one_of(st.integers(1, 80), st.integers(1, 10).map(lambda k: 8 * k))


@settings(PROPERTY_TESTS, max_examples=80)
@given(mesh=MESHES, batch_size=BATCH_SIZES)
def test_any_mesh_and_batch_either_fit_or_fail_before_training_naming_the_field(
    data_dir, tmp_path_factory, mesh, batch_size, report
):
    data, fsdp = mesh
    config = train_config.get_config(data_dir)
    config.mesh, config.batch_size = (("data", data), ("fsdp", fsdp)), batch_size
    num_devices = jax.device_count()
    # Every mesh axis here is a batch axis: a fitting mesh's data-parallel size is the device count.
    if not _mesh_fits((data, fsdp), num_devices):
        field = "mesh"
    elif batch_size % num_devices:
        field = "batch_size"
    else:
        config_lib.validate(config, num_devices)
        report["well_formed_configs_accepted"] = report.get("well_formed_configs_accepted", 0) + 1
        return
    _assert_fails_before_training(config, field, tmp_path_factory)
    _count_rejected(report, field)


# No "/" or ".": a name must not lead back out of the missing folder to a file that exists.
NAMES = st.text(st.sampled_from(string.ascii_letters + string.digits + "-_"), min_size=1, max_size=16)


@settings(PROPERTY_TESTS, max_examples=40)
@given(
    field=st.sampled_from(["model.image.type", "model.text.type", "data.vocab", "data.train"]),
    name=NAMES,
)
def test_unknown_towers_and_missing_vocab_or_data_fail_before_training_naming_the_field(
    data_dir, tmp_path_factory, field, name, report
):
    config = train_config.get_config(data_dir)
    if field == "model.image.type":
        assume(name not in IMAGE_TOWERS)
        config.model.image.type = name
    elif field == "model.text.type":
        assume(name not in TEXT_TOWERS)
        config.model.text.type = name
    elif field == "data.vocab":
        config.data.vocab = os.path.join(data_dir, "missing", name)
    else:
        config.data.train = f"tfrecord:{os.path.join(data_dir, 'missing', name)}-*.tfrecord"
    _assert_fails_before_training(config, field, tmp_path_factory)
    _count_rejected(report, field)


def _assert_fails_before_training(config, field: str, tmp_path_factory) -> None:
    workdir = tmp_path_factory.mktemp("rejected")
    with pytest.raises(config_lib.ConfigError) as error:
        train.train_and_evaluate(config, str(workdir))
    # "config.mesh: ...", or "config.model: model.image.type: ..." where a part names the field.
    assert str(error.value).startswith("config.") and f"{field}:" in str(error.value), error.value
    assert list(workdir.iterdir()) == []  # nothing written: no config.json, no checkpoint


def _count_rejected(report: dict, field: str) -> None:
    rejected = report.setdefault("malformed_configs_rejected_naming_the_field", {})
    rejected[field] = rejected.get(field, 0) + 1


# --- faults ----------------------------------------------------------------------------------------


def test_sigkilled_and_relaunched_run_ends_bitwise_equal_to_an_uninterrupted_one(fault_run, background, report):
    kills = fault_run["kills"]
    assert len(kills) >= 3
    # Each launch resumed from the newest complete checkpoint and was killed beyond it.
    for kill in kills:
        assert kill["resumed_as_logged"], kill
        assert kill["step"] > kill["resumed_from"], kill
    reference = _result(background, "reference")["workdir"]
    _assert_bitwise_equal(_model_variables(fault_run["workdir"]), _model_variables(reference))
    report["faults"]["final_parameters_bitwise_equal"] = True


def test_a_kill_during_an_async_checkpoint_write_leaves_no_partial_checkpoint(fault_run, report):
    during = [k for k in fault_run["kills"] if k["kind"] == "during an async checkpoint write"]
    assert during
    for kill in during:
        # The interrupted step's folder never got its final name: the relaunch resumed before it.
        assert f"{kill['step']}{TMP_SUFFIX}" in kill["writes_interrupted"], kill
        assert kill["step"] not in kill["complete_after"], kill
    left = _tmp_dirs(fault_run["workdir"])
    report["faults"]["kills_interrupting_a_checkpoint_write"] = sum(
        bool(k["writes_interrupted"]) for k in fault_run["kills"]
    )
    report["faults"]["half_written_checkpoints_left"] = len(left)
    assert left == {}  # the relaunches removed what the kills left half-written


def test_a_corrupted_newest_checkpoint_is_set_aside_with_a_warning_and_the_previous_one_used(fault_run, report):
    damaged, stderr = fault_run["damaged"], fault_run["stderr"]
    assert re.search(rf"WARNING checkpoint step {damaged} in \S+ cannot be restored: CorruptCheckpointError", stderr)
    assert f"resuming from checkpoint step {damaged - 1}, the newest complete one" in stderr
    assert f"resumed from the checkpoint of step {damaged - 1} " in stderr
    assert (fault_run["workdir"] / checkpointing.CORRUPT_DIR / str(damaged)).is_dir()
    report["faults"]["corrupted_checkpoint"].update(detected=True, resumed_from=damaged - 1)


def test_the_killed_run_lost_and_repeated_no_step(fault_run, background, report):
    """Its metrics file (cut back at each resume) holds every step once, with the losses, skip
    counts and evaluation of the uninterrupted run: no batch was lost or seen twice."""
    records = _training_records(fault_run["workdir"])
    reference = _training_records(_result(background, "reference")["workdir"])
    assert [r["step"] for r in records if "loss" in r] == list(range(1, TOTAL_STEPS + 1))
    assert records == reference
    last = [r for r in records if "loss" in r][-1]
    report["faults"]["metrics_equal_to_the_uninterrupted_run"] = True
    report["training_data"]["skipped_in_the_run"] = {k: v for k, v in last.items() if k.startswith("skipped/") and v}


def test_running_out_of_disk_while_saving_fails_naming_the_step_and_keeps_earlier_checkpoints(background, report):
    run = _result(background, "other_seed")
    if not run["disk_full"]:
        pytest.skip("needs resource.prlimit (Linux)")
    assert run["returncode"] == 1, run["stderr"][-4000:]
    match = re.search(
        r"ERROR saving checkpoint step (\d+) to \S+ failed: .*File too large.*; the earlier checkpoints \[([\d, ]*)\] "
        r"are intact",
        run["stderr"],
    )
    assert match, run["stderr"][-4000:]
    failed, intact = int(match.group(1)), [int(s) for s in match.group(2).split(",")]
    assert set(run["complete"]) <= set(intact) and failed not in intact
    assert _complete_steps(run["workdir"]) == intact
    checkpoints = run["workdir"] / checkpointing.CHECKPOINT_DIR
    for step, hashes in run["hashes"].items():
        assert _file_hashes(checkpoints / str(step)) == hashes  # not a byte changed
        _model_variables(run["workdir"], step)  # and it restores, matching its checksums
    report["disk_full"] = dict(
        file_size_limit_bytes=FILE_SIZE_LIMIT, failed_step=failed, intact_checkpoints=intact, intact_verified=True
    )


# --- determinism -----------------------------------------------------------------------------------


def test_the_same_seed_gives_identical_metrics_files(background, report):
    first = _training_records(_result(background, "reference")["workdir"])
    second = _training_records(_result(background, "same_seed")["workdir"])
    assert [r["step"] for r in first if "loss" in r] == list(range(1, TOTAL_STEPS + 1))
    assert first == second
    fields = sorted({k for r in first for k in r})
    report["determinism"] = dict(records_compared=len(first), fields_compared=fields, excluded=sorted(TIMING_FIELDS))


def test_another_seed_gives_other_losses(background):
    """(The other seed's run stops when its disk fills, after at least two steps.)"""

    def losses(name):
        return [r["loss"] for r in read_metrics(_result(background, name)["workdir"]) if "loss" in r]

    reference, other = losses("reference"), losses("other_seed")
    assert len(reference) == TOTAL_STEPS and len(other) >= 2
    assert all(a != b for a, b in zip(reference, other, strict=False))
