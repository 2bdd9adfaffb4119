#!/usr/bin/env bash
# Ends a training run on every worker of a TPU slice; optionally deletes the slice (its queued resource).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE [options]

On every worker: sends SIGTERM to the process group of the run that launch.sh started (its pid is in
RUNS_DIR/RUN/train.pid; on SIGTERM opsd-jax train saves a checkpoint and exits), waits up to --grace
seconds for it to end, then sends SIGKILL, so that no process keeps the TPU busy for the next run.
Only processes recorded by launch.sh whose command line names opsd-jax are touched. With --delete it
then deletes the queued resource and its TPU node: billing stops, and the workers' disks go with it
(the logs on them included; checkpoints in a gs:// run.output_dir stay).

Required:
  --name NAME          TPU node name (or set OPSD_TPU_NAME)
  --zone ZONE          its zone (or set OPSD_TPU_ZONE)
Options:
  --project PROJECT    Google Cloud project (default: gcloud's; or OPSD_GCP_PROJECT)
  --run-name RUN       the run to end (default: every run launch.sh started on the slice)
  --grace SECONDS      time between SIGTERM and SIGKILL (default 300, room for the last checkpoint)
  --runs-dir DIR       run directories on the workers, as given to launch.sh (default opsd-runs)
  --delete             then delete the queued resource NAME (and its node)
  --delete-only        delete without contacting the workers (e.g. when they are unreachable)
  --yes                do not ask before deleting
  --dry-run            print the gcloud commands instead of running them (needs no gcloud)
  -h, --help           this help

Example:
  $PROG --name opsd-v5e --zone us-west4-a --delete
EOF
}

NAME=${OPSD_TPU_NAME-}
ZONE=${OPSD_TPU_ZONE-}
PROJECT=${OPSD_GCP_PROJECT-}
RUN_NAME=""
GRACE=300
RUNS_DIR=opsd-runs
STOP=1
DELETE=0
YES=0

split_flag_values "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while (($#)); do
  case $1 in
    --name) need_value "$1" $# "${2-}"; NAME=$2; shift 2 ;;
    --zone) need_value "$1" $# "${2-}"; ZONE=$2; shift 2 ;;
    --project) need_value "$1" $# "${2-}"; PROJECT=$2; shift 2 ;;
    --run-name) need_value "$1" $# "${2-}"; RUN_NAME=$2; shift 2 ;;
    --grace) need_value "$1" $# "${2-}"; GRACE=$2; shift 2 ;;
    --runs-dir) need_value "$1" $# "${2-}"; RUNS_DIR=$2; shift 2 ;;
    --delete) DELETE=1; shift ;;
    --delete-only) DELETE=1; STOP=0; shift ;;
    --yes) YES=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

require --name "$NAME" OPSD_TPU_NAME
require --zone "$ZONE" OPSD_TPU_ZONE
check_name --name "$NAME"
[[ -z $RUN_NAME ]] || check_run_name "$RUN_NAME"
require_uint --grace "$GRACE"
check_path --runs-dir "$RUNS_DIR"
require_gcloud
set_scope "$ZONE" "$PROJECT"

if ((STOP)); then
  runs=$(remote_path "$RUNS_DIR")
  pattern="$runs/${RUN_NAME:-*}/train.pid"
  # ours: a live process group whose leader's command line names opsd-jax (a recycled pid is left alone).
  # $p expands on the worker.
  # shellcheck disable=SC2016
  ours='ps -p "$p" -o args= 2>/dev/null | grep -q opsd-jax'
  remote="pids=; for f in $pattern; do [ -f \"\$f\" ] || continue; p=\$(cat \"\$f\"); rm -f \"\$f\""
  remote+="; if $ours; then pids=\"\$pids \$p\"; fi; done"
  remote+="; if [ -z \"\$pids\" ]; then echo \"\$(hostname): no running run${RUN_NAME:+ named $RUN_NAME}\"; exit 0; fi"
  remote+="; for p in \$pids; do kill -TERM -- -\$p 2>/dev/null || true; done; echo \"\$(hostname): SIGTERM to\$pids\""
  remote+="; left=\$pids; i=0; while [ -n \"\$left\" ] && [ \$i -lt $GRACE ]; do sleep 1; i=\$((i + 1))"
  remote+="; now=; for p in \$left; do if $ours; then now=\"\$now \$p\"; fi; done; left=\$now; done"
  remote+="; for p in \$left; do kill -KILL -- -\$p 2>/dev/null || true"
  remote+="; echo \"\$(hostname): SIGKILL to \$p after ${GRACE}s\"; done"
  remote+="; echo \"\$(hostname): stopped\""
  if ((DELETE)); then
    # The slice is deleted next: an unreachable worker must not keep it (and its bill) alive.
    run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${GCLOUD_SCOPE[@]}" "--command=$remote" ||
      info "warning: could not reach every worker; deleting anyway"
  else
    run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${GCLOUD_SCOPE[@]}" "--command=$remote"
  fi
fi

if ((DELETE)); then
  delete=(gcloud compute tpus queued-resources delete "$NAME" "${GCLOUD_SCOPE[@]}" --force)
  ((YES)) && delete+=(--quiet)
  run "${delete[@]}"
fi
