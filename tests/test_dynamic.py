"""Probe Pruning (module/dynamic): the math by hand, the wrapped model against the dense and the masked one, the
history, the folder prune.py --dynamic writes and evaluate.py loads, and bad input as one line."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
from conftest import DATA, ROOT, tiny_config, tiny_model

from module.dynamic.folder import load_dynamic
from module.dynamic.history import History, calibrate
from module.dynamic.probe import (
    channel_scores,
    ema_update,
    fuse,
    head_scores,
    kept_count,
    layer_ratio,
    probe_energy,
    probe_rows,
)
from module.dynamic.wrap import ProbeSettings, attach
from module.model.layout import head_counts, layout_of
from module.model.mlp import decoder_layers

GQA_FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]


def test_probe_rows_rank_positions_over_the_batch_then_windows_on_those_positions():
    norms = torch.tensor([[1.0, 5.0, 2.0, 0.0], [3.0, 1.0, 4.0, 1.0], [2.0, 2.0, 2.0, 9.0]])
    # positions' norms over windows: sqrt(14), sqrt(30), sqrt(24), sqrt(82) -> the best two are 3 and 1; with ten
    # or fewer kept positions the first becomes position 0 -> [0, 3]. Windows on [0, 3]: 1, sqrt(10), sqrt(85).
    windows, positions = probe_rows(norms, 0.5, 0.05)
    assert positions.tolist() == [0, 3]
    assert windows.tolist() == [2]


def test_fusion_weights_probe_and_history_by_their_share():
    probe = torch.tensor([[1.0, 0.0], [2.0, 3.0]])
    history = torch.tensor([[1.0, 4.0], [0.0, 1.0]])
    # per position (P^2 + H^2) / (P + H): [1, 4] and [2, 2.5]; summed over positions
    torch.testing.assert_close(fuse(probe, history), torch.tensor([3.0, 6.5]), atol=1e-5, rtol=0)
    torch.testing.assert_close(fuse(probe, None), torch.tensor([3.0, 3.0]))
    torch.testing.assert_close(fuse(None, history), torch.tensor([1.0, 5.0]))


def test_probe_energy_leaves_pads_out_of_sum_and_count():
    x = torch.tensor([[[1.0], [2.0]], [[3.0], [4.0]]])  # [windows 2, positions 2, channels 1]
    pads = torch.tensor([[False, False], [False, True]])
    got = probe_energy(x, pads)
    torch.testing.assert_close(got, torch.tensor([[10.0 / 2.001], [4.0 / 1.001]]))


def test_unit_scores_by_hand():
    w = torch.tensor([[1.0, 2.0], [-1.0, 0.0], [2.0, 1.0]])  # [out 3, in 2]
    f = torch.tensor([2.0, 1.0])
    torch.testing.assert_close(channel_scores(f, w, "ppsp"), torch.tensor([2 * math.sqrt(18), math.sqrt(17)]))
    f4 = torch.tensor([4.0, 1.0])
    torch.testing.assert_close(channel_scores(f4, w, "wanda_sp"), torch.tensor([8.0, 3.0]))
    torch.testing.assert_close(channel_scores(f4, w, "flap"), torch.tensor([24.0, 5.0]))
    o = torch.tensor([[1.0, 0.0, 2.0, 1.0], [1.0, 1.0, 0.0, 0.0]])  # 2 heads of 2 channels
    # F_j W_ij^2 = [[1, 0, 4, 1], [1, 2, 0, 0]]: head 0 holds 1, 0, 1, 2; head 1 holds 4, 1, 0, 0
    got = head_scores(torch.tensor([1.0, 2.0, 1.0, 1.0]), o, 2, "ppsp")
    torch.testing.assert_close(got, torch.tensor([math.sqrt(6), math.sqrt(17)]))


def test_counts_follow_the_release():
    assert layer_ratio(30, 0.2) == 0.22  # round(30 / 27 * 0.2, 2)
    assert layer_ratio(32, 0.4) == 0.44
    # 0.23 of 1536: 353 pruned leave 1183; the kept count rounds up to 1216 = 19 x 64
    assert kept_count(1536, 0.23, 64) == 1216
    assert kept_count(1536, 0.25, 64) == 1152  # 384 pruned: 1152 is already a multiple
    assert kept_count(48, 0.2, 64) == 48  # never more than there are
    assert kept_count(9, 0.34) == 6


def test_ema_update_by_hand_on_kept_channels_and_non_pad_windows():
    history = torch.ones(3, 3)
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]])  # [2 windows, 2 positions, 2 kept]
    pads = torch.tensor([[False, False], [False, True]])
    ema_update(history, torch.tensor([0, 2]), x, pads, momentum=0.5)
    # position 0: means of x^2 over both windows 13, 20; position 1: window 0 alone, 9, 16
    want = torch.tensor([[7.0, 1.0, 10.5], [5.0, 1.0, 8.5], [1.0, 1.0, 1.0]])
    torch.testing.assert_close(history, want)


def test_history_is_the_mean_of_x_squared_per_position(tiny_tokenizer):
    model = tiny_model("llama")
    layout = layout_of(model, "dynamic")
    windows = torch.randint(3, 300, (3, 8), generator=torch.Generator().manual_seed(0))
    history = calibrate(model, layout, windows, batch_size=2, progress=False)
    seen = []
    down = decoder_layers(model)[1].mlp.down_proj
    handle = down.register_forward_hook(lambda m, args, out: seen.append(args[0][0].detach()))
    with torch.no_grad():
        for w in windows:  # one window at a time
            model(input_ids=w[None])
    handle.remove()
    want = torch.stack(seen).pow(2).mean(0)
    torch.testing.assert_close(history.energy["mlp.1"], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(history.mean["mlp.1"], torch.stack(seen).mean(0), rtol=1e-5, atol=1e-6)
    assert history.energy["attn.0"].shape == (8, head_counts(model.config).query * head_counts(model.config).head_dim)
    assert not torch.allclose(history.energy["mlp.1"][0], history.energy["mlp.1"][5])  # per position


def wrapped(family: str, ratio: float, variant: str = "probe", parts=("mlp", "heads"), **kw):
    """A tiny model of `family` with Probe Pruning attached to every layer (calibrated on random windows), and a
    dense copy on the same attention implementation."""
    model = tiny_model(family)
    dense = copy.deepcopy(model)
    dense.set_attn_implementation("sdpa")
    windows = torch.randint(3, 300, (4, 16), generator=torch.Generator().manual_seed(1))
    history = calibrate(model, layout_of(model, "dynamic"), windows, progress=False)
    settings = ProbeSettings.of(variant, ratio=ratio, parts=tuple(parts), skip_layers=0, multiple=1, **kw)
    state = attach(model, settings, history)
    return model, dense, state


@pytest.mark.parametrize("family", GQA_FAMILIES)
def test_ratio_zero_equals_the_dense_model(family):
    model, dense, _ = wrapped(family, 0.0)
    ids = torch.randint(3, 300, (3, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
        got = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        want = dense.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


def masked_copy(dense, kept: dict[str, torch.Tensor]):
    """The dense model with every unit the wrapped one dropped zeroed where it is consumed (down_proj columns,
    o_proj columns of the query head)."""
    masked = copy.deepcopy(dense)
    hd = head_counts(dense.config).head_dim
    with torch.no_grad():
        for i, layer in enumerate(decoder_layers(masked)):
            down = layer.mlp.down_proj.weight
            drop = torch.ones(down.shape[1], dtype=torch.bool)
            drop[kept[f"mlp.{i}"]] = False
            down[:, drop] = 0
            o = layer.self_attn.o_proj.weight
            drop = torch.ones(o.shape[1] // hd, dtype=torch.bool)
            drop[kept[f"attn.{i}"]] = False
            o[:, drop.repeat_interleave(hd)] = 0
    return masked


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("variant", ["probe", "oracle", "history"])
def test_gathered_forward_equals_the_masked_dense_forward(family, variant):
    model, dense, state = wrapped(family, 0.5, variant)
    ids = torch.randint(3, 300, (4, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[1, 8:] = 0  # right padding
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        assert state.pads is not None and int(state.pads.sum()) == 4
        kept = dict(state.kept)
        assert all(len(k) == 24 for key, k in kept.items() if key.startswith("mlp"))  # half of 48
        assert all(len(k) == 2 for key, k in kept.items() if key.startswith("attn"))  # half of 4 query heads
        want = masked_copy(dense, kept)(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_the_kept_sets_depend_on_the_batch_and_decoding_keeps_the_prefills():
    model, dense, state = wrapped("llama", 0.5, "oracle")
    a = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(4))
    b = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model(a)
        kept_a = {k: v.clone() for k, v in state.kept.items()}
        model(b)
        assert any(not torch.equal(kept_a[k], state.kept[k]) for k in kept_a)
        out = model.generate(a, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert all(torch.equal(kept_a[k], state.kept[k]) for k in kept_a)  # decoding kept the prompt's sets
        # the prompt's masked dense model decodes the same tokens with its cache
        masked = masked_copy(dense, kept_a)
        assert torch.equal(out, masked.generate(a, max_new_tokens=4, do_sample=False, pad_token_id=0))


def test_the_ema_moves_the_history_only_after_the_warm_up_batch():
    model, _, state = wrapped("llama", 0.5, "probe")
    wrapper = decoder_layers(model)[1].mlp
    before = wrapper.energy.clone()
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        model(ids)  # batch 0: the release's warm-up, no update
        assert torch.equal(wrapper.energy, before)
        model(ids)
    kept = state.kept["mlp.1"]
    dropped = torch.ones(48, dtype=torch.bool)
    dropped[kept] = False
    assert not torch.equal(wrapper.energy[:12, kept], before[:12, kept])
    assert torch.equal(wrapper.energy[:, dropped], before[:, dropped])
    assert torch.equal(wrapper.energy[12:], before[12:])  # positions past the batch's length stay


def test_a_cache_filled_elsewhere_is_refused():
    model, dense, _ = wrapped("llama", 0.5, "oracle")
    ids = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        cache = dense(ids, use_cache=True).past_key_values
        with pytest.raises(ValueError, match="filled without Probe Pruning"):
            model(ids[:, -1:], cache=cache, use_cache=True)


def test_longer_batches_than_the_history_use_its_mean_row():
    model, _, state = wrapped("llama", 0.5, "probe")
    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(8))  # history: 16 positions
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all() and len(state.kept) == 4


@pytest.fixture(scope="module")
def tiny_deep_dir(tmp_path_factory, tiny_tokenizer):
    """A 5-layer tiny Llama: Probe Pruning never prunes the first three."""
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.num_hidden_layers = 5
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("models") / "tiny-deep"
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def prune_argv(origin, out, *extra):
    return ["--origin_path", str(origin), "--dynamic", "probe", "--pruning_ratio", "0.3", "--calib_dataset", "builtin",
            "--calib_samples", "4", "--seq_len", "32", "--output_dir", str(out), "--no_progress", *extra]  # fmt: skip


def test_prune_writes_a_folder_that_loads_back_the_same_pruning(tiny_deep_dir, tmp_path, capsys):
    import prune

    out = tmp_path / "dyn"
    argv = prune_argv(tiny_deep_dir, out, "--prune_parts", "mlp,heads", "--eval_text", "builtin:heldout",
                      "--eval_windows", "2", "--eval_seq_len", "32")  # fmt: skip
    assert prune.main(argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert str(out) in line and "perplexity" in line
    assert sorted(p.name for p in out.iterdir()) == ["dynamic_config.json", "dynamic_report.json",
                                                      "history.safetensors"]  # fmt: skip
    config = json.loads((out / "dynamic_config.json").read_text())
    assert config["settings"]["ratio"] == 0.3 and config["origin_path"] == str(tiny_deep_dir.resolve())
    model, state, _ = load_dynamic(out, torch.device("cpu"), torch.float32)
    assert state.kept == {} and type(decoder_layers(model)[3].mlp).__name__ == "ProbeMLP"
    assert type(decoder_layers(model)[2].mlp).__name__ != "ProbeMLP"  # layers 0-2 stay dense
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tiny_deep_dir, dtype=torch.float32).eval()
    settings = ProbeSettings(**{**config["settings"], "parts": tuple(config["settings"]["parts"])})
    attach(again, settings, History.load(out / "history.safetensors"))
    ids = torch.randint(3, 300, (4, 20), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, again(ids).logits)
    report = json.loads((out / "dynamic_report.json").read_text())
    assert report["perplexity_after"]["perplexity"] > 0


def test_a_moved_or_changed_origin_is_refused_in_one_line(tiny_deep_dir, tmp_path):
    import prune

    origin = tmp_path / "origin"
    shutil.copytree(tiny_deep_dir, origin)
    out = tmp_path / "dyn"
    assert prune.main(prune_argv(origin, out, "--dynamic_variant", "history")) == 0
    moved = tmp_path / "moved"
    origin.rename(moved)
    with pytest.raises(Exception, match="is not there"):
        load_dynamic(out, torch.device("cpu"), torch.float32)
    load_dynamic(out, torch.device("cpu"), torch.float32, origin=str(moved))  # the override
    config = json.loads((moved / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (moved / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="fingerprint differs"):
        load_dynamic(out, torch.device("cpu"), torch.float32, origin=str(moved))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--pruning_ratio", "1.5"], "--pruning_ratio"),
        (["--pruning_ratio", "0.2,0.3"], "one --pruning_ratio"),
        (["--prune_parts", "layers"], "mlp and/or heads"),
        (["--dynamic_variant", "best"], "--dynamic_variant"),
        (["--dynamic_metric", "l2"], "--dynamic_metric"),
        (["--dynamic_variant", "oracle", "--dynamic_prior", "entropy"], "--dynamic_prior"),
        (["--sparsity", "0.5"], "--dynamic and --sparsity"),
        (["--reconstruct", "ls"], "--reconstruct"),
        (["--pruning_ratio", "0.7"], "removes every unit"),  # 5 layers: 0.7 x 5 / 2 >= 1
    ],
)
def test_bad_dynamic_flags_are_one_line(tiny_deep_dir, tmp_path, capsys, extra, message):
    import prune

    out = tmp_path / "dyn"
    assert prune.main(prune_argv(tiny_deep_dir, out, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert not out.exists()


@pytest.mark.parametrize("fixture, message", [("tiny_gpt2_dir", "gpt2"), ("tiny_llama_dir", "first 3 layers")])
def test_models_probe_pruning_cannot_take_are_one_line(request, tmp_path, capsys, fixture, message):
    import prune

    out = tmp_path / "dyn"
    assert prune.main(prune_argv(request.getfixturevalue(fixture), out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()


def test_evaluate_scores_a_dynamic_folder(tiny_deep_dir, tmp_path, capsys):
    import evaluate
    import prune

    out = tmp_path / "dyn"
    assert prune.main(prune_argv(tiny_deep_dir, out)) == 0
    results = tmp_path / "results"
    argv = ["--model", str(out), "--ppl", "--ppl_seq_len", "32", "--ppl_windows", "4", "--tasks", "arc_easy_local",
            "--limit", "4", "--batch_size", "4", "--data_dir", str(DATA), "--output", str(results), "--no_progress"]
    assert evaluate.main(argv) == 0
    got = json.loads((results / "results.json").read_text())
    assert got["perplexity"]["windows"] == 4 and "arc_easy_local" in got["results"]
    assert got["dynamic"]["settings"]["ratio"] == 0.3
    assert evaluate.main(["--model", str(out), "--tasks", "no_such_task", "--data_dir", str(DATA)]) == 2
    assert "no_such_task" in capsys.readouterr().err


def test_eval_sh_sends_dynamic_folders_to_evaluate_py(tiny_deep_dir, tmp_path):
    import subprocess

    import prune

    out = tmp_path / "dyn"
    assert prune.main(prune_argv(tiny_deep_dir, out)) == 0
    run = subprocess.run(["bash", str(ROOT / "script" / "eval.sh"), "--dry_run", "--local", "--data_dir", str(DATA),
                          "--ppl", str(out)], capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "evaluate.py --model" in run.stdout and "lm_eval --model" not in run.stdout


def test_the_probe_studys_pruned_model_is_the_static_wrapper_cut_out_and_ls_refits_it():
    from bench.studies.probe import pruned_model

    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    dense.set_attn_implementation("sdpa")
    windows = torch.randint(3, 300, (16, 16), generator=torch.Generator().manual_seed(1))
    history = calibrate(model, layout_of(model, "dynamic"), windows[:4], progress=False)
    settings = ProbeSettings.of("history", ratio=0.25, skip_layers=1, multiple=1)  # 2 layers: the second half
    wrapped_model = copy.deepcopy(dense)
    attach(wrapped_model, settings, history)
    ids = torch.randint(3, 300, (3, 12), generator=torch.Generator().manual_seed(2))

    sliced, report = pruned_model(dense, settings, history, None, None)
    refit, refit_report = pruned_model(dense, settings, history, None, windows)

    widths = [layer.mlp.down_proj.in_features for layer in decoder_layers(sliced)]
    assert report is None and widths[0] == 48 and set(widths[1:]) == {24}  # layer 0 whole, the others half
    with torch.no_grad():
        torch.testing.assert_close(sliced(ids).logits, wrapped_model(ids).logits, rtol=1e-5, atol=1e-5)
        want = dense(windows).logits
        error = {name: (m(windows).logits - want).pow(2).mean().item() for name, m in (("sliced", sliced),
                                                                                      ("refit", refit))}
    assert refit_report["consumers_refit"] > 0 and error["refit"] < error["sliced"]


def test_the_probe_studys_random_windows_are_slices_of_the_test_stream_drawn_per_seed(tiny_tokenizer):
    from bench.studies.probe import ProbeStudyConfig, evaluation_windows
    from utils.perplexity import local_rows, text_windows

    cfg = ProbeStudyConfig(data_dir=str(DATA), eval_windows="random", ppl_windows=3, ppl_seq_len=32)
    stream = text_windows(tiny_tokenizer, local_rows("wikitext2", str(DATA)), 1).flatten().tolist()
    text = " ".join(map(str, stream))

    first, again, other = (evaluation_windows(cfg, tiny_tokenizer, s) for s in (0, 0, 1))

    assert first.shape == (3, 32) and torch.equal(first, again) and not torch.equal(first, other)
    assert all(" ".join(map(str, w.tolist())) in text for w in first)
    consecutive = evaluation_windows(ProbeStudyConfig(data_dir=str(DATA), ppl_windows=2, ppl_seq_len=32),
                                     tiny_tokenizer, 5)  # fmt: skip
    assert consecutive.flatten().tolist() == stream[:64]


def test_the_probe_study_runs_end_to_end_and_resumes(tmp_path, tiny_tokenizer, capsys):
    from transformers import AutoModelForCausalLM

    from bench.studies import probe as study

    config = tiny_config("llama")
    config.num_hidden_layers, config.intermediate_size, config.max_position_embeddings = 5, 256, 4096
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    path = tmp_path / "tiny-wide"
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    out = tmp_path / "docs" / "PROBE.md"
    argv = ["--model", str(path), "--data_dir", str(DATA), "--out", str(out), "--work_dir", str(tmp_path / "work"),
            "--seeds", "0,1", "--eval_windows", "random", "--ratios", "0.2", "--batch_sizes", "2", "--ppl_windows", "2",
            "--ppl_seq_len", "16", "--calib_windows", "2", "--calib_seq_len", "16", "--refit_windows", "4",
            "--prior_windows", "2", "--prior_seq_len", "16", "--arms", "pp,static_entropy,sliced_entropy,ls_entropy",
            "--zero_shot_items", "2", "--zero_shot_arms", "pp", "--zero_shot_batch", "2", "--tasks", "arc_easy_local",
            "--prefill_repeats", "1", "--published", ""]  # fmt: skip

    assert study.main(argv) == 0

    rows = {r["name"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    # per seed: dense, 4 arms, zero-shot dense and PP; the first seed: prefill of dense, PP, static PPsp, pruned
    assert len(rows) == 2 * (1 + 4 + 2) + 4
    for seed in (0, 1):
        wrapped_row, cut = (rows[f"static entropy{cut}|0.2|b2|s{seed}"] for cut in ("", ", pruned model"))
        assert cut["ppl"] == pytest.approx(wrapped_row["ppl"], rel=1e-4) and cut["params"] < wrapped_row["params"]
        assert rows[f"static entropy + ls, pruned model|0.2|b2|s{seed}"]["refit_seconds"] > 0
        assert set(rows[f"zero-shot 2|PP (probe + history)|0.2|b2|s{seed}"]["tasks"]) == {"arc_easy"}
    assert rows["dense|b2|s0"]["ppl"] != rows["dense|b2|s1"]["ppl"]  # each seed draws its own windows
    assert all(rows[f"prefill x1|{w}|b2|s0"]["median_seconds"] > 0 for w in ("dense", "PP (probe + history)|0.2"))
    md = out.read_text()
    assert "## CPU prefill of one batch" in md and "## Zero-shot (2 items per task" in md and " ± " in md

    capsys.readouterr()
    assert study.main([*argv, "--resume"]) == 0  # everything reused: nothing measured again
    assert "|s0:" not in capsys.readouterr().out
