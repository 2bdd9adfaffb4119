#!/usr/bin/env bash
# Installs the project on every worker of a TPU slice and checks that JAX sees the whole slice.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE [options]

On every worker (gcloud compute tpus tpu-vm ssh NAME --worker=all): puts the project in REMOTE_DIR,
creates REMOTE_DIR/.venv and runs pip install -e '.[tpu]' there, optionally copies checkpoints and data
from Cloud Storage to the worker's disk, then checks jax.device_count() on all workers together.

Required:
  --name NAME              TPU node name (or set OPSD_TPU_NAME)
  --zone ZONE              its zone (or set OPSD_TPU_ZONE)
Options:
  --project PROJECT        Google Cloud project (default: gcloud's; or OPSD_GCP_PROJECT)
  --source tarball|git     tarball (default): pack this checkout (no .git, .venv, caches) and scp it;
                           git: clone --repo-url on each worker and check out --ref
  --repo-url URL           git URL (with --source git)
  --ref REF                branch, tag or commit (with --source git; default main)
  --remote-dir DIR         where the project lives on the workers (default opsd-jax, under the home)
  --extra EXTRA            pip extra to install (default tpu; 'cuda' or '' for other machines)
  --stage SRC=DST          copy gs://SRC to the local DST on every worker (gcloud storage rsync);
                           repeatable; e.g. the checkpoint and the TFDS data directory
  --accelerator-type TYPE  the slice's type: the check then requires its device count
                           (v5litepod-16: 16, v5p-64: 32, v4-32: 16)
  --worker W               workers to install on: all (default) or e.g. 0,2
  --skip-check             do not run the device check
  --dry-run                print the commands instead of running them (needs no gcloud)
  -h, --help               this help

Example:
  $PROG --name opsd-v5e --zone us-west4-a --accelerator-type v5litepod-16 \\
    --stage gs://YOUR_BUCKET/checkpoints/Qwen2.5-Omni-3B=/data/checkpoints/Qwen2.5-Omni-3B
EOF
}

NAME=${OPSD_TPU_NAME-}
ZONE=${OPSD_TPU_ZONE-}
PROJECT=${OPSD_GCP_PROJECT-}
SOURCE=tarball
REPO_URL=""
REF=main
REMOTE_DIR=opsd-jax
EXTRA_NAME=tpu
STAGES=()
ACCELERATOR_TYPE=""
WORKER=all
CHECK=1

split_flag_values "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while (($#)); do
  case $1 in
    --name) need_value "$1" $# "${2-}"; NAME=$2; shift 2 ;;
    --zone) need_value "$1" $# "${2-}"; ZONE=$2; shift 2 ;;
    --project) need_value "$1" $# "${2-}"; PROJECT=$2; shift 2 ;;
    --source) need_value "$1" $# "${2-}"; SOURCE=$2; shift 2 ;;
    --repo-url) need_value "$1" $# "${2-}"; REPO_URL=$2; shift 2 ;;
    --ref) need_value "$1" $# "${2-}"; REF=$2; shift 2 ;;
    --remote-dir) need_value "$1" $# "${2-}"; REMOTE_DIR=$2; shift 2 ;;
    --extra) (($# >= 2)) || die "--extra needs a value (see --help)"; EXTRA_NAME=$2; shift 2 ;;
    --stage) need_value "$1" $# "${2-}"; STAGES+=("$2"); shift 2 ;;
    --accelerator-type) need_value "$1" $# "${2-}"; ACCELERATOR_TYPE=$2; shift 2 ;;
    --worker) need_value "$1" $# "${2-}"; WORKER=$2; shift 2 ;;
    --skip-check) CHECK=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

require --name "$NAME" OPSD_TPU_NAME
require --zone "$ZONE" OPSD_TPU_ZONE
check_name --name "$NAME"
case $SOURCE in
  tarball) ;;
  git) require --repo-url "$REPO_URL" ;;
  *) die "--source: expected tarball or git, got '$SOURCE'" ;;
esac
check_path --remote-dir "$REMOTE_DIR"
[[ $WORKER =~ ^(all|[0-9]+([,-][0-9]+)*)$ ]] || die "--worker: expected all or indices like 0,2 or 0-3, got '$WORKER'"
[[ $EXTRA_NAME =~ ^[a-z0-9_-]*$ ]] || die "--extra: expected a pip extra name such as tpu, got '$EXTRA_NAME'"
EXPECTED_DEVICES=0
if [[ -n $ACCELERATOR_TYPE ]]; then
  check_accelerator_type "$ACCELERATOR_TYPE"
  EXPECTED_DEVICES=$(devices_for_type "$ACCELERATOR_TYPE")
fi
for stage in "${STAGES[@]+"${STAGES[@]}"}"; do
  [[ $stage == gs://*=?* ]] || die "--stage: expected gs://BUCKET/PATH=LOCAL_DIR, got '$stage'"
done
require_gcloud
set_scope "$ZONE" "$PROJECT"

dir=$(remote_path "$REMOTE_DIR")
ssh=(gcloud compute tpus tpu-vm ssh "$NAME" "--worker=$WORKER" "${GCLOUD_SCOPE[@]}")

# 1. The source on each worker.
if [[ $SOURCE == tarball ]]; then
  tarball="${TMPDIR:-/tmp}/opsd-jax-src-$NAME.tar.gz"
  note "pack this checkout ($REPO_ROOT) without version control, virtual environments or caches"
  run tar -czf "$tarball" --exclude=.git --exclude=.venv --exclude=__pycache__ --exclude=.pytest_cache \
    --exclude='*.egg-info' --exclude=./runs -C "$REPO_ROOT" .
  run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:opsd-jax-src.tar.gz" "--worker=$WORKER" "${GCLOUD_SCOPE[@]}"
  fetch="mkdir -p $dir && tar -xzf \"\$HOME\"/opsd-jax-src.tar.gz -C $dir && rm -f \"\$HOME\"/opsd-jax-src.tar.gz"
else
  url=$(shell_quote "$REPO_URL")
  ref=$(shell_quote "$REF")
  fetch="{ [ -d $dir/.git ] || git clone -q $url $dir; }"
  fetch+=" && git -C $dir fetch -q origin $ref && git -C $dir checkout -q --force FETCH_HEAD"
fi

# 2. A virtual environment with the project; python3-venv is installed only where the image lacks it.
extra=""
[[ -z $EXTRA_NAME ]] || extra="[$EXTRA_NAME]"
venv="python3 -m venv $dir/.venv 2>/dev/null"
venv+=" || { sudo apt-get -qq update && sudo apt-get -qq install -y python3-venv && python3 -m venv $dir/.venv; }"
install="cd $dir && .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e $(shell_quote ".$extra")"
note "on worker(s) $WORKER: fetch the source, create the venv, pip install -e '.$extra'"
run "${ssh[@]}" "--command=set -e; $fetch; $venv; $install; echo \"\$(hostname): installed in $REMOTE_DIR\""

# 3. Checkpoints and data onto each worker's disk (the configs point at these local paths).
for stage in "${STAGES[@]+"${STAGES[@]}"}"; do
  src=$(shell_quote "${stage%%=*}")
  dst=$(remote_path "${stage#*=}")
  make_dir="mkdir -p $dst 2>/dev/null || { sudo mkdir -p $dst && sudo chown \"\$(id -u):\$(id -g)\" $dst; }"
  run "${ssh[@]}" "--command=set -e; $make_dir; gcloud storage rsync --recursive $src $dst"
done

# 4. All workers at once: jax.distributed.initialize() needs every process of the slice.
if ((CHECK)); then
  check="import jax; jax.distributed.initialize(); n = jax.device_count(); expected = $EXPECTED_DEVICES; "
  check+="print(f'process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local of {n} "
  check+="{jax.devices()[0].device_kind} devices'); assert expected in (0, n), f'expected {expected} devices, JAX sees {n}'"
  note "all workers together: JAX must see the whole slice" \
    "${ACCELERATOR_TYPE:+($EXPECTED_DEVICES devices for $ACCELERATOR_TYPE)}"
  run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${GCLOUD_SCOPE[@]}" \
    "--command=cd $dir && .venv/bin/python -c \"$check\""
fi
