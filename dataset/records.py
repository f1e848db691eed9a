"""Reading local data files (text, .jsonl, .json, .parquet) with one-line errors that name the file and the spot.

Shared by the calibration text and the instruction data: a binary file, a line that is not JSON or a
file that is not Parquet ends with one `UserError` naming the file (and line), never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

from utils.errors import UserError, first_line


def read_text(path: Path, what: str) -> str:
    """The whole file as UTF-8 text, newlines normalised."""
    try:
        return path.read_text(encoding="utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as err:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {err.start}); give a text or JSON Lines file") from None


def _json_value(text: str, path: Path, what: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{what} {path}: {where} is not valid JSON ({err.msg}, column {err.colno})") from None


def read_records(path: Path, what: str) -> list:
    """The records (dicts or strings) of a .jsonl (one JSON value a line), .json (a list) or .parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        lines = read_text(path, what).split("\n")
        return [_json_value(line, path, what, f"line {n}") for n, line in enumerate(lines, 1) if line.strip()]
    if suffix == ".json":
        records = _json_value(read_text(path, what), path, what, "the file")
        if not isinstance(records, list):
            raise UserError(f"{what} {path} must hold a JSON list of records or strings")
        return records
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as err:
            raise UserError(f"{what} {path} is not a readable Parquet file ({first_line(err)})") from None
    raise UserError(f"{what} {path} has an unsupported type; valid: .jsonl, .json, .parquet")
