#!/usr/bin/env bash
# Reproduce docs/EVAL_SMOLLM2.md on CPU: SmolLM2-135M-Instruct dense vs pruned 20% (entropy, C4
# calibration), the seven offline zero-shot tasks (first LIMIT items each) and WikiText-2 perplexity
# (first PPL_WINDOWS windows of 2048 tokens), then the paper-style table.
#
#   bash script/eval_smollm2.sh            # LIMIT=100 PPL_WINDOWS=16 DATA=../shared/data by default
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=script/_common.sh
source script/_common.sh
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && { usage "script/eval_smollm2.sh"; exit 0; }
PYTHON=${PYTHON:-python3}
DATA=${DATA:-../shared/data}
LIMIT=${LIMIT:-100}
PPL_WINDOWS=${PPL_WINDOWS:-16}
DENSE=models/SmolLM2-135M-Instruct
PRUNED=out/eval_smollm2/SmolLM2-135M-Instruct-entropy-pr0.2
"$PYTHON" -m utils.smollm2 --out "$DENSE"
"$PYTHON" prune.py --origin_path "$DENSE" --pruning_ratio 0.2 --criterion entropy \
  --calib_dataset "$DATA/c4/c4_validation_2k.jsonl" --calib_samples 64 --seq_len 512 \
  --output_dir "$PRUNED" --overwrite --no_progress
for model in "$DENSE" "$PRUNED"; do
  rm -rf "$model/lm_eval"
  bash script/eval.sh --local --data_dir "$DATA" --limit "$LIMIT" --batch_size 16 --device cpu \
    --dtype float32 "$model"
  "$PYTHON" -m utils.perplexity --model "$model" --dataset wikitext2 --data_dir "$DATA" --seq_len 2048 \
    --max_windows "$PPL_WINDOWS" --dtype float32 --no_progress --output "$model/lm_eval/perplexity_wikitext2.json"
done
"$PYTHON" -m utils.results_table "dense=$DENSE/lm_eval" "entropy-20%=$PRUNED/lm_eval" --baseline dense \
  --out docs/eval_smollm2
