#!/usr/bin/env bash
# Stage 4: sacrum masks for MRI images with the trained nnU-Net model, written as BIDS derivatives:
#   <dataset>/derivatives/labels/sub-*/[ses-*/]anat/<image>_label-sacrum_seg.nii.gz + .json
# Sets the environment (env.sh: nnUNet_results, ...) and execs `sacrum-masks predict`, which declares
# every option, its environment variable (SACRUM_CONFIG, DATASETS_PATH, SACRUM_MODEL, MODEL_ZIP, FOLD,
# CHECKPOINT, GPU, TILE_STEP, MIRRORING, SHARD, FORCE, WAIT, SACRUM_WORKERS, SACRUM_PRESET, SACRUM_CONTRAST,
# SACRUM_OUTPUT_DIR, ...) and its default in one place (see --help); it installs a missing model from MODEL_ZIP and picks the device.
# exec: signals (SIGTERM from cron, SLURM or a user) reach the predict process itself.
set -euo pipefail

main() {
  local root
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  # shellcheck source=../env.sh
  source "${root}/env.sh"
  exec sacrum-masks predict "$@"
}

main "$@"
