"""Calibration text: where documents come from and how windows are drawn from them.

Sources (`--calib_dataset`):
- `c4` (default, as the release and SDMPrune): allenai/c4, en, first training shard, from the hub;
- `builtin` / `builtin:heldout`: the standard library's `pydoc_data.topics` prose, always present
  offline (every 5th distinct text, in sorted order, is held out for evaluation);
- a local `.json` (list of records), `.jsonl`, `.parquet` or `.txt`/`.raw` (documents separated by
  blank lines) file, or a folder of such files;
- any other string is a hub dataset id (`datasets.load_dataset(id, split="train")`).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import torch

from dataset.records import read_records, read_text
from utils.errors import UserError, first_line

C4_HUB = ("allenai/c4", "en/c4-train.00000-of-01024.json.gz")
TEXT_SUFFIXES = (".txt", ".raw")  # .raw: WikiText's plain-text files
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", *TEXT_SUFFIXES)
BUILTIN_HELDOUT_EVERY = 5


class CalibrationError(UserError):
    """Calibration data that cannot give what was asked."""


def builtin_documents(heldout: bool = False) -> list[str]:
    """The standard library's documentation topics, split deterministically into calibration/held-out."""
    from pydoc_data.topics import topics

    texts = sorted(set(topics.values()))  # several topic names share one text: split texts, not names
    return [t for i, t in enumerate(texts) if (i % BUILTIN_HELDOUT_EVERY == 0) == heldout]


def _records_text(records: list, field: str, source: str, field_flag: str) -> list[str]:
    """The text of every record: all strings, or all records with a string in `field`; the first record that
    breaks the rule is named (its number counts from 1, as an editor's line numbers do for JSON Lines)."""
    if records and isinstance(records[0], str):
        bad = next((i for i, r in enumerate(records) if not isinstance(r, str)), None)
        if bad is not None:
            raise CalibrationError(f"{source}: record {bad + 1} is a {type(records[bad]).__name__} among plain "
                                   "strings; give one kind of record")  # fmt: skip
        return list(records)
    if records and not isinstance(records[0], dict):
        raise CalibrationError(f"{source} holds {type(records[0]).__name__} values, not records")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise CalibrationError(f"{source}: record {i + 1} is a {type(r).__name__}, not a record like the others")
        if field not in r:
            raise CalibrationError(f"{source}: record {i + 1} has no field {field!r} (fields: "
                                   f"{', '.join(map(str, r))}); set {field_flag}")  # fmt: skip
        if r[field] is not None and not isinstance(r[field], str):
            raise CalibrationError(f"{source}: record {i + 1}'s {field!r} is a {type(r[field]).__name__}, not text")
    return [r[field] for r in records]


def _read_file(path: Path, field: str, flag: str, field_flag: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:  # documents are separated by blank (or whitespace-only) lines
        text = read_text(path, f"{flag} file")
        return [d.strip() for d in re.split(r"\n[ \t]*\n", text) if d.strip()]
    if suffix not in LOCAL_SUFFIXES:
        raise CalibrationError(f"{flag} file {path} has an unsupported type; valid: {', '.join(LOCAL_SUFFIXES)}")
    return _records_text(read_records(path, f"{flag} file"), field, f"{flag} file {path}", field_flag)


def _load_hub(dataset_id: str, field: str, flag: str, data_files: str | None = None) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, data_files=data_files, split="train")
    except Exception as err:  # noqa: BLE001 - the hub raises many types; the user needs one line either way
        raise CalibrationError(
            f"cannot load {flag} {dataset_id!r} from the hub ({first_line(err)}); offline, pass a local file/folder"
            + (" or --calib_dataset builtin" if flag == "--calib_dataset" else "")
        ) from None
    if field not in ds.column_names:
        raise CalibrationError(f"{flag} {dataset_id!r} has no field {field!r} (fields: {', '.join(ds.column_names)})")
    return ds[field]


def load_documents(source: str, text_field: str = "text", flag: str = "--calib_dataset",
                   field_flag: str = "--calib_text_field") -> list[str]:  # fmt: skip
    """Documents of a text source (see the module docstring), every record checked; errors name `flag` (the
    option that gave `source`) and `field_flag` (the one that names the text field)."""
    if source in ("builtin", "builtin:heldout"):
        return builtin_documents(heldout=source.endswith("heldout"))
    if source == "c4":
        return _load_hub(C4_HUB[0], text_field, flag, data_files=C4_HUB[1])
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in LOCAL_SUFFIXES and p.is_file())
        if not files:
            raise CalibrationError(f"{flag} folder {path} holds no {'/'.join(LOCAL_SUFFIXES)} files")
        docs = [d for f in files for d in _read_file(f, text_field, flag, field_flag)]
    elif path.is_file():
        docs = _read_file(path, text_field, flag, field_flag)
    elif source.startswith((".", "/", "~")) or path.suffix.lower() in LOCAL_SUFFIXES:
        raise CalibrationError(f"{flag} file {source} does not exist")
    else:
        docs = _load_hub(source, text_field, flag)
    docs = [d for d in docs if isinstance(d, str) and d.strip()]
    if not docs:
        raise CalibrationError(f"{flag} {source} holds no text in field {text_field!r}")
    return docs


def sample_windows(documents: list[str], tokenizer, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`n_samples` windows of `seq_len` tokens, at most one per document, deterministic in `seed` (see draw_windows)."""
    return draw_windows(documents, tokenizer, n_samples, seq_len, seed)[0]


def heldout_windows(documents: list[str], tokenizer, used: set[int], n_samples: int, seq_len: int, seed: int,
                    what: str = "--search_windows") -> torch.Tensor:  # fmt: skip
    """Windows drawn as `draw_windows` does from the documents NOT in `used` (the calibration windows' own)."""
    rest = [d for i, d in enumerate(documents) if i not in used]
    try:
        return draw_windows(rest, tokenizer, n_samples, seq_len, seed)[0]
    except CalibrationError:
        raise CalibrationError(
            f"{what} {n_samples}: too few documents longer than {seq_len} tokens remain beside the "
            f"{len(used)} calibration windows' ({len(rest)} left); lower it, --calib_samples or --seq_len"
        ) from None


def draw_windows(
    documents: list[str], tokenizer, n_samples: int, seq_len: int, seed: int
) -> tuple[torch.Tensor, set[int]]:
    """`n_samples` windows of `seq_len` tokens, at most one per document, deterministic in `seed`, and the
    indices of the documents they came from.

    As in the release: documents are visited in a shuffled order, a document must be longer than
    `seq_len` tokens, and the window starts at a random offset in it. Unlike the release, the draw is
    fully seeded, stops once enough windows are found, and fails loudly when there are too few.
    """
    if n_samples < 1 or seq_len < 2:
        raise CalibrationError(f"need --calib_samples >= 1 and --seq_len >= 2 (got {n_samples}, {seq_len})")
    rng = random.Random(seed)
    order = list(range(len(documents)))
    rng.shuffle(order)
    windows: list[list[int]] = []
    used: set[int] = set()
    step = 64
    for s in range(0, len(order), step):
        batch = order[s : s + step]
        for doc, ids in zip(batch, tokenizer([documents[i] for i in batch], add_special_tokens=True)["input_ids"]):
            if len(ids) > seq_len:
                start = rng.randint(0, len(ids) - seq_len - 1)
                windows.append(ids[start : start + seq_len])
                used.add(doc)
                if len(windows) == n_samples:
                    return torch.tensor(windows, dtype=torch.long), used
    raise CalibrationError(
        f"found only {len(windows)} documents longer than {seq_len} tokens among {len(documents)} "
        f"(asked for --calib_samples {n_samples}); lower --calib_samples or --seq_len, or give more text"
    )
