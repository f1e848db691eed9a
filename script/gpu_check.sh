#!/usr/bin/env bash
# The GPU check: importance pass (release vs ours, 7B/8B shapes), packing correctness per attention
# implementation, fine-tuning throughput and the optimizer step, the pipeline end to end (prune -> LoRA ->
# merge -> lm_eval -> perplexity), a pruned model's inference speed-up and Probe Pruning's prefill (Llama-2-7B
# shape), written to OUT/gpu_check.json and OUT/gpu_check.md. A failed check exits 1 and names its section; targets are reported met or missed.
# About 250 s on one H200 (measured 2026-11-30), plus the machine's start.
#
# usage: script/gpu_check.sh [--prepare] [--tiny] [--out DIR] [bench/speed/gpu_check.py flags...]
#   bash script/gpu_check.sh --tiny --out out/gpu_check_tiny  # CPU, tiny shapes, every section (CI runs this)
#   bash script/gpu_check.sh --prepare                        # on a machine with PyPI: fill .gpu_carry/ (~25 MB)
#   bash script/gpu_check.sh --out "$OUT" --work_dir /tmp/w   # on the GPU machine, .gpu_carry carried along
#   bash script/gpu_check.sh --sections packing,inference     # a subset (importance, packing, training,
#                                                             # pipeline, inference, dynamic, sparse)
#
# What to carry to a GPU machine that reaches no network (torch 2.11, transformers 5.17, peft 0.21,
# accelerate 1.15; no datasets, lm_eval or flash_attn): `--prepare` writes, in the ignored folder
# .gpu_carry/, the wheels of lm_eval 0.4.13 and datasets with the dependencies that image lacks
# (wheels/), the data the sections read (data/: the LaMini sample, ARC-Easy, WikiText-2 test) and
# SmolLM2's tokenizer without its weights (tokenizer/). With the device tool:
#   run(command="bash script/gpu_check.sh --out $OUT --work_dir /tmp/gpu_work 2>&1 | tee $OUT/log.txt",
#       carry=[".gpu_carry"], timeout_s=450)   # about 250 s on an H200, plus the start
# The wheels are installed there with pip --no-index before the check runs. SmolLM2's weights are not
# carried (its wheel is 93 MB, over the 64 MiB a device call carries), so the pipeline runs on random
# weights of SmolLM2's shape unless --model names a real model folder there.
# Environment: PYTHON (python3), HFPRUNE_DATA (data folder when .gpu_carry/data is absent).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=script/_common.sh
source script/_common.sh
PYTHON=${PYTHON:-python3}
CARRY=.gpu_carry
# lm_eval 0.4.13 + datasets as pip resolves them, less what the GPU image holds (its package list of 2026-11-17)
# (multiprocess, the one with a wheel per Python version, is fetched for the image's Python 3.12)
WHEELS=(lm_eval==0.4.13 datasets==5.2.0 dill==0.4.1 evaluate==0.4.6 rouge-score==0.1.2 more-itertools==11.2.1
  pytablewriter==1.2.1 sqlitedict==2.1.0 word2number==1.1 dataproperty==1.1.1 httpx2==2.16.2 httpcore2==2.16.2
  mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5 tcolorpy==0.1.7 nltk==3.10.4 chardet==6.0.0.post1
  pytz==2026.6 truststore==0.10.5 typepy==1.3.5 defusedxml==0.7.1)

prepare() {
  local data=${HFPRUNE_DATA:-../shared/data}
  rm -rf "$CARRY" && mkdir -p "$CARRY/wheels" "$CARRY/data/instruct/lamini" "$CARRY/data/arc/hf_format" \
    "$CARRY/data/wikitext-2-raw" "$CARRY/tokenizer"
  "$PYTHON" -m pip wheel -q --no-deps -w "$CARRY/wheels" "${WHEELS[@]}"  # pure Python; sdists built here
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$CARRY/wheels" \
    multiprocess==0.70.19
  cp "$data/instruct/lamini/lamini_10001_part1.jsonl" "$CARRY/data/instruct/lamini/"
  cp "$data/arc/hf_format/ARC-Easy-test.jsonl" "$CARRY/data/arc/hf_format/"
  cp "$data/wikitext-2-raw/wiki.test.raw" "$CARRY/data/wikitext-2-raw/"
  local smol
  smol=$("$PYTHON" -c "from utils.smollm2 import cached_model; print(cached_model())")
  cp "$smol"/tokenizer.json "$smol"/tokenizer_config.json "$CARRY/tokenizer/"
  du -sh "$CARRY"
}

ARGS=()
while (($#)); do
  case $1 in
    -h|--help) usage script/gpu_check.sh; exit 0 ;;
    --prepare) prepare; exit 0 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
if [[ -d "$CARRY/wheels" ]] && ! "$PYTHON" -c "import lm_eval, datasets" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-index --find-links "$CARRY/wheels" lm_eval datasets
fi
DEFAULTS=()
[[ -d "$CARRY/data" ]] && DEFAULTS+=(--data_dir "$CARRY/data")
[[ -d "$CARRY/tokenizer" ]] && DEFAULTS+=(--tokenizer "$CARRY/tokenizer")
exec "$PYTHON" bench/speed/gpu_check.py "${DEFAULTS[@]}" "${ARGS[@]}"
