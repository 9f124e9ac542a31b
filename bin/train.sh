#!/usr/bin/env bash
# Stage 3: plan, preprocess, train, evaluate on imagesTs and export an nnU-Net v2 model.
# Usage: make train [DNUM=300] [GPU=0|cpu] [FOLD=0|N|all] [CONFIG=split.json] [TRAINER=nnUNetTrainer]
#                   [CONFIGURATION=3d_fullres|3d_fullres_small] [FORCE=1]
#   DNUM           dataset number; $nnUNet_raw/Dataset<DNUM>_* is built from CONFIG (stage 2) when absent
#   GPU            CUDA device id (checked before any work; no fall-back to the CPU) or cpu (slow)
#   FOLD           0..4, or all = folds 0 to 4 one after the other
#   TRAINER        nnU-Net trainer class; nnUNetTrainer_SacrumCPU (this package) is the few-minute CPU one
#   CONFIGURATION  nnU-Net configuration; 3d_fullres_small (sacrum-masks add-plans) reuses 3d_fullres's data
#   FORCE          1 re-plans, re-preprocesses and retrains from scratch
# Re-running does only what is missing: planning is skipped while the raw dataset's fingerprint is unchanged,
# a finished fold (checkpoint_final.pth) is kept, an interrupted one resumes from checkpoint_latest.pth (--c).
# Outputs (model folder M = $nnUNet_results/Dataset<DNUM>_<name>/<TRAINER>__nnUNetPlans__<CONFIGURATION>):
#   M/fold_<F>/checkpoint_final.pth, M/predictions_fold<F>_imagesTs/, M/evaluation_fold<F>.csv (+ .txt summary),
#   $nnUNet_results/Dataset<DNUM>_<name>__<TRAINER>__nnUNetPlans__<CONFIGURATION>.zip (all finished folds).
set -euo pipefail

# shellcheck source=../env.sh
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHILD=""  # process group of the running nnU-Net command (killed with it on SIGINT/SIGTERM)

err() { echo "train: $*" >&2; }
say() { echo "train: $*"; }

on_signal() {
  local sig="$1"
  trap - INT TERM
  if [[ -n "${CHILD}" ]]; then
    kill -TERM -- "-${CHILD}" 2>/dev/null || true
    sleep 2
    kill -KILL -- "-${CHILD}" 2>/dev/null || true
  fi
  err "interrupted by SIG${sig}; run the same command again to resume"
  if [[ "${sig}" == "INT" ]]; then exit 130; else exit 143; fi
}

# Run a command in its own process group (nnU-Net's worker processes included) and wait for it.
run() {
  local rc=0
  setsid "$@" &
  CHILD=$!
  wait "${CHILD}" || rc=$?
  CHILD=""
  return "${rc}"
}

# Fingerprint of a raw dataset: relative names, sizes and modification times of all its files.
raw_fingerprint() {
  (cd "$1" && find . -type f ! -name '.*' -printf '%P %s %T@\n' | LC_ALL=C sort | sha256sum | cut -d' ' -f1)
}

find_dataset() {  # $1 folder, $2 Dataset<DNUM>: prints the one matching folder name, or nothing
  local -a found=()
  [[ -d "$1" ]] && mapfile -t found < <(find "$1" -mindepth 1 -maxdepth 1 -type d -name "$2_*" -printf '%f\n' | LC_ALL=C sort)
  if (( ${#found[@]} > 1 )); then
    err "$1 has several datasets numbered $2 (${found[*]}); nnU-Net refuses to run: remove or renumber all but one"
    return 1
  fi
  echo "${found[0]:-}"
}

main() {
  local dnum="${DNUM:-300}" gpu="${GPU:-0}" fold_arg="${FOLD:-0}" trainer="${TRAINER:-nnUNetTrainer}"
  local configuration="${CONFIGURATION:-3d_fullres}" force="${FORCE:-0}"
  [[ "${dnum}" =~ ^[0-9]{1,3}$ ]] || { err "DNUM=${dnum}: expected a dataset number from 1 to 999"; exit 2; }
  local -a folds
  case "${fold_arg}" in
    all) folds=(0 1 2 3 4) ;;
    [0-9]) folds=("${fold_arg}") ;;
    *) err "FOLD=${fold_arg}: expected a fold number (0 to 4) or all"; exit 2 ;;
  esac
  local device
  device="$(sacrum-masks check-device "${gpu}")" || exit 1
  if [[ "${device}" == "cpu" && "${trainer}" == "nnUNetTrainer_SacrumCPU" ]]; then
    err "warning: training on the CPU (GPU=cpu): minutes with the small ${trainer} on small images, far longer on real ones"
  elif [[ "${device}" == "cpu" ]]; then
    err "warning: training ${trainer} on the CPU (GPU=cpu) is very slow (days for a full nnU-Net training); give a GPU id"
  fi
  local dprefix
  dprefix="Dataset$(printf '%03d' "$((10#${dnum}))")"
  trap 'on_signal INT' INT
  trap 'on_signal TERM' TERM

  # 1. raw dataset (stage 2 when absent and CONFIG is given)
  local dname
  dname="$(find_dataset "${nnUNet_raw}" "${dprefix}")" || exit 1
  if [[ -z "${dname}" ]]; then
    if [[ -z "${CONFIG:-}" ]]; then
      err "no ${dprefix}_* in ${nnUNet_raw}: give CONFIG=<split.json> to build it (stage 2), or run make dataset first"
      exit 1
    fi
    say "no ${dprefix}_* in ${nnUNet_raw}: building it from ${CONFIG} (stage 2)"
    run bash "${ROOT}/bin/dataset.sh"
    dname="$(find_dataset "${nnUNet_raw}" "${dprefix}")" || exit 1
    [[ -n "${dname}" ]] || { err "stage 2 did not create ${dprefix}_* in ${nnUNet_raw}"; exit 1; }
  fi
  local other
  for other in "${nnUNet_preprocessed}" "${nnUNet_results}"; do
    local there
    there="$(find_dataset "${other}" "${dprefix}")" || exit 1
    if [[ -n "${there}" && "${there}" != "${dname}" ]]; then
      err "${other}/${there} has the number of ${nnUNet_raw}/${dname}; nnU-Net refuses to run: remove or renumber one"
      exit 1
    fi
  done
  mkdir -p "${nnUNet_preprocessed}" "${nnUNet_results}"
  exec 9> "${nnUNet_results}/.${dprefix}.train.lock"
  flock -n 9 || { err "another training of ${dname} is running (lock ${nnUNet_results}/.${dprefix}.train.lock)"; exit 1; }

  # 2. plan and preprocess, unless the preprocessed data matches the raw dataset
  local pp_config="${configuration}" pp_dir="${nnUNet_preprocessed}/${dname}"
  [[ "${configuration}" == "3d_fullres_small" ]] && pp_config="3d_fullres"
  local fingerprint stamp="${pp_dir}/.sacrum-raw-fingerprint-${pp_config}"
  fingerprint="$(raw_fingerprint "${nnUNet_raw}/${dname}")"
  if [[ "${force}" != "1" && -f "${stamp}" && "$(cat "${stamp}")" == "${fingerprint}" && -f "${pp_dir}/nnUNetPlans.json" ]]; then
    say "up to date: plan and preprocess ${dname} ${pp_config}"
  else
    if [[ -f "${stamp}" && "$(cat "${stamp}")" != "${fingerprint}" && -f "${pp_dir}/splits_final.json" ]]; then
      say "${nnUNet_raw}/${dname} changed: its old cross-validation splits (splits_final.json) are removed"
      rm -f "${pp_dir}/splits_final.json"
    fi
    rm -f "${stamp}"
    say "plan and preprocess ${dname} ${pp_config}"
    # nnUNet_n_proc_DA=0 (augment in the main process) breaks planning: it is for training only
    run env -u nnUNet_n_proc_DA nnUNetv2_plan_and_preprocess -d "${dnum}" -c "${pp_config}" --verify_dataset_integrity
    echo "${fingerprint}" > "${stamp}"
  fi
  if [[ "${configuration}" == "3d_fullres_small" ]]; then
    sacrum-masks add-plans "${pp_dir}/nnUNetPlans.json" --name "${configuration}"
  fi

  # 3-5. train each fold, predict imagesTs and evaluate; then export
  local model="${nnUNet_results}/${dname}/${trainer}__nnUNetPlans__${configuration}" fold
  for fold in "${folds[@]}"; do
    train_fold "${dnum}" "${configuration}" "${fold}" "${trainer}" "${device}" "${gpu}" "${model}" "${fingerprint}" "${force}"
    evaluate_fold "${dname}" "${configuration}" "${fold}" "${trainer}" "${device}" "${gpu}" "${model}"
  done
  export_model "${dnum}" "${dname}" "${configuration}" "${trainer}" "${model}"
}

train_fold() {
  local dnum="$1" configuration="$2" fold="$3" trainer="$4" device="$5" gpu="$6" model="$7" fingerprint="$8" force="$9"
  local dir="${model}/fold_${fold}"
  local stamp="${dir}/.sacrum-raw-fingerprint" same=0
  [[ -f "${stamp}" && "$(cat "${stamp}")" == "${fingerprint}" && "${force}" != "1" ]] && same=1
  if [[ -f "${dir}/checkpoint_final.pth" && "${force}" != "1" ]] && { (( same )) || [[ ! -f "${stamp}" ]]; }; then
    say "up to date: fold ${fold} of ${model} (FORCE=1 retrains)"
    return 0
  fi
  local -a args=(nnUNetv2_train "${dnum}" "${configuration}" "${fold}" -tr "${trainer}" -device "${device}")
  if (( same )) && [[ -f "${dir}/checkpoint_latest.pth" ]]; then
    say "resuming fold ${fold} from ${dir}/checkpoint_latest.pth"
    args+=(--c)
  else
    say "training fold ${fold}: ${trainer} ${configuration} on ${device}"
    mkdir -p "${dir}"
    rm -f "${dir}"/checkpoint_*.pth "${model}/evaluation_fold${fold}.csv"
    echo "${fingerprint}" > "${stamp}"
  fi
  if [[ "${device}" == "cuda" ]]; then
    run env CUDA_VISIBLE_DEVICES="${gpu}" "${args[@]}"
  else
    run "${args[@]}"
  fi
  [[ -f "${dir}/checkpoint_final.pth" ]] || { err "nnUNetv2_train ended without ${dir}/checkpoint_final.pth"; exit 1; }
}

evaluate_fold() {
  local dname="$1" configuration="$2" fold="$3" trainer="$4" device="$5" gpu="$6" model="$7"
  local raw="${nnUNet_raw}/${dname}" chk="${model}/fold_${fold}/checkpoint_final.pth"
  local preds="${model}/predictions_fold${fold}_imagesTs" table="${model}/evaluation_fold${fold}.csv"
  if [[ ! -d "${raw}/imagesTs" ]] || [[ -z "$(ls -A "${raw}/imagesTs")" ]]; then
    say "no ${raw}/imagesTs: no test-split evaluation"
    return 0
  fi
  if [[ -f "${table}" && "${table}" -nt "${chk}" && -d "${preds}" ]]; then
    say "up to date: $(cat "${model}/evaluation_fold${fold}.txt" 2>/dev/null || echo "${table}")"
    return 0
  fi
  say "predicting ${raw}/imagesTs with fold ${fold}"
  rm -rf "${preds}.tmp" "${preds}"
  local -a args=(nnUNetv2_predict -i "${raw}/imagesTs" -o "${preds}.tmp" -d "${dname}" -c "${configuration}"
                 -tr "${trainer}" -f "${fold}" -chk checkpoint_final.pth -device "${device}")
  if [[ "${device}" == "cuda" ]]; then
    run env CUDA_VISIBLE_DEVICES="${gpu}" "${args[@]}"
  else
    run "${args[@]}"
  fi
  mv "${preds}.tmp" "${preds}"
  if [[ ! -d "${raw}/labelsTs" ]]; then
    say "no ${raw}/labelsTs: predictions in ${preds}, no evaluation table"
    return 0
  fi
  sacrum-masks evaluate --pred "${preds}" --truth "${raw}/labelsTs" -o "${table}" \
    --summary "${model}/evaluation_fold${fold}.txt"
}

export_model() {
  local dnum="$1" dname="$2" configuration="$3" trainer="$4" model="$5"
  local zip="${nnUNet_results}/${dname}__${trainer}__nnUNetPlans__${configuration}.zip"
  local -a done_folds=()
  local f newer=0
  for f in 0 1 2 3 4; do
    if [[ -f "${model}/fold_${f}/checkpoint_final.pth" ]]; then
      done_folds+=("${f}")
      [[ "${model}/fold_${f}/checkpoint_final.pth" -nt "${zip}" ]] && newer=1
    fi
  done
  (( ${#done_folds[@]} )) || return 0
  if [[ -f "${zip}" ]] && (( ! newer )); then
    say "up to date: model zip ${zip}"
    return 0
  fi
  rm -f "${zip}.tmp"
  run nnUNetv2_export_model_to_zip -d "${dnum}" -o "${zip}.tmp" -c "${configuration}" -tr "${trainer}" \
    -f "${done_folds[@]}"
  mv "${zip}.tmp" "${zip}"
  say "model zip (folds ${done_folds[*]}): ${zip}"
}

main "$@"
