"""One pruning run from a PruneConfig (cfg/prune_config.py): what prune.py calls, and what benchmarks and
tests call from Python.

    from cfg.prune_config import PruneConfig
    from module.pipeline import prune_model
    outs = prune_model(PruneConfig(origin_path="models/SmolLM2-135M-Instruct", pruning_ratio="0.2"))

Structures (module/prune: MLP neurons, heads, layers, hidden width, the mix search) or single weights
(module/sparse: --sparsity), or Probe Pruning per batch (module/dynamic: --dynamic probe); the result is every
saved folder.
"""

from __future__ import annotations

from pathlib import Path

from module.dynamic.pipeline import run_dynamic
from module.prune.pipeline import prune_structures
from module.sparse.pipeline import run_sparsity


def prune_model(cfg) -> list[Path]:
    """Run the pruning that `cfg` asks for and return the folders it wrote."""
    if cfg.dynamic != "none":
        return run_dynamic(cfg)
    if cfg.sparsity:
        return run_sparsity(cfg)
    return prune_structures(cfg)
