#!/usr/bin/env bash
# Config-first training entry: scripts/train.sh CONFIG.yaml [section.key=value ...]
# Runs ms-swift in-process through anchorkd (no shelling out to `swift`). Several GPUs: set ms-swift's
# torchrun variables, e.g. NPROC_PER_NODE=8 scripts/train.sh configs/stage_3_gkd.yaml
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -lt 1 ]; then
  echo "usage: scripts/train.sh CONFIG.yaml [section.key=value ...]" >&2
  exit 2
fi
config="$1"; shift
exec "${ANCHORKD_VENV:-$root/.venv}/bin/python" -m anchorkd.cli train --config "$config" "$@"
