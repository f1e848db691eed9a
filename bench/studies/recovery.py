"""The recovery study: how much of the dense-pruned gap comes back with plain fine-tuning (CE), with
distillation from the dense model (KL), and with both, by LoRA and by full fine-tuning, at one budget.

    python bench/studies/recovery.py --resume        # -> docs/RECOVERY.md, recovery.png, recovery.json (hours, CPU)
    python bench/studies/recovery.py --train_tokens 8192 --limit 5 --out /tmp/rec/RECOVERY.md   # a quick look
    python bench/studies/recovery.py --reconstruct ls --arms lora:ce --out docs/RECOVERY_LS.md --resume
        # the same arm from a reconstructed model (--reconstruct ls): does its advantage survive recovery?

SmolLM2-135M-Instruct is pruned by prune.py (20% of all parameters from the MLP neurons, entropy, C4
calibration) once; every arm then trains the pruned model through fintune_{lora,full}.py's code path on
the same packed LaMini rows for the same number of tokens (`--train_tokens`) and is evaluated
like bench/studies/criteria.py (WikiText-2 perplexity; the offline zero-shot tasks, the first `--limit` items of
each). An arm named MODE:OBJECTIVE@SEED repeats an arm with another training seed (data order,
LoRA's initial adapters; the same pruned model): the seed-to-seed spread the verdict weighs the objectives
against. Rows are appended to WORK/<settings>/rows.jsonl as they finish: with --resume a later session
continues where the last one stopped, and the report covers the rows measured so far. The report's
recovery.json is committed, and --resume reuses its rows of the same settings: a fresh checkout (no out/)
continues the study from the rows in git (`--measured_only` writes the report mid-study).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import EvaluatedStudyConfig, Evaluation, Rows, metrics_of, model_or_default, prune, value
from module.model.mlp import count_parameters
from utils.cli import load_causal_lm, load_tokenizer, parse_config
from utils.errors import UserError, run_cli
from utils.report import setup_logging, versions

log = logging.getLogger("hfprune")
OBJECTIVES = {"ce": 0.0, "distill": 1.0, "both": 0.5}  # --distill_alpha of each objective


@dataclass(frozen=True)
class Arm:
    mode: str  # lora | full
    objective: str  # ce | distill | both
    seed: int | None = None  # a training seed other than --seed's

    @property
    def name(self) -> str:
        return f"{self.mode}:{self.objective}" + ("" if self.seed is None else f"@{self.seed}")

    @staticmethod
    def parse(text: str, seed: int) -> Arm:
        """MODE:OBJECTIVE or MODE:OBJECTIVE@SEED (the study's own --seed names the plain arm)."""
        spec, at, arm_seed = text.strip().partition("@")
        parts = spec.split(":")
        if len(parts) != 2 or parts[0] not in ("lora", "full") or parts[1] not in OBJECTIVES or (
                at and not arm_seed.isdigit()):  # fmt: skip
            raise ValueError(
                f"--arms {text.strip()!r}: each must be MODE:OBJECTIVE[@SEED], lora|full : ce|distill|both"
            )
        other = int(arm_seed) if at and int(arm_seed) != seed else None
        return Arm(parts[0], parts[1], other)


@dataclass
class RecoveryConfig(EvaluatedStudyConfig):
    out: str = field(default="docs/RECOVERY.md", metadata={"help": "The report; its lower-case .png/.json beside."})
    work_dir: str = field(default="out/recovery", metadata={"help": "Rows measured so far, pruned/trained models."})
    limit: int = field(default=200, metadata={"help": "Items per zero-shot task (the first N of each)."})
    ratio: float = field(default=0.2, metadata={"help": "Share of all parameters pruned (MLP neurons, entropy)."})
    calib_file: str = field(default="c4/c4_validation_2k.jsonl", metadata={"help": "Calibration text in DATA."})
    calib_samples: int = field(default=32, metadata={"help": "Calibration windows."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per calibration window."})
    arms: str = field(
        default="full:ce,full:distill,full:both,lora:ce,lora:distill,lora:both,full:ce@1,full:distill@1,lora:ce@1,full:both@1",
        metadata={
            "help": "Comma list of MODE:OBJECTIVE[@SEED], MODE lora|full, OBJECTIVE ce|distill|both; @SEED repeats "
            "the arm with another training seed."
        },
    )
    sft_data: str = field(
        default="instruct/lamini/lamini_10001_part1.jsonl", metadata={"help": "Instruction data in DATA."}
    )
    train_tokens: int = field(default=204800, metadata={"help": "Training tokens of every arm (packed rows)."})
    pack_length: int = field(default=512, metadata={"help": "Tokens per packed row."})
    gradient_accumulation_steps: int = field(default=8, metadata={"help": "Rows per optimizer step."})
    lr_full: float = field(default=5e-5, metadata={"help": "Peak learning rate of full fine-tuning."})
    lr_lora: float = field(default=4e-4, metadata={"help": "Peak learning rate of LoRA (the release's)."})
    temperature: float = field(default=1.0, metadata={"help": "Distillation temperature."})
    save_steps: int = field(default=10, metadata={"help": "Checkpoint interval: an interrupted arm resumes from it."})
    seed: int = field(default=0, metadata={"help": "Calibration and training seed."})
    reconstruct: str = field(default="none", metadata={"help": "prune.py --reconstruct of the pruned model."})
    reconstruct_samples: int = field(
        default=128, metadata={"help": "--reconstruct_samples (refit windows, same draw) when --reconstruct is set."}
    )
    measured_only: bool = field(
        default=False, metadata={"help": "Write the report from the rows measured so far, measuring nothing more."}
    )

    def __post_init__(self) -> None:
        self.resume = self.resume or self.measured_only
        self.arm_list = [Arm.parse(a, self.seed) for a in self.arms.split(",") if a.strip()]
        if not self.arm_list:
            raise ValueError("--arms is empty")
        self.steps = max(1, self.train_tokens // (self.pack_length * self.gradient_accumulation_steps))

    @property
    def rows_json(self) -> Path:
        """The report's JSON beside --out: every measured row, committed, and read back by --resume."""
        return self.beside(".json")

    def beside(self, suffix: str) -> Path:
        """A file next to --out named by its stem in lower case (docs/RECOVERY.md: docs/recovery.json)."""
        return Path(self.out).with_name(Path(self.out).stem.lower() + suffix)

    def settings(self) -> dict:
        """As the base's, without the arms and the checkpoint interval: adding an arm with --resume keeps the
        rows measured so far (and without the refit's settings when there is none: the rows before it existed)."""
        dropped = ("arms", "save_steps", "measured_only") + (
            ("reconstruct", "reconstruct_samples") if self.reconstruct == "none" else ())
        return {k: v for k, v in super().settings().items() if k not in dropped}


def prune_once(cfg: RecoveryConfig, work: Path) -> Path:
    out = work / "pruned"
    if not (out / "prune_report.json").is_file():
        refit = [] if cfg.reconstruct == "none" else ["--reconstruct", cfg.reconstruct, "--reconstruct_samples",
                                                      str(cfg.reconstruct_samples)]  # fmt: skip
        prune(["--origin_path", cfg.model, "--pruning_ratio", str(cfg.ratio), "--calib_dataset",
               str(Path(cfg.data_dir) / cfg.calib_file), "--calib_samples", str(cfg.calib_samples), "--seq_len",
               str(cfg.seq_len), "--seed", str(cfg.seed), "--output_dir", str(out), "--overwrite", "--importance_cache",
               str(work / "cache"), "--no_progress", *refit])  # fmt: skip
    return out


def train_arm(cfg: RecoveryConfig, pruned: Path, arm: Arm, run_dir: Path):
    """One arm through fintune_{lora,full}.py's code path; the trained (merged) model and its training facts."""
    from cfg.finetune_config import parse_finetune_args
    from module.train.sft import run_sft

    mode, objective = arm.mode, arm.objective
    seed = cfg.seed if arm.seed is None else arm.seed

    argv = ["--model", str(pruned), "--dataset_name", str(Path(cfg.data_dir) / cfg.sft_data), "--tokenizer_max",
            str(cfg.pack_length), "--max_steps", str(cfg.steps), "--per_device_train_batch_size", "1",
            "--gradient_accumulation_steps", str(cfg.gradient_accumulation_steps), "--gradient_checkpointing",
            "false", "--warmup_steps", str(max(1, cfg.steps // 10)), "--save_strategy", "steps", "--save_steps",
            str(cfg.save_steps), "--save_total_limit", "1", "--report_to", "none", "--logging_steps", "1",
            "--disable_tqdm", "true", "--seed", str(seed), "--data_cache", str(run_dir.parent / "cache"),
            "--output_dir", str(run_dir), "--dtype", "float32", "--lr",
            str(cfg.lr_lora if mode == "lora" else cfg.lr_full)]  # fmt: skip
    # an arm cut off (a session's end) continues from its last checkpoint: resume is exact (tests/test_distill.py)
    resumable = any(run_dir.glob("checkpoint-*/trainer_state.json"))
    argv += ["--resume_from_checkpoint", "last"] if resumable else ["--overwrite"]
    if objective != "ce":
        argv += ["--distill_from", cfg.model, "--distill_alpha", str(OBJECTIVES[objective]), "--distill_temperature",
                 str(cfg.temperature)]  # fmt: skip
    if mode == "lora":
        argv.append("--merge")
    start = time.perf_counter()
    out = run_sft(*parse_finetune_args(argv, lora_mode=mode == "lora"))
    seconds = time.perf_counter() - start
    report = json.loads((out / "train_report.json").read_text())
    curve = [(h["step"], h.get("distill_ce", h["loss"]), h.get("distill_kl")) for h in report["log_history"]
             if "loss" in h]  # fmt: skip
    rows = min(report["data"]["rows"], cfg.steps * cfg.gradient_accumulation_steps)
    info = {"train_seconds": seconds, "train_tokens": rows * cfg.pack_length, "steps": cfg.steps, "curve": curve,
            "train_rows": report["data"]["rows"], "resumed": resumable}  # fmt: skip
    model = load_causal_lm(str(out / "merged" if mode == "lora" else out), f"the {mode} run", torch.float32)
    return model, info


def measure(cfg: RecoveryConfig) -> tuple[Rows, dict]:
    cfg.model = model_or_default(cfg.model)
    rows = Rows(cfg, committed=cfg.rows_json)
    tokenizer = load_tokenizer(cfg.model, "--model")
    evaluation = Evaluation(cfg, tokenizer, "cpu")
    context = {"versions": {**versions()}, "boolq_yes_share": evaluation.boolq_yes_share, "model": cfg.model}
    if cfg.measured_only:
        for name in ("dense", "pruned", *(arm.name for arm in cfg.arm_list)):
            rows.get(name)
        if not {"dense", "pruned"} <= {r["name"] for r in rows.rows}:
            raise UserError(
                f"--measured_only: the dense and pruned rows of these settings are neither in {rows.path} "
                f"nor in {cfg.rows_json}"
            )
        return rows, context
    for name, path in (("dense", cfg.model), ("pruned", str(prune_once(cfg, rows.dir)))):
        if rows.get(name) is None:
            model = load_causal_lm(path, name, torch.float32)
            rows.add({"name": name, "params": count_parameters(model), **evaluation(model)})
            del model
    pruned = rows.dir / "pruned"
    for arm in cfg.arm_list:
        if rows.get(arm.name) is not None:
            continue
        model, info = train_arm(cfg, pruned, arm, rows.dir / arm.name.replace(":", "-").replace("@", "-s"))
        rows.add({"name": arm.name, "params": count_parameters(model), **info, **evaluation(model)})
        del model
    return rows, context


ACCURACY = {"avg": "avg", "avg_ex_boolq": "avg ex. BoolQ"}  # the zero-shot averages the report shows


def accuracy_averages(dense: dict) -> dict[str, int]:
    """The zero-shot averages the report shows (those bench/studies/criteria.py reports), each with its number of
    tasks."""
    return {m: len(dense["tasks"]) - (m == "avg_ex_boolq") for m in metrics_of(dense) if m in ACCURACY}


def average_se(cfg: RecoveryConfig, tasks: int) -> float:
    """Standard error (points) of a difference between two models' average accuracy over `tasks` tasks of
    `--limit` items each (binomial at p = 0.5, the worst case)."""
    return 100 * math.sqrt(2 * 0.25 / max(1, cfg.limit) / max(1, tasks))


def recovered(row: dict, dense: dict, pruned: dict, metric: str, noise: float = 0.0) -> float | None:
    """Share of the dense-pruned gap an arm won back: perplexity on a log scale, accuracy averages linearly.
    None when the accuracy gap is not above `noise` points (a share of noise means nothing)."""
    if metric == "ppl":
        gap = math.log(pruned["ppl"]) - math.log(dense["ppl"])
        return (math.log(pruned["ppl"]) - math.log(row["ppl"])) / gap if gap else None
    gap = value(dense, metric) - value(pruned, metric)
    return (value(row, metric) - value(pruned, metric)) / gap if gap > noise else None


def report(rows: list[dict], context: dict, cfg: RecoveryConfig) -> str:
    by = {r["name"]: r for r in rows}
    dense, pruned = by["dense"], by["pruned"]
    tasks = list(dense["tasks"])
    averages = accuracy_averages(dense)
    noise = {m: 2 * average_se(cfg, k) for m, k in averages.items()}
    v = context["versions"]
    reseeded = sorted({arm.seed for arm in cfg.arm_list if arm.seed is not None})
    seeds = f"training seed {cfg.seed}" + (
        f" (the arms named @SEED repeat one with training seed {', '.join(map(str, reseeded))})" if reseeded else ""
    )
    lines = [
        "# Recovery: plain fine-tuning vs distillation from the dense model (SmolLM2-135M, 20% pruned)",
        "",
        f"Written by `python bench/studies/recovery.py` (training and scoring its rows: "
        f"{sum(r.get('train_seconds', 0) + r['eval_seconds'] for r in rows) / 60:.0f} min on {v['device_name']}, torch "
        f"{v['torch']}, transformers {v['transformers']}, commit {(v['hfprune_commit'] or '?')[:10]}); nothing here "
        "is edited by hand.",
        "",
        f"- Pruned: `prune.py --pruning_ratio {cfg.ratio}` (MLP neurons, entropy, {cfg.calib_samples} x "
        f"{cfg.seq_len} tokens of `{cfg.calib_file}`, seed {cfg.seed}"
        + (f"; `--reconstruct {cfg.reconstruct}` on {cfg.reconstruct_samples} windows" if cfg.reconstruct != "none"
           else "") + ").",
        f"- Budget, the same for every arm: {cfg.steps} optimizer steps x {cfg.gradient_accumulation_steps} packed "
        f"LaMini rows x {cfg.pack_length} tokens = {cfg.steps * cfg.gradient_accumulation_steps * cfg.pack_length} "
        f"training tokens; {seeds}; fp32 on CPU; lr {cfg.lr_full:g} (full) / {cfg.lr_lora:g} "
        "(LoRA r 32), cosine, 10% warm-up.",
        "- Objectives: ce = the release's next-token CE on the response tokens; distill = KL(dense || student) "
        f"over the same tokens (T {cfg.temperature:g}, `--distill_from` the dense model); both = 0.5 KL + 0.5 CE.",
        f"- Evaluation: WikiText-2 perplexity ({cfg.ppl_windows} x {cfg.ppl_seq_len} tokens) and the offline "
        f"zero-shot tasks, the first {cfg.limit} items of each (one task's accuracy has a standard error of about "
        f"±{100 * math.sqrt(0.25 / max(1, cfg.limit)):.1f} points)."
        + (
            f" BoolQ: {context['boolq_yes_share']:.0f}% of its items are 'yes' (always-yes scores that)."
            if context.get("boolq_yes_share") is not None
            else ""
        ),  # fmt: skip
        "- Recovered: the share of the dense-pruned gap won back (perplexity on a log scale, the accuracy "
        "averages linearly; not given where the dense-pruned accuracy gap is within two standard errors of a "
        "difference of two averages, since a share of noise means nothing).",
        "",
        "| model | params | WikiText-2 ppl | recovered (ppl) | "
        + " | ".join(tasks)
        + " | "
        + " | ".join(f"{label} | recovered ({label})" for m, label in ACCURACY.items() if m in averages)
        + " | train min |",
        "|---|---|---|---|" + "---|" * (len(tasks) + 2 * len(averages) + 1),
    ]
    for r in rows:
        base = r["name"] in ("dense", "pruned")
        rec_p = recovered(r, dense, pruned, "ppl")
        cells = [f"{r['tasks'][t]:.1f}" for t in tasks]
        for m in averages:
            rec = recovered(r, dense, pruned, m, noise[m])
            cells += [f"{value(r, m):.2f}", "–" if base or rec is None else f"{rec:.0%}"]
        lines.append(
            f"| {r['name']} | {r['params'] / 1e6:.1f}M | {r['ppl']:.2f} | {'–' if base else f'{rec_p:.0%}'} | "
            + " | ".join(cells) + " | "
            + (f"{r['train_seconds'] / 60:.0f}{' (resumed)' if r.get('resumed') else ''} |"
               if "train_seconds" in r else "– |")
        )  # fmt: skip
    gaps = [f"{ACCURACY[m]} {value(dense, m) - value(pruned, m):+.2f} points (two standard errors: {noise[m]:.1f})"
            for m in averages]  # fmt: skip
    lines += ["", f"The dense-pruned gap: perplexity {pruned['ppl'] / dense['ppl']:.2f}x; " + "; ".join(gaps) + "."]
    if any(r.get("resumed") for r in rows):
        lines += [
            "",
            "(resumed): the arm was cut off by a session's end and continued from its last checkpoint; "
            "its minutes count only the part after it. Tokens/s on an idle machine: docs/PERFORMANCE.md.",
        ]
    missing = [arm.name for arm in cfg.arm_list if arm.name not in by]
    if missing:
        lines += ["", f"Not measured yet (run again with `--resume`): {', '.join(missing)}."]
    lines += ["", *verdict(by, cfg)]
    return "\n".join(lines) + "\n"


def seed_runs(by: dict, mode: str, objective: str) -> list[dict]:
    """The rows of one arm: the study's seed and its repeats with other training seeds."""
    name = f"{mode}:{objective}"
    return [r for n, r in by.items() if n == name or n.startswith(f"{name}@")]


def seed_text(by: dict, mode: str, objective: str, d_ppl: float) -> str:
    """The verdict's sentence on training seeds: the perplexity difference `d_ppl` (ce - objective, seed --seed)
    against the largest seed-to-seed spread of the two arms, and the means where both arms have repeats."""
    ppls = {o: [r["ppl"] for r in seed_runs(by, mode, o)] for o in ("ce", objective)}
    spreads = [(max(p) - min(p), f"{mode}:{o}") for o, p in ppls.items() if len(p) > 1]
    if not spreads:
        return "One training seed: the perplexity difference has no seed spread yet."
    spread, name = max(spreads)
    text = (f"Another training seed moves {name}'s perplexity by {spread:.2f}: the difference is "
            f"{'larger' if abs(d_ppl) > spread else 'not larger'} than that.")  # fmt: skip
    if len(spreads) == 2:  # both arms have repeats
        m_ce, m_other = (sum(p) / len(p) for p in (ppls["ce"], ppls[objective]))
        text += (f" Mean over the seeds ({len(ppls[objective])} and {len(ppls['ce'])} runs): {m_other:.2f} vs "
                 f"{m_ce:.2f} ({'lower' if m_other < m_ce else 'higher'} by {abs(m_ce - m_other):.2f}).")  # fmt: skip
    return text


def verdict(by: dict, cfg: RecoveryConfig) -> list[str]:
    """Generated: does distillation beat plain CE per mode, by how much, against the evaluation's noise and the
    training seeds' spread."""
    out = []
    averages = accuracy_averages(by["dense"])
    for mode in ("full", "lora"):
        ce = by.get(f"{mode}:ce")
        for objective in ("distill", "both"):
            other = by.get(f"{mode}:{objective}")
            if ce is None or other is None:
                continue
            d_ppl = ce["ppl"] - other["ppl"]
            accuracy = []
            for m, k in averages.items():
                d, se = value(other, m) - value(ce, m), average_se(cfg, k)
                side = "beyond" if abs(d) > 2 * se else "within"
                accuracy.append(f"{ACCURACY[m]} {value(other, m):.2f} vs {value(ce, m):.2f} ({d:+.2f} points, "
                                f"{side} two standard errors of ±{se:.1f})")  # fmt: skip
            out.append(
                f"- {mode}: {objective} vs ce: perplexity {other['ppl']:.2f} vs {ce['ppl']:.2f} "
                f"({'lower' if d_ppl > 0 else 'higher'} by {abs(d_ppl):.2f}); " + "; ".join(accuracy)
                + ". " + seed_text(by, mode, objective, d_ppl)
            )  # fmt: skip
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in rows:
        if r.get("curve"):
            steps, ce, _ = zip(*r["curve"])
            ax.plot(steps, ce, label=r["name"], linestyle="--" if "@" in r["name"] else "-")  # another seed
    if not ax.lines:
        ax.text(0.5, 0.5, "no arm trained yet", ha="center", transform=ax.transAxes)
    ax.set(xlabel="optimizer step", ylabel="CE on the response tokens (training batch)",
           title="Recovery of SmolLM2-135M pruned 20%: training CE per arm")  # fmt: skip
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    setup_logging()

    def go() -> None:
        cfg = parse_config(RecoveryConfig, sys.argv[1:] if argv is None else argv)
        log.info("config: %s", json.dumps(cfg.settings(), sort_keys=True))
        start = time.perf_counter()
        rows, context = measure(cfg)
        seconds = time.perf_counter() - start
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        plot(rows.rows, cfg.beside(".png"))
        cfg.rows_json.write_text(json.dumps({"context": context, "rows": rows.every()}, indent=1))
        out.write_text(report(rows.rows, context, cfg))
        print(f"wrote {out} ({seconds / 60:.1f} min)")

    return run_cli(go)


if __name__ == "__main__":
    sys.exit(main())
