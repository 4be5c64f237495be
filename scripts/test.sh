#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: unit tests and integration tests on the tiny model.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
