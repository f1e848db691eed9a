"""How every pruning run (structured and sparse) ends: perplexity on the `--eval_text` windows before and
after, and the output folder written all at once (a failed run leaves nothing half-written; an old folder is
replaced only with --overwrite, in one rename once the new one is complete)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from utils.atomic import AppearedError, atomic_dir
from utils.outputs import OutputError
from utils.perplexity import perplexity, text_windows
from utils.report import write_json

log = logging.getLogger("hfprune")


def perplexity_before(cfg, model, tokenizer, eval_docs: list[str] | None) -> tuple[torch.Tensor | None, dict | None]:
    """The `--eval_text` windows (the first `--eval_windows`) and the model's perplexity on them; (None, None)
    without --eval_text."""
    if eval_docs is None:
        return None, None
    windows = text_windows(tokenizer, eval_docs, cfg.eval_seq_len)[: cfg.eval_windows or None]
    before = perplexity(model, windows, cfg.batch_size, cfg.progress)
    log.info("perplexity before: %.3f on %d windows of %s", before["perplexity"], len(windows), cfg.eval_text)
    return windows, before


def save_pruned(
    cfg,
    out: Path,
    model,
    tokenizer,
    report: dict,
    report_name: str,
    ppl_windows,
    ppl_before,
    files: dict[str, dict[str, torch.Tensor]],
    extra: Callable[[Path], None] | None = None,
) -> None:
    """Perplexity after (with --eval_text), then the model folder with `files` (safetensors), the report and
    whatever `extra` writes into the folder, atomically."""
    perplexity_after(cfg, model, report, ppl_windows, ppl_before)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, tensors in files.items():
            save_file(tensors, str(tmp / name))
        write_json(tmp / report_name, report)
        if extra is not None:
            extra(tmp)

    write_atomically(out, cfg.overwrite, fill)


def perplexity_after(cfg, model, report: dict, ppl_windows, ppl_before) -> None:
    """The perplexity before and after into `report` (nothing without --eval_text)."""
    if ppl_windows is not None:
        report["perplexity_before"] = ppl_before
        report["perplexity_after"] = perplexity(model, ppl_windows, cfg.batch_size, cfg.progress)


def write_atomically(out: Path, overwrite: bool, fill: Callable[[Path], None]) -> None:
    """The output folder as `fill` writes it into a staging folder, renamed into place once complete (an old
    folder replaced only with `overwrite`); one line if someone else created `out` meanwhile."""
    try:
        with atomic_dir(out, replace=overwrite) as tmp:
            fill(tmp)
    except AppearedError:
        raise OutputError(f"{out} appeared while this run was writing it (not by HFPrune, which holds a claim); "
                          "it was left as it is and this run's result was not saved") from None  # fmt: skip


def perplexity_text(report: dict) -> str:
    """', perplexity BEFORE -> AFTER' for the run's summary line ('' without --eval_text)."""
    if "perplexity_after" not in report:
        return ""
    before, after = report["perplexity_before"]["perplexity"], report["perplexity_after"]["perplexity"]
    return f", perplexity {before:.3f} -> {after:.3f}"
