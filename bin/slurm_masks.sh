#!/usr/bin/env bash
# make slurm-masks: stage 4 on a SLURM cluster. Submits bin/generate_sacrum.sh as a job array of N shards
# (task I runs --shard I/N and writes RUN_DIR/reports/shard-I-of-N.json), then a summary job (afterany:
# it runs whatever the shards did) that runs QC and writes RUN_DIR/summary.txt: written, up to date, kept,
# failed per shard, the failed images by name; its exit status is 1 when a shard or an image failed.
# Submitting again does only what is missing (masks that are up to date are not redone).
set -euo pipefail

usage() {
  cat <<EOF
Usage: $(basename "$0") [options] [-- generate_sacrum.sh options]

Options (environment variable, default):
  --config FILE       test config (SACRUM_CONFIG; generate_sacrum.sh's default when no --bids)
  --bids DIR          every MRI image of a BIDS dataset (repeatable)
  --model DIR         model folder (SACRUM_MODEL; generate_sacrum.sh's default)
  -n, --shards N      array tasks (N, 4)
  --partition P       (PARTITION, the cluster's default)
  --account A         (ACCOUNT, none)
  --time T            time limit per task (TIME, 02:00:00)
  --gpus G            GPUs per task, 0 = CPU (GPUS, 1)
  --cpus C            CPUs per task (CPUS, 4)
  --run-dir DIR       logs, reports and summary (SLURM_RUN_DIR, \$SACRUM_DATA/slurm/masks-<date>)
  --wait              wait for the summary job; exit with its status (0 only when it COMPLETED)
  -h, --help          this help
Everything after -- goes to bin/generate_sacrum.sh (e.g. --fold 0 --checkpoint final --lock-dir DIR).
EOF
}

main() {
  local root
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  # shellcheck source=../env.sh
  source "${root}/env.sh"
  # shellcheck source=slurm_lib.sh
  source "${root}/bin/slurm_lib.sh"
  local shards="${N:-4}" run_dir="${SLURM_RUN_DIR:-}" wait=0
  local -a gen=()
  while (( $# > 0 )); do
    case "$1" in
      -h|--help) usage; return 0 ;;
      --wait) wait=1; shift ;;
      --) shift; gen+=("$@"); break ;;
      --config|--bids|--model|-n|--shards|--partition|--account|--time|--gpus|--cpus|--run-dir)
        if (( $# < 2 )); then err "$1 needs a value (see --help)"; return 2; fi
        case "$1" in
          --config|--bids|--model) gen+=("$1" "$2") ;;
          -n|--shards) shards="$2" ;;
          --run-dir) run_dir="$2" ;;
          *) slurm_option "$1" "$2" ;;
        esac
        shift 2 ;;
      *) err "unknown option $1 (see --help)"; return 2 ;;
    esac
  done
  if ! [[ "${shards}" =~ ^[1-9][0-9]*$ ]]; then err "N=${shards}: expected a number of shards >= 1"; return 2; fi
  slurm_check
  local -a common gpu
  slurm_common_args common
  slurm_gpu_args gpu
  local device=0
  (( ${GPUS:-1} > 0 )) || device=cpu
  run_dir="${run_dir:-${SACRUM_DATA}/slurm/masks-$(date +%Y%m%d-%H%M%S)}"
  mkdir -p "${run_dir}/logs" "${run_dir}/reports"
  run_dir="$(cd "${run_dir}" && pwd)"

  # each task: its own report (removed first, so a task that dies leaves none), its shard, --wait so it
  # queues behind a whole-list run holding the dataset's lock; --gpu 0 = the first GPU SLURM allocated
  local task
  task="cd $(quote "${root}") && I=\${SLURM_ARRAY_TASK_ID} && R=$(quote "${run_dir}/reports")/shard-\${I}-of-${shards}.json"
  task+=" && rm -f \"\${R}\" && SACRUM_REPORT=\"\${R}\" exec bash bin/generate_sacrum.sh --gpu ${device} --wait"
  task+=" --shard \${I}/${shards} $(quote "${gen[@]}")"
  local array summary
  array="$(slurm_submit "${task}" "${common[@]}" "${gpu[@]}" --job-name sacrum-masks --array "1-${shards}" \
             --output "${run_dir}/logs/shard-%a.log")"
  local summarise
  summarise="cd $(quote "${root}") && source env.sh && exec sacrum-masks slurm-summary $(quote "${run_dir}")"
  summarise+=" --shards ${shards} --array-job ${array}"
  summary="$(slurm_submit "${summarise}" "${common[@]}" --job-name sacrum-masks-summary \
               --dependency "afterany:${array}" --output "${run_dir}/logs/summary.log")"
  echo "slurm_masks: array job ${array} (${shards} shards), summary job ${summary}"
  echo "  follow:  squeue -j ${array},${summary}     logs: ${run_dir}/logs/"
  echo "  summary: ${run_dir}/summary.txt (when job ${summary} ends; exit status 1 = a shard or an image failed)"
  if (( wait )); then
    local rc=0
    slurm_wait "${summary}" || rc=1
    cat "${run_dir}/summary.txt" 2>/dev/null || err "no summary: see ${run_dir}/logs/summary.log"
    return "${rc}"
  fi
}

main "$@"
