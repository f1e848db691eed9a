"""`prune.py --sparsity S`: unstructured or N:M weight sparsity of every linear layer in the decoder layers
(the embeddings and the LM head stay dense, as in Wanda and SparseGPT), layer by layer.

The output is a plain Hugging Face folder whose removed weights are exact zeros (it loads anywhere; no
speed-up without sparse kernels), `sparsity_masks.safetensors` (the removed positions, bit-packed per row),
and `sparsity_report.json` (achieved sparsity per linear layer and in total).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from module.model.layout import StructureError, layout_of
from module.model.mlp import count_parameters, decoder_layers
from module.run import Run, begin_run
from module.sparse.layerwise import linears_of, run_layerwise
from module.sparse.masks import DualTaylor, Pattern, d2_value_scores, mask_from_scores, sparsegpt, wanda_scores
from module.sparse.weight_taylor import entropy_weight_scores
from utils.pruned_folder import perplexity_before, perplexity_text, save_pruned


def check_pattern(model: nn.Module, pattern: Pattern) -> None:
    """Every linear layer can take the pattern (a weightless model is enough)."""
    for i, layer in enumerate(decoder_layers(model)):
        for name, lin in linears_of(layer).items():
            pattern.check(lin.in_features, f"layers.{i}.{name}")


def prune_weights(model: nn.Module, windows: torch.Tensor | None, method: str, pattern: Pattern, batch_size: int = 1,
                  block: int = 128, damp: float = 0.01, store=None, progress: bool = True, update: str = "none",
                  chunk_tokens: int | None = None, d2: tuple = (1.0, 0.0, 1500.0),
                  entropy_form: str = "abs") -> dict:  # fmt: skip
    """Zero the weights `method` removes in every decoder layer's linears (SparseGPT, or `update` "sparsegpt"
    after another method's mask, also updates the rest; `d2`: D²Prune's r1, r2, s); the removed positions per
    linear, by name
    `layers.<i>.<name>`."""
    masks: dict[str, torch.Tensor] = {}
    entropy = (entropy_weight_scores(model, windows, batch_size, chunk_tokens, progress, entropy_form)
               if method == "entropy" else {})  # fmt: skip
    reconstruct = method in ("sparsegpt", "d2prune") or update == "sparsegpt"
    value = value_projection(model) if method == "d2prune" else None

    def prune_layer(index: int, linears: dict[str, nn.Linear], stats) -> None:
        for name, lin in linears.items():
            key = f"layers.{index}.{name}"
            w = lin.weight.data
            mask = None
            updated = not (method == "d2prune" and name == value)  # D²Prune prunes the value projection as is
            dual = dual_taylor(stats[name], *d2, updated) if method == "d2prune" else None
            if not updated:
                sq_mean = stats[name].sq / max(stats[name].windows, 1)
                mask = mask_from_scores(d2_value_scores(w, sq_mean, dual), pattern, "row")
                w.masked_fill_(mask, 0)
                masks[key] = mask.cpu()
                continue
            if method == "magnitude":
                mask = mask_from_scores(w.abs().float(), pattern, "layer")
            elif method == "wanda":
                mask = mask_from_scores(wanda_scores(w, stats[name].sq), pattern, "row")
            elif method == "entropy":
                mask = mask_from_scores(entropy.pop(key), pattern, "row")
            if reconstruct:
                hessian = stats[name].hessian("window" if method == "d2prune" else "token")
                new_w, mask = sparsegpt(w, hessian, pattern, block, damp, mask, dual)
                w.copy_(new_w.to(w.dtype))
            w.masked_fill_(mask, 0)
            masks[key] = mask.cpu()

    needs_data = method in ("wanda", "sparsegpt", "d2prune") or reconstruct
    run_layerwise(model, windows if needs_data else None, prune_layer, batch_size, hessian=reconstruct,
                  norms=method == "d2prune", store=store, progress=progress)  # fmt: skip
    return masks


def value_projection(model: nn.Module) -> str | None:
    """The value projection's name inside a decoder layer (D²Prune prunes it without an update), if known."""
    try:
        layout = layout_of(model, "heads")
    except StructureError:
        return None
    return f"{layout.attention}.{layout.value}"


def dual_taylor(stats, r1: float, r2: float, s: float, updated: bool) -> DualTaylor:
    """D²Prune's y and dx as its released code computes them for K windows: y = sum_w (w/K) ||y||_w / s; dx =
    sum_w (w/K) sqrt(2/w) ||x||_w / s in the layers it updates (it takes the norm of the input it scaled for
    the Hessian), sum_w (w/K) ||x||_w / s in the one it prunes without an update."""
    k = max(stats.windows, 1)
    dx = stats.in_norm_sqrt_w * math.sqrt(2) if updated else stats.in_norm_w
    return DualTaylor(stats.out_norm_w / k / s, dx / k / s, r1, r2)


def packed_masks(masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each mask's rows bit-packed (numpy.packbits, big-endian bit order) as uint8: 1/8 of a bool tensor."""
    return {k: torch.from_numpy(np.packbits(m.numpy(), axis=-1)) for k, m in masks.items()}


def sparsity_of(model: nn.Module, masks: dict[str, torch.Tensor] | None = None) -> dict:
    """Achieved sparsity (exact zeros in the weights) per pruned linear (those in `masks`; None: every decoder
    layer's linear), over them, and over all parameters."""
    per_linear = {}
    zeros = total = 0
    for i, layer in enumerate(decoder_layers(model)):
        for name, lin in linears_of(layer).items():
            key = f"layers.{i}.{name}"
            if masks is None or key in masks:
                z = int((lin.weight == 0).sum())
                per_linear[key] = z / lin.weight.numel()
                zeros, total = zeros + z, total + lin.weight.numel()
    return {"per_linear": per_linear, "pruned_linears": zeros / total if total else 0.0,
            "all_parameters": zeros / count_parameters(model), "pruned_weights": zeros}  # fmt: skip


def run_sparsity(cfg) -> list[Path]:
    """The weight-sparsity run of a PruneConfig with --sparsity: the saved folder."""
    name = Path(cfg.origin_path.rstrip("/")).name
    out = Path(cfg.output_dir or f"out/{name}-{cfg.sparsity_method}-{cfg.sparsity_type.replace(':', 'of')}"
               f"-sp{cfg.sparsity:g}-s{cfg.seed}")  # fmt: skip
    one_process = ("--sparsity runs in one process, layer by layer; for a model larger than one GPU use --device_map "
                   "auto (and --offload_inputs), not accelerate launch")  # fmt: skip
    with begin_run(cfg, [out], single_process=one_process) as run:
        sparsify(cfg, run, out)
    return [out]


def sparsify(cfg, run: Run, out: Path) -> None:
    """Check the pattern on the weightless copy, draw the windows, load, prune layer by layer, save."""
    pattern = Pattern.parse(cfg.sparsity_type, cfg.sparsity)
    shapes = run.shapes()
    check_pattern(shapes, pattern)
    seq_len = cfg.seq_len or min(getattr(shapes.config, "max_position_embeddings", 2048) or 2048, 2048)
    needs_data = cfg.sparsity_method != "magnitude" or cfg.sparsity_update != "none"
    tokenizer, windows, eval_docs = run.calibration(shapes, seq_len, needs_data)
    model = run.load_model()
    report = {**run.report(model), "seq_len": seq_len, "calib_windows": 0 if windows is None else len(windows)}
    ppl_windows, ppl_before = perplexity_before(cfg, model, tokenizer, eval_docs)
    pruning_start = time.perf_counter()
    store = "cpu" if cfg.offload_inputs else None
    masks = prune_weights(model, windows, cfg.sparsity_method, pattern, cfg.batch_size, cfg.sparsegpt_block,
                          cfg.sparsegpt_damp, store, cfg.progress, cfg.sparsity_update, cfg.loss_chunk_tokens or None,
                          (cfg.d2_r1, cfg.d2_r2, cfg.d2_s), cfg.entropy_form)  # fmt: skip
    report["pruning_seconds"] = time.perf_counter() - pruning_start
    report["sparsity"] = sparsity_of(model, masks)
    report["total_seconds"] = run.seconds()  # the perplexity after is not counted

    def write_masks(tmp: Path) -> None:
        save_file(packed_masks(masks), str(tmp / "sparsity_masks.safetensors"),
                  metadata={"packing": "numpy.packbits along each row, big-endian; True = removed"})  # fmt: skip

    save_pruned(cfg, out, model, tokenizer, report, "sparsity_report.json", ppl_windows, ppl_before, {}, write_masks)
    achieved = report["sparsity"]
    line = (f"{out}: {cfg.sparsity_method} {cfg.sparsity_type}: {achieved['pruned_linears']:.4f} of the decoder "
            f"linears' weights are zero ({achieved['all_parameters']:.4f} of all parameters)")  # fmt: skip
    print(line + perplexity_text(report), flush=True)
