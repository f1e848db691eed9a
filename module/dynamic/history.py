"""Probe Pruning's history: per decoder layer and token position, the calibration mean of x^2 (PPsp, wanda_sp) and of
x (FLAP's fluctuation) of each pruned projection's input (o_proj: per query-head channel; down_proj: per neuron),
measured on the dense model in fp32, saved with the dynamic folder (safetensors) and updated by the EMA while
pruning (module/dynamic/probe.py `ema_update`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from module.model.layout import Layout, submodule
from module.model.mlp import decoder_layers

PROJECTIONS = ("attn", "mlp")  # o_proj's input, down_proj's input


def projection_path(layout: Layout, which: str) -> str:
    """The pruned projection of `which` (attn or mlp) in a decoder layer."""
    return f"{layout.attention}.{layout.output}" if which == "attn" else layout.mlp_output


@dataclass
class History:
    """`energy[key]` [T, in]: mean over windows of x^2 at each position; `mean[key]`: of x; key 'attn.3', 'mlp.3'."""

    energy: dict[str, torch.Tensor]
    mean: dict[str, torch.Tensor]
    windows: int

    @property
    def positions(self) -> int:
        return next(iter(self.energy.values())).shape[0]

    def fluctuation(self, key: str) -> torch.Tensor:
        """FLAP's per-position fluctuation E_t[(x - mu)^2], mu the mean over all calibration tokens."""
        mu = self.mean[key].mean(0, keepdim=True)
        return (self.energy[key] - 2 * mu * self.mean[key] + mu**2).clamp(min=0)

    def save(self, path: Path) -> None:
        tensors = {f"energy.{k}": v.contiguous() for k, v in self.energy.items()}
        tensors |= {f"mean.{k}": v.contiguous() for k, v in self.mean.items()}
        save_file(tensors, str(path), metadata={"windows": str(self.windows)})

    @classmethod
    def load(cls, path: Path, device: torch.device | str = "cpu") -> History:
        from safetensors import safe_open

        with safe_open(str(path), "pt", device=str(device)) as f:
            windows = int(f.metadata()["windows"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle is not iterable)
        energy = {k.removeprefix("energy."): v for k, v in tensors.items() if k.startswith("energy.")}
        mean = {k.removeprefix("mean."): v for k, v in tensors.items() if k.startswith("mean.")}
        return cls(energy, mean, windows)


@torch.no_grad()
def calibrate(model: nn.Module, layout: Layout, windows: torch.Tensor, batch_size: int = 1,
              progress: bool = True) -> History:  # fmt: skip
    """The history of every layer's o_proj and down_proj inputs over `windows` [n, T] (no pads), dense model."""
    layers = decoder_layers(model)
    n_positions = windows.shape[1]
    energy: dict[str, torch.Tensor] = {}
    mean: dict[str, torch.Tensor] = {}

    def keep(key: str):
        def hook(module, args):
            x = args[0].detach().float()
            if key not in energy:
                energy[key] = torch.zeros(n_positions, x.shape[-1], device=x.device)
                mean[key] = torch.zeros(n_positions, x.shape[-1], device=x.device)
            energy[key] += (x**2).sum(0)
            mean[key] += x.sum(0)

        return hook

    handles = [submodule(layer, projection_path(layout, which)).register_forward_pre_hook(keep(f"{which}.{i}"))
               for i, layer in enumerate(layers) for which in PROJECTIONS]  # fmt: skip
    device = model.get_input_embeddings().weight.device
    try:
        for s in tqdm(range(0, len(windows), batch_size), desc="probe history", disable=not progress):
            model.base_model(input_ids=windows[s : s + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    n = len(windows)
    return History({k: (v / n).cpu() for k, v in energy.items()}, {k: (v / n).cpu() for k, v in mean.items()}, n)
