"""ReplaceMe's published code beside `prune.py --prune_parts layers --reconstruct ls` on the same removed layers
and the same calibration windows -> docs/reconstruction_replaceme.json (docs/RECONSTRUCTION.md shows it).

    python -m venv --system-site-packages /tmp/rmenv
    /tmp/rmenv/bin/pip install transformers==4.46.3 accelerate==1.0.1 datasets==3.0.2 colorama termcolor \\
        pytorch-minimize
    git clone https://github.com/mts-ai/ReplaceMe /tmp/peer/ReplaceMe
    python bench/studies/replaceme_reference.py --python /tmp/rmenv/bin/python --replaceme_repo /tmp/peer/ReplaceMe

Our run picks the layers (block_influence over the calibration windows) and removes them; the published lstsq
(bench/studies/replaceme_driver.py) is told to remove exactly those and fit its map on the same windows. Both are
scored here like the study's rows (WikiText-2 on 8 x 1024 tokens, zero-shot on the first --limit items).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import EvaluatedStudyConfig, Evaluation, Rows, model_or_default, prune, reference_main
from bench.studies.sparsity_published import git_commit, reference_versions
from dataset.calibration import draw_windows, load_documents
from module.model.mlp import count_parameters
from utils.cli import load_causal_lm, load_tokenizer
from utils.errors import UserError
from utils.report import versions

DRIVER = ROOT / "bench" / "studies" / "replaceme_driver.py"


@dataclass
class ReplaceMeConfig(EvaluatedStudyConfig):
    out: str = field(default="docs/reconstruction_replaceme.json", metadata={"help": "The rows (JSON)."})
    work_dir: str = field(default="out/replaceme_reference", metadata={"help": "Rows so far, windows, models."})
    limit: int = field(default=200, metadata={"help": "Items per zero-shot task (0 = perplexity only)."})
    python: str = field(default="", metadata={"help": "Interpreter of the environment ReplaceMe runs in."})
    replaceme_repo: str = field(default="", metadata={"help": "A git checkout of mts-ai/ReplaceMe."})
    layers_remove: int = field(default=4, metadata={"help": "Decoder layers removed (docs/STRUCTURES.md: 4)."})
    calib_file: str = field(default="c4/c4_validation_2k.jsonl", metadata={"help": "Calibration text in DATA."})
    calib_samples: int = field(default=128, metadata={"help": "Calibration windows (ReplaceMe's examples: 128)."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per calibration window."})
    seed: int = field(default=0, metadata={"help": "Calibration seed."})
    damps: str = field(default="0", metadata={"help": "Our --reconstruct_damp values (ReplaceMe: alpha 0)."})
    targets: str = field(default="dense,own", metadata={"help": "Our --reconstruct_target values."})

    RUN_ONLY: ClassVar[tuple[str, ...]] = (*EvaluatedStudyConfig.RUN_ONLY, "damps", "targets")  # select rows

    def __post_init__(self) -> None:
        self.damp_list = [float(d) for d in self.damps.split(",") if d.strip()]
        self.target_list = [t for t in self.targets.split(",") if t.strip()]
        if not set(self.target_list) <= {"dense", "own"}:
            raise UserError(f"--targets {self.targets!r}: each must be dense or own")
        if not (Path(self.replaceme_repo) / ".git").exists():
            raise UserError(f"--replaceme_repo {self.replaceme_repo!r} is not a git checkout of mts-ai/ReplaceMe")
        if not Path(self.python).is_file():
            raise UserError(f"--python {self.python!r}: no such interpreter")


def measure(cfg: ReplaceMeConfig) -> dict:
    cfg.model = model_or_default(cfg.model)
    rows = Rows(cfg, Path(cfg.out))
    tokenizer = load_tokenizer(cfg.model, "--model")
    evaluation = Evaluation(cfg, tokenizer, "cpu")
    flags = ["--origin_path", cfg.model, "--prune_parts", "layers", "--layers_remove", str(cfg.layers_remove),
             "--criterion", "block_influence", "--calib_dataset", str(Path(cfg.data_dir) / cfg.calib_file),
             "--calib_samples", str(cfg.calib_samples), "--seq_len", str(cfg.seq_len), "--seed", str(cfg.seed),
             "--progress", "false", "--overwrite"]  # fmt: skip
    arms = [("ours/none", [])] + [
        (f"ours/ls-{target}-damp{d:g}", ["--reconstruct", "ls", "--reconstruct_target", target,
                                          "--reconstruct_damp", str(d)])  # fmt: skip
        for d in cfg.damp_list
        for target in cfg.target_list
    ]
    removed = None
    for name, extra in arms:
        out = rows.dir / name.replace("/", "_")
        row = rows.get(name)
        if row is None:
            start = time.perf_counter()
            prune([*flags, *extra, "--output_dir", str(out)])
            seconds = time.perf_counter() - start
            report = json.loads((out / "prune_report.json").read_text())
            kept = set(report["kept"]["layers"])
            layers = [i for i in range(report["config_before"]["num_hidden_layers"]) if i not in kept]
            model = load_causal_lm(str(out), name, torch.float32)
            row = rows.add({"name": name, "removed": layers, "run_seconds": seconds,
                            "refit_seconds": (report["reconstruction"] or {}).get("seconds"),
                            "params": count_parameters(model), **evaluation(model)})  # fmt: skip
            shutil.rmtree(out, ignore_errors=True)
        removed = row["removed"]
    name = "published/replaceme-lstsq"
    if rows.get(name) is None:
        docs = load_documents(str(Path(cfg.data_dir) / cfg.calib_file))
        windows, _ = draw_windows(docs, tokenizer, cfg.calib_samples, cfg.seq_len, cfg.seed)  # prune.py's draw
        windows_path, out = rows.dir / "windows.pt", rows.dir / "replaceme"
        torch.save(windows, windows_path)
        shutil.rmtree(out, ignore_errors=True)
        args = [cfg.python, str(DRIVER), cfg.replaceme_repo, cfg.model, str(windows_path),
                ",".join(map(str, removed)), str(out)]  # fmt: skip
        res = subprocess.run(args, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{res.stderr[-3000:]}")
        run = json.loads((out / "published_run.json").read_text())
        model = load_causal_lm(str(out), name, torch.float32)
        rows.add({"name": name, "removed": run["removed"], "refit_seconds": run["prune_seconds"],
                  "windows_round_trip": run["windows_round_trip"], "params": count_parameters(model),
                  **evaluation(model)})  # fmt: skip
    reference = reference_versions(cfg.python)
    how = (f"bench/studies/replaceme_reference.py: mts-ai/ReplaceMe {git_commit(cfg.replaceme_repo)[:7]} "
           f"(ReplaceMe/lstsq.py lstsq, alpha 0, unchanged) under torch {reference['torch']} + transformers "
           f"{reference['transformers']} by bench/studies/replaceme_driver.py, which hands it the same "
           f"{cfg.calib_samples} C4 windows x {cfg.seq_len} tokens (decoded to text, one per batch) and a distances "
           f"file selecting the layers our block_influence removed; its model is saved in bfloat16 (its code) and "
           f"scored here in fp32 like our rows.")  # fmt: skip
    return {"about": how, "reference": reference, "versions": versions(), "settings": rows.settings_key,
            "rows": rows.every()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return reference_main(ReplaceMeConfig, measure, argv)


if __name__ == "__main__":
    sys.exit(main())
