"""HFPrune: prune LLM structure (MLP neurons, heads, layers, hidden width) with the entropy-Taylor criterion (or a
baseline) and save Hugging Face models that load anywhere.

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
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors.torch import save_file
from transformers.utils.logging import disable_progress_bar

from cfg.prune_config import PruneConfig
from dataset.calibration import load_documents, sample_windows
from module.adapters import find_mlps
from module.criteria import DATA_FREE, score_neurons
from module.importance import ACTIVATION_CRITERIA, GRADIENT_CRITERIA, all_reduce_statistics, collect_statistics
from module.pruning import count_parameters, plan_keep, prune_mlps, relative_keep, top_k_sorted
from module.structure_importance import StructureTaps
from module.structure_plan import all_reduce as all_reduce_structures
from module.structure_plan import apply, check_sizes, kept_sets, structure_scores
from module.structures import layout_of
from utils.atomic import atomic_dir
from utils.cli import (
    check_context,
    load_config,
    load_model,
    load_tokenizer,
    meta_model,
    parse_config,
    resolve_device_dtype,
)
from utils.errors import UserError, run_cli
from utils.io import check_output_dir, digest, load_importance, model_fingerprint, save_importance
from utils.perplexity import perplexity, text_windows
from utils.report import (
    peak_memory_bytes,
    plot_layer_scores,
    plot_structures,
    reset_peak_memory,
    setup_logging,
    versions,
    write_json,
)

log = logging.getLogger("hfprune")
SCORES_VERSION = 1  # bump when the score computation changes, so old cache entries are not reused


def output_dirs(cfg: PruneConfig) -> list[Path]:
    name = Path(cfg.origin_path.rstrip("/")).name
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


def calibration_windows(cfg: PruneConfig, tokenizer) -> torch.Tensor | None:
    """The seeded calibration windows (None for criteria that need no data)."""
    if cfg.criterion in DATA_FREE:
        return None
    docs = load_documents(cfg.calib_dataset, cfg.calib_text_field)
    windows = sample_windows(docs, tokenizer, cfg.calib_samples, cfg.seq_len, cfg.seed)
    log.info("calibration: %d windows x %d tokens from %s (%d documents)", *windows.shape, cfg.calib_dataset, len(docs))
    return windows


def size_plans(cfg: PruneConfig, model) -> list:
    """One KeepPlan per requested MLP size (errors name the size that the model cannot reach)."""
    if not cfg.sizes:
        return []
    mlps = find_mlps(model)
    params = count_parameters(model)
    hidden = model.config.hidden_size
    return [plan_keep(params, mlps, hidden_size=hidden, round_to=cfg.round_to, **{k: v}) for k, v in cfg.sizes]


def check_before_loading(cfg: PruneConfig) -> None:
    """Everything that the config alone decides, on a weightless copy of the model: the MLP shape, every
    size, and the window lengths, so that a mistake is reported before minutes of weight loading."""
    config = load_config(cfg.origin_path, "model --origin_path", cfg.trust_remote_code)
    shapes = meta_model(config, cfg.trust_remote_code)
    if cfg.criterion not in DATA_FREE:
        check_context(shapes, cfg.seq_len, "--seq_len", cfg.allow_long_context)
    if cfg.eval_text:
        check_context(shapes, cfg.eval_seq_len, "--eval_seq_len", cfg.allow_long_context)
    size_plans(cfg, shapes)
    check_sizes(shapes, cfg.structure_sizes)


def importance(cfg, model, mlps, windows, dtype, device, state) -> tuple[list[torch.Tensor], dict, dict]:
    """Neuron scores per layer, other structures' scores by name, and the metadata; from the cache when every
    setting that changes them matches.

    Under `accelerate launch`, every rank draws the same windows, runs its share (every N-th window)
    and the per-unit sums are all-reduced before scoring, so every rank ranks the same scores.
    """
    sizes = cfg.structure_sizes
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
    if sizes.parts:  # a run of --prune_parts mlp keeps its key (and its cache entries) unchanged
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
        if sizes.parts:
            taps = StructureTaps(model, layout_of(model, sizes.parts[0]), cfg.criterion in GRADIENT_CRITERIA,
                                 cfg.criterion in ACTIVATION_CRITERIA)  # fmt: skip
        stats = collect_statistics(
            model, mlps, shard, cfg.criterion, cfg.batch_size, cfg.loss_chunk_tokens or None,
            cfg.progress and state.is_main_process, cfg.activation_checkpointing, taps=(taps,) if taps else (),
        )  # fmt: skip
        all_reduce_statistics(stats)
        if taps is not None:
            all_reduce_structures(taps.stats)
    scores = score_neurons(cfg.criterion, mlps, stats, cfg.seed) if "mlp" in cfg.parts else []
    extra = structure_scores(model, sizes, cfg.criterion, taps.stats if taps else None, cfg.seed)
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


def save_pruned(cfg, out: Path, model, tokenizer, report: dict, ppl_windows, ppl_before, files: dict, plot) -> None:
    """Perplexity after (when asked), then the model folder with the kept indices, report and plot, atomically."""
    if ppl_windows is not None:
        report["perplexity_before"] = ppl_before
        report["perplexity_after"] = perplexity(model, ppl_windows, cfg.batch_size, cfg.progress)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, tensors in files.items():
            save_file(tensors, str(tmp / name))
        write_json(tmp / "prune_report.json", report)
        plot(tmp)


CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
               "num_hidden_layers")  # fmt: skip


def prune_structures(cfg, model, tokenizer, mlps, plans, scores, structure, base_report, out, ppl_windows,
                     ppl_before) -> None:  # fmt: skip
    """Several structures at one size: kept sets from the one pass's scores, sliced, saved with the report."""
    sizes = cfg.structure_sizes
    kept = kept_sets(model, sizes, structure)
    mlp_keep = [top_k_sorted(s, plans[0].k) for s in scores] if plans else None
    config_before = {k: getattr(model.config, k, None) for k in CONFIG_KEYS}
    params_before = count_parameters(model)
    removed = apply(model, mlps if plans else None, mlp_keep, sizes, kept)
    params_after = count_parameters(model)
    report = {
        **base_report,
        "mlp_plan": plans[0].as_dict() if plans else None,  # the MLP's share alone; the totals follow
        "parts": cfg.parts,
        "structure_sizes": asdict(sizes),
        "params_after": params_after,
        "achieved_ratio": 1 - params_after / params_before,
        "params_removed_per_structure": removed,
        "config_before": config_before,
        "config_after": {k: getattr(model.config, k, None) for k in CONFIG_KEYS},
        "kept": {k: v.tolist() for k, v in kept.items()},
        "kept_neurons_per_layer": [len(k) for k in mlp_keep] if mlp_keep else None,
    }
    files = {"kept_structures.safetensors": {k: v.contiguous() for k, v in kept.items()}}
    if mlp_keep:
        files["kept_neurons.safetensors"] = {f"layer.{j}": k for j, k in enumerate(mlp_keep)}
    title = f"{Path(cfg.origin_path).name}: {cfg.criterion}, {', '.join(cfg.parts)}"
    save_pruned(
        cfg,
        out,
        model,
        tokenizer,
        report,
        ppl_windows,
        ppl_before,
        files,
        lambda tmp: plot_structures(tmp / "prune_structures.png", structure, kept, scores, mlp_keep, title),
    )
    line = (
        f"{out}: {params_before / 1e6:.2f}M -> {params_after / 1e6:.2f}M parameters (removed "
        f"{report['achieved_ratio']:.4f}: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in removed.items()) + ")"
    )
    if ppl_windows is not None:
        line += f", perplexity {ppl_before['perplexity']:.3f} -> {report['perplexity_after']['perplexity']:.3f}"
    print(line, flush=True)


def run(cfg: PruneConfig) -> list[Path]:
    start = time.perf_counter()
    log.info("config: %s", json.dumps(asdict(cfg), sort_keys=True))
    if not cfg.progress:
        disable_progress_bar()
    state = PartialState()  # one process, or one rank of `accelerate launch`
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
    check_before_loading(cfg)
    tokenizer = load_tokenizer(cfg.origin_path, "model --origin_path", cfg.trust_remote_code)
    windows = calibration_windows(cfg, tokenizer)
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
    ppl_windows = None
    ppl_before = None
    if eval_docs is not None:
        ppl_windows = text_windows(tokenizer, eval_docs, cfg.eval_seq_len)
        ppl_windows = ppl_windows[: cfg.eval_windows or None]
        ppl_before = perplexity(model, ppl_windows, cfg.batch_size, cfg.progress)
        log.info(
            "perplexity before: %.3f on %d windows of %s", ppl_before["perplexity"], len(ppl_windows), cfg.eval_text
        )
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
    if cfg.structure_sizes.parts:
        prune_structures(cfg, model, tokenizer, mlps, plans, scores, structure, base_report, outs[0], ppl_windows,
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
        title = f"{origin.name}: {cfg.criterion}, {plan.kind} {plan.requested:g}"
        save_pruned(cfg, out, model, tokenizer, report, ppl_windows, ppl_before,
                    {"kept_neurons.safetensors": {f"layer.{j}": k for j, k in enumerate(keep)}},
                    lambda tmp, keep=keep, title=title: plot_layer_scores(tmp / "prune_layers.png", scores, keep,
                                                                          title))  # fmt: skip
        line = (
            f"{out}: {params_before / 1e6:.2f}M -> {params_after / 1e6:.2f}M parameters "
            f"(removed {plan.achieved_ratio:.4f}; {plan.k}/{neurons} neurons per layer)"
        )
        if ppl_windows is not None:
            line += f", perplexity {ppl_before['perplexity']:.3f} -> {report['perplexity_after']['perplexity']:.3f}"
        print(line, flush=True)
    state.wait_for_everyone()
    return outs


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    return run_cli(lambda: run(parse_config(PruneConfig, sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
