"""Inference speed of a pruned model against its dense original, in one process on the same inputs.

    python bench/speed/inference_speed.py                                   # SmolLM2-135M vs a 20% MLP-pruned copy, CPU
    python bench/speed/inference_speed.py --dense models/SmolLM2-135M-Instruct --pruned out/quickstart
    python bench/speed/inference_speed.py --prompt_len 1024 --new_tokens 64 --batch_sizes 1,8     # GPU defaults alike

Measures the prefill time of one prompt, greedy decoding tokens/s with a KV cache at each batch size
(a fixed number of new tokens: no early stop at EOS), and peak memory (CUDA: the allocator's peak; CPU:
the process's peak RSS, which only grows, so it is reported for the first model measured only), and
prints pruned / dense ratios. Without --pruned, a copy of the dense model is pruned in memory by
removing `--ratio` of all parameters from its MLP neurons (which neurons does not change the speed).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import model_or_default
from module.model.mlp import count_parameters, find_mlps
from module.model.slicing import prune_mlps
from module.prune.plan import plan_keep
from module.speed import measure_speed, ratios


def mlp_pruned_copy(model, ratio: float):
    """A copy with `ratio` of all parameters removed from the MLP neurons (the first neurons kept)."""
    pruned = copy.deepcopy(model)
    mlps = find_mlps(pruned)
    k = plan_keep(count_parameters(pruned), mlps, pruning_ratio=ratio).k
    prune_mlps(mlps, pruned.config, [torch.arange(k) for _ in mlps.layers])
    return pruned


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", help="dense model folder (default: SmolLM2-135M-Instruct, built offline)")
    parser.add_argument("--pruned", help="pruned model folder (default: the dense model pruned in memory)")
    parser.add_argument("--ratio", type=float, default=0.2, help="without --pruned: share of parameters removed")
    parser.add_argument("--prompt_len", type=int, default=1024)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--batch_sizes", default="1,8")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.dense = model_or_default(args.dense)
    dense = AutoModelForCausalLM.from_pretrained(args.dense, dtype=dtype).to(device)
    pruned = (AutoModelForCausalLM.from_pretrained(args.pruned, dtype=dtype).to(device) if args.pruned
              else mlp_pruned_copy(dense, args.ratio))  # fmt: skip
    batches = [int(b) for b in args.batch_sizes.split(",")]
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{Path(args.dense).name} on {name}, {dtype}: prompt {args.prompt_len}, {args.new_tokens} new tokens")
    results = {label: measure_speed(m, args.prompt_len, args.new_tokens, batches) for label, m in
               (("dense", dense), ("pruned", pruned))}  # fmt: skip
    for label, r in results.items():
        decode = ", ".join(f"batch {b}: {v:.1f} tok/s" for b, v in r["decode_tokens_per_s"].items())
        memory = f", peak {r['peak_memory_bytes'] / 2**30:.2f} GiB" if "peak_memory_bytes" in r else ""
        print(
            f"{label}: {r['params'] / 1e6:.2f}M params, prefill {r['prefill_seconds'] * 1e3:.0f} ms, {decode}{memory}"
        )
    r = ratios(results["dense"], results["pruned"])
    decode = ", ".join(f"batch {b} {v:.2f}x" for b, v in r["decode_speedup"].items())
    print(f"pruned / dense: params {r['params']:.3f}, prefill speed-up {r['prefill_speedup']:.2f}x, decode {decode}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
