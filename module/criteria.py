"""Neuron scores: each criterion is a pure function from collected statistics to one score per neuron."""

from __future__ import annotations

import torch

from module.adapters import LayerMLP, ModelMLPs
from module.importance import GRADIENT_CRITERIA, NeuronStatistics

CRITERIA = ("entropy", "ce", "wanda_sp", "entropy_wanda", "magnitude", "random")
DATA_FREE = ("magnitude", "random")


def taylor_scores(stats: NeuronStatistics) -> list[torch.Tensor]:
    """Entropy / CE Taylor: sum over tokens of |a_j * dL/da_j| (already summed by the pass)."""
    return [s.clone() for s in stats.taylor]


def wanda_sp_scores(stats: NeuronStatistics, mlps: ModelMLPs) -> list[torch.Tensor]:
    """Structured Wanda as FLAP defines it: mean_i |W_down[i, j]| * ||X_j||_2 (X = down_proj input)."""
    return [
        layer.output.block(0).abs().double().mean(dim=1) * act_sq.to(layer.output.weight.device).sqrt()
        for layer, act_sq in zip(mlps.layers, stats.act_sq)
    ]


def neuron_weight_norm(layer: LayerMLP) -> torch.Tensor:
    """L2 norm of everything one neuron owns: its gate/up/fc1 rows and its down/fc2 column."""
    squares = sum(
        axis.block(b).double().pow(2).sum(dim=1) for axis in [*layer.inputs, layer.output] for b in range(axis.blocks)
    )
    return squares.sqrt()


def magnitude_scores(mlps: ModelMLPs) -> list[torch.Tensor]:
    return [neuron_weight_norm(layer) for layer in mlps.layers]


def random_scores(mlps: ModelMLPs, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(layer.neurons, generator=gen, dtype=torch.float64) for layer in mlps.layers]


def score_neurons(criterion: str, mlps: ModelMLPs, stats: NeuronStatistics | None, seed: int) -> list[torch.Tensor]:
    """One fp64 CPU score vector per layer for `criterion`."""
    if criterion == "entropy_wanda":  # the product of both scores of the same neuron, from the one pass
        scores = [t * w for t, w in zip(taylor_scores(stats), wanda_sp_scores(stats, mlps))]
    elif criterion in GRADIENT_CRITERIA:
        scores = taylor_scores(stats)
    elif criterion == "wanda_sp":
        scores = wanda_sp_scores(stats, mlps)
    elif criterion == "magnitude":
        scores = magnitude_scores(mlps)
    elif criterion == "random":
        scores = random_scores(mlps, seed)
    else:
        raise ValueError(f"unknown criterion {criterion!r}; valid: {', '.join(CRITERIA)}")
    return [s.detach().to("cpu", torch.float64) for s in scores]
