"""HFPrune: prune LLM structure (MLP neurons, heads, layers, hidden width, or a searched mix of them) or single
weights with the entropy-Taylor criterion (or a baseline) and save Hugging Face models that load anywhere.

    # the paper's setting (C4 calibration, 1024 windows of 1024 tokens, seed 42), 20% of all parameters
    python prune.py --origin_path meta-llama/Llama-2-7b-hf --pruning_ratio 0.2 --batch_size 8
    # the release's size semantics: keep int(2.8 * hidden_size) neurons per layer
    python prune.py --origin_path meta-llama/Meta-Llama-3-8B --mlp_ratio 2.8 --seed 42
    # several sizes from one importance pass, offline text, perplexity before/after
    python prune.py --origin_path models/SmolLM2-135M-Instruct --pruning_ratio 0.2,0.3 \\
        --calib_dataset builtin --calib_samples 32 --seq_len 256 --eval_text builtin:heldout
    # split the importance pass over 4 GPUs (scores all-reduced; rank 0 writes)
    accelerate launch --num_processes 4 prune.py --origin_path meta-llama/Llama-2-7b-hf --pruning_ratio 0.2
    # a recipe file, with flags after it overriding it
    python prune.py --config cfg/recipes/llama2_7b.yaml --pruning_ratio 0.3
    # other structures: 10% from the MLPs, one of three key/value groups, 4 whole layers
    python prune.py --origin_path models/SmolLM2-135M-Instruct --prune_parts mlp,heads,layers --pruning_ratio 0.1 \\
        --heads_keep 6 --layers_remove 4 --calib_dataset builtin --calib_samples 32 --seq_len 256
    # one size knob: the mix of neurons, heads, layers and hidden width that moves the predictions least
    python prune.py --origin_path models/SmolLM2-135M-Instruct --prune_parts auto --pruning_ratio 0.2 \\
        --calib_dataset builtin --calib_samples 32 --seq_len 256 --measure_speed
    # single weights instead of structures: 2:4 sparsity with SparseGPT's reconstruction
    python prune.py --origin_path models/SmolLM2-135M-Instruct --sparsity 0.5 --sparsity_type 2:4 \\
        --sparsity_method sparsegpt --calib_dataset builtin --calib_samples 32 --seq_len 256

Every flag: `python prune.py --help`. The run itself is `module.pipeline.prune_model` (callable from Python);
this script parses the flags (cfg/prune_config.py), runs it, and turns bad input into one `error:` line, exit 2.
"""

from __future__ import annotations

import sys

from cfg.prune_config import PruneConfig
from module.pipeline import prune_model
from utils.cli import parse_config
from utils.errors import run_cli
from utils.report import setup_logging


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    return run_cli(lambda: prune_model(parse_config(PruneConfig, sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
