#!/usr/bin/env bash
# Set up the environment (scripts/setup.sh), lint with ruff and run the test suite on CPU, offline.
#   bash scripts/test.sh              # everything
#   bash scripts/test.sh -m "not pipeline"   # extra arguments go to pytest
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'; exit 0; fi
bash "$root/scripts/setup.sh" --cpu
cd "$root"
venv=${QLORA_VENV:-$root/.venv}
# Lint and format are checked first: they take a second, and a red lint is cheaper to see than a red suite.
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
exec "$venv/bin/python" -m pytest "$@"
