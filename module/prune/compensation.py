"""How a prune.py run asks for compensation after removal: its `--reconstruct*` flags as Settings, and the one call
that reconstructs a pruned model as they ask (the walk itself: module/prune/reconstruct.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from module.model.layout import layout_of, supports
from module.model.slicing import add_biases
from module.prune.consumers import bias_paths, mlp_output_path
from module.prune.reconstruct import REFIT_BATCH, reconstruct

log = logging.getLogger("hfprune")


@dataclass(frozen=True)
class Settings:
    """How a run reconstructs (from its PruneConfig) and on which windows."""

    mode: str
    target: str
    damp: float
    windows: torch.Tensor | None
    batch_size: int = 1
    store: str | None = None
    progress: bool = True
    trust_remote_code: bool = False
    writers: str = "pruned"
    weighting: str = "rms"
    select: str = "scores"

    @classmethod
    def of(cls, cfg, windows: torch.Tensor | None) -> Settings:
        return cls(cfg.reconstruct, cfg.reconstruct_target, cfg.refit_damp, windows,
                   max(cfg.batch_size, REFIT_BATCH), "cpu" if cfg.offload_inputs else None, cfg.progress,
                   cfg.trust_remote_code, cfg.reconstruct_writers, cfg.reconstruct_weighting,
                   cfg.reconstruct_select)  # fmt: skip

    @property
    def active(self) -> bool:
        return self.mode != "none"


def reconstructed(dense: nn.Module, pruned: nn.Module, mlp_keep, kept: dict, settings: Settings) -> dict | None:
    """Reconstruct `pruned` in place as `settings` ask (None when they ask for nothing): the layout of the family
    when it has one (heads, layers, hidden channels), else the MLP adapter alone; biases added for `bias`."""
    if not settings.active:
        return None
    layout = layout_of(dense, "heads") if supports(dense, "heads") else None
    keys = []
    if settings.mode == "bias":
        keys = add_biases(pruned, bias_paths(mlp_keep, kept, layout, mlp_output_path(dense, layout)),
                             settings.trust_remote_code)  # fmt: skip
    report = reconstruct(dense, pruned, mlp_keep, kept, layout, settings.mode, settings.target, settings.damp,
                         settings.windows, settings.batch_size, settings.store, settings.progress,
                         settings.writers, settings.weighting, settings.select)  # fmt: skip
    log.info("reconstruct (%s, %s targets): %d consumers refit, %d layer maps in %.1f s", settings.mode,
             settings.target, report["consumers_refit"], report["layer_maps"], report["seconds"])  # fmt: skip
    return {**report, "bias_keys_set": keys}
