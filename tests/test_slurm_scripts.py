"""The SLURM launchers: --help, dry runs (plain and as job-array tasks), bad arguments."""

import os
import shlex
import subprocess

import pytest
from conftest import ROOT


def dry(script, *args, **env):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full_env.update(DRY_RUN="1", **env)
    run = subprocess.run(["bash", str(ROOT / "script" / script), *args], capture_output=True, text=True,
                         env=full_env, timeout=60)  # fmt: skip
    return run


def test_prune_sh_one_pass_array_and_multi_gpu():
    run = dry("prune.sh", "meta-llama/Llama-2-7b-hf", "--batch_size", "8")
    assert run.returncode == 0, run.stderr
    assert shlex.split(run.stdout) == [
        "python3", "prune.py", "--origin_path", "meta-llama/Llama-2-7b-hf", "--pruning_ratio", "0.2,0.3",
        "--criterion", "entropy", "--seed", "42", "--output_dir", "out/Llama-2-7b-hf-entropy-s42", "--batch_size", "8",
    ]  # fmt: skip
    task = dry("prune.sh", "m/Llama", RATIOS="0.2 0.3 0.4", SLURM_ARRAY_TASK_ID="2", NUM_GPUS="4", CRITERION="ce")
    assert shlex.split(task.stdout) == [
        "accelerate", "launch", "--num_processes", "4", "prune.py", "--origin_path", "m/Llama", "--pruning_ratio",
        "0.4", "--criterion", "ce", "--seed", "42", "--output_dir", "out/Llama-ce-s42-pr0.4",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("script", "entry"), [("train_full.sh", "fintune_full.py"), ("train_lora.sh", "fintune_lora.py")]
)
def test_train_scripts_dry_run_and_lr_sweep(script, entry):
    run = dry(script, "out/pruned", "out/run", "--max_steps", "10")
    assert run.returncode == 0, run.stderr
    assert shlex.split(run.stdout) == [
        "accelerate", "launch", "--config_file", "cfg/accelerate/ddp_4gpu.yaml", "--num_processes", "4", entry,
        "--model", "out/pruned", "--output_dir", "out/run", "--max_steps", "10",
    ]  # fmt: skip
    sweep = dry(script, "out/pruned", "out/run", LRS="1e-4 5e-5", SLURM_ARRAY_TASK_ID="1", NUM_GPUS="2")
    words = shlex.split(sweep.stdout)
    assert words[5] == "2" and words[-3:] == ["out/run-lr5e-5", "--lr", "5e-5"]
    outside_array = dry(script, "out/pruned", "out/run", LRS="1e-4 5e-5")
    assert outside_array.returncode == 2 and "job array" in outside_array.stderr


@pytest.mark.parametrize("script", ["prune.sh", "train_full.sh", "train_lora.sh", "eval.sh"])
def test_help_and_missing_arguments(script):
    helped = subprocess.run(["bash", str(ROOT / "script" / script), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "usage: script/" in helped.stdout and "#SBATCH" not in helped.stdout
    missing = dry(script)
    assert missing.returncode == 2 and missing.stderr.strip().startswith("error: ")


def test_array_task_without_an_entry_fails():
    run = dry("prune.sh", "m", RATIOS="0.2", SLURM_ARRAY_TASK_ID="3")
    assert run.returncode == 2 and "has no entry" in run.stderr
