"""How a structured run ends: the model cut to its kept sets, the report (sizes, kept units, speed), the plots,
the folder written atomically (utils/pruned_folder.py), and the one summary line per saved model.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from module.model.mlp import ModelMLPs, count_parameters, find_mlps
from module.model.slicing import prune_mlps
from module.prune.compensation import Settings, reconstructed
from module.prune.criteria import top_k_sorted
from module.prune.mix import Mix, mix_kept
from module.prune.plan import KeepPlan, apply, relative_keep
from module.speed import speed_against, speed_text
from utils.pruned_folder import perplexity_text, save_pruned
from utils.report import plot_layer_scores, plot_leaderboard, plot_structures

CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
               "num_hidden_layers")  # fmt: skip


def add_speed(report: dict, model: nn.Module) -> None:
    """With --measure_speed: the pruned model's speed and its ratios to the dense model's (a search has
    measured it already)."""
    if report.get("dense_speed") is not None and report.get("speed") is None:
        report["speed"] = speed_against(report["dense_speed"], model)


def save_structures(cfg, model: nn.Module, tokenizer, mlps: ModelMLPs, mix: Mix, scores, structure,
                    base_report: dict, out: Path, ppl_windows, ppl_before, recon: Settings) -> None:  # fmt: skip
    """Several structures at one size: kept sets from the one pass's scores, sliced (a copy when reconstructing,
    which needs the dense model beside it; else `model` itself), reconstructed, saved with the report."""
    mlp_keep, kept = mix_kept(model, mix, scores, structure)
    config_before = {k: getattr(model.config, k, None) for k in CONFIG_KEYS}
    params_before = count_parameters(model)
    dense = model
    if recon.active:
        model = copy.deepcopy(dense)
        mlps = find_mlps(model)
    removed = apply(model, mlps if mlp_keep else None, mlp_keep, mix.sizes, kept)
    reconstruction = reconstructed(dense, model, mlp_keep, kept, recon)
    params_after = count_parameters(model)
    report = {
        **base_report,
        "parts": cfg.parts,
        "mix": mix.describe(),
        "structure_sizes": asdict(mix.sizes),
        "params_after": params_after,
        "achieved_ratio": 1 - params_after / params_before,
        "params_removed_per_structure": removed,
        "config_before": config_before,
        "config_after": {k: getattr(model.config, k, None) for k in CONFIG_KEYS},
        "kept": {k: v.tolist() for k, v in kept.items()},
        "kept_neurons_per_layer": [len(k) for k in mlp_keep] if mlp_keep else None,
        "reconstruction": reconstruction,
    }
    add_speed(report, model)
    files = {"kept_structures.safetensors": {k: v.contiguous() for k, v in kept.items()}}
    if mlp_keep:
        files["kept_neurons.safetensors"] = {f"layer.{j}": k for j, k in enumerate(mlp_keep)}
    title = f"{Path(cfg.origin_path).name}: {cfg.criterion}, {mix.describe()}"
    part_of = lambda key: "heads" if key.startswith(("heads.", "groups.")) else key  # noqa: E731
    shown = {k: v for k, v in structure.items() if part_of(k) in mix.sizes.parts}  # only the pruned ones
    board = (base_report.get("search") or {}).get("leaderboard")

    def plots(tmp: Path) -> None:
        plot_structures(tmp / "prune_structures.png", shown, kept, scores, mlp_keep, title)
        if board and len(board) > 1:
            plot_leaderboard(tmp / "mix_search.png", board, title)

    save_pruned(cfg, out, model, tokenizer, report, "prune_report.json", ppl_windows, ppl_before, files, plots)
    line = (
        f"{out}: {params_before / 1e6:.2f}M -> {params_after / 1e6:.2f}M parameters (removed "
        f"{report['achieved_ratio']:.4f}: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in removed.items()) + ")"
    )
    if board:
        line += f", mix {mix.describe()} (held-out KL {board[0]['kl']:.4f}"
        line += f", best of {len(board)})" if len(board) > 1 else ")"
    print(line + reconstruct_text(reconstruction) + perplexity_text(report) + speed_text(report), flush=True)


def save_mlp_sizes(cfg, model: nn.Module, tokenizer, mlps: ModelMLPs, plans: list[KeepPlan], outs: list[Path],
                   scores: list[torch.Tensor], base_report: dict, ppl_windows, ppl_before, start: float,
                   recon: Settings) -> None:  # fmt: skip
    """MLP neurons at one or several sizes from the one pass: the largest model first, each smaller one cut from
    the one before (the kept sets are nested), each saved with its report and summary line. Reconstructing, every
    size is cut from a fresh copy of the dense model (a refit of the larger model must not leak into it)."""
    neurons = mlps.neurons
    params_before = count_parameters(model)
    current = [torch.arange(neurons) for _ in scores]
    order = sorted(range(len(plans)), key=lambda i: -plans[i].k)  # larger models first: kept sets are nested
    for i in order:
        plan, out = plans[i], outs[i]
        keep = [top_k_sorted(s, plan.k) for s in scores]
        if recon.active:
            pruned = copy.deepcopy(model)
            prune_mlps(find_mlps(pruned), pruned.config, keep)
        else:
            pruned = model
            prune_mlps(mlps, model.config, [relative_keep(c, k) for c, k in zip(current, keep)])
            current = keep
        assert count_parameters(pruned) == plan.params_after, (count_parameters(pruned), plan.params_after)
        reconstruction = reconstructed(model, pruned, keep, {}, recon)
        params_after = count_parameters(pruned)  # --reconstruct bias may add biases
        report = {
            **base_report,
            **plan.as_dict(),
            "params_after": params_after,
            "intermediate_size": plan.k,
            "kept_per_layer": [len(k) for k in keep],
            "reconstruction": reconstruction,
            "total_seconds": time.perf_counter() - start,
        }
        add_speed(report, pruned)
        title = f"{Path(cfg.origin_path).expanduser().name}: {cfg.criterion}, {plan.kind} {plan.requested:g}"
        save_pruned(cfg, out, pruned, tokenizer, report, "prune_report.json", ppl_windows, ppl_before,
                    {"kept_neurons.safetensors": {f"layer.{j}": k for j, k in enumerate(keep)}},
                    lambda tmp, keep=keep, title=title: plot_layer_scores(tmp / "prune_layers.png", scores, keep,
                                                                          title))  # fmt: skip
        line = (
            f"{out}: {params_before / 1e6:.2f}M -> {params_after / 1e6:.2f}M parameters "
            f"(removed {plan.achieved_ratio:.4f}; {plan.k}/{neurons} neurons per layer)"
        )
        print(line + reconstruct_text(reconstruction) + perplexity_text(report) + speed_text(report), flush=True)
        del pruned


def reconstruct_text(reconstruction: dict | None) -> str:
    """', reconstructed (MODE, N s)' for a summary line ('' without --reconstruct)."""
    return f", reconstructed ({reconstruction['mode']}, {reconstruction['seconds']:.0f} s)" if reconstruction else ""
