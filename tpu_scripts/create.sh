#!/usr/bin/env bash
# Requests a TPU VM or pod slice through a queued resource and waits until it is ACTIVE.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE [options] [-- EXTRA_GCLOUD_FLAGS...]

Requests a TPU slice as a queued resource (gcloud compute tpus queued-resources create), then polls
until its state is ACTIVE. The queued resource and its TPU node share NAME; the other scripts take the
same --name.

Required:
  --name NAME              queued resource and TPU node name (or set OPSD_TPU_NAME)
  --zone ZONE              zone with quota for the type, e.g. us-west4-a (v5e), us-east5-a (v5p),
                           us-central2-b (v4) (or set OPSD_TPU_ZONE)
Options:
  --accelerator-type TYPE  v5litepod-16 (default), v5p-64, v4-32, v6e-N, ...
  --runtime-version V      TPU VM image (default by type: v4 tpu-ubuntu2204-base,
                           v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --project PROJECT        Google Cloud project (default: gcloud's configured one; or OPSD_GCP_PROJECT)
  --spot                   Spot capacity (cheaper; can be preempted: launch with --resume afterwards)
  --reserved               use a reservation of the project
  --timeout SECONDS        how long to wait for ACTIVE (default 3600)
  --poll SECONDS           seconds between state checks (default 30)
  --no-wait                return right after the request is accepted
  --wait-only              do not create; wait for an existing request to become ACTIVE
  --dry-run                print the gcloud commands instead of running them (needs no gcloud)
  -h, --help               this help
Flags after -- go to 'queued-resources create' unchanged (e.g. --network=... --labels=...).

Example:
  $PROG --name opsd-v5e --zone us-west4-a --accelerator-type v5litepod-16 --spot
EOF
}

NAME=${OPSD_TPU_NAME-}
ZONE=${OPSD_TPU_ZONE-}
PROJECT=${OPSD_GCP_PROJECT-}
ACCELERATOR_TYPE=v5litepod-16
RUNTIME_VERSION=""
CAPACITY=()
TIMEOUT=3600
POLL=30
WAIT=1
CREATE=1
EXTRA=()

split_flag_values "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while (($#)); do
  case $1 in
    --name) need_value "$1" $# "${2-}"; NAME=$2; shift 2 ;;
    --zone) need_value "$1" $# "${2-}"; ZONE=$2; shift 2 ;;
    --project) need_value "$1" $# "${2-}"; PROJECT=$2; shift 2 ;;
    --accelerator-type) need_value "$1" $# "${2-}"; ACCELERATOR_TYPE=$2; shift 2 ;;
    --runtime-version) need_value "$1" $# "${2-}"; RUNTIME_VERSION=$2; shift 2 ;;
    --spot) CAPACITY=(--spot); shift ;;
    --reserved) CAPACITY=(--reserved); shift ;;
    --timeout) need_value "$1" $# "${2-}"; TIMEOUT=$2; shift 2 ;;
    --poll) need_value "$1" $# "${2-}"; POLL=$2; shift 2 ;;
    --no-wait) WAIT=0; shift ;;
    --wait-only) CREATE=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

require --name "$NAME" OPSD_TPU_NAME
require --zone "$ZONE" OPSD_TPU_ZONE
check_name --name "$NAME"
check_accelerator_type "$ACCELERATOR_TYPE"
require_uint --timeout "$TIMEOUT"
require_uint --poll "$POLL"
if [[ -z $RUNTIME_VERSION ]]; then
  RUNTIME_VERSION=$(default_runtime_version "$ACCELERATOR_TYPE") ||
    die "--runtime-version: no default for $ACCELERATOR_TYPE; pass one"
fi
((CREATE || WAIT)) || die "--no-wait and --wait-only together do nothing"
require_gcloud
set_scope "$ZONE" "$PROJECT"

if ((CREATE)); then
  note "$ACCELERATOR_TYPE: $(devices_for_type "$ACCELERATOR_TYPE") JAX devices once ACTIVE"
  run gcloud compute tpus queued-resources create "$NAME" \
    "--node-id=$NAME" \
    "--accelerator-type=$ACCELERATOR_TYPE" \
    "--runtime-version=$RUNTIME_VERSION" \
    "${GCLOUD_SCOPE[@]}" \
    "${CAPACITY[@]+"${CAPACITY[@]}"}" \
    "${EXTRA[@]+"${EXTRA[@]}"}"
fi
((WAIT)) || exit 0

describe=(gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_SCOPE[@]}" "--format=value(state.state)")
if ((DRY_RUN)); then
  note "then, every ${POLL}s for at most ${TIMEOUT}s, until it prints ACTIVE:"
  run "${describe[@]}"
  exit 0
fi

deadline=$((SECONDS + TIMEOUT))
while :; do
  state=$("${describe[@]}") || state="unknown (describe failed)"
  case $state in
    ACTIVE)
      info "queued resource $NAME is ACTIVE; next: setup.sh --name $NAME --zone $ZONE"
      exit 0
      ;;
    FAILED | SUSPENDING | SUSPENDED | DELETING)
      die "queued resource $NAME is $state; details: gcloud compute tpus queued-resources describe $NAME --zone=$ZONE"
      ;;
  esac
  if ((SECONDS >= deadline)); then
    die "queued resource $NAME is still ${state:-unknown} after ${TIMEOUT}s; it stays queued:" \
      "wait again with --wait-only, or delete it with stop.sh --delete"
  fi
  info "state ${state:-unknown}; next check in ${POLL}s"
  sleep "$POLL"
done
