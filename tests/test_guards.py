"""Nothing lost, nothing silently wrong: the output guard (no output touches an input; the location is usable
before anything loads; one writer at a time; --overwrite deletes nothing early), every data record checked,
damaged model folders and cache entries, devices, adapters and the smaller hints. Real files and processes;
every refusal is one `error:` line, exit 2, and the disk as it was."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import DATA, ROOT
from safetensors.torch import load_file
from test_finetune_scripts import common
from test_hardening import hidden, kill_while_saving, prune_argv, sigkill, tree
from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback

import fintune_full
import fintune_lora
import prune

CALIB = ["--calib_dataset", "builtin", "--calib_samples", "6", "--seq_len", "24", "--no_progress"]


def one_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if line.startswith("error")] == err[-1:], err[-3:]
    assert "Traceback" not in "\n".join(err)
    for needle in needles:
        assert needle in err[-1], err[-1]
    return err[-1]


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- outputs and inputs ----


def test_prune_output_that_contains_the_model_is_refused_even_with_overwrite(tmp_path, tiny_llama_dir, capsys):
    model = copy_model(tiny_llama_dir, tmp_path / "p" / "m")
    (tmp_path / "p" / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    argv = ["--origin_path", str(model), "--pruning_ratio", "0.1", *CALIB, "--importance_cache", ""]
    assert prune.main([*argv, "--output_dir", str(tmp_path / "p"), "--overwrite"]) == 2
    one_error(capsys, "contains the source model folder")
    assert prune.main([*argv, "--output_dir", str(model), "--overwrite"]) == 2
    one_error(capsys, "is the source model folder")
    assert prune.main([*argv, "--output_dir", str(tmp_path / "p"), "--calib_dataset", str(tmp_path / "p" / "notes.txt"),
                       "--overwrite"]) == 2  # fmt: skip
    assert tree(tmp_path) == before


def test_prune_output_that_contains_the_cache_or_data_is_refused(tmp_path, tiny_llama_dir, capsys):
    data = tmp_path / "runs" / "calib.txt"
    data.parent.mkdir()
    data.write_text("\n\n".join(f"document {i} " + "words " * 60 for i in range(10)))
    before = tree(tmp_path)
    base = ["--origin_path", str(tiny_llama_dir), "--pruning_ratio", "0.1", *CALIB]
    assert prune.main([*base, "--output_dir", str(tmp_path / "runs"), "--calib_dataset", str(data), "--overwrite"]) == 2
    one_error(capsys, "contains the calibration data")
    assert prune.main([*base, "--output_dir", str(tmp_path / "runs"), "--importance_cache",
                       str(tmp_path / "runs" / "cache")]) == 2  # fmt: skip
    one_error(capsys, "importance cache")
    assert tree(tmp_path) == before


def test_finetune_overwrite_never_deletes_an_input(tmp_path, tiny_long_llama_dir, capsys):
    model = copy_model(tiny_long_llama_dir, tmp_path / "model")
    teacher = copy_model(tiny_long_llama_dir, tmp_path / "teacher")
    before = tree(tmp_path)
    for main in (fintune_full.main, fintune_lora.main):
        assert main(common(model, model, "--max_steps", "1", "--overwrite")) == 2
        one_error(capsys, "is the model folder")
        argv = common(model, teacher, "--max_steps", "1", "--overwrite", "--distill_from", str(teacher))
        assert main(argv) == 2
        one_error(capsys, "is the teacher")
        assert main(common(model, tmp_path, "--max_steps", "1", "--overwrite")) == 2
        one_error(capsys, "contains the model folder")
    assert tree(tmp_path) == before


class Boom(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        raise RuntimeError("the node went away")


def test_finetune_overwrite_replaces_the_old_run_only_when_the_new_one_is_complete(tmp_path, tiny_long_llama_dir,
                                                                                   capsys):  # fmt: skip
    out = tmp_path / "run"
    assert fintune_full.main(common(tiny_long_llama_dir, out, "--max_steps", "1")) == 0
    old = tree(out)
    bad = common(tiny_long_llama_dir, out, "--max_steps", "1", "--overwrite", "--tokenizer_max", "99999")
    assert fintune_full.main(bad) == 2  # bad input with --overwrite: the old run stays
    assert tree(out) == old
    with pytest.raises(RuntimeError, match="the node went away"):  # a crash mid-training: the old run stays
        fintune_full.main(common(tiny_long_llama_dir, out, "--max_steps", "2", "--overwrite"), callbacks=[Boom()])
    assert tree(out) == old and hidden(tmp_path) == []
    assert fintune_full.main(common(tiny_long_llama_dir, out, "--max_steps", "2", "--overwrite")) == 0
    report = json.loads((out / "train_report.json").read_text())
    assert report["training"]["max_steps"] == 2 and report["training"]["output_dir"] == str(out)
    assert hidden(tmp_path) == [] and (out / "model.safetensors").is_file()


def test_prune_overwrite_of_a_file_is_refused_and_leaves_nothing(tmp_path, tiny_llama_dir, capsys):
    target = tmp_path / "out"
    target.write_text("a file")
    assert prune.main(["--origin_path", str(tiny_llama_dir), "--pruning_ratio", "0.1", *CALIB, "--output_dir",
                       str(target), "--overwrite", "--importance_cache", ""]) == 2  # fmt: skip
    one_error(capsys, "is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and target.read_text() == "a file"


def read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot create anything in (as root, where permissions do not bind, /sys)."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    folder = Path("/sys")
    try:
        (folder / "hfprune-probe").mkdir()
    except OSError:
        return folder
    (folder / "hfprune-probe").rmdir()
    raise AssertionError("no read-only folder found on this machine for the test")


def test_unusable_output_or_cache_is_found_before_the_model_loads(tmp_path, tiny_llama_dir, capsys, caplog):
    (tmp_path / "a-file").write_text("x")
    readonly = read_only_folder(tmp_path)
    cases = [
        (["--output_dir", str(tmp_path / "a-file" / "out")], "is a file, so no folder can be created below it"),
        (["--output_dir", str(readonly / "out")], "cannot create anything in"),
        (["--output_dir", str(tmp_path / "o"), "--importance_cache", str(tmp_path / "a-file")], "is a file"),
        (["--output_dir", str(tmp_path / "o"), "--importance_cache", str(readonly / "cache")], "cannot create"),
    ]
    before = tree(tmp_path)
    for extra, message in cases:
        caplog.clear()
        assert prune.main(["--origin_path", str(tiny_llama_dir), "--pruning_ratio", "0.1", *CALIB, *extra]) == 2
        one_error(capsys, message)
        assert not any(r.message.startswith("model:") for r in caplog.records), "the model was loaded first"
    assert tree(tmp_path) == before


def test_a_second_writer_is_refused_at_once_and_a_dead_ones_claim_is_taken_over(tmp_path, tiny_llama_dir, capsys,
                                                                                caplog):  # fmt: skip
    out, cache = tmp_path / "runs" / "pruned", tmp_path / "cache"
    child = kill_while_saving("model", prune_argv(tiny_llama_dir, out, cache))  # paused while it writes `out`
    try:
        assert prune.main(prune_argv(tiny_llama_dir, out, tmp_path / "cache2")) == 2
        one_error(capsys, "is being written by another run", f"pid {child.pid}")
        assert prune.main(prune_argv(tiny_llama_dir, out, tmp_path / "cache2", "--overwrite")) == 2
        one_error(capsys, "is being written by another run")
    finally:
        sigkill(child)
    assert ".pruned.lock" in hidden(out.parent)
    caplog.clear()
    assert prune.main(prune_argv(tiny_llama_dir, out, cache)) == 0  # the dead writer's claim and folder are cleared
    assert any("no longer runs" in r.message for r in caplog.records)
    assert hidden(out.parent) == [] and (out / "kept_neurons.safetensors").is_file()


def test_two_finetune_runs_into_one_folder(tmp_path, tiny_long_llama_dir, capsys):
    """The claim holds for fine-tuning too: a run that finds the lock of a live writer stops at once."""
    from utils.outputs import claim

    out = tmp_path / "run"
    with claim([out]):  # another live run (this process) holds it
        assert fintune_full.main(common(tiny_long_llama_dir, out, "--max_steps", "1")) == 2
        one_error(capsys, "is being written by another run")
        assert not out.exists()
    assert fintune_full.main(common(tiny_long_llama_dir, out, "--max_steps", "1")) == 0
    assert hidden(tmp_path) == []


# ---- data, models, caches, devices ----


def test_every_data_record_is_checked_before_the_model_loads(tmp_path, tiny_llama_dir, tiny_long_llama_dir, capsys):
    docs = ["words " * 60] * 8
    files = {
        "late-missing.jsonl": [{"text": d} for d in docs] + [{"content": "x"}],
        "mixed.jsonl": [{"text": d} for d in docs] + ["bare string"],
        "null-text.jsonl": [{"text": d} for d in docs] + [{"text": None}, {"text": 3}],
    }
    for name, records in files.items():
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    instructions = tmp_path / "instr.jsonl"
    instructions.write_text(json.dumps({"instruction": "a", "response": "b"}) + "\n"
                            + json.dumps({"instruction": "c", "response": None}) + "\n")  # fmt: skip
    before = tree(tmp_path)
    cases = [("late-missing.jsonl", "record 9 has no field 'text'"), ("mixed.jsonl", "record 9 is a str"),
             ("null-text.jsonl", "record 10's 'text' is a int")]  # fmt: skip
    for name, message in cases:
        assert prune.main(["--origin_path", str(tiny_llama_dir), "--pruning_ratio", "0.1", *CALIB, "--calib_dataset",
                           str(tmp_path / name), "--output_dir", str(tmp_path / "o")]) == 2  # fmt: skip
        one_error(capsys, "--calib_dataset file", message)
    assert prune.main(["--origin_path", str(tiny_llama_dir), "--pruning_ratio", "0.1", *CALIB, "--eval_text",
                       str(tmp_path / "late-missing.jsonl"), "--eval_seq_len", "64", "--output_dir",
                       str(tmp_path / "o")]) == 2  # fmt: skip
    one_error(capsys, "--eval_text file", "set --calib_text_field")
    argv = common(tiny_long_llama_dir, tmp_path / "run", "--max_steps", "1")
    argv[argv.index("--dataset_name") + 1] = str(instructions)
    assert fintune_full.main(argv) == 2
    one_error(capsys, "record 2 of the instruction dataset: its 'response' is NoneType")
    text_argv = [*argv, "--text_field", "body"]
    text_argv[text_argv.index("--dataset_name") + 1] = str(tmp_path / "late-missing.jsonl")
    text_argv.remove("--pack_length")
    text_argv.remove("512")
    assert fintune_full.main(text_argv) == 2
    one_error(capsys, "--dataset_name file", "set --text_field")
    assert tree(tmp_path) == before


def damaged(tmp_path: Path, source: Path, name: str) -> Path:
    folder = copy_model(source, tmp_path / name)
    config = json.loads((folder / "config.json").read_text())
    if name == "hidden-abc":
        config["hidden_size"] = "abc"
    elif name == "vocab":
        config["vocab_size"] += 8
    else:
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(("name", "message"), [("hidden-abc", "Validation error for field 'hidden_size'"),
                                               ("vocab", "but its config.json describes"),
                                               ("truncated", "is not a complete safetensors file")])  # fmt: skip
def test_damaged_model_folders_are_one_line(tmp_path, tiny_long_llama_dir, capsys, name, message):
    folder = damaged(tmp_path, tiny_long_llama_dir, name)
    before = tree(tmp_path)
    assert prune.main(["--origin_path", str(folder), "--pruning_ratio", "0.1", *CALIB, "--output_dir",
                       str(tmp_path / "o"), "--importance_cache", ""]) == 2  # fmt: skip
    one_error(capsys, message)
    assert fintune_full.main(common(folder, tmp_path / "run", "--max_steps", "1")) == 2
    one_error(capsys, message)
    argv = common(tiny_long_llama_dir, tmp_path / "run", "--max_steps", "1", "--distill_from", str(folder))
    assert fintune_full.main(argv) == 2
    one_error(capsys)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("damage", ["garbage-weights", "garbage-json", "wrong-shapes"])
def test_a_damaged_cache_entry_is_recomputed_and_replaced(tmp_path, tiny_llama_dir, caplog, damage):
    argv = ["--origin_path", str(tiny_llama_dir), "--pruning_ratio", "0.1", *CALIB, "--importance_cache",
            str(tmp_path / "cache")]  # fmt: skip
    assert prune.main([*argv, "--output_dir", str(tmp_path / "a")]) == 0
    (entry,) = (tmp_path / "cache").iterdir()
    good = {k: v.clone() for k, v in load_file(str(entry / "importance.safetensors")).items()}  # not the mmap
    if damage == "garbage-weights":
        (entry / "importance.safetensors").write_bytes(b"\x00" * 100)
    elif damage == "garbage-json":
        (entry / "importance.json").write_text("{not json")
    else:
        from safetensors.torch import save_file

        save_file({"layer.0": torch.ones(3, dtype=torch.float64)}, str(entry / "importance.safetensors"))
    caplog.clear()
    assert prune.main([*argv, "--output_dir", str(tmp_path / "b")]) == 0
    assert any("recomputing it" in r.message for r in caplog.records)
    again = load_file(str(entry / "importance.safetensors"))
    assert again.keys() == good.keys() and all(torch.equal(again[k], good[k]) for k in good)
    assert json.loads((entry / "importance.json").read_text())["key"]
    a, b = load_file(str(tmp_path / "a" / "kept_neurons.safetensors")), load_file(str(tmp_path / "b" /
                                                                                   "kept_neurons.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_teacher_device_is_checked_with_the_flags(tmp_path, tiny_long_llama_dir, capsys):
    for device, message in (("banana", "is not a device"), ("cuda:1", "no such CUDA device here")):
        if device.startswith("cuda") and torch.cuda.device_count() > 1:
            continue  # a machine with two GPUs has cuda:1; banana is still checked
        argv = common(tiny_long_llama_dir, tmp_path / "run", "--max_steps", "1", "--distill_from",
                      str(tiny_long_llama_dir), "--teacher_device", device)  # fmt: skip
        assert fintune_full.main(argv) == 2
        one_error(capsys, "--teacher_device", message)
    assert not (tmp_path / "run").exists()


# ---- evaluation ----


def test_eval_sh_refuses_an_adapter_of_another_model_and_writes_no_results_folder(tmp_path, tiny_long_llama_dir):
    model = copy_model(tiny_long_llama_dir, tmp_path / "model")
    lamini = str(DATA / "instruct" / "lamini" / "lamini_10001_part1.jsonl")
    assert fintune_lora.main(common(model, tmp_path / "lora", "--max_steps", "1", "--dataset_name", lamini)) == 0
    other = copy_model(model, tmp_path / "other")  # the same family, a wider MLP: the adapter's shapes do not fit
    config = AutoConfig.from_pretrained(model)
    config.intermediate_size += 16
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    run = subprocess.run(["bash", str(ROOT / "script" / "eval.sh"), "--local", "--tasks", "arc_easy_local", "--device",
                          "cpu", "--dtype", "float32", "--limit", "2", str(other), str(tmp_path / "lora")],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2, run.stderr[-2000:]
    assert lines[-1].startswith("error: adapter") and "does not fit model" in lines[-1], lines[-3:]
    assert not (other / "lm_eval").exists()


# ---- smaller ----


def test_smaller_refusals_and_hints(tmp_path, tiny_llama_dir, capsys):
    base = ["--origin_path", str(tiny_llama_dir), *CALIB, "--output_dir", str(tmp_path / "o")]
    assert prune.main([*base, "--prune_parts", "heads", "--heads_keep", "4"]) == 2  # all 4 heads: nothing pruned
    one_error(capsys, "keeping all 4 prunes nothing")
    assert prune.main([*base, "--prune_parts", "mlp,heads", "--pruning_ratio", "0.8"]) == 2  # more than both hold
    line = one_error(capsys, "lower --pruning_ratio")
    assert "add mlp" not in line
    assert prune.main([*base, "--pruning_ratio", "0.1", "--eval_text", str(tmp_path / "missing.txt"), "--eval_seq_len",
                       "64"]) == 2  # fmt: skip
    one_error(capsys, "--eval_text file", "does not exist")
    assert not (tmp_path / "o").exists()
