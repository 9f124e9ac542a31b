#!/usr/bin/env bash
# make demo: the whole procedure end to end on synthetic data, on the CPU, with the same scripts a user runs on
# real data (only the data, the trainer and the network configuration differ):
#   demo data -> stage 1 (CT/MRI labels onto MRI grids) -> split config -> stage 2 (nnU-Net dataset) ->
#   stage 3 (plan, preprocess, small CPU trainer, evaluation) -> stage 4 (masks for the test datasets) ->
#   Dice against the hidden truth -> QC report.
# Everything lives under SACRUM_DATA (default data/demo in the checkout), nnU-Net folders included, so the
# demo never touches a real data root or exported nnUNet_* folders. Re-running does only what is missing.
#   SACRUM_DATA   demo data root (default <checkout>/data/demo)
#   DEMO_SEED     seed of the synthetic datasets (default 0)
set -euo pipefail

err() { echo "demo: $*" >&2; }
step() { printf '\n== demo: %s\n' "$*"; }

main() {
  local root
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  export SACRUM_DATA="${SACRUM_DATA:-${root}/data/demo}"
  # The demo never uses a user's own nnU-Net folders (env.sh keeps exported ones): pin them below SACRUM_DATA.
  export nnUNet_raw="${SACRUM_DATA}/nnUNet/raw"
  export nnUNet_preprocessed="${SACRUM_DATA}/nnUNet/preprocessed"
  export nnUNet_results="${SACRUM_DATA}/nnUNet/results"
  # shellcheck source=../env.sh
  source "${root}/env.sh"
  local bids="${SACRUM_DATA}/bids"
  local seed="${DEMO_SEED:-0}"
  local -a train_sets=("${bids}/goldatlas" "${bids}/synthrad2023" "${bids}/mrspineseg")
  local -a test_sets=("${bids}/whole-spine" "${bids}/spider-challenge-2023")
  local start=${SECONDS}

  step "synthetic BIDS datasets in ${bids}"
  if [[ -f "${bids}/.demo-complete-seed-${seed}" ]]; then
    echo "demo data up to date"
  else
    sacrum-masks demo-data "${bids}" --seed "${seed}"
    touch "${bids}/.demo-complete-seed-${seed}"
  fi

  step "stage 1: sacrum labels onto the MRI grids"
  bash "${root}/bin/register.sh" "${train_sets[@]}"

  step "split config (seeded, grouped by subject)"
  local list="${SACRUM_DATA}/demo_labels.txt" split="${SACRUM_DATA}/demo_split.json"
  find "${train_sets[@]/%//derivatives/reg-labels}" -type f -name '*_seg.nii.gz' ! -name '.*' | LC_ALL=C sort > "${list}"
  sacrum-masks init-config --txt "${list}" --type LABEL --split-validation 0.1 --split-test 0.2 \
    --seed 0 -o "${split}"

  step "stages 2 and 3: nnU-Net dataset, plan and preprocess, small CPU training, evaluation"
  DNUM=300 DNAME=SacrumDataset CONFIG="${split}" GPU=cpu FOLD=0 \
    TRAINER=nnUNetTrainer_SacrumCPU CONFIGURATION=3d_fullres_small FORCE=0 \
    bash "${root}/bin/train.sh"
  local model="${nnUNet_results}/Dataset300_SacrumDataset/nnUNetTrainer_SacrumCPU__nnUNetPlans__3d_fullres_small"

  step "stage 4: sacrum masks for the test datasets"
  local -a bids_args=()
  local d
  for d in "${test_sets[@]}"; do bids_args+=(--bids "${d}"); done
  bash "${root}/bin/generate_sacrum.sh" "${bids_args[@]}" --model "${model}" --gpu cpu

  step "Dice against the hidden truth"
  local table="${SACRUM_DATA}/demo_dice.csv" summary="${SACRUM_DATA}/demo_dice.txt"
  sacrum-masks evaluate --truth "${bids}/truth" --pred-bids "${test_sets[@]}" -o "${table}" --summary "${summary}"

  step "QC report"
  bash "${root}/bin/qc.sh" "${test_sets[@]/%//derivatives/labels}"

  step "done in $(( SECONDS - start )) s"
  echo "masks:      ${test_sets[*]/%//derivatives/labels}"
  echo "QC reports: ${test_sets[*]/%//derivatives/qc-sacrum/index.html}"
  echo "Dice table: ${table}"
  column -s, -t < "${table}" 2>/dev/null || cat "${table}"
  cat "${summary}"
}

main "$@"
