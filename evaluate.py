"""Evaluate a model folder, or a dynamic folder of `prune.py --dynamic probe` (the origin model with Probe Pruning
attached): WikiText-2 perplexity and lm_eval tasks through lm_eval's Python API with the model in memory, at a fixed
batch size (per-batch pruning depends on the batches, so `auto` is refused). script/eval.sh calls this for dynamic
folders; plain folders it evaluates with the lm_eval CLI.

    python evaluate.py --model out/SmolLM2-135M-Instruct-probe-probe-mlp-r0.2-s42 --ppl --tasks ''
    python evaluate.py --model out/SmolLM2-135M-Instruct-probe-probe-mlp-r0.2-s42 \\
        --tasks arc_easy_local,piqa_local --limit 200 --batch_size 8

Results: OUTPUT/results.json (default MODEL/lm_eval/results.json): the perplexity, each task's metrics, the settings
and the dynamic folder's config.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from module.dynamic.folder import is_dynamic, load_dynamic, origin_of
from utils.cli import load_model, load_tokenizer, parse_config, resolve_device_dtype
from utils.errors import run_cli
from utils.lm_eval_tasks import check as check_tasks
from utils.outputs import check_creatable
from utils.perplexity import SETS, local_rows, perplexity, text_windows
from utils.report import setup_logging, versions, write_json

ROOT = Path(__file__).resolve().parent


@dataclass
class EvaluateConfig:
    model: str = field(metadata={"help": "A model folder (or hub id), or a dynamic folder of prune.py --dynamic."})
    tasks: str = field(default="", metadata={"help": "Comma list of lm_eval tasks ('' = none); *_local tasks are "
                                                     "the offline twins in cfg/lm_eval_tasks."})  # fmt: skip
    data_dir: str = field(default="", metadata={"help": "Local data (WikiText-2, the *_local tasks); default "
                                                        "$HFPRUNE_DATA, else ../shared/data."})  # fmt: skip
    batch_size: int = field(default=8, metadata={"help": "Batch size of the tasks and the perplexity (fixed)."})
    limit: int = field(default=0, metadata={"help": "Only the first N items of each task (0 = all)."})
    ppl: bool = field(default=False, metadata={"help": "Also WikiText-2 perplexity (local copy in --data_dir)."})
    ppl_seq_len: int = field(default=1024, metadata={"help": "Tokens per perplexity window."})
    ppl_windows: int = field(default=0, metadata={"help": "Only the first N perplexity windows (0 = all)."})
    dtype: str = field(default="auto", metadata={"help": "auto, bfloat16, float16 or float32."})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto."})
    output: str = field(default="", metadata={"help": "Results folder (default MODEL/lm_eval)."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.limit < 0 or self.ppl_seq_len < 2 or self.ppl_windows < 0:
            raise ValueError("--batch_size and --ppl_seq_len must be >= 1 and 2, --limit and --ppl_windows >= 0")
        self.data_dir = self.data_dir or os.environ.get("HFPRUNE_DATA") or str(ROOT.parent / "shared" / "data")
        self.task_list = [t.strip() for t in self.tasks.split(",") if t.strip()]
        if not self.task_list and not self.ppl:
            raise ValueError("nothing to evaluate: give --tasks and/or --ppl")


def load(cfg: EvaluateConfig):
    """The model (dynamic: the origin with Probe Pruning attached), its tokenizer and the dynamic config (or None)."""
    device, dtype = resolve_device_dtype(cfg.device, cfg.dtype)
    if is_dynamic(cfg.model):
        model, state, config = load_dynamic(cfg.model, device, dtype)
        return model, load_tokenizer(origin_of(config), f"{cfg.model}: origin model"), config, state
    return load_model(cfg.model, device, dtype).eval(), load_tokenizer(cfg.model, "--model"), None, None


def evaluate(cfg: EvaluateConfig) -> dict:
    if cfg.task_list:
        check_tasks(cfg.task_list, cfg.data_dir)
    rows = local_rows("wikitext2", cfg.data_dir) if cfg.ppl else None  # a missing file fails before loading
    output = Path(cfg.output or Path(cfg.model) / "lm_eval")
    check_creatable(output, "--output")
    model, tokenizer, dynamic, state = load(cfg)
    result = {"model": cfg.model, "settings": asdict(cfg), "dynamic": dynamic, "versions": versions()}
    start = time.perf_counter()
    if rows is not None:
        windows = text_windows(tokenizer, rows, cfg.ppl_seq_len, SETS["wikitext2"].joiner)[: cfg.ppl_windows or None]
        result["perplexity"] = perplexity(model, windows, cfg.batch_size, cfg.progress)
        print(f"wikitext2 perplexity {result['perplexity']['perplexity']:.4f} ({len(windows)} x {cfg.ppl_seq_len})")
    if cfg.task_list:
        from lm_eval.evaluator import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        if state is not None:
            state.pad_id = 0  # lm_eval right-pads its batches with id 0 and passes no mask: those are the pads
        os.environ["HFPRUNE_DATA"] = str(Path(cfg.data_dir).resolve())  # read by cfg/lm_eval_tasks/local_data.py
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size, add_bos_token=True)
        out = simple_evaluate(model=lm, tasks=cfg.task_list, limit=cfg.limit or None, bootstrap_iters=0,
                              task_manager=TaskManager(include_path=str(ROOT / "cfg" / "lm_eval_tasks")))  # fmt: skip
        result["results"] = out["results"]
        for task, metrics in out["results"].items():
            shown = {k: v for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k}
            print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    result["seconds"] = time.perf_counter() - start
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / "results.json", result)
    return result


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    return run_cli(lambda: evaluate(parse_config(EvaluateConfig, sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
