# shellcheck shell=bash
# Shared bash of bin/slurm_masks.sh and bin/slurm_train.sh (sourced, not run): sbatch options from the
# environment, submission, quoting, waiting for a job by its state.
#   PARTITION  sbatch --partition (default: the cluster's default partition)
#   ACCOUNT    sbatch --account (default: none)
#   TIME       sbatch --time per task (default 02:00:00)
#   CPUS       sbatch --cpus-per-task (default 4)
#   GPUS       GPUs per task, sbatch --gres=gpu:GPUS (default 1; 0 = run on the CPU)

err() { echo "$(basename "$0" .sh): $*" >&2; }

# slurm_option NAME VALUE: the sbatch setting of an option both scripts take (--partition, --account,
# --time, --gpus, --cpus); status 1 for any other option
slurm_option() {
  case "$1" in
    --partition) PARTITION="$2" ;;
    --account) ACCOUNT="$2" ;;
    --time) TIME="$2" ;;
    --gpus) GPUS="$2" ;;
    --cpus) CPUS="$2" ;;
    *) return 1 ;;
  esac
}

# slurm_check: sbatch and scontrol on PATH, or one line saying so
slurm_check() {
  local tool
  for tool in sbatch scontrol squeue; do
    if ! command -v "${tool}" > /dev/null; then
      err "${tool} not found: run this on a SLURM login node (Debian: apt-get install slurm-client)"
      return 2
    fi
  done
}

# slurm_common_args ARRAY_NAME: fill the named array with the sbatch options shared by every job
slurm_common_args() {
  local -n out_args="$1"
  out_args=(--time "${TIME:-02:00:00}" --cpus-per-task "${CPUS:-4}" --parsable)
  if [[ -n "${PARTITION:-}" ]]; then out_args+=(--partition "${PARTITION}"); fi
  if [[ -n "${ACCOUNT:-}" ]]; then out_args+=(--account "${ACCOUNT}"); fi
}

# slurm_gpu_args ARRAY_NAME: --gres for GPUS > 0 (nothing for 0)
slurm_gpu_args() {
  local -n gpu_args="$1"
  gpu_args=()
  if ! [[ "${GPUS:-1}" =~ ^[0-9]+$ ]]; then
    err "GPUS=${GPUS}: expected a number of GPUs per task (0 = CPU)"
    return 2
  fi
  if (( ${GPUS:-1} > 0 )); then gpu_args=(--gres "gpu:${GPUS:-1}"); fi
}

# slurm_submit COMMAND SBATCH_ARGS...: submit a bash batch script running COMMAND (sbatch --wrap would run
# it with /bin/sh); prints the job id (sbatch --parsable: "id[;cluster]")
slurm_submit() {
  local command="$1" out
  shift
  out="$(printf '#!/bin/bash\n%s\n' "${command}" | sbatch "$@")" || { err "sbatch failed: sbatch $*"; return 1; }
  echo "${out%%;*}"
}

# quote ARGS...: the arguments as one shell-quoted string (for a batch script); nothing for no arguments
quote() {
  local q
  if (( $# > 0 )); then
    printf -v q '%q ' "$@"
    printf '%s' "${q% }"
  fi
}

# slurm_wait JOB_ID: wait until the job (every task of an array) has ended; exit status 0 only when all
# COMPLETED (sbatch --wait says 0 for a job cancelled before it started: the state is what counts)
slurm_wait() {
  local job="$1" states
  while true; do
    states="$(scontrol show job -o "${job}" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | sort -u)" || true
    if [[ -z "${states}" ]]; then
      err "job ${job}: unknown to SLURM"
      return 1
    fi
    if ! grep -qE 'JobState=(PENDING|RUNNING|CONFIGURING|COMPLETING|SUSPENDED|REQUEUED|RESIZING)' <<< "${states}"; then
      break
    fi
    sleep 2
  done
  [[ "${states}" == "JobState=COMPLETED" ]]
}
