"""Probe Pruning on SmolLM2-135M against static pruning at the same per-layer widths -> docs/PROBE.md.

    python bench/studies/probe.py --resume                       # the study (about 30 minutes on 2 CPU cores)
    # the release's protocol: random 1024-token windows, history at 1024, three seeds (a second report)
    python bench/studies/probe.py --eval_windows random --ppl_seq_len 1024 --calib_seq_len 1024 --seeds 0,1,2 \
        --batch_sizes 20 --arms pp,static_ppsp,static_wanda_sp,static_flap,static_entropy \
        --out docs/PROBE_RELEASE.md --resume                      # about 50 minutes
    python bench/studies/probe.py --ratios 0.2 --ppl_windows 4 --calib_windows 8 --out /tmp/probe/PROBE.md

Every row is the dense model with module/dynamic attached (layers 0-2 dense, the release's per-layer ratio, kept
MLP neurons a multiple of 64), scored on --ppl_windows WikiText-2 windows of --ppl_seq_len tokens (`first`: the
first ones, our protocol, 256 tokens: the paper's 1024 cost this CPU too much for every row; `random`: the release's
draw, windows at random offsets of the token stream, seeded) in batches of
--batch_sizes (the probe is chosen per batch, so the batch size is part of the result): Probe Pruning (probe +
history + EMA), the oracle (the whole batch as the probe), the probe without history, and PP's metric swapped for
wanda_sp and FLAP; the static rows are the same wrapper with the history alone (no probe, no EMA): static PPsp,
wanda_sp and FLAP on the calibration activations, and entropy (our entropy-Taylor scores, --dynamic_prior
entropy) and entropy_wanda. The entropy prior also scores a probe. The "pruned model" rows cut a static arm's kept
neurons out of a copy of the model (what `prune.py` saves, here with the per-layer widths of the dynamic rows): the
same perplexity as the wrapper, the time of a physically smaller model, and with `ls` the refit of
`--reconstruct ls` on --refit_windows windows of the seed's C4 draw. Per seed (--seeds): one calibration draw (C4,
--calib_windows x --calib_seq_len; the release uses 2000 windows) and, with `random`, one draw of the evaluation
windows. Seconds are the CPU forward time of the evaluation, against dense at the same batch size and seed; the
probe's FLOPs share is counted from the shapes. Rows persist in WORK; --resume continues.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import mean, median
from typing import ClassVar

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import EvaluatedStudyConfig, Evaluation, Rows, fmt, model_or_default, study_main, value  # noqa: E402
from cfg.prune_config import PruneConfig  # noqa: E402
from dataset.calibration import load_documents, sample_windows  # noqa: E402
from module.dynamic.history import calibrate  # noqa: E402
from module.dynamic.probe import BATCH_RATIO, SEQ_RATIO, SKIP_LAYERS, kept_count, layer_ratio  # noqa: E402
from module.dynamic.wrap import ProbeSettings, attach  # noqa: E402
from module.model.layout import head_counts, layout_of  # noqa: E402
from module.model.mlp import count_parameters, find_mlps  # noqa: E402
from module.prune.reconstruct import REFIT_BATCH, reconstruct  # noqa: E402
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
    prior: str = ""  # the criterion of the prior's importance pass ("": no prior)
    parts: tuple[str, ...] = ("mlp",)
    static: bool = False
    pruned_model: str = ""  # static arms: "sliced" (the kept neurons cut out of a copy) or "ls" (then refit)


ARMS = [
    Arm("pp", "PP (probe + history)", "probe"),
    Arm("oracle", "full-batch probe (oracle)", "oracle"),
    Arm("probe_only", "probe without history", "probe_only"),
    Arm("pp_wanda_sp", "PP, wanda_sp metric", "probe", "wanda_sp"),
    Arm("pp_flap", "PP, FLAP metric", "probe", "flap"),
    Arm("pp_prior", "PP, entropy prior", "probe", prior="entropy"),
    Arm("static_ppsp", "static PPsp (history only)", "history", static=True),
    Arm("static_wanda_sp", "static wanda_sp", "history", "wanda_sp", static=True),
    Arm("static_flap", "static FLAP", "history", "flap", static=True),
    Arm("static_entropy", "static entropy", "history", prior="entropy", static=True),
    Arm("static_entropy_wanda", "static entropy_wanda", "history", prior="entropy_wanda", static=True),
    Arm("sliced_entropy", "static entropy, pruned model", "history", prior="entropy", static=True,
        pruned_model="sliced"),
    Arm("ls_entropy", "static entropy + ls, pruned model", "history", prior="entropy", static=True,
        pruned_model="ls"),
    Arm("ls_entropy_wanda", "static entropy_wanda + ls, pruned model", "history", prior="entropy_wanda",
        static=True, pruned_model="ls"),
    Arm("pp_heads", "PP, MLP + query heads", "probe", parts=("mlp", "heads")),
    Arm("oracle_heads", "oracle, MLP + query heads", "oracle", parts=("mlp", "heads")),
]
BATCH_ARMS = ("pp",)  # also at the other batch sizes


def arms_of(keys: str, flag: str) -> list[Arm]:
    """The arms a comma list of keys names, in ARMS order."""
    wanted = [k.strip() for k in keys.split(",") if k.strip()]
    unknown = set(wanted) - {a.key for a in ARMS}
    if unknown:
        raise UserError(f"{flag}: unknown {sorted(unknown)}; known: {', '.join(a.key for a in ARMS)}")
    return [a for a in ARMS if a.key in wanted]


@dataclass
class ProbeStudyConfig(EvaluatedStudyConfig):
    out: str = field(default="docs/PROBE.md", metadata={"help": "The report; a .json of rows beside."})
    work_dir: str = field(default="out/probe_study", metadata={"help": "Rows so far, the calibration."})
    limit: int = field(default=0, metadata={"help": "Unused (the zero-shot rows: --zero_shot_items)."})
    zero_shot_items: int = field(default=0, metadata={"help": "Items per zero-shot task of dense and the "
                                                                "--zero_shot_arms rows (0: none)."})
    zero_shot_arms: str = field(default="pp,oracle,static_ppsp,static_wanda_sp,static_flap,static_entropy,"
                                        "static_entropy_wanda,ls_entropy",
                                metadata={"help": "The arms scored zero-shot (lm_eval at --zero_shot_batch)."})
    zero_shot_batch: int = field(default=20, metadata={"help": "lm_eval's batch size: the batch PP chooses for "
                                                                 "(the paper's zero-shot evaluator: 20)."})
    prefill_repeats: int = field(default=0, metadata={"help": "Timed forwards of the first batch per "
                                                               "--prefill_arms row and dense (0: none); median."})
    prefill_arms: str = field(default="pp,static_ppsp,sliced_entropy", metadata={"help": "The arms timed."})
    ppl_windows: int = field(default=20, metadata={"help": "WikiText-2 test windows."})
    ppl_seq_len: int = field(default=256, metadata={"help": "Tokens per WikiText-2 window (the paper: 1024)."})
    eval_windows: str = field(default="first", metadata={"help": "first (consecutive, from the start of the test "
                                                                 "text) or random (the release: random offsets, "
                                                                 "drawn per seed)."})
    ratios: str = field(default="0.2,0.4", metadata={"help": "Model-wide shares removed per batch."})
    batch_sizes: str = field(default="20,8,1", metadata={"help": "The first is every row's; the others: PP's."})
    calib_file: str = field(default="c4/c4_validation_2k.jsonl", metadata={"help": "Calibration text in DATA."})
    calib_windows: int = field(default=64, metadata={"help": "History windows (the release: 2000)."})
    calib_seq_len: int = field(default=256, metadata={"help": "Tokens per history window (the eval length)."})
    refit_windows: int = field(default=128, metadata={"help": "C4 windows of --calib_seq_len the ls rows refit on "
                                                               "(the reconstruction study's 128)."})
    prior_windows: int = field(default=32, metadata={"help": "Windows of the entropy prior's importance pass."})
    prior_seq_len: int = field(default=256, metadata={"help": "Tokens per prior window (the docs' protocol)."})
    seeds: str = field(default="0", metadata={"help": "Calibration draws (and random windows' draws), comma list."})
    arms: str = field(default=",".join(a.key for a in ARMS), metadata={"help": "The arms measured (the report "
                                                                               "shows every measured row)."})
    render_only: bool = field(default=False, metadata={"help": "With --resume: the report from the rows so far."})
    published: str = field(
        default=str(ROOT / "docs" / "probe_published.json"),
        metadata={"help": "The released code's rows (bench/studies/probe_reference.py; '' = none)."},
    )
    RUN_ONLY: ClassVar[tuple[str, ...]] = (  # rows are named by arm, ratio and batch: these only select them
        *EvaluatedStudyConfig.RUN_ONLY, "render_only", "arms", "published", "ratios", "batch_sizes", "seeds",
        "zero_shot_items", "zero_shot_arms", "zero_shot_batch", "prefill_repeats", "prefill_arms")  # in their names

    def __post_init__(self) -> None:
        if self.eval_windows not in ("first", "random"):
            raise UserError(f"--eval_windows {self.eval_windows!r}: use first or random")
        self.arm_list, self.zero_shot_arm_list, self.prefill_arm_list, self.seed_list  # noqa: B018 -- one line first

    @property
    def arm_list(self) -> list[Arm]:
        return arms_of(self.arms, "--arms")

    @property
    def zero_shot_arm_list(self) -> list[Arm]:
        return arms_of(self.zero_shot_arms, "--zero_shot_arms")

    @property
    def prefill_arm_list(self) -> list[Arm]:
        return arms_of(self.prefill_arms, "--prefill_arms")

    @property
    def seed_list(self) -> list[int]:
        try:
            seeds = [int(x) for x in self.seeds.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--seeds {self.seeds!r}: a comma list of integers") from None
        if not seeds:
            raise UserError("--seeds: at least one seed")
        return seeds

    @property
    def ratio_list(self) -> list[float]:
        return [float(r) for r in self.ratios.split(",") if r.strip()]

    @property
    def batch_list(self) -> list[int]:
        return [int(b) for b in self.batch_sizes.split(",") if b.strip()]


def row_name(arm: Arm, ratio: float, batch: int, seed: int) -> str:
    return f"{arm.label}|{ratio:g}|b{batch}|s{seed}"


def dense_name(batch: int, seed: int) -> str:
    return f"dense|b{batch}|s{seed}"


def zero_shot_name(cfg: ProbeStudyConfig, arm: Arm | None, ratio: float, seed: int) -> str:
    """A zero-shot row (arm None: dense): its item count and lm_eval's batch size are part of it."""
    what = "dense" if arm is None else f"{arm.label}|{ratio:g}"
    return f"zero-shot {cfg.zero_shot_items}|{what}|b{cfg.zero_shot_batch}|s{seed}"


def prefill_name(cfg: ProbeStudyConfig, arm: Arm | None, ratio: float, seed: int) -> str:
    """A prefill-time row (arm None: dense): the repeats and the batch are part of it."""
    what = "dense" if arm is None else f"{arm.label}|{ratio:g}"
    return f"prefill x{cfg.prefill_repeats}|{what}|b{cfg.batch_list[0]}|s{seed}"


@torch.no_grad()
def prefill_seconds(model, batch: torch.Tensor, repeats: int) -> list[float]:
    """Wall seconds of `repeats` forwards of one batch (no KV cache), after a short warm-up forward."""
    model(batch[:1, :8], use_cache=False)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(batch, use_cache=False)
        times.append(time.perf_counter() - start)
    return times


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


def evaluation_windows(cfg: ProbeStudyConfig, tokenizer, seed: int) -> torch.Tensor:
    """--ppl_windows WikiText-2 test windows of --ppl_seq_len tokens: the first ones, or (`random`, the release's
    draw) windows starting at random offsets of the whole test stream, drawn with `seed`."""
    documents = local_rows("wikitext2", cfg.data_dir)
    if cfg.eval_windows == "first":
        return text_windows(tokenizer, documents, cfg.ppl_seq_len)[: cfg.ppl_windows]
    stream = text_windows(tokenizer, documents, 1).flatten()
    if stream.numel() <= cfg.ppl_seq_len:
        raise UserError(f"the WikiText-2 test text has {stream.numel()} tokens, not more than --ppl_seq_len")
    starts = torch.randint(0, stream.numel() - cfg.ppl_seq_len, (cfg.ppl_windows,),
                           generator=torch.Generator().manual_seed(seed))  # fmt: skip
    return torch.stack([stream[s : s + cfg.ppl_seq_len] for s in starts.tolist()])


def c4_windows(cfg: ProbeStudyConfig, tokenizer, count: int, seq_len: int, seed: int) -> torch.Tensor:
    """`count` windows of `seq_len` tokens of --calib_file, drawn with `seed` (the history's, the prior's)."""
    docs = load_documents(str(Path(cfg.data_dir) / cfg.calib_file))
    return sample_windows(docs, tokenizer, count, seq_len, seed)


def prior_scores(cfg: ProbeStudyConfig, dense, tokenizer, criterion: str, seed: int) -> list[torch.Tensor]:
    """Neuron scores of one importance pass of `criterion` (our entropy-Taylor, or its product with wanda_sp) on
    --prior_windows C4 windows of the seed's draw; cached in WORK."""
    prior_cfg = PruneConfig(origin_path=cfg.model, pruning_ratio="0.2", criterion=criterion,
                            calib_samples=cfg.prior_windows, seq_len=cfg.prior_seq_len, seed=seed, progress=False,
                            importance_cache=str(Path(cfg.work_dir) / "cache"),
                            calib_dataset=str(Path(cfg.data_dir) / cfg.calib_file))  # fmt: skip
    windows = c4_windows(cfg, tokenizer, cfg.prior_windows, cfg.prior_seq_len, seed)
    return run_scores(prior_cfg, dense, find_mlps(dense), windows, torch.float32, torch.device("cpu"),
                      process_state("cpu"))[0]  # fmt: skip


def pruned_model(dense, settings: ProbeSettings, history, prior, refit_windows: torch.Tensor | None) -> tuple:
    """A static arm as a physically smaller model: the kept neurons the wrapper chooses (static: the same for every
    batch, read after one window) cut out of a copy of the dense model, layer by layer (layers 0-2 whole); with
    `refit_windows`, then refit by `--reconstruct ls` (dense targets, damp 0.1, rms weights). The model and the
    refit's report (None without one)."""
    probe = copy.deepcopy(dense)
    state = attach(probe, settings, history, prior)
    with torch.no_grad():
        probe(refit_windows[:1] if refit_windows is not None else torch.zeros(1, 8, dtype=torch.long))
    del probe
    model = copy.deepcopy(dense)
    mlps = find_mlps(model)
    keep = [state.kept.get(f"mlp.{i}", torch.arange(layer.neurons)).cpu() for i, layer in enumerate(mlps.layers)]
    for layer, index in zip(mlps.layers, keep):
        layer.select(index)
    if refit_windows is None:
        return model, None
    report = reconstruct(dense, model, keep, {}, layout_of(dense, "heads"), "ls", "dense", 0.1, refit_windows,
                         batch_size=REFIT_BATCH, progress=False)  # fmt: skip
    return model, report


def measure(cfg: ProbeStudyConfig) -> tuple[list[dict], dict]:
    cfg.model = model_or_default(cfg.model)
    rows = Rows(cfg, committed=Path(cfg.out).with_suffix(".json"))
    if cfg.render_only:
        return rows.every(), context(cfg)
    tokenizer = load_tokenizer(cfg.model, "--model")
    dense = load_causal_lm(cfg.model, "dense", torch.float32).eval()
    dense.set_attn_implementation("sdpa")
    evaluation = (Evaluation(replace(cfg, limit=cfg.zero_shot_items, eval_batch_size=cfg.zero_shot_batch,
                                     ppl_windows=0), tokenizer, "cpu")
                  if cfg.zero_shot_items > 0 else None)  # fmt: skip
    for seed in cfg.seed_list:
        measure_seed(cfg, rows, dense, tokenizer, seed, evaluation)
    return rows.every(), context(cfg)


def measure_seed(cfg: ProbeStudyConfig, rows: Rows, dense, tokenizer, seed: int,
                 evaluation: Evaluation | None) -> None:  # fmt: skip
    """Every missing row of one seed: dense at each batch size, then the arms (history and priors made once), then
    the zero-shot rows (with `evaluation`)."""
    windows = evaluation_windows(cfg, tokenizer, seed)
    wanted = [(arm, r, cfg.batch_list[0]) for r in cfg.ratio_list for arm in cfg.arm_list]
    wanted += [(arm, r, b) for r in cfg.ratio_list for arm in cfg.arm_list if arm.key in BATCH_ARMS
               for b in cfg.batch_list[1:]]  # fmt: skip
    missing = [w for w in wanted if rows.get(row_name(*w, seed)) is None]

    def todo(arms: list[Arm], name) -> list[tuple[Arm | None, float]]:
        """Dense and `arms` at every ratio whose row `name` gives is not measured yet."""
        return [(arm, r) for arm in [None, *arms] for r in ([0.0] if arm is None else cfg.ratio_list)
                if rows.get(name(cfg, arm, r, seed)) is None]  # fmt: skip

    zero_shot = [] if evaluation is None else todo(cfg.zero_shot_arm_list, zero_shot_name)
    timed = cfg.prefill_repeats > 0 and seed == cfg.seed_list[0]  # the report shows the first seed's times
    prefill = todo(cfg.prefill_arm_list, prefill_name) if timed else []
    for b in cfg.batch_list:
        if rows.get(dense_name(b, seed)) is None:
            start = time.perf_counter()
            ppl = perplexity(dense, windows, b, False)["perplexity"]
            rows.save({"name": dense_name(b, seed), "arm": "dense", "batch": b, "seed": seed, "ppl": ppl,
                       "seconds": time.perf_counter() - start, "params": count_parameters(dense)})  # fmt: skip
            print(f"dense at batch {b}, seed {seed}: {ppl:.3f}", flush=True)
    if not missing and not zero_shot and not prefill:
        return
    calib = c4_windows(cfg, tokenizer, cfg.calib_windows, cfg.calib_seq_len, seed)
    start = time.perf_counter()
    history = calibrate(dense, layout_of(dense, "dynamic"), calib, 4, False)
    calib_seconds = time.perf_counter() - start
    arms = [a for a, *_ in missing + zero_shot + prefill if a is not None]
    priors = {c: prior_scores(cfg, dense, tokenizer, c, seed) for c in sorted({a.prior for a in arms} - {""})}
    n_layers = dense.config.num_hidden_layers

    def build(arm: Arm, ratio: float) -> tuple:
        """The arm's model at `ratio` (the dense copy wrapped, or cut and maybe refit), its probe state (None when
        cut), the refit's report (None without one) and its settings."""
        settings = ProbeSettings.of(arm.variant, ratio=ratio, parts=arm.parts, metric=arm.metric,
                                    prior=bool(arm.prior))  # fmt: skip
        if arm.pruned_model:
            refit_windows = (c4_windows(cfg, tokenizer, cfg.refit_windows, cfg.calib_seq_len, seed)
                             if arm.pruned_model == "ls" else None)  # fmt: skip
            model, refit = pruned_model(dense, settings, history, priors.get(arm.prior), refit_windows)
            return model, None, refit, settings
        model = copy.deepcopy(dense)
        return model, attach(model, settings, history, priors.get(arm.prior)), None, settings

    for arm, ratio, batch in missing:
        model, _, refit, settings = build(arm, ratio)
        start = time.perf_counter()
        ppl = perplexity(model, windows, batch, False)["perplexity"]
        seconds = time.perf_counter() - start
        r = layer_ratio(n_layers, ratio)
        row = {"name": row_name(arm, ratio, batch, seed), "arm": arm.label, "ratio": ratio, "batch": batch,
               "seed": seed, "ppl": ppl, "seconds": seconds, "static": arm.static, "parts": list(arm.parts),
               "layer_ratio": r, "mlp_kept": kept_count(dense.config.intermediate_size, r, settings.multiple),
               "heads_kept": kept_count(head_counts(dense.config).query, r) if "heads" in arm.parts else None,
               "probe_flops_share": probe_flops_share(dense, settings, batch, cfg.ppl_seq_len),
               "params": count_parameters(model), "calibration_seconds": calib_seconds,
               "refit_seconds": refit["seconds"] if refit else None}  # fmt: skip
        rows.save(row)
        print(f"{row['name']}: {ppl:.3f} ({seconds:.0f} s)", flush=True)
        del model
    for arm, ratio in zero_shot:
        model, state = (dense, None) if arm is None else build(arm, ratio)[:2]
        if state is not None:
            state.pad_id = 0  # lm_eval right-pads with id 0 and passes no mask (as evaluate.py sets it)
        result = evaluation(model)
        row = rows.save({"name": zero_shot_name(cfg, arm, ratio, seed), "arm": arm.label if arm else "dense",
                         "ratio": ratio, "seed": seed, "items": cfg.zero_shot_items, "batch": cfg.zero_shot_batch,
                         "tasks": result["tasks"],
                         "avg": result["avg"], "eval_seconds": result["eval_seconds"]})  # fmt: skip
        print(f"{row['name']}: zero-shot avg {row['avg']:.2f} ({row['eval_seconds']:.0f} s)", flush=True)
    for arm, ratio in prefill:  # after everything else, so nothing else runs beside the timed forwards
        model = dense if arm is None else build(arm, ratio)[0]
        times = prefill_seconds(model, windows[: cfg.batch_list[0]], cfg.prefill_repeats)
        row = rows.save({"name": prefill_name(cfg, arm, ratio, seed), "arm": arm.label if arm else "dense",
                         "ratio": ratio, "seed": seed, "batch": cfg.batch_list[0], "times": times,
                         "median_seconds": median(times), "params": count_parameters(model)})  # fmt: skip
        print(f"{row['name']}: {row['median_seconds']:.2f} s", flush=True)


def context(cfg: ProbeStudyConfig) -> dict:
    return {"versions": versions(), "model": cfg.model, "settings": cfg.settings()}


def render(rows: list[dict], ctx: dict, cfg: ProbeStudyConfig) -> str:
    by_name = {r["name"]: r for r in rows}
    seeds, b0 = cfg.seed_list, cfg.batch_list[0]

    def found(arm: Arm | None, ratio: float, batch: int) -> list[tuple[dict, dict | None]]:
        """The seeds' rows of one arm (None: dense), each with the seed's dense row at the first batch size."""
        pairs = [(by_name.get(row_name(arm, ratio, batch, s) if arm else dense_name(batch, s)),
                  by_name.get(dense_name(b0, s))) for s in seeds]  # fmt: skip
        return [(r, d) for r, d in pairs if r is not None]

    windows = (f"the first {cfg.ppl_windows} windows of {cfg.ppl_seq_len} tokens (our protocol's windows, more of "
               f"them so a batch of {b0} exists)" if cfg.eval_windows == "first" else
               f"{cfg.ppl_windows} windows of {cfg.ppl_seq_len} tokens at random offsets of the test stream (the "
               f"release's draw), drawn per seed")  # fmt: skip
    dense_ppl = {b: [r["ppl"] for r, _ in found(None, 0.0, b)] for b in cfg.batch_list}
    paired = len(seeds) > 1  # windows differ by seed: set each arm against PP on the same seed's windows
    lines = [
        "# Probe Pruning: per-batch pruning against static pruning at the same widths",
        "",
        f"Written by `python bench/studies/probe.py` from its rows (`{Path(cfg.out).with_suffix('.json').name}`); "
        f"nothing edited by hand. Model {Path(ctx['model']).name}; WikiText-2: {windows}; history from "
        f"{cfg.calib_windows} C4 windows x {cfg.calib_seq_len} tokens (the release uses 2000); the priors' "
        f"importance pass on {cfg.prior_windows} x {cfg.prior_seq_len}; seeds {', '.join(map(str, seeds))} (cells: "
        f"mean ± std over the seeds where more than one). Layers 0-2 are never pruned, the others at the release's "
        f"ratio round(L/(L-3) r, 2), kept MLP neurons a multiple of 64, query heads only."
        + (" The pruned-model rows are the static arm's neurons cut out of a copy (`ls`: then refit by --reconstruct "
           f"ls on {cfg.refit_windows} C4 windows of the seed's draw; refit seconds in the JSON)."
           if any(r.get("refit_seconds") is not None or "pruned model" in r["name"] for r in rows) else "")
        + " Dense: "
        + ", ".join(f"batch {b} **{fmt(v)}**" for b, v in dense_ppl.items() if v) + ".",
        "",
        f"| ratio | arm | kept per pruned layer | ppl (batch {b0}) | CPU seconds vs dense | probe FLOPs |"
        + (" ppl vs PP, paired over seeds |" if paired else ""),
        "|---|---|---|---|---|---|" + ("---|" if paired else ""),
    ]
    for ratio in cfg.ratio_list:
        for arm in ARMS:
            pairs = found(arm, ratio, b0)
            if not pairs:
                continue
            r = pairs[0][0]
            kept = f"{r['mlp_kept']} neurons" + (f", {r['heads_kept']} heads" if r.get("heads_kept") else "")
            speeds = [r["seconds"] / d["seconds"] for r, d in pairs if d]
            speed = f"{mean(speeds):.2f}x" if speeds else "–"
            line = (f"| {ratio:g} | {arm.label} | {kept} | {fmt([r['ppl'] for r, _ in pairs])} | {speed} | "
                    f"{r['probe_flops_share']:.1%} |")  # fmt: skip
            if paired:
                pp = {s: by_name.get(row_name(ARMS[0], ratio, b0, s)) for s in seeds}
                change = [100 * (by_name[row_name(arm, ratio, b0, s)]["ppl"] / pp[s]["ppl"] - 1) for s in seeds
                          if pp[s] and row_name(arm, ratio, b0, s) in by_name]  # fmt: skip
                line += f" {fmt(change, 1)}% |" if change else " – |"
            lines.append(line)
    if len(cfg.batch_list) > 1:
        lines += ["", "## The batch size (PP chooses per batch)", "",
                  "| ratio | " + " | ".join(f"batch {b}" for b in cfg.batch_list) + " |",
                  "|---|" + "---|" * len(cfg.batch_list)]  # fmt: skip
        for ratio in cfg.ratio_list:
            cells = [[r["ppl"] for r, _ in found(ARMS[0], ratio, b)] for b in cfg.batch_list]
            lines.append(f"| {ratio:g} | " + " | ".join(fmt(c) if c else "–" for c in cells) + " |")
    extra = prefill_table(rows, cfg) + zero_shot_table(rows, cfg) + against_published(by_name, cfg)
    return "\n".join(lines + extra) + "\n"


def prefill_table(rows: list[dict], cfg: ProbeStudyConfig) -> list[str]:
    """The timed forwards of one batch (medians), against dense and the physically pruned static model."""
    found = [r for r in rows if r["name"].startswith("prefill ") and r["seed"] == cfg.seed_list[0]]
    if not found:
        return []
    by = {(r["arm"], r["ratio"]): r for r in found}
    dense = by.get(("dense", 0.0))
    sliced = next(a.label for a in ARMS if a.key == "sliced_entropy")
    first = found[0]
    lines = ["", f"## CPU prefill of one batch ({first['batch']} windows, no KV cache; median of {len(first['times'])} "
                 f"forwards, seed {cfg.seed_list[0]}, nothing else running)", "",
             "| ratio | arm | parameters | seconds | vs dense | vs the pruned model |", "|---|---|---|---|---|---|"]
    def against(row: dict, reference: dict | None) -> str:
        return f"{row['median_seconds'] / reference['median_seconds']:.2f}x" if reference else "–"

    for (label, ratio), r in by.items():
        pruned = by.get((sliced, ratio)) if label != "dense" else None
        lines.append(f"| {ratio:g} | {label} | {r['params'] / 1e6:.1f}M | {r['median_seconds']:.2f} | "
                     f"{against(r, dense)} | {against(r, pruned)} |")  # fmt: skip
    return lines


def zero_shot_table(rows: list[dict], cfg: ProbeStudyConfig) -> list[str]:
    """The zero-shot rows (of the largest item count measured): accuracy per task and the average, over seeds."""
    found = [r for r in rows if r["name"].startswith("zero-shot ") and r["seed"] in cfg.seed_list]
    if not found:
        return []
    items = max(r["items"] for r in found)
    found = [r for r in found if r["items"] == items]
    batch = found[0]["batch"]
    found = [r for r in found if r["batch"] == batch]
    tasks = sorted({t for r in found for t in r["tasks"]})
    ex_boolq = "boolq" in tasks and len(tasks) > 1  # BoolQ's majority answer moves it most on few items
    lines = ["", f"## Zero-shot ({items} items per task; lm_eval at batch {batch}, the batch PP chooses for)", "",
             "| ratio | arm | " + " | ".join(tasks) + " | average |" + (" without BoolQ |" if ex_boolq else ""),
             "|---|---|" + "---|" * (len(tasks) + 1 + ex_boolq)]  # fmt: skip
    for ratio, label in [(0.0, "dense")] + [(r, a.label) for r in cfg.ratio_list for a in ARMS]:
        group = [r for r in found if r["arm"] == label and (label == "dense" or r["ratio"] == ratio)]
        if group:
            cells = [fmt([r["tasks"][t] for r in group if t in r["tasks"]], 1) for t in tasks]
            line = f"| {ratio:g} | {label} | " + " | ".join(cells) + f" | {fmt([r['avg'] for r in group])} |"
            if ex_boolq:
                line += f" {fmt([value(r, 'avg_ex_boolq') for r in group])} |"
            lines.append(line)
    return lines


def against_published(by_name: dict, cfg: ProbeStudyConfig) -> list[str]:
    """Our PP rows beside the released code's on the same windows (--published), when it was run (on our protocol's
    first windows: probe_reference.py hands it those)."""
    path = Path(cfg.published) if cfg.published else None
    if path is None or not path.is_file() or cfg.eval_windows != "first":
        return []
    published = json.loads(path.read_text())
    ours_arm = {"mlp": ARMS[0], "mlp+heads": next(a for a in ARMS if a.key == "pp_heads")}
    lines = ["", "## Against the released code (same windows, same history)", "", published["about"], "",
             "| ratio | pruned | released PP | ours | ours vs released |", "|---|---|---|---|---|"]  # fmt: skip
    for row in published["rows"]:
        ours = by_name.get(row_name(ours_arm[row["parts"]], row["ratio"], row["batch"], row.get("seed", 0)))
        if ours is None:
            continue
        lines.append(f"| {row['ratio']:g} | {row['parts']} | {row['ppl']:.2f} | {ours['ppl']:.2f} | "
                     f"{ours['ppl'] / row['ppl'] - 1:+.1%} |")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    return study_main(ProbeStudyConfig, measure, render, argv)


if __name__ == "__main__":
    sys.exit(main())
