"""HFPrune: prune LLM structure (MLP neurons, heads, layers, hidden width, or a searched mix of them) or single
weights with the entropy-Taylor criterion (or a baseline) and save Hugging Face models that load anywhere.

    # the paper's setting (C4 calibration, 1024 windows of 1024 tokens, seed 42), 20% of all parameters
    python prune.py --origin_path meta-llama/Llama-2-7b-hf --pruning_ratio 0.2 --batch_size 8
    # the release's size semantics: keep int(2.8 * hidden_size) neurons per layer
    python prune.py --origin_path meta-llama/Meta-Llama-3-8B --mlp_ratio 2.8 --seed 42
    # several sizes from one importance pass, offline text, perplexity before/after
    python prune.py --origin_path models/SmolLM2-135M-Instruct --pruning_ratio 0.2,0.3 \\
        --calib_dataset builtin --calib_samples 32 --seq_len 256 --eval_text builtin:heldout
    # split the importance pass over 4 GPUs (scores all-reduced; rank 0 writes)
    accelerate launch --num_processes 4 prune.py --origin_path meta-llama/Llama-2-7b-hf --pruning_ratio 0.2
    # a recipe file, with flags after it overriding it
    python prune.py --config cfg/recipes/llama2_7b.yaml --pruning_ratio 0.3
    # other structures: 10% from the MLPs, one of three key/value groups, 4 whole layers
    python prune.py --origin_path models/SmolLM2-135M-Instruct --prune_parts mlp,heads,layers --pruning_ratio 0.1 \\
        --heads_keep 6 --layers_remove 4 --calib_dataset builtin --calib_samples 32 --seq_len 256
    # one size knob: the mix of neurons, heads, layers and hidden width that moves the predictions least
    python prune.py --origin_path models/SmolLM2-135M-Instruct --prune_parts auto --pruning_ratio 0.2 \\
        --calib_dataset builtin --calib_samples 32 --seq_len 256 --measure_speed
    # single weights instead of structures: 2:4 sparsity with SparseGPT's reconstruction
    python prune.py --origin_path models/SmolLM2-135M-Instruct --sparsity 0.5 --sparsity_type 2:4 \\
        --sparsity_method sparsegpt --calib_dataset builtin --calib_samples 32 --seq_len 256
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers.utils.logging import disable_progress_bar

from cfg.prune_config import PruneConfig
from dataset.calibration import draw_windows, heldout_windows, load_documents
from module import sparse_prune
from module.adapters import find_mlps
from module.criteria import DATA_FREE, score_neurons
from module.importance import ACTIVATION_CRITERIA, GRADIENT_CRITERIA, all_reduce_statistics, collect_statistics
from module.mix_search import (
    Candidate,
    CandidateMasks,
    Mix,
    MixSpace,
    candidate_kl,
    candidate_of,
    mix_kept,
    search,
    search_layout,
    sliced_copy,
    with_kl,
)
from module.pruning import count_parameters, plan_keep, prune_mlps, relative_keep, top_k_sorted
from module.structure_importance import StructureTaps
from module.structure_plan import all_reduce as all_reduce_structures
from module.structure_plan import apply, check_sizes, structure_scores
from module.structures import StructureError, layout_of, supports
from utils.cli import (
    check_context,
    load_config,
    load_model,
    load_tokenizer,
    meta_model,
    parse_config,
    process_state,
    resolve_device_dtype,
)
from utils.errors import UserError, run_cli
from utils.io import check_output_dir, digest, load_importance, model_fingerprint, save_importance
from utils.pruned_folder import perplexity_before, perplexity_text, save_pruned
from utils.report import (
    peak_memory_bytes,
    plot_layer_scores,
    plot_leaderboard,
    plot_structures,
    reset_peak_memory,
    setup_logging,
    versions,
)
from utils.speed import measure_speed, ratios

log = logging.getLogger("hfprune")
SCORES_VERSION = 1  # bump when the score computation changes, so old cache entries are not reused


def output_dirs(cfg: PruneConfig) -> list[Path]:
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
    if cfg.output_dir and len(tags) == 1:
        return [Path(cfg.output_dir)]
    parent = Path(cfg.output_dir) if cfg.output_dir else Path("out")
    return [parent / f"{name}-{t}" for t in tags]


def searching(cfg: PruneConfig) -> bool:
    """A mix search or --mix: candidates are scored on held-out windows."""
    return cfg.search or cfg.selected_mix is not None


def calibration_windows(cfg: PruneConfig, tokenizer) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The seeded calibration windows (None for criteria that need no data) and, for a mix search, the held-out
    windows drawn from other documents (drawn alike for every criterion, so their KLs compare)."""
    if cfg.criterion in DATA_FREE and not searching(cfg):
        return None, None
    docs = load_documents(cfg.calib_dataset, cfg.calib_text_field)
    windows, used = draw_windows(docs, tokenizer, cfg.calib_samples, cfg.seq_len, cfg.seed)
    log.info("calibration: %d windows x %d tokens from %s (%d documents)", *windows.shape, cfg.calib_dataset, len(docs))
    heldout = None
    if searching(cfg):
        heldout = heldout_windows(docs, tokenizer, used, cfg.search_windows, cfg.seq_len, cfg.seed)
        log.info("mix search: %d held-out windows x %d tokens from other documents", *heldout.shape)
    return (None if cfg.criterion in DATA_FREE else windows), heldout


def size_plans(cfg: PruneConfig, model) -> list:
    """One KeepPlan per requested MLP size (errors name the size that the model cannot reach)."""
    if not cfg.sizes:
        return []
    mlps = find_mlps(model)
    params = count_parameters(model)
    hidden = model.config.hidden_size
    return [plan_keep(params, mlps, hidden_size=hidden, round_to=cfg.round_to, **{k: v}) for k, v in cfg.sizes]


def check_before_loading(cfg: PruneConfig) -> list[tuple[float, MixSpace | Candidate]]:
    """Everything that the config alone decides, on a weightless copy of the model: the MLP shape, every
    size, the window lengths, and the search's candidates, so that a mistake is reported before minutes of
    weight loading. Resolves --prune_parts auto to the structures the family supports."""
    config = load_config(cfg.origin_path, "model --origin_path", cfg.trust_remote_code)
    shapes = meta_model(config, cfg.trust_remote_code)
    if cfg.criterion not in DATA_FREE or searching(cfg):
        check_context(shapes, cfg.seq_len, "--seq_len", cfg.allow_long_context)
    if cfg.eval_text:
        check_context(shapes, cfg.eval_seq_len, "--eval_seq_len", cfg.allow_long_context)
    size_plans(cfg, shapes)
    check_sizes(shapes, cfg.structure_sizes)
    if cfg.auto:
        cfg.parts = [p for p in cfg.parts if supports(shapes, p)]  # later steps see the resolved list
        if cfg.parts == ["mlp"] and cfg.selected_mix is None:
            raise StructureError(
                f"--prune_parts auto: {config.model_type} supports only mlp here; give --pruning_ratio without "
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


def importance(cfg, model, mlps, windows, dtype, device, state) -> tuple[list[torch.Tensor], dict, dict]:
    """Neuron scores per layer, other structures' scores by name, and the metadata; from the cache when every
    setting that changes them matches.

    Under `accelerate launch`, every rank draws the same windows, runs its share (every N-th window)
    and the per-unit sums are all-reduced before scoring, so every rank ranks the same scores.
    """
    structure_parts = [p for p in cfg.parts if p != "mlp"]
    key_fields = {
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
    if structure_parts:  # a run of --prune_parts mlp keeps its key (and its cache entries) unchanged
        key_fields["parts"] = sorted(cfg.parts)
    key = digest(key_fields)[:20]
    entry = Path(cfg.importance_cache) / f"{cfg.criterion}-{key}" if cfg.importance_cache else None
    if entry is not None and not cfg.recompute and (cached := load_importance(entry)) is not None:
        log.info("importance: reusing cached scores from %s", entry)
        return cached[0], cached[2], {**cached[1], "cache_hit": True, "cache_entry": str(entry)}
    reset_peak_memory(device)
    stats = None
    taps = None
    if windows is not None:
        shard = windows[state.process_index :: state.num_processes]
        if structure_parts:
            taps = StructureTaps(model, layout_of(model, structure_parts[0]), cfg.criterion in GRADIENT_CRITERIA,
                                 cfg.criterion in ACTIVATION_CRITERIA)  # fmt: skip
        stats = collect_statistics(
            model, mlps, shard, cfg.criterion, cfg.batch_size, cfg.loss_chunk_tokens or None,
            cfg.progress and state.is_main_process, cfg.activation_checkpointing, taps=(taps,) if taps else (),
        )  # fmt: skip
        all_reduce_statistics(stats)
        if taps is not None:
            all_reduce_structures(taps.stats)
    scores = score_neurons(cfg.criterion, mlps, stats, cfg.seed) if "mlp" in cfg.parts else []
    extra = structure_scores(model, structure_parts, cfg.criterion, taps.stats if taps else None, cfg.seed)
    meta = {
        "key": key,
        "key_fields": key_fields,
        "calib_tokens": stats.tokens if stats else 0,
        "calib_windows": stats.windows if stats else 0,
        "importance_seconds": stats.seconds if stats else 0.0,
        "tokens_per_second": stats.tokens / stats.seconds if stats and stats.seconds else None,
        "mean_window_loss": stats.loss_sum / stats.windows if stats and stats.windows and stats.loss_sum else None,
        "peak_memory_bytes": peak_memory_bytes(device),
        "batch_size": cfg.batch_size,
    }
    if meta["tokens_per_second"]:
        log.info(
            "importance: %d tokens in %.1f s (%.0f tokens/s)",
            meta["calib_tokens"],
            meta["importance_seconds"],
            meta["tokens_per_second"],
        )
    if entry is not None and state.is_main_process:
        save_importance(entry, scores, meta, extra)
        log.info("importance: cached in %s", entry)
    return scores, extra, {**meta, "cache_hit": False, "cache_entry": str(entry) if entry else None}


CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
               "num_hidden_layers")  # fmt: skip


def prune_structures(cfg, model, tokenizer, mlps, mix: Mix, scores, structure, base_report: dict, out: Path,
                     ppl_windows, ppl_before) -> None:  # fmt: skip
    """Several structures at one size: kept sets from the one pass's scores, sliced, saved with the report."""
    mlp_keep, kept = mix_kept(model, mix, scores, structure)
    config_before = {k: getattr(model.config, k, None) for k in CONFIG_KEYS}
    params_before = count_parameters(model)
    removed = apply(model, mlps if mlp_keep else None, mlp_keep, mix.sizes, kept)
    params_after = count_parameters(model)
    report = {
        **base_report,
        "parts": cfg.parts,
        "mix": mix.describe(),
        "structure_sizes": asdict(mix.sizes),
        "params_after": params_after,
        "achieved_ratio": 1 - params_after / params_before,
        "params_removed_per_structure": removed,
        "config_before": config_before,
        "config_after": {k: getattr(model.config, k, None) for k in CONFIG_KEYS},
        "kept": {k: v.tolist() for k, v in kept.items()},
        "kept_neurons_per_layer": [len(k) for k in mlp_keep] if mlp_keep else None,
    }
    add_speed(report, model)
    files = {"kept_structures.safetensors": {k: v.contiguous() for k, v in kept.items()}}
    if mlp_keep:
        files["kept_neurons.safetensors"] = {f"layer.{j}": k for j, k in enumerate(mlp_keep)}
    title = f"{Path(cfg.origin_path).name}: {cfg.criterion}, {mix.describe()}"
    part_of = lambda key: "heads" if key.startswith(("heads.", "groups.")) else key  # noqa: E731
    shown = {k: v for k, v in structure.items() if part_of(k) in mix.sizes.parts}  # only the pruned ones
    board = (base_report.get("search") or {}).get("leaderboard")

    def plots(tmp: Path) -> None:
        plot_structures(tmp / "prune_structures.png", shown, kept, scores, mlp_keep, title)
        if board and len(board) > 1:
            plot_leaderboard(tmp / "mix_search.png", board, title)

    save_pruned(cfg, out, model, tokenizer, report, "prune_report.json", ppl_windows, ppl_before, files, plots)
    line = (
        f"{out}: {params_before / 1e6:.2f}M -> {params_after / 1e6:.2f}M parameters (removed "
        f"{report['achieved_ratio']:.4f}: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in removed.items()) + ")"
    )
    if board:
        line += f", mix {mix.describe()} (held-out KL {board[0]['kl']:.4f}"
        line += f", best of {len(board)})" if len(board) > 1 else ")"
    print(line + perplexity_text(report) + speed_text(report), flush=True)


def add_speed(report: dict, model) -> None:
    """With --measure_speed: the pruned model's speed and its ratios to the dense model's (a search has
    measured it already)."""
    if report.get("dense_speed") is not None and report.get("speed") is None:
        report["speed"] = speed_against(report["dense_speed"], model)


def speed_text(report: dict) -> str:
    speed = report.get("speed")
    if not speed:
        return ""
    decode = ", ".join(f"batch {b} {v:.2f}x" for b, v in speed["decode_speedup"].items())
    return f"; prefill {speed['prefill_speedup']:.2f}x, decode {decode} vs dense"


def speed_against(dense_speed: dict, model) -> dict:
    """`model`'s speed and its ratios to the dense model's."""
    measured = speed_of(model)
    return {"pruned": measured, **ratios(dense_speed, measured)}


def speed_of(model) -> dict:
    """Prefill of one prompt of up to 1024 tokens, greedy decoding of 32 tokens at batch 1 and 8."""
    prompt = min(1024, getattr(model.config, "max_position_embeddings", None) or 1024)
    return measure_speed(model, prompt, 32, [1, 8])


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


def run(cfg: PruneConfig) -> list[Path]:
    if cfg.sparsity:
        return sparse_prune.run(cfg)
    start = time.perf_counter()
    log.info("config: %s", json.dumps(asdict(cfg), sort_keys=True))
    if not cfg.progress:
        disable_progress_bar()
    state = process_state(cfg.device)  # one process, or one rank of `accelerate launch` / torchrun
    distributed_auto = cfg.device == "auto" and state.num_processes > 1
    device, dtype = resolve_device_dtype(str(state.device) if distributed_auto else cfg.device, cfg.dtype)
    outs = output_dirs(cfg)
    origin = Path(cfg.origin_path).expanduser()
    protected = [origin] if origin.exists() else []
    for out in outs:
        check_output_dir(out, protected, cfg.overwrite)
    if cfg.device_map and state.num_processes > 1:
        raise UserError("--device_map shards one model over the GPUs of one process; do not combine it with "
                        "accelerate launch")  # fmt: skip
    searches = check_before_loading(cfg)
    tokenizer = load_tokenizer(cfg.origin_path, "model --origin_path", cfg.trust_remote_code)
    windows, heldout = calibration_windows(cfg, tokenizer)
    eval_docs = load_documents(cfg.eval_text, cfg.calib_text_field) if cfg.eval_text else None
    model = load_model(cfg.origin_path, device, dtype, cfg.trust_remote_code, cfg.device_map)
    mlps = find_mlps(model)
    neurons = mlps.neurons
    params_before = count_parameters(model)
    plans = size_plans(cfg, model)
    log.info(
        "model: %s, %d layers x %d neurons (%s MLP), %.2fM parameters",
        type(model).__name__,
        len(mlps.layers),
        neurons,
        mlps.shape.name,
        params_before / 1e6,
    )
    scores, structure, imp = importance(cfg, model, mlps, windows, dtype, device, state)
    if not state.is_main_process:  # the other ranks only helped with the importance pass
        state.wait_for_everyone()
        return outs
    ppl_windows, ppl_before = perplexity_before(cfg, model, tokenizer, eval_docs)
    base_report = {
        "settings": asdict(cfg),
        "versions": versions(),
        "model_class": type(model).__name__,
        "mlp_shape": mlps.shape.name,
        "device": str(device),
        "dtype": str(dtype),
        "params_before": params_before,
        "intermediate_size_before": neurons,
        "criterion": cfg.criterion,
        **imp,
    }
    dense_speed = speed_of(model) if cfg.measure_speed else None
    if dense_speed is not None:
        base_report["dense_speed"] = dense_speed
    if searches:
        boards = search_mixes(cfg, model, mlps, scores, structure, heldout, searches, dense_speed)
        for i, ((ratio, _), board, out) in enumerate(zip(searches, boards, outs)):
            chosen = board[0]
            search = {"target_ratio": ratio, "parts": cfg.parts, "heldout_windows": list(heldout.shape),
                      "chosen": chosen.description, "leaderboard": [c.as_dict() for c in board]}  # fmt: skip
            report = {**base_report, "search": search, "speed": chosen.speed}
            target = model if i == len(boards) - 1 else copy.deepcopy(model)  # the last one slices the model itself
            prune_structures(cfg, target, tokenizer, find_mlps(target), chosen.mix, scores, structure, report, out,
                             ppl_windows, ppl_before)  # fmt: skip
        state.wait_for_everyone()
        return outs
    if cfg.structure_sizes.parts:
        mix = Mix(plans[0].k if plans else None, cfg.structure_sizes)
        report = {**base_report, "mlp_plan": plans[0].as_dict() if plans else None}  # the MLP's share alone
        prune_structures(cfg, model, tokenizer, mlps, mix, scores, structure, report, outs[0], ppl_windows,
                         ppl_before)  # fmt: skip
        state.wait_for_everyone()
        return outs
    current = [torch.arange(neurons) for _ in scores]
    order = sorted(range(len(plans)), key=lambda i: -plans[i].k)  # larger models first: kept sets are nested
    for i in order:
        plan, out = plans[i], outs[i]
        keep = [top_k_sorted(s, plan.k) for s in scores]
        prune_mlps(mlps, model.config, [relative_keep(c, k) for c, k in zip(current, keep)])
        current = keep
        params_after = count_parameters(model)
        assert params_after == plan.params_after, (params_after, plan.params_after)
        report = {
            **base_report,
            **plan.as_dict(),
            "params_after": params_after,
            "intermediate_size": plan.k,
            "kept_per_layer": [len(k) for k in keep],
            "total_seconds": time.perf_counter() - start,
        }
        add_speed(report, model)
        title = f"{origin.name}: {cfg.criterion}, {plan.kind} {plan.requested:g}"
        save_pruned(cfg, out, model, tokenizer, report, "prune_report.json", ppl_windows, ppl_before,
                    {"kept_neurons.safetensors": {f"layer.{j}": k for j, k in enumerate(keep)}},
                    lambda tmp, keep=keep, title=title: plot_layer_scores(tmp / "prune_layers.png", scores, keep,
                                                                          title))  # fmt: skip
        line = (
            f"{out}: {params_before / 1e6:.2f}M -> {params_after / 1e6:.2f}M parameters "
            f"(removed {plan.achieved_ratio:.4f}; {plan.k}/{neurons} neurons per layer)"
        )
        print(line + perplexity_text(report) + speed_text(report), flush=True)
    state.wait_for_everyone()
    return outs


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    return run_cli(lambda: run(parse_config(PruneConfig, sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
