"""What every pruning run shares, whatever it removes: the settings logged first, this process's place in a
launch, device and dtype, the output folders checked before anything loads, the model's shapes (a weightless
copy) for the checks that need no weights, the tokenizer, the evaluation text, the model and the report's
common fields. The structured (module/prune), weight-sparsity (module/sparse) and per-batch (module/dynamic)
pipelines each start with `begin_run`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.utils.logging import disable_progress_bar

from dataset.calibration import load_documents
from utils.cli import load_config, load_model, load_tokenizer, meta_model, process_state, resolve_device_dtype
from utils.errors import UserError
from utils.io import check_output_dir
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

    @property
    def origin(self) -> Path:
        return Path(self.cfg.origin_path).expanduser()

    def shapes(self) -> nn.Module:
        """The model with no memory behind its weights: every check that needs shapes but no weights."""
        config = load_config(self.cfg.origin_path, "model --origin_path", self.cfg.trust_remote_code)
        return meta_model(config, self.cfg.trust_remote_code)

    def tokenizer(self):
        return load_tokenizer(self.cfg.origin_path, "model --origin_path", self.cfg.trust_remote_code)

    def eval_documents(self) -> list[str] | None:
        """The --eval_text documents (None without --eval_text), read before the model loads."""
        return load_documents(self.cfg.eval_text, self.cfg.calib_text_field) if self.cfg.eval_text else None

    def load_model(self) -> nn.Module:
        return load_model(self.cfg.origin_path, self.device, self.dtype, self.cfg.trust_remote_code,
                          self.cfg.device_map)  # fmt: skip

    def report(self, model: nn.Module) -> dict:
        """The fields every run's report starts with."""
        return {"settings": asdict(self.cfg), "versions": versions(), "model_class": type(model).__name__,
                "device": str(self.device), "dtype": str(self.dtype)}  # fmt: skip

    def seconds(self) -> float:
        return time.perf_counter() - self.start


def begin_run(cfg, outputs: list[Path], single_process: str | None = None) -> Run:
    """Log the settings, place this process, check the outputs; `single_process`: the one line that refuses a
    launch of several processes (None: a launch splits the work)."""
    start = time.perf_counter()
    log.info("config: %s", json.dumps(asdict(cfg), sort_keys=True))
    if not cfg.progress:
        disable_progress_bar()
    state = process_state(cfg.device)  # one process, or one rank of `accelerate launch` / torchrun
    distributed_auto = cfg.device == "auto" and state.num_processes > 1
    device, dtype = resolve_device_dtype(str(state.device) if distributed_auto else cfg.device, cfg.dtype)
    origin = Path(cfg.origin_path).expanduser()
    for out in outputs:
        check_output_dir(out, [origin] if origin.exists() else [], cfg.overwrite)
    if single_process is not None and state.num_processes > 1:
        raise UserError(single_process)
    if cfg.device_map and state.num_processes > 1:
        raise UserError("--device_map shards one model over the GPUs of one process; do not combine it with "
                        "accelerate launch")  # fmt: skip
    return Run(cfg, state, device, dtype, start)
