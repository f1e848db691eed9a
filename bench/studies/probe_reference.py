"""Probe Pruning's released code beside `--dynamic probe` on the same windows -> docs/probe_published.json (the
probe study's report, docs/PROBE.md, shows it beside our rows).

    python -m venv --system-site-packages /tmp/ppenv
    /tmp/ppenv/bin/pip install transformers==4.35.2 pyyaml
    git clone https://github.com/Qi-Le1/Probe_Pruning /tmp/peer/Probe_Pruning     # main @ acc0730
    python bench/studies/probe_reference.py --python /tmp/ppenv/bin/python --probe_repo /tmp/peer/Probe_Pruning --resume

Takes the probe study's settings (the same flags give the same WikiText-2 and C4 windows) and runs the release's
PP (ppwandasp metric, probe-default: calibration history, EMA, residual-picked probe of 0.5 of the tokens and 0.05
of the batch) through bench/studies/probe_driver.py, once per ratio and per pruned part: MLP only
(gate-proj+up-proj+down-proj, how its scripts run grouped-query models) and MLP + attention (its `default`), at the
study's first batch size. About 2-3 minutes a run on this CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import Rows, model_or_default, reference_main  # noqa: E402
from bench.studies.probe import ProbeStudyConfig, c4_windows, evaluation_windows  # noqa: E402
from bench.studies.sparsity_published import git_commit, reference_versions  # noqa: E402
from utils.cli import load_tokenizer  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.report import versions  # noqa: E402

DRIVER = ROOT / "bench" / "studies" / "probe_driver.py"
PARTS = {"mlp": "gate-proj+up-proj+down-proj", "mlp+heads": "default"}  # the release's cust_tgt_modules
PROBE = "0.5+0.05-" * 5 + "seqrank+bszrank"  # q, k, v, gate, up: its scripts' probe ratios and ranking


@dataclass
class ProbeReferenceConfig(ProbeStudyConfig):
    out: str = field(default="docs/probe_published.json", metadata={"help": "The rows (JSON)."})
    work_dir: str = field(default="out/probe_reference", metadata={"help": "Rows so far, the windows."})
    python: str = field(default="", metadata={"help": "Interpreter of the environment the release runs in."})
    probe_repo: str = field(default="", metadata={"help": "A git checkout of Qi-Le1/Probe_Pruning."})
    parts: str = field(default="mlp,mlp+heads", metadata={"help": f"Pruned parts, of {', '.join(PARTS)}."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (Path(self.probe_repo) / ".git").exists():
            raise UserError(f"--probe_repo {self.probe_repo!r} is not a git checkout of Qi-Le1/Probe_Pruning")
        if not Path(self.python).is_file():
            raise UserError(f"--python {self.python!r}: no such interpreter")
        unknown = {p for p in self.parts.split(",") if p.strip()} - set(PARTS)
        if unknown:
            raise UserError(f"--parts: unknown {sorted(unknown)}; known: {', '.join(PARTS)}")


def control_name(model_name: str, batch: int, seq_len: int, ratio: float, calib: int, parts: str) -> str:
    """The release's experiment name, which is its whole configuration (src/module/hyper.py parses it)."""
    return (f"wikitext-2v1_{model_name}_clm_{batch}_{seq_len}_{ratio:g}_ppwandasp_probe-default_sync_c4-{calib}_"
            f"{PROBE}_{PARTS[parts]}")  # fmt: skip


def measure(cfg: ProbeReferenceConfig) -> dict:
    cfg.model = model_or_default(cfg.model)
    rows = Rows(cfg)
    tokenizer = load_tokenizer(cfg.model, "--model")
    windows_path = rows.dir / "windows.pt"  # the driver's input; the run's key fixes it, so written once
    batch, seed = cfg.batch_list[0], cfg.seed_list[0]
    for parts in [p for p in cfg.parts.split(",") if p.strip()]:
        for ratio in cfg.ratio_list:
            name = f"published|{parts}|{ratio:g}|b{batch}"
            if rows.get(name) is not None:
                continue
            # "llama" in the name selects its Llama code paths; the checkpoint is SmolLM2's
            control = control_name("llama-smollm2", batch, cfg.ppl_seq_len, ratio, cfg.calib_windows, parts)
            if not windows_path.is_file():
                partial = windows_path.with_suffix(".partial")
                torch.save({"calibration": c4_windows(cfg, tokenizer, cfg.calib_windows, cfg.calib_seq_len, seed),
                            "evaluation": evaluation_windows(cfg, tokenizer, seed)}, partial)  # fmt: skip
                partial.replace(windows_path)
            out = rows.dir / "run.json"
            start = time.perf_counter()
            args = [cfg.python, str(DRIVER), cfg.probe_repo, cfg.model, str(windows_path), control, str(out)]
            res = subprocess.run(args, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"{' '.join(args)} failed:\n{res.stderr[-3000:]}")
            run = json.loads(out.read_text())
            rows.save({"name": name, "parts": parts, "ratio": ratio, "batch": batch, "seed": seed, "ppl": run["ppl"],
                       "control": control, "eval_seconds": run["eval_seconds"],
                       "calibration_seconds": run["calibration_seconds"],
                       "run_seconds": time.perf_counter() - start})  # fmt: skip
            print(f"{name}: {run['ppl']:.3f}", flush=True)
    reference = reference_versions(cfg.python)
    how = (f"bench/studies/probe_reference.py: Qi-Le1/Probe_Pruning {git_commit(cfg.probe_repo)[:7]} (its model "
           f"class, pruning wrapper, calibration and test order, unchanged) under torch {reference['torch']} + "
           f"transformers {reference['transformers']} by bench/studies/probe_driver.py, which hands it the probe "
           f"study's windows and casts its fp16 model and working dtype to fp32 on this CPU.")  # fmt: skip
    return {"about": how, "reference": reference, "versions": versions(), "settings": rows.settings_key,
            "rows": rows.every()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return reference_main(ProbeReferenceConfig, measure, argv)


if __name__ == "__main__":
    sys.exit(main())
