"""Probe Pruning on SmolLM2-135M against static pruning at the same per-layer widths -> docs/PROBE.md.

    python bench/studies/probe.py --resume                       # the study (about 13 minutes on 2 CPU cores)
    python bench/studies/probe.py --ppl_seq_len 1024 --calib_seq_len 1024 --resume   # the paper's window length
    python bench/studies/probe.py --ratios 0.2 --ppl_windows 4 --calib_windows 8 --out /tmp/probe/PROBE.md

Every row is the dense model with module/dynamic attached (layers 0-2 dense, the release's per-layer ratio, kept
MLP neurons a multiple of 64), scored on the first --ppl_windows WikiText-2 windows of --ppl_seq_len tokens (256:
the paper's 1024 cost this CPU too much for every row) in batches of
--batch_sizes (the probe is chosen per batch, so the batch size is part of the result): Probe Pruning (probe +
history + EMA), the oracle (the whole batch as the probe), the probe without history, and PP's metric swapped for
wanda_sp and FLAP; the static rows are the same wrapper with the history alone (no probe, no EMA): static PPsp,
wanda_sp and FLAP on the calibration activations, and entropy (our entropy-Taylor scores, --dynamic_prior
entropy). The entropy prior also scores a probe. One calibration (C4, --calib_windows x --calib_seq_len; the
release uses 2000 windows), one seed. Seconds are the CPU forward time of the evaluation, against dense at the same
batch size; the probe's FLOPs share is counted from the shapes. Rows persist in WORK; --resume continues.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import EvaluatedStudyConfig, Rows, model_or_default, study_main  # noqa: E402
from cfg.prune_config import PruneConfig  # noqa: E402
from dataset.calibration import load_documents, sample_windows  # noqa: E402
from module.dynamic.history import calibrate  # noqa: E402
from module.dynamic.probe import BATCH_RATIO, SEQ_RATIO, SKIP_LAYERS, kept_count, layer_ratio  # noqa: E402
from module.dynamic.wrap import ProbeSettings, attach  # noqa: E402
from module.model.layout import head_counts, layout_of  # noqa: E402
from module.model.mlp import count_parameters, find_mlps  # noqa: E402
from module.prune.scores import run_scores  # noqa: E402
from utils.cli import load_causal_lm, load_tokenizer, process_state  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.perplexity import local_rows, perplexity, text_windows  # noqa: E402
from utils.report import versions  # noqa: E402


@dataclass(frozen=True)
class Arm:
    """One way of choosing the kept units: a ProbeSettings variant, a metric, the prior, the parts."""

    key: str
    label: str
    variant: str
    metric: str = "ppsp"
    prior: bool = False
    parts: tuple[str, ...] = ("mlp",)
    static: bool = False


ARMS = [
    Arm("pp", "PP (probe + history)", "probe"),
    Arm("oracle", "full-batch probe (oracle)", "oracle"),
    Arm("probe_only", "probe without history", "probe_only"),
    Arm("pp_wanda_sp", "PP, wanda_sp metric", "probe", "wanda_sp"),
    Arm("pp_flap", "PP, FLAP metric", "probe", "flap"),
    Arm("pp_prior", "PP, entropy prior", "probe", prior=True),
    Arm("static_ppsp", "static PPsp (history only)", "history", static=True),
    Arm("static_wanda_sp", "static wanda_sp", "history", "wanda_sp", static=True),
    Arm("static_flap", "static FLAP", "history", "flap", static=True),
    Arm("static_entropy", "static entropy", "history", prior=True, static=True),
    Arm("pp_heads", "PP, MLP + query heads", "probe", parts=("mlp", "heads")),
    Arm("oracle_heads", "oracle, MLP + query heads", "oracle", parts=("mlp", "heads")),
]
BATCH_ARMS = ("pp",)  # also at the other batch sizes


@dataclass
class ProbeStudyConfig(EvaluatedStudyConfig):
    out: str = field(default="docs/PROBE.md", metadata={"help": "The report; a .json of rows beside."})
    work_dir: str = field(default="out/probe_study", metadata={"help": "Rows so far, the calibration."})
    limit: int = field(default=0, metadata={"help": "Unused here: perplexity only (zero-shot: evaluate.py)."})
    ppl_windows: int = field(default=20, metadata={"help": "WikiText-2 test windows (the first N)."})
    ppl_seq_len: int = field(default=256, metadata={"help": "Tokens per WikiText-2 window (the paper: 1024)."})
    ratios: str = field(default="0.2,0.4", metadata={"help": "Model-wide shares removed per batch."})
    batch_sizes: str = field(default="20,8,1", metadata={"help": "The first is every row's; the others: PP's."})
    calib_file: str = field(default="c4/c4_validation_2k.jsonl", metadata={"help": "Calibration text in DATA."})
    calib_windows: int = field(default=64, metadata={"help": "History windows (the release: 2000)."})
    calib_seq_len: int = field(default=256, metadata={"help": "Tokens per history window (the eval length)."})
    prior_windows: int = field(default=32, metadata={"help": "Windows of the entropy prior's importance pass."})
    prior_seq_len: int = field(default=256, metadata={"help": "Tokens per prior window (the docs' protocol)."})
    seed: int = field(default=0, metadata={"help": "Calibration draw."})
    arms: str = field(default=",".join(a.key for a in ARMS), metadata={"help": "The arms measured (the report "
                                                                               "shows every measured row)."})
    render_only: bool = field(default=False, metadata={"help": "With --resume: the report from the rows so far."})
    published: str = field(
        default=str(ROOT / "docs" / "probe_published.json"),
        metadata={"help": "The released code's rows (bench/studies/probe_reference.py; '' = none)."},
    )
    RUN_ONLY: ClassVar[tuple[str, ...]] = (  # rows are named by arm, ratio and batch: these only select them
        *EvaluatedStudyConfig.RUN_ONLY, "render_only", "arms", "published", "ratios", "batch_sizes")

    @property
    def arm_list(self) -> list[Arm]:
        keys = [k.strip() for k in self.arms.split(",") if k.strip()]
        unknown = set(keys) - {a.key for a in ARMS}
        if unknown:
            raise UserError(f"--arms: unknown {sorted(unknown)}; known: {', '.join(a.key for a in ARMS)}")
        return [a for a in ARMS if a.key in keys]

    @property
    def ratio_list(self) -> list[float]:
        return [float(r) for r in self.ratios.split(",") if r.strip()]

    @property
    def batch_list(self) -> list[int]:
        return [int(b) for b in self.batch_sizes.split(",") if b.strip()]




def row_name(arm: Arm, ratio: float, batch: int) -> str:
    return f"{arm.label}|{ratio:g}|b{batch}"


def probe_flops_share(model, settings: ProbeSettings, batch: int, seq: int) -> float:
    """The probe's forward FLOPs over the dense model's on one batch (matmuls; attention scores included): the
    probe's rows (the oracle: the whole batch) through gate/up and/or q/k/v + attention of every pruned layer."""
    if settings.probe == "none":
        return 0.0
    parts = settings.parts
    c = model.config
    heads = head_counts(c)
    h, n_mid, n_layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    qkv = h * (heads.query + 2 * heads.kv) * heads.head_dim
    per_token = 2 * (qkv + heads.query * heads.head_dim * h + 3 * h * n_mid) + 4 * seq * heads.query * heads.head_dim
    dense = batch * seq * (n_layers * per_token + 2 * h * c.vocab_size)
    full = settings.probe == "full"
    probe_seq = seq if full else min(max(math.ceil(SEQ_RATIO * seq), 2), seq)
    probe_tokens = (batch if full else math.ceil(BATCH_RATIO * batch)) * probe_seq
    per_probe = (2 * 2 * h * n_mid if "mlp" in parts else 0) + (  # gate/up; q/k/v and the probe's attention
        2 * qkv + 4 * probe_seq * heads.query * heads.head_dim if "heads" in parts else 0)  # fmt: skip
    return (n_layers - SKIP_LAYERS) * probe_tokens * per_probe / dense


def evaluation_windows(cfg: ProbeStudyConfig, tokenizer) -> torch.Tensor:
    """The first --ppl_windows WikiText-2 test windows of --ppl_seq_len tokens."""
    return text_windows(tokenizer, local_rows("wikitext2", cfg.data_dir), cfg.ppl_seq_len)[: cfg.ppl_windows]


def c4_windows(cfg: ProbeStudyConfig, tokenizer, count: int, seq_len: int) -> torch.Tensor:
    """`count` windows of `seq_len` tokens of --calib_file, drawn with --seed (the history's, the prior's)."""
    docs = load_documents(str(Path(cfg.data_dir) / cfg.calib_file))
    return sample_windows(docs, tokenizer, count, seq_len, cfg.seed)


def measure(cfg: ProbeStudyConfig) -> tuple[list[dict], dict]:
    cfg.model = model_or_default(cfg.model)
    rows = Rows(cfg, committed=Path(cfg.out).with_suffix(".json"))
    tokenizer = load_tokenizer(cfg.model, "--model")
    dense = load_causal_lm(cfg.model, "dense", torch.float32).eval()
    dense.set_attn_implementation("sdpa")
    windows = evaluation_windows(cfg, tokenizer)
    wanted = [(arm, r, cfg.batch_list[0]) for r in cfg.ratio_list for arm in cfg.arm_list]
    wanted += [(arm, r, b) for r in cfg.ratio_list for arm in cfg.arm_list if arm.key in BATCH_ARMS
               for b in cfg.batch_list[1:]]  # fmt: skip
    missing = [w for w in wanted if rows.get(row_name(*w)) is None]
    dense_rows = {b: rows.get(f"dense|b{b}") for b in cfg.batch_list}
    if cfg.render_only:
        return rows.every(), context(cfg)
    for b, row in dense_rows.items():
        if row is None:
            start = time.perf_counter()
            ppl = perplexity(dense, windows, b, False)["perplexity"]
            rows.save({"name": f"dense|b{b}", "arm": "dense", "batch": b, "ppl": ppl,
                       "seconds": time.perf_counter() - start, "params": count_parameters(dense)})  # fmt: skip
            print(f"dense at batch {b}: {ppl:.3f}", flush=True)
    if not missing:
        return rows.every(), context(cfg)
    calib = c4_windows(cfg, tokenizer, cfg.calib_windows, cfg.calib_seq_len)
    start = time.perf_counter()
    history = calibrate(dense, layout_of(dense, "dynamic"), calib, 4, False)
    calib_seconds = time.perf_counter() - start
    prior = None
    if any(arm.prior for arm, _, _ in missing):
        prior_cfg = PruneConfig(origin_path=cfg.model, pruning_ratio="0.2", calib_samples=cfg.prior_windows,
                                seq_len=cfg.prior_seq_len, seed=cfg.seed, progress=False,
                                importance_cache=str(Path(cfg.work_dir) / "cache"),
                                calib_dataset=str(Path(cfg.data_dir) / cfg.calib_file))  # fmt: skip
        prior_windows = c4_windows(cfg, tokenizer, cfg.prior_windows, cfg.prior_seq_len)
        prior = run_scores(prior_cfg, dense, find_mlps(dense), prior_windows, torch.float32, torch.device("cpu"),
                           process_state("cpu"))[0]  # fmt: skip
    for arm, ratio, batch in missing:
        model = copy.deepcopy(dense)
        settings = ProbeSettings.of(arm.variant, ratio=ratio, parts=arm.parts, metric=arm.metric, prior=arm.prior)
        attach(model, settings, history, prior if arm.prior else None)
        start = time.perf_counter()
        ppl = perplexity(model, windows, batch, False)["perplexity"]
        seconds = time.perf_counter() - start
        n_layers = dense.config.num_hidden_layers
        r = layer_ratio(n_layers, ratio)
        row = {"name": row_name(arm, ratio, batch), "arm": arm.label, "ratio": ratio, "batch": batch, "ppl": ppl,
               "seconds": seconds, "static": arm.static, "parts": list(arm.parts), "layer_ratio": r,
               "mlp_kept": kept_count(dense.config.intermediate_size, r, settings.multiple),
               "heads_kept": kept_count(head_counts(dense.config).query, r) if "heads" in arm.parts else None,
               "probe_flops_share": probe_flops_share(dense, settings, batch, cfg.ppl_seq_len),
               "calibration_seconds": calib_seconds}  # fmt: skip
        rows.save(row)
        print(f"{row['name']}: {ppl:.3f} ({seconds:.0f} s)", flush=True)
        del model
    return rows.every(), context(cfg)


def context(cfg: ProbeStudyConfig) -> dict:
    return {"versions": versions(), "model": cfg.model, "settings": cfg.settings()}


def render(rows: list[dict], ctx: dict, cfg: ProbeStudyConfig) -> str:
    by_name = {r["name"]: r for r in rows}
    b0 = cfg.batch_list[0]
    dense = {b: by_name.get(f"dense|b{b}") for b in cfg.batch_list}
    lines = [
        "# Probe Pruning: per-batch pruning against static pruning at the same widths",
        "",
        f"Written by `python bench/studies/probe.py` from its rows (`PROBE.json`); nothing edited by hand. Model "
        f"{Path(ctx['model']).name}; WikiText-2: the first {cfg.ppl_windows} windows of {cfg.ppl_seq_len} tokens "
        f"(our protocol's windows, more of them so a batch of {b0} exists); history from {cfg.calib_windows} C4 "
        f"windows x {cfg.calib_seq_len} tokens (seed {cfg.seed}; the release uses 2000); the entropy prior from "
        f"{cfg.prior_windows} x {cfg.prior_seq_len}. Layers 0-2 are never pruned, the others at the release's "
        f"ratio round(L/(L-3) r, 2), kept MLP neurons a multiple of 64, query heads only. Dense: "
        + ", ".join(f"batch {b} **{d['ppl']:.2f}**" for b, d in dense.items() if d) + ".",
        "",
        f"| ratio | arm | kept per pruned layer | ppl (batch {b0}) | CPU seconds vs dense | probe FLOPs |",
        "|---|---|---|---|---|---|",
    ]
    for ratio in cfg.ratio_list:
        for arm in ARMS:
            r = by_name.get(row_name(arm, ratio, b0))
            if r is None:
                continue
            kept = f"{r['mlp_kept']} neurons" + (f", {r['heads_kept']} heads" if r.get("heads_kept") else "")
            speed = f"{r['seconds'] / dense[b0]['seconds']:.2f}x" if dense.get(b0) else "–"
            lines.append(f"| {ratio:g} | {arm.label} | {kept} | {r['ppl']:.2f} | {speed} | "
                         f"{r['probe_flops_share']:.1%} |")  # fmt: skip
    if len(cfg.batch_list) > 1:
        lines += ["", "## The batch size (PP chooses per batch)", "",
                  "| ratio | " + " | ".join(f"batch {b}" for b in cfg.batch_list) + " |",
                  "|---|" + "---|" * len(cfg.batch_list)]  # fmt: skip
        for ratio in cfg.ratio_list:
            cells = []
            for b in cfg.batch_list:
                r = by_name.get(row_name(ARMS[0], ratio, b))
                cells.append(f"{r['ppl']:.2f}" if r else "–")
            lines.append(f"| {ratio:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines + against_published(by_name, cfg)) + "\n"


def against_published(by_name: dict, cfg: ProbeStudyConfig) -> list[str]:
    """Our PP rows beside the released code's on the same windows (--published), when it was run."""
    path = Path(cfg.published) if cfg.published else None
    if path is None or not path.is_file():
        return []
    published = json.loads(path.read_text())
    ours_arm = {"mlp": ARMS[0], "mlp+heads": next(a for a in ARMS if a.key == "pp_heads")}
    lines = ["", "## Against the released code (same windows, same history)", "", published["about"], "",
             "| ratio | pruned | released PP | ours | ours vs released |", "|---|---|---|---|---|"]  # fmt: skip
    for row in published["rows"]:
        ours = by_name.get(row_name(ours_arm[row["parts"]], row["ratio"], row["batch"]))
        if ours is None:
            continue
        lines.append(f"| {row['ratio']:g} | {row['parts']} | {row['ppl']:.2f} | {ours['ppl']:.2f} | "
                     f"{ours['ppl'] / row['ppl'] - 1:+.1%} |")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    return study_main(ProbeStudyConfig, measure, render, argv)


if __name__ == "__main__":
    sys.exit(main())
