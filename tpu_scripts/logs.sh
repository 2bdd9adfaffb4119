#!/usr/bin/env bash
# Shows (or follows) the training log of one worker of a TPU slice, or of all of them.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE [options]

Prints the last lines of RUNS_DIR/RUN/train.log on a worker (tail over gcloud compute tpus tpu-vm ssh).
Worker 0 is process 0, the one that logs metrics; the others show their own start-up and errors. With
--worker all every line is prefixed with the worker's host name.

Required:
  --name NAME          TPU node name (or set OPSD_TPU_NAME)
  --zone ZONE          its zone (or set OPSD_TPU_ZONE)
Options:
  --project PROJECT    Google Cloud project (default: gcloud's; or OPSD_GCP_PROJECT)
  --run-name RUN       the run (default: the most recently started run on each worker)
  --worker W           0 (default), another index, or all
  --lines N            how many lines (default 100)
  -f, --follow         keep printing new lines (Ctrl-C to stop; the run goes on)
  --runs-dir DIR       run directories on the workers, as given to launch.sh (default opsd-runs)
  --dry-run            print the gcloud command instead of running it (needs no gcloud)
  -h, --help           this help

Example:
  $PROG --name opsd-v5e --zone us-west4-a --follow
EOF
}

NAME=${OPSD_TPU_NAME-}
ZONE=${OPSD_TPU_ZONE-}
PROJECT=${OPSD_GCP_PROJECT-}
RUN_NAME=""
WORKER=0
LINES=100
FOLLOW=0
RUNS_DIR=opsd-runs

split_flag_values "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while (($#)); do
  case $1 in
    --name) need_value "$1" $# "${2-}"; NAME=$2; shift 2 ;;
    --zone) need_value "$1" $# "${2-}"; ZONE=$2; shift 2 ;;
    --project) need_value "$1" $# "${2-}"; PROJECT=$2; shift 2 ;;
    --run-name) need_value "$1" $# "${2-}"; RUN_NAME=$2; shift 2 ;;
    --worker) need_value "$1" $# "${2-}"; WORKER=$2; shift 2 ;;
    --lines) need_value "$1" $# "${2-}"; LINES=$2; shift 2 ;;
    -f | --follow) FOLLOW=1; shift ;;
    --runs-dir) need_value "$1" $# "${2-}"; RUNS_DIR=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

require --name "$NAME" OPSD_TPU_NAME
require --zone "$ZONE" OPSD_TPU_ZONE
check_name --name "$NAME"
[[ -z $RUN_NAME ]] || check_run_name "$RUN_NAME"
[[ $WORKER =~ ^(all|[0-9]+)$ ]] || die "--worker: expected a worker index or all, got '$WORKER'"
require_uint --lines "$LINES"
check_path --runs-dir "$RUNS_DIR"
require_gcloud
set_scope "$ZONE" "$PROJECT"

runs=$(remote_path "$RUNS_DIR")
if [[ -n $RUN_NAME ]]; then
  remote="log=$runs/$RUN_NAME/train.log"
else
  remote="log=\$(ls -t $runs/*/train.log 2>/dev/null | head -n 1)"
fi
missing="\$(hostname): no train.log${RUN_NAME:+ for run $RUN_NAME} under $RUNS_DIR"
remote+="; [ -n \"\$log\" ] && [ -f \"\$log\" ] || { echo \"$missing\" >&2; exit 1; }"
tail="tail -n $LINES"
((FOLLOW)) && tail+=" -F"
if [[ $WORKER == all ]]; then
  remote+="; $tail \"\$log\" | sed -u \"s/^/[\$(hostname)] /\""
else
  remote+="; echo \"==> \$(hostname): \$log\" >&2; $tail \"\$log\""
fi
run gcloud compute tpus tpu-vm ssh "$NAME" "--worker=$WORKER" "${GCLOUD_SCOPE[@]}" "--command=$remote"
