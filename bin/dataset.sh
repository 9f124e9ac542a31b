#!/usr/bin/env bash
# Stage 2: nnU-Net raw dataset from a split config (sacrum-masks convert).
# Usage: make dataset CONFIG=resources/configs/<split>.json [DNUM=300] [DNAME=SacrumDataset] [FORCE=1] [SKIP_INVALID=1]
#   CONFIG         split config of TYPE LABEL (sacrum-masks init-config); required
#   DNUM, DNAME    dataset number and name (default 300, SacrumDataset)
#   FORCE          1 rebuilds even an up-to-date dataset
#   SKIP_INVALID   1 leaves out invalid image/label pairs (listed in conversion_invalid.txt) instead of stopping
#   DATASETS_PATH  overrides the config's DATASETS_PATH
# Writes $nnUNet_raw/Dataset<DNUM>_<DNAME>/ (env.sh sets nnUNet_raw below SACRUM_DATA).
set -euo pipefail

# shellcheck source=../env.sh
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"

err() { echo "dataset: $*" >&2; }

main() {
  if [[ -z "${CONFIG:-}" ]]; then
    err "no CONFIG: make dataset CONFIG=resources/configs/<split>.json"
    exit 2
  fi
  local -a args=(convert --config "${CONFIG}" --path-out "${nnUNet_raw}"
                 -dnum "${DNUM:-300}" -dname "${DNAME:-SacrumDataset}")
  if [[ "${FORCE:-0}" == "1" ]]; then args+=(--force); fi
  if [[ "${SKIP_INVALID:-0}" == "1" ]]; then args+=(--skip-invalid); fi
  sacrum-masks "${args[@]}"
}

main "$@"
