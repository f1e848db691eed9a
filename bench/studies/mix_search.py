"""The mix search on SmolLM2-135M: the chosen mix vs MLP-only vs each structure alone, at 20% and 30%.

    python bench/studies/mix_search.py                       # -> docs/MIX_SEARCH.md, .json (~40 min, CPU)
    python bench/studies/mix_search.py --ratios 0.2 --seeds 0 --out /tmp/MIX.md

Every model comes from prune.py itself: one `--prune_parts auto --pruning_ratio R` search per (ratio, seed),
then one `--mix` run per table row (the chosen mix, the MLP-only candidate, and each structure alone at its
loadable size nearest to R), which reuses the search's cached scores and reports the row's held-out KL on the
search's windows. Each saved folder is reloaded with plain `from_pretrained` and scored on the same WikiText-2
windows. Speed depends on the shapes only, so it is measured last, in a phase of its own with nothing else
running: for every distinct mix, a copy of the dense model sliced to it against the dense model, measured
back to back (1024-token prefill, greedy decoding at batch 1 and 8), the median ratio of `--speed_repeats`
rounds. `--speed_only` measures the speeds of an existing report's rows again. Peers come from a recorded
file (they are run by hand; see its "how").
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import ModelStudyConfig, model_or_default, prune
from bench.studies.structures import nearest_sizes
from module.model.mlp import count_parameters, find_mlps
from module.prune.mix import Mix, first_units_scores, mix_kept, sliced_copy
from module.speed import measure_speed, ratios
from utils.cli import load_causal_lm, load_tokenizer, parse_config
from utils.errors import run_cli
from utils.perplexity import local_rows, perplexity, text_windows
from utils.report import setup_logging, versions

SINGLES = ("heads (kv_group)", "layers", "hidden")


@dataclass
class MixStudyConfig(ModelStudyConfig):
    out: str = field(default="docs/MIX_SEARCH.md", metadata={"help": "The report; a .json of the rows goes beside."})
    work: str = field(default="out/mix_study", metadata={"help": "Folder for the pruned models and the cache."})
    ratios: str = field(default="0.2,0.3", metadata={"help": "Shares of all parameters to remove."})
    seeds: str = field(default="0,1", metadata={"help": "Calibration seeds (window draws)."})
    calib_file: str = field(default="c4/c4_validation_2k.jsonl", metadata={"help": "Calibration text in DATA."})
    calib_samples: int = field(default=32, metadata={"help": "Calibration windows."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per calibration and held-out window."})
    search_windows: int = field(default=16, metadata={"help": "Held-out windows of the search's KL."})
    speed_repeats: int = field(
        default=3, metadata={"help": "Rounds of dense/pruned speed measurements (0 = none; with --speed_only: render)."}
    )
    speed_only: bool = field(default=False, metadata={"help": "Only measure the speeds of --out's rows again."})
    peers: str = field(
        default=str(ROOT / "docs" / "mix_peers.json"), metadata={"help": "Peers' recorded results ('' = none)."}
    )

    def __post_init__(self) -> None:
        self.ratio_list = [float(r) for r in self.ratios.split(",")]
        self.seed_list = [int(s) for s in self.seeds.split(",")]


def prune_args(cfg: MixStudyConfig, seed: int, out: Path) -> list[str]:
    return ["--origin_path", cfg.model, "--prune_parts", "auto", "--calib_dataset",
            str(Path(cfg.data_dir) / cfg.calib_file), "--calib_samples", str(cfg.calib_samples), "--seq_len",
            str(cfg.seq_len), "--search_windows", str(cfg.search_windows), "--seed", str(seed), "--batch_size", "4",
            "--importance_cache", str(Path(cfg.work) / "cache"), "--output_dir", str(out), "--overwrite",
            "--no_progress"]  # fmt: skip


def run_prune(args: list[str]) -> dict:
    (out,) = prune(args)
    return json.loads((out / "prune_report.json").read_text())


def main_study(cfg: MixStudyConfig) -> Path:
    start = time.perf_counter()
    cfg.model = model_or_default(cfg.model)
    tok = load_tokenizer(cfg.model, "--model")
    dense = load_causal_lm(cfg.model, "--model", torch.float32).eval()
    ppl_windows = text_windows(tok, local_rows("wikitext2", cfg.data_dir), cfg.ppl_seq_len)[: cfg.ppl_windows]
    dense_ppl = perplexity(dense, ppl_windows, progress=False)["perplexity"]
    total = count_parameters(dense)
    print(f"dense: {total / 1e6:.2f}M parameters, ppl {dense_ppl:.3f}", flush=True)
    work = Path(cfg.work)
    rows, boards = [], {}
    for ratio in cfg.ratio_list:
        singles = nearest_sizes(dense, ratio)
        for seed in cfg.seed_list:
            report = run_prune(prune_args(cfg, seed, work / "search") + ["--pruning_ratio", str(ratio)])
            board = report["search"]["leaderboard"]
            boards[f"{ratio}/{seed}"] = board
            named = {"chosen mix": board[0]["mix"]}
            named["MLP only"] = next(r["mix"] for r in board if list(r["removed"]) == ["mlp"])
            named |= {f"{name} only": Mix(None, singles[name]).describe() for name in SINGLES if singles[name]}
            for name, mix in named.items():
                out = work / "row"
                row_report = run_prune(prune_args(cfg, seed, out) + ["--mix", mix])
                model = load_causal_lm(str(out), "row", torch.float32).eval()
                ppl = perplexity(model, ppl_windows, progress=False)["perplexity"]
                entry = row_report["search"]["leaderboard"][0]
                params = count_parameters(model)
                rows.append({"ratio": ratio, "seed": seed, "row": name, "mix": mix, "params": params,
                             "removed": 1 - params / total, "kl": entry["kl"], "ppl": ppl})  # fmt: skip
                print(f"{ratio:g} seed {seed} {name}: {mix}, removed {rows[-1]['removed']:.3f}, KL {entry['kl']:.4f}, "
                      f"ppl {ppl:.2f}", flush=True)  # fmt: skip
                del model
    shutil.rmtree(work, ignore_errors=True)
    peers = json.loads(Path(cfg.peers).read_text())["peers"] if cfg.peers else []
    meta = {"settings": asdict(cfg), "versions": versions(), "seconds": time.perf_counter() - start,
            "dense_ppl": dense_ppl, "dense_params": total}  # fmt: skip
    result = {"meta": meta, "rows": rows, "leaderboards": boards, "peers": peers}
    add_speeds(result, dense, cfg.speed_repeats)
    return write(result, cfg)


def write(result: dict, cfg: MixStudyConfig) -> Path:
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.write_text(render(result, cfg))
    print(f"wrote {out}")
    return out


def add_speeds(result: dict, dense, repeats: int) -> None:
    """Speed-ups of every distinct mix of the rows (a copy of `dense` sliced to it, first units kept: the speed
    depends on the shapes only), each round measuring dense and pruned back to back; the median ratio."""
    if repeats < 1:
        return
    prompt = min(1024, dense.config.max_position_embeddings)
    speeds = {}
    for mix in dict.fromkeys(r["mix"] for r in result["rows"]):
        parsed = Mix.parse(mix)
        pruned = sliced_copy(dense, parsed, *mix_kept(dense, parsed, first_neurons(dense), first_units_scores(dense)))
        rounds = [ratios(measure_speed(dense, prompt, 32, [1, 8]), measure_speed(pruned, prompt, 32, [1, 8]))
                  for _ in range(repeats)]  # fmt: skip
        speeds[mix] = {"prefill_speedup": statistics.median(r["prefill_speedup"] for r in rounds),
                       "decode_speedup": {str(b): statistics.median(r["decode_speedup"][b] for r in rounds)
                                          for b in rounds[0]["decode_speedup"]}}  # fmt: skip
        print(f"speed {mix}: prefill {speeds[mix]['prefill_speedup']:.2f}x", flush=True)
        del pruned
    for row in result["rows"]:
        row |= speeds[row["mix"]]
    result["meta"]["speed"] = {
        "repeats": repeats,
        "prompt": prompt,
        "new_tokens": 32,
        "threads": torch.get_num_threads(),
        "commit": versions()["hfprune_commit"],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def first_neurons(model) -> list[torch.Tensor]:
    """Neuron scores that keep the first neurons of every layer (for shapes only)."""
    mlps = find_mlps(model)
    return [torch.arange(mlps.neurons, 0, -1, dtype=torch.float64) for _ in mlps.layers]


def speed_only(cfg: MixStudyConfig) -> Path:
    """Measure the speeds of an existing report's rows again and write it anew."""
    cfg.model = model_or_default(cfg.model)
    result = json.loads(Path(cfg.out).with_suffix(".json").read_text())
    dense = load_causal_lm(cfg.model, "--model", torch.float32).eval()
    add_speeds(result, dense, cfg.speed_repeats)
    return write(result, cfg)


def render(result: dict, cfg: MixStudyConfig) -> str:
    meta, rows = result["meta"], result["rows"]
    seeds = cfg.seed_list
    v = meta["versions"]
    lines = [
        "# One size knob: the searched mix of structures vs MLP-only vs each structure alone (SmolLM2-135M)",
        "",
        f"Written by `python bench/studies/mix_search.py` ({meta['seconds'] / 60:.0f} min on {v['device_name']}, torch "
        f"{v['torch']}, transformers {v['transformers']}, commit {(v['hfprune_commit'] or '?')[:10]}); nothing here "
        "is edited by hand.",
        "",
        "- Pruning: `prune.py --prune_parts auto --pruning_ratio R`, entropy criterion, calibration "
        f"{cfg.calib_samples} windows x {cfg.seq_len} tokens of `{cfg.calib_file}`, seeds "
        f"{', '.join(map(str, seeds))}. The search scores each candidate by its mean KL(dense || pruned) on "
        f"{cfg.search_windows} held-out windows of other "
        "C4 documents (grid of 4 steps, then hill climbing); every row is a `--mix` run reloaded with "
        "`from_pretrained`.",
        f"- Perplexity: WikiText-2 raw test, the first {cfg.ppl_windows} windows of {cfg.ppl_seq_len} tokens. Dense: "
        f"**{meta['dense_ppl']:.2f}** ({meta['dense_params'] / 1e6:.2f}M parameters).",
        "- Speed (`module/speed.py`): pruned vs dense on this CPU, fp32, measured last with nothing else running, "
        "dense and pruned back to back, the median of "
        f"{meta.get('speed', {}).get('repeats', '–')} rounds: prefill of one 1024-token prompt, greedy decoding of 32 "
        "tokens with a KV cache at batch 1 and 8. It depends on the shapes only (one value per mix); measured "
        f"{meta.get('speed', {}).get('date', '–')} at commit {(meta.get('speed', {}).get('commit') or '?')[:10]}.",
        "- Single structures take the loadable size nearest to R (their removed share is printed); no recovery "
        "fine-tuning anywhere.",
        "",
    ]
    for ratio in cfg.ratio_list:
        lines += [f"## {ratio:.0%} of the parameters", "",
                  "| row | mix (seed " + ", ".join(map(str, seeds)) + ") | removed | held-out KL | WikiText-2 ppl | "
                  "prefill | decode b1 | decode b8 |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        names = list(dict.fromkeys(r["row"] for r in rows if r["ratio"] == ratio))
        for name in names:
            group = [r for r in rows if r["ratio"] == ratio and r["row"] == name]
            mixes = " / ".join(dict.fromkeys(f"`{r['mix']}`" for r in group))
            kl = " / ".join(f"{r['kl']:.3f}" for r in group)
            ppl = " / ".join(f"{r['ppl']:.1f}" for r in group)
            by_mix = {r["mix"]: r for r in group if r.get("prefill_speedup")}  # one speed per distinct mix
            cols = [[f"{r['prefill_speedup']:.2f}x" for r in by_mix.values()],
                    *[[f"{r['decode_speedup'][b]:.2f}x" for r in by_mix.values()] for b in ("1", "8")]]  # fmt: skip
            speed = " | ".join(" / ".join(c) or "–" for c in cols)
            removed = " / ".join(dict.fromkeys(f"{r['removed']:.1%}" for r in group))
            lines.append(f"| {name} | {mixes} | {removed} | {kl} | {ppl} | {speed} |")
        lines += [""] + verdict(rows, ratio, seeds) + [""]
    lines += peer_lines(result["peers"])
    return "\n".join(lines) + "\n"


def verdict(rows: list[dict], ratio: float, seeds: list[int]) -> list[str]:
    """Generated: is the chosen mix at least as good as MLP-only on perplexity, by how much, and is the
    difference larger than the spread over the calibration seeds."""
    ppl = {name: [r["ppl"] for r in rows if r["ratio"] == ratio and r["row"] == name]
           for name in ("chosen mix", "MLP only")}  # fmt: skip
    diffs = [m - c for c, m in zip(ppl["chosen mix"], ppl["MLP only"])]
    spread = max(max(v) - min(v) for v in ppl.values())
    mean_diff = statistics.mean(diffs)
    better = all(d >= 0 for d in diffs)
    text = (f"- Chosen mix vs MLP-only: perplexity lower by {', '.join(f'{d:.1f}' for d in diffs)} (seed "
            f"{', '.join(map(str, seeds))}; mean {mean_diff:.1f}, {mean_diff / statistics.mean(ppl['MLP only']):.1%}); "
            f"{'at least as good in every seed' if better else '**worse in at least one seed**'}. ")  # fmt: skip
    text += (f"The spread of either row over the seeds is {spread:.1f}: the difference "
             f"{'exceeds' if min(diffs) > spread else 'does not exceed'} it.")  # fmt: skip
    return [text]


def peer_lines(peers: list[dict]) -> list[str]:
    if not peers:
        return []
    out = ["## Peers", "", "| peer | removed | WikiText-2 ppl | loads with `from_pretrained` |", "|---|---|---|---|"]
    for p in peers:
        if p["ran"]:
            out.append(f"| {p['name']} | {p['removed']:.1%} | {p['ppl']:.1f} | {p['loads']} |")
        else:
            out.append(f"| {p['name']} | – | did not run | – |")
    out.append("")
    out += [f"- **{p['name']}**: {p['how'] if p['ran'] else p['why']}" for p in peers]
    return out


def main(argv: list[str] | None = None) -> int:
    setup_logging()

    def go() -> Path:
        cfg = parse_config(MixStudyConfig, sys.argv[1:] if argv is None else argv)
        return speed_only(cfg) if cfg.speed_only else main_study(cfg)

    return run_cli(go)


if __name__ == "__main__":
    sys.exit(main())
