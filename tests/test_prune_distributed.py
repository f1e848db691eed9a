"""prune.py as two CPU processes (torchrun; `accelerate launch --cpu` starts one process only) equals one process."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

ARGS = ["--pruning_ratio", "0.1", "--calib_dataset", "builtin", "--calib_samples", "6", "--seq_len", "24",
        "--importance_cache", "", "--no_progress"]  # fmt: skip


# two real ranks in a gloo group: each logs its config, so the stderr shows two config lines
LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]

STRUCTURES = ["--prune_parts", "mlp,heads,layers,hidden", "--heads_keep", "2", "--layers_remove", "1", "--hidden_keep",
              "28"]  # fmt: skip


@pytest.mark.parametrize("extra", [[], STRUCTURES], ids=["mlp", "every structure"])
def test_two_processes_keep_the_same_neurons_and_write_the_same_weights(tiny_llama_dir, tmp_path, extra):
    one = ["prune.py", "--origin_path", str(tiny_llama_dir), *ARGS, *extra, "--output_dir", str(tmp_path / "one")]
    single = subprocess.run([sys.executable, *one], cwd=ROOT, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run([*LAUNCH, "prune.py", "--origin_path", str(tiny_llama_dir), *ARGS, *extra, "--output_dir",
                             str(tmp_path / "two")], cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert double.returncode == 0, double.stderr[-3000:]
    assert double.stderr.count("INFO config:") == 2  # two processes ran ...
    assert double.stdout.count("parameters (removed") == 1  # ... and only rank 0 writes and reports
    kept_one = load_file(str(tmp_path / "one" / "kept_neurons.safetensors"))
    kept_two = load_file(str(tmp_path / "two" / "kept_neurons.safetensors"))
    assert all(torch.equal(kept_one[k], kept_two[k]) for k in kept_one)
    if extra:
        s_one = load_file(str(tmp_path / "one" / "kept_structures.safetensors"))
        s_two = load_file(str(tmp_path / "two" / "kept_structures.safetensors"))
        assert s_one.keys() == s_two.keys() and all(torch.equal(s_one[k], s_two[k]) for k in s_one)
    w_one = load_file(str(tmp_path / "one" / "model.safetensors"))
    w_two = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert w_one.keys() == w_two.keys() and all(torch.equal(w_one[k], w_two[k]) for k in w_one)
    r_one = json.loads((tmp_path / "one" / "prune_report.json").read_text())
    r_two = json.loads((tmp_path / "two" / "prune_report.json").read_text())
    assert r_one["calib_tokens"] == r_two["calib_tokens"] == 6 * 24
    assert abs(r_one["mean_window_loss"] - r_two["mean_window_loss"]) < 1e-6


def test_sparsity_refuses_accelerate_launch(tiny_llama_dir, tmp_path):
    run = subprocess.run([*LAUNCH, "prune.py", "--origin_path", str(tiny_llama_dir), "--sparsity", "0.5",
                          "--sparsity_method", "magnitude", "--output_dir", str(tmp_path / "two"), "--no_progress"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode != 0 and "--sparsity runs in one process" in run.stderr
    assert not (tmp_path / "two").exists()
