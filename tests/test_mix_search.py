"""The mix search: every candidate reaches the size and loads, masking a candidate computes exactly what the
sliced model computes (so its KL is the sliced model's), prune.py saves the best and `--mix` reproduces any
leaderboard entry."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, tiny_config, tiny_model
from test_structures import STRUCTURE_FAMILIES, run_prune
from transformers import AutoModelForCausalLM

from dataset.calibration import draw_windows, heldout_windows
from module.model.layout import layout_of
from module.model.mlp import count_parameters, find_mlps
from module.prune.masks import CandidateMasks, candidate_kl
from module.prune.mix import Mix, MixSpace, first_units_scores, mix_kept, sliced_copy
from module.prune.plan import StructureSizes

ALL = ["mlp", "heads", "layers", "hidden"]


def random_scores(model, seed=1):
    """Neuron and structure scores in random order (the kept units differ from the first ones)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.rand(n, generator=gen, dtype=torch.float64)  # noqa: E731
    n = model.config.num_hidden_layers
    neurons = [rand(find_mlps(model).neurons) for _ in range(n)]
    structure = {k: rand(len(v)) for k, v in first_units_scores(model).items()}
    return neurons, structure


def four_layer_model(family: str):
    """A tiny model with 4 layers, so that a fifth of its parameters can come from several structures."""
    cfg = tiny_config(family)
    cfg.num_hidden_layers = 4
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = ["full_attention"] * 4
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def reference_kl(dense, pruned, ids) -> float:
    """Mean per-token KL(dense || pruned) from the two models' full logits."""
    with torch.no_grad():
        p, q = dense(ids).logits.log_softmax(-1), pruned(ids).logits.log_softmax(-1)
    return float(F.kl_div(q, p, log_target=True, reduction="sum") / ids.numel())


def test_mix_description_round_trips_and_bad_text_is_refused():
    mixes = [
        Mix(1152),
        Mix(None, StructureSizes(layers_remove=2)),
        Mix(40, StructureSizes(heads_keep=6, head_mode="query", layers_remove=1, hidden_keep=512)),
    ]
    for mix in mixes:
        assert Mix.parse(mix.describe()) == mix
    assert (
        Mix(40, StructureSizes(heads_keep=6, layers_remove=1)).describe() == "mlp_keep=40,heads_keep=6,layers_remove=1"
    )
    for bad, message in [("mlp_keep=0", "positive integer"), ("heads=6", "distinct KEY"), ("", "distinct KEY"),
                         ("layers_remove=1,layers_remove=2", "distinct KEY"), ("head_mode=query", "prunes nothing"),
                         ("heads_keep=2,head_mode=rows", "is not one of")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            Mix.parse(bad)


@pytest.mark.parametrize("family", STRUCTURE_FAMILIES)
def test_candidates_reach_the_ratio_and_load(family, tmp_path):
    dense = four_layer_model(family)
    before = count_parameters(dense)
    per_neuron = sum(layer.params_per_neuron() for layer in find_mlps(dense).layers)
    ratio = 0.3
    cands = MixSpace(dense, ALL, ratio).grid(steps=3, max_candidates=64)
    assert len({c.description for c in cands}) == len(cands) > 3
    assert any(len(c.mix.parts) >= 3 for c in cands)  # mixes, not just single structures
    for cand in cands:
        # the MLP fills the rest: at most half a neuron (in every layer) from the target
        assert abs(cand.achieved_ratio - ratio) <= per_neuron / 2 / before + 1e-12, cand.description
        pruned = sliced_copy(dense, cand.mix, *mix_kept(dense, cand.mix, *random_scores(dense)))
        pruned.save_pretrained(tmp_path / cand.description)
        again = AutoModelForCausalLM.from_pretrained(tmp_path / cand.description)  # the loadability rules hold
        assert count_parameters(again) == cand.params == before - sum(cand.removed.values())
    without_mlp = MixSpace(dense, ["heads", "layers", "hidden"], 0.2, tolerance=0.02).grid(steps=4, max_candidates=64)
    assert without_mlp and all(abs(c.achieved_ratio - 0.2) <= 0.02 and "mlp" not in c.mix.parts for c in without_mlp)


@pytest.mark.parametrize("family", STRUCTURE_FAMILIES)
def test_masked_candidate_equals_the_sliced_model(family):
    dense = tiny_model(family)
    mix = Mix(40, StructureSizes(heads_keep=2, layers_remove=1, hidden_keep=28))
    mlp_keep, kept = mix_kept(dense, mix, *random_scores(dense))
    sliced = sliced_copy(dense, mix, mlp_keep, kept)
    ids = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(2))
    masks = CandidateMasks(dense, find_mlps(dense), layout_of(dense, "heads"))
    masks.set(mlp_keep, kept)
    with torch.no_grad():
        masked_logits, sliced_logits = dense(ids).logits, sliced(ids).logits
    torch.testing.assert_close(masked_logits, sliced_logits, rtol=1e-5, atol=1e-5)
    masks.clear()  # the dense model again
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, copy.deepcopy(dense)(ids).logits)
    expected = reference_kl(dense, sliced, ids)
    assert expected > 1e-3
    for keep_bytes in (0, 1 << 30):  # dense log-probabilities recomputed per chunk, or kept per batch
        kl = candidate_kl(dense, masks, [(mlp_keep, kept), (None, {})], ids, batch_size=2, chunk_tokens=7,
                          progress=False, keep_bytes=keep_bytes)  # fmt: skip
        assert kl[0] == pytest.approx(expected, rel=1e-4) and kl[1] == pytest.approx(0, abs=1e-6)
    masks.close()


class CountingTokenizer:
    """Document "i ..." tokenizes to 40 copies of i: a window names its document."""

    def __call__(self, batch, add_special_tokens=True):
        return {"input_ids": [[int(doc.split()[0])] * (40 if int(doc.split()[0]) % 3 else 10) for doc in batch]}


def test_heldout_windows_come_from_other_documents():
    docs = [f"{i} text" for i in range(60)]
    windows, used = draw_windows(docs, CountingTokenizer(), 8, 16, seed=3)
    assert set(windows[:, 0].tolist()) == used and len(used) == 8
    heldout = heldout_windows(docs, CountingTokenizer(), used, 12, 16, seed=3)
    assert len(heldout) == 12 and not set(heldout[:, 0].tolist()) & used
    assert all(i % 3 for i in heldout[:, 0].tolist())  # only documents longer than the window
    with pytest.raises(Exception, match="too few documents"):
        heldout_windows(docs, CountingTokenizer(), used, 40, 16, seed=3)


def test_prune_py_auto_saves_the_best_and_mix_reproduces_an_entry(tmp_path, tiny_llama_dir, tiny_tokenizer):
    from safetensors.torch import load_file

    from dataset.calibration import builtin_documents

    search = ["--prune_parts", "auto", "--search_windows", "4", "--search_steps", "3"]
    assert run_prune(tmp_path, tiny_llama_dir, *search, "--pruning_ratio", "0.3") == 0
    report = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    board = report["search"]["leaderboard"]
    assert len(board) >= 3 and [r["kl"] for r in board] == sorted(r["kl"] for r in board)
    assert report["search"]["chosen"] == board[0]["mix"] == report["mix"]
    assert (tmp_path / "out" / "mix_search.png").exists()
    chosen = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert count_parameters(chosen) == board[0]["params"] == report["params_after"]
    # the saved model's KL on the same held-out windows is the leaderboard's (computed there by masking)
    docs = builtin_documents()
    _, used = draw_windows(docs, tiny_tokenizer, 6, 24, 42)
    heldout = heldout_windows(docs, tiny_tokenizer, used, 4, 24, 42)
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    assert reference_kl(dense, chosen, heldout) == pytest.approx(board[0]["kl"], rel=1e-4)

    other = board[len(board) // 2]
    assert run_prune(tmp_path, tiny_llama_dir, "--prune_parts", "auto", "--search_windows", "4", "--mix",
                     other["mix"], out="other") == 0  # fmt: skip
    again = json.loads((tmp_path / "other" / "prune_report.json").read_text())
    assert again["cache_hit"] and again["search"]["leaderboard"][0]["mix"] == other["mix"]
    assert again["params_after"] == other["params"]
    assert again["search"]["leaderboard"][0]["kl"] == pytest.approx(other["kl"], rel=1e-9)
    assert run_prune(tmp_path, tiny_llama_dir, "--prune_parts", "auto", "--search_windows", "4", "--mix",
                     board[0]["mix"], out="best") == 0  # fmt: skip
    first, second = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("out", "best"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prune_parts", "auto"], "searches a mix for --pruning_ratio"),
        (["--prune_parts", "auto", "--pruning_ratio", "0.2", "--heads_keep", "2"], "drop --heads_keep"),
        (["--prune_parts", "auto", "--mlp_ratio", "1.0"], "searches a mix for --pruning_ratio"),
        (["--mix", "mlp_keep=40", "--pruning_ratio", "0.2"], "--mix gives every size"),
        (["--mix", "heads_keep=2"], "which --prune_parts mlp leaves out"),
        (["--prune_parts", "auto", "--mix", "heads_keep=3"], "--heads_keep 3 cannot be reached"),
        (["--prune_parts", "auto", "--mix", "mlp_keep=48"], "mlp_keep 48 must be in 1..47"),
        (["--prune_parts", "heads,layers", "--pruning_ratio", "0.9"], "no loadable mix of heads, layers removes 0.9"),
        (["--prune_parts", "auto", "--pruning_ratio", "0.2", "--search_windows", "0"], "--search_windows must be >= 1"),
        (["--prune_parts", "auto", "--pruning_ratio", "0.2", "--criterion", "wanda_sp"], "does not score"),
    ],
)
def test_search_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_llama_dir, capsys, args, message):
    assert run_prune(tmp_path, tiny_llama_dir, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if line.startswith("error")] == err[-1:] and message in err[-1], err[-1:]
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_auto_on_a_family_with_only_mlp_is_one_line(tmp_path, tiny_gpt2_dir, capsys):
    assert run_prune(tmp_path, tiny_gpt2_dir, "--prune_parts", "auto", "--pruning_ratio", "0.1") == 2
    assert "supports only mlp here" in capsys.readouterr().err


def test_hill_climb_reaches_a_better_mix_off_the_grid():
    """With a score that falls towards one point off the grid, the climb from the grid's best ends there;
    without refinement the leaderboard is the grid."""
    import itertools

    from module.prune.mix import search

    space = MixSpace(four_layer_model("qwen2"), ALL, 0.3)
    grid = {c.description for c in space.grid(steps=2, max_candidates=64)}
    axes = [range(-1, len(space.options[p])) for p in space.others]
    off_grid = [(p, c) for p in itertools.product(*axes) if (c := space.candidate(p)) and c.description not in grid]
    goal, goal_cand = off_grid[len(off_grid) // 2]

    def score(cands):
        return [sum(abs(a - b) for a, b in zip(space.points[c.description], goal)) + 0.5 for c in cands]

    board = search(space, score, steps=2, max_candidates=64, refine_rounds=20)
    assert board[0].description == goal_cand.description and board[0].kl == 0.5
    assert {c.description for c in search(space, score, steps=2, refine_rounds=0)} == grid


def test_mix_study_runs_on_a_tiny_model(tmp_path, tiny_long_llama_dir):
    from bench.studies import mix_search

    peers = tmp_path / "peers.json"
    ran = {"name": "peer A", "ran": True, "removed": 0.3, "ppl": 9.0, "loads": "no", "how": "by hand"}
    peers.write_text(json.dumps({"peers": [ran, {"name": "peer B", "ran": False, "why": "hangs"}]}))
    out = tmp_path / "MIX.md"
    argv = ["--model", str(tiny_long_llama_dir), "--ratios", "0.3", "--seeds", "0,1", "--calib_samples", "4",
            "--seq_len", "32", "--search_windows", "2", "--ppl_windows", "2", "--ppl_seq_len", "64", "--out", str(out),
            "--work", str(tmp_path / "work"), "--peers", str(peers), "--speed_repeats", "1"]  # fmt: skip
    assert mix_search.main(argv) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    rows = {(r["seed"], r["row"]): r for r in result["rows"]}
    assert {name for _, name in rows} >= {"chosen mix", "MLP only", "layers only", "hidden only"}
    for seed in (0, 1):
        board = result["leaderboards"][f"0.3/{seed}"]
        assert rows[(seed, "chosen mix")]["mix"] == board[0]["mix"]
        assert rows[(seed, "chosen mix")]["kl"] == pytest.approx(board[0]["kl"], rel=1e-9)
        assert rows[(seed, "chosen mix")]["kl"] <= rows[(seed, "MLP only")]["kl"]
    for row in rows.values():  # one speed per mix: it depends on the shapes only
        same = [r for r in rows.values() if r["mix"] == row["mix"]]
        assert row["prefill_speedup"] > 0 and all(r["decode_speedup"] == row["decode_speedup"] for r in same)
    assert mix_search.main([*argv, "--speed_only"]) == 0  # measured again from the report alone
    again = json.loads(out.with_suffix(".json").read_text())
    assert [r["kl"] for r in again["rows"]] == [r["kl"] for r in result["rows"]]
    text = out.read_text()
    assert "Chosen mix vs MLP-only" in text and "| peer A | 30.0% | 9.0 | no |" in text and "hangs" in text
    assert not (tmp_path / "work").exists()
