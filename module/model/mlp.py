"""One adapter per MLP shape: where the intermediate neurons live and how to slice them.

An MLP neuron j is one row of every input projection (gate/up, fc1, c_fc, ...) and one column of
the output projection (down_proj, fc2, c_proj, ...). Each adapter is data, not code: the names
of those projections inside a decoder layer and the config key that stores the intermediate size.
The slicing itself is shared by all shapes (`NeuronAxis.select`). Also the two facts every other
package asks of a model: its list of decoder layers and its parameter count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from utils.errors import UserError


class UnsupportedModelError(UserError):
    """The model has no MLP shape that an adapter knows."""


@dataclass
class NeuronAxis:
    """A projection whose weight has one axis indexed by the MLP neurons.

    `blocks` > 1 is a fused projection (Phi-3 `gate_up_proj`) that stacks `blocks` copies of
    the neuron axis one after another.
    """

    module: nn.Module
    weight_axis: int
    bias_indexed: bool
    blocks: int = 1

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    def block(self, index: int) -> torch.Tensor:
        """The weight rows/columns of one block, with the neuron axis first."""
        w = self.module.weight.detach()
        w = w if self.weight_axis == 0 else w.t()
        n = w.shape[0] // self.blocks
        return w[index * n : (index + 1) * n]

    @property
    def neurons(self) -> int:
        return self.module.weight.shape[self.weight_axis] // self.blocks

    def select(self, keep: torch.Tensor) -> None:
        """Keep only neurons `keep` (sorted indices), in place, module sizes updated."""
        n = self.neurons
        keep = keep.to(self.module.weight.device)
        index = torch.cat([keep + b * n for b in range(self.blocks)])
        w = self.module.weight
        w.data = w.data.index_select(self.weight_axis, index).contiguous()
        if self.bias_indexed and getattr(self.module, "bias", None) is not None:
            self.module.bias.data = self.module.bias.data.index_select(0, index).contiguous()
        size = w.shape[self.weight_axis]
        if isinstance(self.module, nn.Linear):
            setattr(self.module, "out_features" if self.weight_axis == 0 else "in_features", size)
        elif isinstance(self.module, Conv1D):
            setattr(self.module, "nf" if self.weight_axis == 1 else "nx", size)


@dataclass
class LayerMLP:
    """The neuron-indexed projections of one decoder layer's MLP."""

    inputs: list[NeuronAxis]  # neurons on the output side (gate/up/fc1/c_fc)
    output: NeuronAxis  # neurons on the input side (down/fc2/c_proj); its input is the activation

    @property
    def neurons(self) -> int:
        return self.output.neurons

    def params_per_neuron(self) -> int:
        """Parameters removed with one neuron: its weight rows/columns and input-side biases."""
        count = 0
        for axis in [*self.inputs, self.output]:
            w = axis.weight
            other = w.numel() // w.shape[axis.weight_axis]
            count += other * axis.blocks
            if axis.bias_indexed and getattr(axis.module, "bias", None) is not None:
                count += axis.blocks
        return count

    def select(self, keep: torch.Tensor) -> None:
        for axis in [*self.inputs, self.output]:
            axis.select(keep)


def _axes(module: nn.Module, *, output_side: bool, blocks: int = 1) -> NeuronAxis:
    # nn.Linear weight is [out, in]; GPT-2's Conv1D weight is [in, out].
    conv = isinstance(module, Conv1D)
    if output_side:  # neurons are this projection's outputs
        return NeuronAxis(module, weight_axis=1 if conv else 0, bias_indexed=True, blocks=blocks)
    return NeuronAxis(module, weight_axis=0 if conv else 1, bias_indexed=False)


@dataclass(frozen=True)
class MLPShape:
    """Names that locate one MLP shape inside a decoder layer."""

    name: str
    container: str  # attribute of the decoder layer holding the projections ("" = the layer)
    inputs: tuple[str, ...]
    output: str
    config_key: str
    blocks: int = 1  # >1: a single fused input projection

    def match(self, layer: nn.Module) -> LayerMLP | None:
        holder = getattr(layer, self.container, None) if self.container else layer
        if holder is None:
            return None
        mods = [getattr(holder, n, None) for n in (*self.inputs, self.output)]
        if not all(isinstance(m, (nn.Linear, Conv1D)) for m in mods):
            return None
        *ins, out = mods
        return LayerMLP(
            inputs=[_axes(m, output_side=True, blocks=self.blocks) for m in ins],
            output=_axes(out, output_side=False),
        )


SHAPES: tuple[MLPShape, ...] = (
    # Llama, Mistral, Qwen2/3, Gemma/2/3, Granite, ...
    MLPShape("gated", "mlp", ("gate_proj", "up_proj"), "down_proj", "intermediate_size"),
    # Phi-3: gate and up stacked in one projection
    MLPShape("fused_gated", "mlp", ("gate_up_proj",), "down_proj", "intermediate_size", blocks=2),
    # GPT-2 (Conv1D weights)
    MLPShape("gpt2", "mlp", ("c_fc",), "c_proj", "n_inner"),
    # GPT-NeoX / Pythia
    MLPShape("neox", "mlp", ("dense_h_to_4h",), "dense_4h_to_h", "intermediate_size"),
    # OPT: fc1/fc2 sit directly on the decoder layer
    MLPShape("opt", "", ("fc1",), "fc2", "ffn_dim"),
)


@dataclass
class ModelMLPs:
    """Every decoder layer's MLP of one model, found by one shape."""

    shape: MLPShape
    layers: list[LayerMLP]

    @property
    def neurons(self) -> int:
        return self.layers[0].neurons

    def set_intermediate_size(self, config, k: int) -> None:
        setattr(config, self.shape.config_key, k)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks: the longest ModuleList of num_hidden_layers blocks."""
    n = getattr(model.config, "num_hidden_layers", None)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if n is not None:
        lists = [m for m in lists if len(m) == n] or lists
    if not lists:
        raise UnsupportedModelError(f"unsupported model {type(model).__name__}: no list of decoder layers")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def _mlp_like_types(layer: nn.Module) -> str:
    found = sorted(
        {
            f"{name}: {type(mod).__name__}"
            for name, mod in layer.named_children()
            if any(k in name.lower() for k in ("mlp", "ffn", "feed_forward", "fc", "moe", "expert"))
        }
    )
    return ", ".join(found) or ", ".join(f"{n}: {type(m).__name__}" for n, m in layer.named_children())


def find_mlps(model: nn.Module) -> ModelMLPs:
    """Match one MLP shape on every decoder layer, or fail naming what was found."""
    layers = decoder_layers(model)
    for shape in SHAPES:
        matched = [shape.match(layer) for layer in layers]
        if all(m is not None for m in matched):
            sizes = {m.neurons for m in matched}
            if len(sizes) != 1:
                raise UnsupportedModelError(
                    f"unsupported model {type(model).__name__}: layers have different MLP sizes {sorted(sizes)}"
                )
            return ModelMLPs(shape, matched)
    raise UnsupportedModelError(
        f"unsupported model {type(model).__name__}: no known MLP shape in {type(layers[0]).__name__} "
        f"(found {_mlp_like_types(layers[0])}); supported projections: "
        + "; ".join(f"{'/'.join(s.inputs)}->{s.output}" for s in SHAPES)
    )


def count_parameters(model: nn.Module) -> int:
    """Parameters of the model, tied weights counted once (as `model.parameters()` yields them)."""
    return sum(p.numel() for p in model.parameters())
