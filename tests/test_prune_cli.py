"""prune.py end to end on a tiny saved Llama: outputs, reload, cache, and every bad input."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, VOCAB
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import prune
from module.model.mlp import find_mlps

CALIB = ["--calib_dataset", "builtin", "--calib_samples", "6", "--seq_len", "24", "--batch_size", "4"]


def run_prune(tmp_path, origin, *extra, out="pruned", cache="cache"):
    argv = ["--origin_path", str(origin), "--output_dir", str(tmp_path / out),
            "--importance_cache", str(tmp_path / cache), "--no_progress", *CALIB, *extra]  # fmt: skip
    return prune.main(argv)


def test_prune_writes_a_loadable_model_equal_to_zeroing_the_dropped_neurons(tmp_path, tiny_llama_dir):
    assert run_prune(tmp_path, tiny_llama_dir, "--pruning_ratio", "0.05") == 0
    out = tmp_path / "pruned"
    report = json.loads((out / "prune_report.json").read_text())
    required = ["criterion", "params_before", "params_after", "achieved_ratio", "intermediate_size", "kept_per_layer",
                "calib_tokens", "importance_seconds", "tokens_per_second", "peak_memory_bytes", "versions"]  # fmt: skip
    for key in [*required, "settings"]:
        assert key in report, key
    assert report["calib_tokens"] == 6 * 24 and report["settings"]["seed"] == 42
    assert (out / "prune_layers.png").stat().st_size > 0 and (out / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".pruned.tmp-*"))

    pruned = AutoModelForCausalLM.from_pretrained(out).eval()
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    kept = load_file(str(out / "kept_neurons.safetensors"))
    assert pruned.config.intermediate_size == report["intermediate_size"] == len(kept["layer.0"])
    assert sum(p.numel() for p in pruned.parameters()) == report["params_after"]
    for i, layer in enumerate(find_mlps(dense).layers):
        dropped = torch.tensor(sorted(set(range(48)) - set(kept[f"layer.{i}"].tolist())))
        layer.output.weight.data.index_fill_(layer.output.weight_axis, dropped, 0.0)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)


def test_several_ratios_from_one_pass_give_nested_models(tmp_path, tiny_llama_dir, caplog):
    assert run_prune(tmp_path, tiny_llama_dir, "--pruning_ratio", "0.1,0.05", "--criterion", "ce") == 0
    folders = sorted((tmp_path / "pruned").iterdir())
    assert [f.name for f in folders] == ["tiny-llama-ce-pr0.05-s42", "tiny-llama-ce-pr0.1-s42"]
    small = load_file(str(folders[1] / "kept_neurons.safetensors"))
    large = load_file(str(folders[0] / "kept_neurons.safetensors"))
    for key in small:
        assert set(small[key].tolist()) < set(large[key].tolist())
    assert sum("importance: cached" in r.message for r in caplog.records) == 1


def cache_entries(tmp_path):
    return sorted(p.name for p in (tmp_path / "cache").iterdir())


def test_cache_hit_on_rerun_and_miss_on_every_keyed_change(tmp_path, tiny_llama_dir, caplog):
    base = ["--pruning_ratio", "0.05", "--overwrite"]
    assert run_prune(tmp_path, tiny_llama_dir, *base) == 0
    first = load_file(str(tmp_path / "pruned" / "kept_neurons.safetensors"))
    caplog.clear()
    assert run_prune(tmp_path, tiny_llama_dir, *base) == 0
    assert any("reusing cached scores" in r.message for r in caplog.records)
    assert len(cache_entries(tmp_path)) == 1
    again = load_file(str(tmp_path / "pruned" / "kept_neurons.safetensors"))
    assert all(torch.equal(first[k], again[k]) for k in first)
    changes = [["--seed", "7"], ["--calib_samples", "5"], ["--seq_len", "20"], ["--criterion", "ce"],
               ["--dtype", "bfloat16"], ["--calib_dataset", "builtin:heldout"]]  # fmt: skip
    for n, change in enumerate(changes, start=2):
        caplog.clear()
        assert run_prune(tmp_path, tiny_llama_dir, *base, *change) == 0, change
        assert not any("reusing" in r.message for r in caplog.records), change
        assert len(cache_entries(tmp_path)) == n, change
    caplog.clear()
    assert run_prune(tmp_path, tiny_llama_dir, *base, "--recompute") == 0
    assert not any("reusing" in r.message for r in caplog.records)


def test_same_seed_gives_identical_scores_without_the_cache(tmp_path, tiny_llama_dir):
    for out in ("a", "b"):
        assert run_prune(tmp_path, tiny_llama_dir, "--pruning_ratio", "0.05", out=out, cache=f"cache-{out}") == 0
    a = load_file(str(next((tmp_path / "cache-a").iterdir()) / "importance.safetensors"))
    b = load_file(str(next((tmp_path / "cache-b").iterdir()) / "importance.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pruning_ratio", "0.95"], "removes more than the MLPs hold"),
        (["--pruning_ratio", "0"], "must be in (0, 1)"),
        (["--pruning_ratio", "abc"], "must be a number"),
        (["--pruning_ratio", "0.1", "--mlp_ratio", "1.0"], "exactly one of"),
        ([], "exactly one of"),
        (["--mlp_ratio", "9"], "valid is 1..48"),
        (["--pruning_ratio", "0.1", "--criterion", "sparsegpt"], "does not score MLP neurons; valid: entropy"),
        (["--pruning_ratio", "0.1", "--calib_samples", "500"], "found only"),
        (["--pruning_ratio", "0.1", "--calib_dataset", "/nonexistent/c4.jsonl"], "does not exist"),
        (["--pruning_ratio", "0.1", "--dtype", "fp8"], "is not one of"),
        (["--pruning_ratio", "0.1", "--device", "cuda:99"], "no such CUDA device"),
        (["--pruning_ratio", "0.1", "--device", "tpu"], "is not a device"),
        (["--pruning_ratio", "0.1", "--bogus_flag", "1"], "not used"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_llama_dir, capsys, args, message):
    code = run_prune(tmp_path, tiny_llama_dir, *args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert [line for line in err if line.startswith("error")] == err[-1:], err
    assert message in err[-1], err
    assert not (tmp_path / "pruned").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pruned")]


def test_missing_model_and_unsupported_model(tmp_path, capsys):
    assert run_prune(tmp_path, tmp_path / "no-such-model", "--pruning_ratio", "0.1") == 2
    assert "cannot load model --origin_path" in capsys.readouterr().err


def test_output_inside_the_source_or_existing_is_refused(tmp_path, tiny_llama_dir, capsys):
    argv = ["--origin_path", str(tiny_llama_dir), "--pruning_ratio", "0.05", "--no_progress", *CALIB]
    assert prune.main([*argv, "--output_dir", str(tiny_llama_dir / "pruned")]) == 2
    assert "inside the source model folder" in capsys.readouterr().err
    assert not (tiny_llama_dir / "pruned").exists()
    (tmp_path / "taken").mkdir()
    assert prune.main([*argv, "--output_dir", str(tmp_path / "taken")]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_recipe_file_with_flag_override(tmp_path, tiny_llama_dir):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"origin_path: {tiny_llama_dir}\npruning_ratio: 0.3\ncriterion: magnitude\n")
    code = prune.main(["--config", str(recipe), "--pruning_ratio", "0.05", "--output_dir", str(tmp_path / "r"),
                       "--importance_cache", "", "--no_progress"])  # fmt: skip
    assert code == 0
    report = json.loads((tmp_path / "r" / "prune_report.json").read_text())
    assert report["criterion"] == "magnitude" and report["requested"] == 0.05 and report["calib_tokens"] == 0


def test_entry_point_help_and_error_exit_code(tmp_path):
    help_run = subprocess.run([sys.executable, "prune.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert help_run.returncode == 0 and "--pruning_ratio" in help_run.stdout and "--importance_cache" in help_run.stdout
    bad = subprocess.run([sys.executable, "prune.py", "--origin_path", str(tmp_path), "--pruning_ratio", "2"],
                         cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize("recipe", sorted((ROOT / "cfg" / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_parse(recipe):
    from cfg.prune_config import PruneConfig
    from utils.cli import parse_config

    cfg = parse_config(PruneConfig, ["--config", str(recipe)])
    assert cfg.criterion == "entropy" and cfg.pruning_ratios == [0.2, 0.3]


def test_unknown_recipe_key_fails(tmp_path):
    from cfg.prune_config import PruneConfig
    from utils.cli import UserError, parse_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("origin_path: x\npruning_ratio: 0.2\nmlp_ratoi: 2.0\n")
    with pytest.raises((UserError, SystemExit)):
        parse_config(PruneConfig, ["--config", str(recipe)])


def test_device_map_auto_gives_the_same_kept_neurons(tmp_path, tiny_llama_dir):
    assert run_prune(tmp_path, tiny_llama_dir, "--pruning_ratio", "0.05", out="plain", cache="c1") == 0
    assert run_prune(tmp_path, tiny_llama_dir, "--pruning_ratio", "0.05", "--device_map", "auto", out="mapped",
                     cache="c2") == 0  # fmt: skip
    a = load_file(str(tmp_path / "plain" / "kept_neurons.safetensors"))
    b = load_file(str(tmp_path / "mapped" / "kept_neurons.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
