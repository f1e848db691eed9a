"""A structured pruning run, from a PruneConfig to saved models: check everything the config decides on a
weightless copy, draw the calibration windows, load, score (cached), search the mix when asked, cut, save.

    from cfg.prune_config import PruneConfig
    from module.prune.pipeline import prune_structures
    prune_structures(PruneConfig(origin_path="models/SmolLM2-135M-Instruct", pruning_ratio="0.2",
                                 calib_dataset="builtin", calib_samples=32, seq_len=256))
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from dataset.calibration import draw_windows, heldout_windows, load_documents
from module.model.layout import StructureError, layout_of, supports
from module.model.mlp import count_parameters, find_mlps
from module.prune.compensation import Settings, reconstructed
from module.prune.masks import CandidateMasks, candidate_kl, models_kl
from module.prune.mix import (
    Candidate,
    Mix,
    MixSpace,
    candidate_of,
    mix_kept,
    search,
    search_layout,
    sliced_copy,
    with_kl,
)
from module.prune.output import save_mlp_sizes, save_structures
from module.prune.plan import KeepPlan, check_sizes, plan_keep
from module.prune.scores import run_scores
from module.run import Run, begin_run
from module.speed import speed_against, speed_of
from utils.cli import check_context
from utils.pruned_folder import perplexity_before

log = logging.getLogger("hfprune")


def output_dirs(cfg) -> list[Path]:
    """One folder per saved model: --output_dir itself for one, else descriptive names under it (or out/)."""
    name = Path(cfg.origin_path.rstrip("/")).name
    if cfg.search:
        parts = "auto" if cfg.auto else "+".join(cfg.parts)
        tags = [f"{cfg.criterion}-{parts}-pr{r:g}-s{cfg.seed}" for r in cfg.pruning_ratios]
    elif cfg.selected_mix is not None:
        tags = [f"{cfg.criterion}-{cfg.selected_mix.describe().replace('=', '').replace(',', '-')}-s{cfg.seed}"]
    else:
        sizes = cfg.structure_sizes
        parts = "".join(f"-{tag}{v}" for tag, v in (("heads", sizes.heads_keep), ("layers-", sizes.layers_remove),
                                                     ("hidden", sizes.hidden_keep)) if v)  # fmt: skip
        if sizes.heads_keep and sizes.head_mode != "kv_group":
            parts += f"-{sizes.head_mode}"
        mlp = [f"-{'pr' if kind == 'pruning_ratio' else 'mlp'}{v:g}" for kind, v in cfg.sizes] or [""]
        tags = [f"{cfg.criterion}{m}{parts}-s{cfg.seed}" for m in mlp]
    if cfg.reconstruct != "none":
        tags = [t.replace(f"-s{cfg.seed}", f"-{cfg.reconstruct}-s{cfg.seed}") for t in tags]
    if cfg.output_dir and len(tags) == 1:
        return [Path(cfg.output_dir)]
    parent = Path(cfg.output_dir) if cfg.output_dir else Path("out")
    return [parent / f"{name}-{t}" for t in tags]


def searching(cfg) -> bool:
    """A mix search or --mix: candidates are scored on held-out windows."""
    return cfg.search or cfg.selected_mix is not None


def calibration_windows(cfg, tokenizer) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The seeded calibration windows (None when neither the criterion nor a reconstruction needs data; with
    --reconstruct_samples N beyond --calib_samples, N of them: the first --calib_samples score, all N refit) and,
    for a mix search, the held-out windows drawn from the other documents (drawn alike for every criterion, so
    their KLs compare)."""
    if cfg.data_free and not searching(cfg) and cfg.reconstruct == "none":
        return None, None
    docs = load_documents(cfg.calib_dataset, cfg.calib_text_field)
    n = max(cfg.calib_samples, cfg.reconstruct_samples if cfg.reconstruct != "none" else 0)
    windows, used = draw_windows(docs, tokenizer, n, cfg.seq_len, cfg.seed)  # the first k of n: the draw of k
    log.info("calibration: %d windows x %d tokens from %s (%d documents)", *windows.shape, cfg.calib_dataset, len(docs))
    heldout = None
    if searching(cfg):
        heldout = heldout_windows(docs, tokenizer, used, cfg.search_windows, cfg.seq_len, cfg.seed)
        log.info("mix search: %d held-out windows x %d tokens from other documents", *heldout.shape)
    return windows, heldout


def size_plans(cfg, model: nn.Module) -> list[KeepPlan]:
    """One KeepPlan per requested MLP size (errors name the size that the model cannot reach)."""
    if not cfg.sizes:
        return []
    mlps = find_mlps(model)
    params = count_parameters(model)
    hidden = model.config.hidden_size
    return [plan_keep(params, mlps, hidden_size=hidden, round_to=cfg.round_to, **{k: v}) for k, v in cfg.sizes]


def check_before_loading(cfg, shapes: nn.Module) -> list[tuple[float, MixSpace | Candidate]]:
    """Everything that the config alone decides, on a weightless copy of the model: the MLP shape, every
    size, the window lengths, and the search's candidates, so that a mistake is reported before minutes of
    weight loading. Resolves --prune_parts auto to the structures the family supports."""
    if not cfg.data_free or searching(cfg):
        check_context(shapes, cfg.seq_len, "--seq_len", cfg.allow_long_context)
    if cfg.eval_text:
        check_context(shapes, cfg.eval_seq_len, "--eval_seq_len", cfg.allow_long_context)
    size_plans(cfg, shapes)
    check_sizes(shapes, cfg.structure_sizes)
    if cfg.auto:
        cfg.parts = [p for p in cfg.parts if supports(shapes, p)]  # later steps see the resolved list
        if cfg.parts == ["mlp"] and cfg.selected_mix is None:
            raise StructureError(
                f"--prune_parts auto: {shapes.config.model_type} supports only mlp here; give --pruning_ratio without "
                "--prune_parts to prune MLP neurons"
            )
    else:
        for part in cfg.parts:
            if part != "mlp":
                layout_of(shapes, part)
    params = count_parameters(shapes)
    if cfg.selected_mix is not None:
        cand = candidate_of(shapes, cfg.selected_mix, params)
        return [(cand.achieved_ratio, cand)]
    if not cfg.search:
        return []
    out = []
    for ratio in cfg.pruning_ratios:
        space = MixSpace(shapes, cfg.parts, ratio, head_mode=cfg.head_mode, tolerance=cfg.search_tolerance,
                         round_to=cfg.round_to)  # fmt: skip
        grid = space.grid(cfg.search_steps, cfg.search_candidates)  # fails here when no mix reaches the ratio
        log.info("mix search at %g: a grid of %d candidates of %s", ratio, len(grid), ", ".join(cfg.parts))
        out.append((ratio, space))
    return out


def search_mixes(cfg, model, mlps, scores, structure, heldout, searches, dense_speed) -> list[list[Candidate]]:
    """One leaderboard per ratio, best first: every candidate's held-out KL by masking the unpruned model (a
    --mix is a leaderboard of one), and its speed when asked."""
    masks = CandidateMasks(model, mlps if "mlp" in cfg.parts else None, search_layout(model, cfg.parts))

    def score(cands: list[Candidate]) -> list[float]:
        kept = [mix_kept(model, c.mix, scores, structure) for c in cands]
        return candidate_kl(model, masks, kept, heldout, cfg.batch_size, cfg.loss_chunk_tokens or None, cfg.progress)

    boards = []
    try:
        for ratio, space in searches:
            start = time.perf_counter()
            if isinstance(space, Candidate):
                boards.append(with_kl([space], score([space])))
                continue
            board = search(space, score, cfg.search_steps, cfg.search_candidates, cfg.search_refine)
            boards.append(board)
            mlp_only = next((f"KL {c.kl:.4f}" for c in board if c.mix.parts == ["mlp"]), "not a candidate")
            log.info("mix search at %g: %d candidates in %.1f s; best %s (KL %.4f), MLP-only %s", ratio, len(board),
                     time.perf_counter() - start, board[0].description, board[0].kl, mlp_only)  # fmt: skip
    finally:
        masks.close()
    if dense_speed is not None:
        for board in boards:
            for cand in board:
                pruned = sliced_copy(model, cand.mix, *mix_kept(model, cand.mix, scores, structure))
                cand.speed = speed_against(dense_speed, pruned)
                del pruned
    return boards


def rescore(cfg, model: nn.Module, board: list[Candidate], scores, structure, heldout: torch.Tensor,
            recon: Settings) -> list[Candidate]:  # fmt: skip
    """The leaderboard with its best `--reconstruct_rescore` candidates re-ranked by their held-out KL after
    reconstruction (each sliced from a copy and reconstructed in turn), ahead of the rest."""
    if len(board) < 2:  # a board of one (a fixed --mix): nothing to re-rank, and its refit would run twice
        return board
    top = board[: cfg.reconstruct_rescore]
    kls = []
    for cand in top:
        mlp_keep, kept = mix_kept(model, cand.mix, scores, structure)
        pruned = sliced_copy(model, cand.mix, mlp_keep, kept)
        reconstructed(model, pruned, mlp_keep, kept, recon)
        kls.append(models_kl(model, pruned, heldout, cfg.batch_size, cfg.loss_chunk_tokens or None, cfg.progress))
        del pruned
    rescored = sorted((replace(c, kl_reconstructed=k) for c, k in zip(top, kls)),
                      key=lambda c: (c.kl_reconstructed, c.params, c.description))  # fmt: skip
    log.info("reconstruct: the best %d candidates re-ranked by their KL after reconstruction: %s", len(top),
             ", ".join(f"{c.description} {c.kl:.4f} -> {c.kl_reconstructed:.4f}" for c in rescored))  # fmt: skip
    return rescored + board[len(top) :]


def prune_structures(cfg) -> list[Path]:
    """The structured run of a PruneConfig: every saved model's folder (the other ranks of a launch only help
    with the importance pass)."""
    outs = output_dirs(cfg)
    with begin_run(cfg, outs) as run:
        run_structures(cfg, run, outs)
    return outs


def run_structures(cfg, run: Run, outs: list[Path]) -> None:
    """Check on the weightless copy, draw the windows, load, score, then search or size, cut and save."""
    searches = check_before_loading(cfg, run.shapes())
    tokenizer = run.tokenizer()
    windows, heldout = calibration_windows(cfg, tokenizer)
    eval_docs = run.eval_documents()
    model = run.load_model()
    mlps = find_mlps(model)
    params_before = count_parameters(model)
    plans = size_plans(cfg, model)
    log.info("model: %s, %d layers x %d neurons (%s MLP), %.2fM parameters", type(model).__name__, len(mlps.layers),
             mlps.neurons, mlps.shape.name, params_before / 1e6)  # fmt: skip
    # the scoring windows: none for a data-free criterion (its cache key has none), the first --calib_samples
    scoring = None if cfg.data_free or windows is None else windows[: cfg.calib_samples]
    scores, structure, imp = run_scores(cfg, model, mlps, scoring, run.dtype, run.device, run.state)
    recon = Settings.of(cfg, windows)
    if not run.state.is_main_process:  # the other ranks only helped with the importance pass
        run.state.wait_for_everyone()
        return
    ppl_windows, ppl_before = perplexity_before(cfg, model, tokenizer, eval_docs)
    base_report = {**run.report(model), "mlp_shape": mlps.shape.name, "params_before": params_before,
                   "intermediate_size_before": mlps.neurons, "criterion": cfg.criterion,
                   **({"structure_criteria": cfg.criteria} if cfg.structure_criteria else {}), **imp}  # fmt: skip
    dense_speed = speed_of(model) if cfg.measure_speed else None
    if dense_speed is not None:
        base_report["dense_speed"] = dense_speed
    if searches:
        boards = search_mixes(cfg, model, mlps, scores, structure, heldout, searches, dense_speed)
        if recon.active and cfg.reconstruct_rescore:
            boards = [rescore(cfg, model, board, scores, structure, heldout, recon) for board in boards]
        for i, ((ratio, _), board, out) in enumerate(zip(searches, boards, outs)):
            chosen = board[0]
            search_report = {"target_ratio": ratio, "parts": cfg.parts, "heldout_windows": list(heldout.shape),
                             "chosen": chosen.description, "leaderboard": [c.as_dict() for c in board]}  # fmt: skip
            report = {**base_report, "search": search_report, "speed": chosen.speed}
            in_place = i == len(boards) - 1 or recon.active  # the last slices the model itself; a reconstruction copies
            target = model if in_place else copy.deepcopy(model)
            save_structures(cfg, target, tokenizer, find_mlps(target), chosen.mix, scores, structure, report, out,
                            ppl_windows, ppl_before, recon)  # fmt: skip
    elif cfg.structure_sizes.parts:
        mix = Mix(plans[0].k if plans else None, cfg.structure_sizes)
        report = {**base_report, "mlp_plan": plans[0].as_dict() if plans else None}  # the MLP's share alone
        save_structures(cfg, model, tokenizer, mlps, mix, scores, structure, report, outs[0], ppl_windows, ppl_before,
                        recon)  # fmt: skip
    else:
        save_mlp_sizes(cfg, model, tokenizer, mlps, plans, outs, scores, base_report, ppl_windows, ppl_before,
                       run.start, recon)  # fmt: skip
    run.state.wait_for_everyone()
