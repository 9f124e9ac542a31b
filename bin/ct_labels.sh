#!/usr/bin/env bash
# Stage 0 (optional): TotalSegmentator sacrum labels (v2 order: sacrum 25, S1 26) for the CT images of
# each BIDS dataset given that have no derivatives/labels/.../<CT stem>_seg.nii.gz (sacrum-masks ct-labels).
# Needs `make setup CT=1` and the TotalSegmentator weights (TOTALSEG_HOME_DIR; see README).
#   usage: bin/ct_labels.sh DATASET... [-- extra options, e.g. --device cpu --fast --force]
#   FORCE=1 adds --force.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"

err() { echo "ct-labels: $*" >&2; }

main() {
  local -a dirs=() opts=()
  while (($#)); do
    if [[ "$1" == "--" ]]; then shift; opts=("$@"); break; fi
    dirs+=("$1"); shift
  done
  if ((${#dirs[@]} == 0)); then
    err "no BIDS dataset given (usage: bin/ct_labels.sh DATASET... ; make ct-labels DATASET=...)"
    exit 2
  fi
  if [[ "${FORCE:-0}" == "1" ]]; then opts+=(--force); fi
  sacrum-masks ct-labels "${opts[@]}" -- "${dirs[@]}"
}

main "$@"
