"""`prune.py --dynamic probe`: calibrate Probe Pruning's history on the dense model, attach the per-batch pruning and
write its folder (module/dynamic/folder.py), with the perplexity before and after and, with --measure_speed, prefill
and decoding speed against the dense model. No weight is removed: the folder points at the origin model.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict
from pathlib import Path

from module.dynamic.folder import write_folder
from module.dynamic.history import calibrate
from module.dynamic.probe import layer_ratio
from module.dynamic.wrap import ProbeSettings, attach
from module.model.layout import layout_of
from module.model.mlp import decoder_layers, find_mlps
from module.prune.scores import run_scores
from module.run import Run, begin_run
from module.speed import speed_against, speed_of
from utils.errors import UserError
from utils.pruned_folder import perplexity_after, perplexity_before, perplexity_text, write_atomically
from utils.report import write_json

REPORT = "dynamic_report.json"
PART_NAMES = {"mlp": "MLP neurons", "heads": "query heads"}


def settings_of(cfg) -> ProbeSettings:
    return ProbeSettings.of(cfg.dynamic_variant, ratio=cfg.pruning_ratios[0], parts=tuple(cfg.parts),
                            metric=cfg.dynamic_metric, prior=cfg.dynamic_prior != "none")  # fmt: skip


def needs_history(settings: ProbeSettings) -> bool:
    return settings.history or settings.probe == "none" or settings.prior


def run_dynamic(cfg) -> list[Path]:
    """The dynamic run of a PruneConfig with --dynamic probe: the written folder."""
    name = Path(cfg.origin_path.rstrip("/")).name
    parts = "-".join(cfg.parts)
    out = Path(cfg.output_dir or f"out/{name}-probe-{cfg.dynamic_variant}-{parts}-r{cfg.pruning_ratios[0]:g}"
               f"-s{cfg.seed}")  # fmt: skip
    one_process = "--dynamic calibrates in one process; use --device_map auto for a model larger than one GPU"
    with begin_run(cfg, [out], single_process=one_process) as run:
        build(cfg, run, out)
    return [out]


def build(cfg, run: Run, out: Path) -> None:
    """Check on the weightless copy, draw the windows, load, calibrate, attach, evaluate, write."""
    settings = settings_of(cfg)
    shapes = run.shapes()
    layout_of(shapes, "dynamic", "--dynamic probe")  # a family without a mapping stops here, before any loading
    n_layers = len(decoder_layers(shapes))
    if settings.skip_layers >= n_layers:
        raise UserError(f"--dynamic probe never prunes the first {settings.skip_layers} layers; this model has "
                        f"{n_layers}")  # fmt: skip
    if layer_ratio(n_layers, settings.ratio, settings.skip_layers) >= 1:
        raise UserError(f"--pruning_ratio {settings.ratio:g} of all {n_layers} layers, taken from the "
                        f"{n_layers - settings.skip_layers} it prunes, removes every unit of them; give a smaller "
                        "ratio")  # fmt: skip
    tokenizer, windows, eval_docs = run.calibration(shapes, cfg.seq_len, needs_history(settings))
    model = run.load_model()
    report = {**run.report(model), "dynamic": "probe", "probe_settings": asdict(settings),
              "layer_ratio": layer_ratio(n_layers, settings.ratio, settings.skip_layers)}  # fmt: skip
    ppl_windows, ppl_before = perplexity_before(cfg, model, tokenizer, eval_docs)
    dense_speed = speed_of(model) if cfg.measure_speed else None
    start = time.perf_counter()
    history = None
    if windows is not None:
        history = calibrate(model, layout_of(model, "dynamic"), windows, cfg.batch_size, cfg.progress)
    report["calibration_seconds"] = time.perf_counter() - start
    prior = None
    if settings.prior:
        scores, _, imp = run_scores(prior_config(cfg), model, find_mlps(model), windows, run.dtype, run.device,
                                    run.state)  # fmt: skip
        prior, report["prior_importance"] = scores, imp
    attach(model, settings, history, prior)
    perplexity_after(cfg, model, report, ppl_windows, ppl_before)
    if dense_speed is not None:
        report["dense_speed"], report["speed"] = dense_speed, speed_against(dense_speed, model)
    report["total_seconds"] = run.seconds()
    calibration = {"dataset": cfg.calib_dataset, "windows": 0 if windows is None else len(windows),
                   "seq_len": cfg.seq_len, "seed": cfg.seed}  # fmt: skip

    def fill(tmp: Path) -> None:
        write_folder(tmp, settings, history, cfg.origin_path, model, calibration, prior)
        write_json(tmp / REPORT, report)

    write_atomically(out, cfg.overwrite, fill)
    print(f"{out}: Probe Pruning ({settings_text(settings)}) of {cfg.origin_path}" + perplexity_text(report),
          flush=True)


def prior_config(cfg):
    """The settings of the prior's importance pass: the entropy criterion on the MLP neurons."""
    prior = copy.copy(cfg)
    prior.criterion, prior.parts = "entropy", ["mlp"]
    return prior


def settings_text(settings: ProbeSettings) -> str:
    what = {"rank": "probe", "full": "whole batch", "none": "history only"}[settings.probe]
    return (f"{settings.ratio:g} of {' and '.join(PART_NAMES[p] for p in settings.parts)} per batch, {what}, "
            f"{'history' if settings.history else 'no history'}, {settings.metric}")
