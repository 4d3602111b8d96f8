#!/usr/bin/env bash
# Train on one machine with all of its devices, on N emulated CPU devices, or as N local processes
# joined by jax.distributed (the multi-host code path, tested on one machine). Run with --help.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

SCRIPT_NAME=single_host.sh
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<'USAGE'
Usage: launch/single_host.sh --config FILE --workdir DIR [OPTIONS] [-- TRAIN_FLAGS...]

Runs `python -m align_jax.train --config FILE --workdir DIR TRAIN_FLAGS...` in the repository's
virtual environment, creating it first if needed (python3 -m venv .venv; pip install -e .).

Options:
  --config FILE        the training config, e.g. configs/demo.py; required
  --workdir DIR        checkpoints and logs; rerunning resumes from it; required
  --cpu-devices N      run on N emulated CPU devices (JAX_PLATFORMS=cpu,
                       XLA_FLAGS=--xla_force_host_platform_device_count=N); with --processes, the
                       devices of each process (default 1)
  --processes N        start N processes on this machine (--coordinator_address localhost:PORT
                       --num_processes N --process_id 0..N-1, each on CPU), wait for all; output
                       of process i in LOG_DIR/process_i.log. If one fails the others get SIGTERM
                       (SIGKILL 60 s later, STOP_GRACE_S), and the exit status is 1
  --port PORT          the coordinator's port with --processes [COORDINATOR_PORT]; default 12355
  --log-dir DIR        where --processes writes its logs; default WORKDIR/logs
  --venv DIR           the virtual environment [VENV]; default .venv in the repository
  --jax-package SPEC   installed into a new venv with align_jax, e.g. 'jax[cuda12]' for NVIDIA
                       GPUs or 'jax[tpu]' [JAX_PACKAGE]; default none (CPU)
  --python PYTHON      use this interpreter as it is, no venv [PYTHON]
  --jemalloc           run under jemalloc, set to keep what it frees (LD_PRELOAD, MALLOC_CONF):
                       on CPU, XLA allocates each step's temporary buffer afresh, and glibc's
                       malloc hands it back to the kernel each step (README). The library:
                       JEMALLOC_LIB, else ldconfig's libjemalloc.so.2 (apt-get install libjemalloc2)
  --dry-run            print the commands (one per line, prefixed by `+ `), run none [DRY_RUN=1]
  -h, --help           this help

Everything after `--` is passed to align_jax.train, e.g. -- --config.total_steps=100.
SIGINT/SIGTERM: the training saves a checkpoint and exits; rerun to resume.

Examples:
  launch/single_host.sh --config configs/demo.py --workdir workdirs/demo
  launch/single_host.sh --config configs/tiny.py --workdir workdirs/tiny8 --cpu-devices 8
  launch/single_host.sh --config configs/demo.py --workdir workdirs/mp --processes 2 --cpu-devices 4
USAGE
}

config=""
workdir=""
cpu_devices=""
processes=""
port=${COORDINATOR_PORT:-12355}
log_dir=""
venv=${VENV:-}
jax_package=${JAX_PACKAGE:-}
python=${PYTHON:-}
jemalloc=0
train_flags=()

split_option_values "$@"
set -- ${SPLIT_ARGS[@]+"${SPLIT_ARGS[@]}"}
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help)
            usage
            exit 0
            ;;
        --dry-run) DRY_RUN=1 ;;
        --jemalloc) jemalloc=1 ;;
        --config | --workdir | --cpu-devices | --processes | --port | --log-dir | --venv | --jax-package | --python)
            need_value "$@"
            case $1 in
                --config) config=$2 ;;
                --workdir) workdir=$2 ;;
                --cpu-devices) cpu_devices=$2 ;;
                --processes) processes=$2 ;;
                --port) port=$2 ;;
                --log-dir) log_dir=$2 ;;
                --venv) venv=$2 ;;
                --jax-package) jax_package=$2 ;;
                --python) python=$2 ;;
            esac
            shift
            ;;
        --)
            shift
            train_flags=("$@")
            break
            ;;
        -*) die "unknown option '$1'" ;;
        *) die "unexpected argument '$1'" ;;
    esac
    shift
done
[[ -n $config ]] || die "--config is required, e.g. configs/demo.py"
[[ -n $workdir ]] || die "--workdir is required"
[[ -z $cpu_devices ]] || need_positive_int --cpu-devices "$cpu_devices"
[[ -z $processes ]] || need_positive_int --processes "$processes"
need_positive_int --port "$port"
grace_s=${STOP_GRACE_S:-60}
need_positive_int STOP_GRACE_S "$grace_s"

# The venv as `make` would treat it: (re)installed when missing or older than setup.py. A venv
# that `make test` made counts (its stamp), and this script's own install leaves another stamp,
# so as not to claim the test extra that `make test` installs.
ensure_venv() {
    local root stamp
    root=$(repo_root)
    venv=${venv:-$root/.venv}
    python=$venv/bin/python
    for stamp in "$venv/.align_jax-installed" "$venv/.align_jax-launch-installed"; do
        if [[ -x $python && $stamp -nt $root/setup.py ]]; then
            return
        fi
    done
    [[ -x $python ]] || run python3 -m venv "$venv"
    run "$python" -m pip install --quiet --upgrade pip
    run "$python" -m pip install --quiet -e "$root" ${jax_package:+"$jax_package"}
    run touch "$venv/.align_jax-launch-installed"
}
[[ -n $python ]] || ensure_venv

train_command=("$python" -m align_jax.train --config "$config" --workdir "$workdir" ${train_flags[@]+"${train_flags[@]}"})

# --jemalloc: what `env` puts before the training command. The options are those of
# benchmarks/torch_reference.py's JEMALLOC_CONF: no decay of freed pages, and no arena of its own
# (returning pages at once) for allocations over 8 MiB.
JEMALLOC_CONF=oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1
malloc_env=()
if ((jemalloc)); then
    library=${JEMALLOC_LIB:-$(ldconfig -p 2>/dev/null | awk '$1 == "libjemalloc.so.2" { print $NF; exit }')}
    [[ -n $library ]] || die "--jemalloc: libjemalloc.so.2 is not installed (Debian/Ubuntu: apt-get install libjemalloc2), or set JEMALLOC_LIB"
    [[ -f $library ]] || die "--jemalloc: JEMALLOC_LIB=$library is not a file"
    malloc_env=("LD_PRELOAD=$library" "MALLOC_CONF=$JEMALLOC_CONF")
fi

# XLA_FLAGS=... for N emulated CPU devices, keeping the caller's other XLA flags.
cpu_device_flags() {
    printf '%s' "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$1"
}

if [[ -z $processes ]]; then
    if [[ -n $cpu_devices ]]; then
        run_exec env ${malloc_env[@]+"${malloc_env[@]}"} JAX_PLATFORMS=cpu "$(cpu_device_flags "$cpu_devices")" "${train_command[@]}"
    elif ((jemalloc)); then
        run_exec env "${malloc_env[@]}" "${train_command[@]}"
    fi
    run_exec "${train_command[@]}"
fi

# --processes N: N local processes, each a jax.distributed "host" of cpu_devices CPU devices.
if [[ -z $log_dir ]]; then
    [[ $workdir != *://* ]] || die "--processes with a remote --workdir needs --log-dir"
    log_dir=$workdir/logs
fi
run mkdir -p "$log_dir"
pids=()
logs=()
for ((i = 0; i < processes; i++)); do
    command=(env ${malloc_env[@]+"${malloc_env[@]}"} JAX_PLATFORMS=cpu "$(cpu_device_flags "${cpu_devices:-1}")" "${train_command[@]}"
        --coordinator_address "localhost:$port" --num_processes "$processes" --process_id "$i")
    logs[i]=$log_dir/process_$i.log
    print_command "$(quote_words "${command[@]}") > $(quote "${logs[i]}") 2>&1 &"
    if ! is_dry_run; then
        "${command[@]}" >"${logs[i]}" 2>&1 &
        pids[i]=$!
    fi
done
print_command "wait  # for all $processes processes; exit 1 if any fails"
if is_dry_run; then
    exit 0
fi
note "started $processes processes; follow them with: tail -f $(quote "$log_dir")/process_0.log"

# Sends SIGNAL to the processes still running.
signal_running() {
    local pid
    for pid in "${pids[@]}"; do
        [[ -z $pid ]] || kill "-$1" "$pid" 2>/dev/null || true
    done
}
# shellcheck disable=SC2329  # called by the traps
on_signal() {
    note "$1: passing SIGTERM on (each process saves a checkpoint and exits)"
    signal_running TERM
}
trap 'on_signal SIGINT' INT
trap 'on_signal SIGTERM' TERM

# Polls rather than `wait -n`, which bash 3.2 lacks: a process that exited is no longer
# signalable, and `wait PID` then returns its status at once. Once one fails, the others would
# wait for it in their next collective: they are stopped (SIGTERM, then SIGKILL after grace_s)
# and not counted as failures themselves.
failed=()
running=$processes
kill_at=""
while ((running > 0)); do
    for ((i = 0; i < processes; i++)); do
        pid=${pids[i]}
        if [[ -z $pid ]] || kill -0 "$pid" 2>/dev/null; then
            continue
        fi
        status=0
        wait "$pid" || status=$?
        pids[i]=""
        running=$((running - 1))
        if ((status == 0)); then
            continue
        elif [[ -n $kill_at ]]; then
            note "process $i stopped (status $status)"
        else
            failed+=("$i")
            note "process $i exited with status $status; its log: ${logs[i]}"
            if ((running > 0)); then
                note "stopping the other processes (SIGTERM, SIGKILL in $grace_s s)"
                signal_running TERM
                kill_at=$((SECONDS + grace_s))
            fi
        fi
    done
    if [[ -n $kill_at ]] && ((running > 0 && SECONDS >= kill_at)); then
        signal_running KILL
    fi
    ((running == 0)) || sleep 0.2
done

if ((${#failed[@]} > 0)); then
    note "failed: process(es) ${failed[*]} of $processes; logs in $log_dir"
    exit 1
fi
note "all $processes processes exited 0; logs in $log_dir"
