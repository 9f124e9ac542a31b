# shellcheck shell=bash
# sacrum-masks environment: the data root and the three nnU-Net folders below it.
# Sourced by every script in bin/. Only exports; values the user already exported win.
#
#   SACRUM_DATA          data root (default: data/ in this checkout; an existing TOTALSPINESEG_DATA is honoured)
#   nnUNet_raw           $SACRUM_DATA/nnUNet/raw
#   nnUNet_preprocessed  $SACRUM_DATA/nnUNet/preprocessed
#   nnUNet_results       $SACRUM_DATA/nnUNet/results
#   nnUNet_extTrainer    this package's trainer folder (the small CPU trainers), searched after nnU-Net's own

SACRUM_ROOT="${SACRUM_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}"
export SACRUM_ROOT
export SACRUM_DATA="${SACRUM_DATA:-${TOTALSPINESEG_DATA:-${SACRUM_ROOT}/data}}"
export nnUNet_raw="${nnUNet_raw:-${SACRUM_DATA}/nnUNet/raw}"
export nnUNet_preprocessed="${nnUNet_preprocessed:-${SACRUM_DATA}/nnUNet/preprocessed}"
export nnUNet_results="${nnUNet_results:-${SACRUM_DATA}/nnUNet/results}"
export nnUNet_extTrainer="${nnUNet_extTrainer:-${SACRUM_ROOT}/py/sacrum_masks/nnunet_trainers}"
export PATH="${SACRUM_ROOT}/.venv/bin:${PATH}"
