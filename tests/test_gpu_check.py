"""script/gpu_check.sh --tiny runs every section on CPU (so the GPU check cannot rot while no GPU is lent),
and a failed check is an exit status that names its section."""

import json
import subprocess

import pytest
from conftest import DATA, ROOT

from bench.speed import gpu_check


def test_tiny_check_fills_every_section_of_both_files(tmp_path):
    run = subprocess.run(["bash", str(ROOT / "script" / "gpu_check.sh"), "--tiny", "--out", str(tmp_path),
                          "--data_dir", str(DATA)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(result["sections"]) == list(gpu_check.SECTIONS)
    assert list(gpu_check.SECTIONS) == ["importance", "packing", "training", "pipeline", "inference", "dynamic",
                                        "sparse"]  # fmt: skip
    for name, sec in result["sections"].items():
        assert sec["ok"] and sec["figures"] and (sec["checks"] or name == "sparse"), name  # sparse: CUDA only
        assert all(c["ok"] for c in sec["checks"]), name
    packing = {c["check"] for c in result["sections"]["packing"]["checks"]}
    assert {"sdpa: packed loss = per-example loss", "eager: the control leaks (the check can fail)"} <= packing
    assert result["sections"]["importance"]["targets"] and result["sections"]["training"]["targets"]
    assert 0 <= result["sections"]["pipeline"]["figures"]["lm_eval arc_easy_local acc"] <= 1
    md = (tmp_path / "gpu_check.md").read_text()
    for name, (title, _) in gpu_check.SECTIONS.items():
        assert f"## {name}: {title} (ok" in md
    assert result["environment"]["tiny"] is True


def test_a_failed_check_exits_1_naming_the_section_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    def broken(ctx, rep):
        rep.figure("reached", True)
        rep.check("one plus one is three", 1 + 1 == 3, "it is 2")

    def crashing(ctx, rep):
        raise RuntimeError("kernel exploded")

    def fine(ctx, rep):
        rep.figure("x", 1)
        rep.check("fine", True, "ok")

    monkeypatch.setattr(gpu_check, "SECTIONS", {"broken": ("Broken", broken), "crashing": ("Crashing", crashing),
                                                "fine": ("Fine", fine)})  # fmt: skip
    code = gpu_check.main(["--tiny", "--out", str(tmp_path), "--sections", "broken,crashing,fine"])
    assert code == 1
    assert "FAILED sections: broken, crashing" in capsys.readouterr().err
    result = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert [result[n]["ok"] for n in ("broken", "crashing", "fine")] == [False, False, True]
    assert result["crashing"]["checks"][0]["detail"] == "RuntimeError: kernel exploded"
    assert "**FAILED**: it is 2" in (tmp_path / "gpu_check.md").read_text()


def test_a_run_killed_mid_way_keeps_the_sections_it_finished(tmp_path, monkeypatch):
    """The device tool kills a command at its time limit: what finished before must already be on disk."""

    def fine(ctx, rep):
        rep.figure("x", 1)

    def killed(ctx, rep):
        raise SystemExit(137)  # not an Exception: nothing in the check catches it, as with a kill

    monkeypatch.setattr(gpu_check, "SECTIONS", {"fine": ("Fine", fine), "killed": ("Killed", killed),
                                                "later": ("Later", fine)})  # fmt: skip
    with pytest.raises(SystemExit):
        gpu_check.main(["--tiny", "--out", str(tmp_path), "--sections", "fine,killed,later"])
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(result["sections"]) == ["fine"] and result["sections"]["fine"]["figures"] == {"x": 1}
    assert result["environment"]["sections_left"] == ["killed", "later"]
    assert "Not run (yet): killed, later." in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.parametrize(("args", "message"), [(["--sections", "speed"], "unknown ['speed']"),
                                               ([], "no CUDA device here")])  # fmt: skip
def test_bad_input(tmp_path, capsys, args, message):
    if not args and gpu_check.torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the full check would run")
    assert gpu_check.main(["--out", str(tmp_path / "o"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_report_targets_and_checks():
    rep = gpu_check.Report()
    rep.target("faster", 2.5, 2.0)
    rep.target("smaller", 1.1, 1.0, higher_is_better=False)
    rep.check("holds", True, "")
    assert [t["met"] for t in rep.targets] == [True, False] and rep.ok
    rep.check("breaks", False, "")
    assert not rep.ok


def test_help_names_what_to_carry():
    run = subprocess.run(["bash", str(ROOT / "script" / "gpu_check.sh"), "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "--prepare" in run.stdout and ".gpu_carry" in run.stdout


def test_inference_speed_measures_both_models_on_the_same_settings():
    from bench.speed.inference_speed import mlp_pruned_copy
    from module.speed import measure_speed, ratios
    from utils.tiny import random_llama

    dense = random_llama(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=300))  # fmt: skip
    pruned = mlp_pruned_copy(dense, 0.3)
    assert pruned.config.intermediate_size < 64 and dense.config.intermediate_size == 64  # the dense one untouched
    a, b = (measure_speed(m, 32, 4, [1, 2], repeats=1) for m in (dense, pruned))
    r = ratios(a, b)
    assert r["params"] == pytest.approx(0.7, abs=0.02)
    assert set(a["decode_tokens_per_s"]) == {1, 2} and set(r["decode_speedup"]) == {1, 2}
    assert a["prefill_seconds"] > 0 and all(v > 0 for v in r["decode_speedup"].values())
