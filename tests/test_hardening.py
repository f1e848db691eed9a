"""What a crash leaves, what bad input gets, what is reproducible: kill -9 mid-save, one-line errors with an
unchanged file tree, LoRA seeding and resume, output file modes."""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file
from test_finetune_scripts import StopAt, common, losses
from transformers import AutoModelForCausalLM, TrainerCallback

import fintune_full
import fintune_lora
import prune
from utils.atomic import atomic_dir, clear_leftovers, process_start, writer_tag

CALIB = ["--calib_dataset", "builtin", "--calib_samples", "6", "--seq_len", "24", "--batch_size", "3", "--no_progress"]

# Runs prune.py in a child process that stops at one point of its save, says so, and waits to be killed.
PAUSING_CHILD = """
import sys, time
sys.path.insert(0, {root!r})
import prune, module.prune.output, utils.atomic, utils.io

def pause(original):
    def paused(*args, **kwargs):
        result = original(*args, **kwargs)
        print("PAUSED", flush=True)
        time.sleep(600)
        return result
    return paused

stage = sys.argv[1]
if stage == "model":  # inside the output's temporary folder: model, tokenizer, masks and report written
    module.prune.output.plot_layer_scores = pause(module.prune.output.plot_layer_scores)
elif stage == "replace":  # the old output moved aside, the new one not yet renamed into place
    utils.atomic.move_aside = pause(utils.atomic.move_aside)
elif stage == "cache":  # inside the importance cache entry's temporary folder
    utils.io.save_file = pause(utils.io.save_file)
sys.exit(prune.main(sys.argv[2:]))
"""


def prune_argv(origin, out, cache, *extra):
    return ["--origin_path", str(origin), "--output_dir", str(out), "--importance_cache", str(cache),
            "--pruning_ratio", "0.1", *CALIB, *extra]  # fmt: skip


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


def kill_while_saving(stage: str, argv: list[str]) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", PAUSING_CHILD.format(root=str(ROOT)), stage, *argv],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert child.stdout.readline().strip() == "PAUSED", f"the child never reached {stage}"
        return child
    except BaseException:
        child.kill()
        raise


def sigkill(child) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)


@pytest.mark.parametrize("stage", ["model", "cache", "replace"])
def test_kill_9_while_saving_leaves_nothing_that_the_next_run_does_not_clear(tmp_path, tiny_llama_dir, stage, caplog):
    out, cache = tmp_path / "runs" / "pruned", tmp_path / "cache"
    reference = tmp_path / "reference"
    assert prune.main(prune_argv(tiny_llama_dir, reference, tmp_path / "ref-cache")) == 0
    expected = load_file(str(reference / "kept_neurons.safetensors"))
    extra = []
    if stage == "replace":  # an earlier output is there and is being replaced
        assert prune.main(prune_argv(tiny_llama_dir, out, cache)) == 0
        extra = ["--overwrite"]
    child = kill_while_saving(stage, prune_argv(tiny_llama_dir, out, cache, *extra))
    parent = cache if stage == "cache" else out.parent
    live = hidden(parent)
    assert live, "the paused writer has a hidden temporary folder"
    clear_leftovers(parent / live[-1][1:].split(".tmp-")[0])  # the place the paused writer writes to
    assert hidden(parent) == live, "a live writer's folder was touched"
    sigkill(child)
    assert hidden(parent) == live, "SIGKILL left the folder (as expected: nothing can clean up)"
    if stage == "replace":
        assert not out.exists() and any(".old-" in n for n in live)

    caplog.clear()
    assert prune.main(prune_argv(tiny_llama_dir, out, cache, "--overwrite")) == 0
    assert hidden(out.parent) == [] and hidden(cache) == []
    assert any("no longer runs" in r.message or "restored" in r.message for r in caplog.records)
    kept = load_file(str(out / "kept_neurons.safetensors"))
    assert kept.keys() == expected.keys() and all(torch.equal(kept[k], expected[k]) for k in kept)
    AutoModelForCausalLM.from_pretrained(out)


def test_leftovers_of_dead_writers_go_and_others_stay(tmp_path, caplog):
    final = tmp_path / "model"
    me = os.getpid()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    names = {
        "live": f".model.tmp-{writer_tag()}",
        "reused_pid": f".model.tmp-{host}-{me}-{(process_start(me) or 0) + 12345}",  # our pid, another start
        "dead": f".model.tmp-{host}-{dead.pid}-1",
        "legacy_dead": f".model.tmp-{dead.pid}",
        "other_host": f".model.tmp-{host}x-{me}-1",
        "old_dead": f".model.old-{host}-{dead.pid}-1",
        "other_name": f".model2.tmp-{host}-{dead.pid}-1",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights").write_text(name)
    clear_leftovers(final)
    left = set(hidden(tmp_path))
    assert left == {names["live"], names["other_host"], names["other_name"]}, left
    assert final.is_dir() and (final / "weights").read_text() == names["old_dead"], "the old folder is put back"
    assert any("cannot be checked" in r.message for r in caplog.records)


def test_atomic_dir_removes_its_folder_on_error_and_replaces_whole(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    for text in ("one", "two"):
        with atomic_dir(final) as tmp:
            (tmp / "a").write_text(text)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (final / "a").read_text() == "two"


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_size if p.is_file() else None for p in sorted(root.rglob("*"))}


def bad_files(folder: Path) -> dict[str, Path]:
    files = {"binary.jsonl": bytes(range(256)) * 8, "binary.txt": b"\xff\xfe\x00\x81" * 500,
             "broken.jsonl": b'{"text": "fine"}\n{"text": oops}\n', "numbers.jsonl": b"1\n2\n",
             "broken.parquet": b"PAR1 not really"}  # fmt: skip
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "not-a-model").mkdir()
    (folder / "not-a-model" / "notes.txt").write_text("hello")
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_config.json").write_text("{}")
    (folder / "wrong-type.yaml").write_text("calib_samples: many\n")
    (folder / "unknown-key.yaml").write_text("pruning_ratoi: 0.2\n")
    return {name: folder / name for name in [*files, "not-a-model", "adapter", "wrong-type.yaml", "unknown-key.yaml"]}


PRUNE_BAD = [
    ("calib", ["--calib_dataset", "<binary.jsonl>"], "is not UTF-8 text"),
    ("calib", ["--calib_dataset", "<binary.txt>"], "is not UTF-8 text"),
    ("calib", ["--calib_dataset", "<broken.jsonl>"], "line 2 is not valid JSON"),
    ("calib", ["--calib_dataset", "<numbers.jsonl>"], "holds int values, not records"),
    ("calib", ["--calib_dataset", "<broken.parquet>"], "is not a readable Parquet file"),
    ("gpt2", ["--seq_len", "200"], "exceeds the model's 128 positions"),
    ("gpt2", ["--seq_len", "200", "--allow_long_context"], "exceeds the model's 128 positions"),
    ("gpt2", ["--eval_text", "builtin:heldout", "--eval_seq_len", "129"], "--eval_seq_len 129 exceeds"),
    ("llama", ["--seq_len", "200"], "pass --allow_long_context"),
    ("ratio", ["--pruning_ratio", "0.2,,0.3"], "must be a number or a comma list"),
    ("ratio", ["--pruning_ratio", "0.2,"], "must be a number or a comma list"),
    ("ratio", ["--pruning_ratio", "nan"], "each value must be in (0, 1)"),
    ("ratio", ["--pruning_ratio", "inf"], "each value must be in (0, 1)"),
    ("ratio", ["--mlp_ratio", "1.5,-inf"], "must be > 0 and finite"),
    ("origin", ["--origin_path", "{tmp}/no/such/model"], "no such folder"),
    ("origin", ["--origin_path", "./missing-model"], "no such folder"),
    ("origin", ["--origin_path", "<not-a-model>"], "no config.json in"),
    ("origin", ["--origin_path", "<adapter>"], "holds a LoRA adapter"),
    ("origin", ["--origin_path", "<binary.txt>"], "a file, not a model folder"),
    ("config", ["--config", "<wrong-type.yaml>"], "wrong-type.yaml: key 'calib_samples': invalid int value: 'many'"),
    ("config", ["--config", "<unknown-key.yaml>"], "unknown-key.yaml: unknown key 'pruning_ratoi'"),
    ("config", ["--calib_samples", "x"], "argument --calib_samples/--calib-samples: invalid int value: 'x'"),
]


@pytest.mark.parametrize(("kind", "args", "message"), PRUNE_BAD, ids=[f"{c[0]}-{c[2][:24]}" for c in PRUNE_BAD])
def test_prune_bad_input_one_line_exit_2_tree_unchanged(tmp_path, tiny_llama_dir, tiny_gpt2_dir, capsys, kind, args,
                                                         message):  # fmt: skip
    files = bad_files(tmp_path)
    for name, path in {"tmp": tmp_path, **files}.items():
        args = [a.replace(f"<{name}>", str(path)) for a in args]
    origin = tiny_gpt2_dir if kind == "gpt2" else tiny_llama_dir
    ratio = [] if kind == "ratio" else ["--pruning_ratio", "0.1"]
    before = tree(tmp_path)
    argv = ["--origin_path", str(origin), *ratio, *CALIB, "--output_dir", str(tmp_path / "out"),
            "--importance_cache", str(tmp_path / "cache"), *args]  # fmt: skip
    assert prune.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert [line for line in err if line.startswith("error")] == err[-1:], err[-3:]
    assert message in err[-1], err[-1]
    assert tree(tmp_path) == before


def test_entry_points_one_stderr_line_and_a_fast_hub_failure(tmp_path):
    """As a user runs them: exit 2, stderr exactly one `error:` line (no log lines before a config check)."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_DISABLE_TELEMETRY": "1"}
    cases = [
        (["prune.py", "--origin_path", "org/some-model", "--pruning_ratio", "0.2"], "hub cannot be reached"),
        (["prune.py", "--origin_path", "x", "--pruning_ratio", "0.2,,0.3"], "comma list"),
        (["fintune_full.py", "--model", "x", "--lr", "-1", "--output_dir", str(tmp_path / "o")], "--lr -1 is not"),
        (["fintune_lora.py", "--model", "x", "--learning_rate", "nan", "--output_dir", str(tmp_path / "o")],
         "--learning_rate nan is not"),
    ]  # fmt: skip
    for argv, message in cases:
        start = time.perf_counter()
        run = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert run.returncode == 2, run.stderr[-2000:]
        assert [line for line in lines if line.startswith("error")] == lines[-1:], lines
        assert lines[-1].startswith("error: ") and message in lines[-1], lines
        assert not [line for line in lines if "Traceback" in line or "Retrying" in line or "usage:" in line], lines
        assert time.perf_counter() - start < 60, "failed, but slowly"
    assert list(tmp_path.iterdir()) == []


def test_finetune_bad_input_one_line_and_no_output_folder(tmp_path, tiny_long_llama_dir, tiny_gpt2_dir, capsys):
    files = bad_files(tmp_path)
    cases = [
        (tiny_long_llama_dir, ["--lr", "-1"], "--lr -1 is not valid"),
        (tiny_long_llama_dir, ["--learning_rate", "0"], "--learning_rate 0 is not valid"),
        (tiny_long_llama_dir, ["--dataset_name", str(files["binary.jsonl"])], "is not UTF-8 text"),
        (tiny_long_llama_dir, ["--dataset_name", str(files["broken.jsonl"])], "line 2 is not valid JSON"),
        (tiny_long_llama_dir, ["--dataset_name", str(files["numbers.jsonl"])], "is a int, not a record"),
        (tiny_gpt2_dir, ["--tokenizer_max", "256", "--pack_length", "256"], "--pack_length 256 exceeds"),
        (tmp_path / "not-a-model", [], "no config.json in"),
        (tiny_long_llama_dir, ["--resume_from_checkpoint", str(tmp_path / "nope")], "no such folder"),
        (tiny_long_llama_dir, ["--config", str(files["wrong-type.yaml"])], "unknown key 'calib_samples'"),
    ]
    before = tree(tmp_path)
    for model, extra, message in cases:
        for main in (fintune_full.main, fintune_lora.main):
            assert main([*common(model, tmp_path / "run"), "--max_steps", "1", *extra]) == 2, extra
            err = capsys.readouterr().err.strip().splitlines()
            assert [line for line in err if line.startswith("error")] == err[-1:], err[-3:]
            assert message in err[-1], (extra, err[-1])
            assert tree(tmp_path) == before, extra


class FirstAdapter(TrainerCallback):
    """The LoRA weights as the run starts (before any update)."""

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_lora_same_seed_same_adapters_and_resume_equals_uninterrupted(tiny_long_llama_dir, tmp_path):
    extra = ["--max_steps", "4", "--save_steps", "2", "--gradient_accumulation_steps", "2", "--seed", "3",
             "--lora_r", "4", "--lora_alpha", "8"]  # fmt: skip
    starts = []
    for name in ("a", "b"):
        cap = FirstAdapter()
        assert fintune_lora.main(common(tiny_long_llama_dir, tmp_path / name, *extra), callbacks=[cap]) == 0
        starts.append(cap.weights)
    assert starts[0].keys() == starts[1].keys() and starts[0]
    assert all(torch.equal(starts[0][k], starts[1][k]) for k in starts[0])
    assert losses(tmp_path / "a") == losses(tmp_path / "b")

    cut = tmp_path / "cut"
    assert fintune_lora.main(common(tiny_long_llama_dir, cut, *extra), callbacks=[StopAt(2)]) == 0
    half_written = cut / "checkpoint-3"  # a later save the run was killed in: no trainer_state.json
    half_written.mkdir()
    (half_written / "adapter_model.safetensors").write_bytes(b"trunc")
    assert fintune_lora.main(common(tiny_long_llama_dir, cut, *extra, "--resume_from_checkpoint", "last")) == 0
    assert not half_written.exists()
    full, resumed = losses(tmp_path / "a"), losses(cut)
    assert {3, 4} <= set(resumed)
    for step in (3, 4):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5)


def modes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): oct(stat.S_IMODE(p.stat().st_mode)) for p in folder.rglob("*")}


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_outputs_follow_the_umask(tmp_path, tiny_llama_dir, tiny_long_llama_dir, umask_022):
    assert prune.main(prune_argv(tiny_llama_dir, tmp_path / "pruned", tmp_path / "cache")) == 0
    argv = [*common(tiny_long_llama_dir, tmp_path / "lora"), "--max_steps", "2", "--save_steps", "1", "--merge"]
    assert fintune_lora.main(argv) == 0
    assert fintune_full.main([*common(tiny_long_llama_dir, tmp_path / "full"), "--max_steps", "1"]) == 0
    for folder in ("pruned", "cache", "lora", "full"):
        found = modes(tmp_path / folder)
        wrong = {k: v for k, v in found.items() if v != ("0o755" if (tmp_path / folder / k).is_dir() else "0o644")}
        assert found and not wrong, (folder, wrong)
    assert "model.safetensors" in modes(tmp_path / "pruned") and "merged/model.safetensors" in modes(tmp_path / "lora")
    report = json.loads((tmp_path / "full" / "train_report.json").read_text())
    assert report["metrics"]["train_loss"] > 0
