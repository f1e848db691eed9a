#!/usr/bin/env bash
#SBATCH --job-name=hfprune-prune
#SBATCH --output=log/prune/%x-%A_%a.out
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=06:00:00
# Prune a model (prune.py) on one node, as a SLURM job or with plain bash.
#
# usage: script/prune.sh MODEL [prune.py flags...]
#   sbatch script/prune.sh meta-llama/Llama-2-7b-hf                     # 20% and 30% from one importance pass
#   RATIOS="0.2 0.3" sbatch --array=0-1 script/prune.sh MODEL           # one array task per ratio
#   NUM_GPUS=4 sbatch --gres=gpu:4 script/prune.sh MODEL --batch_size 8 # importance split over 4 GPUs
# Environment: RATIOS (default "0.2 0.3"), CRITERION (entropy), SEED (42), OUT (out), NUM_GPUS (1),
#   PYTHON (python3), ENV_ACTIVATE (script to source first), DRY_RUN=1 (print the command only).
# Create log/prune before sbatch (SLURM opens the --output file before the script runs).
set -euo pipefail
ROOT=${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
# shellcheck source=script/_common.sh
source "$ROOT/script/_common.sh"
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && { usage "$ROOT/script/prune.sh"; exit 0; }
[[ $# -ge 1 ]] || die "give the model to prune (see --help)"
MODEL=$1; shift
RATIOS=${RATIOS:-0.2 0.3}
RATIO=$(pick_from_list "$RATIOS")
NAME=$(basename "$MODEL")
OUT_DIR=${OUT:-out}/$NAME-${CRITERION:-entropy}-s${SEED:-42}
[[ -n "${SLURM_ARRAY_TASK_ID:-}" ]] && OUT_DIR+=-pr$RATIO
activate_env
cd "$ROOT"
mkdir -p log/prune
read -r -a LAUNCH <<< "$(launcher "${NUM_GPUS:-1}")"
run_cmd "${LAUNCH[@]}" prune.py --origin_path "$MODEL" --pruning_ratio "${RATIO// /,}" \
  --criterion "${CRITERION:-entropy}" --seed "${SEED:-42}" --output_dir "$OUT_DIR" "$@"
