"""Statistics for heads, layers and hidden channels, gathered in the same forward/backward as the neurons'.

Each structure's entropy (or CE) Taylor score is the first-order term of a gate m on the structure (its
output scaled by m, at m = 1), taken per token and summed as the paper does for neurons:
    score = sum over tokens of | sum over the unit's coordinates d of a_d * dL/da_d |
- query head: a = its slice of the o_proj input; key/value group: the slices of all its query heads;
- layer: its residual update, the o_proj and down_proj outputs (each with the gradient of the residual
  stream where it is added);
- hidden channel: every write into the residual stream (embedding output, o_proj and down_proj outputs).
Beside them, the baselines' activation statistics: ||X||^2 of the o_proj input (structured Wanda for
heads), the cosine of each layer's input and output hidden states (ShortGPT's Block Influence) and the
absolute norm outputs per channel (Minitron's activation importance).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from module.model.layout import Layout, attention_modules, head_counts, submodule
from module.model.mlp import decoder_layers


def _wide(t: torch.Tensor) -> torch.Tensor:
    """The per-token products in fp32, or fp64 when the model runs in fp64 (then nothing is rounded to fp32)."""
    return t if t.dtype == torch.float64 else t.float()


@dataclass
class StructureStatistics:
    """Per-structure sums over the calibration tokens (fp64, on the first device)."""

    head_taylor: list[torch.Tensor] = field(default_factory=list)  # [layers] x [query heads]
    group_taylor: list[torch.Tensor] = field(default_factory=list)  # [layers] x [key/value heads]
    layer_taylor: torch.Tensor | None = None  # [layers]
    hidden_taylor: torch.Tensor | None = None  # [hidden]
    head_act_sq: list[torch.Tensor] = field(default_factory=list)  # [layers] x [o_proj inputs]
    layer_cosine: torch.Tensor | None = None  # [layers]: sum over tokens of cos(input, output)
    hidden_activation: torch.Tensor | None = None  # [hidden]: sum over tokens and norms of |norm output|
    tokens: int = 0


class StructureTaps:
    """Hooks that fill `StructureStatistics` during `collect_statistics`' passes.

    Activations wait in per-layer slots that the gradient hooks pop (a hook closing over the tensor it is
    registered on would keep every activation alive until the garbage collector runs). Per-token sums of
    a layer or channel gather over the batch and become |.| at `end_batch`, after the whole backward.
    """

    def __init__(self, model: nn.Module, layout: Layout, taylor: bool, activations: bool):
        self.taylor, self.activations = taylor, activations
        device = next(model.parameters()).device
        layers = decoder_layers(model)
        self.h = h = head_counts(model.config)
        hidden = model.config.hidden_size
        zeros = lambda n: torch.zeros(n, dtype=torch.float64, device=device)  # noqa: E731
        self.stats = StructureStatistics(
            head_taylor=[zeros(h.query) for _ in layers] if taylor else [],
            group_taylor=[zeros(h.kv) for _ in layers] if taylor else [],
            layer_taylor=zeros(len(layers)) if taylor else None,
            hidden_taylor=zeros(hidden) if taylor else None,
            head_act_sq=[zeros(h.query * h.head_dim) for _ in layers] if activations else [],
            layer_cosine=zeros(len(layers)) if activations else None,
            hidden_activation=zeros(hidden) if activations else None,
        )
        self.slots: dict[tuple[str, int], torch.Tensor] = {}
        self.layer_tokens: dict[int, torch.Tensor] = {}  # per-token layer-gate derivative, this batch
        self.hidden_tokens: torch.Tensor | None = None  # per-token channel-gate derivative, this batch
        self.handles = []
        if taylor:
            self.handles.append(model.get_input_embeddings().register_forward_hook(self._embedding))
        for i, layer in enumerate(layers):
            o_proj, down = attention_modules(layer, layout)[-1], submodule(layer, layout.mlp_output)
            self.handles.append(o_proj.register_forward_pre_hook(self._head_input(i)))
            if taylor:
                self.handles.append(o_proj.register_forward_hook(self._write(("o", i), i)))
                self.handles.append(down.register_forward_hook(self._write(("down", i), i)))
            if activations:
                self.handles.append(layer.register_forward_hook(self._layer_cosine(i), with_kwargs=True))
                self.handles += [submodule(layer, n).register_forward_hook(self._norm_output) for n in layout.norms]

    # -- gradients -------------------------------------------------------------------------------------
    def _embedding(self, module, args, out):
        if not torch.is_grad_enabled():
            return None
        out = out.detach().requires_grad_(True)  # the graph starts at the embeddings: hidden channels need it
        self.slots[("embed", -1)] = out.detach()
        out.register_hook(lambda g: self._write_grad(("embed", -1), None, g))
        return out

    def _write(self, key: tuple[str, int], layer: int):
        def hook(module, args, out):
            if torch.is_grad_enabled() and out.requires_grad:
                self.slots[key] = out.detach()
                out.register_hook(lambda g: self._write_grad(key, layer, g))

        return hook

    def _write_grad(self, key, layer: int | None, grad: torch.Tensor) -> None:
        # [B, T, H]: a_c * dL/da_c of one write, on the first device (layers may sit on others: --device_map)
        prod = (_wide(self.slots.pop(key)) * _wide(grad)).to(self.stats.hidden_taylor.device)
        self.hidden_tokens = prod if self.hidden_tokens is None else self.hidden_tokens + prod
        if layer is not None:
            self.layer_tokens[layer] = self.layer_tokens.get(layer, 0) + prod.sum(-1)

    def _head_input(self, layer: int):
        def hook(module, args):
            a = args[0]
            if self.activations:
                acc = self.stats.head_act_sq[layer]
                acc += a.detach().float().pow(2).sum(dim=(0, 1)).to(acc.device)
            if self.taylor and torch.is_grad_enabled() and a.requires_grad:
                self.slots[("head", layer)] = a.detach()
                a.register_hook(lambda g: self._head_grad(layer, g))

        return hook

    def _head_grad(self, layer: int, grad: torch.Tensor) -> None:
        a = self.slots.pop(("head", layer))
        b, t, _ = a.shape
        per_head = (_wide(a) * _wide(grad)).view(b, t, self.h.query, self.h.head_dim).sum(-1)  # [B, T, heads]
        acc = self.stats.head_taylor[layer]
        acc += per_head.abs().sum(dim=(0, 1)).to(acc.device, torch.float64)
        per_group = per_head.view(b, t, self.h.kv, self.h.group).sum(-1)
        acc = self.stats.group_taylor[layer]
        acc += per_group.abs().sum(dim=(0, 1)).to(acc.device, torch.float64)

    # -- activations ------------------------------------------------------------------------------------
    def _layer_cosine(self, layer: int):
        def hook(module, args, kwargs, out):
            x = kwargs.get("hidden_states", args[0] if args else None)
            y = out[0] if isinstance(out, tuple) else out
            cos = F.cosine_similarity(x.detach().float(), y.detach().float(), dim=-1)
            acc = self.stats.layer_cosine
            acc[layer] += cos.sum().to(acc.device, torch.float64)

        return hook

    def _norm_output(self, module, args, out):
        acc = self.stats.hidden_activation
        acc += out.detach().float().abs().sum(dim=(0, 1)).to(acc.device, torch.float64)

    # -- bookkeeping ------------------------------------------------------------------------------------
    def end_batch(self, tokens: int) -> None:
        """After the batch's backward: |per-token sums| of layers and channels into the totals."""
        self.stats.tokens += tokens
        if not self.taylor:
            return
        for layer, per_token in self.layer_tokens.items():
            self.stats.layer_taylor[layer] += per_token.abs().sum().double()
        if self.hidden_tokens is not None:
            self.stats.hidden_taylor += self.hidden_tokens.abs().sum(dim=(0, 1)).double()
        self.layer_tokens.clear()
        self.hidden_tokens = None

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.slots.clear()


def all_reduce_structures(stats: StructureStatistics) -> StructureStatistics:
    """Sum every rank's structure statistics (the windows were split across ranks), in place."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    tensors = [*stats.head_taylor, *stats.group_taylor, *stats.head_act_sq]
    tensors += [t for t in (stats.layer_taylor, stats.hidden_taylor, stats.layer_cosine, stats.hidden_activation)
                if t is not None]  # fmt: skip
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    count = torch.tensor([stats.tokens], dtype=torch.float64, device=tensors[0].device if tensors else "cpu")
    dist.all_reduce(count, op=dist.ReduceOp.SUM)
    stats.tokens = int(count[0])
    return stats
