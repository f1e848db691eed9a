"""What every pruning run shares, whatever it removes: the settings logged first, this process's place in a
launch, device and dtype, the output folders guarded before anything loads (utils/outputs.py: no output
touches an input, each can be created, and the run holds an exclusive claim on them while it runs), the
model's shapes (a weightless copy) for the checks that need no weights, the tokenizer, the evaluation text, the
model and the report's common fields. The structured (module/prune) and weight-sparsity (module/sparse)
pipelines each run inside `with begin_run(...) as run:`.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers.utils.logging import disable_progress_bar

from dataset.calibration import load_documents, sample_windows
from utils.cli import (
    check_context,
    check_weights,
    load_config,
    load_model,
    load_tokenizer,
    meta_model,
    process_state,
    resolve_device_dtype,
)
from utils.errors import UserError
from utils.outputs import check_cache, check_output, claim
from utils.report import versions

log = logging.getLogger("hfprune")


@dataclass
class Run:
    """One pruning run's settings (a PruneConfig), where it runs and when it started."""

    cfg: object
    state: object  # accelerate's PartialState: this process's rank among the launched ones
    device: torch.device
    dtype: torch.dtype
    start: float
    outputs: list[Path]
    claims: ExitStack = field(default_factory=ExitStack)

    def __enter__(self) -> Run:
        """Claim the outputs (the main process of a launch: the only one that writes) until the run ends."""
        if self.state.is_main_process:
            self.claims.enter_context(claim(self.outputs))
        return self

    def __exit__(self, *exc) -> None:
        self.claims.close()

    @property
    def origin(self) -> Path:
        return Path(self.cfg.origin_path).expanduser()

    def shapes(self) -> nn.Module:
        """The model with no memory behind its weights: every check that needs shapes but no weights."""
        what = "model --origin_path"
        shapes = meta_model(load_config(self.cfg.origin_path, what, self.cfg.trust_remote_code),
                            self.cfg.trust_remote_code, what)  # fmt: skip
        check_weights(self.cfg.origin_path, shapes, what)
        return shapes

    def tokenizer(self):
        return load_tokenizer(self.cfg.origin_path, "model --origin_path", self.cfg.trust_remote_code)

    def calibration(self, shapes: nn.Module, seq_len: int, needed: bool) -> tuple:
        """Before the model loads, for a run that draws windows without a held-out set (weight sparsity, dynamic):
        the window lengths checked on the weightless copy, the tokenizer, the seeded calibration windows (None
        when not `needed`) and the --eval_text documents."""
        cfg = self.cfg
        if needed:
            check_context(shapes, seq_len, "--seq_len", cfg.allow_long_context)
        if cfg.eval_text:
            check_context(shapes, cfg.eval_seq_len, "--eval_seq_len", cfg.allow_long_context)
        tokenizer = self.tokenizer()
        windows = None
        if needed:
            docs = load_documents(cfg.calib_dataset, cfg.calib_text_field)
            windows = sample_windows(docs, tokenizer, cfg.calib_samples, seq_len, cfg.seed)
            log.info("calibration: %d windows x %d tokens from %s", *windows.shape, cfg.calib_dataset)
        return tokenizer, windows, self.eval_documents()

    def eval_documents(self) -> list[str] | None:
        """The --eval_text documents (None without --eval_text), read before the model loads."""
        if not self.cfg.eval_text:
            return None
        return load_documents(self.cfg.eval_text, self.cfg.calib_text_field, "--eval_text")

    def load_model(self) -> nn.Module:
        return load_model(self.cfg.origin_path, self.device, self.dtype, self.cfg.trust_remote_code,
                          self.cfg.device_map)  # fmt: skip

    def report(self, model: nn.Module) -> dict:
        """The fields every run's report starts with."""
        return {"settings": asdict(self.cfg), "versions": versions(), "model_class": type(model).__name__,
                "device": str(self.device), "dtype": str(self.dtype)}  # fmt: skip

    def seconds(self) -> float:
        return time.perf_counter() - self.start


def run_inputs(cfg) -> dict[str, object]:
    """Every input path of a pruning run, by flag: no output may equal, contain or lie inside one of them."""
    inputs = {"--origin_path": cfg.origin_path, "--calib_dataset": cfg.calib_dataset, "--eval_text": cfg.eval_text}
    if not cfg.sparsity and cfg.importance_cache:
        inputs["--importance_cache"] = Path(cfg.importance_cache)  # created by the run if it is not there yet
    return inputs


def begin_run(cfg, outputs: list[Path], single_process: str | None = None) -> Run:
    """Log the settings, place this process, guard the outputs (claimed when the run is entered);
    `single_process`: the one line that refuses a launch of several processes (None: a launch splits the work)."""
    start = time.perf_counter()
    log.info("config: %s", json.dumps(asdict(cfg), sort_keys=True))
    if not cfg.progress:
        disable_progress_bar()
    state = process_state(cfg.device)  # one process, or one rank of `accelerate launch` / torchrun
    distributed_auto = cfg.device == "auto" and state.num_processes > 1
    device, dtype = resolve_device_dtype(str(state.device) if distributed_auto else cfg.device, cfg.dtype)
    inputs = run_inputs(cfg)
    for out in outputs:
        check_output(out, inputs, cfg.overwrite)
    if not cfg.sparsity:
        check_cache(cfg.importance_cache, "--importance_cache")
    if single_process is not None and state.num_processes > 1:
        raise UserError(single_process)
    if cfg.device_map and state.num_processes > 1:
        raise UserError("--device_map shards one model over the GPUs of one process; do not combine it with "
                        "accelerate launch")  # fmt: skip
    return Run(cfg, state, device, dtype, start, list(outputs))
