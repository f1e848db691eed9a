"""Reading what a module inside a decoder layer sees, with forward pre-hooks, and stopping the layer once every
input a step needs is captured (the refit of module/prune/reconstruct.py runs layer by layer on these)."""

from __future__ import annotations

import torch
from torch import nn


class Stop(Exception):
    """Raised once every input a stage needs is captured: the rest of the layer need not run."""


def capture(modules: list[nn.Module], slots: list, stop_after: nn.Module | None) -> list:
    """Forward pre-hooks that keep each module's input in `slots` (and stop the layer after `stop_after`)."""

    def hook_for(index: int, module: nn.Module):
        def hook(mod, args):
            slots[index] = args[0]
            if mod is stop_after:
                raise Stop

        return module.register_forward_pre_hook(hook)

    return [hook_for(i, m) for i, m in enumerate(modules)]


def run_layer(layer: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
    """The layer's output hidden states (None when a capture stopped it)."""
    device = next(layer.parameters()).device
    try:
        out = layer(x.to(device), **kwargs)
    except Stop:
        return None
    return out[0] if isinstance(out, tuple) else out


def intermediate(mlp: nn.Module, output: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of `output` (every neuron's activation) when `mlp` runs on its input `x`; the hook runs before
    (and stops) any capture a stage has put on `output`."""
    slot = [None]

    def hook(module, args):
        slot[0] = args[0]
        raise Stop

    handle = output.register_forward_pre_hook(hook, prepend=True)
    try:
        mlp(x.to(next(mlp.parameters()).device))
    except Stop:
        pass
    finally:
        handle.remove()
    return slot[0]
