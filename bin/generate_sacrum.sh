#!/usr/bin/env bash
# Stage 4: sacrum masks for MRI images with the trained nnU-Net model, written as BIDS derivatives:
#   <dataset>/derivatives/labels/sub-*/[ses-*/]anat/<image>_label-sacrum_seg.nii.gz + .json
# The model is loaded once for the whole list; a missing model is installed from MODEL_ZIP first.
# Safe from cron: one lock per output dataset (a second run exits 0), only missing or out-of-date masks
# are written, masks not written by this tool (manual corrections) are never overwritten.
# Every setting has a default, an environment variable and an option (see --help); nothing is
# configured by editing this file.
set -euo pipefail

err() { echo "generate_sacrum: $*" >&2; }

usage() {
  cat <<EOF
Usage: $(basename "$0") [options]

Sacrum masks for the images of a test config and/or whole BIDS datasets.

Options (environment variable, default):
  --config FILE          test config: DATASETS_PATH + TESTING (SACRUM_CONFIG,
                         ${default_config}; used when no --bids is given)
  --datasets-path DIR    override the config's DATASETS_PATH (DATASETS_PATH)
  --bids DIR             every MRI image of a BIDS dataset (repeatable)
  --model DIR            nnU-Net model folder (SACRUM_MODEL, the one \`make train\` writes:
                         \$nnUNet_results/Dataset<DNUM>_<DNAME>/<TRAINER>__nnUNetPlans__<CONFIGURATION>
                         from DNUM (300), DNAME (SacrumDataset), TRAINER (nnUNetTrainer) and
                         CONFIGURATION (3d_fullres); now ${default_model})
  --model-zip PATH|URL   installs the model when it is missing (MODEL_ZIP, the original release:
                         ${default_zip})
  --fold F               fold 0-4, a list "0 1 2 3 4" (one ensemble: outputs averaged as
                         nnUNetv2_predict -f does) or all (nnU-Net's fold_all) (FOLD, 0)
  --checkpoint NAME      best or final (CHECKPOINT, best)
  --gpu ID|cpu           CUDA device id or cpu (GPU, 0); when CUDA_VISIBLE_DEVICES is already
                         set (a SLURM allocation) it is kept and ID is an index into it
                         (0 = the first allocated GPU)
  --tile-step X          sliding-window step, fraction of the patch (TILE_STEP, 0.5)
  --mirroring            test-time mirroring, slower (MIRRORING=1; default off)
  --shard I/N            only shard I of N of the sorted image list (SHARD, 1/1)
  --force                rewrite our masks even when up to date (FORCE=1); manual masks are always kept
  --wait                 wait for another run on the same dataset instead of exiting (WAIT=1)
  --lock-dir DIR         lock files in DIR, a local flock-capable folder, for outputs on a file
                         system without flock (SACRUM_LOCK_DIR; then only runs on this node
                         exclude each other)
  --report FILE.json     every image's status and the counts, as JSON (SACRUM_REPORT)
  -h, --help             this help

Exit status: 0 when nothing failed (also when another run holds a lock), 1 when an image failed,
2 for a usage error or a model that cannot be installed.
Crontab example (every night at 2:00, GPU 0):
  0 2 * * * /path/to/sacrum-masks/bin/generate_sacrum.sh --bids /data/new-dataset >> /var/log/sacrum.log 2>&1
EOF
}

is_true() { [[ "${1,,}" =~ ^(1|true|yes|on)$ ]]; }

main() {
  local root
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  # shellcheck source=../env.sh
  source "${root}/env.sh"

  local default_config="${root}/resources/configs/test_sacrum.json"
  local default_zip="https://github.com/neuropoly/totalspineseg/releases/download/sacrum-seg/Dataset300_SacrumDataset.zip"
  # the model `make train` wrote for the same DNUM / DNAME / TRAINER / CONFIGURATION
  local default_model="${nnUNet_results}/Dataset${DNUM:-300}_${DNAME:-SacrumDataset}/${TRAINER:-nnUNetTrainer}__nnUNetPlans__${CONFIGURATION:-3d_fullres}"
  local config="${SACRUM_CONFIG:-}" datasets_path="${DATASETS_PATH:-}"
  local model="${SACRUM_MODEL:-${default_model}}" model_zip="${MODEL_ZIP:-${default_zip}}"
  local fold="${FOLD:-0}" checkpoint="${CHECKPOINT:-best}" gpu="${GPU:-0}"
  local tile_step="${TILE_STEP:-0.5}" shard="${SHARD:-1/1}"
  local mirroring=0 force=0 wait=0
  is_true "${MIRRORING:-0}" && mirroring=1
  is_true "${FORCE:-0}" && force=1
  is_true "${WAIT:-0}" && wait=1
  local -a bids=()

  while (( $# > 0 )); do
    case "$1" in
      -h|--help) usage; return 0 ;;
      --config|--datasets-path|--bids|--model|--model-zip|--fold|--checkpoint|--gpu|--tile-step|--shard|--lock-dir|--report)
        if (( $# < 2 )); then err "$1 needs a value (see --help)"; return 2; fi
        case "$1" in
          --config) config="$2" ;;
          --datasets-path) datasets_path="$2" ;;
          --bids) bids+=("$2") ;;
          --model) model="$2" ;;
          --model-zip) model_zip="$2" ;;
          --fold) fold="$2" ;;
          --checkpoint) checkpoint="$2" ;;
          --gpu) gpu="$2" ;;
          --tile-step) tile_step="$2" ;;
          --shard) shard="$2" ;;
          --lock-dir) export SACRUM_LOCK_DIR="$2" ;;
          --report) export SACRUM_REPORT="$2" ;;
        esac
        shift 2 ;;
      --mirroring) mirroring=1; shift ;;
      --no-mirroring) mirroring=0; shift ;;
      --force) force=1; shift ;;
      --wait) wait=1; shift ;;
      *) err "unknown option $1 (see --help)"; return 2 ;;
    esac
  done
  if [[ -z "${config}" && ${#bids[@]} -eq 0 ]]; then
    config="${default_config}"
  fi
  if [[ -n "${config}" && ! -f "${config}" ]]; then
    err "--config ${config}: no such file"
    return 2
  fi
  case "${checkpoint}" in
    best|final) ;;
    *) err "--checkpoint ${checkpoint}: expected best or final"; return 2 ;;
  esac

  # torch device: cpu; cuda when CUDA_VISIBLE_DEVICES is unset (then set to GPU here); cuda:<GPU>
  # when it is already set (a SLURM allocation, kept as it is: GPU indexes it)
  local device
  device="$(sacrum-masks check-device --torch-device "${gpu}")" || return 2
  if [[ "${device}" == "cuda" ]]; then
    export CUDA_VISIBLE_DEVICES="${gpu}"
  fi

  if [[ ! -d "${model}" ]]; then
    sacrum-masks install-model --model "${model}" --model-zip "${model_zip}" || return 2
  fi

  local -a args=(--model "${model}" --fold "${fold}" --checkpoint "${checkpoint}" --device "${device}"
                 --tile-step "${tile_step}" --shard "${shard}")
  [[ -n "${config}" ]] && args+=(--config "${config}")
  [[ -n "${datasets_path}" ]] && args+=(--datasets-path "${datasets_path}")
  local d
  for d in "${bids[@]}"; do args+=(--bids "${d}"); done
  if (( mirroring )); then args+=(--mirroring); else args+=(--no-mirroring); fi
  (( force )) && args+=(--force)
  (( wait )) && args+=(--wait)

  echo "generate_sacrum: model ${model} fold ${fold} checkpoint ${checkpoint} device ${device}"
  # exec: signals (SIGTERM from cron, SLURM or a user) reach the predict process itself; nothing runs after
  exec sacrum-masks predict "${args[@]}"
}

main "$@"
