#!/usr/bin/env bash
# Stage 1: sacrum labels (CT or MRI) onto every MRI image's grid, for one or more BIDS datasets.
# Called by `make register DATASET="dir ..."`; execs `sacrum-masks register-ct`, which goes on when one
# dataset fails and exits 1 at the end if any failed. Its options read these variables (--help lists them):
#   SACRUM_IDX  sacrum label values separated by spaces; default: the label sidecar's SacrumIndices, else 92
#   TOTALSEG    v1 (92) or v2 (25 and 26)
#   BACKEND     native (default) or sct (needs sct_register_multimodal on PATH)
#   FORCE       1 to redo outputs that are up to date
set -euo pipefail

# shellcheck source=../env.sh
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"

exec sacrum-masks register-ct -- "$@"
