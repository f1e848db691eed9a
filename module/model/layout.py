"""Where the structures beyond MLP neurons live in a family: attention heads, whole decoder layers, hidden
(residual-stream) channels, and which sizes of them a saved config can express.

Where each structure lives in a model family is data (`Layout`); the cutting is shared (module/model/slicing.py).
A pruned model keeps one width per structure in every layer and writes `head_dim` explicitly, so it loads with
plain `from_pretrained` (transformers refuses per-layer lists for these families).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from module.model.mlp import decoder_layers
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
    activation: str = "mlp.act_fn"  # the gated MLP's act(gate) * up
    query_norm: str | None = None  # per-head norms of the queries/keys before RoPE (Qwen3), in the attention
    key_norm: str | None = None


LAYOUTS: tuple[Layout, ...] = (
    Layout(("llama",), hidden_divisible_by_heads=True),
    Layout(("qwen2", "mistral")),
    Layout(("qwen3",), query_norm="q_norm", key_norm="k_norm"),  # they span head_dim: untouched by every slice
)
SUPPORTED = {"heads": LAYOUTS, "layers": LAYOUTS, "hidden": LAYOUTS, "dynamic": LAYOUTS}


def supports(model: nn.Module, structure: str) -> bool:
    """Whether the model's family has a layout for `structure` (MLP neurons: every family find_mlps knows)."""
    model_type = getattr(model.config, "model_type", None)
    return structure == "mlp" or any(model_type in layout.model_types for layout in SUPPORTED.get(structure, ()))


def layout_of(model: nn.Module, structure: str, flag: str | None = None) -> Layout:
    """The family's layout for `structure`, or one line naming the unsupported (family, structure) pair (and
    the flag that asked for it: `--prune_parts STRUCTURE` unless `flag` says otherwise)."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    for layout in SUPPORTED.get(structure, ()):
        if model_type in layout.model_types:
            return layout
    families = sorted(t for layout in SUPPORTED.get(structure, ()) for t in layout.model_types)
    raise StructureError(
        f"{flag or f'--prune_parts {structure}'} is not supported for {model_type} models (supported: "
        f"{', '.join(families)})"
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
    """A head count the mode can reach, the config accepts, and that removes something."""
    valid = valid_head_counts(config, mode, layout.hidden_divisible_by_heads)[1:]  # the first one keeps them all
    if heads_keep not in valid:
        h = head_counts(config)
        rule = (f"; {config.model_type} also needs hidden_size {config.hidden_size} divisible by the head count"
                if layout.hidden_divisible_by_heads else "")  # fmt: skip
        raise StructureError(
            f"--heads_keep {heads_keep} cannot be reached with --head_mode {mode} from {h.query} query / {h.kv} "
            f"key-value heads{rule} (keeping all {h.query} prunes nothing); valid: "
            f"{', '.join(map(str, valid)) or 'none'}"
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


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Weight rows of the given heads (sorted head indices)."""
    return (heads.unsqueeze(1) * head_dim + torch.arange(head_dim)).reshape(-1)


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
