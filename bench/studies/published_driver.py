"""One run of a published pruning implementation on given calibration windows, inside its own environment.

Called by bench/studies/sparsity_published.py with the interpreter of an environment whose transformers the
published code was written for (its decoder layers are called without position embeddings, which
transformers 5 refuses). Imports nothing of HFPrune, so it runs there:

    PYTHON bench/studies/published_driver.py IMPLEMENTATION REPO MODEL WINDOWS.pt PATTERN SPARSITY OUT

IMPLEMENTATION is wanda, sparsegpt or d2prune, REPO a checkout of locuslab/wanda, IST-DASLab/sparsegpt or
20250516aaa/D2Prune; WINDOWS.pt an int64 [n, seq_len] tensor of
token ids; PATTERN unstructured or N:M. The model runs in fp32 on CPU with eager attention (so the causal
mask their layer calls need is always built) and is saved to OUT with save_pretrained.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def batches(windows: torch.Tensor) -> list[tuple[torch.Tensor, None]]:
    """The (input_ids, target) pairs both repositories' get_loaders return, one window each."""
    return [(w.unsqueeze(0), None) for w in windows]


def run_wanda(repo: str, model, windows: torch.Tensor, n: int, m: int, sparsity: float) -> None:
    sys.path.insert(0, repo)
    from lib import prune as wanda  # locuslab/wanda

    wanda.get_loaders = lambda *args, **kwargs: (batches(windows), None)  # its loader reads C4 from the hub
    model.hf_device_map = {}  # set by from_pretrained(device_map=...) in its main.py
    args = argparse.Namespace(nsamples=len(windows), seed=0, sparsity_ratio=sparsity, use_variant=False)
    wanda.prune_wanda(args, model, None, torch.device("cpu"), prune_n=n, prune_m=m)


def run_sparsegpt(repo: str, model, windows: torch.Tensor, n: int, m: int, sparsity: float) -> None:
    sys.path.insert(0, repo)
    torch.cuda.synchronize = lambda *args: None  # its fasterprune synchronizes CUDA; a CPU build asserts
    import llama as sparsegpt_llama  # IST-DASLab/sparsegpt

    # llama_sequential reads its command line from a module global; these are llama.py's defaults
    sparsegpt_llama.args = argparse.Namespace(
        nsamples=len(windows), true_sequential=False, minlayer=-1, maxlayer=1000, prune_only="", invert=False,
        wbits=16, sparsity=sparsity, prunen=n, prunem=m, percdamp=0.01, blocksize=128,
    )  # fmt: skip
    sparsegpt_llama.llama_sequential(model, batches(windows), torch.device("cpu"))


def run_d2prune(repo: str, model, windows: torch.Tensor, n: int, m: int, sparsity: float) -> None:
    """D2Prune_LLAMA with its Llama scripts' settings (scripts/llama-2-7b.sh: s 1500, r1 1, r2 0, D2-SparseGPT and
    D2-Wanda, self_attn.v_proj pruned without an update)."""
    import logging

    sys.path.insert(0, repo)
    torch.cuda.synchronize = lambda *args: None  # its fasterprune synchronizes CUDA; a CPU build asserts
    torch.cuda.empty_cache = lambda *args: None
    from prune.prune_llama import D2Prune_LLAMA  # 20250516aaa/D2Prune

    args = argparse.Namespace(
        device=torch.device("cpu"), sparsity_ratio=sparsity, nsamples=len(windows),
        target_layer_names=["self_attn.v_proj"], d2_sparsegpt=True, d2_wanda=True, prune_n=n, prune_m=m,
        logger=logging.getLogger("d2prune"), free=False, seq_len=windows.shape[1], auto_s=False, s=1500.0, r1=1.0,
        r2=0.0, kmeans=False, seed=0,
    )  # fmt: skip
    model.seq_len = windows.shape[1]
    model.hf_device_map = {}
    D2Prune_LLAMA(args, model).prune_llm(batches(windows))


def main() -> int:
    if len(sys.argv) != 8:  # called by its *_reference.py; by hand, the usage in one line
        sys.exit("usage: " + next(t.strip() for t in __doc__.splitlines() if t.strip().startswith("PYTHON ")))
    implementation, repo, model_path, windows_path, pattern, sparsity, out = sys.argv[1:8]
    windows = torch.load(windows_path)
    n, m = (0, 0) if pattern == "unstructured" else map(int, pattern.split(":"))
    config = AutoConfig.from_pretrained(model_path)
    rope = getattr(config, "rope_parameters", None)  # transformers 5 writes RoPE's theta there; 4.x reads rope_theta
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.rope_theta = rope["rope_theta"]
    model = AutoModelForCausalLM.from_pretrained(
        model_path, config=config, torch_dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    model.seqlen = windows.shape[1]
    start = time.perf_counter()
    with torch.no_grad():
        runners = {"wanda": run_wanda, "sparsegpt": run_sparsegpt, "d2prune": run_d2prune}
        runners[implementation](repo, model, windows, n, m, float(sparsity))
    seconds = time.perf_counter() - start
    model.save_pretrained(out)
    with open(f"{out}/published_run.json", "w") as f:
        json.dump({"implementation": implementation, "pattern": pattern, "prune_seconds": seconds}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
