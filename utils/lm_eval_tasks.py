"""The paper's lm_eval tasks, their offline twins, and a fast check of task names and data folders.

python -m utils.lm_eval_tasks check --tasks arc_easy_local,piqa_local --data_dir ../shared/data
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="check task names (and the data folder for offline tasks)")
    c.add_argument("--tasks", required=True, help="comma list")
    c.add_argument("--data_dir", default=None)
    sub.add_parser("list", help="print the paper's tasks and the offline tasks")
    args = parser.parse_args(argv)
    if args.cmd == "list":
        print("paper:", ",".join(PAPER_TASKS))
        print("offline:", ",".join(LOCAL_TASKS))
        return 0
    return run_cli(lambda: check([t.strip() for t in args.tasks.split(",") if t.strip()], args.data_dir))


if __name__ == "__main__":
    sys.exit(main())
