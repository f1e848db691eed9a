"""One run of Probe Pruning's released code (Qi-Le1/Probe_Pruning), inside its own environment.

Called by bench/studies/probe_reference.py with the interpreter of an environment holding the transformers the
release pins (4.35). Imports nothing of HFPrune, so it runs there:

    PYTHON bench/studies/probe_driver.py REPO MODEL WINDOWS.pt CONTROL OUT.json

REPO: a checkout of Qi-Le1/Probe_Pruning; WINDOWS.pt: {"calibration": int64 [n, T], "evaluation": int64 [m, T]};
CONTROL: the release's control name (e.g. wikitext-2v1_llama-smollm2_clm_20_256_0.2_ppwandasp_probe-default_sync_
c4-64_0.5+0.05-0.5+0.05-0.5+0.05-0.5+0.05-0.5+0.05-seqrank+bszrank_gate-proj+up-proj+down-proj). Its model
class (src/model/hf/modeling_llama.py), its pruning wrapper (make_prune_model), its calibration and its test
loop's order (a warm-up batch, then every batch) run unchanged; around them:
- its loaders read hub datasets: they get the windows instead, in batches of the control's batch size, every
  token attended and labelled (the calibration's labels are unused by the history), the last batch shorter where
  the count does not divide (its loader drops it; its history is a count-weighted mean, so all windows count as
  in our calibration);
- it reads CUDA's and cuDNN's versions, nvidia-smi's GPU name and creates torch.cuda.Event objects for timing: on
  a machine without CUDA those read 0 / "none" and the events do nothing (their timings are not reported);
- it imports torchvision.utils.save_image where it loads its modules (unused by language models): a stand-in;
- it loads the model in float16 with device_map='balanced' and sets its working dtype to float16: here the model
  is cast to float32 and cfg['data_type'] set to float32 after process_control (fp16 matmuls are not what a CPU
  runs; the clamps it applies use that dtype's range);
- its model is read from bench/studies/legacy_checkpoint.py's copy of MODEL (config and tokenizer files as 4.x
  reads them; the same weights and vocabulary).
The perplexity is exp of the mean next-token loss over every evaluation window (our protocol), from its logits.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import types

import torch
import transformers  # noqa: F401  (before the torchvision stand-in: transformers looks up what is installed)
from legacy_checkpoint import readable_copy  # bench/studies, beside this script


class NoEvent:
    """torch.cuda.Event where there is no CUDA: records nothing, waits for nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs) -> None:
        pass

    def wait(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


def without_cuda(work: str) -> None:
    """What the release reads of CUDA, answered on a machine without it."""
    if torch.cuda.is_available():
        return
    torch.version.cuda = "0"
    torch.backends.cudnn.version = lambda: 0
    torch.cuda.Event = NoEvent
    torch.cuda.synchronize = lambda *args, **kwargs: None
    smi = os.path.join(work, "bin", "nvidia-smi")
    os.makedirs(os.path.dirname(smi))
    with open(smi, "w") as f:
        f.write("#!/bin/sh\necho none\n")
    os.chmod(smi, 0o755)
    os.environ["PATH"] = os.path.dirname(smi) + os.pathsep + os.environ["PATH"]


def without_torchvision() -> None:
    """The release imports torchvision.utils.save_image (for image datasets) where it loads any module; a CPU build
    of torchvision for this torch is not on the registry, and no language-model path calls it."""

    def save_image(*args, **kwargs):
        raise RuntimeError("torchvision is not installed in this environment")

    utils = types.ModuleType("torchvision.utils")
    utils.save_image = save_image
    vision = types.ModuleType("torchvision")
    vision.utils = utils
    sys.modules.setdefault("torchvision", vision)
    sys.modules.setdefault("torchvision.utils", utils)


def batches(windows: torch.Tensor, size: int) -> list[dict]:
    """The windows as the release's loaders yield them: input_ids, attention_mask, labels."""
    out = []
    for i in range(0, len(windows), size):
        ids = windows[i : i + size]
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def main() -> int:
    if len(sys.argv) != 6:  # called by its *_reference.py; by hand, the usage in one line
        sys.exit("usage: " + next(t.strip() for t in __doc__.splitlines() if t.strip().startswith("PYTHON ")))
    repo, model_path, windows_path, control, out = sys.argv[1:6]
    repo, model_path, out = (os.path.abspath(p) for p in (repo, model_path, out))  # it runs in a folder of its own
    windows = torch.load(windows_path)
    work = tempfile.mkdtemp()
    without_cuda(work)
    without_torchvision()
    src = os.path.join(repo, "src")
    os.chdir(work)
    os.symlink(os.path.join(src, "config.yml"), "config.yml")
    sys.path.insert(0, src)
    from config import cfg, process_args  # Qi-Le1/Probe_Pruning

    model_name = control.split("_")[1]
    readable_copy(model_path, os.path.join(work, "output", model_name))
    process_args({**cfg, "control_name": control, "device": "cpu", "init_seed": 0})
    from model import make_model, make_prune_model

    from module import process_control

    process_control()
    cfg["data_type"] = torch.float32
    cfg["data_type_max"] = torch.finfo(torch.float32).max
    cfg["data_type_min"] = torch.finfo(torch.float32).min
    cfg["model_tag"] = f"0_{cfg['control_name']}"
    cfg["seed"] = 0
    cfg["epoch"] = 0
    torch.manual_seed(0)
    model, tokenizer = make_model(cfg["model_name"])
    model = model.float()
    cfg["tokenizer"] = tokenizer
    model = make_prune_model(model)
    start = time.perf_counter()
    with torch.no_grad():
        model.eval()
        if "calib" in cfg["prune_method"]:  # test_model.run_calibration: the history from the windows
            cfg["calibration_stage"] = True
            for batch in batches(windows["calibration"], cfg["batch_size"]):
                model(**batch)
            cfg["calibration_stage"] = False
        calibration_seconds = time.perf_counter() - start
        evaluation = batches(windows["evaluation"], cfg["batch_size"])
        nll, count, seconds, pads_seen = 0.0, 0, 0.0, False
        for index, batch in enumerate([evaluation[0], *evaluation]):  # test_model.test: a warm-up batch first
            pad = batch["input_ids"] == cfg["pad_token_id"]  # test_model.identify_pad_tokens
            cfg["pad_tokens"] = pad if pad.any() else None
            pads_seen = pads_seen or bool(pad.any())
            cfg["nonpad_tokens_denominator"] = (pad.logical_not().sum(0).unsqueeze(1) + 1e-3) if pad.any() else None
            cfg["cur_batch_index"] += 1
            tick = time.perf_counter()
            logits = model(**batch)["logits"].float()
            if index == 0:
                continue
            seconds += time.perf_counter() - tick
            ids = batch["input_ids"]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            nll += loss.item()
            count += ids[:, 1:].numel()
    result = {"control": control, "ppl": float(torch.tensor(nll / count).exp()), "eval_seconds": seconds,
              "calibration_seconds": calibration_seconds, "pad_token_id": cfg["pad_token_id"],
              "pad_tokens_seen": pads_seen,
              "windows": {k: list(v.shape) for k, v in windows.items()}}  # fmt: skip
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    os.chdir(os.path.dirname(out))
    shutil.rmtree(work, ignore_errors=True)  # the linked model copy and the release's output folders
    return 0


if __name__ == "__main__":
    sys.exit(main())
