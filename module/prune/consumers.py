"""Where removed units are consumed: per kept decoder layer, the linear maps `--reconstruct` refits (grouped by the
input they share, in forward order), the runs of removed layers a folded map replaces, and the biases FLAP's
compensation adds to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from module.model.layout import Layout, head_counts, head_rows
from module.model.mlp import decoder_layers, find_mlps


@dataclass
class Consumer:
    """A linear map refit in a kept layer: its path in the layer, the kept output rows and input columns in the
    dense numbering (None: all), and the inputs it shares with the other consumers of its stage."""

    path: str
    rows: torch.Tensor | None
    cols: torch.Tensor | None


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in] (GPT-2's Conv1D stores [in, out])."""
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


def set_weight_out_in(module: nn.Module, w: torch.Tensor) -> None:
    module.weight.data.copy_((w.t() if type(module).__name__ == "Conv1D" else w).to(module.weight.dtype))


def stages_of(dense_layer_index: int, mlp_keep, kept: dict, layout: Layout | None, mlp_path: str,
              dense_config, bias_mode: bool, all_writers: bool = False) -> list[list[Consumer]]:  # fmt: skip
    """The consumers of one kept layer, grouped by the input they share, in forward order; `all_writers`: also
    the writers of the residual stream (o_proj, the MLP output) that lost nothing, so they repair the stream."""
    i = dense_layer_index
    hidden = kept.get("hidden")
    neurons = mlp_keep[i] if mlp_keep is not None else None
    heads = q_rows = kv_rows = None
    if f"heads.layer.{i}" in kept:
        hd = head_counts(dense_config).head_dim
        q_rows, kv_rows = head_rows(kept[f"heads.layer.{i}"], hd), head_rows(kept[f"kv_heads.layer.{i}"], hd)
        heads = q_rows
    stages: list[list[Consumer]] = []
    reshape = hidden is not None and not bias_mode  # a removed hidden channel has no mean to put back
    if layout is not None and reshape:
        q, k, v = (f"{layout.attention}.{n}" for n in (layout.query, layout.key, layout.value))
        stages.append([Consumer(q, q_rows, hidden), Consumer(k, kv_rows, hidden), Consumer(v, kv_rows, hidden)])
    writers = all_writers and layout is not None
    if layout is not None and (heads is not None or reshape or writers):
        stages.append([Consumer(f"{layout.attention}.{layout.output}", hidden, heads)])
    if layout is not None and reshape:
        stages.append([Consumer(p, neurons, hidden) for p in layout.mlp_inputs])
    if neurons is not None or reshape or writers:
        stages.append([Consumer(mlp_path, hidden, neurons)])
    return stages


def removed_runs(n_layers: int, kept_layers: list[int]) -> dict[int, list[int]]:
    """For each kept layer, the removed layers right after it (up to the next kept one); key -1: a leading run."""
    runs: dict[int, list[int]] = {}
    last = -1
    kept_set = set(kept_layers)
    for i in range(n_layers):
        if i in kept_set:
            last = i
        else:
            runs.setdefault(last, []).append(i)
    return runs


def mlp_output_path(model: nn.Module, layout: Layout | None) -> str:
    """Where the MLP's output projection sits in a decoder layer (the layout's, else the MLP adapter's)."""
    if layout is not None:
        return layout.mlp_output
    names = {m: n for n, m in decoder_layers(model)[0].named_modules()}
    return names[find_mlps(model).layers[0].output.module]


def bias_paths(mlp_keep, kept: dict, layout: Layout | None, mlp_path: str) -> list[str]:
    """The consumers --reconstruct bias adds to: o_proj for heads, the MLP output for neurons and layers."""
    paths = []
    if layout is not None and any(k.startswith("heads.") for k in kept):
        paths.append(f"{layout.attention}.{layout.output}")
    if mlp_keep is not None or "layers" in kept:
        paths.append(mlp_path)
    return paths
