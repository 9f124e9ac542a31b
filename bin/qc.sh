#!/usr/bin/env bash
# QC report of sacrum masks: for each derivatives folder given (<dataset>/derivatives/labels), one PNG per
# mask and an index.html + qc.json in <dataset>/derivatives/qc-sacrum/ (sacrum-masks qc).
#   usage: bin/qc.sh DERIV_DIR... [-- extra options for sacrum-masks qc, e.g. --force]
# Exit status: non-zero when any folder failed (each is still tried).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"

err() { echo "qc: $*" >&2; }

main() {
  local -a dirs=() opts=()
  while (($#)); do
    if [[ "$1" == "--" ]]; then shift; opts=("$@"); break; fi
    dirs+=("$1"); shift
  done
  if ((${#dirs[@]} == 0)); then
    err "no derivatives folder given (usage: bin/qc.sh <dataset>/derivatives/labels... ; make qc DERIV=...)"
    exit 2
  fi
  local dir rc=0
  for dir in "${dirs[@]}"; do
    sacrum-masks qc "${opts[@]}" -- "${dir}" || { rc=$?; err "failed for ${dir} (status ${rc})"; }
  done
  exit "${rc}"
}

main "$@"
