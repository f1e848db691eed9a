"""Offline copies of lm_eval's zero-shot tasks, read from local files (see ../../docs/EVAL.md).

The data folder comes from `--metadata '{"data_dir": "..."}'` on the lm_eval command line or the
HFPRUNE_DATA environment variable; its layout is the one of the project's shared data folder
(arc/hf_format, piqa, boolq, winogrande, openbookqa, hellaswag). Prompts and metrics are the
harness's own (see each YAML); only the loading differs.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import datasets


def data_root(data_dir: str | None) -> Path:
    root = data_dir or os.environ.get("HFPRUNE_DATA")
    if not root:
        raise FileNotFoundError("no data folder: pass --metadata '{\"data_dir\": DIR}' or set HFPRUNE_DATA")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data folder {path} does not exist")
    return path


def _jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _labels(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()]


def _arc(name: str, data_dir: str | None) -> dict:
    rows = _jsonl(data_root(data_dir) / "arc" / "hf_format" / f"{name}-test.jsonl")
    return {"test": datasets.Dataset.from_list(rows)}


def arc_easy(data_dir: str | None = None, **_) -> dict:
    return _arc("ARC-Easy", data_dir)


def arc_challenge(data_dir: str | None = None, **_) -> dict:
    return _arc("ARC-Challenge", data_dir)


def piqa(data_dir: str | None = None, **_) -> dict:
    root = data_root(data_dir) / "piqa"
    rows = _jsonl(root / "valid.jsonl")
    for row, label in zip(rows, _labels(root / "valid-labels.lst"), strict=True):
        row["label"] = label
    return {"validation": datasets.Dataset.from_list(rows)}


def boolq(data_dir: str | None = None, **_) -> dict:
    rows = _jsonl(data_root(data_dir) / "boolq" / "val.jsonl")
    for row in rows:  # the SuperGLUE file stores "true"/"false" (or JSON booleans); the harness wants 1/0
        row["label"] = int(str(row["label"]).lower() == "true")
    return {"validation": datasets.Dataset.from_list(rows)}


def winogrande(data_dir: str | None = None, **_) -> dict:
    return {"validation": datasets.Dataset.from_list(_jsonl(data_root(data_dir) / "winogrande" / "dev.jsonl"))}


def openbookqa(data_dir: str | None = None, **_) -> dict:
    return {"test": datasets.Dataset.from_list(_jsonl(data_root(data_dir) / "openbookqa" / "test.jsonl"))}


def _hellaswag_clean(text: str) -> str:
    # WikiHow artefacts, treated as the harness treats them
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(data_dir: str | None = None, **_) -> dict:
    rows = []
    for doc in _jsonl(data_root(data_dir) / "hellaswag" / "hellaswag_val_subset1000_original_format.jsonl"):
        context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        rows.append({
            "query": _hellaswag_clean(doc["activity_label"] + ": " + context),
            "choices": [_hellaswag_clean(e) for e in doc["endings"]],
            "label": int(doc["label"]),
        })  # fmt: skip
    return {"validation": datasets.Dataset.from_list(rows)}


# WinoGrande is scored by partial evaluation: the two contexts differ (sentence up to "_" with
# each option), the continuation (the rest of the sentence) is shared.
def winogrande_context_index(doc: dict) -> int:
    return int(doc["answer"]) - 1


def winogrande_contexts(doc: dict) -> list[str]:
    cut = doc["sentence"].index("_")
    return [doc["sentence"][:cut] + option for option in (doc["option1"], doc["option2"])]


def winogrande_continuation(doc: dict) -> str:
    return doc["sentence"][doc["sentence"].index("_") + 1 :].strip()
