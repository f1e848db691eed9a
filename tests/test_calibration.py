"""Calibration sources and the seeded window draw."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import DATA

from dataset.calibration import CalibrationError, builtin_documents, load_documents, sample_windows

DOCS = [f"document {i} " + "word " * (5 * i) for i in range(40)]


def test_windows_are_deterministic_and_come_from_long_documents(tiny_tokenizer):
    a = sample_windows(DOCS, tiny_tokenizer, 10, 20, seed=3)
    b = sample_windows(DOCS, tiny_tokenizer, 10, 20, seed=3)
    c = sample_windows(DOCS, tiny_tokenizer, 10, 20, seed=4)
    assert a.shape == (10, 20) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    long_docs = [tiny_tokenizer(d)["input_ids"] for d in DOCS]
    for w in a.tolist():  # every window is a contiguous slice of one document longer than 20 tokens
        assert any(len(ids) > 20 and any(ids[s : s + 20] == w for s in range(len(ids) - 20)) for ids in long_docs)


def test_too_few_long_documents_is_an_error_that_counts_them(tiny_tokenizer):
    n_long = sum(len(tiny_tokenizer(d)["input_ids"]) > 60 for d in DOCS)
    with pytest.raises(CalibrationError, match=f"found only {n_long} documents longer than 60 tokens"):
        sample_windows(DOCS, tiny_tokenizer, 1000, 60, seed=0)


def test_builtin_splits_are_disjoint_and_nonempty():
    calib, held = builtin_documents(), builtin_documents(heldout=True)
    assert calib and held and not set(calib) & set(held)


def test_local_formats_give_the_same_documents(tmp_path):
    texts = ["first doc", "second doc\nwith two lines", "third"]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)))
    (tmp_path / "b.json").write_text(json.dumps([{"body": t} for t in texts]))
    (tmp_path / "c.txt").write_text("\n\n".join(texts) + "\n")
    pq.write_table(pa.table({"text": texts}), tmp_path / "d.parquet")
    assert load_documents(str(tmp_path / "a.jsonl")) == texts
    assert load_documents(str(tmp_path / "b.json"), "body") == texts
    assert load_documents(str(tmp_path / "c.txt")) == texts
    assert load_documents(str(tmp_path / "d.parquet")) == texts
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "x.jsonl").write_text((tmp_path / "a.jsonl").read_text())
    (folder / "y.txt").write_text("fourth")
    assert load_documents(str(folder)) == [*texts, "fourth"]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: p / "missing.jsonl", "does not exist"),
        (lambda p: (p / "x.csv").write_text("a,b") and p / "x.csv", "does not exist|unsupported"),
        (lambda p: (p / "w.jsonl").write_text('{"content": "x"}') and p / "w.jsonl", "no field 'text'"),
        (lambda p: (p / "e.jsonl").write_text('{"text": "  "}') and p / "e.jsonl", "holds no text"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "holds no"),
    ],
)
def test_bad_sources_fail_with_one_clear_message(tmp_path, setup, message):
    with pytest.raises(CalibrationError, match=message):
        load_documents(str(setup(tmp_path)))


def test_shared_c4_sample_loads_with_its_text_field():
    docs = load_documents(str(DATA / "c4" / "c4_validation_2k.jsonl"))
    assert len(docs) == 2000 and all(isinstance(d, str) for d in docs)
