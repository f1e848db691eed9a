"""`--reconstruct_select obs`: the refit chooses which MLP neurons a layer keeps (the count unchanged). The choice
itself is `greedy_keep` (module/prune/refit.py) on the sums module/prune/reconstruct.py gathers over every neuron
of the dense MLP run on the pruned stream; here: what it needs of the model, and writing the chosen neurons into
the pruned layer."""

from __future__ import annotations

import logging

import torch
from torch import nn

from module.model.mlp import LayerMLP, ModelMLPs, decoder_layers, find_mlps
from module.prune.refit import OBS_DAMP
from utils.errors import UserError

log = logging.getLogger("hfprune")
OBS_TOKENS_PER_NEURON = 40  # SmolLM2-135M at ridge 0.1: 21 per neuron overfit the obs choice at 30%, 43 did not


def check_obs(dense: nn.Module, mode: str) -> None:
    """One line when the run cannot choose neurons by the refit."""
    if mode != "ls":
        raise UserError("--reconstruct_select obs chooses neurons by the least-squares refit: it needs "
                        "--reconstruct ls")  # fmt: skip
    if not find_mlps(dense).shape.container:
        raise UserError(f"--reconstruct_select obs needs the MLP as one module of the decoder layer; "
                        f"{type(dense).__name__} has its projections on the layer itself")  # fmt: skip


def check_obs_tokens(dense: nn.Module, windows: torch.Tensor, damp: float) -> None:
    """obs chooses among every neuron of a layer on the refit's tokens; with too few per neuron and a weak ridge the
    choice fits their noise (SmolLM2-135M, 30% of the parameters, 32K tokens for 1536 neurons: 158 perplexity at
    ridge 0.1 against 102 for the importance pass's neurons refit; 93.5 on 64K tokens; 92.6 on 32K at ridge 0.3),
    so warn below OBS_TOKENS_PER_NEURON under a ridge weaker than OBS_DAMP."""
    tokens, neurons = windows.numel(), find_mlps(dense).layers[0].neurons
    if tokens < OBS_TOKENS_PER_NEURON * neurons and damp < OBS_DAMP:
        log.warning("reconstruct: --reconstruct_select obs chooses among %d neurons per layer on %d tokens (%.0f "
                    "per neuron) with --reconstruct_damp %g; below %d per neuron a ridge under %g lets the choice "
                    "fit the calibration's noise: give --reconstruct_damp %g or more --reconstruct_samples (at "
                    "least %d windows of %d tokens)", neurons, tokens, tokens / neurons, damp, OBS_TOKENS_PER_NEURON,
                    OBS_DAMP, OBS_DAMP, -(-OBS_TOKENS_PER_NEURON * neurons // windows.shape[-1]),
                    windows.shape[-1])  # fmt: skip


def mlp_pair(dense: nn.Module, pruned: nn.Module, mlps: tuple[ModelMLPs, ModelMLPs], i: int,
             j: int) -> tuple[nn.Module, nn.Module, LayerMLP, LayerMLP]:  # fmt: skip
    """Dense layer i's MLP module and pruned layer j's, and their neuron-indexed projections (`mlps`: both models'
    MLPs, found once per reconstruction)."""
    dense_mlps, pruned_mlps = mlps
    container = dense_mlps.shape.container
    return (getattr(decoder_layers(dense)[i], container), getattr(decoder_layers(pruned)[j], container),
            dense_mlps.layers[i], pruned_mlps.layers[j])  # fmt: skip


def reselect(dense_mlp: LayerMLP, pruned_mlp: LayerMLP, keep: torch.Tensor) -> None:
    """Copy the dense neurons `keep` into the pruned layer's input projections (same count: shapes unchanged); the
    output projection is refit after."""
    n = dense_mlp.neurons
    for d_axis, p_axis in zip(dense_mlp.inputs, pruned_mlp.inputs):
        index = torch.cat([keep + b * n for b in range(d_axis.blocks)]).to(d_axis.weight.device)
        p_axis.weight.data.copy_(d_axis.weight.detach().index_select(d_axis.weight_axis, index))
        if d_axis.bias_indexed and getattr(d_axis.module, "bias", None) is not None:
            p_axis.module.bias.data.copy_(d_axis.module.bias.detach().index_select(0, index))
