"""Each structure alone at the loadable size nearest to 10% of the parameters, every criterion, on SmolLM2-135M.

    python bench/studies/structures.py               # -> docs/STRUCTURES.md and docs/STRUCTURES.json (~15 min, CPU)
    python bench/studies/structures.py --target 0.2 --out /tmp/STRUCTURES.md

One calibration pass with the entropy loss gathers the Taylor scores of every structure and the activation
statistics of the baselines (wanda_sp, entropy_wanda, block_influence, activation); a second pass with the
CE loss gives the CE scores; magnitude and random need no data. Each pruned model is a copy of the dense
one sliced by the project's own code (module/prune/plan.py: apply), and every model is scored by the same
WikiText-2 perplexity (the first windows of the local test file).
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import ModelStudyConfig, model_or_default
from dataset.calibration import load_documents, sample_windows
from module.model.layout import StructureError, layout_of, valid_head_counts
from module.model.mlp import count_parameters, find_mlps
from module.prune.criteria import STRUCTURE_CRITERIA, score_neurons, top_k_sorted
from module.prune.importance import collect_statistics
from module.prune.mix import Mix, sliced_meta
from module.prune.plan import StructureSizes, apply, kept_sets, plan_keep, structure_scores
from module.prune.taps import StructureTaps
from utils.cli import load_causal_lm, load_tokenizer, meta_model, parse_config
from utils.errors import run_cli
from utils.perplexity import local_rows, perplexity, text_windows
from utils.report import setup_logging, versions

MLP_CRITERIA = ("entropy", "ce", "wanda_sp", "entropy_wanda", "magnitude", "random")


@dataclass
class StructureStudyConfig(ModelStudyConfig):
    out: str = field(default="docs/STRUCTURES.md", metadata={"help": "The report; a .json of the rows goes beside."})
    target: float = field(default=0.1, metadata={"help": "Fraction of all parameters each structure removes."})
    calib_file: str = field(default="c4/c4_validation_2k.jsonl", metadata={"help": "Calibration text in DATA."})
    calib_samples: int = field(default=32, metadata={"help": "Calibration windows."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per calibration window."})
    seed: int = field(default=0, metadata={"help": "Seed of the window draw (and of random)."})
    peers: str = field(
        default=str(ROOT / "docs" / "structure_peers.json"),
        metadata={"help": "Peers' recorded results; ours is measured at each one's parameter count ('' = none)."},
    )

    def __post_init__(self) -> None:
        if not 0 < self.target < 0.5:
            raise ValueError(f"--target {self.target} must be in (0, 0.5)")


def removed_by(model, sizes: StructureSizes) -> int:
    """Parameters a size removes, measured by slicing a weightless copy."""
    return sum(sliced_meta(meta_model(copy.deepcopy(model.config)), Mix(None, sizes))[1].values())


def nearest_sizes(model, target: float) -> dict[str, StructureSizes]:
    """For each structure (and head mode) the loadable size whose removed share is nearest to `target`."""
    total = count_parameters(model)
    cfg = model.config
    candidates: dict[str, list[StructureSizes]] = {
        "heads (kv_group)": [StructureSizes(heads_keep=c) for c in valid_head_counts(cfg, "kv_group", True)[1:]],
        "heads (query)": [
            StructureSizes(heads_keep=c, head_mode="query") for c in valid_head_counts(cfg, "query", True)[1:]
        ],  # fmt: skip
        "layers": [StructureSizes(layers_remove=n) for n in range(1, cfg.num_hidden_layers)],
        "hidden": [StructureSizes(hidden_keep=k) for k in range(cfg.hidden_size - 1, 0, -1)],
    }
    chosen = {}
    for name, sizes in candidates.items():
        best, best_gap = None, None
        for s in sizes:
            try:
                gap = abs(removed_by(model, s) / total - target)
            except StructureError:
                continue
            if best_gap is not None and gap > best_gap:
                break  # shares grow monotonically along each list
            best, best_gap = s, gap
        chosen[name] = best
    return chosen


def main_study(cfg: StructureStudyConfig) -> Path:
    torch.manual_seed(0)
    cfg.model = model_or_default(cfg.model)
    tok = load_tokenizer(cfg.model, "--model")
    dense = load_causal_lm(cfg.model, "--model", torch.float32).eval()
    total = count_parameters(dense)
    docs = load_documents(str(Path(cfg.data_dir) / cfg.calib_file))
    windows = sample_windows(docs, tok, cfg.calib_samples, cfg.seq_len, cfg.seed)
    ppl_windows = text_windows(tok, local_rows("wikitext2", cfg.data_dir), cfg.ppl_seq_len)[: cfg.ppl_windows]
    start = time.perf_counter()
    rows = [{"structure": "dense", "criterion": "-", "size": "-", "params": total, "removed": 0.0,
             "ppl": perplexity(dense, ppl_windows, progress=False)["perplexity"]}]  # fmt: skip
    print(f"dense: ppl {rows[0]['ppl']:.3f}", flush=True)
    layout = layout_of(dense, "heads")
    mlps = find_mlps(dense)
    passes = {}
    for loss in ("entropy_wanda", "ce"):  # entropy_wanda: the entropy loss, with the activation statistics too
        taps = StructureTaps(dense, layout, taylor=True, activations=True)
        stats = collect_statistics(dense, mlps, windows, loss, batch_size=1, progress=False, taps=(taps,))
        passes[loss] = (stats, taps.stats)
        print(f"pass {loss}: {stats.seconds:.0f} s", flush=True)
    neuron_stats, struct_stats = passes["entropy_wanda"]

    def stats_for(criterion):
        return passes["ce"] if criterion == "ce" else (neuron_stats, struct_stats)

    plan = plan_keep(total, mlps, pruning_ratio=cfg.target)
    jobs = [("mlp", c, StructureSizes(), f"{plan.k} of {mlps.neurons} neurons") for c in MLP_CRITERIA]
    for name, sizes in nearest_sizes(dense, cfg.target).items():
        label = {"heads (kv_group)": f"{sizes.heads_keep} of {dense.config.num_attention_heads} heads",
                 "heads (query)": f"{sizes.heads_keep} of {dense.config.num_attention_heads} heads",
                 "layers": f"{dense.config.num_hidden_layers - sizes.layers_remove} of "
                           f"{dense.config.num_hidden_layers} layers",
                 "hidden": f"{sizes.hidden_keep} of {dense.config.hidden_size} channels"}[name]  # fmt: skip
        jobs += [(name, c, sizes, label) for c in STRUCTURE_CRITERIA[name.split(" ")[0]]]

    def pruned_ppl(criterion: str, sizes: StructureSizes, mlp_ratio: float | None) -> tuple[float, float, int]:
        """Removed share, perplexity and parameters of a copy of the dense model pruned by `criterion`."""
        n_stats, s_stats = stats_for(criterion)
        model = copy.deepcopy(dense)
        keep = None
        if mlp_ratio:
            k = plan_keep(total, mlps, pruning_ratio=mlp_ratio).k
            keep = [top_k_sorted(s, k) for s in score_neurons(criterion, mlps, n_stats, cfg.seed)]
        by_part = dict.fromkeys(sizes.parts, criterion)
        kept = kept_sets(dense, sizes, structure_scores(dense, sizes.parts, by_part, s_stats, cfg.seed))
        removed = apply(model, find_mlps(model) if keep else None, keep, sizes, kept)
        ppl = perplexity(model, ppl_windows, progress=False)["perplexity"]
        return sum(removed.values()) / total, ppl, count_parameters(model)

    for name, criterion, sizes, label in jobs:
        removed, ppl, params = pruned_ppl(criterion, sizes, cfg.target if name == "mlp" else None)
        rows.append({"structure": name, "criterion": criterion, "size": label, "params": params, "removed": removed,
                     "ppl": ppl})  # fmt: skip
        print(f"{name} {criterion}: removed {removed:.4f}, ppl {ppl:.3f}", flush=True)
    peers = json.loads(Path(cfg.peers).read_text())["peers"] if cfg.peers else []
    for peer in peers:
        if peer["ran"]:
            spec = peer["ours"]
            sizes = StructureSizes(heads_keep=spec.get("heads_keep", 0))
            peer["ours_measured"] = {
                c: pruned_ppl(c, sizes, spec["pruning_ratio"]) for c in ("entropy", "entropy_wanda")
            }
            print(f"peer {peer['name']}: {peer['ppl']:.3f}; ours {peer['ours_measured']}", flush=True)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"settings": asdict(cfg), "versions": versions(), "seconds": time.perf_counter() - start}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "peers": peers}, indent=2) + "\n")
    out.write_text(render(rows, cfg, meta, peers))
    print(f"wrote {out}")
    return out


def render(rows: list[dict], cfg: StructureStudyConfig, meta: dict, peers: list[dict]) -> str:
    dense = rows[0]
    lines = [
        f"# One structure at a time: ~{cfg.target:.0%} of SmolLM2-135M's parameters, every criterion",
        "",
        f"Written by `python bench/studies/structures.py{'' if cfg.target == 0.1 else f' --target {cfg.target}'}` "
        f"({meta['seconds'] / 60:.0f} min on {meta['versions']['device_name']}, torch {meta['versions']['torch']}, "
        f"transformers {meta['versions']['transformers']}, commit {(meta['versions']['hfprune_commit'] or '?')[:10]}); "
        "nothing here is edited by hand.",
        "",
        f"- Calibration: {cfg.calib_samples} windows x {cfg.seq_len} tokens of `{cfg.calib_file}` (seed {cfg.seed}); "
        "one entropy pass and one CE pass give every score.",
        f"- Perplexity: WikiText-2 raw test, the first {cfg.ppl_windows} windows of {cfg.ppl_seq_len} tokens. "
        f"Dense: **{dense['ppl']:.2f}** ({dense['params'] / 1e6:.2f}M parameters).",
        "- Sizes: for each structure the loadable size whose removed share is nearest to the target (Llama's "
        "config needs hidden_size divisible by the head count; one width per structure in every layer).",
        "- No recovery fine-tuning: these numbers say which units each criterion keeps, before any training.",
        "",
        "| structure | kept | removed | " + " | ".join(f"{c}" for c in _criteria(rows)) + " |",
        "|---|---|---|" + "---|" * len(_criteria(rows)),
    ]
    for structure in dict.fromkeys(r["structure"] for r in rows[1:]):
        group = {r["criterion"]: r for r in rows if r["structure"] == structure}
        first = next(iter(group.values()))
        best = min(r["ppl"] for r in group.values())
        cells = [(f"**{group[c]['ppl']:.1f}**" if group[c]["ppl"] == best else f"{group[c]['ppl']:.1f}")
                 if c in group else "–" for c in _criteria(rows)]  # fmt: skip
        lines.append(f"| {structure} | {first['size']} | {first['removed']:.1%} | " + " | ".join(cells) + " |")
    lines += ["", "Perplexity (lower is better; bold: the best criterion of the row; –: the criterion does not "
              "score that structure).", ""]  # fmt: skip
    lines += verdict(rows)
    lines += peer_lines(peers)
    return "\n".join(lines) + "\n"


def peer_lines(peers: list[dict]) -> list[str]:
    """The peers (recorded in docs/structure_peers.json) beside ours at the same parameter count."""
    if not peers:
        return []
    out = ["", "## Peers at the same parameter count", "",
           "| peer | removed | peer ppl | ours, entropy | ours, entropy_wanda | loads with `from_pretrained` |",
           "|---|---|---|---|---|---|"]  # fmt: skip
    for peer in peers:
        if peer["ran"]:
            ours = peer["ours_measured"]
            out.append(f"| {peer['name']} | {peer['removed']:.1%} | {peer['ppl']:.1f} | {ours['entropy'][1]:.1f} "
                       f"({ours['entropy'][0]:.1%}) | {ours['entropy_wanda'][1]:.1f} | peer: no (widths differ per "
                       "layer); ours: yes |")  # fmt: skip
        else:
            out.append(f"| {peer['name']} | – | did not run | – | – | – |")
    out.append("")
    out += [f"- **{p['name']}**: {p['how'] if p['ran'] else p['why']}" for p in peers]
    return out


def _criteria(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["criterion"] for r in rows[1:]))


def verdict(rows: list[dict]) -> list[str]:
    """Generated: does entropy beat random on every structure, and which criterion wins each."""
    out = []
    for structure in dict.fromkeys(r["structure"] for r in rows[1:]):
        group = {r["criterion"]: r["ppl"] for r in rows if r["structure"] == structure}
        winner = min(group, key=group.get)
        beats = group["entropy"] < group["random"]
        out.append(f"- {structure}: entropy {group['entropy']:.1f} vs random {group['random']:.1f} "
                   f"({'entropy better' if beats else '**entropy not better than random**'}); best: {winner} "
                   f"({group[winner]:.1f}).")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    return run_cli(lambda: main_study(parse_config(StructureStudyConfig, sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
