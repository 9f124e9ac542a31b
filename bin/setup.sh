#!/usr/bin/env bash
# Create .venv and install the pinned dependencies and this package (editable).
# Called by `make setup`; the Makefile's stamp makes a second run a no-op until pyproject.toml changes.
#   VENV   the virtual environment folder (default .venv)
#   TORCH  the torch requirement(s) installed first (default: torch==2.14.1 torchvision==0.29.1)
#   CT     1 to also install TotalSegmentator (stage 0)
set -euo pipefail

err() { echo "setup: $*" >&2; }

main() {
  local root venv python
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  venv="${VENV:-${root}/.venv}"
  python="${PYTHON:-python3}"
  local -a torch_reqs
  read -r -a torch_reqs <<< "${TORCH:-torch==2.14.1 torchvision==0.29.1}"

  if [[ ! -x "${venv}/bin/python" ]]; then
    "${python}" -m venv "${venv}" || { err "cannot create ${venv} with ${python}"; exit 1; }
  fi
  local pip=("${venv}/bin/python" -m pip install --disable-pip-version-check -q)
  "${pip[@]}" "${torch_reqs[@]}"
  local extras="test"
  [[ "${CT:-0}" == "1" ]] && extras="test,ct"
  "${pip[@]}" -e "${root}[${extras}]"
  "${venv}/bin/python" -c 'import torch, torchvision, nnunetv2, sacrum_masks' \
    || { err "the installed stack does not import (TORCH=${TORCH:-default})"; exit 1; }
}

main "$@"
