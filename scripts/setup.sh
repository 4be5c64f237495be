#!/usr/bin/env bash
# Build (or reuse) the project's virtual environment in .venv and install anchorkd into it.
# Idempotent: when pyproject.toml and the constraints have not changed since the last successful run,
# it returns in well under a second. Used by both README commands and by .ci/run.
#   ANCHORKD_PYTHON   interpreter to build the venv with (default: python3.11, else python3)
#   ANCHORKD_VENV     venv location (default: .venv in the repository)
#   ANCHORKD_CONSTRAINTS  constraints file (default: requirements/constraints-cpu.txt)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${ANCHORKD_VENV:-$root/.venv}"
constraints="${ANCHORKD_CONSTRAINTS:-$root/requirements/constraints-cpu.txt}"
python_bin="${ANCHORKD_PYTHON:-$(command -v python3.11 || command -v python3)}"

stamp_file="$venv/.anchorkd-setup"
stamp="$(cat pyproject.toml "$constraints" | sha256sum | cut -d' ' -f1)"
if [ -x "$venv/bin/python" ] && [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ]; then
  exit 0
fi

start=$(date +%s)
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment $venv with $python_bin"
  "$python_bin" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade "pip>=24,<26" "setuptools>=77" wheel
# torch first, from the pinned constraints: everything after resolves against it.
echo "[setup] installing torch / torchvision (pinned in $(basename "$constraints"))"
"${pip[@]}" install -q -c "$constraints" torch torchvision
echo "[setup] installing anchorkd, the pinned training stack and DeepSpeed (for the sharded-engine tests)"
"${pip[@]}" install -q -c "$constraints" -e ".[dev,deepspeed]"
echo "$stamp" > "$stamp_file"
echo "[setup] done in $(( $(date +%s) - start )) s: $venv"
