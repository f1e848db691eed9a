"""bench/studies/criteria.py (the reproduction study): its statistics by hand, and its plumbing on a tiny model."""

from __future__ import annotations

import json
import math

import pytest
from conftest import DATA

from bench.studies import criteria as study


def test_mean_std_and_paired_difference_by_hand():
    assert study.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert study.mean_std([5.0]) == (5.0, None)
    # d = [1, 2, 3]: mean 2, sample std 1, t = 2 / (1 / sqrt 3) = 3.464 < 4.30 (df 2): not significant
    d = study.paired_difference([2.0, 3.0, 4.0], [1.0, 1.0, 1.0])
    assert d["mean"] == pytest.approx(2.0) and d["std"] == pytest.approx(1.0)
    assert d["t"] == pytest.approx(2 * math.sqrt(3)) and not d["significant"] and d["same_sign"]
    # d = [10, 11, 11.5]: mean 10.8333, std 0.7638, t = 24.57 > 4.30: significant
    d = study.paired_difference([10.0, 11.0, 12.0], [0.0, 0.0, 0.5])
    assert d["std"] == pytest.approx(0.763763, rel=1e-5) and d["t"] == pytest.approx(24.567, rel=1e-4)
    assert d["significant"]
    d = study.paired_difference([1.0, -1.0], [0.0, 0.0])
    assert d["mean"] == 0.0 and not d["significant"] and not d["same_sign"]
    assert study.fmt([1.0, 2.0, 3.0], 1) == "2.0 ± 1.0" and study.fmt([1.5]) == "1.50"


def test_resumed_rows_reuse_their_settings_and_say_which_committed_rows_the_report_will_drop(tmp_path, caplog):
    """Rows reuses the committed rows of its own settings only, and warns when the committed report holds rows of
    other settings (the report it writes replaces them)."""
    from bench.common import EvaluatedStudyConfig, Rows

    cfg = EvaluatedStudyConfig(work_dir=str(tmp_path / "work"), resume=True)
    key = Rows(cfg).settings_key
    committed = tmp_path / "REPORT.json"
    committed.write_text(json.dumps({"rows": [{"settings": key, "name": "mine"}, {"settings": "x", "name": "a"},
                                              {"settings": "x", "name": "b"}]}))  # fmt: skip
    caplog.clear()
    rows = Rows(cfg, committed=committed)
    assert list(rows.done) == ["mine"] and [r["name"] for r in rows.every()] == ["mine"]
    assert "holds 2 rows measured with other settings" in caplog.text
    committed.write_text(json.dumps({"rows": [{"settings": key, "name": "mine"}]}))
    caplog.clear()
    Rows(cfg, committed=committed)
    assert "other settings" not in caplog.text


def test_study_runs_end_to_end_on_a_tiny_model_and_resumes(tiny_long_llama_dir, tmp_path, capsys):
    out, work = tmp_path / "docs" / "RESULTS.md", tmp_path / "work"
    argv = ["--model", str(tiny_long_llama_dir), "--data_dir", str(DATA), "--out", str(out), "--work_dir", str(work),
            "--seeds", "0,1", "--calib_samples", "3", "--seq_len", "32",
            "--tasks", "arc_easy_local,boolq_local,winogrande_local", "--limit", "2", "--eval_batch_size", "4",
            "--ppl_windows", "2", "--ppl_seq_len", "32",
            "--sft_steps", "2", "--sft_seq_len", "512", "--taylor_windows", "1", "--taylor_layers", "2",
            "--taylor_neurons", "3"]  # fmt: skip
    assert study.main(argv) == 0
    rows = json.loads(out.with_name("results.json").read_text())["rows"]
    # dense + 2 ratios x (entropy, ce: 2 seeds; wanda_sp, magnitude, random: 1) + 2 criteria x (lora, full)
    assert len(rows) == 1 + 2 * (2 + 2 + 2 + 1 + 1 + 1) + 4  # entropy, ce, entropy_wanda: 2 seeds each
    names = {r["name"] for r in rows}
    assert {"dense", "entropy-0.2-s1", "ce-0.3-s0", "wanda_sp-0.3-s0", "random-0.2-s0", "ce-0.2-s0+full"} <= names
    assert all(math.isfinite(r["ppl"]) and set(r["tasks"]) == {"arc_easy", "boolq", "winogrande"} for r in rows)
    dense = next(r for r in rows if r["name"] == "dense")
    pruned = [r for r in rows if r["stage"] == "pruned"]
    assert all(r["params"] < dense["params"] for r in pruned)
    assert {r["params"] for r in pruned if r["ratio"] == 0.2} == {r["params"] for r in rows if r["stage"] == "lora"}
    assert all(r["importance_seconds"] > 0 for r in pruned if r["criterion"] in ("entropy", "ce", "wanda_sp"))
    md = out.read_text()
    assert "| entropy 20% | 2 |" in md and "| magnitude 30% | 1 |" in md and "| ce 20% + lora | 1 |" in md
    # entropy vs ce and vs entropy_wanda at each ratio: perplexity, average, average without BoolQ
    assert md.count("the difference is **") == 12 and "| Avg ex. BoolQ ↑ |" in md
    assert "BoolQ: 50% of its first 2 items are answered 'yes'" in md  # labels of the first two: no, yes
    assert "| entropy ρ(score, abs ΔL) |" in md and out.with_name("results.png").stat().st_size > 10_000
    lines = len((work / next(p.name for p in work.iterdir()) / "rows.jsonl").read_text().splitlines())

    capsys.readouterr()
    assert study.main([*argv, "--resume"]) == 0  # everything reused: nothing measured again
    assert "ppl" not in capsys.readouterr().out
    rows_again = json.loads(out.with_name("results.json").read_text())["rows"]
    assert [(r["name"], r["ppl"]) for r in rows_again] == [(r["name"], r["ppl"]) for r in rows]
    assert len((work / next(p.name for p in work.iterdir()) / "rows.jsonl").read_text().splitlines()) == lines


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--criteria", "entropy,bogus"], "--criteria"),
        (["--ratios", "0.2,1.5"], "--ratios"),
        (["--ratios", "0.3", "--recovery_ratio", "0.2"], "--recovery_ratio"),
        (["--recovery_modes", "qlora"], "--recovery_modes"),
        (["--data_dir", "/nonexistent", "--model", "."], "/nonexistent"),
    ],
)
def test_bad_study_settings_fail_with_one_line(flags, message, tmp_path, capsys):
    assert study.main([*flags, "--out", str(tmp_path / "R.md"), "--work_dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "R.md").exists()
