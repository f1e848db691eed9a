"""Instruction data for recovery fine-tuning: load, map fields, tokenize with prompt masking, cache.

Sources (`--dataset_name`): `lamini` (MBZUAI/LaMini-instruction, the paper's), `alpaca`
(yahma/alpaca-cleaned), any other hub id, or a local .json/.jsonl/.parquet file, a folder of them,
or a `save_to_disk` folder. Records are LaMini-style (`instruction`, `response`) or Alpaca-style
(`instruction`, `input`, `output`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dataset.prompter import Prompter
from dataset.records import read_records
from utils.atomic import atomic_dir
from utils.errors import UserError, first_line
from utils.io import digest

log = logging.getLogger("hfprune")
HUB_ALIASES = {"lamini": "MBZUAI/LaMini-instruction", "alpaca": "yahma/alpaca-cleaned"}
SUFFIXES = (".json", ".jsonl", ".parquet")
IGNORE = -100


@dataclass(frozen=True)
class Example:
    instruction: str
    input: str
    response: str


def load_records(source: str) -> tuple[list[dict], str]:
    """The raw records and an identity of the source for cache keys."""
    path = Path(source).expanduser()
    saved = ("dataset_info.json", "state.json", "dataset_dict.json")
    if path.is_dir() and any((path / name).exists() for name in saved):
        import datasets

        ds = datasets.load_from_disk(str(path))
        ds = ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
        return ds.to_list(), f"disk:{path.resolve()}:{ds._fingerprint}"
    if path.is_dir() or path.is_file():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES) if path.is_dir() else [path]
        if not files:
            raise UserError(f"--dataset_name {source}: no {'/'.join(SUFFIXES)} files found")
        if path.is_file() and path.suffix not in SUFFIXES:
            raise UserError(f"--dataset_name {source}: unsupported file type; valid: {', '.join(SUFFIXES)}")
        ident = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        return [r for f in files for r in read_records(f, "--dataset_name file")], digest(ident)
    if source.startswith((".", "/", "~")):
        raise UserError(f"--dataset_name {source} does not exist")
    import datasets

    hub_id = HUB_ALIASES.get(source, source)
    try:
        ds = datasets.load_dataset(hub_id, split="train")
    except Exception as err:  # noqa: BLE001 - the hub raises many types; one line for the user
        raise UserError(
            f"cannot load --dataset_name {hub_id!r} ({first_line(err)}); offline, pass a local file"
        ) from None
    return ds.to_list(), f"hub:{hub_id}:{ds._fingerprint}"


def to_examples(records: list[dict]) -> list[Example]:
    """Map LaMini (instruction/response) or Alpaca (instruction/input/output) records; every record is checked
    (its number counts from 1) before anything is tokenized."""
    if not records:
        raise UserError("the instruction dataset is empty")
    examples = []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise UserError(f"record {i + 1} of the instruction dataset is a {type(r).__name__}, not a record")
        if "instruction" in r and "response" in r:
            keys = ("instruction", None, "response")
        elif "instruction" in r and "output" in r:
            keys = ("instruction", "input", "output")
        else:
            raise UserError(
                f"unknown dataset fields {sorted(r)} (record {i + 1}); expected instruction+response (LaMini) "
                "or instruction+input+output (Alpaca)"
            )
        values = [r.get(k) or "" if k == "input" else r[k] if k else "" for k in keys]
        wrong = next((k for k, v in zip(keys, values) if not isinstance(v, str)), None)
        if wrong is not None:
            raise UserError(f"record {i + 1} of the instruction dataset: its {wrong!r} is {type(r[wrong]).__name__}, "
                            "not text")  # fmt: skip
        examples.append(Example(*values))
    return examples


def tokenize_example(tokenizer, prompter: Prompter, ex: Example, max_len: int, train_on_inputs: bool) -> dict:
    """input_ids = prompt + response + EOS (truncated to max_len); labels mask the prompt with -100."""
    prompt = tokenizer(prompter.prompt(ex.instruction, ex.input), add_special_tokens=True)["input_ids"]
    answer = tokenizer(ex.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt + answer)[:max_len]
    labels = list(ids) if train_on_inputs else ([IGNORE] * len(prompt) + answer)[:max_len]
    return {"input_ids": ids, "labels": labels}


def tokenized_dataset(
    source: str, tokenizer, max_len: int, train_on_inputs: bool = False, cache_dir: str | None = None,
    max_samples: int | None = None, prompter: Prompter | None = None,
) -> list[dict]:  # fmt: skip
    """Tokenized examples, from a cache keyed by data, tokenizer, template, max length and masking."""
    prompter = prompter or Prompter()
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token; set one before fine-tuning")
    records, ident = load_records(source)
    key = digest({
        "data": ident, "max_samples": max_samples, "tokenizer": digest(tokenizer.backend_tokenizer.to_str())
        if getattr(tokenizer, "backend_tokenizer", None) else tokenizer.name_or_path, "eos": tokenizer.eos_token_id,
        "template": prompter.fingerprint, "max_len": max_len, "train_on_inputs": train_on_inputs, "v": 1,
    })[:20]  # fmt: skip
    entry = Path(cache_dir) / f"sft-{key}" if cache_dir else None
    if entry is not None and (entry / "tokens.safetensors").is_file():
        log.info("tokenized data: reusing cache %s", entry)
        return _unflatten(load_file(str(entry / "tokens.safetensors")))
    examples = to_examples(records)[:max_samples]
    rows = [tokenize_example(tokenizer, prompter, ex, max_len, train_on_inputs) for ex in examples]
    rows = [r for r in rows if any(label != IGNORE for label in r["labels"][1:])]  # keep rows with a target
    if not rows:
        raise UserError(
            f"the instruction dataset is empty after filtering: no response survives --tokenizer_max {max_len}"
        )
    log.info("tokenized data: %d of %d examples kept (max %d tokens)", len(rows), len(examples), max_len)
    if entry is not None:
        with atomic_dir(entry) as tmp:
            save_file(_flatten(rows), str(tmp / "tokens.safetensors"))
            (tmp / "meta.json").write_text(json.dumps({"source": source, "examples": len(rows), "max_len": max_len}))
    return rows


def _flatten(rows: list[dict]) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([len(r["input_ids"]) for r in rows], dtype=torch.int64)
    return {
        "input_ids": torch.tensor([t for r in rows for t in r["input_ids"]], dtype=torch.int32),
        "labels": torch.tensor([t for r in rows for t in r["labels"]], dtype=torch.int32),
        "lengths": lengths,
    }


def _unflatten(flat: dict[str, torch.Tensor]) -> list[dict]:
    ids, labels = flat["input_ids"].tolist(), flat["labels"].tolist()
    rows, start = [], 0
    for n in flat["lengths"].tolist():
        rows.append({"input_ids": ids[start : start + n], "labels": labels[start : start + n]})
        start += n
    return rows
