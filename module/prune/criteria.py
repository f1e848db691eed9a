"""Every pruning criterion, one pure function per structure and criterion, from the statistics of the one
importance pass (or the weights alone) to one score per unit; higher = keep. A new criterion goes here.

MLP neurons (`CRITERIA`): `entropy` / `ce` (the Taylor sums of the pass: sum over tokens of |a_j dL/da_j|),
`wanda_sp` (FLAP's structured Wanda: mean_i |W_down[i, j]| * ||X_j||_2), `entropy_wanda` (their product),
`magnitude` (the norm of everything a neuron owns) and `random`.
Other structures (`STRUCTURE_CRITERIA`): the entropy/CE Taylor scores of `StructureStatistics`; `wanda_sp`
for heads (FLAP's structured Wanda over the head's o_proj input channels: mean_i |W_o[i, j]| * ||X_j||, summed
over the head); `block_influence` for layers (ShortGPT: 1 - the mean cosine of a layer's input and output
hidden states); `activation` for hidden channels (Minitron: the mean |norm output| per channel, over every
norm); `entropy_wanda` (entropy Taylor x wanda_sp) for heads; `magnitude` (the L2 norm of every weight a unit
owns) and `random` for all. Also the kept heads these scores give under the loadability rules.
"""

from __future__ import annotations

import torch
from torch import nn

from module.model.layout import Layout, StructureError, attention_modules, head_counts, head_rows, hidden_slices
from module.model.mlp import LayerMLP, ModelMLPs, decoder_layers
from module.prune.importance import GRADIENT_CRITERIA, NeuronStatistics
from module.prune.taps import StructureStatistics


def top_k_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, sorted ascending; ties go to the lower index.

    The order is total, so the kept set for a smaller k is a subset of the set for a larger k.
    """
    order = torch.sort(-scores, stable=True).indices
    return order[:k].sort().values


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


STRUCTURE_CRITERIA = {
    "heads": ("entropy", "ce", "wanda_sp", "entropy_wanda", "magnitude", "random"),
    "layers": ("entropy", "ce", "block_influence", "magnitude", "random"),
    "hidden": ("entropy", "ce", "activation", "magnitude", "random"),
}


def check_criterion(structure: str, criterion: str) -> None:
    valid = STRUCTURE_CRITERIA[structure]
    if criterion not in valid:
        raise StructureError(f"--criterion {criterion!r} does not score {structure}; valid: {', '.join(valid)}")


def head_magnitude(model: nn.Module, layout: Layout) -> list[torch.Tensor]:
    """Per query head: the norm of its q rows, its o_proj columns and its key/value heads' k and v rows."""
    h = head_counts(model.config)
    out = []
    for layer in decoder_layers(model):
        _, q, k, v, o = attention_modules(layer, layout)
        sq = lambda w, n: w.detach().double().pow(2).reshape(n, -1).sum(1)  # noqa: E731
        q_sq = sq(q.weight, h.query)
        o_sq = sq(o.weight.t().contiguous(), h.query)
        kv_sq = (sq(k.weight, h.kv) + sq(v.weight, h.kv)).repeat_interleave(h.group) / h.group
        out.append((q_sq + o_sq + kv_sq).sqrt().cpu())
    return out


def head_wanda_sp(model: nn.Module, layout: Layout, stats: StructureStatistics) -> list[torch.Tensor]:
    h = head_counts(model.config)
    out = []
    for layer, act_sq in zip(decoder_layers(model), stats.head_act_sq):
        o = attention_modules(layer, layout)[-1].weight.detach().double()
        per_channel = o.abs().mean(dim=0) * act_sq.to(o.device).sqrt()
        out.append(per_channel.view(h.query, h.head_dim).sum(1).cpu())
    return out


def head_scores(criterion: str, model, layout, stats: StructureStatistics | None, seed: int) -> list[torch.Tensor]:
    """One score per query head in every layer."""
    if criterion in ("entropy", "ce"):
        return [s.cpu() for s in stats.head_taylor]
    if criterion == "wanda_sp":
        return head_wanda_sp(model, layout, stats)
    if criterion == "entropy_wanda":
        return [t.cpu() * w for t, w in zip(stats.head_taylor, head_wanda_sp(model, layout, stats))]
    if criterion == "magnitude":
        return head_magnitude(model, layout)
    gen = torch.Generator().manual_seed(seed)
    n = head_counts(model.config).query
    return [torch.rand(n, generator=gen, dtype=torch.float64) for _ in decoder_layers(model)]


def group_scores(criterion: str, head: list[torch.Tensor], stats: StructureStatistics | None, group: int):
    """One score per key/value group: its own gate's Taylor term, or the sum of its query heads' scores."""
    if criterion in ("entropy", "ce"):
        return [s.cpu() for s in stats.group_taylor]
    return [s.view(-1, group).sum(1) for s in head]


def layer_scores(criterion: str, model, stats: StructureStatistics | None, seed: int) -> torch.Tensor:
    layers = decoder_layers(model)
    if criterion in ("entropy", "ce"):
        return stats.layer_taylor.cpu()
    if criterion == "block_influence":
        return 1 - stats.layer_cosine.cpu() / stats.tokens
    if criterion == "magnitude":
        return torch.tensor([sum(float(p.detach().double().pow(2).sum()) for p in layer.parameters()) ** 0.5
                             for layer in layers], dtype=torch.float64)  # fmt: skip
    return torch.rand(len(layers), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def hidden_scores(criterion: str, model, layout, stats: StructureStatistics | None, seed: int) -> torch.Tensor:
    if criterion in ("entropy", "ce"):
        return stats.hidden_taylor.cpu()
    if criterion == "activation":
        return stats.hidden_activation.cpu() / stats.tokens
    if criterion == "magnitude":
        sq = torch.zeros(model.config.hidden_size, dtype=torch.float64)
        seen = set()
        for module, how in hidden_slices(model, layout):
            if id(module.weight) in seen:
                continue
            seen.add(id(module.weight))
            w = module.weight.detach().double().cpu()
            sq += w.pow(2).sum(0) if how in ("embed", "in") else (w.pow(2) if how == "norm" else w.pow(2).sum(1))
        return sq.sqrt()
    return torch.rand(model.config.hidden_size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def keep_heads(head: list[torch.Tensor], group: list[torch.Tensor], heads_keep: int, group_size: int,
               mode: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:  # fmt: skip
    """Kept query heads and key/value heads per layer: whole groups (`kv_group`) or the same number of
    query heads inside every group (`query`)."""
    keep_q, keep_kv = [], []
    for h_scores, g_scores in zip(head, group):
        n_kv = len(g_scores)
        if mode == "kv_group":
            kv = top_k_sorted(g_scores, heads_keep // group_size)
            q = head_rows(kv, group_size)
        else:
            per_group = heads_keep // n_kv
            kv = torch.arange(n_kv)
            q = torch.cat([g * group_size + top_k_sorted(h_scores[g * group_size : (g + 1) * group_size], per_group)
                           for g in range(n_kv)])  # fmt: skip
        keep_q.append(q)
        keep_kv.append(kv)
    return keep_q, keep_kv
