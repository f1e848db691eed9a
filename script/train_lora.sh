#!/usr/bin/env bash
#SBATCH --job-name=hfprune-lora
#SBATCH --output=log/train/%x-%A_%a.out
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
# LoRA fine-tuning of a pruned model (fintune_lora.py) with accelerate launch, as a SLURM job or with bash.
#
# usage: script/train_lora.sh MODEL OUTPUT_DIR [fintune_lora.py flags...]
#   sbatch script/train_lora.sh out/Llama-2-7b-hf-entropy-s42/Llama-2-7b-hf-entropy-pr0.2-s42 out/l2-pr0.2-lora --merge
#   LRS="4e-4 2e-4" sbatch --array=0-1 script/train_lora.sh MODEL OUT   # learning-rate sweep, OUT-lr<LR> each
# Environment: NUM_GPUS (4), ACCELERATE_CONFIG (cfg/accelerate/ddp_4gpu.yaml), LRS (sweep values),
#   ENV_ACTIVATE (script to source first), DRY_RUN=1 (print the command only).
# Create log/train before sbatch (SLURM opens the --output file before the script runs).
set -euo pipefail
ROOT=${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
# shellcheck source=script/_common.sh
source "$ROOT/script/_common.sh"
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && { usage "$ROOT/script/train_lora.sh"; exit 0; }
launch_training fintune_lora.py "$@"
