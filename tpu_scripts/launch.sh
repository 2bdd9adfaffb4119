#!/usr/bin/env bash
# Starts `opsd-jax train` on every worker of a TPU slice, in the background, one log per worker.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE --config FILE [options] [KEY=VALUE ...] [-- KEY=VALUE ...]

Runs the same command on every worker (each process calls jax.distributed.initialize() itself):
  opsd-jax train --config RUNS_DIR/RUN/config.yaml [--resume] KEY=VALUE ...
detached with nohup (setsid), output appended to RUNS_DIR/RUN/train.log and the process id written to
RUNS_DIR/RUN/train.pid on each worker. The local config FILE is validated here first (with the slice's
device count when --accelerator-type is given), then copied to every worker, so that edits need no new
setup.sh. Follow the run with logs.sh, end it with stop.sh.

Required:
  --name NAME              TPU node name (or set OPSD_TPU_NAME)
  --zone ZONE              its zone (or set OPSD_TPU_ZONE)
  --config FILE            run config on this machine, e.g. configs/qwen2_5_omni_3b_v5e16.yaml
Options:
  --project PROJECT        Google Cloud project (default: gcloud's; or OPSD_GCP_PROJECT)
  --run-name RUN           names the run directory and log (default: the config's file name)
  --resume                 continue from the newest checkpoint in the config's run.output_dir
  --accelerator-type TYPE  check the config's mesh against this slice's device count before launching
  --remote-dir DIR         the project on the workers, as given to setup.sh (default opsd-jax)
  --runs-dir DIR           run directories on the workers (default opsd-runs, under the home)
  --compile-cache DIR      JAX_COMPILATION_CACHE_DIR on the workers (default .cache/opsd-jax/jax, under
                           the home; a gs:// path shares compilations between workers and runs)
  --env KEY=VALUE          an extra environment variable for the run; repeatable
  --no-validate            skip the local validation of the config
  --dry-run                print the commands instead of running them (needs no gcloud)
  -h, --help               this help
KEY=VALUE arguments are config overrides (e.g. train.lr=1e-6 sampling.num_samples=8).

Example:
  $PROG --name opsd-v5e --zone us-west4-a --config configs/qwen2_5_omni_3b_v5e16.yaml \\
    --accelerator-type v5litepod-16 train.total_steps=2000
EOF
}

NAME=${OPSD_TPU_NAME-}
ZONE=${OPSD_TPU_ZONE-}
PROJECT=${OPSD_GCP_PROJECT-}
CONFIG=""
RUN_NAME=""
RESUME=0
ACCELERATOR_TYPE=""
REMOTE_DIR=opsd-jax
RUNS_DIR=opsd-runs
COMPILE_CACHE=.cache/opsd-jax/jax
ENVS=()
VALIDATE=1
OVERRIDES=()

split_flag_values "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while (($#)); do
  case $1 in
    --name) need_value "$1" $# "${2-}"; NAME=$2; shift 2 ;;
    --zone) need_value "$1" $# "${2-}"; ZONE=$2; shift 2 ;;
    --project) need_value "$1" $# "${2-}"; PROJECT=$2; shift 2 ;;
    --config) need_value "$1" $# "${2-}"; CONFIG=$2; shift 2 ;;
    --run-name) need_value "$1" $# "${2-}"; RUN_NAME=$2; shift 2 ;;
    --resume) RESUME=1; shift ;;
    --accelerator-type) need_value "$1" $# "${2-}"; ACCELERATOR_TYPE=$2; shift 2 ;;
    --remote-dir) need_value "$1" $# "${2-}"; REMOTE_DIR=$2; shift 2 ;;
    --runs-dir) need_value "$1" $# "${2-}"; RUNS_DIR=$2; shift 2 ;;
    --compile-cache) need_value "$1" $# "${2-}"; COMPILE_CACHE=$2; shift 2 ;;
    --env) need_value "$1" $# "${2-}"; ENVS+=("$2"); shift 2 ;;
    --no-validate) VALIDATE=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    -*) die "unknown argument '$1' (see --help)" ;;
    *=*) OVERRIDES+=("$1"); shift ;;
    *) die "unexpected argument '$1': config overrides are KEY=VALUE (see --help)" ;;
  esac
done

require --name "$NAME" OPSD_TPU_NAME
require --zone "$ZONE" OPSD_TPU_ZONE
require --config "$CONFIG"
check_name --name "$NAME"
[[ -f $CONFIG ]] || die "--config: no such file '$CONFIG'"
[[ -n $RUN_NAME ]] || RUN_NAME=$(basename "${CONFIG%.*}")
check_run_name "$RUN_NAME"
check_path --remote-dir "$REMOTE_DIR"
check_path --runs-dir "$RUNS_DIR"
check_path --compile-cache "$COMPILE_CACHE"
for override in "${OVERRIDES[@]+"${OVERRIDES[@]}"}"; do
  [[ $override =~ ^[A-Za-z_][A-Za-z0-9_.]*= ]] || die "config override '$override': expected section.key=value"
done
for setting in "${ENVS[@]+"${ENVS[@]}"}"; do
  [[ $setting =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env: expected KEY=VALUE, got '$setting'"
done
DEVICES=""
if [[ -n $ACCELERATOR_TYPE ]]; then
  check_accelerator_type "$ACCELERATOR_TYPE"
  DEVICES=$(devices_for_type "$ACCELERATOR_TYPE")
fi
require_gcloud
set_scope "$ZONE" "$PROJECT"

# A config that cannot load would fail on every worker after minutes of start-up: check it here.
validate_config() {
  local python=${OPSD_JAX_PYTHON-}
  if [[ -z $python ]]; then
    if [[ -x $REPO_ROOT/.venv/bin/python ]]; then
      python=$REPO_ROOT/.venv/bin/python
    elif command -v python3 >/dev/null 2>&1 && python3 -c 'import opsd_jax' 2>/dev/null; then
      python=python3
    else
      info "warning: opsd_jax is not importable here; the config is not validated before launch (--no-validate silences this)"
      return 0
    fi
  fi
  "$python" - "$CONFIG" "$DEVICES" "${OVERRIDES[@]+"${OVERRIDES[@]}"}" <<'EOF' ||
import sys
from opsd_jax.config import load_config
path, devices, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
try:
    load_config(path, overrides, num_devices=int(devices) if devices else None)
except ValueError as err:
    sys.exit(f"{path}: {err}")
EOF
    die "the config does not validate${DEVICES:+ for $DEVICES devices} (above); nothing was started"
  note "validated $CONFIG${DEVICES:+ for $DEVICES devices ($ACCELERATOR_TYPE)}"
}
((VALIDATE)) && validate_config

run_dir=$(remote_path "$RUNS_DIR/$RUN_NAME")
staged=".opsd-jax-launch-$RUN_NAME.yaml"
train="setsid nohup .venv/bin/opsd-jax train --config $run_dir/config.yaml"
((RESUME)) && train+=" --resume"
((${#OVERRIDES[@]} == 0)) || train+=" $(quote_words "${OVERRIDES[@]}")"

case $COMPILE_CACHE in
  gs://*) cache=$(shell_quote "$COMPILE_CACHE"); make_dirs="mkdir -p $run_dir" ;;
  *) cache=$(remote_path "$COMPILE_CACHE"); make_dirs="mkdir -p $run_dir $cache" ;;
esac
exports="export JAX_COMPILATION_CACHE_DIR=$cache HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false"
for setting in "${ENVS[@]+"${ENVS[@]}"}"; do
  exports+=" ${setting%%=*}=$(shell_quote "${setting#*=}")"
done

# 1. The config, to a staging file in each worker's home (the run directory may not exist yet).
run gcloud compute tpus tpu-vm scp "$CONFIG" "$NAME:$staged" --worker=all "${GCLOUD_SCOPE[@]}"

# 2. The run: refuse to start it twice, then detach it from the ssh session in its own process group
#    (setsid: stop.sh ends the whole group, data-loader workers included).
log="$run_dir/train.log"
pid="$run_dir/train.pid"
remote="set -e; cd $(remote_path "$REMOTE_DIR")"
missing="\$(hostname): no .venv/bin/opsd-jax in $REMOTE_DIR: run setup.sh first"
remote+="; [ -x .venv/bin/opsd-jax ] || { echo \"$missing\" >&2; exit 1; }"
remote+="; $make_dirs"
remote+="; if [ -f $pid ] && ps -p \"\$(cat $pid)\" -o args= | grep -q opsd-jax; then"
remote+=" echo \"\$(hostname): run $RUN_NAME is already running: stop.sh --run-name $RUN_NAME first\" >&2; exit 1; fi"
remote+="; mv \"\$HOME\"/$staged $run_dir/config.yaml"
remote+="; $exports"
remote+="; echo \"=== \$(date -u +%Y-%m-%dT%H:%M:%SZ) \$(hostname): start $RUN_NAME\" >> $log"
remote+="; $train >> $log 2>&1 < /dev/null & echo \$! > $pid"
remote+="; echo \"\$(hostname): started $RUN_NAME, pid \$(cat $pid), log $RUNS_DIR/$RUN_NAME/train.log\""
run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${GCLOUD_SCOPE[@]}" "--command=$remote"
note "follow it: logs.sh --name $NAME --zone $ZONE --run-name $RUN_NAME --follow"
