#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: create it, install align_jax on every worker, run the same
# training command on all of them (jax.distributed finds its peers on Cloud TPU by itself), follow
# the logs, delete the slice. Run with --help for the options.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

SCRIPT_NAME=tpu_pod.sh
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<'USAGE'
Usage: launch/tpu_pod.sh [--dry-run] SUBCOMMAND [OPTIONS] [-- TRAIN_FLAGS...]

Subcommands:
  create    create the slice (gcloud compute tpus tpu-vm create; queued-resources create with --queued)
  install   put this repository on every worker and pip install it with jax[tpu] into ~/DIR/.venv:
            a copy of the local working tree (tracked and untracked, not git-ignored, files),
            or a git clone with --repo-url
  run       run `python -m align_jax.train --config CONFIG --workdir WORKDIR TRAIN_FLAGS...` on all
            workers at once; output streams here and goes to DIR/logs/train.log on each worker.
            With --background it runs under nohup instead (then use `logs` and `stop`)
  logs      follow DIR/logs/train.log of one worker (--worker, default 0)
  stop      send SIGTERM to a --background training on all workers: it saves a checkpoint and exits
  delete    delete the slice (and its queued resource with --queued)

Options (each also read from the environment variable in brackets):
  --name NAME                slice name [TPU_NAME]; required
  --zone ZONE                e.g. us-central2-b [ZONE]; required
  --project PROJECT          default: gcloud's configured project [PROJECT]
  --accelerator-type TYPE    e.g. v4-32, v5p-64 [ACCELERATOR_TYPE]; required by create
  --version VERSION          TPU software (runtime) version [TPU_VERSION]; default tpu-ubuntu2204-base
  --spot                     create Spot TPUs [SPOT=1]
  --preemptible              create preemptible TPUs (not with --queued) [PREEMPTIBLE=1]
  --queued                   create/delete through a queued resource of the same name [QUEUED=1]
  --repo-url URL             install: git clone URL instead of copying the local tree [REPO_URL]
  --ref REF                  install: commit, tag or origin/BRANCH to check out [REPO_REF];
                             default origin/HEAD
  --dir DIR                  the repository on each worker, relative to home [REMOTE_DIR];
                             default align_jax
  --python PYTHON            install: the worker's Python (>= 3.11; installed with apt when
                             missing) [TPU_PYTHON]; default python3.11
  --config FILE              run: the training config (e.g. configs/align_base.py); required
  --workdir DIR              run: gs://BUCKET/PATH shared by all workers; required
  --background               run: under nohup, each worker's output in DIR/logs/train.log
  --worker N                 logs: the worker to follow; default 0
  --dry-run                  print the commands (one per line, prefixed by `+ `), run none [DRY_RUN=1]
  -h, --help                 this help

Everything after `--` is passed to align_jax.train, e.g. -- --config.batch_size=4096.
Preemption: the training checkpoints on SIGTERM; `run` again with the same --workdir resumes.

Examples:
  launch/tpu_pod.sh create  --name pod1 --zone us-central2-b --accelerator-type v4-32 --spot
  launch/tpu_pod.sh install --name pod1 --zone us-central2-b
  launch/tpu_pod.sh run     --name pod1 --zone us-central2-b --config configs/align_base.py \
      --workdir gs://my-bucket/runs/base -- --config.data.train='tfrecord:gs://my-bucket/laion/*.tfrecord'
  launch/tpu_pod.sh delete  --name pod1 --zone us-central2-b
USAGE
}

tpu_name=${TPU_NAME:-}
zone=${ZONE:-}
project=${PROJECT:-}
accelerator_type=${ACCELERATOR_TYPE:-}
version=${TPU_VERSION:-tpu-ubuntu2204-base}
spot=${SPOT:-0}
preemptible=${PREEMPTIBLE:-0}
queued=${QUEUED:-0}
repo_url=${REPO_URL:-}
repo_ref=${REPO_REF:-origin/HEAD}
remote_dir=${REMOTE_DIR:-align_jax}
remote_python=${TPU_PYTHON:-python3.11}
config=""
workdir=""
background=0
worker=0
subcommand=""
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
        --spot) spot=1 ;;
        --preemptible) preemptible=1 ;;
        --queued) queued=1 ;;
        --background) background=1 ;;
        --name | --zone | --project | --accelerator-type | --version | --repo-url | --ref | --dir | \
            --python | --config | --workdir | --worker)
            need_value "$@"
            case $1 in
                --name) tpu_name=$2 ;;
                --zone) zone=$2 ;;
                --project) project=$2 ;;
                --accelerator-type) accelerator_type=$2 ;;
                --version) version=$2 ;;
                --repo-url) repo_url=$2 ;;
                --ref) repo_ref=$2 ;;
                --dir) remote_dir=$2 ;;
                --python) remote_python=$2 ;;
                --config) config=$2 ;;
                --workdir) workdir=$2 ;;
                --worker) worker=$2 ;;
            esac
            shift
            ;;
        --)
            shift
            train_flags=("$@")
            break
            ;;
        -*) die "unknown option '$1'" ;;
        *)
            [[ -z $subcommand ]] || die "unexpected argument '$1' (the subcommand is '$subcommand')"
            subcommand=$1
            ;;
    esac
    shift
done

case $subcommand in
    create | install | run | logs | stop | delete) ;;
    "") die "no subcommand: one of create, install, run, logs, stop, delete" ;;
    *) die "unknown subcommand '$subcommand': one of create, install, run, logs, stop, delete" ;;
esac
[[ -n $tpu_name ]] || die "--name (or TPU_NAME) is required"
[[ -n $zone ]] || die "--zone (or ZONE) is required"
[[ $worker =~ ^[0-9]+$ ]] || die "--worker must be a worker number, not '$worker'"
if [[ ${#train_flags[@]} -gt 0 && $subcommand != run ]]; then
    die "training flags after -- are for the run subcommand, not $subcommand"
fi

# gcloud flags every command shares.
location=(--zone="$zone")
[[ -z $project ]] || location+=(--project="$project")

# Runs COMMAND (one string, read by the worker's login shell) over ssh on WORKER (a number or all).
on_workers() {
    run gcloud compute tpus tpu-vm ssh "$tpu_name" "${location[@]}" --worker="$1" --command "$2"
}

# Joins shell commands with && (each argument is one already-quoted command).
and_then() {
    local out="" command
    for command in "$@"; do
        out+="${out:+ && }$command"
    done
    printf '%s' "$out"
}

create() {
    [[ -n $accelerator_type ]] || die "create needs --accelerator-type (or ACCELERATOR_TYPE), e.g. v4-32"
    local capacity=()
    [[ $spot == 0 ]] || capacity+=(--spot)
    if [[ $queued != 0 ]]; then
        [[ $preemptible == 0 ]] || die "--preemptible is not available with --queued; use --spot"
        run gcloud compute tpus queued-resources create "$tpu_name" --node-id="$tpu_name" "${location[@]}" \
            --accelerator-type="$accelerator_type" --runtime-version="$version" ${capacity[@]+"${capacity[@]}"}
        note "queued; the slice exists once this shows ACTIVE: gcloud compute tpus queued-resources describe $tpu_name --zone=$zone"
    else
        [[ $preemptible == 0 ]] || capacity+=(--preemptible)
        run gcloud compute tpus tpu-vm create "$tpu_name" "${location[@]}" \
            --accelerator-type="$accelerator_type" --version="$version" ${capacity[@]+"${capacity[@]}"}
    fi
}

install() {
    local dir fetch
    dir=$(quote "$remote_dir")
    if [[ -n $repo_url ]]; then
        fetch=$(and_then "{ test -d $dir/.git || git clone -q $(quote "$repo_url") $dir; }" \
            "git -C $dir fetch -q origin" "git -C $dir checkout -q --detach $(quote "$repo_ref")")
    else
        # The local working tree as git sees it (tracked plus untracked files, less the ignored
        # ones such as .venv and workdirs), copied to every worker.
        local root archive
        root=$(repo_root)
        archive=${TMPDIR:-/tmp}/align_jax-$tpu_name.tar.gz
        print_command "$(quote_words git -C "$root" ls-files -z --cached --others --exclude-standard) |" \
            "$(quote_words tar -C "$root" --null -T - -czf "$archive")"
        if ! is_dry_run; then
            git -C "$root" ls-files -z --cached --others --exclude-standard | tar -C "$root" --null -T - -czf "$archive"
        fi
        run gcloud compute tpus tpu-vm scp "$archive" "$tpu_name:align_jax.tar.gz" "${location[@]}" --worker=all
        fetch=$(and_then "mkdir -p $dir" "tar -xzf align_jax.tar.gz -C $dir" "rm align_jax.tar.gz")
    fi
    local python
    python=$(quote "$remote_python")
    # jax>=0.10 needs Python >= 3.11; Ubuntu 22.04 TPU images have 3.10, and 3.11 in apt.
    on_workers all "$(and_then "$fetch" "cd $dir" \
        "{ command -v $python >/dev/null || { sudo apt-get update -qq && sudo apt-get install -y -qq $python $python-venv; }; }" \
        "$python -m venv .venv" ".venv/bin/pip install -q --upgrade pip" \
        ".venv/bin/pip install -q -e . 'jax[tpu]'")"
}

train() {
    [[ -n $config ]] || die "run needs --config, e.g. configs/align_base.py"
    [[ -n $workdir ]] || die "run needs --workdir, e.g. gs://my-bucket/runs/base"
    if [[ $workdir != gs://* ]]; then
        note "warning: --workdir $workdir is not on GCS: each worker would write to its own disk, and" \
            "checkpoints need one directory that all of them share"
    fi
    local train_command
    # ALIGN_JAX_DISTRIBUTED=1: every worker joins one jax.distributed run, its coordinator and
    # process ids read from the TPU metadata by JAX's cluster detection.
    train_command=$(quote_words env ALIGN_JAX_DISTRIBUTED=1 .venv/bin/python -m align_jax.train --config "$config" \
        --workdir "$workdir" ${train_flags[@]+"${train_flags[@]}"})
    local dir
    dir=$(quote "$remote_dir")
    if [[ $background == 0 ]]; then
        on_workers all "$(and_then "cd $dir" "mkdir -p logs" "set -o pipefail" "$train_command 2>&1 | tee logs/train.log")"
    else
        # nohup and no terminal: the training outlives this ssh session; its pid is kept for `stop`.
        on_workers all "$(and_then "cd $dir" "mkdir -p logs" \
            "{ nohup $train_command > logs/train.log 2>&1 < /dev/null & echo \$! > logs/train.pid; }" \
            "echo \"\$(hostname): training started, log $dir/logs/train.log\"")"
    fi
}

case $subcommand in
    create) create ;;
    install) install ;;
    run) train ;;
    logs) on_workers "$worker" "tail -n 200 -F $(quote "$remote_dir")/logs/train.log" ;;
    stop) on_workers all "kill -TERM \"\$(cat $(quote "$remote_dir")/logs/train.pid)\"" ;;
    delete)
        if [[ $queued != 0 ]]; then
            run gcloud compute tpus queued-resources delete "$tpu_name" "${location[@]}" --force --quiet
        else
            run gcloud compute tpus tpu-vm delete "$tpu_name" "${location[@]}" --quiet
        fi
        ;;
esac
