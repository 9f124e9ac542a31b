#!/usr/bin/env bash
# QC report of sacrum masks (sacrum-masks qc): for each source given, plausibility checks with reasons, one
# picture per mask and a ranked review page (index.html, qc.json). A source is
#   <dataset>/derivatives/labels       stage 4's masks     -> <dataset>/derivatives/qc-sacrum/
#   <dataset>/derivatives/reg-labels   stage 1's labels    -> <dataset>/derivatives/qc-sacrum-reg-labels/
#   CONFIG.json                        a training config's masks -> <config stem>_qc/ beside it
#   usage: bin/qc.sh SOURCE... [-- extra options for sacrum-masks qc, e.g. --force]
# Exit status: non-zero when any source failed (each is still tried).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"

err() { echo "qc: $*" >&2; }

main() {
  local -a sources=() opts=()
  while (($#)); do
    if [[ "$1" == "--" ]]; then shift; opts=("$@"); break; fi
    sources+=("$1"); shift
  done
  if ((${#sources[@]} == 0)); then
    err "nothing given (usage: bin/qc.sh <dataset>/derivatives/labels... | split.json ; make qc DERIV=...)"
    exit 2
  fi
  local src rc=0
  for src in "${sources[@]}"; do
    if [[ "${src}" == *.json ]]; then
      sacrum-masks qc "${opts[@]}" --config "${src}" || { rc=$?; err "failed for ${src} (status ${rc})"; }
    else
      sacrum-masks qc "${opts[@]}" -- "${src}" || { rc=$?; err "failed for ${src} (status ${rc})"; }
    fi
  done
  exit "${rc}"
}

main "$@"
