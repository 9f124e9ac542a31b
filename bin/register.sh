#!/usr/bin/env bash
# Stage 1: sacrum labels (CT or MRI) onto every MRI image's grid, for one or more BIDS datasets.
# Called by `make register DATASET="dir ..."`; runs `sacrum-masks register-ct` on each dataset, goes on
# when one fails, and exits non-zero at the end if any failed.
#   SACRUM_IDX  space-separated sacrum label values (each becomes --sacrum-idx N); default: the label
#               sidecar's SacrumIndices, else 92
#   TOTALSEG    v1 (92) or v2 (25 and 26)
#   BACKEND     native (default) or sct (needs sct_register_multimodal on PATH)
#   FORCE       1 to redo outputs that are up to date
set -euo pipefail

# shellcheck source=../env.sh
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"

err() { echo "register: $*" >&2; }

main() {
  if (( $# == 0 )); then
    err 'no dataset given; run make register DATASET="path ..."'
    exit 2
  fi
  local -a opts=()
  local idx
  local -a indices=()
  read -r -a indices <<< "${SACRUM_IDX:-}"
  for idx in "${indices[@]}"; do
    if [[ ! "${idx}" =~ ^[0-9]+$ ]]; then
      err "SACRUM_IDX must be integers separated by spaces, not '${SACRUM_IDX}'"
      exit 2
    fi
    opts+=(--sacrum-idx "${idx}")
  done
  if [[ -n "${TOTALSEG:-}" ]]; then
    if [[ "${TOTALSEG}" != v1 && "${TOTALSEG}" != v2 ]]; then
      err "TOTALSEG must be v1 or v2, not '${TOTALSEG}'"
      exit 2
    fi
    opts+=(--totalseg "${TOTALSEG}")
  fi
  if [[ -n "${BACKEND:-}" ]]; then
    opts+=(--backend "${BACKEND}")
  fi
  if [[ "${FORCE:-0}" == 1 ]]; then
    opts+=(--force)
  fi

  local dataset
  local -i failed=0
  for dataset in "$@"; do
    if [[ ! -d "${dataset}" ]]; then
      err "${dataset}: not a folder"
      failed+=1
      continue
    fi
    if ! sacrum-masks register-ct "${opts[@]}" -- "${dataset}"; then
      failed+=1
    fi
  done
  if (( failed > 0 )); then
    err "${failed} of $# datasets failed"
    exit 1
  fi
}

main "$@"
