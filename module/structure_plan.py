"""Pruning several structures in one run: check every size before loading, score from one pass, keep, slice.

The kept sets all come from scores of the dense model; slicing runs MLP neurons, heads, hidden channels,
and the layers last (so every per-layer kept set still indexes the original layers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from module.adapters import ModelMLPs, decoder_layers
from module.pruning import count_parameters, prune_mlps, top_k_sorted
from module.structure_criteria import group_scores, head_scores, hidden_scores, keep_heads, layer_scores
from module.structure_importance import StructureStatistics
from module.structures import (
    StructureError,
    check_heads_keep,
    check_hidden_keep,
    head_counts,
    layout_of,
    prune_heads,
    prune_hidden,
    prune_layers,
)


@dataclass(frozen=True)
class StructureSizes:
    """How much of each non-MLP structure to keep or remove (0 = not pruned)."""

    heads_keep: int = 0
    head_mode: str = "kv_group"
    layers_remove: int = 0
    hidden_keep: int = 0

    @property
    def parts(self) -> list[str]:
        return [p for p, v in (("heads", self.heads_keep), ("layers", self.layers_remove),
                               ("hidden", self.hidden_keep)) if v]  # fmt: skip


def check_sizes(model: nn.Module, sizes: StructureSizes) -> None:
    """Every structure supported by the family and every size loadable (works on a weightless model)."""
    config = model.config
    if sizes.heads_keep:
        check_heads_keep(config, sizes.heads_keep, sizes.head_mode, layout_of(model, "heads"))
    if sizes.layers_remove:
        layout_of(model, "layers")
        n = len(decoder_layers(model))
        if not 1 <= sizes.layers_remove < n:
            raise StructureError(f"--layers_remove {sizes.layers_remove} must be in 1..{n - 1} ({n} layers)")
    if sizes.hidden_keep:
        check_hidden_keep(config, sizes.hidden_keep, layout_of(model, "hidden"), sizes.heads_keep or None)


def structure_scores(model: nn.Module, parts: list[str], criterion: str, stats: StructureStatistics | None,
                     seed: int) -> dict[str, torch.Tensor]:  # fmt: skip
    """Named fp64 CPU score tensors of the structures in `parts` (for the cache and the report)."""
    out: dict[str, torch.Tensor] = {}
    if "heads" in parts:
        layout = layout_of(model, "heads")
        heads = head_scores(criterion, model, layout, stats, seed)
        groups = group_scores(criterion, heads, stats, head_counts(model.config).group)
        out |= {f"heads.layer.{i}": s for i, s in enumerate(heads)}
        out |= {f"groups.layer.{i}": s for i, s in enumerate(groups)}
    if "layers" in parts:
        out["layers"] = layer_scores(criterion, model, stats, seed)
    if "hidden" in parts:
        out["hidden"] = hidden_scores(criterion, model, layout_of(model, "hidden"), stats, seed)
    return {k: v.detach().to("cpu", torch.float64).contiguous() for k, v in out.items()}


def kept_sets(model: nn.Module, sizes: StructureSizes, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Named kept indices (original numbering) of every requested structure."""
    kept: dict[str, torch.Tensor] = {}
    n_layers = len(decoder_layers(model))
    if sizes.heads_keep:
        heads = [scores[f"heads.layer.{i}"] for i in range(n_layers)]
        groups = [scores[f"groups.layer.{i}"] for i in range(n_layers)]
        q, kv = keep_heads(heads, groups, sizes.heads_keep, head_counts(model.config).group, sizes.head_mode)
        kept |= {f"heads.layer.{i}": k for i, k in enumerate(q)} | {f"kv_heads.layer.{i}": k for i, k in enumerate(kv)}
    if sizes.layers_remove:
        kept["layers"] = top_k_sorted(scores["layers"], n_layers - sizes.layers_remove)
    if sizes.hidden_keep:
        kept["hidden"] = top_k_sorted(scores["hidden"], sizes.hidden_keep)
    return kept


def apply(model: nn.Module, mlps: ModelMLPs | None, mlp_keep: list[torch.Tensor] | None, sizes: StructureSizes,
          kept: dict[str, torch.Tensor]) -> dict[str, int]:  # fmt: skip
    """Slice every structure (layers last); the parameters each one removed."""
    removed: dict[str, int] = {}
    n_layers = len(decoder_layers(model))

    def step(name: str, fn) -> None:
        before = count_parameters(model)
        fn()
        removed[name] = before - count_parameters(model)

    if mlp_keep is not None:
        step("mlp", lambda: prune_mlps(mlps, model.config, mlp_keep))
    if sizes.heads_keep:
        q = [kept[f"heads.layer.{i}"] for i in range(n_layers)]
        kv = [kept[f"kv_heads.layer.{i}"] for i in range(n_layers)]
        step("heads", lambda: prune_heads(model, layout_of(model, "heads"), q, kv))
    if sizes.hidden_keep:
        step("hidden", lambda: prune_hidden(model, layout_of(model, "hidden"), kept["hidden"]))
    if sizes.layers_remove:
        step("layers", lambda: prune_layers(model, kept["layers"]))
    return removed


def all_reduce(stats: StructureStatistics) -> StructureStatistics:
    """Sum every rank's structure statistics (the windows were split across ranks), in place."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    tensors = [*stats.head_taylor, *stats.group_taylor, *stats.head_act_sq]
    tensors += [t for t in (stats.layer_taylor, stats.hidden_taylor, stats.layer_cosine, stats.hidden_activation)
                if t is not None]  # fmt: skip
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    count = torch.tensor([stats.tokens], dtype=torch.float64, device=tensors[0].device if tensors else "cpu")
    dist.all_reduce(count, op=dist.ReduceOp.SUM)
    stats.tokens = int(count[0])
    return stats
