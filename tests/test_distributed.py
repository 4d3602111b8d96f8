"""Joining a multi-process run: flag checks and cluster detection. (Training across two real
processes is tests/test_train.py::test_two_processes_match_one_and_their_checkpoint_resumes_in_one.)"""

import jax
import pytest

from align_jax import distributed

CLUSTER_VARS = ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", distributed.AUTO_ENV)


@pytest.mark.parametrize(
    "args, message",
    [
        (("localhost:1234", None, None), "must be given together"),
        ((None, 2, 0), "must be given together"),
        (("localhost:1234", 2, 2), r"--process_id 2 is not in \[0, --num_processes=2\)"),
    ],
)
def test_inconsistent_flags_are_named(args, message):
    with pytest.raises(distributed.DistributedFlagsError, match=message):
        distributed.initialize(*args)


def test_no_flags_and_no_cluster_is_a_single_process_run(monkeypatch):
    for var in CLUSTER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # a one-task srun step is not a cluster
    monkeypatch.setenv("SLURM_NTASKS", "4")  # the batch script's shell of a 4-task job, outside srun
    assert distributed.initialize() is False
    distributed.host_barrier("single process: returns at once")
    assert jax.process_count() == 1


@pytest.mark.parametrize(
    "var, value", [("SLURM_STEP_NUM_TASKS", "4"), ("OMPI_COMM_WORLD_SIZE", "2"), (distributed.AUTO_ENV, "1")]
)
def test_an_evident_cluster_lets_jax_detect_it(monkeypatch, var, value):
    calls = []
    for name in CLUSTER_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(var, value)
    # Recorded instead of run: joining a cluster that is not there would hang this process.
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kwargs: calls.append((args, kwargs)))
    assert distributed.initialize() is True
    assert calls == [((), {})]  # no arguments: JAX reads the cluster's own description
