"""What the published-code references rely on: the checkpoint copy transformers 4.x reads, and the probe study's
comparison with the released Probe Pruning rows."""

from __future__ import annotations

import json
import os

from bench.studies import probe as study
from bench.studies.legacy_checkpoint import readable_copy


def test_readable_copy_rewrites_what_transformers_4_misreads_and_links_the_rest(tmp_path):
    source = tmp_path / "model"
    source.mkdir()
    config = {"model_type": "llama", "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}}
    tokenizer_config = {"tokenizer_class": "TokenizersBackend", "eos_token": "</s>"}
    tokenizer = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]}}
    for name, content in (("config.json", config), ("tokenizer_config.json", tokenizer_config),
                          ("tokenizer.json", tokenizer)):  # fmt: skip
        (source / name).write_text(json.dumps(content))
    (source / "model.safetensors").write_bytes(b"weights")
    before = {p.name: p.read_bytes() for p in source.iterdir()}

    into = readable_copy(str(source), str(tmp_path / "copy"))

    copy = tmp_path / "copy"
    assert into == str(copy)
    assert json.loads((copy / "config.json").read_text())["rope_theta"] == 100000.0
    assert json.loads((copy / "tokenizer_config.json").read_text()) == {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>"}  # fmt: skip
    assert json.loads((copy / "tokenizer.json").read_text())["model"]["merges"] == ["a b"]
    assert os.path.islink(copy / "model.safetensors") and (copy / "model.safetensors").read_bytes() == b"weights"
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before  # the input is never touched


def test_probe_report_sets_our_pp_beside_the_released_code(tmp_path):
    published = {"about": "by hand", "rows": [
        {"parts": "mlp", "ratio": 0.2, "batch": 20, "ppl": 50.0},
        {"parts": "mlp+heads", "ratio": 0.4, "batch": 20, "ppl": 100.0},
        {"parts": "mlp", "ratio": 0.4, "batch": 20, "ppl": 80.0},  # no row of ours: not shown
    ]}  # fmt: skip
    path = tmp_path / "probe_published.json"
    path.write_text(json.dumps(published))
    pp = study.ARMS[0]
    heads = next(a for a in study.ARMS if a.key == "pp_heads")
    ours = {study.row_name(pp, 0.2, 20, 0): {"ppl": 51.0}, study.row_name(heads, 0.4, 20, 0): {"ppl": 97.0}}
    cfg = study.ProbeStudyConfig(published=str(path))

    lines = study.against_published(ours, cfg)

    rows = [line for line in lines if line.startswith("| 0.")]
    assert rows == ["| 0.2 | mlp | 50.00 | 51.00 | +2.0% |", "| 0.4 | mlp+heads | 100.00 | 97.00 | -3.0% |"]
    assert "by hand" in lines
    assert study.against_published(ours, study.ProbeStudyConfig(published="")) == []
    random_windows = study.ProbeStudyConfig(published=str(path), eval_windows="random")
    assert study.against_published(ours, random_windows) == []  # the released code ran on the first windows


def test_probe_report_averages_seeds_and_shows_the_zero_shot_rows():
    pp, static = study.ARMS[0], next(a for a in study.ARMS if a.key == "static_ppsp")
    common = {"mlp_kept": 1216, "heads_kept": None, "probe_flops_share": 0.008}
    rows = [
        {"name": study.dense_name(20, 0), "ppl": 40.0, "seconds": 10.0},
        {"name": study.dense_name(20, 1), "ppl": 44.0, "seconds": 20.0},
        {"name": study.row_name(pp, 0.2, 20, 0), "ppl": 50.0, "seconds": 5.0, **common},
        {"name": study.row_name(pp, 0.2, 20, 1), "ppl": 54.0, "seconds": 30.0, **common},
        {"name": study.row_name(static, 0.2, 20, 0), "ppl": 55.0, "seconds": 10.0, **common},
        {"name": study.row_name(static, 0.2, 20, 1), "ppl": 56.7, "seconds": 20.0, **common},
        {"name": "zero-shot 200|dense|b20|s0", "arm": "dense", "ratio": 0.0, "seed": 0, "items": 200,
         "batch": 20, "tasks": {"arc_easy": 50.0, "piqa": 60.0}, "avg": 55.0},
        {"name": "zero-shot 200|dense|b20|s1", "arm": "dense", "ratio": 0.0, "seed": 1, "items": 200,
         "batch": 20, "tasks": {"arc_easy": 52.0, "piqa": 62.0}, "avg": 57.0},
        {"name": "zero-shot 25|dense|b20|s0", "arm": "dense", "ratio": 0.0, "seed": 0, "items": 25,
         "batch": 20, "tasks": {"arc_easy": 10.0, "piqa": 10.0}, "avg": 10.0},  # fewer items: not shown
    ]  # fmt: skip
    cfg = study.ProbeStudyConfig(seeds="0,1", ratios="0.2", batch_sizes="20", published="")

    lines = study.render(rows, {"model": "m"}, cfg).splitlines()

    # ppl 52 ± std(50, 54); time: the mean of 5/10 and 30/20; dense 42 ± std(40, 44); against PP seed by seed:
    # +10% and +5%, 7.5 ± 3.5
    assert "| 0.2 | PP (probe + history) | 1216 neurons | 52.00 ± 2.83 | 1.00x | 0.8% | 0.0 ± 0.0% |" in lines
    assert "| 0.2 | static PPsp (history only) | 1216 neurons | 55.85 ± 1.20 | 1.00x | 0.8% | 7.5 ± 3.5% |" in lines
    assert any("Dense: batch 20 **42.00 ± 2.83**" in line for line in lines)
    assert "| 0 | dense | 51.0 ± 1.4 | 61.0 ± 1.4 | 56.00 ± 1.41 |" in lines  # no BoolQ: no column without it
    assert any(line.startswith("## Zero-shot (200 items") for line in lines)


def test_probe_report_sets_prefill_times_against_dense_and_the_pruned_model():
    pp, sliced = (next(a for a in study.ARMS if a.key == k) for k in ("pp", "sliced_entropy"))
    timed = [("dense", 0.0, 2.0, 134.5e6), (pp.label, 0.2, 1.0, 134.5e6), (sliced.label, 0.2, 0.5, 120.0e6)]
    rows = [{"name": f"prefill x3|{label}|{ratio:g}|b20|s0", "arm": label, "ratio": ratio, "seed": 0, "batch": 20,
             "times": [seconds] * 3, "median_seconds": seconds, "params": params}
            for label, ratio, seconds, params in timed]  # fmt: skip

    lines = study.prefill_table(rows, study.ProbeStudyConfig(ratios="0.2"))

    assert "| 0 | dense | 134.5M | 2.00 | 1.00x | – |" in lines
    assert "| 0.2 | PP (probe + history) | 134.5M | 1.00 | 0.50x | 2.00x |" in lines
    assert "| 0.2 | static entropy, pruned model | 120.0M | 0.50 | 0.25x | 1.00x |" in lines
    assert study.prefill_table(rows, study.ProbeStudyConfig(seeds="1")) == []  # another seed's rows only
