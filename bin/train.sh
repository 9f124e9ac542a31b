#!/usr/bin/env bash
# Stage 3: plan, preprocess, write the cross-validation splits, train, evaluate on the test split and export
# an nnU-Net v2 model (sacrum-masks train; the logic is in py/sacrum_masks/train.py).
# Usage: make train [DNUM=300] [GPU=0|0,1|cpu|cpu,cpu] [FOLD=0|"0 1 2 3 4"|all] [CONFIG=split.json]
#                   [TRAINER=nnUNetTrainer] [CONFIGURATION=3d_fullres|3d_fullres_small] [FORCE=1]
#                   [TRAIN_STAGE=all|prepare|fold|finish]
#   DNUM           dataset number; $nnUNet_raw/Dataset<DNUM>_* is built from CONFIG (stage 2) when absent
#   GPU            CUDA device id (checked before any work; no fall-back to the CPU) or cpu (slow); a list
#                  (GPU=0,1, or GPU=cpu,cpu) runs the folds of FOLD side by side, one per entry at a time
#   FOLD           as nnU-Net: 0..4 one fold of splits_final.json; a list "0 1 2 3 4" each of them (and the
#                  evaluation is the ensemble of the list, as stage 4 runs it); all = nnU-Net's fold_all,
#                  trained on every training case
#   CONFIG         split config (sacrum-masks init-config) for bin/dataset.sh when the raw dataset is absent
#   TRAINER        nnU-Net trainer class; nnUNetTrainer_SacrumCPU (this package) is the few-minute CPU one
#   CONFIGURATION  nnU-Net configuration; 3d_fullres_small (sacrum-masks add-plans) reuses 3d_fullres's data
#   FORCE          1 re-plans, re-preprocesses, rewrites splits_final.json and retrains from scratch
#   TRAIN_STAGE    one stage only (stable interface, used by bin/slurm_train.sh), same variables otherwise:
#     prepare  plan and preprocess (unless up to date), add 3d_fullres_small, write splits_final.json
#              (fold 0 = the config's TRAINING/VALIDATION, folds 1-4 grouped by person); under the dataset
#              lock $nnUNet_results/.Dataset<DNUM>.train.lock, exclusive when something must change
#     fold     train each fold of FOLD under its own lock ($nnUNet_results/.Dataset<DNUM>.<model>.fold_<F>.lock;
#              the dataset lock shared), then check that nnU-Net validated exactly splits_final.json's fold;
#              exit 1 naming the folds that failed (the others still finish), 75 when the fold is busy
#     finish   once every fold of FOLD has checkpoint_final and checkpoint_best: evaluate FOLD (one fold or
#              the ensemble) on the config's TESTING images as stage 4 segments them, and export the zip
#     all      prepare, fold, finish (the default)
# Two folds on two GPUs from two shells: `make train FOLD=0 GPU=0` and `make train FOLD=1 GPU=1`; or in one:
# `make train GPU=0,1 FOLD="0 1 2 3 4"` (logs in M/train_fold_<F>.log).
# Re-running does only what is missing: planning is skipped while the raw dataset's fingerprint is unchanged,
# a finished fold (checkpoint_final.pth) is kept, an interrupted one resumes from checkpoint_latest.pth (--c).
# A splits_final.json that differs from the config and was not written by this tool (edited by hand) is kept.
# nnUNet_def_n_proc and nnUNet_n_proc_DA default to the CPU count divided by the folds running side by side.
# Ctrl-C / SIGTERM stops the running nnU-Net commands with all their workers and exits 130 / 143.
# Outputs (model folder M = $nnUNet_results/Dataset<DNUM>_<name>/<TRAINER>__nnUNetPlans__<CONFIGURATION>):
#   $nnUNet_preprocessed/Dataset<DNUM>_<name>/splits_final.json,
#   M/fold_<F>/checkpoint_{final,best}.pth, M/evaluation_fold<F>[-<F>...].csv (+ .txt summary naming the
#   settings, + the masks in M/evaluation_fold<F>.../), and
#   $nnUNet_results/Dataset<DNUM>_<name>__<TRAINER>__nnUNetPlans__<CONFIGURATION>.zip (every finished fold,
#   checkpoint_final and checkpoint_best, plans, dataset.json, dataset_fingerprint.json).
set -euo pipefail

# shellcheck source=../env.sh
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"

main() {
  local -a args=(train --dnum "${DNUM:-300}" --gpu "${GPU:-0}" --fold "${FOLD:-0}"
                 --trainer "${TRAINER:-nnUNetTrainer}" --configuration "${CONFIGURATION:-3d_fullres}"
                 --stage "${TRAIN_STAGE:-all}")
  if [[ -n "${CONFIG:-}" ]]; then args+=(--config "${CONFIG}"); fi
  if [[ "${FORCE:-0}" == "1" ]]; then args+=(--force); fi
  exec sacrum-masks "${args[@]}"
}

main "$@"
