"""The paper's lm_eval tasks, their offline twins, and a fast check of what script/eval.sh is given: task names,
data folders, and that a LoRA adapter fits its base model (before lm_eval loads anything).

python -m utils.lm_eval_tasks check --tasks arc_easy_local,piqa_local --data_dir ../shared/data
python -m utils.lm_eval_tasks check --tasks arc_easy --model out/pruned --adapter out/lora
python -m utils.lm_eval_tasks list
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from utils.errors import UserError, run_cli

LOCAL_TASK_DIR = Path(__file__).resolve().parent.parent / "cfg" / "lm_eval_tasks"
# the paper's ten zero-shot tasks, by the harness's names
PAPER_TASKS = ("arc_challenge", "arc_easy", "boolq", "crows_pairs_english", "openbookqa", "piqa", "race",
               "social_iqa", "truthfulqa_mc2", "winogrande")  # fmt: skip
# files each offline task reads, relative to the data folder
LOCAL_FILES = {
    "arc_easy_local": ["arc/hf_format/ARC-Easy-test.jsonl"],
    "arc_challenge_local": ["arc/hf_format/ARC-Challenge-test.jsonl"],
    "piqa_local": ["piqa/valid.jsonl", "piqa/valid-labels.lst"],
    "boolq_local": ["boolq/val.jsonl"],
    "winogrande_local": ["winogrande/dev.jsonl"],
    "openbookqa_local": ["openbookqa/test.jsonl"],
    "hellaswag_local": ["hellaswag/hellaswag_val_subset1000_original_format.jsonl"],
}
LOCAL_TASKS = tuple(LOCAL_FILES)


class TaskCheckError(UserError):
    pass


def harness_task_names(names: list[str]) -> set[str]:
    """Which of `names` the installed lm_eval defines as a task, group or tag (a text scan, ~1 s)."""
    import lm_eval

    wanted = {n for n in names if n}
    pattern = re.compile(
        r"^(?:task|group|tag):\s*[\"']?(" + "|".join(map(re.escape, wanted)) + r")[\"']?\s*$"
        r"|^\s*-\s*[\"']?(" + "|".join(map(re.escape, wanted)) + r")[\"']?\s*$",
        re.MULTILINE,
    )
    found: set[str] = set()
    for path in (Path(lm_eval.__file__).parent / "tasks").rglob("*.yaml"):
        for m in pattern.finditer(path.read_text(encoding="utf-8", errors="ignore")):
            found.add(m.group(1) or m.group(2))
        if found >= wanted:
            break
    return found


def check(tasks: list[str], data_dir: str | None) -> None:
    """Raise TaskCheckError naming the first unknown task or missing data file."""
    local = [t for t in tasks if t in LOCAL_FILES]
    other = [t for t in tasks if t not in LOCAL_FILES]
    if other:
        missing = sorted(set(other) - harness_task_names(other))
        if missing:
            raise TaskCheckError(
                f"unknown lm_eval task(s) {', '.join(missing)}; offline tasks: {', '.join(LOCAL_TASKS)}; "
                f"the paper's: {', '.join(PAPER_TASKS)}"
            )
    if local:
        if not data_dir or not Path(data_dir).is_dir():
            raise TaskCheckError(f"data folder {data_dir!r} for the offline tasks does not exist (--data_dir)")
        for task in local:
            for rel in LOCAL_FILES[task]:
                if not (Path(data_dir) / rel).is_file():
                    raise TaskCheckError(f"data folder {data_dir} lacks {rel} (needed by {task})")


def check_adapter(model: str, adapter: str) -> None:
    """Every LoRA matrix of `adapter` fits the module it adapts in `model` (its config alone, no weights): an
    adapter trained on another model (another width, a pruned or unpruned sibling) is one line here instead of a
    size-mismatch traceback inside lm_eval."""
    from safetensors import safe_open

    from utils.cli import load_config, meta_model

    files = sorted(Path(adapter).glob("adapter_model*.safetensors"))
    if not files:
        raise TaskCheckError(f"adapter {adapter} has no adapter_model.safetensors")
    base = meta_model(load_config(model, "model"), what=f"model {model}")
    modules = dict(base.named_modules())
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has keys(), no __iter__
                match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.\w+)?\.weight", key)
                if match is None:
                    continue
                module = modules.get(match[1])
                shape = f.get_slice(key).get_shape()
                if module is None or not hasattr(module, "in_features"):
                    raise TaskCheckError(f"adapter {adapter} adapts {match[1]}, which model {model} does not have; "
                                         "was it trained on another base model?")  # fmt: skip
                size, side = (shape[1], module.in_features) if match[2] == "A" else (shape[0], module.out_features)
                if size != side:
                    raise TaskCheckError(f"adapter {adapter} does not fit model {model}: {key} has shape {shape}, "
                                         f"but {match[1]} there is {module.in_features} -> {module.out_features}; "
                                         "give the model the adapter was trained on")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="check task names (and the data folder for offline tasks)")
    c.add_argument("--tasks", required=True, help="comma list")
    c.add_argument("--data_dir", default=None)
    c.add_argument("--model", default=None, help="with --adapter: the base model the adapter must fit")
    c.add_argument("--adapter", default=None, help="a peft LoRA folder")
    sub.add_parser("list", help="print the paper's tasks and the offline tasks")
    args = parser.parse_args(argv)
    if args.cmd == "list":
        print("paper:", ",".join(PAPER_TASKS))
        print("offline:", ",".join(LOCAL_TASKS))
        return 0

    def run_checks() -> None:
        check([t.strip() for t in args.tasks.split(",") if t.strip()], args.data_dir)
        if args.adapter:
            check_adapter(args.model, args.adapter)

    return run_cli(run_checks)


if __name__ == "__main__":
    sys.exit(main())
