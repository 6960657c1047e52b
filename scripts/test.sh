#!/usr/bin/env bash
# Set up the environment (scripts/setup.sh) and run the test suite on CPU, offline.
#   bash scripts/test.sh              # everything
#   bash scripts/test.sh -m "not pipeline"   # extra arguments go to pytest
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'; exit 0; fi
bash "$root/scripts/setup.sh" --cpu
cd "$root"
exec "${QLORA_VENV:-$root/.venv}/bin/python" -m pytest "$@"
