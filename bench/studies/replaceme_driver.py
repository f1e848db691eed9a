"""One run of ReplaceMe's published least-squares layer replacement, inside its own environment.

Called by bench/studies/replaceme_reference.py with the interpreter of an environment holding the transformers
ReplaceMe pins (4.46.3). Imports nothing of HFPrune, so it runs there:

    PYTHON bench/studies/replaceme_driver.py REPO MODEL WINDOWS.pt REMOVED OUT

REPO: a checkout of mts-ai/ReplaceMe; WINDOWS.pt: an int64 [n, seq_len] tensor of token ids; REMOVED: the decoder
layers to remove, e.g. 20,21,22,23 (ReplaceMe cannot remove layer 0). Its `lstsq` runs unchanged; around it:
- its calibration loader reads a hub dataset: it gets the windows instead, one per batch (so nothing is padded),
  decoded to text because lstsq tokenizes what the loader yields;
- it picks the removed blocks from a distances file: one is written that makes exactly REMOVED its choice
  (single-layer blocks, its merge_consecutive joins adjacent ones into one map each);
- it allocates its sums with device='cuda': on a machine without CUDA those allocations go to the CPU;
- its model is read from bench/studies/legacy_checkpoint.py's copy of MODEL (config and tokenizer files as 4.x
  reads them; the same weights and vocabulary).
Its model is saved in bfloat16 (its choice) to OUT.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

import torch
from legacy_checkpoint import readable_copy  # bench/studies, beside this script
from transformers import AutoTokenizer


def cpu_if_no_cuda(factory):
    """`factory` (torch.zeros, torch.eye) with device='cuda' moved to the CPU when there is no CUDA."""

    def make(*args, **kwargs):
        if kwargs.get("device") == "cuda" and not torch.cuda.is_available():
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return make


def main() -> int:
    if len(sys.argv) != 6:  # called by its *_reference.py; by hand, the usage in one line
        sys.exit("usage: " + next(t.strip() for t in __doc__.splitlines() if t.strip().startswith("PYTHON ")))
    repo, model_path, windows_path, removed, out = sys.argv[1:6]
    removed_layers = sorted(int(i) for i in removed.split(","))
    if removed_layers[0] < 1:
        raise SystemExit("ReplaceMe cannot remove layer 0 (its blocks start after a kept layer)")
    windows = torch.load(windows_path)
    sys.path.insert(0, repo)
    from ReplaceMe import lstsq as replaceme  # mts-ai/ReplaceMe

    work = tempfile.mkdtemp()
    model_dir = readable_copy(model_path, os.path.join(work, "model"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [tokenizer.decode(w) for w in windows]
    round_trip = sum(tokenizer(t, return_tensors="pt").input_ids[0].tolist() == w.tolist()
                     for t, w in zip(texts, windows))  # fmt: skip
    replaceme.get_calib_dataloader = lambda *args, **kwargs: [[t] for t in texts]
    torch.zeros, torch.eye = cpu_if_no_cuda(torch.zeros), cpu_if_no_cuda(torch.eye)
    with open(os.path.join(model_dir, "config.json")) as f:
        n_layers = json.load(f)["num_hidden_layers"]
    distances = torch.ones(n_layers)  # block (i + 1, i + 2) has distance[i]: zero picks it
    for layer in removed_layers:
        distances[layer - 1] = 0.0
    torch.save(distances, os.path.join(work, "distances.pth"))
    start = time.perf_counter()
    saved = replaceme.lstsq(
        model_path=model_dir, dataset="windows", dataset_column="text", batch_size=1,
        max_length=windows.shape[1], layers_to_skip=1, dataset_size=len(windows), save_path=os.path.join(work, "o"),
        distances_path=os.path.join(work, "distances.pth"), num_A=len(removed_layers), merge_consecutive=True,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    shutil.move(saved, out)
    with open(os.path.join(out, "published_run.json"), "w") as f:
        json.dump({"implementation": "replaceme_lstsq", "removed": removed_layers, "prune_seconds": seconds,
                   "windows": list(windows.shape), "windows_round_trip": int(round_trip)}, f)  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
