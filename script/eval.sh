#!/usr/bin/env bash
#SBATCH --job-name=hfprune-eval
#SBATCH --output=log/eval/%x-%j.out
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=08:00:00
# Zero-shot evaluation of a (pruned) model with the lm_eval CLI: the paper's ten tasks, or the seven
# offline twins in cfg/lm_eval_tasks read from a local data folder; optionally WikiText-2 perplexity.
# A dynamic folder (prune.py --dynamic probe) goes through evaluate.py instead: lm_eval's Python API with
# the origin model and its per-batch pruning in memory, at a fixed batch size (default 8).
#
# usage: script/eval.sh [options] MODEL [ADAPTER]          (also: sbatch script/eval.sh ...)
#   MODEL                 HF folder, hub id or dynamic folder; ADAPTER: a peft LoRA folder, evaluated via peft=
#   --tasks LIST          comma list (default: the paper's ten; with --local the seven offline tasks)
#   --local               offline task definitions (cfg/lm_eval_tasks), data from --data_dir
#   --data_dir DIR        data folder for --local (default: $HFPRUNE_DATA, else ../shared/data)
#   --batch_size N        lm_eval batch size (default: auto)
#   --device DEV          cuda, cuda:0, cpu (default: cuda when nvidia-smi works, else cpu)
#   --dtype DTYPE         bfloat16 (default), float16, float32
#   --limit N             only the first N items of each task (quick checks; not comparable to papers)
#   --output DIR          results folder (default: MODEL/lm_eval, or ./lm_eval for a hub id)
#   --ppl                 also WikiText-2 perplexity (utils/perplexity.py, 2048-token windows)
#   --log_samples         also save every prompt and answer (lm_eval --log_samples)
#   --dry_run             print the commands and exit (same as DRY_RUN=1)
#   -h, --help            this text
# Environment: PYTHON (default python3), ENV_ACTIVATE (a script to source first, e.g. a venv's
# bin/activate or a conda hook), HFPRUNE_DATA. Under sbatch, create log/eval first (SLURM opens
# the --output file before the script runs).
set -euo pipefail
ROOT=${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
# shellcheck source=script/_common.sh
source "$ROOT/script/_common.sh"
PYTHON=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
TASKS="" LOCAL=0 DATA_DIR=${HFPRUNE_DATA:-$ROOT/../shared/data} BATCH=auto DEVICE="" DTYPE=bfloat16
LIMIT="" OUTPUT="" PPL=0 LOG_SAMPLES=0 MODEL="" ADAPTER=""
PAPER_TASKS=arc_challenge,arc_easy,boolq,crows_pairs_english,openbookqa,piqa,race,social_iqa,truthfulqa_mc2,winogrande
LOCAL_TASKS=arc_easy_local,arc_challenge_local,piqa_local,boolq_local,winogrande_local,openbookqa_local,hellaswag_local

while (($#)); do
  case "$1" in
    -h|--help) usage "$ROOT/script/eval.sh"; exit 0 ;;
    --tasks) TASKS=${2:?--tasks needs a value}; shift 2 ;;
    --local) LOCAL=1; shift ;;
    --data_dir) DATA_DIR=${2:?--data_dir needs a value}; shift 2 ;;
    --batch_size) BATCH=${2:?--batch_size needs a value}; shift 2 ;;
    --device) DEVICE=${2:?--device needs a value}; shift 2 ;;
    --dtype) DTYPE=${2:?--dtype needs a value}; shift 2 ;;
    --limit) LIMIT=${2:?--limit needs a value}; shift 2 ;;
    --output) OUTPUT=${2:?--output needs a value}; shift 2 ;;
    --ppl) PPL=1; shift ;;
    --log_samples) LOG_SAMPLES=1; shift ;;
    --dry_run) DRY_RUN=1; shift ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) if [[ -z "$MODEL" ]]; then MODEL=$1; elif [[ -z "$ADAPTER" ]]; then ADAPTER=$1; else die "unexpected argument $1"; fi; shift ;;
  esac
done

[[ -n "$MODEL" ]] || die "give the model to evaluate (see --help)"
if [[ -n "$ADAPTER" && ! -f "$ADAPTER/adapter_config.json" ]]; then die "adapter $ADAPTER has no adapter_config.json"; fi
DYNAMIC=0
if [[ -f "$MODEL/dynamic_config.json" ]]; then
  DYNAMIC=1
  [[ -z "$ADAPTER" ]] || die "an adapter does not combine with a dynamic folder (its origin model is evaluated)"
  if [[ "$BATCH" == auto ]]; then BATCH=8; fi  # per-batch pruning depends on the batches: a fixed size
fi
if [[ "$MODEL" == /* || "$MODEL" == .* || -e "$MODEL" ]]; then
  ((DYNAMIC)) || [[ -f "$MODEL/config.json" ]] || die "model folder $MODEL has no config.json"
  OUTPUT=${OUTPUT:-$MODEL/lm_eval}
else
  OUTPUT=${OUTPUT:-lm_eval/${MODEL//\//__}}
fi
case "$DTYPE" in bfloat16|float16|float32) ;; *) die "--dtype $DTYPE is not one of bfloat16, float16, float32" ;; esac
if [[ -n "$LIMIT" && ! "$LIMIT" =~ ^[0-9]+$ ]]; then die "--limit $LIMIT is not a whole number"; fi
if [[ -z "$DEVICE" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then DEVICE=cuda; else DEVICE=cpu; fi
fi
if [[ -z "$TASKS" ]]; then if ((LOCAL)); then TASKS=$LOCAL_TASKS; else TASKS=$PAPER_TASKS; fi; fi

activate_env
cd "$ROOT"
CHECK=("$PYTHON" -m utils.lm_eval_tasks check --tasks "$TASKS")
if ((LOCAL)) || [[ "$TASKS" == *_local* ]]; then CHECK+=(--data_dir "$DATA_DIR"); fi
# the adapter must fit the model (read from their files, so not in a dry run, which only prints the commands)
[[ -z "$ADAPTER" || "$DRY_RUN" == 1 ]] || CHECK+=(--model "$MODEL" --adapter "$ADAPTER")
"${CHECK[@]}" || exit 2

MODEL_ARGS="pretrained=$MODEL,dtype=$DTYPE,add_bos_token=True"
[[ -z "$ADAPTER" ]] || MODEL_ARGS+=",peft=$ADAPTER"
CMD=(lm_eval --model hf --model_args "$MODEL_ARGS" --tasks "$TASKS" --batch_size "$BATCH" --device "$DEVICE"
     --output_path "$OUTPUT")
[[ -z "$LIMIT" ]] || CMD+=(--limit "$LIMIT")
((LOG_SAMPLES == 0)) || CMD+=(--log_samples)
if [[ "$TASKS" == *_local* ]]; then
  CMD+=(--include_path "$ROOT/cfg/lm_eval_tasks" --metadata "{\"data_dir\": \"$DATA_DIR\"}")
fi
PPL_CMD=("$PYTHON" -m utils.perplexity --model "$MODEL" --dataset wikitext2 --seq_len 2048 --dtype "$DTYPE"
         --device "$DEVICE" --output "$OUTPUT/perplexity_wikitext2.json")
[[ -z "$ADAPTER" ]] || PPL_CMD+=(--adapter "$ADAPTER")
if [[ -d "$DATA_DIR/wikitext-2-raw" ]]; then PPL_CMD+=(--data_dir "$DATA_DIR"); fi

if ((DYNAMIC)); then
  CMD=("$PYTHON" "$ROOT/evaluate.py" --model "$MODEL" --tasks "$TASKS" --batch_size "$BATCH" --dtype "$DTYPE"
       --device "$DEVICE" --output "$OUTPUT" --data_dir "$DATA_DIR")
  [[ -z "$LIMIT" ]] || CMD+=(--limit "$LIMIT")
  ((PPL == 0)) || CMD+=(--ppl --ppl_seq_len 2048)
  PPL=0
fi

if [[ "$DRY_RUN" != 1 ]]; then
  mkdir -p "$ROOT/log/eval"  # lm_eval and the perplexity create OUTPUT themselves: a failed run leaves none
  echo "evaluating $MODEL${ADAPTER:+ + $ADAPTER} on $TASKS ($DEVICE, $DTYPE) -> $OUTPUT" >&2
fi
run_cmd "${CMD[@]}"
if ((PPL)); then run_cmd "${PPL_CMD[@]}"; fi
