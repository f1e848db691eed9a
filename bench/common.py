"""What the studies share: the data folder, the default model, the zero-shot tasks, the evaluation every study
scores its models with (WikiText-2 perplexity on fixed windows, the offline zero-shot tasks on fixed items), the
resumable rows, and the statistics over seeds. The studies (bench/studies) import it; so do the speed benchmarks
where they need the data folder or the default model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import mean, stdev
from typing import ClassVar

from utils.io import digest
from utils.perplexity import local_rows, perplexity, text_windows
from utils.results_table import METRIC, base_task

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = os.environ.get("HFPRUNE_DATA", str(ROOT.parent / "shared" / "data"))  # the shared data folder
log = logging.getLogger("hfprune.study")
TASKS = "arc_challenge_local,arc_easy_local,boolq_local,hellaswag_local,openbookqa_local,piqa_local,winogrande_local"
T_CRIT_95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57}  # two-sided 95% Student t, by degrees of freedom


@dataclass
class ModelStudyConfig:
    """What every study of one model shares: the model, the data folder, the report, the perplexity windows."""

    model: str = field(default="", metadata={"help": "HF folder ('' = SmolLM2-135M-Instruct, built offline)."})
    data_dir: str = field(
        default=DATA_DIR,
        metadata={"help": "The shared data folder (c4/, wikitext-2-raw/, the task folders, instruct/)."},
    )
    out: str = field(default="docs/RESULTS.md", metadata={"help": "The report; its .png/.json go beside it."})
    ppl_windows: int = field(default=8, metadata={"help": "WikiText-2 test windows (the first N)."})
    ppl_seq_len: int = field(default=1024, metadata={"help": "Tokens per perplexity window."})


@dataclass
class EvaluatedStudyConfig(ModelStudyConfig):
    """What every study that scores models with `Evaluation` and keeps `Rows` shares."""

    work_dir: str = field(default="out/study", metadata={"help": "Rows measured so far, pruned and trained models."})
    resume: bool = field(default=False, metadata={"help": "Reuse the rows already measured with these settings."})
    tasks: str = field(default=TASKS, metadata={"help": "lm_eval tasks (cfg/lm_eval_tasks)."})
    limit: int = field(default=25, metadata={"help": "Items per zero-shot task (the first N of each)."})
    eval_batch_size: int = field(default=16, metadata={"help": "lm_eval batch size."})

    RUN_ONLY: ClassVar[tuple[str, ...]] = ("out", "work_dir", "resume")  # fields that change no measured row

    def settings(self) -> dict:
        """Everything that changes a measured row (the key of --resume)."""
        keep = {k: v for k, v in asdict(self).items() if k not in self.RUN_ONLY}
        return {**keep, "data_dir": str(Path(self.data_dir).resolve())}


def prune(argv: list[str]) -> list[Path]:
    """One pruning run from prune.py's flags, in this process (module.pipeline.prune_model): its saved folders."""
    from cfg.prune_config import PruneConfig
    from module.pipeline import prune_model
    from utils.cli import parse_config

    return prune_model(parse_config(PruneConfig, argv))


def model_or_default(path: str | None) -> str:
    """`path`, or the default model of every study: SmolLM2-135M-Instruct as an HF folder (built offline once)."""
    if path:
        return path
    from utils.smollm2 import cached_model

    return str(cached_model())


# ---- statistics over seeds: pure functions (tests/test_study.py checks them by hand) ----


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return mean(values), (stdev(values) if len(values) > 1 else None)


def paired_difference(a: list[float], b: list[float]) -> dict:
    """a - b seed by seed: mean, sample std, paired t and whether |t| passes the two-sided 95% threshold."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    m, s = mean_std(d)
    n = len(d)
    t = m / (s / math.sqrt(n)) if s else (math.inf if m else 0.0)
    return {"n": n, "mean": m, "std": s, "t": t, "significant": n > 1 and abs(t) > T_CRIT_95.get(n - 1, 1.96),
            "same_sign": all(x < 0 for x in d) or all(x > 0 for x in d)}  # fmt: skip


def fmt(values: list[float], digits: int = 2) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"


class Evaluation:
    """WikiText-2 perplexity and zero-shot accuracies of an in-memory model, on fixed items."""

    def __init__(self, cfg: EvaluatedStudyConfig, tokenizer, device: str):
        from lm_eval.tasks import TaskManager, get_task_dict

        self.cfg, self.tokenizer, self.device = cfg, tokenizer, device
        rows = local_rows("wikitext2", cfg.data_dir)
        self.windows = text_windows(tokenizer, rows, cfg.ppl_seq_len)[: cfg.ppl_windows]
        self.tasks = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
        os.environ["HFPRUNE_DATA"] = str(Path(cfg.data_dir).resolve())  # read by cfg/lm_eval_tasks/local_data.py
        self.task_dict = get_task_dict(self.tasks, TaskManager(include_path=str(ROOT / "cfg" / "lm_eval_tasks")))
        self.boolq_yes_share = None  # BoolQ's majority answer decides much of its score on few items
        if "boolq_local" in self.task_dict and cfg.limit > 0:
            task = self.task_dict["boolq_local"]
            labels = [task.doc_to_target(d) for d in list(task.eval_docs)[: cfg.limit]]
            self.boolq_yes_share = 100.0 * sum(labels) / len(labels)

    def __call__(self, model) -> dict:
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM

        start = time.perf_counter()
        model.eval()
        # --ppl_windows 0: zero-shot alone (the probe study's zero-shot rows keep no perplexity)
        ppl = perplexity(model, self.windows, batch_size=1, progress=False)["perplexity"] if len(self.windows) else None
        scores = {}
        if self.cfg.limit > 0:
            lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=self.cfg.eval_batch_size,
                      device=self.device, add_bos_token=True)  # fmt: skip
            out = evaluate(lm, self.task_dict, limit=self.cfg.limit, bootstrap_iters=0, log_samples=False,
                           verbosity="ERROR")  # fmt: skip
            for task in self.tasks:
                metric = METRIC[base_task(task)]
                scores[base_task(task)] = 100.0 * float(out["results"][task][f"{metric},none"])
        return {"ppl": ppl, "tasks": scores, "avg": mean(scores.values()) if scores else None,
                "eval_seconds": time.perf_counter() - start}  # fmt: skip


class Rows:
    """Measured rows, appended to WORK/rows.jsonl as they come; with --resume, matching rows are reused.

    `committed`: a report's JSON in the repository ({"rows": [...]}); with --resume its rows of the same
    settings are reused too, so a study outlives WORK (a fresh checkout has none: out/ is not in git).
    """

    def __init__(self, cfg: EvaluatedStudyConfig, committed: Path | None = None):
        self.settings_key = digest(cfg.settings())[:16]
        self.dir = Path(cfg.work_dir) / self.settings_key  # pruned and trained models of these settings
        self.path = self.dir / "rows.jsonl"
        self.done: dict[str, dict] = {}
        if cfg.resume:
            if committed is not None and committed.is_file():
                entries = json.loads(committed.read_text()).get("rows", [])
                for entry in entries:
                    if entry.get("settings") == self.settings_key:
                        self.done[entry["name"]] = entry
                if others := sum(entry.get("settings") != self.settings_key for entry in entries):
                    # the report this run writes holds these settings' rows only: say so before it replaces them
                    log.warning("%s holds %d rows measured with other settings than this run's (%s): the report "
                                "it writes will not keep them (git still has them)", committed, others,
                                self.settings_key)  # fmt: skip
            if self.path.is_file():
                for line in self.path.read_text().splitlines():
                    entry = json.loads(line)
                    self.done[entry["name"]] = entry
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self.reused = 0

    def every(self) -> list[dict]:
        """The rows asked for so far, then every other row of these settings measured earlier (for the JSON
        that --resume reads back: asking for fewer arms must not drop a measured one)."""
        asked = {r["name"] for r in self.rows}
        return self.rows + [r for name, r in self.done.items() if name not in asked]

    def get(self, name: str) -> dict | None:
        row = self.done.get(name)
        if row is not None:
            self.rows.append(row)
            self.reused += 1
            log.info("reused %s", name)
        return row

    def append(self, row: dict) -> None:
        """One line of rows.jsonl (on --resume a name's later line wins)."""
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def save(self, row: dict) -> dict:
        row = {"settings": self.settings_key, **row}
        self.append(row)
        self.rows.append(row)
        return row

    def update(self, name: str, **fields) -> dict:
        """A measured row with `fields` added."""
        row = {**(self.done.get(name) or next(r for r in self.rows if r["name"] == name)), **fields}
        self.append(row)
        self.done[name] = row
        self.rows = [row if r["name"] == name else r for r in self.rows]
        return row

    def add(self, row: dict) -> dict:
        """Save a model's row and print its line."""
        row = self.save(row)
        avg = f"{row['avg']:.2f}" if row.get("avg") is not None else "-"
        print(f"{row['name']}: ppl {row['ppl']:.3f}, zero-shot avg {avg}, params {row['params'] / 1e6:.2f}M "
              f"({row['eval_seconds']:.0f} s eval)", flush=True)  # fmt: skip
        return row


METRICS = {"ppl": ("perplexity", "lower"), "avg": ("zero-shot average", "higher"),
           "avg_ex_boolq": ("zero-shot average without BoolQ", "higher")}  # fmt: skip


def value(row: dict, metric: str) -> float:
    """A row's perplexity, zero-shot average, or zero-shot average over the tasks other than BoolQ."""
    if metric == "ppl":
        return row["ppl"]
    scores = [v for t, v in row["tasks"].items() if metric == "avg" or t != "boolq"]
    return mean(scores)


def metrics_of(dense: dict) -> list[str]:
    tasks = dense["tasks"]
    return ["ppl"] + (["avg"] if tasks else []) + (["avg_ex_boolq"] if "boolq" in tasks and len(tasks) > 1 else [])


def reference_main(config_cls, measure, argv: list[str] | None) -> int:
    """A published-code reference's main: parse its settings, measure, write the JSON `measure` returns to --out
    (a study's report renders it); bad input is one `error:` line."""
    import sys

    from utils.cli import parse_config
    from utils.errors import run_cli
    from utils.report import setup_logging

    setup_logging()

    def go() -> None:
        cfg = parse_config(config_cls, sys.argv[1:] if argv is None else argv)
        result = measure(cfg)
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")

    return run_cli(go)


def study_main(config_cls, measure, render, argv: list[str] | None) -> int:
    """A study's main: parse its settings, measure (resumable rows), then write the report and, beside it, the
    JSON of its rows and context; bad input is one `error:` line."""
    import sys

    from utils.cli import parse_config
    from utils.errors import run_cli
    from utils.report import setup_logging

    setup_logging()

    def go() -> None:
        cfg = parse_config(config_cls, sys.argv[1:] if argv is None else argv)
        rows, context = measure(cfg)
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"context": context, "rows": rows}, indent=1) + "\n")
        out.write_text(render(rows, context, cfg))
        print(f"wrote {out}")

    return run_cli(go)
