"""A run's scores: from the importance cache when every setting that changes them matches, else from one
importance pass (module/prune/importance.py for the neurons, taps.py for the other structures) scored by
criteria.py and cached (safetensors + JSON, written atomically).

Under `accelerate launch`, every rank draws the same windows, runs its share (every N-th window) and the
per-unit sums are all-reduced before scoring, so every rank ranks the same scores.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from module.model.layout import layout_of
from module.model.mlp import ModelMLPs
from module.prune.criteria import score_neurons
from module.prune.importance import ACTIVATION_CRITERIA, GRADIENT_CRITERIA, all_reduce_statistics, collect_statistics
from module.prune.mix import first_units_scores
from module.prune.plan import structure_scores
from module.prune.taps import StructureTaps, all_reduce_structures
from utils.io import digest, load_importance, model_fingerprint, save_importance
from utils.report import PeakMemory

log = logging.getLogger("hfprune")
SCORES_VERSION = 1  # bump when the score computation changes, so old cache entries are not reused


def cache_key(cfg, model: nn.Module, windows: torch.Tensor | None, dtype: torch.dtype) -> tuple[str, dict]:
    """The cache key of a run's scores and the settings it is made of (everything that changes the scores)."""
    fields = {
        "scores_version": SCORES_VERSION,
        "model": model_fingerprint(model),
        "criterion": cfg.criterion,
        "dtype": str(dtype),
        "seed": cfg.seed if cfg.criterion == "random" else None,
        "windows": digest(windows.numpy().tobytes()) if windows is not None else None,
        "calib_dataset": cfg.calib_dataset,
        "calib_samples": cfg.calib_samples,
        "seq_len": cfg.seq_len,
    }
    if any(p != "mlp" for p in cfg.parts):  # a run of --prune_parts mlp keeps its key (and its cache entries)
        fields["parts"] = sorted(cfg.parts)
    if cfg.structure_criteria:  # a run without it keeps its key
        fields["structure_criteria"] = {p: c for p, c in sorted(cfg.criteria.items()) if c != cfg.criterion}
    return digest(fields)[:20], fields


def fits(scores: list[torch.Tensor], extra: dict, model: nn.Module, mlps: ModelMLPs, parts: list[str]) -> bool:
    """A cached entry has one score per unit of every structure this run prunes (a damaged or foreign entry
    does not)."""
    if "mlp" in parts and [s.shape for s in scores] != [torch.Size([mlps.neurons])] * len(mlps.layers):
        return False
    wanted = first_units_scores(model)
    needed = [k for k in wanted if k.split(".")[0] in ("heads", "groups") and "heads" in parts or k in parts]
    return all(k in extra and extra[k].shape == wanted[k].shape for k in needed)


def run_scores(cfg, model: nn.Module, mlps: ModelMLPs, windows: torch.Tensor | None, dtype: torch.dtype,
               device: torch.device, state) -> tuple[list[torch.Tensor], dict, dict]:  # fmt: skip
    """Neuron scores per layer, other structures' scores by name, and the metadata of how they were made."""
    structure_parts = [p for p in cfg.parts if p != "mlp"]
    key, key_fields = cache_key(cfg, model, windows, dtype)
    entry = Path(cfg.importance_cache) / f"{cfg.criterion}-{key}" if cfg.importance_cache else None
    if entry is not None and not cfg.recompute and (cached := load_importance(entry)) is not None:
        if fits(cached[0], cached[2], model, mlps, cfg.parts):
            log.info("importance: reusing cached scores from %s", entry)
            return cached[0], cached[2], {**cached[1], "cache_hit": True, "cache_entry": str(entry)}
        log.warning("importance cache entry %s does not fit this model's shapes: recomputing it", entry)
    with PeakMemory(device) as peak:
        stats = None
        taps = None
        if windows is not None:
            shard = windows[state.process_index :: state.num_processes]
            if structure_parts:
                used = {cfg.criterion, *(cfg.criteria[p] for p in structure_parts)}
                taps = StructureTaps(model, layout_of(model, structure_parts[0]), bool(used & set(GRADIENT_CRITERIA)),
                                     bool(used & set(ACTIVATION_CRITERIA)))  # fmt: skip
            stats = collect_statistics(
                model, mlps, shard, cfg.criterion, cfg.batch_size, cfg.loss_chunk_tokens or None,
                cfg.progress and state.is_main_process, cfg.activation_checkpointing, taps=(taps,) if taps else (),
            )  # fmt: skip
            all_reduce_statistics(stats)
            if taps is not None:
                all_reduce_structures(taps.stats)
        scores = score_neurons(cfg.criterion, mlps, stats, cfg.seed) if "mlp" in cfg.parts else []
        extra = structure_scores(model, structure_parts, cfg.criteria, taps.stats if taps else None, cfg.seed)
    meta = {
        "key": key,
        "key_fields": key_fields,
        "calib_tokens": stats.tokens if stats else 0,
        "calib_windows": stats.windows if stats else 0,
        "importance_seconds": stats.seconds if stats else 0.0,
        "tokens_per_second": stats.tokens / stats.seconds if stats and stats.seconds else None,
        "mean_window_loss": stats.loss_sum / stats.windows if stats and stats.windows and stats.loss_sum else None,
        "peak_memory_bytes": peak.bytes,
        "batch_size": cfg.batch_size,
    }
    if meta["tokens_per_second"]:
        log.info("importance: %d tokens in %.1f s (%.0f tokens/s)", meta["calib_tokens"], meta["importance_seconds"],
                 meta["tokens_per_second"])  # fmt: skip
    if entry is not None and state.is_main_process:
        save_importance(entry, scores, meta, extra)
        log.info("importance: cached in %s", entry)
    return scores, extra, {**meta, "cache_hit": False, "cache_entry": str(entry) if entry else None}
