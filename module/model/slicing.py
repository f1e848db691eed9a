"""Cutting structures out of a model in place: MLP neurons, attention heads, decoder layers, hidden channels.

Shared by every family; where each structure lives comes from the data in module/model/mlp.py (`find_mlps`)
and module/model/layout.py (`Layout`). Each cut writes the new size to the config, so the result loads with
plain `from_pretrained`. `add_biases` gives consumers a zero bias where a config key lets the family build one
(for --reconstruct bias).

- heads, `kv_group` mode: whole key/value groups with their query heads; `query` mode: the same number
  of query heads inside every group (key/value heads all kept). q/k/v rows and o_proj columns.
- layers: decoder layers dropped; `layer_idx`, `layer_types` and `num_hidden_layers` renumbered.
- hidden: the embedding, every norm weight, the input side of q/k/v/gate/up and the LM head, and the
  output side (with bias) of o_proj/down_proj; `head_dim` unchanged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from module.model.layout import (
    Layout,
    StructureError,
    attention_modules,
    head_counts,
    head_rows,
    hidden_slices,
    submodule,
)
from module.model.mlp import ModelMLPs, decoder_layers
from utils.errors import UserError


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


def add_biases(pruned: nn.Module, paths: list[str], trust_remote_code: bool = False) -> list[str]:
    """Give the consumers at `paths` (in every decoder layer) a bias for --reconstruct bias: the one they have,
    or zeros under a config key that makes the family build one (found by building a weightless model with the
    key set, so the saved model loads with it); the keys set. One line when neither exists."""
    from utils.cli import meta_model

    layers = decoder_layers(pruned)
    missing = [p for p in paths if getattr(submodule(layers[0], p), "bias", None) is None]
    keys = []
    for key in ("mlp_bias", "attention_bias"):
        if not missing or key not in pruned.config.to_dict() or getattr(pruned.config, key):
            continue
        trial = copy.deepcopy(pruned.config)
        setattr(trial, key, True)
        shapes = meta_model(trial, trust_remote_code)
        gained = [p for p in missing if getattr(submodule(decoder_layers(shapes)[0], p), "bias", None) is not None]
        if not gained:
            continue
        setattr(pruned.config, key, True)
        keys.append(key)
        meta_layer = decoder_layers(shapes)[0]
        for layer in layers:  # every linear the key governs gets a zero bias, so the state dict matches the config
            for name, module in layer.named_modules():
                meta = submodule(meta_layer, name) if name else meta_layer
                if isinstance(module, nn.Linear) and module.bias is None and getattr(meta, "bias", None) is not None:
                    module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype,
                                                           device=module.weight.device))  # fmt: skip
        missing = [p for p in missing if p not in gained]
    if missing:
        raise UserError(f"--reconstruct bias: {pruned.config.model_type} has no bias on {', '.join(missing)} and "
                        "no config key that adds one (so no loadable model could hold it); use --reconstruct ls")
    return keys
