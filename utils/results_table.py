"""The paper's results table from lm_eval result JSONs (and perplexity JSONs) of several models.

    python -m utils.results_table dense=models/SmolLM2/lm_eval pruned=out/pruned/lm_eval \\
        --baseline dense --out docs/eval_smollm2

Each MODEL=PATH names a folder searched recursively for lm_eval's `results_*.json` (newer files win
per task) and this project's `perplexity_*.json`, or one such file. Per task the metric the paper
reports (acc_norm for ARC/OpenBookQA/PIQA/HellaSwag, acc for BoolQ/RACE/SIQA/WinoGrande,
pct_stereotype for CrowS-Pairs, mc2 for TruthfulQA), in percent; then the average over the task
columns and its difference to the baseline. Writes MARKDOWN (.md), CSV (.csv) and a bar chart (.png).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from utils.errors import UserError, run_cli

METRIC = {
    "arc_challenge": "acc_norm", "arc_easy": "acc_norm", "boolq": "acc", "crows_pairs_english": "pct_stereotype",
    "hellaswag": "acc_norm", "openbookqa": "acc_norm", "piqa": "acc_norm", "race": "acc", "social_iqa": "acc",
    "truthfulqa_mc2": "acc", "winogrande": "acc",
}  # fmt: skip
LABEL = {
    "arc_challenge": "ARC-c", "arc_easy": "ARC-e", "boolq": "BoolQ", "crows_pairs_english": "CrowS",
    "hellaswag": "HellaSwag", "openbookqa": "OBQA", "piqa": "PIQA", "race": "RACE", "social_iqa": "SIQA",
    "truthfulqa_mc2": "TruthfulQA", "winogrande": "WinoG",
}  # fmt: skip


def base_task(name: str) -> str:
    return name.removesuffix("_local")


def read_model(path: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Task scores (percent) and perplexities of one model from its result files."""
    files = [path] if path.is_file() else sorted(path.rglob("*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise UserError(f"{path} holds no result JSON files")
    scores: dict[str, float] = {}
    ppl: dict[str, float] = {}
    for f in files:
        data = json.loads(f.read_text())
        if "perplexity" in data and "dataset" in data:
            ppl[data["dataset"]] = float(data["perplexity"])
            continue
        for task, metrics in data.get("results", {}).items():
            task = base_task(task)
            if task in METRIC:
                key = next((k for k in metrics if k.split(",")[0] == METRIC[task]), None)
                if key is not None:
                    scores[task] = 100.0 * float(metrics[key])
    if not scores and not ppl:
        raise UserError(f"{path}: no lm_eval results for the paper's tasks and no perplexity")
    return scores, ppl


def build_table(models: dict[str, tuple[dict, dict]], baseline: str | None) -> tuple[list[str], list[list]]:
    """Header and rows: model, one column per task, Average, Δ vs baseline, then perplexities."""
    tasks = [t for t in METRIC if any(t in s for s, _ in models.values())]
    ppl_sets = sorted({d for _, p in models.values() for d in p})
    header = ["Model", *(LABEL[t] for t in tasks), "Average", "Δ avg", *(f"PPL {d}" for d in ppl_sets)]
    averages = {}
    for name, (scores, _) in models.items():
        present = [scores[t] for t in tasks if t in scores]
        averages[name] = sum(present) / len(present) if present and len(present) == len(tasks) else None
    rows = []
    for name, (scores, ppl) in models.items():
        avg = averages[name]
        base = averages.get(baseline) if baseline else None
        delta = avg - base if avg is not None and base is not None else None
        rows.append([name, *(scores.get(t) for t in tasks), avg, delta, *(ppl.get(d) for d in ppl_sets)])
    return header, rows


def fmt(value, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def to_markdown(header: list[str], rows: list[list]) -> str:
    delta_col = header.index("Δ avg")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row[0]] + [fmt(v, signed=(i + 1 == delta_col)) for i, v in enumerate(row[1:])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(stem: Path, header: list[str], rows: list[list]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(to_markdown(header, rows))
    with stem.with_suffix(".csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows([[r[0], *("" if v is None else round(v, 4) for v in r[1:])] for r in rows])
    cols = header[1 : header.index("Δ avg")]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(cols)), 4))
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        values = [v if v is not None else 0 for v in row[1 : 1 + len(cols)]]
        ax.bar([x + i * width for x in range(len(cols))], values, width, label=row[0])
    ax.set_xticks([x + width * (len(rows) - 1) / 2 for x in range(len(cols))], cols)
    ax.set_ylabel("score (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="NAME=PATH (folder or JSON file), in table order")
    p.add_argument("--baseline", help="NAME of the dense model for the Δ column (default: the first)")
    p.add_argument("--out", help="output path without suffix (.md, .csv, .png are written)")
    args = p.parse_args(argv)

    def tabulate() -> None:
        models = {}
        for spec in args.models:
            name, sep, path = spec.partition("=")
            if not sep or not name or not Path(path).exists():
                raise UserError(f"{spec!r} is not NAME=PATH with an existing PATH")
            models[name] = read_model(Path(path))
        baseline = args.baseline or next(iter(models))
        if baseline not in models:
            raise UserError(f"--baseline {baseline!r} is not one of {', '.join(models)}")
        header, rows = build_table(models, baseline)
        print(to_markdown(header, rows), end="")
        if args.out:
            write_outputs(Path(args.out), header, rows)

    return run_cli(tabulate)


if __name__ == "__main__":
    sys.exit(main())
