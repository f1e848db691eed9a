"""The reproduction study: criteria ablation, recovery and the Taylor check on SmolLM2-135M -> docs/RESULTS.md.

    python bench/studies/criteria.py                 # the whole study on CPU (about 75 min on 2 cores); writes
                                             # docs/RESULTS.md, docs/results.png, docs/results.json
    python bench/studies/criteria.py --resume        # after an interruption: reuse the rows already measured
    python bench/studies/criteria.py --ratios 0.2 --seeds 0 --limit 5 --out /tmp/study/RESULTS.md   # a quick look

Every model (dense, each criterion x pruning ratio x calibration seed, and the recovered ones) is
scored by the same evaluation: WikiText-2 test perplexity on the first windows of the local copy and
the seven offline zero-shot tasks (lm_eval, the first `--limit` items of each; the same items for
every model, so differences between models are paired). The importance pass, the pruning and the
fine-tuning are the project's own code paths (module/prune/importance.py, module/prune/criteria.py,
module/train/sft.py).
Rows are appended to WORK/rows.jsonl as they are measured; `--resume` reuses rows whose settings match.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import (
    METRICS,
    T_CRIT_95,
    EvaluatedStudyConfig,
    Evaluation,
    Rows,
    fmt,
    mean_std,
    metrics_of,
    model_or_default,
    paired_difference,
    value,
)
from bench.studies import taylor_check
from dataset.calibration import load_documents, sample_windows
from module.model.mlp import count_parameters, find_mlps
from module.model.slicing import prune_mlps
from module.prune.criteria import CRITERIA, DATA_FREE, score_neurons, top_k_sorted
from module.prune.importance import GRADIENT_CRITERIA, collect_statistics
from module.prune.plan import plan_keep
from utils.atomic import atomic_dir
from utils.cli import load_causal_lm, load_tokenizer, parse_config
from utils.errors import UserError, run_cli
from utils.report import setup_logging, versions
from utils.results_table import LABEL, base_task

log = logging.getLogger("hfprune.study")
@dataclass
class StudyConfig(EvaluatedStudyConfig):
    criteria: str = field(default=",".join(CRITERIA), metadata={"help": "Comma list of criteria."})
    ratios: str = field(default="0.2,0.3", metadata={"help": "Comma list of pruning ratios (of all parameters)."})
    seeds: str = field(
        default="0,1,2", metadata={"help": "Calibration seeds of entropy and ce; the other criteria use the first."}
    )
    calib_file: str = field(default="c4/c4_validation_2k.jsonl", metadata={"help": "Calibration text in DATA."})
    calib_samples: int = field(default=32, metadata={"help": "Calibration windows per seed."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per calibration window."})
    recovery_ratio: float = field(default=0.2, metadata={"help": "Pruning ratio of the recovered models."})
    recovery_criteria: str = field(default="entropy,ce", metadata={"help": "Criteria recovered ('' = none)."})
    recovery_modes: str = field(default="lora,full", metadata={"help": "lora and/or full fine-tuning."})
    sft_data: str = field(
        default="instruct/lamini/lamini_10001_part1.jsonl", metadata={"help": "Instruction data in DATA."}
    )
    sft_steps: int = field(default=32, metadata={"help": "Optimizer steps of each recovery run."})
    sft_seq_len: int = field(default=256, metadata={"help": "Tokens per packed row (one row per step)."})
    taylor_windows: int = field(default=4, metadata={"help": "Windows of the Taylor check (0 = skip it)."})
    taylor_layers: int = field(default=6, metadata={"help": "Evenly spaced layers of the Taylor check."})
    taylor_neurons: int = field(default=8, metadata={"help": "Random neurons per checked layer."})

    def __post_init__(self) -> None:
        self.criteria_list = [c.strip() for c in self.criteria.split(",") if c.strip()]
        bad = [c for c in self.criteria_list if c not in CRITERIA]
        if bad or not self.criteria_list:
            raise ValueError(f"--criteria {self.criteria!r}: valid are {', '.join(CRITERIA)}")
        try:
            self.ratio_list = [float(r) for r in self.ratios.split(",")]
            self.seed_list = [int(s) for s in self.seeds.split(",")]
        except ValueError:
            msg = f"--ratios {self.ratios!r} / --seeds {self.seeds!r} must be comma lists of numbers"
            raise ValueError(msg) from None
        if not all(0 < r < 1 for r in self.ratio_list):
            raise ValueError(f"--ratios {self.ratios!r}: each must be in (0, 1)")
        self.recovery_list = [c.strip() for c in self.recovery_criteria.split(",") if c.strip()]
        self.mode_list = [m.strip() for m in self.recovery_modes.split(",") if m.strip()]
        if any(m not in ("lora", "full") for m in self.mode_list):
            raise ValueError(f"--recovery_modes {self.recovery_modes!r}: valid are lora, full")
        if self.recovery_list and self.recovery_ratio not in self.ratio_list:
            raise ValueError(f"--recovery_ratio {self.recovery_ratio} is not one of --ratios {self.ratios}")
        if any(c not in self.criteria_list for c in self.recovery_list):
            raise ValueError(f"--recovery_criteria {self.recovery_criteria!r} must be among --criteria")

    def seeds_of(self, criterion: str) -> list[int]:
        return self.seed_list if criterion in GRADIENT_CRITERIA else self.seed_list[:1]


def importance_scores(cfg, model, tokenizer, docs, criterion: str, seed: int) -> tuple[list[torch.Tensor], dict]:
    mlps = find_mlps(model)
    stats, info = None, {"importance_seconds": 0.0, "calib_tokens": 0}
    if criterion not in DATA_FREE:
        windows = sample_windows(docs, tokenizer, cfg.calib_samples, cfg.seq_len, seed)
        stats = collect_statistics(model, mlps, windows, criterion, batch_size=1, progress=False)
        info = {"importance_seconds": stats.seconds, "calib_tokens": stats.tokens}
    return score_neurons(criterion, mlps, stats, seed), info


def pruned_copy(dense, scores: list[torch.Tensor], ratio: float):
    model = copy.deepcopy(dense)
    mlps = find_mlps(model)
    plan = plan_keep(count_parameters(model), mlps, pruning_ratio=ratio)
    prune_mlps(mlps, model.config, [top_k_sorted(s, plan.k) for s in scores])
    return model


def recover(cfg: StudyConfig, pruned_dir: Path, mode: str, run_dir: Path):
    """A short fine-tuning run of the pruned model through fintune_{lora,full}.py's code path."""
    from cfg.finetune_config import parse_finetune_args
    from module.train.sft import run_sft

    argv = ["--model", str(pruned_dir), "--dataset_name", str(Path(cfg.data_dir) / cfg.sft_data),
            "--tokenizer_max", str(cfg.sft_seq_len), "--max_train_samples", str(max(64, 16 * cfg.sft_steps)),
            "--max_steps", str(cfg.sft_steps), "--per_device_train_batch_size", "1",
            "--gradient_accumulation_steps", "1", "--gradient_checkpointing", "false", "--warmup_steps",
            str(max(1, cfg.sft_steps // 10)), "--save_strategy", "no", "--report_to", "none",
            "--logging_steps", str(max(1, cfg.sft_steps // 8)), "--disable_tqdm", "true", "--seed", "0",
            "--data_cache", str(run_dir.parent / "cache"), "--output_dir", str(run_dir), "--overwrite",
            "--dtype", "float32"]  # fmt: skip
    if mode == "lora":
        argv.append("--merge")
    start = time.perf_counter()
    out = run_sft(*parse_finetune_args(argv, lora_mode=mode == "lora"))
    seconds = time.perf_counter() - start
    report = json.loads((out / "train_report.json").read_text())
    losses = [e["loss"] for e in report["log_history"] if "loss" in e]
    model = load_causal_lm(str(out / "merged" if mode == "lora" else out), f"the {mode} run", torch.float32)
    info = {"train_seconds": seconds, "train_loss_first": losses[0] if losses else None,
            "train_loss_last": losses[-1] if losses else None, "train_rows": report["data"]["rows"]}  # fmt: skip
    return model, info


def measure(cfg: StudyConfig) -> tuple[list[dict], dict | None, dict]:
    model_dir = model_or_default(cfg.model)
    if not Path(model_dir).is_dir():
        raise UserError(f"--model {model_dir} is not a folder")
    for name, rel in (("--calib_file", cfg.calib_file), ("--sft_data", cfg.sft_data)):
        if not (Path(cfg.data_dir) / rel).exists():
            raise UserError(f"{name}: {Path(cfg.data_dir) / rel} does not exist (--data_dir {cfg.data_dir})")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dense = load_causal_lm(model_dir, "--model", torch.float32).to(device).eval()
    tokenizer = load_tokenizer(model_dir, "--model")
    evaluation = Evaluation(cfg, tokenizer, device)
    docs = load_documents(str(Path(cfg.data_dir) / cfg.calib_file))
    rows = Rows(cfg)
    params_dense = count_parameters(dense)
    if rows.get("dense") is None:
        rows.add({"name": "dense", "stage": "dense", "criterion": None, "ratio": 0.0, "seed": None,
                  "params": params_dense, **evaluation(dense)})  # fmt: skip
    work = rows.dir
    for criterion in cfg.criteria_list:
        for seed in cfg.seeds_of(criterion):
            names = {r: f"{criterion}-{r:g}-s{seed}" for r in cfg.ratio_list}
            pending = [r for r in cfg.ratio_list if rows.get(names[r]) is None]
            keep_for_recovery = criterion in cfg.recovery_list and seed == cfg.seed_list[0]
            pruned_dir = work / "pruned" / names[cfg.recovery_ratio]
            if not pending and (not keep_for_recovery or pruned_dir.is_dir()):
                continue
            scores, info = importance_scores(cfg, dense, tokenizer, docs, criterion, seed)
            for r in cfg.ratio_list:
                model = pruned_copy(dense, scores, r)
                if keep_for_recovery and r == cfg.recovery_ratio and not pruned_dir.is_dir():
                    with atomic_dir(pruned_dir) as tmp:
                        model.save_pretrained(tmp)
                        tokenizer.save_pretrained(tmp)
                if r in pending:
                    rows.add({"name": names[r], "stage": "pruned", "criterion": criterion, "ratio": r, "seed": seed,
                              "params": count_parameters(model), **info, **evaluation(model)})  # fmt: skip
                del model
    for criterion in cfg.recovery_list:
        source = f"{criterion}-{cfg.recovery_ratio:g}-s{cfg.seed_list[0]}"
        for mode in cfg.mode_list:
            name = f"{source}+{mode}"
            if rows.get(name) is not None:
                continue
            model, info = recover(cfg, work / "pruned" / source, mode, work / "sft" / name)
            rows.add({"name": name, "stage": mode, "criterion": criterion, "ratio": cfg.recovery_ratio,
                      "seed": cfg.seed_list[0], "params": count_parameters(model), **info,
                      **evaluation(model.to(device))})  # fmt: skip
            del model
    taylor = None
    if cfg.taylor_windows > 0:
        taylor = rows.get("taylor")
        if taylor is None:
            windows = sample_windows(docs, tokenizer, cfg.taylor_windows, cfg.seq_len, cfg.seed_list[0])
            layers = taylor_check.evenly_spaced(len(find_mlps(dense).layers), cfg.taylor_layers)
            start = time.perf_counter()
            results = taylor_check.run(dense, windows.to(device), ["entropy", "ce"], layers, cfg.taylor_neurons,
                                 cfg.seed_list[0])  # fmt: skip
            taylor = rows.save({"name": "taylor", "results": results, "seconds": time.perf_counter() - start})
    from importlib.metadata import version

    context = {"model": Path(model_dir).name, "params_dense": params_dense, "device": device,
               "versions": {**versions(), "lm_eval": version("lm_eval"), "peft": version("peft")},
               "settings": cfg.settings(), "reused_rows": rows.reused,
               "boolq_yes_share": evaluation.boolq_yes_share}  # fmt: skip
    return [r for r in rows.rows if r["name"] != "taylor"], taylor, context


# ---- the report ----


def group(rows: list[dict], criterion: str, ratio: float, stage: str = "pruned") -> list[dict]:
    return [r for r in rows if r["criterion"] == criterion and r["ratio"] == ratio and r["stage"] == stage]


def table(rows: list[dict], dense: dict, cfg: StudyConfig) -> list[str]:
    tasks = list(dense["tasks"])
    averages = metrics_of(dense)[1:]
    head = ["Model", "Seeds", "Params", "PPL ↓", *[LABEL[t] for t in tasks]]
    head += [h for m in averages for h in {"avg": ["Avg ↑", "Δ Avg"], "avg_ex_boolq": ["Avg ex. BoolQ ↑"]}[m]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def line(label: str, group_rows: list[dict]) -> str:
        cells = [fmt([r["ppl"] for r in group_rows])] + [fmt([r["tasks"][t] for r in group_rows], 1) for t in tasks]
        for m in averages:
            vals = [value(r, m) for r in group_rows]
            cells.append(fmt(vals))
            if m == "avg":
                cells.append(fmt([v - value(dense, m) for v in vals]))
        return f"| {label} | {len(group_rows)} | {group_rows[0]['params'] / 1e6:.1f}M | " + " | ".join(cells) + " |"

    lines.append(line("dense", [dense]))
    for ratio in cfg.ratio_list:
        for criterion in cfg.criteria_list:
            if group(rows, criterion, ratio):
                lines.append(line(f"{criterion} {ratio:.0%}", group(rows, criterion, ratio)))
        for criterion in cfg.recovery_list:
            for mode in cfg.mode_list:
                if ratio == cfg.recovery_ratio and group(rows, criterion, ratio, mode):
                    lines.append(line(f"{criterion} {ratio:.0%} + {mode}", group(rows, criterion, ratio, mode)))
    return lines


def paired_by_seed(rows: list[dict], ratio: float, criterion: str, other: str, metric: str) -> dict | None:
    """`criterion` − `other` over the seeds both have (the same calibration windows per seed): the paired
    difference, the seeds, in how many `criterion` was better (ties are no win) and `other`'s mean."""
    a = {r["seed"]: r for r in group(rows, criterion, ratio)}
    b = {r["seed"]: r for r in group(rows, other, ratio)}
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    x, y = [value(a[s], metric) for s in seeds], [value(b[s], metric) for s in seeds]
    lower = METRICS[metric][1] == "lower"
    wins = sum((p < q) if lower else (p > q) for p, q in zip(x, y))
    return {**paired_difference(x, y), "seeds": seeds, "wins": wins, "other_mean": mean(y)}


def comparison(rows: list[dict], dense: dict, cfg: StudyConfig) -> list[str]:
    """entropy vs each other criterion, per ratio and metric: generated text."""
    if "entropy" not in cfg.criteria_list:
        return ["(entropy was not among the criteria measured.)"]
    out = []
    for ratio in cfg.ratio_list:
        ent = group(rows, "entropy", ratio)
        for other in [c for c in cfg.criteria_list if c != "entropy"]:
            oth = group(rows, other, ratio)
            if not ent or not oth:
                continue
            for metric in metrics_of(dense):
                name, better = METRICS[metric]
                d = paired_by_seed(rows, ratio, "entropy", other, metric) if other in GRADIENT_CRITERIA else None
                if d is not None:
                    verdict = "larger" if d["significant"] else "not larger"
                    out.append(f"- {ratio:.0%}, {name}: entropy − {other} = {d['mean']:+.3f} (paired over seeds "
                               f"{d['seeds']}: std {d['std']:.3f}, t = {d['t']:+.2f}); entropy is {better} in "
                               f"{d['wins']}/{d['n']} seeds; the difference is **{verdict}** than the seed spread "
                               f"(two-sided 95%, |t| > {T_CRIT_95.get(d['n'] - 1, 1.96)}).")  # fmt: skip
                else:  # one run of `other`: compare with the spread of the entropy seeds
                    m, s = mean_std([value(r, metric) for r in ent])
                    o = mean([value(r, metric) for r in oth])
                    outside = s is not None and abs(m - o) > 2 * s
                    ahead = (m < o) if better == "lower" else (m > o)
                    where = "level with" if m == o else f"{'ahead of' if ahead else 'behind'}"
                    out.append(f"- {ratio:.0%}, {name}: entropy {m:.3f}"
                               + (f" ± {s:.3f}" if s is not None else "")
                               + f" vs {other} {o:.3f}: entropy is {where} {other} by {abs(m - o):.3f}, which is "
                               f"{'more' if outside else 'not more'} than twice the entropy seed std.")  # fmt: skip
    return out


def summary(rows: list[dict], dense: dict, cfg: StudyConfig) -> list[str]:
    """The headline, generated: criteria ranked by perplexity, and entropy vs ce with its paired test."""
    out = []
    for ratio in cfg.ratio_list:
        ranked = sorted((mean(value(r, "ppl") for r in group(rows, c, ratio)), c) for c in cfg.criteria_list
                        if group(rows, c, ratio))  # fmt: skip
        out.append(f"- **{ratio:.0%} pruned, perplexity** (dense {dense['ppl']:.2f}), best first: "
                   + ", ".join(f"{c} {m:.2f}" for m, c in ranked) + ".")  # fmt: skip
        for metric in metrics_of(dense):
            d = paired_by_seed(rows, ratio, "entropy", "ce", metric)
            if d is None:
                break
            name, better = METRICS[metric]
            rel = f" ({d['mean'] / d['other_mean']:+.1%})" if metric == "ppl" else " points"
            out.append(f"  - entropy vs ce, {name}: entropy {better} in {d['wins']}/{d['n']} seeds, mean difference "
                       f"{d['mean']:+.2f}{rel}, paired t = {d['t']:+.2f}: "
                       + ("**significant** at 95%" if d["significant"] else "**not significant** at 95%")
                       + f" with {d['n']} seeds.")  # fmt: skip
    return out


def recovery_lines(rows: list[dict], dense: dict, cfg: StudyConfig) -> list[str]:
    out = []
    for criterion in cfg.recovery_list:
        source = [r for r in group(rows, criterion, cfg.recovery_ratio) if r["seed"] == cfg.seed_list[0]]
        for mode in cfg.mode_list:
            rec = group(rows, criterion, cfg.recovery_ratio, mode)
            if not source or not rec:
                continue
            p, r = source[0], rec[0]
            parts = []
            for metric in metrics_of(dense):
                before, after, base = value(p, metric), value(r, metric), value(dense, metric)
                worse = before > base if METRICS[metric][1] == "lower" else before < base
                back = f"{(before - after) / (before - base):.0%} of the gap recovered" if worse else "no gap: the " \
                    "pruned model is not below dense here"  # fmt: skip
                parts.append(f"{METRICS[metric][0]} {before:.2f} → {after:.2f} (dense {base:.2f}; {back})")
            out.append(f"- {criterion} {cfg.recovery_ratio:.0%} + {mode} ({cfg.sft_steps} steps, "
                       f"{r['train_seconds']:.0f} s, train loss {r['train_loss_first']:.3f} → "
                       f"{r['train_loss_last']:.3f}): " + "; ".join(parts))  # fmt: skip
    return out


def taylor_lines(taylor: dict | None) -> list[str]:
    if taylor is None:
        return ["(skipped: --taylor_windows 0)"]
    layers = [r["layer"] for r in next(iter(taylor["results"].values()))]
    head = "| criterion | " + " | ".join(f"layer {i}" for i in layers) + " | mean |"
    lines = [head, "|" + "---|" * (len(layers) + 2)]
    for kind, label in (("spearman_score_vs_abs_delta", "ρ(score, abs ΔL)"),
                        ("spearman_estimate_vs_delta", "ρ(−a·g, ΔL)")):  # fmt: skip
        for criterion, res in taylor["results"].items():
            vals = [r[kind] for r in res]
            lines.append(f"| {criterion} {label} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {mean(vals):.2f} |")
    return lines


def plot(rows: list[dict], dense: dict, cfg: StudyConfig, path: Path, model_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"ppl": "WikiText-2 perplexity (log scale)", "avg": "zero-shot average (%)",
              "avg_ex_boolq": "zero-shot average without BoolQ (%)"}  # fmt: skip
    metrics = metrics_of(dense)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
    width = 0.8 / max(1, len(cfg.criteria_list))
    for ax, metric in zip(axes[0], metrics):
        for c, criterion in enumerate(cfg.criteria_list):
            xs, ys, es = [], [], []
            for x, ratio in enumerate(cfg.ratio_list):
                vals = [value(r, metric) for r in group(rows, criterion, ratio)]
                if vals:
                    m, s = mean_std(vals)
                    xs.append(x + (c - (len(cfg.criteria_list) - 1) / 2) * width)
                    ys.append(m)
                    es.append(s or 0.0)
            ax.bar(xs, ys, width, yerr=es, capsize=3, label=criterion)
        for criterion in cfg.recovery_list:
            for m_i, mode in enumerate(cfg.mode_list):
                rec = group(rows, criterion, cfg.recovery_ratio, mode)
                if rec:
                    c = cfg.criteria_list.index(criterion)
                    x = cfg.ratio_list.index(cfg.recovery_ratio) + (c - (len(cfg.criteria_list) - 1) / 2) * width
                    ax.plot([x], [value(rec[0], metric)], marker="v^"[m_i % 2], color="black", linestyle="none",
                            label=f"+{mode}" if criterion == cfg.recovery_list[0] else None)  # fmt: skip
        ax.axhline(value(dense, metric), color="gray", linestyle="--", label="dense")
        ax.set_xticks(range(len(cfg.ratio_list)), [f"{r:.0%} pruned" for r in cfg.ratio_list])
        ax.set_title(titles[metric])
        if metric == "ppl":
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{model_name}: pruning criteria (bars: mean ± std over calibration seeds; markers: recovered)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compute_minutes(rows: list[dict], taylor: dict | None) -> float:
    """Time the measurements took: evaluations, importance passes (one per criterion and seed),
    fine-tuning and the Taylor check; model loading not counted."""
    passes = {(r["criterion"], r["seed"]): r.get("importance_seconds", 0.0) for r in rows if r["stage"] == "pruned"}
    total = sum(r["eval_seconds"] + r.get("train_seconds", 0.0) for r in rows) + sum(passes.values())
    return (total + (taylor["seconds"] if taylor else 0.0)) / 60


def report(rows: list[dict], taylor: dict | None, context: dict, cfg: StudyConfig, seconds: float) -> str:
    dense = next(r for r in rows if r["stage"] == "dense")
    v = context["versions"]
    importance = [r for r in rows if r.get("importance_seconds")]
    tok_s = sum(r["calib_tokens"] for r in importance) / sum(r["importance_seconds"] for r in importance) \
        if importance else 0.0  # fmt: skip
    png = Path(cfg.out).with_name("results.png").name
    lines = [
        f"# Reproduction study: {context['model']}, criteria × pruning ratio, recovery, Taylor check",
        "",
        "Written by `python bench/studies/criteria.py` (this file, `results.png` and `results.json` beside it); no "
        "number here was edited by hand. "
        f"Run on {v['device_name']} ({context['device']}, fp32), torch {v['torch']}, transformers "
        f"{v['transformers']}, lm_eval {v['lm_eval']}, peft {v['peft']}, commit "
        f"{(v['hfprune_commit'] or '?')[:12]}. The measurements took {compute_minutes(rows, taylor):.0f} min "
        f"(evaluation, importance passes, fine-tuning, Taylor check; model loading not counted); this invocation "
        f"ran {seconds / 60:.0f} min"
        + (
            f", reusing {context['reused_rows']} rows measured before with `--resume`."
            if context["reused_rows"]
            else "."
        ),
        "",
        "## Protocol",
        f"- **Pruning**: uniform MLP-neuron pruning of {', '.join(f'{r:.0%}' for r in cfg.ratio_list)} of all "
        f"{context['params_dense'] / 1e6:.1f}M parameters (the same number of neurons removed in every layer), "
        "scores from `module/prune/criteria.py`, no recovery unless the row says so.",
        f"- **Calibration** (entropy, ce, wanda_sp): {cfg.calib_samples} windows × {cfg.seq_len} tokens of "
        f"`{cfg.calib_file}` (one random window per document longer than the window), seeds {cfg.seed_list} for "
        f"entropy and ce (each seed = another draw of windows, the same draw for both), seed {cfg.seed_list[0]} for "
        f"wanda_sp and random; magnitude needs no data. Importance pass: {tok_s:.0f} tokens/s.",
        f"- **Perplexity**: WikiText-2 raw test, the first {cfg.ppl_windows} windows of {cfg.ppl_seq_len} tokens.",
        f"- **Zero-shot**: lm_eval {', '.join(base_task(t) for t in cfg.tasks.split(','))} (offline twins in "
        f"`cfg/lm_eval_tasks`), **the first {cfg.limit} items of each task**, the same for every model; acc_norm "
        "for ARC, OBQA, PIQA, HellaSwag, acc for BoolQ, WinoGrande (the paper's choice). With this few items a "
        f"single task's accuracy has a standard error of about ±{100 * math.sqrt(0.25 / max(1, cfg.limit)):.0f} "
        "points; only differences in the average over tasks and in perplexity carry signal."
        + (
            f" BoolQ: {context['boolq_yes_share']:.0f}% of its first {cfg.limit} items are answered 'yes', so a "
            "model that always says yes scores that much; a shift of answer bias moves the average by several "
            "points, which is why the average without BoolQ stands beside it."
            if context["boolq_yes_share"] is not None
            else ""
        ),
        f"- **Recovery**: the {cfg.recovery_ratio:.0%} models of seed {cfg.seed_list[0]} fine-tuned with "
        f"`module/train/sft.py` (the code of fintune_lora.py / fintune_full.py) on `{cfg.sft_data}`: {cfg.sft_steps} "
        f"steps of one packed {cfg.sft_seq_len}-token row, the release's optimizer and learning rates (LoRA r 32 "
        "on all seven projections, merged; full with AnyPrecisionAdamW), cosine schedule: at most "
        f"{cfg.sft_steps * cfg.sft_seq_len} training tokens, a smoke-scale recovery, not the paper's 2-3 epochs of "
        "LaMini.",
        "- Std is the sample standard deviation over calibration seeds (n = the Seeds column).",
        "",
        "## Summary",
        "",
        *summary(rows, dense, cfg),
        "",
        "## Results",
        "",
        *table(rows, dense, cfg),
        "",
        f"![criteria]({png})",
        "",
        "## Does entropy beat the others here?",
        "",
        "Generated from the rows above. For ce the seeds are paired (the same windows), so the test is on the "
        "per-seed differences; for the single-run criteria the entropy seed spread is the yardstick.",
        "",
        *comparison(rows, dense, cfg),
        "",
        "## Recovery",
        "",
        "The share of the dense-pruned gap that fine-tuning closed. Perplexity is the measure that can show it "
        f"here; the zero-shot differences at {cfg.recovery_ratio:.0%} are within the noise of {cfg.limit} items "
        "per task.",
        "",
        *(recovery_lines(rows, dense, cfg) or ["(no recovery runs)"]),
        "",
        "## Taylor check",
        "",
    ]
    if taylor is not None:
        lines += [
            f"On the dense model, {cfg.taylor_neurons} random neurons in each of {cfg.taylor_layers} evenly spaced "
            f"layers, {cfg.taylor_windows} windows × {cfg.seq_len} tokens (seed {cfg.seed_list[0]}): Spearman rank "
            "correlation of the pruning score S_j = Σ|a_j·g_j| with the absolute loss change |ΔL_j| when neuron j "
            "alone is removed (measured by a forward pass), and of the signed first-order estimate −Σ a_j·g_j "
            f"with ΔL_j itself; {taylor['seconds']:.0f} s (`bench/studies/taylor_check.py`). With {cfg.taylor_neurons} "
            f"neurons a single layer's ρ has a standard error of about 1/√(n−1) = "
            f"{1 / math.sqrt(max(1, cfg.taylor_neurons - 1)):.2f}, the mean over {cfg.taylor_layers} layers about "
            f"{1 / math.sqrt(max(1, cfg.taylor_neurons - 1) * cfg.taylor_layers):.2f}; "
            "[taylor_check_smollm2.md](taylor_check_smollm2.md) samples 24 neurons per layer (`python "
            "bench/studies/taylor_check.py --neurons_per_layer 24 --layers 6 --out docs/taylor_check_smollm2`).",
            "",
        ]
    lines += taylor_lines(taylor)
    lines += [
        "",
        "## At full scale",
        "",
        "The commands that repeat the paper's LLaMA-2-7B table (SLURM and `accelerate launch`), the expected "
        "GPU memory and time, and the paper's numbers are in [FULL_SCALE.md](FULL_SCALE.md).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    setup_logging()

    def go() -> None:
        cfg = parse_config(StudyConfig, sys.argv[1:] if argv is None else argv)
        log.info("config: %s", json.dumps(cfg.settings(), sort_keys=True))
        start = time.perf_counter()
        rows, taylor, context = measure(cfg)
        seconds = time.perf_counter() - start
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        dense = next(r for r in rows if r["stage"] == "dense")
        plot(rows, dense, cfg, out.with_name("results.png"), context["model"])
        out.with_name("results.json").write_text(
            json.dumps({"context": context, "seconds": seconds, "rows": rows, "taylor": taylor}, indent=1)
        )
        out.write_text(report(rows, taylor, context, cfg, seconds))
        print(f"wrote {out} ({seconds / 60:.1f} min)")

    return run_cli(go)


if __name__ == "__main__":
    sys.exit(main())
