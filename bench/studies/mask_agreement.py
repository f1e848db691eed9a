"""Where two sparse versions of one dense model agree, decoder layer by decoder layer.

    python bench/studies/mask_agreement.py --dense models/SmolLM2-135M-Instruct --a out/ours-2of4 \\
        --b out/published-2of4 --labels ours,published --out docs/sparsity_agreement_wanda.md

For every linear layer of every decoder layer: the share of the dense model's non-zero weights that one model
removed and the other kept (a weight that is zero in the dense model counts as removed by both, whatever a mask
says), and ||A - B|| / ||A|| over the weights both kept (0 unless a method updates weights, as SparseGPT does).
Two implementations of one method fed the same windows agree exactly where their inputs agree; if they differ
only in rounding, the first disagreements are rare near-ties, and layer-sequential pruning then carries them
upward (each layer is calibrated on the outputs of the pruned layers below it).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from module.model.mlp import decoder_layers
from module.sparse.layerwise import linears_of
from utils.cli import load_causal_lm, parse_config
from utils.errors import UserError, run_cli


@dataclass
class AgreementConfig:
    dense: str = field(metadata={"help": "The dense model both sparse models were pruned from."})
    a: str = field(metadata={"help": "One sparse model (HF folder)."})
    b: str = field(metadata={"help": "The other sparse model (HF folder)."})
    labels: str = field(default="A,B", metadata={"help": "Names of A and B in the report, comma-separated."})
    out: str = field(default="", metadata={"help": "Write the Markdown report here ('' = print it)."})


@torch.no_grad()
def agreement(dense: nn.Module, a: nn.Module, b: nn.Module) -> list[dict[str, tuple[float, float]]]:
    """Per decoder layer, per linear name: (share of the dense non-zero weights removed by exactly one of A and B,
    ||A - B|| / ||A|| over the weights both kept)."""
    layers = [decoder_layers(m) for m in (dense, a, b)]
    if not len(layers[0]) == len(layers[1]) == len(layers[2]):
        raise UserError(f"the models have {', '.join(str(len(x)) for x in layers)} decoder layers, not one count")
    out = []
    for d_layer, a_layer, b_layer in zip(*layers):
        lins = [linears_of(x) for x in (d_layer, a_layer, b_layer)]
        row = {}
        for name in lins[0]:
            wd, wa, wb = (x[name].weight.float() for x in lins)
            if not wd.shape == wa.shape == wb.shape:
                raise UserError(f"{name}: shapes {tuple(wd.shape)}, {tuple(wa.shape)}, {tuple(wb.shape)} differ")
            live = wd != 0
            differs = ((wa == 0) != (wb == 0)) & live
            kept = (wa != 0) & (wb != 0)
            norm = wa[kept].norm()
            row[name] = (differs.sum().item() / max(live.sum().item(), 1),
                         ((wa - wb)[kept].norm() / norm).item() if norm > 0 else 0.0)  # fmt: skip
        out.append(row)
    return out


def render(rows: list[dict[str, tuple[float, float]]], cfg: AgreementConfig) -> str:
    label_a, label_b = (cfg.labels.split(",") + ["B"])[:2]
    first = next((i for i, row in enumerate(rows) if any(m > 0 for m, _ in row.values())), None)
    lines = [
        f"# {label_a} vs {label_b}: where the masks agree",
        "",
        f"Written by `python bench/studies/mask_agreement.py` from `{cfg.a}` ({label_a}) and `{cfg.b}` "
        f"({label_b}), both pruned from `{cfg.dense}`.",
        "",
        "Removed by one, kept by the other: the share of the dense model's non-zero weights (mean and largest over "
        "the layer's linears). Kept weights: ||A - B|| / ||A|| over the weights both kept, largest over the linears.",
        "",
        "| decoder layer | removed by one, kept by the other (mean) | (largest) | kept weights, relative difference |",
        "|---|---|---|---|",
    ]
    for i, row in enumerate(rows):
        shares = [m for m, _ in row.values()]
        lines.append(f"| {i} | {sum(shares) / len(shares):.4%} | {max(shares):.4%} | "
                     f"{max(v for _, v in row.values()):.1e} |")  # fmt: skip
    lines += ["", "The masks agree in every layer." if first is None else
              f"The first disagreement is in decoder layer {first}: "
              + ", ".join(f"{name} {m:.4%}" for name, (m, _) in rows[first].items() if m > 0) + "."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    def go() -> None:
        cfg = parse_config(AgreementConfig, sys.argv[1:] if argv is None else argv)
        models = [load_causal_lm(path, what, torch.float32) for path, what in
                  ((cfg.dense, "--dense"), (cfg.a, "--a"), (cfg.b, "--b"))]  # fmt: skip
        text = render(agreement(*models), cfg)
        if cfg.out:
            Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
            Path(cfg.out).write_text(text)
            print(f"wrote {cfg.out}")
        else:
            print(text, end="")

    return run_cli(go)


if __name__ == "__main__":
    sys.exit(main())
