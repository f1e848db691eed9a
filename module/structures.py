"""Structures beyond MLP neurons: attention heads, whole decoder layers, hidden (residual-stream) channels.

Where each structure lives in a model family is data (`Layout`); the slicing below is shared. A pruned
model keeps one width per structure in every layer and writes `head_dim` explicitly, so it loads with
plain `from_pretrained` (transformers refuses per-layer lists for these families).

- heads, `kv_group` mode: whole key/value groups with their query heads; `query` mode: the same number
  of query heads inside every group (key/value heads all kept). q/k/v rows and o_proj columns.
- layers: decoder layers dropped; `layer_idx`, `layer_types` and `num_hidden_layers` renumbered.
- hidden: the embedding, every norm weight, the input side of q/k/v/gate/up and the LM head, and the
  output side (with bias) of o_proj/down_proj; `head_dim` unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from module.adapters import decoder_layers
from utils.errors import UserError

STRUCTURES = ("mlp", "heads", "layers", "hidden")
HEAD_MODES = ("kv_group", "query")


class StructureError(UserError):
    """A structure a family does not support here, or a size that would not load."""


@dataclass(frozen=True)
class Layout:
    """Names that locate the attention and the residual-stream readers/writers in one family's decoder layer."""

    model_types: tuple[str, ...]
    attention: str = "self_attn"
    query: str = "q_proj"
    key: str = "k_proj"
    value: str = "v_proj"
    output: str = "o_proj"
    mlp_inputs: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")  # read the residual stream
    mlp_output: str = "mlp.down_proj"  # writes it
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    final_norm: str = "norm"  # in the base model
    norm_eps: str = "variance_epsilon"  # the norms' epsilon attribute
    hidden_divisible_by_heads: bool = False  # the config refuses hidden_size % num_attention_heads != 0


LAYOUTS: tuple[Layout, ...] = (
    Layout(("llama",), hidden_divisible_by_heads=True),
    Layout(("qwen2", "qwen3", "mistral")),  # Qwen3's q_norm/k_norm span head_dim: untouched by every slice
)
SUPPORTED = {"heads": LAYOUTS, "layers": LAYOUTS, "hidden": LAYOUTS}


def supports(model: nn.Module, structure: str) -> bool:
    """Whether the model's family has a layout for `structure` (MLP neurons: every family find_mlps knows)."""
    model_type = getattr(model.config, "model_type", None)
    return structure == "mlp" or any(model_type in layout.model_types for layout in SUPPORTED.get(structure, ()))


def layout_of(model: nn.Module, structure: str) -> Layout:
    """The family's layout for `structure`, or one line naming the unsupported (family, structure) pair."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    for layout in SUPPORTED.get(structure, ()):
        if model_type in layout.model_types:
            return layout
    families = sorted(t for layout in SUPPORTED.get(structure, ()) for t in layout.model_types)
    raise StructureError(
        f"--prune_parts {structure} is not supported for {model_type} models (supported: {', '.join(families)})"
    )


def submodule(module: nn.Module, path: str) -> nn.Module:
    """The module at a dotted `path` below `module`."""
    for name in path.split("."):
        module = getattr(module, name)
    return module


def attention_modules(layer: nn.Module, layout: Layout) -> tuple[nn.Module, nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
    attn = submodule(layer, layout.attention)
    return attn, *(getattr(attn, n) for n in (layout.query, layout.key, layout.value, layout.output))


@dataclass(frozen=True)
class HeadCounts:
    query: int
    kv: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.query // self.kv


def head_counts(config) -> HeadCounts:
    q = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or q
    return HeadCounts(q, kv, getattr(config, "head_dim", None) or config.hidden_size // q)


def valid_head_counts(config, mode: str, hidden_divisible: bool) -> list[int]:
    """Query-head counts per layer that `mode` can reach and the family's config accepts, largest first."""
    h = head_counts(config)
    if mode == "kv_group":
        counts = [g * h.group for g in range(h.kv, 0, -1)]
    else:
        counts = [h.kv * r for r in range(h.group, 0, -1)]
    if hidden_divisible:
        counts = [c for c in counts if config.hidden_size % c == 0]
    return counts


def check_heads_keep(config, heads_keep: int, mode: str, layout: Layout) -> None:
    valid = valid_head_counts(config, mode, layout.hidden_divisible_by_heads)
    if heads_keep not in valid:
        h = head_counts(config)
        rule = (f"; {config.model_type} also needs hidden_size {config.hidden_size} divisible by the head count"
                if layout.hidden_divisible_by_heads else "")  # fmt: skip
        raise StructureError(
            f"--heads_keep {heads_keep} cannot be reached with --head_mode {mode} from {h.query} query / {h.kv} "
            f"key-value heads{rule}; valid: {', '.join(map(str, valid)) or 'none'}"
        )


def check_hidden_keep(config, hidden_keep: int, layout: Layout, heads: int | None = None) -> None:
    """`heads`: the query heads per layer the pruned model will have (default: today's)."""
    heads = heads or head_counts(config).query
    if not 1 <= hidden_keep < config.hidden_size:
        raise StructureError(f"--hidden_keep {hidden_keep} must be in 1..{config.hidden_size - 1}")
    if layout.hidden_divisible_by_heads and hidden_keep % heads:
        lower = hidden_keep - hidden_keep % heads
        near = ", ".join(str(v) for v in (lower, lower + heads) if 0 < v < config.hidden_size)
        raise StructureError(
            f"--hidden_keep {hidden_keep}: {config.model_type} needs the hidden size divisible by its {heads} "
            f"attention heads; nearest valid: {near}"
        )


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


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Weight rows of the given heads (sorted head indices)."""
    return (heads.unsqueeze(1) * head_dim + torch.arange(head_dim)).reshape(-1)


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


def hidden_slices(model: nn.Module, layout: Layout) -> list[tuple[nn.Module, str]]:
    """Every module whose weight spans the hidden channels: (module, how) with how in embed/norm/in/out."""
    base = model.base_model
    found: list[tuple[nn.Module, str]] = [(model.get_input_embeddings(), "embed")]
    for layer in decoder_layers(model):
        found += [(submodule(layer, n), "norm") for n in layout.norms]
        _, q, k, v, o = attention_modules(layer, layout)
        found += [(q, "in"), (k, "in"), (v, "in"), (o, "out")]
        found += [(submodule(layer, n), "in") for n in layout.mlp_inputs]
        found.append((submodule(layer, layout.mlp_output), "out"))
    found += [(submodule(base, layout.final_norm), "norm"), (model.get_output_embeddings(), "in")]
    return found


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
