"""How many neurons to keep, which ones, and slicing them out of the model."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from module.adapters import ModelMLPs
from utils.errors import UserError


class PruningError(UserError):
    """A requested size that the model cannot reach."""


def count_parameters(model: nn.Module) -> int:
    """Parameters of the model, tied weights counted once (as `model.parameters()` yields them)."""
    return sum(p.numel() for p in model.parameters())


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


def top_k_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, sorted ascending; ties go to the lower index.

    The order is total, so the kept set for a smaller k is a subset of the set for a larger k.
    """
    order = torch.sort(-scores, stable=True).indices
    return order[:k].sort().values


def prune_mlps(mlps: ModelMLPs, config, keep: list[torch.Tensor]) -> None:
    """Slice every layer to its kept neurons (indices into the layer's current neurons)."""
    sizes = {len(k) for k in keep}
    if len(sizes) != 1:
        raise PruningError(f"kept counts differ across layers: {sorted(sizes)}")
    for layer, idx in zip(mlps.layers, keep):
        layer.select(idx)
    mlps.set_intermediate_size(config, sizes.pop())


def relative_keep(current: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Positions of `target` indices (original numbering) inside the currently kept `current` ones."""
    pos = torch.searchsorted(current, target)
    if not torch.equal(current[pos.clamp_max(len(current) - 1)], target):
        raise PruningError("a smaller kept set must be a subset of the larger one")
    return pos
