"""fintune_full.py / fintune_lora.py end to end: accumulation, resume, real data, accelerate, bad input."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import DATA, ROOT
from transformers import AutoModelForCausalLM, TrainerCallback

import fintune_full
import fintune_lora

LAMINI = str(DATA / "instruct" / "lamini" / "lamini_10001_part1.jsonl")


def common(model, out, *extra):
    return ["--model", str(model), "--dataset_name", LAMINI, "--tokenizer_max", "512", "--pack_length", "512",
            "--max_train_samples", "40", "--output_dir", str(out), "--gradient_checkpointing", "false",
            "--data_cache", "", "--disable_tqdm", "true", "--optimizer", "adamw", *extra]  # fmt: skip


class GradCapture(TrainerCallback):
    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.grads.append(torch.cat([p.grad.detach().flatten().clone() for p in model.parameters()]))


def test_accumulation_4x1_gives_the_same_update_as_1x4(tiny_long_llama_dir, tmp_path):
    grads = []
    for bs, ga in ((4, 1), (1, 4)):
        cap = GradCapture()
        argv = common(tiny_long_llama_dir, tmp_path / f"bs{bs}", "--per_device_train_batch_size", str(bs),
                      "--gradient_accumulation_steps", str(ga), "--max_steps", "1", "--max_grad_norm", "0")  # fmt: skip
        assert fintune_full.main(argv, callbacks=[cap]) == 0
        grads.append(cap.grads[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.step:
            control.should_training_stop = True


def losses(out):
    history = json.loads((out / "train_report.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def test_resumed_run_reproduces_the_uninterrupted_losses(tiny_long_llama_dir, tmp_path):
    extra = ["--max_steps", "4", "--save_steps", "2", "--gradient_accumulation_steps", "2", "--optimizer",
             "anyprecision"]  # fmt: skip
    assert fintune_full.main(common(tiny_long_llama_dir, tmp_path / "full", *extra)) == 0
    assert fintune_full.main(common(tiny_long_llama_dir, tmp_path / "cut", *extra), callbacks=[StopAt(2)]) == 0
    ckpt = tmp_path / "cut" / "checkpoint-2"
    assert ckpt.is_dir()
    resumed = common(tiny_long_llama_dir, tmp_path / "cut", *extra, "--resume_from_checkpoint", str(ckpt))
    assert fintune_full.main(resumed) == 0
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert set(full) == {1, 2, 3, 4} and {3, 4} <= set(cut)
    for step in (3, 4):
        assert cut[step] == pytest.approx(full[step], rel=1e-5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tokenizer_max", "1024", "--pack_length", "512"], "larger than --pack_length"),
        (["--tokenizer_max", "8"], "empty after filtering"),
        (["--packing", "random"], "is not one of"),
    ],
)
def test_bad_input_is_one_line(tiny_long_llama_dir, tmp_path, capsys, args, message):
    assert fintune_full.main([*common(tiny_long_llama_dir, tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err[-3:]


def test_unknown_fields_and_missing_model(tiny_long_llama_dir, tmp_path, capsys):
    bad = tmp_path / "qa.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n')
    argv = common(tiny_long_llama_dir, tmp_path / "o")
    argv[argv.index(LAMINI)] = str(bad)
    assert fintune_lora.main(argv) == 2
    assert "unknown dataset fields" in capsys.readouterr().err
    assert fintune_full.main(common(tmp_path / "no-model", tmp_path / "o2")) == 2
    assert "cannot load --model" in capsys.readouterr().err


def test_existing_run_folder_is_not_clobbered(tiny_long_llama_dir, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("earlier run")
    assert fintune_full.main(common(tiny_long_llama_dir, tmp_path / "run", "--max_steps", "1")) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "run" / "keep.txt").read_text() == "earlier run"


@pytest.mark.parametrize("script", ["fintune_full.py", "fintune_lora.py"])
def test_accelerate_two_cpu_processes_run_one_step(tiny_long_llama_dir, tmp_path, script):
    argv = common(tiny_long_llama_dir, tmp_path / "ddp", "--max_steps", "1", "--gradient_accumulation_steps", "1")
    # torchrun: `accelerate launch --cpu --num_processes 2` starts one process only; --use_cpu makes the
    # Trainer join the two ranks into a gloo group
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518", script,
         *argv, "--use_cpu", "true"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("INFO config:") == 2  # both ranks ran
    report = json.loads((tmp_path / "ddp" / "train_report.json").read_text())
    assert report["metrics"]["train_loss"] > 0 and report["training"]["max_steps"] == 1
    assert report["world_size"] == 2


@pytest.mark.slow
def test_both_scripts_train_smollm2_three_steps_save_and_reload(smollm2_dir, tmp_path):
    base = ["--model", str(smollm2_dir), "--dataset_name", LAMINI, "--tokenizer_max", "256",
            "--max_train_samples", "64", "--max_steps", "3", "--gradient_accumulation_steps", "1",
            "--gradient_checkpointing", "false", "--data_cache", str(tmp_path / "cache"),
            "--disable_tqdm", "true"]  # fmt: skip
    assert fintune_full.main([*base, "--output_dir", str(tmp_path / "full")]) == 0
    assert fintune_lora.main([*base, "--output_dir", str(tmp_path / "lora"), "--merge"]) == 0
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "merged")  # no peft needed
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_dir), tmp_path / "lora")
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30]])
    with torch.no_grad():
        assert torch.isfinite(full(ids).logits).all()
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-4)
    report = json.loads((tmp_path / "full" / "train_report.json").read_text())
    assert report["data"]["fill_ratio"] > 0.5 and report["metrics"]["train_loss"] > 0
    assert any("tokens_per_second" in h and "peak_memory_gb" in h for h in report["log_history"])
    assert (tmp_path / "full" / "loss_curve.png").stat().st_size > 0
    # the second run reused the tokenized cache
    assert len(list((tmp_path / "cache").iterdir())) == 1


@pytest.mark.parametrize(
    ("name", "kind"),
    [("single_gpu", "NO"), ("ddp_4gpu", "MULTI_GPU"), ("deepspeed_zero2", "DEEPSPEED"),
     ("deepspeed_zero3", "DEEPSPEED"), ("fsdp", "FSDP")],
)  # fmt: skip
def test_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(ROOT / "cfg" / "accelerate" / f"{name}.yaml"))
    assert cfg.distributed_type.name == kind and cfg.mixed_precision == "bf16"
