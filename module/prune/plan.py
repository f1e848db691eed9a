"""How much of each structure to keep and which units: the sizes a request asks for, checked before loading, and
the kept sets the scores give; `apply` cuts them out (module/model/slicing.py).

The MLP takes one width k in every layer, solved exactly from a share of all parameters (`plan_keep`). Several
structures in one run: every kept set comes from scores of the dense model; slicing runs MLP neurons, heads,
hidden channels, and the layers last (so every per-layer kept set still indexes the original layers).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from module.model.layout import StructureError, check_heads_keep, check_hidden_keep, head_counts, layout_of
from module.model.mlp import ModelMLPs, count_parameters, decoder_layers
from module.model.slicing import prune_heads, prune_hidden, prune_layers, prune_mlps
from module.prune.criteria import group_scores, head_scores, hidden_scores, keep_heads, layer_scores, top_k_sorted
from module.prune.taps import StructureStatistics
from utils.errors import UserError


class PruningError(UserError):
    """A requested size that the model cannot reach."""


@dataclass(frozen=True)
class KeepPlan:
    """Neurons kept per layer for one requested size, and the ratio that size achieves."""

    requested: float  # the --pruning_ratio or --mlp_ratio asked for
    kind: str  # "pruning_ratio" or "mlp_ratio"
    k_exact: int  # before --round_to
    k: int  # kept neurons in every layer
    achieved_ratio_exact: float
    achieved_ratio: float
    params_after: int

    def as_dict(self) -> dict:
        return asdict(self)


def _achieved(params_before: int, removed_per_neuron: int, neurons: int, k: int) -> tuple[float, int]:
    removed = (neurons - k) * removed_per_neuron
    return removed / params_before, params_before - removed


def _round(k: int, round_to: int, neurons: int) -> int:
    if round_to <= 1:
        return k
    return min(neurons, max(round_to, round_to * round(k / round_to)))


def plan_keep(
    params_before: int,
    mlps: ModelMLPs,
    *,
    pruning_ratio: float | None = None,
    mlp_ratio: float | None = None,
    hidden_size: int | None = None,
    round_to: int = 1,
) -> KeepPlan:
    """Solve k (the same in every layer) from a fraction of ALL parameters, or k = int(mlp_ratio * hidden)."""
    neurons = mlps.neurons
    per_neuron = sum(layer.params_per_neuron() for layer in mlps.layers)  # one neuron removed in every layer
    if pruning_ratio is not None:
        if not 0 < pruning_ratio < 1:
            raise PruningError(f"--pruning_ratio {pruning_ratio} must be in (0, 1)")
        mlp_share = neurons * per_neuron / params_before
        max_ratio = (neurons - 1) * per_neuron / params_before
        if pruning_ratio > mlp_share:
            raise PruningError(
                f"--pruning_ratio {pruning_ratio} removes more than the MLPs hold ({mlp_share:.4f} of all parameters)"
            )
        k_exact = neurons - round(pruning_ratio * params_before / per_neuron)
        if k_exact < 1:
            raise PruningError(
                f"--pruning_ratio {pruning_ratio} would remove every MLP neuron (at most {max_ratio:.4f} keeps one)"
            )
        requested, kind = pruning_ratio, "pruning_ratio"
    elif mlp_ratio is not None:
        k_exact = int(mlp_ratio * hidden_size)  # the release's semantics
        if not 1 <= k_exact <= neurons:
            raise PruningError(
                f"--mlp_ratio {mlp_ratio} gives {k_exact} neurons; valid is 1..{neurons} "
                f"(mlp_ratio <= {neurons / hidden_size:.4f} for hidden size {hidden_size})"
            )
        requested, kind = mlp_ratio, "mlp_ratio"
    else:
        raise PruningError("give --pruning_ratio or --mlp_ratio")
    k = _round(k_exact, round_to, neurons)
    exact_ratio, _ = _achieved(params_before, per_neuron, neurons, k_exact)
    ratio, after = _achieved(params_before, per_neuron, neurons, k)
    return KeepPlan(requested, kind, k_exact, k, exact_ratio, ratio, after)


def relative_keep(current: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Positions of `target` indices (original numbering) inside the currently kept `current` ones."""
    pos = torch.searchsorted(current, target)
    if not torch.equal(current[pos.clamp_max(len(current) - 1)], target):
        raise PruningError("a smaller kept set must be a subset of the larger one")
    return pos


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


def structure_scores(model: nn.Module, parts: list[str], criteria: dict[str, str],
                     stats: StructureStatistics | None, seed: int) -> dict[str, torch.Tensor]:  # fmt: skip
    """Named fp64 CPU score tensors of the structures in `parts` (for the cache and the report), each by its
    criterion in `criteria`."""
    out: dict[str, torch.Tensor] = {}
    if "heads" in parts:
        layout = layout_of(model, "heads")
        heads = head_scores(criteria["heads"], model, layout, stats, seed)
        groups = group_scores(criteria["heads"], heads, stats, head_counts(model.config).group)
        out |= {f"heads.layer.{i}": s for i, s in enumerate(heads)}
        out |= {f"groups.layer.{i}": s for i, s in enumerate(groups)}
    if "layers" in parts:
        out["layers"] = layer_scores(criteria["layers"], model, stats, seed)
    if "hidden" in parts:
        out["hidden"] = hidden_scores(criteria["hidden"], model, layout_of(model, "hidden"), stats, seed)
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
