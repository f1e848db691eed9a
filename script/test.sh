#!/usr/bin/env bash
# Install what the tests need (torch first, CPU build 2.13.0 unless a torch is already there), then run
# ruff and pytest. Extra arguments go to pytest (e.g. -k adapters, -m "not slow").
#
#   bash script/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=script/_common.sh
source script/_common.sh
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && { usage "script/test.sh"; exit 0; }
PYTHON=${PYTHON:-python3}
"$PYTHON" -c "import torch" 2>/dev/null || "$PYTHON" -m pip install -q torch==2.13.0
"$PYTHON" -m pip install -q -r requirements-dev.txt
"$PYTHON" -m ruff check .
exec "$PYTHON" -m pytest -q "$@"
