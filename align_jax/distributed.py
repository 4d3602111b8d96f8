"""Multi-process runs (`jax.distributed`): joining one, and a barrier between the processes that
does not touch the devices."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

AUTO_ENV = "ALIGN_JAX_DISTRIBUTED"  # =1: jax.distributed.initialize() from the cluster's description


class DistributedFlagsError(ValueError):
    """Inconsistent multi-process flags; the message names them."""


def initialize(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Joins a multi-process run before any device is touched: with the three values given, as
    told; without them, by JAX's own detection when a cluster is evident (an srun step of several
    tasks, an Open MPI job, or `ALIGN_JAX_DISTRIBUTED=1`, which launch/tpu_pod.sh sets on Cloud TPU
    pods). Returns whether it joined one."""
    given = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in given):
        if any(v is None for v in given):
            raise DistributedFlagsError(
                "--coordinator_address, --num_processes and --process_id must be given together (or none, "
                "for auto-detection on Cloud TPU and SLURM)"
            )
        if not 0 <= process_id < num_processes:
            raise DistributedFlagsError(f"--process_id {process_id} is not in [0, --num_processes={num_processes})")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return True
    evident = (
        # Set inside an srun step only: the batch script's own shell (SLURM_NTASKS > 1 there too)
        # must not wait for peers that are not started.
        int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1
        or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or os.environ.get(AUTO_ENV, "") == "1"
    )
    if evident:
        jax.distributed.initialize()
        return True
    return False


def host_barrier(name: str, timeout_s: int = 1800) -> None:
    """Waits until every process reaches `name` (unique per call), through the coordinator's
    key-value store (orbax's barrier): no device work and a generous timeout, e.g. while another
    host still compiles, where a device collective's 30 s context set-up on CPU would time out."""
    ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)
