"""Weight sparsity on SmolLM2-135M: every method at 50% unstructured, 2:4 and 4:8, two calibration seeds.

    python bench/studies/sparsity.py --resume        # -> docs/SPARSITY.md and docs/SPARSITY.json (hours on 2 CPU cores)
    python bench/studies/sparsity.py --patterns 2:4 --methods wanda --seeds 0 --out /tmp/sp/SPARSITY.md   # a quick look

Each row is one `prune.py --sparsity 0.5 --sparsity_type T --sparsity_method M --seed S` run (C4 calibration,
`--calib_samples` x `--seq_len`), reloaded with plain `from_pretrained` and scored like bench/studies/criteria.py
(WikiText-2 perplexity; zero-shot with `--limit` > 0). Magnitude needs no data: one run per pattern. Rows
are appended as they finish; `--resume` continues an interrupted study.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
# docs/ files written by bench/studies/sparsity_published.py
PUBLISHED = ("sparsity_published.json", "d2prune_published_512.json", "d2prune_published_2048.json")
sys.path.insert(0, str(ROOT))

from bench.common import EvaluatedStudyConfig, Evaluation, Rows, model_or_default, prune, study_main
from module.model.mlp import count_parameters
from utils.cli import load_causal_lm, load_tokenizer
from utils.report import versions


@dataclass
class SparsityStudyConfig(EvaluatedStudyConfig):
    out: str = field(default="docs/SPARSITY.md", metadata={"help": "The report; a .json of the rows goes beside."})
    work_dir: str = field(default="out/sparsity_study", metadata={"help": "Rows measured so far, pruned models."})
    limit: int = field(default=0, metadata={"help": "Items per zero-shot task (0 = perplexity only)."})
    patterns: str = field(default="unstructured,2:4,4:8", metadata={"help": "Comma list of --sparsity_type."})
    methods: str = field(
        default="magnitude,wanda,sparsegpt,d2prune,entropy,entropy+sparsegpt",
        metadata={"help": "Comma list of --sparsity_method; M+sparsegpt adds --sparsity_update sparsegpt; "
                          "entropy:FORM sets --entropy_form (sum, abs, fisher); plain entropy is the summed form "
                          "(sum), as its rows were measured before the pruner's default became abs."},
    )
    seeds: str = field(default="0,1", metadata={"help": "Calibration seeds."})
    sparsity: float = field(default=0.5, metadata={"help": "Share of the decoder linears' weights removed."})
    calib_file: str = field(default="c4/c4_validation_2k.jsonl", metadata={"help": "Calibration text in DATA."})
    calib_samples: int = field(default=128, metadata={"help": "Calibration windows (Wanda's 128)."})
    seq_len: int = field(default=512, metadata={"help": "Tokens per calibration window (Wanda: 2048; CPU: 512)."})
    published: str = field(
        default=",".join(str(ROOT / "docs" / name) for name in PUBLISHED),
        metadata={"help": "Comma list of the published code's rows (bench/studies/sparsity_published.py; '' = none)."},
    )

    render_only: bool = field(default=False, metadata={"help": "With --resume: write the report from the rows "
                                                               "measured so far, measuring nothing new."})  # fmt: skip

    def __post_init__(self) -> None:
        self.pattern_list = [p.strip() for p in self.patterns.split(",") if p.strip()]
        self.method_list = [m.strip() for m in self.methods.split(",") if m.strip()]
        self.seed_list = [int(s) for s in self.seeds.split(",")]

    def settings(self) -> dict:
        """As the base's, without what only selects rows (each row is named by its pattern, method and seed)
        and the published rows (read when the report is written): --resume with more rows keeps those measured."""
        selection = ("patterns", "methods", "seeds", "published", "render_only")
        return {k: v for k, v in super().settings().items() if k not in selection}


def run_one(cfg: SparsityStudyConfig, pattern: str, method: str, seed: int, out: Path) -> dict:
    calib = str(Path(cfg.data_dir) / cfg.calib_file)
    method, _, update = method.partition("+")
    method, _, form = method.partition(":")
    args = ["--origin_path", cfg.model, "--sparsity", str(cfg.sparsity), "--sparsity_type", pattern,
            "--sparsity_method", method, "--sparsity_update", update or "none", "--seed", str(seed),
            "--calib_dataset", calib, "--calib_samples", str(cfg.calib_samples), "--seq_len", str(cfg.seq_len),
            "--output_dir", str(out), "--overwrite", "--no_progress"]  # fmt: skip
    if method == "entropy":
        args += ["--entropy_form", form or "sum"]
    start = time.perf_counter()
    prune(args)
    report = json.loads((out / "sparsity_report.json").read_text())
    return {"prune_seconds": time.perf_counter() - start, "achieved": report["sparsity"]["pruned_linears"]}


def measure(cfg: SparsityStudyConfig) -> tuple[list[dict], dict]:
    cfg.model = model_or_default(cfg.model)
    rows = Rows(cfg)
    evaluation = Evaluation(cfg, load_tokenizer(cfg.model, "--model"), "cpu")
    if rows.get("dense") is None:
        model = load_causal_lm(cfg.model, "dense", torch.float32)
        rows.add({"name": "dense", "params": count_parameters(model), **evaluation(model)})
    for pattern in cfg.pattern_list:
        for method in cfg.method_list:
            for seed in cfg.seed_list[:1] if method == "magnitude" else cfg.seed_list:
                name = f"{pattern}/{method}/s{seed}"
                if rows.get(name) is not None or cfg.render_only:
                    continue
                info = run_one(cfg, pattern, method, seed, rows.dir / "model")
                model = load_causal_lm(str(rows.dir / "model"), name, torch.float32)
                rows.add({"name": name, "pattern": pattern, "method": method, "seed": seed,
                          "params": count_parameters(model), **info, **evaluation(model)})  # fmt: skip
    return rows.rows, {"versions": versions(), "model": cfg.model}


def render(rows: list[dict], context: dict, cfg: SparsityStudyConfig) -> str:
    v = context["versions"]
    dense = next(r for r in rows if r["name"] == "dense")
    lines = [
        f"# Weight sparsity on SmolLM2-135M: {cfg.sparsity:.0%} of every decoder linear layer",
        "",
        f"Written by `python bench/studies/sparsity.py` (pruning and scoring its rows: "
        f"{sum(r.get('prune_seconds', 0) + r['eval_seconds'] for r in rows) / 60:.0f} min on {v['device_name']}, torch "
        f"{v['torch']}, transformers {v['transformers']}, commit {(v['hfprune_commit'] or '?')[:10]}); nothing here "
        "is edited by hand.",
        "",
        f"- Calibration: {cfg.calib_samples} windows x {cfg.seq_len} tokens of `{cfg.calib_file}` per seed "
        f"({', '.join(map(str, cfg.seed_list))}); magnitude needs none. WikiText-2 perplexity: the first "
        f"{cfg.ppl_windows} windows of {cfg.ppl_seq_len} tokens. Dense: **{dense['ppl']:.2f}**.",
        "- The saved models are dense tensors with exact zeros: no speed-up without sparse kernels.",
        "",
        "| pattern | " + " | ".join(m.replace("entropy", "entropy:sum") if m.split("+")[0] == "entropy" else m
                                    for m in cfg.method_list) + " |",
        "|---|" + "---|" * len(cfg.method_list),
    ]
    for pattern in cfg.pattern_list:
        cells = []
        for method in cfg.method_list:
            ppl = [r["ppl"] for r in rows if r.get("pattern") == pattern and r.get("method") == method]
            cells.append(" / ".join(f"{p:.1f}" for p in ppl) or "not yet")
        lines.append(f"| {pattern} | " + " | ".join(cells) + " |")
    lines += ["", "WikiText-2 perplexity, one value per calibration seed (lower is better)."]
    published = [json.loads(Path(f).read_text()) for f in cfg.published.split(",") if f and Path(f).is_file()]
    if published:
        lines += published_lines(rows, published, cfg)
    return "\n".join(lines) + "\n"


VARIANT = "/ours-"  # a published-comparison row NAME/ours-VARIANT: our pruning again under a rounding-level change


def published_lines(rows: list[dict], published: list[dict], cfg: SparsityStudyConfig,
                    tolerance: float = 0.03) -> list[str]:  # fmt: skip
    """Our rows beside the published implementations' on the same windows: the relative difference, how far our
    own perplexity moves under rounding-level changes (published rows NAME/ours-VARIANT, same windows), and how
    layer 0's masks compare. A published file calibrated on other windows than this study's table is compared
    with its first NAME/ours-VARIANT row instead of the table's."""
    ours = {r["name"]: r for r in rows}
    lines = ["", "## Against the published code", "",
             "| run | calibration | published | ours | ours / published - 1 | ours, rounding-level changes "
             "(/ published - 1) | spread of ours (max / min - 1) | layer 0's masks (ours - published) |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    outside, inside_spread = [], []
    for source in published:
        calibration = source.get("calibration") or {"file": cfg.calib_file, "samples": cfg.calib_samples,
                                                    "seq_len": cfg.seq_len}  # fmt: skip
        windows = (calibration["file"], calibration["samples"], calibration["seq_len"])
        same = windows == (cfg.calib_file, cfg.calib_samples, cfg.seq_len)
        shape = f"{calibration['samples']} x {calibration['seq_len']}"
        theirs = {r["name"]: r for r in source["rows"] if VARIANT not in r["name"]}
        variants = [r for r in source["rows"] if VARIANT in r["name"]]
        for name, row in theirs.items():
            alike = [(r["name"].rsplit(VARIANT, 1)[1], r) for r in variants if r["name"].startswith(f"{name}/")]
            label = name if same else f"{name} ({shape})"
            if same:
                mine, shown = ours.get(name), "the table's"
            else:
                (shown, mine), alike = (alike[0], alike[1:]) if alike else ((None, None), alike)
            changed = ", ".join(f"{v} {r['ppl']:.2f} ({r['ppl'] / row['ppl'] - 1:+.1%})" for v, r in alike)
            masks = mask_summary([(shown, mine), *alike] if not same else alike)
            if mine is None:
                lines.append(f"| {label} | {shape} | {row['ppl']:.2f} | not yet |  | {changed or 'not yet'} |  | "
                             f"{masks} |")  # fmt: skip
                continue
            difference = mine["ppl"] / row["ppl"] - 1
            ppls = [mine["ppl"], *(r["ppl"] for _, r in alike)]
            spread = max(ppls) / min(ppls) - 1
            if abs(difference) > tolerance:
                outside.append(label)
                if alike and abs(difference) <= spread:
                    inside_spread.append(label)
            lines.append(f"| {label} | {shape} | {row['ppl']:.2f} | {shown} {mine['ppl']:.2f} | {difference:+.1%} | "
                         f"{changed or ('not yet' if same else '–')} | {f'{spread:.1%}' if alike else ''} | "
                         f"{masks} |")  # fmt: skip
    if not outside:
        verdict = f"every compared run within {tolerance:.0%}."
    else:
        verdict = f"outside {tolerance:.0%}: {', '.join(outside)}"
        if inside_spread:
            verdict += (f"; of these, {', '.join(inside_spread)} differ from the published code by no more than our "
                        "own runs differ from each other under rounding-level changes")  # fmt: skip
        verdict += "."
    # a dict: one line per distinct text, in order (the D2Prune files share theirs)
    how = {f"How ({', '.join(sorted({r['method'] for r in s['rows'] if 'method' in r}))}): {s['about']}": None
           for s in published}  # fmt: skip
    return lines + ["", f"WikiText-2 perplexity on the same windows; {verdict}", "", *how]


def mask_summary(runs: list[tuple[str | None, dict | None]]) -> str:
    """Layer 0's masks of our runs against the published one: how many positions differ, split into the count
    difference (weights the published code removes or keeps beyond ours) and kept/removed pairs swapped; the
    linear layer with the largest share, and those that are identical."""
    cells = []
    for variant, row in runs:
        per_linear = (row or {}).get("layer0_mask_differs")
        if not per_linear or any("differ_positions" not in d for d in per_linear.values()):
            continue
        differ = sum(d["differ_positions"] for d in per_linear.values())
        if differ == 0:
            cells.append(f"{variant}: identical")
            continue
        removes = sum(max(0, -d["published_keeps_more"]) for d in per_linear.values())
        keeps = sum(max(0, d["published_keeps_more"]) for d in per_linear.values())
        pairs = (differ - removes - keeps) // 2
        parts = [f"published removes {removes} more"] * bool(removes) + [f"keeps {keeps} more"] * bool(keeps)
        parts += [f"{pairs} pairs swapped"] * bool(pairs)
        worst = max(per_linear, key=lambda k: per_linear[k]["differ"])
        same = [name.rsplit(".", 1)[-1] for name, d in per_linear.items() if d["differ_positions"] == 0]
        cells.append(f"{variant}: {differ} differ ({', '.join(parts)}); most in {worst.rsplit('.', 1)[-1]} "
                     f"({per_linear[worst]['differ']:.3%})" + (f"; identical: {', '.join(same)}" if same else ""))
    return "; ".join(cells)


def main(argv: list[str] | None = None) -> int:
    return study_main(SparsityStudyConfig, measure, render, argv)


if __name__ == "__main__":
    sys.exit(main())
