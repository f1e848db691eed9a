# Shared by the SLURM/bash launchers in script/ (sourced, not run).
# shellcheck shell=bash

die() { echo "error: $*" >&2; exit 2; }

# print the comment block under the #SBATCH lines of the calling script
usage() { sed -n '/^#SBATCH/d; /^#!/d; /^# shellcheck/d; /^#/!q; s/^# \{0,1\}//p' "$1"; }

# source ENV_ACTIVATE (a venv's bin/activate, a conda hook script) when set
activate_env() {
  if [[ -n "${ENV_ACTIVATE:-}" ]]; then
    [[ -f "$ENV_ACTIVATE" ]] || die "ENV_ACTIVATE=$ENV_ACTIVATE does not exist"
    # shellcheck disable=SC1090
    source "$ENV_ACTIVATE"
  fi
}

# run a command, or only print it (shell-quoted) when DRY_RUN=1
run_cmd() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "$@"; echo
  else
    echo "+ $*" >&2
    "$@"
  fi
}

# the value for this job-array task from a space-separated list, or the whole list outside an array
pick_from_list() {
  local list=$1
  if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
    local -a items
    read -r -a items <<< "$list"
    (( SLURM_ARRAY_TASK_ID < ${#items[@]} )) || die "array task $SLURM_ARRAY_TASK_ID has no entry in '$list'"
    echo "${items[$SLURM_ARRAY_TASK_ID]}"
  else
    echo "$list"
  fi
}

# python, or accelerate launch over N processes
launcher() {
  local n=$1; shift
  if (( n > 1 )); then
    echo accelerate launch --num_processes "$n" "$@"
  else
    echo "${PYTHON:-python3}"
  fi
}

# body of train_full.sh / train_lora.sh: accelerate launch ENTRY --model MODEL --output_dir OUT [--lr] [flags]
launch_training() {
  local entry=$1; shift
  [[ $# -ge 2 ]] || die "give MODEL and OUTPUT_DIR (see --help)"
  local model=$1 out_dir=$2; shift 2
  local -a extra=()
  if [[ -n "${LRS:-}" ]]; then
    local lr
    lr=$(pick_from_list "$LRS")
    [[ "$lr" != *" "* ]] || die "LRS is a sweep: submit it as a job array (sbatch --array=0-N)"
    out_dir+=-lr$lr
    extra+=(--lr "$lr")
  fi
  activate_env
  cd "$ROOT" || die "cannot enter $ROOT"
  mkdir -p log/train
  run_cmd accelerate launch --config_file "${ACCELERATE_CONFIG:-cfg/accelerate/ddp_4gpu.yaml}" \
    --num_processes "${NUM_GPUS:-4}" "$entry" --model "$model" --output_dir "$out_dir" "${extra[@]}" "$@"
}
