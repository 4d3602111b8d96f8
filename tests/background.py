"""Subprocess runs that start with the session and go on beside the in-process tests.

Most of the suite is single-threaded Python and XLA compilation: a small CI machine's second core
sits idle. A long subprocess run (training programs, a notebook's workdir) is a job, a function
of pytest's `tmp_path_factory`, named after the fixture that returns its result in
`BACKGROUND_JOBS = {fixture name: job}` of its test module (or of conftest.py). conftest.py starts
the jobs of the fixtures the selected tests use with the session, one at a time in one lane, in
the order of the tests; the fixture returns `background_jobs.result(name)`: the job's result, or
its exception (an assertion that failed inside it).

The lane only moves where the runs happen: what each job runs and what the tests assert about it
are the same as if the test ran it itself.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB_TIMEOUT_S = 3600  # a job waited for, on a loaded 2-core machine

Job = Callable[[Any], Any]


class Lane:
    """One worker thread running the session's background jobs in the order they are started."""

    def __init__(self, tmp_path_factory):
        self._tmp_path_factory = tmp_path_factory
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="background-job")
        self._futures: dict[str, Future] = {}
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._procs: list[subprocess.Popen] = []
        self._closing = threading.Event()

    def start(self, name: str, job: Job) -> None:
        with self._lock:
            if name in self._jobs and self._jobs[name] is not job:
                raise ValueError(f"two background jobs are named {name!r}")
            self._jobs[name] = job
            if name not in self._futures:
                self._futures[name] = self._executor.submit(job, self._tmp_path_factory)

    def result(self, name: str, timeout: float = JOB_TIMEOUT_S) -> Any:
        with self._lock:
            future = self._futures.get(name)
        if future is None:
            raise KeyError(f"no background job {name!r} was started (see BACKGROUND_JOBS)")
        return future.result(timeout=timeout)

    def popen(self, *args, **kwargs) -> subprocess.Popen:
        """subprocess.Popen, killed at the end of the session if still running."""
        if self._closing.is_set():
            raise RuntimeError("the test session has ended; no more background runs")
        proc = subprocess.Popen(*args, **kwargs)
        self._procs.append(proc)
        return proc

    def close(self) -> None:
        self._closing.set()
        self._executor.shutdown(wait=False, cancel_futures=True)
        for proc in self._procs:  # runs still going when the session ended early
            if proc.poll() is None:
                proc.kill()
        self._executor.shutdown(wait=True)


def env(device_count: int) -> dict[str, str]:
    """The environment of a training process on `device_count` CPU devices, sharing the tests'
    compilation cache."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={device_count}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO
    env.setdefault("ALIGN_JAX_COMPILE_CACHE", jax.config.jax_compilation_cache_dir or "")
    if jax.config.jax_compilation_cache_dir:
        # The tests' cache at the tests' path (the path is part of the cache key), keeping every
        # program however fast its compile: a launch on 8 devices compiles ~450 sub-second programs
        # (orbax's per-replica slices of the arrays it saves), ~15 s a launch on a small CPU, that
        # the launches before it compiled already.
        env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


_LANE: Lane | None = None


def lane() -> Lane:
    if _LANE is None:
        raise RuntimeError("the background lane starts with the session (tests/conftest.py)")
    return _LANE


def set_lane(new: Lane | None) -> None:
    global _LANE
    _LANE = new


def popen(*args, **kwargs) -> subprocess.Popen:
    return lane().popen(*args, **kwargs)


def run(command, *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(capture_output=True) through the lane (killed if the session ends first)."""
    proc = popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def result_fixture(name: str, scope: str = "module"):
    """A fixture named `name` returning the result of the background job of that name."""

    @pytest.fixture(scope=scope, name=name)
    def fixture(background_jobs):
        return background_jobs.result(name)

    return fixture
