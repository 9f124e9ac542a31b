#!/usr/bin/env bash
# Run every benchmark in bench/ (bench_*.py); each prints ratios against a baseline measured in the same run.
# Outputs that benchmarks keep go to bench/out/ (ignored by git).
set -euo pipefail

err() { echo "bench: $*" >&2; }

main() {
  local root
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  # shellcheck source=../env.sh
  source "${root}/env.sh"
  local failed=0 script
  for script in "${root}"/bench/bench_*.py; do
    [[ -e "${script}" ]] || continue
    echo "== ${script##*/}"
    python "${script}" "$@" || { err "${script##*/} failed"; failed=1; }
  done
  return "${failed}"
}

main "$@"
