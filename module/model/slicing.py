"""Cutting structures out of a model in place: MLP neurons, attention heads, decoder layers, hidden channels.

Shared by every family; where each structure lives comes from the data in module/model/mlp.py (`find_mlps`)
and module/model/layout.py (`Layout`). Each cut writes the new size to the config, so the result loads with
plain `from_pretrained`.

- heads, `kv_group` mode: whole key/value groups with their query heads; `query` mode: the same number
  of query heads inside every group (key/value heads all kept). q/k/v rows and o_proj columns.
- layers: decoder layers dropped; `layer_idx`, `layer_types` and `num_hidden_layers` renumbered.
- hidden: the embedding, every norm weight, the input side of q/k/v/gate/up and the LM head, and the
  output side (with bias) of o_proj/down_proj; `head_dim` unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from module.model.layout import Layout, StructureError, attention_modules, head_counts, head_rows, hidden_slices
from module.model.mlp import ModelMLPs, decoder_layers


def prune_mlps(mlps: ModelMLPs, config, keep: list[torch.Tensor]) -> None:
    """Slice every layer to its kept neurons (indices into the layer's current neurons)."""
    sizes = {len(k) for k in keep}
    if len(sizes) != 1:
        raise StructureError(f"kept counts differ across layers: {sorted(sizes)}")
    for layer, idx in zip(mlps.layers, keep):
        layer.select(idx)
    mlps.set_intermediate_size(config, sizes.pop())


def _select(param: torch.Tensor, dim: int, index: torch.Tensor) -> None:
    param.data = param.data.index_select(dim, index.to(param.device)).contiguous()


def _slice_linear(linear: nn.Linear, index: torch.Tensor, side: str) -> None:
    """Keep rows (`side` "out", bias too) or columns ("in") of a Linear."""
    if side == "out":
        _select(linear.weight, 0, index)
        if linear.bias is not None:
            _select(linear.bias, 0, index)
        linear.out_features = len(index)
    else:
        _select(linear.weight, 1, index)
        linear.in_features = len(index)


def prune_heads(model: nn.Module, layout: Layout, keep_query: list[torch.Tensor], keep_kv: list[torch.Tensor]) -> None:
    """Slice every layer to its kept query heads and key/value heads (sorted original indices; one count
    each for every layer) and write the counts and `head_dim` to the config."""
    h = head_counts(model.config)
    if len({len(k) for k in keep_query}) != 1 or len({len(k) for k in keep_kv}) != 1:
        raise StructureError("kept head counts differ across layers")
    for layer, q, kv in zip(decoder_layers(model), keep_query, keep_kv):
        if not torch.equal(torch.unique(q // h.group), kv) or len(q) % len(kv):
            raise StructureError("each kept key/value head needs the same number of its own query heads")
        attn, q_proj, k_proj, v_proj, o_proj = attention_modules(layer, layout)
        _slice_linear(q_proj, head_rows(q, h.head_dim), "out")
        _slice_linear(k_proj, head_rows(kv, h.head_dim), "out")
        _slice_linear(v_proj, head_rows(kv, h.head_dim), "out")
        _slice_linear(o_proj, head_rows(q, h.head_dim), "in")
        attn.num_key_value_groups = len(q) // len(kv)
    model.config.num_attention_heads = len(keep_query[0])
    model.config.num_key_value_heads = len(keep_kv[0])
    model.config.head_dim = h.head_dim


def prune_layers(model: nn.Module, keep: torch.Tensor) -> None:
    """Keep the decoder layers `keep` (sorted indices) and renumber everything that indexes layers."""
    layers = decoder_layers(model)
    kept = [layers[i] for i in keep.tolist()]
    for new, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    for i in sorted(set(range(len(layers))) - set(keep.tolist()), reverse=True):
        del layers[i]  # ModuleList renumbers its keys, so state-dict names stay model.layers.0..n-1
    config = model.config
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in keep.tolist()]
    config.num_hidden_layers = len(kept)


def prune_hidden(model: nn.Module, layout: Layout, keep: torch.Tensor) -> None:
    """Keep hidden channels `keep` (sorted) everywhere; a weight shared by two modules (tied embeddings)
    is sliced once."""
    seen: set[int] = set()
    h = head_counts(model.config)
    for module, how in hidden_slices(model, layout):
        if id(module.weight) in seen:
            if how == "in":
                module.in_features = len(keep)
            continue
        seen.add(id(module.weight))
        if how == "embed":
            _select(module.weight, 1, keep)
            module.embedding_dim = len(keep)
        elif how == "norm":
            _select(module.weight, 0, keep)
        else:
            _slice_linear(module, keep, how)
    model.config.hidden_size = len(keep)
    model.config.head_dim = h.head_dim
