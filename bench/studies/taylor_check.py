"""The Taylor check: does the first-order score rank neurons like the real loss change of removing them?

For a sample of neurons per layer, compare
- the paper's score S_j = sum over windows and tokens of |a_j * dL/da_j| (what prune.py ranks by),
- the signed first-order estimate of the loss change, -sum a_j * dL/da_j,
with the actual change dL_j = L(neuron j zeroed) - L(model), measured by a forward pass per neuron
(zeroing the neuron's output column is exactly removing it). Prints and writes the Spearman rank
correlation per layer of S_j with |dL_j| and of the estimate with dL_j.

    python bench/studies/taylor_check.py --criterion entropy --out docs/taylor_check   # SmolLM2-135M, CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import model_or_default
from dataset.calibration import load_documents, sample_windows
from module.model.mlp import find_mlps
from module.prune.importance import collect_statistics


def ranks(x: torch.Tensor) -> torch.Tensor:
    return torch.argsort(torch.argsort(x)).double()


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Rank correlation (continuous values: no ties to average)."""
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def evenly_spaced(n_layers: int, k: int) -> list[int]:
    """k layer indices spread from the first to the last layer."""
    return sorted({round(i * (n_layers - 1) / max(1, k - 1)) for i in range(k)})


@torch.no_grad()
def window_losses(model, windows: torch.Tensor) -> dict[str, float]:
    """Both pass losses from one forward per window: the sum over windows of each window's token mean
    of the entropy and of the next-token CE."""
    total = {"entropy": 0.0, "ce": 0.0}
    for w in windows:
        logp = model(input_ids=w.unsqueeze(0), use_cache=False).logits[0].double().log_softmax(-1)
        total["entropy"] += float(-(logp.exp() * logp).sum(-1).mean())
        total["ce"] += float(F.nll_loss(logp[:-1], w[1:]))
    return total


def signed_first_order(model, mlps, windows, criterion, layer_ids) -> dict[int, torch.Tensor]:
    """-sum_tokens a_j * dL/da_j per neuron for the chosen layers, by plain autograd."""
    acts: dict[int, torch.Tensor] = {}
    hooks = [
        mlps.layers[i].output.module.register_forward_pre_hook(lambda m, a, i=i: acts.__setitem__(i, a[0]))
        for i in layer_ids
    ]
    est = {i: torch.zeros(mlps.neurons, dtype=torch.float64) for i in layer_ids}
    for w in windows:
        logits = model(input_ids=w.unsqueeze(0), use_cache=False).logits[0].double()
        for a in acts.values():
            a.retain_grad()
        if criterion == "entropy":
            logp = logits.log_softmax(-1)
            loss = -(logp.exp() * logp).sum(-1).mean()
        else:
            loss = F.cross_entropy(logits[:-1], w[1:])
        model.zero_grad(set_to_none=True)
        loss.backward()
        for i, a in acts.items():
            est[i] -= (a * a.grad).sum(dim=(0, 1)).double()
    for h in hooks:
        h.remove()
    model.zero_grad(set_to_none=True)
    return est


def run(model, windows, criteria: list[str], layer_ids: list[int], per_layer: int, seed: int) -> dict[str, list[dict]]:
    """Rows per criterion; every criterion sees the same sampled neurons and the same ablation passes."""
    mlps = find_mlps(model)
    scores, estimate = {}, {}
    for c in criteria:
        scores[c] = collect_statistics(model, mlps, windows, c, batch_size=1, progress=False).taylor
        estimate[c] = signed_first_order(model, mlps, windows, c, layer_ids)
    base = window_losses(model, windows)
    gen = torch.Generator().manual_seed(seed)
    rows: dict[str, list[dict]] = {c: [] for c in criteria}
    for i in layer_ids:
        sample = torch.randperm(mlps.neurons, generator=gen)[:per_layer]
        axis = mlps.layers[i].output
        w = axis.module.weight
        delta = {c: torch.zeros(per_layer, dtype=torch.float64) for c in criteria}
        for n, j in enumerate(sample.tolist()):
            column = w.data.select(axis.weight_axis, j).clone()
            w.data.select(axis.weight_axis, j).zero_()
            ablated = window_losses(model, windows)
            w.data.select(axis.weight_axis, j).copy_(column)
            for c in criteria:
                delta[c][n] = ablated[c] - base[c]
        for c in criteria:
            s, e, d = scores[c][i].cpu()[sample], estimate[c][i][sample], delta[c]
            rows[c].append({
                "layer": i, "neurons": per_layer,
                "spearman_score_vs_abs_delta": spearman(s, d.abs()),
                "spearman_estimate_vs_delta": spearman(e, d),
                "mean_abs_delta": float(d.abs().mean()),
            })  # fmt: skip
    return rows


def to_markdown(results: dict[str, list[dict]], setting: str) -> str:
    header = "| criterion | layer | neurons | ρ(score, abs ΔL) | ρ(−a·g, ΔL) | mean abs ΔL |"
    lines = [f"Taylor check — {setting}", "", header, "|---|---|---|---|---|---|"]
    for criterion, rows in results.items():
        for r in rows:
            lines.append(f"| {criterion} | {r['layer']} | {r['neurons']} | {r['spearman_score_vs_abs_delta']:.3f} | "
                         f"{r['spearman_estimate_vs_delta']:.3f} | {r['mean_abs_delta']:.2e} |")  # fmt: skip
        mean = sum(r["spearman_score_vs_abs_delta"] for r in rows) / len(rows)
        lines.append(f"| {criterion} | mean | | {mean:.3f} | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF folder (default: SmolLM2-135M-Instruct, materialised offline)")
    p.add_argument(
        "--calib_dataset", default=str(Path(__file__).resolve().parents[2] / "shared/data/c4/c4_validation_2k.jsonl")
    )
    p.add_argument("--samples", type=int, default=4, help="calibration windows")
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--layers", type=int, default=6, help="evenly spaced layers to check")
    p.add_argument("--neurons_per_layer", type=int, default=12)
    p.add_argument("--criterion", default="entropy,ce", help="comma list of entropy, ce")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="path without suffix: writes .md and .json")
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args.model = model_or_default(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    windows = sample_windows(load_documents(args.calib_dataset), tok, args.samples, args.seq_len, args.seed)
    n_layers = len(find_mlps(model).layers)
    layer_ids = evenly_spaced(n_layers, args.layers)
    start = time.perf_counter()
    results = run(model, windows, args.criterion.split(","), layer_ids, args.neurons_per_layer, args.seed)
    seconds = time.perf_counter() - start
    setting = (f"{Path(args.model).name}, {args.samples} windows x {args.seq_len} tokens of "
               f"{Path(args.calib_dataset).name}, {args.neurons_per_layer} random neurons in each of layers "
               f"{layer_ids}, seed {args.seed}, fp32, torch {torch.__version__}; {seconds:.0f} s")  # fmt: skip
    md = to_markdown(results, setting)
    print(md, end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).with_suffix(".md").write_text(md)
        Path(args.out).with_suffix(".json").write_text(json.dumps({"setting": setting, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
