#!/usr/bin/env bash
# Stage 3: plan, preprocess, train, evaluate on imagesTs and export an nnU-Net v2 model (sacrum-masks train;
# the logic is in py/sacrum_masks/train.py).
# Usage: make train [DNUM=300] [GPU=0|cpu] [FOLD=0|N|all] [CONFIG=split.json] [TRAINER=nnUNetTrainer]
#                   [CONFIGURATION=3d_fullres|3d_fullres_small] [FORCE=1]
#   DNUM           dataset number; $nnUNet_raw/Dataset<DNUM>_* is built from CONFIG (stage 2) when absent
#   GPU            CUDA device id (checked before any work; no fall-back to the CPU) or cpu (slow)
#   FOLD           0..4, or all = folds 0 to 4 one after the other
#   CONFIG         split config (sacrum-masks init-config) for bin/dataset.sh when the raw dataset is absent
#   TRAINER        nnU-Net trainer class; nnUNetTrainer_SacrumCPU (this package) is the few-minute CPU one
#   CONFIGURATION  nnU-Net configuration; 3d_fullres_small (sacrum-masks add-plans) reuses 3d_fullres's data
#   FORCE          1 re-plans, re-preprocesses and retrains from scratch
# Re-running does only what is missing: planning is skipped while the raw dataset's fingerprint is unchanged,
# a finished fold (checkpoint_final.pth) is kept, an interrupted one resumes from checkpoint_latest.pth (--c).
# Ctrl-C / SIGTERM stops the running nnU-Net command with all its workers and exits 130 / 143.
# Outputs (model folder M = $nnUNet_results/Dataset<DNUM>_<name>/<TRAINER>__nnUNetPlans__<CONFIGURATION>):
#   M/fold_<F>/checkpoint_final.pth, M/predictions_fold<F>_imagesTs/, M/evaluation_fold<F>.csv (+ .txt summary),
#   $nnUNet_results/Dataset<DNUM>_<name>__<TRAINER>__nnUNetPlans__<CONFIGURATION>.zip (all finished folds).
set -euo pipefail

# shellcheck source=../env.sh
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"

main() {
  local -a args=(train --dnum "${DNUM:-300}" --gpu "${GPU:-0}" --fold "${FOLD:-0}"
                 --trainer "${TRAINER:-nnUNetTrainer}" --configuration "${CONFIGURATION:-3d_fullres}")
  if [[ -n "${CONFIG:-}" ]]; then args+=(--config "${CONFIG}"); fi
  if [[ "${FORCE:-0}" == "1" ]]; then args+=(--force); fi
  exec sacrum-masks "${args[@]}"
}

main "$@"
