"""Test setup: 8 emulated CPU devices, TF kept quiet and off accelerators, a compile cache."""

import os
import sys

# Must happen before jax initialises its backends.
_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

import align_jax.input  # noqa: E402,F401  (hides accelerators from TF)

# XLA compiles are slow on small CPUs; reuse them across test runs on the same machine.
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("ALIGN_JAX_COMPILE_CACHE", os.path.expanduser("~/.cache/align_jax/xla")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

from tests import background, fixtures  # noqa: E402

TEST_VOCAB = fixtures.TEST_VOCAB
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def vocab_path(tmp_path_factory) -> str:
    return fixtures.write_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt")


def _train_demo_workdir(tmp_path_factory):
    """6 steps of the tiny model on 8 devices, parameters sharded over an fsdp axis of 2, no
    evaluators, on demo data written where `make demo` writes it (tests/demo_workdir.py)."""
    workdir = tmp_path_factory.mktemp("trained_demo_workdir")
    proc = background.run(
        [sys.executable, "-m", "tests.demo_workdir", str(workdir)], env=background.env(8), cwd=REPO, timeout=1200
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir


# Subprocess runs that start with the session (tests/background.py); test modules add their own.
BACKGROUND_JOBS = {"trained_demo_workdir": _train_demo_workdir}


@pytest.fixture(scope="session", autouse=True)
def _background_lane(request, tmp_path_factory):
    """Starts, with the session, the background jobs of the fixtures that the selected tests use
    (see tests/background.py), in the order of the tests."""
    lane = background.Lane(tmp_path_factory)
    background.set_lane(lane)
    try:
        for item in request.session.items:
            jobs = {**BACKGROUND_JOBS, **getattr(item.module, "BACKGROUND_JOBS", {})}
            for name in item.fixturenames:
                if name in jobs:
                    lane.start(name, jobs[name])
        yield lane
    finally:
        lane.close()
        background.set_lane(None)


@pytest.fixture(scope="session")
def background_jobs(_background_lane) -> background.Lane:
    return _background_lane


@pytest.fixture(scope="session")
def trained_demo_workdir(background_jobs):
    """The trained checkpoint of test_inference.py and the notebook's workdir in test_notebook.py."""
    return background_jobs.result("trained_demo_workdir")
