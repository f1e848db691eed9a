"""Heads, layers and hidden channels: slicing equals masking the removed units in the unpruned model, the
saved folder reloads with plain from_pretrained and generates with a KV cache, and every loadability rule
refuses with one line."""

import copy
import math

import pytest
import torch
from conftest import VOCAB, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

from module.model.layout import (
    StructureError,
    attention_modules,
    check_heads_keep,
    check_hidden_keep,
    head_counts,
    layout_of,
    valid_head_counts,
)
from module.model.mlp import decoder_layers
from module.model.slicing import prune_heads, prune_hidden, prune_layers

STRUCTURE_FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]
IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def reloads_and_generates(model, tmp_path) -> None:
    """Saved and reloaded with plain transformers: same logits; greedy decoding with a KV cache equals
    decoding without one (a layer index left unrenumbered would mix up the cache)."""
    model.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    torch.testing.assert_close(logits(again), logits(model), rtol=1e-5, atol=1e-5)
    prompt = IDS[:1, :5]
    cached = again.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = again.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def remove_query_heads_by_masking(model, layout, dropped_per_layer):
    h = head_counts(model.config)
    for layer, dropped in zip(decoder_layers(model), dropped_per_layer):
        *_, o_proj = attention_modules(layer, layout)
        for head in dropped:
            o_proj.weight.data[:, head * h.head_dim : (head + 1) * h.head_dim] = 0


@pytest.mark.parametrize("family", STRUCTURE_FAMILIES)
@pytest.mark.parametrize("mode", ["kv_group", "query"])
def test_head_slicing_equals_masking_and_reloads(family, mode, tmp_path):
    dense = tiny_model(family)
    layout = layout_of(dense, "heads")
    h = head_counts(dense.config)  # 4 query heads in 2 groups of 2
    if mode == "kv_group":  # layer 0 keeps group 1, layer 1 group 0
        keep_kv = [torch.tensor([1]), torch.tensor([0])]
        keep_q = [torch.tensor([2, 3]), torch.tensor([0, 1])]
    else:  # one query head of each group, a different one per layer
        keep_kv = [torch.tensor([0, 1])] * 2
        keep_q = [torch.tensor([1, 2]), torch.tensor([0, 3])]
    masked = copy.deepcopy(dense)
    remove_query_heads_by_masking(masked, layout, [sorted(set(range(h.query)) - set(q.tolist())) for q in keep_q])
    prune_heads(dense, layout, keep_q, keep_kv)
    assert dense.config.num_attention_heads == 2 and dense.config.head_dim == h.head_dim
    assert dense.config.num_key_value_heads == (1 if mode == "kv_group" else 2)
    torch.testing.assert_close(logits(dense), logits(masked), rtol=1e-5, atol=1e-5)
    reloads_and_generates(dense, tmp_path)


@pytest.mark.parametrize("family", STRUCTURE_FAMILIES)
def test_layer_removal_equals_skipping_and_reloads(family, tmp_path):
    cfg = tiny_config(family)
    cfg.num_hidden_layers = 4
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = ["full_attention"] * 4
    if family == "qwen2":  # a sliding-window layer list that must be renumbered with the layers
        cfg.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
        cfg.use_sliding_window, cfg.sliding_window = True, 4
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0, 0.2)
    skipped = copy.deepcopy(dense)
    for i in (1, 2):  # an identity in place of the removed layers
        decoder_layers(skipped)[i].register_forward_hook(lambda m, args, kwargs, out: kwargs.get("hidden_states",
                                                         args[0] if args else None), with_kwargs=True)  # fmt: skip
    prune_layers(dense, torch.tensor([0, 3]))
    assert dense.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in decoder_layers(dense)] == [0, 1]
    if family == "qwen2":
        assert dense.config.layer_types == ["full_attention", "sliding_attention"]
    torch.testing.assert_close(logits(dense), logits(skipped), rtol=1e-5, atol=1e-5)
    reloads_and_generates(dense, tmp_path)


def remove_hidden_by_masking(model, layout, dropped: torch.Tensor, kept: int) -> None:
    """Zero the dropped channels of every write into the residual stream and let each RMSNorm average over
    the kept channels only: weight * sqrt(d'/d) and eps * d'/d give exactly x_kept / rms_kept * weight."""
    d = model.config.hidden_size
    scale = kept / d
    from module.model.layout import hidden_slices

    for module, how in hidden_slices(model, layout):
        if how == "embed":
            module.weight.data[:, dropped] = 0
        elif how == "out":
            module.weight.data[dropped, :] = 0
            if module.bias is not None:
                module.bias.data[dropped] = 0
        elif how == "norm":
            module.weight.data *= math.sqrt(scale)
            module.variance_epsilon *= scale


@pytest.mark.parametrize("family", STRUCTURE_FAMILIES)
def test_hidden_slicing_equals_masking_and_reloads(family, tmp_path):
    dense = tiny_model(family)
    layout = layout_of(dense, "hidden")
    keep = torch.tensor(sorted(set(range(32)) - {3, 7, 11, 30}))  # 28 channels: divisible by Llama's 4 heads
    check_hidden_keep(dense.config, len(keep), layout)
    masked = copy.deepcopy(dense)
    remove_hidden_by_masking(masked, layout, torch.tensor([3, 7, 11, 30]), len(keep))
    prune_hidden(dense, layout, keep)
    assert dense.config.hidden_size == 28 and dense.config.head_dim == 8
    torch.testing.assert_close(logits(dense), logits(masked), rtol=1e-5, atol=1e-5)
    reloads_and_generates(dense, tmp_path)


def test_loadability_rules_name_the_valid_sizes():
    import transformers as tf

    llama2_7b = tf.LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32)
    llama = layout_of(tiny_model("llama"), "heads")
    # Llama refuses hidden_size % heads != 0: of 32 MHA heads only the divisors of 4096 load
    assert valid_head_counts(llama2_7b, "kv_group", True) == [32, 16, 8, 4, 2, 1]
    with pytest.raises(StructureError, match="valid: 16, 8, 4, 2, 1$"):  # keeping all 32 prunes nothing
        check_heads_keep(llama2_7b, 24, "kv_group", llama)
    with pytest.raises(StructureError, match="keeping all 32 prunes nothing"):
        check_heads_keep(llama2_7b, 32, "kv_group", llama)
    qwen = tf.Qwen2Config(hidden_size=896, num_attention_heads=14, num_key_value_heads=2)
    assert valid_head_counts(qwen, "kv_group", False) == [14, 7]
    assert valid_head_counts(qwen, "query", False) == [14, 12, 10, 8, 6, 4, 2]
    smollm2 = tf.LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3)
    assert valid_head_counts(smollm2, "kv_group", True) == [9, 6, 3]  # 576 is divisible by 9, 6 and 3
    assert valid_head_counts(smollm2, "query", True) == [9, 6, 3]
    with pytest.raises(StructureError, match="nearest valid: 567$"):
        check_hidden_keep(smollm2, 570, llama)


@pytest.mark.parametrize("family", ["gpt2", "phi3", "opt", "gemma2"])
def test_unsupported_family_structure_pairs_are_one_line(family):
    model = tiny_model(family)
    for structure in ("heads", "layers", "hidden"):
        with pytest.raises(StructureError, match=f"--prune_parts {structure} is not supported for"):
            layout_of(model, structure)


def gate_gradients(model, layout, windows):
    """An independent computation: per-token gates (ones, requiring grad) multiply each structure's output;
    full-vocabulary autograd of the summed window-mean entropy; |dL/dm| summed over tokens."""
    b, t = windows.shape
    h = head_counts(model.config)
    layers = decoder_layers(model)
    m_head = torch.ones(len(layers), b, t, h.query, 1, requires_grad=True)
    m_group = torch.ones(len(layers), b, t, h.kv, 1, 1, requires_grad=True)
    m_layer = torch.ones(len(layers), b, t, 1, requires_grad=True)
    m_hidden = torch.ones(b, t, model.config.hidden_size, requires_grad=True)
    handles = [model.get_input_embeddings().register_forward_hook(lambda m, a, out: out * m_hidden)]
    for i, layer in enumerate(layers):
        *_, o_proj = attention_modules(layer, layout)
        down = layer.mlp.down_proj

        def gate_heads(m, args, i=i):
            a = args[0].view(b, t, h.query, h.head_dim) * m_head[i]
            a = a.view(b, t, h.kv, h.group, h.head_dim) * m_group[i]
            return (a.view(b, t, -1),)

        handles.append(o_proj.register_forward_pre_hook(gate_heads))
        for mod in (o_proj, down):
            handles.append(mod.register_forward_hook(lambda m, a, out, i=i: out * m_layer[i] * m_hidden))
    logp = torch.log_softmax(model(windows).logits.double(), -1)
    loss = (-(logp.exp() * logp).sum(-1)).mean(-1).sum()  # sum over windows of each window's token mean
    loss.backward()
    for handle in handles:
        handle.remove()
    score = lambda g, dims: g.double().abs().sum(dim=dims)  # noqa: E731
    return {
        "head": score(m_head.grad.squeeze(-1), (1, 2)),
        "group": score(m_group.grad.squeeze(-1).squeeze(-1), (1, 2)),
        "layer": score(m_layer.grad.squeeze(-1), (1, 2)),
        "hidden": score(m_hidden.grad, (0, 1)),
    }


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_taylor_scores_equal_an_independent_gate_gradient(family):
    from module.model.mlp import find_mlps
    from module.prune.importance import collect_statistics
    from module.prune.taps import StructureTaps

    model = tiny_model(family).double()
    layout = layout_of(model, "heads")
    windows = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(1))
    expected = gate_gradients(model, layout, windows)
    taps = StructureTaps(model, layout, taylor=True, activations=True)
    collect_statistics(model, find_mlps(model), windows, "entropy", batch_size=2, progress=False, taps=(taps,))
    got = taps.stats
    for name, ours in (("head", got.head_taylor), ("group", got.group_taylor)):
        torch.testing.assert_close(torch.stack(ours), expected[name], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(got.layer_taylor, expected["layer"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(got.hidden_taylor, expected["hidden"], rtol=1e-6, atol=1e-9)
    assert got.tokens == 30 and float(got.layer_cosine.abs().sum()) > 0


CALIB = ["--calib_dataset", "builtin", "--calib_samples", "6", "--seq_len", "24", "--batch_size", "3", "--no_progress"]
SINGLE = {"heads": ["--heads_keep", "2"], "layers": ["--layers_remove", "1"], "hidden": ["--hidden_keep", "28"]}


def run_prune(tmp_path, origin, *args, out="out"):
    import prune

    return prune.main(["--origin_path", str(origin), "--output_dir", str(tmp_path / out), "--importance_cache",
                       str(tmp_path / "cache"), *CALIB, *args])  # fmt: skip


@pytest.mark.parametrize("structure", ["heads", "layers", "hidden"])
def test_prune_py_each_structure_with_every_criterion_loads_and_generates(tmp_path, tiny_llama_dir, structure):
    import json

    from module.prune.criteria import STRUCTURE_CRITERIA

    for criterion in STRUCTURE_CRITERIA[structure]:
        out = f"out-{criterion}"
        assert run_prune(tmp_path, tiny_llama_dir, "--prune_parts", structure, *SINGLE[structure], "--criterion",
                         criterion, out=out) == 0, criterion  # fmt: skip
        report = json.loads((tmp_path / out / "prune_report.json").read_text())
        assert report["parts"] == [structure] and set(report["params_removed_per_structure"]) == {structure}
        assert report["params_after"] == report["params_before"] - report["params_removed_per_structure"][structure]
        model = AutoModelForCausalLM.from_pretrained(tmp_path / out).eval()
        assert sum(p.numel() for p in model.parameters()) == report["params_after"]
        cached = model.generate(IDS[:1, :4], max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
        assert torch.equal(cached, model.generate(IDS[:1, :4], max_new_tokens=4, do_sample=False, use_cache=False,
                                                  pad_token_id=0))  # fmt: skip
    config = model.config
    expected = {"heads": ("num_attention_heads", 2), "layers": ("num_hidden_layers", 1), "hidden": ("hidden_size", 28)}
    assert getattr(config, expected[structure][0]) == expected[structure][1]


def test_mlp_scores_and_output_unchanged_by_pruning_other_structures_too(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file

    assert run_prune(tmp_path, tiny_llama_dir, "--pruning_ratio", "0.05", out="default") == 0
    assert run_prune(tmp_path, tiny_llama_dir, "--pruning_ratio", "0.05", "--prune_parts", "mlp", out="explicit") == 0
    for name in ("model.safetensors", "kept_neurons.safetensors", "config.json"):
        assert (tmp_path / "default" / name).read_bytes() == (tmp_path / "explicit" / name).read_bytes(), name
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the same cache key as before --prune_parts existed
    assert run_prune(tmp_path, tiny_llama_dir, "--pruning_ratio", "0.05", "--prune_parts", "mlp,heads",
                     "--heads_keep", "2", out="mixed") == 0  # fmt: skip
    a = load_file(str(tmp_path / "default" / "kept_neurons.safetensors"))
    b = load_file(str(tmp_path / "mixed" / "kept_neurons.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the graph starting at the embeddings changes no neuron score


def test_structure_criteria_score_a_structure_as_a_run_of_that_criterion_does(tmp_path, tiny_llama_dir):
    """--structure_criteria layers=block_influence: the layer scores of `--criterion block_influence`, the MLP's of
    --criterion (also a data-free one, whose pass then runs for the layers alone), under a cache key of their own."""
    import json

    from utils.io import load_importance

    layers = ["--prune_parts", "mlp,layers", "--pruning_ratio", "0.05", "--layers_remove", "1"]
    assert run_prune(tmp_path, tiny_llama_dir, *layers, "--structure_criteria", "layers=block_influence") == 0
    assert run_prune(tmp_path, tiny_llama_dir, *layers, "--structure_criteria", "layers=block_influence",
                     "--criterion", "magnitude", out="magnitude") == 0  # fmt: skip
    assert run_prune(tmp_path, tiny_llama_dir, "--prune_parts", "layers", "--layers_remove", "1", "--criterion",
                     "block_influence", out="alone") == 0  # fmt: skip
    assert run_prune(tmp_path, tiny_llama_dir, *layers, out="entropy") == 0
    entries = {}
    for entry in (tmp_path / "cache").iterdir():
        scores, meta, extra = load_importance(entry)
        entries[(entry.name.split("-")[0], "structure_criteria" in meta["key_fields"])] = (scores, extra)
    assert len(entries) == 4
    mixed, alone = entries[("entropy", True)], entries[("block_influence", False)]
    assert torch.equal(mixed[1]["layers"], alone[1]["layers"])
    assert torch.equal(entries[("magnitude", True)][1]["layers"], alone[1]["layers"])
    assert all(torch.equal(a, b) for a, b in zip(mixed[0], entries[("entropy", False)][0]))
    assert not torch.equal(mixed[1]["layers"], entries[("entropy", False)][1]["layers"])
    report = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    alone_report = json.loads((tmp_path / "alone" / "prune_report.json").read_text())
    assert report["kept"]["layers"] == alone_report["kept"]["layers"]
    assert report["structure_criteria"]["layers"] == "block_influence"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prune_parts", "heads", "--heads_keep", "3"], "valid: 2"),
        (["--prune_parts", "heads", "--heads_keep", "3", "--head_mode", "query"], "valid: 2"),
        (["--prune_parts", "heads", "--heads_keep", "4"], "keeping all 4 prunes nothing"),
        (["--prune_parts", "hidden", "--hidden_keep", "30"], "nearest valid: 28"),
        (["--prune_parts", "heads,hidden", "--heads_keep", "2", "--hidden_keep", "27"], "its 2 attention heads"),
        (["--prune_parts", "layers", "--layers_remove", "2"], "must be in 1..1"),
        (["--prune_parts", "heads"], "goes with --heads_keep N > 0"),
        (["--prune_parts", "mlp,heads", "--heads_keep", "2"], "exactly one of"),
        (["--prune_parts", "heads", "--heads_keep", "2", "--pruning_ratio", "0.1"], "add mlp to --prune_parts"),
        (["--prune_parts", "mlp,mlp", "--pruning_ratio", "0.1"], "distinct"),
        (["--prune_parts", "neurons", "--pruning_ratio", "0.1"], "comma list of distinct"),
        (["--prune_parts", "layers", "--layers_remove", "1", "--criterion", "wanda_sp"], "does not score layers"),
        (["--pruning_ratio", "0.1", "--criterion", "block_influence"], "does not score MLP neurons"),
        (["--prune_parts", "mlp,layers", "--pruning_ratio", "0.1,0.2", "--layers_remove", "1"], "several sizes"),
        (["--prune_parts", "heads", "--heads_keep", "2", "--head_mode", "groups"], "is not one of kv_group, query"),
        (["--prune_parts", "mlp,layers", "--pruning_ratio", "0.1", "--layers_remove", "1", "--structure_criteria",
          "layers=wanda_sp"], "does not score layers"),
        (["--pruning_ratio", "0.1", "--structure_criteria", "layers=block_influence"], "leaves out"),
        (["--prune_parts", "auto", "--pruning_ratio", "0.1", "--structure_criteria", "layer=block_influence"],
         "STRUCTURE=CRITERION"),
        (["--prune_parts", "mlp,heads", "--pruning_ratio", "0.1", "--heads_keep", "2", "--structure_criteria",
          "heads=ce"], "give --criterion ce"),
        (["--sparsity", "0.5", "--structure_criteria", "layers=block_influence"], "--structure_criteria"),
    ],
)
def test_structure_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_llama_dir, capsys, args, message):
    assert run_prune(tmp_path, tiny_llama_dir, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if line.startswith("error")] == err[-1:] and message in err[-1], err[-1:]
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_unsupported_family_fails_before_loading(tmp_path, tiny_gpt2_dir, capsys):
    assert run_prune(tmp_path, tiny_gpt2_dir, "--prune_parts", "heads", "--heads_keep", "2") == 2
    assert "--prune_parts heads is not supported for gpt2 models" in capsys.readouterr().err


def test_structure_study_runs_on_a_tiny_model(tmp_path, tiny_long_llama_dir):
    import json

    from bench.studies import structures

    peers = tmp_path / "peers.json"
    peers.write_text(json.dumps({"peers": [
        {"name": "peer A", "ran": True, "removed": 0.1, "params": 1, "ppl": 50.0, "ours": {"pruning_ratio": 0.1},
         "how": "by hand"},
        {"name": "peer B", "ran": False, "why": "it hangs"}]}))  # fmt: skip
    out = tmp_path / "STRUCTURES.md"
    argv = ["--model", str(tiny_long_llama_dir), "--calib_samples", "4", "--seq_len", "32", "--ppl_windows", "2",
            "--ppl_seq_len", "64", "--out", str(out), "--peers", str(peers)]  # fmt: skip
    assert structures.main(argv) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    rows = result["rows"]
    assert rows[0]["structure"] == "dense"
    by_structure = {}
    for row in rows[1:]:
        by_structure.setdefault(row["structure"], set()).add(row["criterion"])
        assert row["params"] < rows[0]["params"] and math.isfinite(row["ppl"])
    assert by_structure["layers"] == {"entropy", "ce", "block_influence", "magnitude", "random"}
    assert {"mlp", "heads (kv_group)", "heads (query)", "hidden"} <= set(by_structure)
    text = out.read_text()
    assert "| peer A | 10.0% | 50.0 |" in text and "| peer B | – | did not run |" in text and "it hangs" in text
    assert result["peers"][0]["ours_measured"]["entropy"][0] == pytest.approx(0.1, abs=0.02)


@pytest.mark.parametrize("mode", ["kv_group", "query"])
def test_every_structure_at_once_loads_and_matches_the_report(tmp_path, tiny_llama_dir, mode):
    import json

    from safetensors.torch import load_file

    args = ["--prune_parts", "mlp,heads,layers,hidden", "--pruning_ratio", "0.05", "--heads_keep", "2",
            "--head_mode", mode, "--layers_remove", "1", "--hidden_keep", "28"]  # fmt: skip
    assert run_prune(tmp_path, tiny_llama_dir, *args) == 0
    report = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    assert set(report["params_removed_per_structure"]) == {"mlp", "heads", "hidden", "layers"}
    assert report["params_before"] - sum(report["params_removed_per_structure"].values()) == report["params_after"]
    after = report["config_after"]
    assert (after["num_attention_heads"], after["num_hidden_layers"], after["hidden_size"]) == (2, 1, 28)
    assert after["num_key_value_heads"] == (1 if mode == "kv_group" else 2) and after["head_dim"] == 8
    kept = load_file(str(tmp_path / "out" / "kept_structures.safetensors"))
    assert len(kept["layers"]) == 1 and len(kept["hidden"]) == 28 and len(kept["heads.layer.0"]) == 2
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert sum(p.numel() for p in model.parameters()) == report["params_after"]
    reloads_and_generates(model, tmp_path)


def test_structure_scores_are_cached_and_device_map_gives_the_same_kept_sets(tmp_path, tiny_llama_dir, caplog):
    from safetensors.torch import load_file

    args = ["--prune_parts", "heads,layers,hidden", "--heads_keep", "2", "--layers_remove", "1", "--hidden_keep", "28"]
    assert run_prune(tmp_path, tiny_llama_dir, *args, out="first") == 0
    caplog.clear()
    assert run_prune(tmp_path, tiny_llama_dir, *args, out="cached") == 0
    assert any("reusing cached scores" in r.message for r in caplog.records)
    assert run_prune(tmp_path, tiny_llama_dir, *args, "--device_map", "auto", "--recompute", out="mapped") == 0
    first = load_file(str(tmp_path / "first" / "kept_structures.safetensors"))
    for other in ("cached", "mapped"):
        again = load_file(str(tmp_path / other / "kept_structures.safetensors"))
        assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first), other
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the structure entry has its own key, reused
