#!/usr/bin/env bash
# make slurm-train: stage 3 on a SLURM cluster, as three jobs of bin/train.sh (TRAIN_STAGE=...):
#   prepare  plan, preprocess, splits_final.json (one job, CPU only)
#   folds    an array, one task per fold, GPUS GPUs each (task id = fold number; 5 = fold "all"),
#            afterok:prepare (a failed prepare cancels the folds: DependencyParameters=kill_invalid_depend)
#   finish   afterany:folds: names every fold that did not complete and stops (exit 1); else evaluates
#            FOLDS on the test split (as stage 4 runs them) and exports the model zip
# The same variables as bin/train.sh (DNUM, CONFIG, TRAINER, CONFIGURATION, FORCE) reach every job.
set -euo pipefail

usage() {
  cat <<EOF
Usage: $(basename "$0") [options]

Options (environment variable, default):
  --folds "F ..."     folds, one array task each: 0..4 or all (FOLDS, "0 1 2 3 4")
  --partition P       (PARTITION, the cluster's default)
  --account A         (ACCOUNT, none)
  --time T            time limit per job (TIME, 24:00:00)
  --gpus G            GPUs per fold task and for finish, 0 = CPU (GPUS, 1)
  --cpus C            CPUs per task (CPUS, 4)
  --run-dir DIR       logs (SLURM_RUN_DIR, \$SACRUM_DATA/slurm/train-<date>)
  --wait              wait for the finish job; exit with its status (0 only when it COMPLETED)
  -h, --help          this help
bin/train.sh's variables pass through: DNUM, CONFIG, TRAINER, CONFIGURATION, FORCE.
EOF
}

main() {
  local root
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  # shellcheck source=../env.sh
  source "${root}/env.sh"
  # shellcheck source=slurm_lib.sh
  source "${root}/bin/slurm_lib.sh"
  local folds="${FOLDS:-0 1 2 3 4}" run_dir="${SLURM_RUN_DIR:-}" wait=0
  TIME="${TIME:-24:00:00}"
  while (( $# > 0 )); do
    case "$1" in
      -h|--help) usage; return 0 ;;
      --wait) wait=1; shift ;;
      --folds|--partition|--account|--time|--gpus|--cpus|--run-dir)
        if (( $# < 2 )); then err "$1 needs a value (see --help)"; return 2; fi
        case "$1" in
          --folds) folds="$2" ;;
          --run-dir) run_dir="$2" ;;
          *) slurm_option "$1" "$2" ;;
        esac
        shift 2 ;;
      *) err "unknown option $1 (see --help)"; return 2 ;;
    esac
  done
  local -a ids=()
  local f
  for f in ${folds//,/ }; do
    case "${f}" in
      [0-4]) ids+=("${f}") ;;
      all) ids+=(5) ;;
      *) err "FOLDS=${folds}: expected folds 0..4 or all"; return 2 ;;
    esac
  done
  if (( ${#ids[@]} == 0 )); then err "FOLDS is empty"; return 2; fi
  slurm_check
  local -a common gpu
  slurm_common_args common
  slurm_gpu_args gpu
  local device=0
  (( ${GPUS:-1} > 0 )) || device=cpu
  run_dir="${run_dir:-${SACRUM_DATA}/slurm/train-$(date +%Y%m%d-%H%M%S)}"
  mkdir -p "${run_dir}/logs"
  run_dir="$(cd "${run_dir}" && pwd)"
  local list fold_list cd_root
  list="$(IFS=,; echo "${ids[*]}")"
  fold_list="${folds//,/ }"
  cd_root="cd $(quote "${root}")"

  local prepare array finish fold_task finish_task
  prepare="$(slurm_submit "${cd_root} && TRAIN_STAGE=prepare GPU=cpu exec bash bin/train.sh" \
               "${common[@]}" --job-name sacrum-train-prepare --output "${run_dir}/logs/prepare.log")"
  # task id = fold (5 = all); GPU=0: the first GPU of the task's allocation (CUDA_VISIBLE_DEVICES is SLURM's)
  fold_task="${cd_root} && F=\${SLURM_ARRAY_TASK_ID} && if [[ \${F} == 5 ]]; then F=all; fi"
  fold_task+=" && TRAIN_STAGE=fold FOLD=\${F} GPU=${device} exec bash bin/train.sh"
  array="$(slurm_submit "${fold_task}" "${common[@]}" "${gpu[@]}" --job-name sacrum-train-fold --array "${list}" \
             --dependency "afterok:${prepare}" --output "${run_dir}/logs/fold-%a.log")"
  # a fold that did not complete: named, and nothing is evaluated or exported
  finish_task="${cd_root} && source env.sh && sacrum-masks slurm-check-array ${array} --expect ${list}"
  finish_task+=" --name 'fold {}' --log $(quote "${run_dir}")/logs/fold-{}.log"
  finish_task+=" && TRAIN_STAGE=finish FOLD=$(quote "${fold_list}") GPU=${device} exec bash bin/train.sh"
  finish="$(slurm_submit "${finish_task}" "${common[@]}" "${gpu[@]}" --job-name sacrum-train-finish \
              --dependency "afterany:${array}" --output "${run_dir}/logs/finish.log")"
  echo "slurm_train: prepare job ${prepare}, folds array job ${array} (folds ${fold_list}), finish job ${finish}"
  echo "  follow: squeue -j ${prepare},${array},${finish}     logs: ${run_dir}/logs/ (finish.log names a failed fold)"
  if (( wait )); then
    local rc=0
    slurm_wait "${finish}" || rc=1
    tail -n 5 "${run_dir}/logs/finish.log" 2>/dev/null || true
    return "${rc}"
  fi
}

main "$@"
