#!/usr/bin/env bash
# shellcheck disable=SC2034
# (SC2034: the globals set here are read by the scripts that source this file.)
# Helpers shared by the tpu_scripts (sourced, never run): errors, flag parsing, quoting, dry-run, the
# gcloud flags every command takes, and what each TPU generation needs (runtime image, JAX device count).

PROG=$(basename "$0")
DRY_RUN=0
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$SCRIPT_DIR")

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

info() {
  printf '%s: %s\n' "$PROG" "$*" >&2
}

# One shell word as a POSIX shell reads it back: bare when it is plain, else single-quoted. Used for the
# dry-run listing (copy-pasteable) and to embed user values in the commands run on the workers.
shell_quote() {
  local word=$1 quote="'" escaped="'\\''"
  if [[ $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//"$quote"/"$escaped"}"
  fi
}

quote_words() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(shell_quote "$word")"
  done
  printf '%s' "$out"
}

# Runs a command, or with --dry-run prints it (one line, quoted) and runs nothing.
run() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(quote_words "$@")"
  else
    printf '+ %s\n' "$(quote_words "$@")" >&2
    "$@"
  fi
}

# A comment in the dry-run listing (what happens between the printed commands).
note() {
  if ((DRY_RUN)); then
    printf '# %s\n' "$*"
  else
    info "$*"
  fi
}

# Splits --flag=value into --flag value (up to a bare --) so that each parser handles one form; the result
# is in the global array ARGS.
split_flag_values() {
  ARGS=()
  while (($#)); do
    case $1 in
      --) ARGS+=("$@"); return ;;
      --*=*) ARGS+=("${1%%=*}" "${1#*=}") ;;
      *) ARGS+=("$1") ;;
    esac
    shift
  done
}

# need_value FLAG COUNT NEXT: fails unless FLAG is followed by a value (COUNT = the parser's $#).
need_value() {
  if (($2 < 2)) || [[ -z $3 || $3 == --* ]]; then
    die "$1 needs a value (see --help)"
  fi
}

# require FLAG VALUE [ENVVAR]: fails, naming the flag, when a required value is empty.
require() {
  if [[ -z $2 ]]; then
    if [[ -n ${3-} ]]; then
      die "$1 is required (or set $3; see --help)"
    fi
    die "$1 is required (see --help)"
  fi
}

require_uint() {
  [[ $2 =~ ^[0-9]+$ ]] || die "$1: expected a non-negative integer, got '$2'"
}

require_gcloud() {
  ((DRY_RUN)) && return 0
  command -v gcloud >/dev/null 2>&1 ||
    die "gcloud not found on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), or use --dry-run"
}

# The flags that place every gcloud call: --zone=... and, when given, --project=... (into GCLOUD_SCOPE).
set_scope() {
  GCLOUD_SCOPE=("--zone=$1")
  if [[ -n $2 ]]; then
    GCLOUD_SCOPE+=("--project=$2")
  fi
}

# The TPU VM image that carries a recent Python and the TPU driver for each generation.
default_runtime_version() {
  case $1 in
    v4-*) printf 'tpu-ubuntu2204-base' ;;
    v5litepod-*) printf 'v2-alpha-tpuv5-lite' ;;
    v5p-*) printf 'v2-alpha-tpuv5' ;;
    v6e-*) printf 'v2-alpha-tpuv6e' ;;
    *) return 1 ;;
  esac
}

# How many devices jax.device_count() reports on a slice. The number in v4-N and v5p-N counts TensorCores
# and JAX sees one device per chip (2 TensorCores in megacore mode), so N / 2; v5litepod-N and v6e-N
# count chips of one TensorCore each, so N.
devices_for_type() {
  local type=$1 count=${1##*-}
  [[ $count =~ ^[0-9]+$ ]] || return 1
  case $type in
    v4-* | v5p-*) printf '%d' $((count / 2)) ;;
    v5litepod-* | v6e-*) printf '%d' "$count" ;;
    *) return 1 ;;
  esac
}

check_accelerator_type() {
  [[ $1 =~ ^(v4|v5litepod|v5p|v6e)-[0-9]+$ ]] ||
    die "--accelerator-type: expected v4-N, v5litepod-N, v5p-N or v6e-N (e.g. v5litepod-16, v5p-64, v4-32), got '$1'"
}

# A path on a worker: absolute as given, relative to the worker's home directory otherwise. The result is
# a shell fragment for the worker's shell ("$HOME" expands there, not here).
remote_path() {
  # "$HOME" must expand on the worker, not here: hence the single quotes.
  # shellcheck disable=SC2016
  case $1 in
    /*) shell_quote "$1" ;;
    *) printf '"$HOME"/%s' "$(shell_quote "$1")" ;;
  esac
}

check_name() {
  [[ $2 =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "$1: expected lower-case letters, digits and hyphens, starting with a letter, got '$2'"
}

check_run_name() {
  [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] ||
    die "--run-name: expected letters, digits, '.', '_' and '-', got '$1'"
}

# Paths that end up inside the workers' shell commands: plain characters only (no spaces or quotes).
check_path() {
  [[ $2 =~ ^[A-Za-z0-9_./:@+-]+$ ]] || die "$1: expected a path of letters, digits and ./_:@+-, got '$2'"
}
