"""Layer-sequential calibration, as Wanda and SparseGPT run it.

The calibration windows' inputs of decoder layer 0 are captured once (kept on `store` — the CPU when asked,
so a model far larger than its activations runs layer by layer); then for each layer: its linear layers'
input statistics are gathered over every window, the layer is pruned, and its outputs — computed with the
pruned weights — become the next layer's inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from module.model.mlp import decoder_layers


@dataclass
class LinearStats:
    """Sums over the calibration tokens of one linear layer's inputs x (fp32).

    D²Prune's activation statistics are kept as its released code builds them (prune/d2prune_utils.py at
    b22c860): it adds one window at a time to running averages, each update first scaling the sum by n/(n+1),
    so window w of K ends up weighted w/K, and its SparseGPT layers take the input norm after scaling the input
    by sqrt(2/w). `d2_statistics` turns the weighted sums below into its y and dx."""

    sq: torch.Tensor  # sum of x_j^2, [in]
    xx: torch.Tensor | None = None  # sum of x x^T, [in, in] (SparseGPT's Hessian, before 2/n)
    in_norm_w: torch.Tensor | None = None  # sum over windows w of w * ||x_j||_w, [in] (D2Prune, no-update layers)
    in_norm_sqrt_w: torch.Tensor | None = None  # sum over windows of sqrt(w) * ||x_j||_w, [in] (D2Prune)
    out_norm_w: torch.Tensor | None = None  # sum over windows w of w * ||y_i||_w, [out] (D2Prune)
    tokens: int = 0
    windows: int = 0

    @classmethod
    def for_linear(cls, linear: nn.Linear, hessian: bool, norms: bool = False) -> LinearStats:
        device = linear.weight.device
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float32, device=device)  # noqa: E731
        n = linear.in_features
        return cls(zeros(n), zeros(n, n) if hessian else None, zeros(n) if norms else None,
                   zeros(n) if norms else None, zeros(linear.out_features) if norms else None)  # fmt: skip

    def hessian(self, per: str = "token") -> torch.Tensor:
        """2 X X^T averaged per token (ours: the scale does not change SparseGPT's masks or update), or per
        window (SparseGPT's and D²Prune's released code: T times ours), which D²Prune's saliency sums with
        its activation terms."""
        return self.xx * (2.0 / max(self.tokens if per == "token" else self.windows, 1))

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One batch: inputs x and outputs y, [windows, tokens, features], windows in calibration order."""
        x = x.detach().reshape(-1, x.shape[-2], x.shape[-1]).float()
        if self.in_norm_w is not None:
            w = torch.arange(self.windows + 1, self.windows + 1 + x.shape[0], device=x.device, dtype=torch.float32)
            x_norm = x.norm(dim=1)  # [windows, in]: each window's norm over its tokens
            y_norm = y.detach().float().reshape(x.shape[0], -1, y.shape[-1]).norm(dim=1)
            self.in_norm_w += (w[:, None] * x_norm).sum(0)
            self.in_norm_sqrt_w += (w.sqrt()[:, None] * x_norm).sum(0)
            self.out_norm_w += (w[:, None] * y_norm.to(w.device)).sum(0)
        self.windows += x.shape[0]
        x = x.reshape(-1, x.shape[-1])
        self.sq += x.pow(2).sum(0)
        if self.xx is not None:
            self.xx += x.t() @ x
        self.tokens += x.shape[0]


class _Stop(Exception):
    """Raised by the hook on layer 0 once its input is captured: nothing above it needs to run."""


def _output(out):
    return out[0] if isinstance(out, tuple) else out


def linears_of(layer: nn.Module) -> dict[str, nn.Linear]:
    """Every linear layer inside a decoder layer, by its name there (q/k/v/o, gate/up/down, ...)."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def layer_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int, store: torch.device | str):
    """Decoder layer 0's hidden-state inputs for each batch of windows, and every layer's keyword arguments
    (position embeddings, attention mask, ...) per batch size, captured from one full forward each."""
    layers = decoder_layers(model)
    device = model.get_input_embeddings().weight.device
    inputs: list[torch.Tensor] = []

    def catch(module, args, kwargs):
        inputs.append(kwargs.get("hidden_states", args[0] if args else None).to(store))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for s in range(0, len(windows), batch_size):
            with contextlib.suppress(_Stop):
                model.base_model(input_ids=windows[s : s + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()
    layer_kwargs = {n: _kwargs_per_layer(model, windows[:n].to(device)) for n in {len(x) for x in inputs}}
    return inputs, layer_kwargs


def _kwargs_per_layer(model: nn.Module, ids: torch.Tensor) -> list[dict]:
    """The keyword arguments every decoder layer gets for a batch shaped like `ids` (one full forward)."""
    layers = decoder_layers(model)
    captured: list[dict] = [{} for _ in layers]

    def keep(index: int):
        def hook(module, args, kwargs):
            captured[index] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

        return hook

    handles = [layer.register_forward_pre_hook(keep(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model.base_model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return captured


@torch.no_grad()
def run_layerwise(
    model: nn.Module,
    windows: torch.Tensor | None,
    prune_layer: Callable[[int, dict[str, nn.Linear], dict[str, LinearStats] | None], None],
    batch_size: int = 1,
    hessian: bool = False,
    norms: bool = False,
    store: torch.device | str | None = None,
    progress: bool = True,
) -> None:
    """Call `prune_layer(index, linears, stats)` for every decoder layer in order, with each linear's input
    statistics over the windows as the already pruned layers below transform them (None without windows)."""
    layers = decoder_layers(model)
    was_training = model.training
    model.eval()
    if windows is None:
        for i, layer in enumerate(layers):
            prune_layer(i, linears_of(layer), None)
        return
    device = model.get_input_embeddings().weight.device
    store = store or device
    inputs, layer_kwargs = layer_inputs(model, windows, batch_size, store)
    bar = tqdm(total=len(layers), desc="layer-sequential pruning", unit="layer", disable=not progress)
    try:
        for i, layer in enumerate(layers):
            layer_device = next(layer.parameters()).device
            linears = linears_of(layer)
            stats = {name: LinearStats.for_linear(lin, hessian, norms) for name, lin in linears.items()}
            handles = [lin.register_forward_hook(lambda m, args, out, s=stats[name]: s.add(args[0], out))
                       for name, lin in linears.items()]  # fmt: skip
            try:
                for x in inputs:
                    layer(x.to(layer_device), **layer_kwargs[len(x)][i])
            finally:
                for h in handles:
                    h.remove()
            prune_layer(i, linears, stats)
            del stats
            for b, x in enumerate(inputs):  # the pruned layer's outputs are the next layer's inputs
                inputs[b] = _output(layer(x.to(layer_device), **layer_kwargs[len(x)][i])).to(store)
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
