"""Compensation after removal on SmolLM2-135M: none / bias / ls for every structure -> docs/RECONSTRUCTION.md.

    python bench/studies/reconstruction.py --resume          # the whole study (hours on 2 CPU cores; resumable)
    python bench/studies/reconstruction.py --ratios 0.2 --seeds 0 --limit 0 --out /tmp/rec/RECONSTRUCTION.md
    # zero-shot added to the rows of a --limit 0 study (docs/RECONSTRUCTION.md), each model made again:
    python bench/studies/reconstruction.py --seeds 0 --limit 0 --resume --zero_shot_items 200 \
        --only mlp-entropy-0.2-none,mlp-entropy-0.2-ls_obs
    # the refit's peak memory added to rows measured before the refit recorded it, each model made again:
    python bench/studies/reconstruction.py --seeds 0 --limit 0 --resume --refit_peak true --only mlp-entropy-0.2-ls

Every row is one prune.py run (module.pipeline.prune_model) reloaded with plain `from_pretrained`: MLP neurons at
each ratio with entropy, entropy_wanda and wanda_sp; each other structure alone at its docs/STRUCTURES.md size
(3 of 9 key/value-grouped heads, 4 of 30 layers, 522 of 576 hidden channels; entropy, block_influence for the
layers); the mix searched at each ratio (entropy; with a reconstruction its best candidates re-ranked after it);
each with --reconstruct none, bias and ls (and ls with the kept MLP neurons re-chosen by the refit,
--reconstruct_select obs), for two calibration seeds. Scoring keeps the docs' protocol (32 C4
windows x 256 tokens); the refit uses --reconstruct_samples windows of the same draw. Scored like the other
studies (bench/common.py: WikiText-2 on 8 x 1024 tokens, the offline zero-shot tasks on their first --limit
items) plus held-out C4: windows from C4 documents that no seed's calibration draw used. An ablation at 20%
(entropy, seed 0) measures the refit's target (dense vs own) and ridge. Rows persist; --resume continues.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import EvaluatedStudyConfig, Evaluation, Rows, model_or_default, prune, study_main, value  # noqa: E402
from dataset.calibration import draw_windows, heldout_windows, load_documents  # noqa: E402
from module.model.mlp import count_parameters  # noqa: E402
from module.prune.refit import default_damp  # noqa: E402
from utils.cli import load_causal_lm, load_tokenizer  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.perplexity import perplexity  # noqa: E402
from utils.report import versions  # noqa: E402

STRUCTURES = ("heads", "layers", "hidden")
# a row's mode -> --reconstruct, --reconstruct_writers, --reconstruct_weighting, --reconstruct_select
MODES = {"none": ("none", "pruned", "uniform", "scores"), "bias": ("bias", "pruned", "uniform", "scores"),
         "ls": ("ls", "pruned", "uniform", "scores"), "ls_rms": ("ls", "pruned", "rms", "scores"),
         "ls_all": ("ls", "all", "uniform", "scores"), "ls_obs": ("ls", "pruned", "rms", "obs")}
TARGETS = {0.2: {"mlp": 55.0, "mix": 50.0}, 0.3: {"mlp": 110.0, "mix": 110.0}}  # the issue's, WikiText-2 ppl


@dataclass
class ReconstructionStudyConfig(EvaluatedStudyConfig):
    out: str = field(default="docs/RECONSTRUCTION.md", metadata={"help": "The report; a .json of rows beside."})
    work_dir: str = field(default="out/reconstruction_study", metadata={"help": "Rows so far, pruned models."})
    limit: int = field(default=200, metadata={"help": "Items per zero-shot task (0 = perplexity only)."})
    ratios: str = field(default="0.2,0.3", metadata={"help": "Shares of all parameters (MLP rows and the mix)."})
    seeds: str = field(default="0,1", metadata={"help": "Calibration seeds."})
    criteria: str = field(default="entropy,entropy_wanda,wanda_sp", metadata={"help": "Criteria of the MLP rows."})
    modes: str = field(default="none,bias,ls,ls_rms,ls_all,ls_obs", metadata={
        "help": "--reconstruct settings (ls_rms: ls with --reconstruct_weighting rms; ls_all: with "
                "--reconstruct_writers all; ls_obs: rms with --reconstruct_select obs)."})  # fmt: skip
    structures: str = field(default="heads,layers,hidden", metadata={"help": "Structures alone ('' = none)."})
    heads_keep: int = field(default=3, metadata={"help": "Key/value groups kept of the heads row (STRUCTURES.md)."})
    layers_remove: int = field(default=4, metadata={"help": "Layers removed in the layers row (STRUCTURES.md)."})
    hidden_keep: int = field(default=522, metadata={"help": "Hidden channels kept in its row (STRUCTURES.md)."})
    mix: bool = field(default=True, metadata={"help": "Also the searched mix at each ratio."})
    mix_criteria: str = field(default="entropy", metadata={
        "help": "Criteria of the mix rows: CRITERION[+STRUCTURE=CRITERION...] (e.g. entropy+layers=block_influence: "
                "prune.py --criterion entropy --structure_criteria layers=block_influence)."})  # fmt: skip
    calib_file: str = field(default="c4/c4_validation_2k.jsonl", metadata={"help": "Calibration text in DATA."})
    calib_samples: int = field(default=32, metadata={"help": "Windows the importance pass scores on."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per calibration window."})
    reconstruct_samples: int = field(default=128, metadata={"help": "Windows of the refit (same draw)."})
    target: str = field(default="dense", metadata={"help": "--reconstruct_target of the rows."})
    damp: float | None = field(default=None, metadata={
        "help": "--reconstruct_damp of the rows (unset: prune.py's default, 0.1, or 0.3 for ls_obs)."})
    ablation: bool = field(default=True, metadata={"help": "The target and ridge ablation at ratio 0.2, seed 0."})
    render_only: bool = field(default=False, metadata={"help": "With --resume: write the report from the rows "
                                                               "measured so far, measuring nothing new."})  # fmt: skip
    only: str = field(default="", metadata={"help": "Measure only the rows whose names start with one of these "
                                                    "(comma list, e.g. mlp-entropy-0.3,layers); the report shows "
                                                    "every row measured."})  # fmt: skip
    # what only selects rows (each row's name says its part, criterion, ratio and mode) changes no measured row;
    # the seeds do: the held-out C4 windows avoid every seed's calibration draw
    RUN_ONLY: ClassVar[tuple[str, ...]] = (*EvaluatedStudyConfig.RUN_ONLY, "render_only", "only", "ratios", "criteria",
                                           "modes", "structures", "mix", "mix_criteria", "ablation",
                                           "zero_shot_items", "refit_peak")  # fmt: skip
    c4_windows: int = field(default=32, metadata={"help": "Held-out C4 windows."})
    c4_seq_len: int = field(default=512, metadata={"help": "Tokens per held-out C4 window."})
    zero_shot_items: int = field(default=0, metadata={
        "help": "With --limit 0: add the zero-shot average at N items per task to the measured rows --zero_shot "
                "picks (and dense), each model made again by the same prune.py run; its WikiText-2 perplexity must "
                "reproduce the row's. Rows named zsN|<row>."})  # fmt: skip
    refit_peak: bool = field(default=False, metadata={
        "help": "Add the refit's peak memory to the measured rows --only selects that were measured before the refit "
                "recorded it, each model made again by the same prune.py run (its WikiText-2 perplexity must "
                "reproduce the row's); nothing else of the row changes."})  # fmt: skip
    zero_shot: str = field(
        default="main",
        metadata={"help": "Rows scored zero-shot: all, or main (the first seed's none and ls rows of entropy MLP "
                          "neurons, the mix and each structure alone; the others: perplexity only)."},
    )  # fmt: skip

    def __post_init__(self) -> None:
        self.ratio_list = [float(r) for r in self.ratios.split(",") if r.strip()]
        self.seed_list = [int(s) for s in self.seeds.split(",") if s.strip()]
        self.criterion_list = [c.strip() for c in self.criteria.split(",") if c.strip()]
        self.mix_criterion_list = [c.strip() for c in self.mix_criteria.split(",") if c.strip()]
        self.mode_list = [m.strip() for m in self.modes.split(",") if m.strip()]
        self.structure_list = [s.strip() for s in self.structures.split(",") if s.strip()]
        if set(self.structure_list) - set(STRUCTURES):
            raise ValueError(f"--structures: valid are {', '.join(STRUCTURES)}")
        if set(self.mode_list) - set(MODES):
            raise ValueError(f"--modes: valid are {', '.join(MODES)}")
        if self.zero_shot not in ("all", "main"):
            raise ValueError(f"--zero_shot {self.zero_shot!r} is not all or main")
        if self.zero_shot_items and self.limit:
            raise ValueError("--zero_shot_items adds zero-shot to rows measured without it: give --limit 0")

    def settings(self) -> dict:
        # with --limit 0 no row is scored zero-shot: --zero_shot only picks the rows --zero_shot_items adds zsN rows
        # to, so it changes no measured row (held at its default, the key of the rows measured so far)
        return {**super().settings(), **({} if self.limit else {"zero_shot": "main"})}

    def damp_of(self, mode: str) -> float:
        """The ridge of a mode's rows: --damp, or prune.py's default for its neuron selection."""
        if self.damp is not None:
            return self.damp
        return default_damp(MODES[mode][3])

    def main_refit(self, mode: str) -> dict:
        """The target and ridge of a mode's main rows (the others are ablation rows)."""
        return {"target": self.target, "damp": self.damp_of(mode)}

    def selected(self, name: str) -> bool:
        """Whether --only lets this row be measured."""
        prefixes = [p.strip() for p in self.only.split(",") if p.strip()]
        return not prefixes or any(name.startswith(p) for p in prefixes)


@dataclass(frozen=True)
class Row:
    """One pruned model of the study: what it prunes, how, and the prune.py flags that make it."""

    part: str  # mlp, heads, layers, hidden, mix
    criterion: str
    ratio: float | None
    mode: str
    seed: int
    target: str = "dense"
    damp: float = 0.1

    def zero_shot(self, cfg: ReconstructionStudyConfig) -> bool:
        """Whether the row gets the zero-shot evaluation (--zero_shot main: the rows the issue's table compares)."""
        main = (self.seed == cfg.seed_list[0] and self.mode in ("none", "ls", "ls_rms", "ls_all", "ls_obs")
                and self.criterion not in ("entropy_wanda", "wanda_sp")
                and {"target": self.target, "damp": self.damp} == cfg.main_refit(self.mode))  # fmt: skip
        return cfg.zero_shot == "all" or main

    @property
    def name(self) -> str:
        size = f"-{self.ratio:g}" if self.ratio is not None else ""
        extra = "" if (self.target, self.damp) == ("dense", 0.1) or self.mode == "none" else \
            f"-{self.target}-d{self.damp:g}"  # fmt: skip
        return f"{self.part}-{self.criterion}{size}-{self.mode}{extra}-s{self.seed}"

    def argv(self, cfg: ReconstructionStudyConfig, out: Path) -> list[str]:
        criterion, *others = self.criterion.split("+")  # entropy+layers=block_influence: the layers scored by it
        if self.part == "mlp":
            parts = ["--pruning_ratio", str(self.ratio)]
        elif self.part == "mix":
            parts = ["--prune_parts", "auto", "--pruning_ratio", str(self.ratio),
                     *(["--structure_criteria", ",".join(others)] if others else [])]  # fmt: skip
        else:
            size = {"heads": ("--heads_keep", cfg.heads_keep), "layers": ("--layers_remove", cfg.layers_remove),
                    "hidden": ("--hidden_keep", cfg.hidden_keep)}[self.part]  # fmt: skip
            parts = ["--prune_parts", self.part, size[0], str(size[1])]
        mode, writers, weighting, select = MODES[self.mode]
        recon = [] if mode == "none" else ["--reconstruct", mode, "--reconstruct_writers", writers,
                                           "--reconstruct_weighting", weighting, "--reconstruct_select", select,
                                           "--reconstruct_target", self.target,
                                           "--reconstruct_damp", str(self.damp), "--reconstruct_samples",
                                           str(cfg.reconstruct_samples)]  # fmt: skip
        return ["--origin_path", cfg.model, "--criterion", criterion, *parts, *recon,
                "--calib_dataset", str(Path(cfg.data_dir) / cfg.calib_file), "--calib_samples", str(cfg.calib_samples),
                "--seq_len", str(cfg.seq_len), "--seed", str(self.seed), "--batch_size", "4", "--importance_cache",
                str(Path(cfg.work_dir) / "cache"), "--output_dir", str(out), "--overwrite",
                "--no_progress"]  # fmt: skip


def study_rows(cfg: ReconstructionStudyConfig) -> list[Row]:
    rows = []
    for seed in cfg.seed_list:
        for ratio in cfg.ratio_list:
            for criterion in cfg.criterion_list:
                rows += [Row("mlp", criterion, ratio, mode, seed, cfg.target, cfg.damp_of(mode))
                         for mode in cfg.mode_list]  # fmt: skip
            if cfg.mix:
                rows += [Row("mix", criterion, ratio, mode, seed, cfg.target, cfg.damp_of(mode))
                         for criterion in cfg.mix_criterion_list for mode in cfg.mode_list]  # fmt: skip
        for part in cfg.structure_list:
            criterion = "block_influence" if part == "layers" else "entropy"
            # prune.py refuses bias with hidden channels alone: a channel removed from the stream has no mean to
            # put back (measured before the refusal: the model of none, to the last digit); ls_obs re-chooses MLP
            # neurons, which a structure alone keeps whole (its model would be ls_rms's)
            rows += [Row(part, criterion, None, mode, seed, cfg.target, cfg.damp_of(mode)) for mode in cfg.mode_list
                     if (part, mode) != ("hidden", "bias") and mode != "ls_obs"]
    if cfg.ablation and 0.2 in cfg.ratio_list and cfg.seed_list:
        seed = cfg.seed_list[0]
        rows += [Row("mlp", "entropy", 0.2, "ls", seed, target, damp)
                 for target, damp in (("dense", 0.01), ("dense", 0.3), ("dense", 1.0), ("own", 0.1), ("own", 0.01))]
    if cfg.ablation and "ls_obs" in cfg.mode_list:  # obs chooses the neurons on the refit's ridge: every seed, ratio
        rows += [Row("mlp", "entropy", ratio, "ls_obs", seed, "dense", damp)
                 for ratio in cfg.ratio_list for seed in cfg.seed_list for damp in (0.1, 0.3, 1.0)
                 if {"target": "dense", "damp": damp} != cfg.main_refit("ls_obs")]  # fmt: skip
    return rows


class HeldoutC4:
    """Perplexity on C4 windows from documents that no seed's calibration draw (of --reconstruct_samples) used."""

    def __init__(self, cfg: ReconstructionStudyConfig, tokenizer):
        docs = load_documents(str(Path(cfg.data_dir) / cfg.calib_file))
        n = max(cfg.calib_samples, cfg.reconstruct_samples)
        used = set().union(*(draw_windows(docs, tokenizer, n, cfg.seq_len, s)[1] for s in cfg.seed_list))
        self.windows = heldout_windows(docs, tokenizer, used, cfg.c4_windows, cfg.c4_seq_len, 0, "--c4_windows")

    def __call__(self, model) -> float:
        return perplexity(model, self.windows, 4, False)["perplexity"]


def measure(cfg: ReconstructionStudyConfig) -> tuple[list[dict], dict]:
    cfg.model = model_or_default(cfg.model)
    if not (Path(cfg.data_dir) / cfg.calib_file).is_file():
        raise UserError(f"--calib_file {Path(cfg.data_dir) / cfg.calib_file} does not exist")
    rows = Rows(cfg, committed=Path(cfg.out).with_suffix(".json"))
    tokenizer = load_tokenizer(cfg.model, "--model")
    evaluation = Evaluation(cfg, tokenizer, "cpu")
    perplexity_only = Evaluation(replace(cfg, limit=0), tokenizer, "cpu")
    c4 = HeldoutC4(cfg, tokenizer)
    if rows.get("dense") is None and not cfg.render_only:
        model = load_causal_lm(cfg.model, "dense", torch.float32).eval()
        rows.add({"name": "dense", "params": count_parameters(model), "c4_ppl": c4(model), **evaluation(model)})
    for row in study_rows(cfg):
        if rows.get(row.name) is not None or cfg.render_only or not cfg.selected(row.name):
            continue
        model, report, seconds = made(row, cfg, rows.dir / "model")
        recon = report.get("reconstruction") or {}
        rows.add({"name": row.name, "part": row.part, "criterion": row.criterion, "ratio": row.ratio,
                  "mode": row.mode, "seed": row.seed, "target": row.target, "damp": row.damp,
                  "achieved_ratio": report.get("achieved_ratio"), "mix": report.get("mix"),
                  "params": count_parameters(model), "prune_seconds": seconds,
                  "refit_seconds": recon.get("seconds"), "refit_peak_bytes": recon.get("peak_memory_bytes"),
                  "c4_ppl": c4(model), **(evaluation if row.zero_shot(cfg) else perplexity_only)(model)})  # fmt: skip
        del model
    if cfg.refit_peak and not cfg.render_only:
        add_refit_peak(cfg, rows, perplexity_only)
    if cfg.zero_shot_items and not cfg.render_only:
        add_zero_shot(cfg, rows, tokenizer)
    return rows.every(), {"versions": versions(), "model": cfg.model, "settings": cfg.settings()}


def made(row: Row, cfg: ReconstructionStudyConfig, out: Path) -> tuple[torch.nn.Module, dict, float]:
    """The row's prune.py run, then its model reloaded with plain `from_pretrained`, its report and seconds."""
    start = time.perf_counter()
    prune(row.argv(cfg, out))
    seconds = time.perf_counter() - start
    report = json.loads((out / "prune_report.json").read_text())
    return load_causal_lm(str(out), row.name, torch.float32).eval(), report, seconds


def made_again(row: Row, cfg: ReconstructionStudyConfig, rows: Rows, evaluation: Evaluation,
               measured: dict) -> tuple[torch.nn.Module, dict, dict]:
    """The row's model made again (prune.py is deterministic for a seed), its evaluation and prune report; a
    perplexity that does not reproduce the row's stops the study, since what is added would describe another
    model."""
    model, report, _ = made(row, cfg, rows.dir / "model")
    result = evaluation(model)
    if abs(result["ppl"] / measured["ppl"] - 1) > 1e-3:
        raise UserError(f"{row.name}: made again it gives WikiText-2 perplexity {result['ppl']:.3f}, not the row's "
                        f"{measured['ppl']:.3f}; what it adds would describe another model")  # fmt: skip
    return model, result, report


def add_refit_peak(cfg: ReconstructionStudyConfig, rows: Rows, perplexity_only: Evaluation) -> None:
    """--refit_peak: the refit's peak memory for the selected rows measured before the refit recorded it."""
    measured = {r["name"]: r for r in rows.every()}
    for row in study_rows(cfg):
        got = measured.get(row.name)
        if got is None or row.mode == "none" or not cfg.selected(row.name) or got.get("refit_peak_bytes"):
            continue
        model, _, report = made_again(row, cfg, rows, perplexity_only, got)
        peak = report["reconstruction"]["peak_memory_bytes"]
        rows.update(row.name, refit_peak_bytes=peak)
        print(f"{row.name}: refit peak {peak / 2**30:.2f} GiB (made again)", flush=True)
        del model


def add_zero_shot(cfg: ReconstructionStudyConfig, rows: Rows, tokenizer) -> None:
    """--zero_shot_items N: a zsN|<row> row for dense and every measured row --zero_shot picks, from the model
    made again (made_again)."""
    evaluation = Evaluation(replace(cfg, limit=cfg.zero_shot_items, zero_shot_items=0), tokenizer, "cpu")
    measured = {r["name"]: r for r in rows.every()}
    for name, row in [("dense", None), *((r.name, r) for r in study_rows(cfg) if r.zero_shot(cfg))]:
        zs = f"zs{cfg.zero_shot_items}|{name}"
        if name not in measured or not cfg.selected(name) or rows.get(zs) is not None:
            continue
        if row is None:
            model = load_causal_lm(cfg.model, "dense", torch.float32).eval()
            result = evaluation(model)
        else:
            model, result, _ = made_again(row, cfg, rows, evaluation, measured[name])
        rows.add({"name": zs, "of": name, "items": cfg.zero_shot_items, "params": count_parameters(model), **result})
        del model


def with_zero_shot(rows: list[dict]) -> list[dict]:
    """The rows with the zero-shot of their zsN rows (the most items) filled in; the zsN rows themselves left out."""
    added = {}
    for r in sorted((r for r in rows if "of" in r), key=lambda r: r["items"]):
        added[r["of"]] = r
    return [{**r, **({"avg": added[r["name"]]["avg"], "tasks": added[r["name"]]["tasks"],
                      "zero_shot_items": added[r["name"]]["items"]} if r["name"] in added else {})}
            for r in rows if "of" not in r]  # fmt: skip


def zero_shot_cell(rows: list[dict]) -> str:
    """The zero-shot average, and in brackets the average over the tasks other than BoolQ (at 200 items BoolQ
    swings by up to 27 points between models of about the same quality, so it can decide the average alone)."""
    measured = [r for r in rows if r.get("avg") is not None]
    if not measured:
        return "–"
    text = cell(rows, "avg", 2)
    if all("boolq" in r["tasks"] and len(r["tasks"]) > 1 for r in measured):
        text += f" ({seeds_cell([None if r.get('avg') is None else value(r, 'avg_ex_boolq') for r in rows], 2)})"
    return text


def rows_where(rows: list[dict], **kw) -> list[dict]:
    """The rows whose fields equal every keyword, seed by seed (the order of a cell's "seed 0 / 1")."""
    return sorted((r for r in rows if all(r.get(k) == v for k, v in kw.items())), key=lambda r: r["seed"])


def mixes_cell(rows: list[dict]) -> str:
    """The mix each seed's search chose: one when they agree, else seed by seed."""
    chosen = [str(r.get("mix")) for r in rows]
    return chosen[0] if len(set(chosen)) == 1 else " / ".join(chosen)


def seeds_cell(values: list[float | None], digits: int) -> str:
    """Values seed by seed ("seed 0 / 1"), "–" in the place of a seed without one; one "–" when none has one."""
    if all(v is None for v in values):
        return "–"
    return " / ".join("–" if v is None else f"{v:.{digits}f}" for v in values)


def cell(rows: list[dict], metric: str, digits: int = 1, scale: float = 1.0) -> str:
    return seeds_cell([None if r.get(metric) is None else r[metric] * scale for r in rows], digits)


def refit_cells(rows: list[dict]) -> str:
    """The refit's seconds and its peak memory (GiB) cells."""
    return f"{cell(rows, 'refit_seconds', 0)} | {cell(rows, 'refit_peak_bytes', 2, 2**-30)}"


def log_gap_closed(dense: float, none: float, ls: float) -> float:
    """The share of the log-perplexity gap (pruned vs dense) that the reconstruction closes."""
    return (math.log(none) - math.log(ls)) / (math.log(none) - math.log(dense))


def zero_shot_protocol(cfg: ReconstructionStudyConfig, dense: dict) -> str:
    if cfg.limit:
        return f"the average over {len(dense['tasks'])} offline tasks, their first {cfg.limit} items"
    if dense.get("zero_shot_items"):
        return (f"the average over {len(dense['tasks'])} offline tasks, their first {dense['zero_shot_items']} "
                f"items, on the rows that show one (added by --zero_shot_items: each model made again by the same "
                f"run, its WikiText-2 perplexity reproduced within 0.1%)")  # fmt: skip
    return "not measured (--limit 0)"


def render(rows: list[dict], context: dict, cfg: ReconstructionStudyConfig) -> str:
    rows = with_zero_shot(rows)
    dense = next(r for r in rows if r["name"] == "dense")

    lines = [
        "# Reconstruction after removal: none / bias / ls",
        "",
        f"Written by `python bench/studies/reconstruction.py` from its rows "
        f"(`{Path(cfg.out).with_suffix('.json').name}`); nothing edited by hand. Model {Path(context['model']).name}; "
        f"scoring on {cfg.calib_samples} C4 windows x {cfg.seq_len} tokens, the refit on {cfg.reconstruct_samples} "
        f"windows of the same draw (--reconstruct_target "
        f"{cfg.target}, --reconstruct_damp {cfg.damp_of('ls'):g}, {cfg.damp_of('ls_obs'):g} for ls_obs); "
        f"cells: seed {' / '.join(cfg.seeds.split(','))}. "
        f"WikiText-2: the first {cfg.ppl_windows} windows of {cfg.ppl_seq_len} tokens; C4: {cfg.c4_windows} held-out "
        f"windows of {cfg.c4_seq_len} tokens from documents no calibration draw used; zero-shot: "
        f"{zero_shot_protocol(cfg, dense)}. Dense: WikiText-2 "
        f"**{dense['ppl']:.2f}**, C4 {dense['c4_ppl']:.2f}, zero-shot {zero_shot_cell([dense])}. Modes: none (the "
        f"units dropped), bias (FLAP's mean of each consumer's lost output in a bias), ls (the least-squares "
        f"refit, --reconstruct_weighting uniform), ls_rms (ls with the default --reconstruct_weighting rms), ls_all "
        f"(ls, uniform, --reconstruct_writers all), ls_obs (ls_rms with --reconstruct_select obs: each layer's kept "
        f"MLP neurons re-chosen by greedy elimination on the refit's least squares, the count unchanged). Refit "
        f"peak: the process's resident memory at its highest during the refit, model and dense copy included "
        f"(sampled every 10 ms; on a GPU the allocator's peak); – on rows measured before the refit recorded its "
        f"own peak (--refit_peak adds it).",
        "",
        "| ratio | rows | mode | WikiText-2 ppl | C4 ppl | zero-shot avg (without BoolQ) | gap closed (log ppl) | "
        "refit s | refit peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for ratio in cfg.ratio_list:
        mixes = [("mix", c) for c in cfg.mix_criterion_list] if cfg.mix else []
        for part, criterion in [("mlp", c) for c in cfg.criterion_list] + mixes:
            none = rows_where(rows, part=part, criterion=criterion, ratio=ratio, mode="none")
            for mode in cfg.mode_list:
                got = rows_where(rows, part=part, criterion=criterion, ratio=ratio, mode=mode,
                                 **({} if mode == "none" else cfg.main_refit(mode)))  # fmt: skip
                if not got:
                    continue
                closed = "–" if mode == "none" or not none else " / ".join(
                    f"{log_gap_closed(dense['ppl'], n['ppl'], g['ppl']):.0%}" for n, g in zip(none, got))  # fmt: skip
                label = f"{part} ({criterion})" + (f": {mixes_cell(got)}" if part == "mix" else "")
                lines.append(f"| {ratio:g} | {label} | {mode} | {cell(got, 'ppl')} | {cell(got, 'c4_ppl')} | "
                             f"{zero_shot_cell(got)} | {closed} | {refit_cells(got)} |")  # fmt: skip
    for part in cfg.structure_list:
        none = rows_where(rows, part=part, mode="none")
        for mode in cfg.mode_list:
            got = rows_where(rows, part=part, mode=mode, **({} if mode == "none" else cfg.main_refit(mode)))
            if got:
                closed = "–" if mode == "none" or not none else " / ".join(
                    f"{log_gap_closed(dense['ppl'], n['ppl'], g['ppl']):.0%}" for n, g in zip(none, got))  # fmt: skip
                share = got[0].get("achieved_ratio") or 0
                lines.append(f"| {share:.3f} | {part} alone ({got[0]['criterion']}) | {mode} | {cell(got, 'ppl')} | "
                             f"{cell(got, 'c4_ppl')} | {zero_shot_cell(got)} | {closed} | "
                             f"{refit_cells(got)} |")  # fmt: skip
    lines += ["", *verdict(rows, cfg), "", *ablation_lines(rows, cfg), "",
              *reference_lines(Path(cfg.out).with_name("reconstruction_replaceme.json"))]  # fmt: skip
    return "\n".join(lines) + "\n"


def reference_lines(path: Path) -> list[str]:
    """ReplaceMe's published code beside ours on the same removed layers (bench/studies/replaceme_reference.py)."""
    if not path.is_file():
        return []
    result = json.loads(path.read_text())
    rows = result["rows"]
    out = ["## Removed layers: ReplaceMe's published code on the same layers and windows", "", result["about"], "",
           "| run | removed layers | WikiText-2 ppl | zero-shot avg | fit s |", "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        out.append(f"| {r['name']} | {', '.join(map(str, r['removed']))} | {r['ppl']:.2f} | {cell([r], 'avg', 2)} | "
                   f"{cell([r], 'refit_seconds', 0)} |")  # fmt: skip
    published = next((r for r in rows if r["name"].startswith("published/")), None)
    ours = [r for r in rows if r["name"].startswith("ours/ls")]
    if published and ours:
        best = min(ours, key=lambda r: r["ppl"])
        out += ["", f"Best of ours ({best['name']}): {best['ppl']:.2f} against the published {published['ppl']:.2f} "
                    f"({best['ppl'] / published['ppl'] - 1:+.1%})."]  # fmt: skip
    return out


def verdict(rows: list[dict], cfg: ReconstructionStudyConfig) -> list[str]:
    """The issue's targets, met or missed, with the values."""
    out = ["## Targets (WikiText-2 perplexity, entropy, every seed)", ""]
    for ratio, targets in TARGETS.items():
        for part, target in targets.items():
            for criterion in ["entropy"] if part == "mlp" else cfg.mix_criterion_list:
                for mode in [m for m in cfg.mode_list if MODES[m][0] == "ls"]:
                    got = rows_where(rows, part=part, ratio=ratio, mode=mode, criterion=criterion,
                                     **cfg.main_refit(mode))  # fmt: skip
                    if not got:
                        continue
                    worst = max(r["ppl"] for r in got)
                    state = "met" if worst <= target else f"missed by {worst - target:.1f}"
                    label = part if criterion == "entropy" else f"{part} ({criterion})"
                    out.append(f"- {ratio:g}, {label}, {mode}: {cell(got, 'ppl')} against <= {target:g}: "
                               f"**{state}**.")  # fmt: skip
    return out


def ablation_lines(rows: list[dict], cfg: ReconstructionStudyConfig) -> list[str]:
    """Each (ratio, mode, seed) of MLP, entropy, measured at more than one target or ridge."""
    groups: dict[tuple[float, str, int], list[dict]] = {}
    for r in rows:
        if r.get("part") == "mlp" and r.get("criterion") == "entropy" and r.get("mode") in ("ls", "ls_obs"):
            groups.setdefault((r["ratio"], r["mode"], r["seed"]), []).append(r)
    got = [r for key in sorted(groups) if len(groups[key]) > 1 for r in groups[key]]
    if not got:
        return []
    out = ["## The refit's target and ridge (MLP, entropy)", "",
           "| ratio | mode | seed | --reconstruct_target | --reconstruct_damp | WikiText-2 ppl | C4 ppl | refit s |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(got, key=lambda r: (r["ratio"], r["mode"], r["seed"], r["target"], r["damp"])):
        out.append(f"| {r['ratio']:g} | {r['mode']} | {r['seed']} | {r['target']} | {r['damp']:g} | "
                   f"{r['ppl']:.2f} | {r['c4_ppl']:.2f} | {r['refit_seconds']:.0f} |")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    return study_main(ReconstructionStudyConfig, measure, render, argv)


if __name__ == "__main__":
    sys.exit(main())
