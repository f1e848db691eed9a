"""--reconstruct: the refit equals an independent dense least-squares solve (explicit inverse, fp64) for down_proj
and o_proj, layer after layer; nothing removed gives the original weights back; the folded layer map equals the
explicit h + M T path; the saved models reload with plain from_pretrained and give the same logits; a singular
Gram matrix gives no NaN; bad flags are one line. --reconstruct_select obs: each greedy step equals the explicit
search over every removal (a fresh solve per candidate), and it keeps the neurons it reports."""

import copy
import math
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

from module.model.layout import layout_of
from module.model.mlp import decoder_layers, find_mlps
from module.prune.mix import Mix, mix_kept, sliced_copy
from module.prune.plan import StructureSizes
from module.prune.reconstruct import Reconstructor, reconstruct
from module.prune.refit import PairStats, greedy_keep, refit

WINDOWS = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(3))


def scores_for(model, seed=5):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.rand(n, generator=gen, dtype=torch.float64)  # noqa: E731
    n = model.config.num_hidden_layers
    neurons = [rand(find_mlps(model).neurons) for _ in range(n)]
    structure = {f"heads.layer.{i}": rand(model.config.num_attention_heads) for i in range(n)}
    structure |= {f"groups.layer.{i}": rand(model.config.num_key_value_heads) for i in range(n)}
    return neurons, structure | {"layers": rand(n), "hidden": rand(model.config.hidden_size)}


def pruned_pair(mix: Mix, layers: int = 2):
    """A float64 tiny Llama, and its copy sliced to `mix` with random kept sets."""
    config = tiny_config("llama")
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(config, attn_implementation="eager").double().eval()
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0, 0.2)
    mlp_keep, kept = mix_kept(dense, mix, *scores_for(dense))
    return dense, sliced_copy(dense, mix, mlp_keep, kept), mlp_keep, kept


def inputs_of(model, path: str, layer: int, windows=WINDOWS) -> torch.Tensor:
    """The input of the module at `path` in decoder layer `layer` over the windows, [tokens, in]."""
    seen = []
    module = dict(decoder_layers(model)[layer].named_modules())[path]
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(windows, use_cache=False)
    handle.remove()
    return torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])


def explicit_refit(sliced, y, x_p, damp, weight=None):
    """(Y^T D X' + lam W_s)(X'^T D X' + lam I)^-1 with an explicit inverse, fp64; D = diag(weight) (None: I)."""
    d = torch.diag(torch.ones(len(x_p), dtype=x_p.dtype) if weight is None else weight)
    g = x_p.t() @ d @ x_p
    lam = damp * torch.diagonal(g).mean()
    return (y.t() @ d @ x_p + lam * sliced) @ torch.linalg.inv(g + lam * torch.eye(len(g), dtype=g.dtype))


def stream(model, layer: int, where: str) -> torch.Tensor:
    """The residual stream of decoder layer `layer`: its input ("in"), after attention ("mid": the input of
    post_attention_layernorm) or its output ("out"), [tokens, hidden]."""
    seen = []
    block = decoder_layers(model)[layer]
    if where == "mid":
        handle = block.post_attention_layernorm.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    elif where == "in":
        handle = block.register_forward_pre_hook(lambda m, a, kw: seen.append(a[0] if a else kw["hidden_states"]),
                                                 with_kwargs=True)  # fmt: skip
    else:
        handle = block.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(WINDOWS, use_cache=False)
    handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in seen])


@pytest.mark.parametrize("target", ["dense", "own"])
def test_refit_equals_an_independent_least_squares_solve_layer_after_layer(target):
    """Own targets: the unpruned consumer on the pruned stream. Dense targets: a residual writer's output that
    puts the pruned stream back on the dense one right after it (o_proj: after attention; down_proj: the
    layer's output), from the pruned stream as it was when the writer was refit."""
    mix = Mix(30, StructureSizes(heads_keep=2))
    dense, pruned, mlp_keep, kept = pruned_pair(mix)
    plain = copy.deepcopy(pruned)
    layout = layout_of(dense, "heads")
    reconstruct(dense, pruned, mlp_keep, kept, layout, "ls", target, 0.01, WINDOWS, batch_size=2, progress=False,
                weighting="uniform")  # fmt: skip
    hd = dense.config.hidden_size // dense.config.num_attention_heads
    for layer in range(2):
        heads = (kept[f"heads.layer.{layer}"].unsqueeze(1) * hd + torch.arange(hd)).reshape(-1)
        for path, cols in (("self_attn.o_proj", heads), ("mlp.down_proj", mlp_keep[layer])):
            x_p = inputs_of(pruned, path, layer)  # its input in the final model = its input when it was refit
            w = dict(decoder_layers(dense)[layer].named_modules())[path].weight.detach()
            module = dict(decoder_layers(pruned)[layer].named_modules())[path]
            bias = module.bias.detach() if module.bias is not None else 0  # the tiny Llama has mlp_bias
            if target == "own":
                y = own_inputs(dense, pruned, layer, path) @ w.t()
            elif path == "self_attn.o_proj":
                y = stream(dense, layer, "mid") - stream(pruned, layer, "in") - bias
            else:
                y = stream(dense, layer, "out") - stream(pruned, layer, "mid") - bias
            got = module.weight.detach()
            torch.testing.assert_close(got, explicit_refit(w[:, cols], y, x_p, 0.01), rtol=1e-9, atol=1e-11,
                                       msg=f"layer {layer} {path}")  # fmt: skip
            before = dict(decoder_layers(plain)[layer].named_modules())[path].weight.detach()
            assert (got - before).abs().max() > 1e-6  # the refit moved the weights


@pytest.mark.parametrize("writers", ["pruned", "all"])
def test_all_writers_also_refit_the_o_proj_that_lost_nothing(writers):
    """MLP neurons only: o_proj lost no input. --reconstruct_writers pruned leaves it as it was; all refits it
    towards the dense stream right after attention, from the pruned stream as it was then."""
    dense, pruned, mlp_keep, kept = pruned_pair(Mix(30))
    plain = copy.deepcopy(pruned)
    reconstruct(dense, pruned, mlp_keep, kept, layout_of(dense, "heads"), "ls", "dense", 0.01, WINDOWS,
                batch_size=2, progress=False, writers=writers, weighting="uniform")  # fmt: skip
    for layer in range(2):
        got = decoder_layers(pruned)[layer].self_attn.o_proj.weight.detach()
        before = decoder_layers(plain)[layer].self_attn.o_proj.weight.detach()
        if writers == "pruned":
            assert torch.equal(got, before)
            continue
        x_p = inputs_of(pruned, "self_attn.o_proj", layer)
        y = stream(dense, layer, "mid") - stream(pruned, layer, "in")
        torch.testing.assert_close(got, explicit_refit(before, y, x_p, 0.01), rtol=1e-9, atol=1e-11)
        if layer > 0:  # the first layer's attention sees the dense stream: nothing to repair there
            assert (got - before).abs().max() > 1e-6


def test_rms_weighting_weights_each_token_by_the_dense_streams_mean_square():
    """--reconstruct_weighting rms: a writer's refit is the weighted least squares with each token weighted by
    1 / mean square of the dense stream right after the write."""
    mix = Mix(30, StructureSizes(heads_keep=2))
    dense, pruned, mlp_keep, kept = pruned_pair(mix)
    reconstruct(dense, pruned, mlp_keep, kept, layout_of(dense, "heads"), "ls", "dense", 0.01, WINDOWS,
                batch_size=2, progress=False, weighting="rms")  # fmt: skip
    layer = 1
    x_p = inputs_of(pruned, "mlp.down_proj", layer)
    module = decoder_layers(pruned)[layer].mlp.down_proj
    after = stream(dense, layer, "out")
    y = after - stream(pruned, layer, "mid") - module.bias.detach()
    w = decoder_layers(dense)[layer].mlp.down_proj.weight.detach()[:, mlp_keep[layer]]
    weight = 1 / after.pow(2).mean(-1)
    torch.testing.assert_close(module.weight.detach(), explicit_refit(w, y, x_p, 0.01, weight), rtol=1e-9,
                               atol=1e-11)  # fmt: skip
    assert not torch.allclose(module.weight.detach(), explicit_refit(w, y, x_p, 0.01), rtol=1e-6, atol=1e-8)


def test_bias_adds_flaps_mean_of_the_lost_output():
    """--reconstruct bias (even with dense targets): down_proj's bias gains FLAP's W[:, removed] mean(x_removed),
    x the dense layer's input to it on the pruned stream (W x - W_s x'), not the stream's error."""
    dense, pruned, mlp_keep, kept = pruned_pair(Mix(30))
    before = [decoder_layers(pruned)[i].mlp.down_proj.bias.detach().clone() for i in range(2)]
    reconstruct(dense, pruned, mlp_keep, kept, layout_of(dense, "heads"), "bias", "dense", 0.01, WINDOWS,
                batch_size=2, progress=False)  # fmt: skip
    for layer in range(2):
        w = decoder_layers(dense)[layer].mlp.down_proj.weight.detach()
        x_own, x_p = own_inputs(dense, pruned, layer, "mlp.down_proj"), inputs_of(pruned, "mlp.down_proj", layer)
        torch.testing.assert_close(x_own[:, mlp_keep[layer]], x_p)  # the kept neurons see what they saw
        removed = torch.tensor(sorted(set(range(w.shape[1])) - set(mlp_keep[layer].tolist())))
        shift = x_own[:, removed].mean(0) @ w[:, removed].t()
        got = decoder_layers(pruned)[layer].mlp.down_proj.bias.detach()
        torch.testing.assert_close(got, before[layer] + shift, rtol=1e-9, atol=1e-11)


def own_inputs(dense, pruned, layer, path):
    """The dense layer's `path` input when the dense layer runs on the pruned model's input to that layer."""
    seen_in, out = [], []
    handle = decoder_layers(pruned)[layer].register_forward_pre_hook(
        lambda m, args, kwargs: seen_in.append((args[0] if args else kwargs["hidden_states"], kwargs)),
        with_kwargs=True)  # fmt: skip
    with torch.no_grad():
        pruned(WINDOWS, use_cache=False)
    handle.remove()
    module = dict(decoder_layers(dense)[layer].named_modules())[path]
    h = module.register_forward_pre_hook(lambda m, args: out.append(args[0].detach()))
    with torch.no_grad():
        for x, kwargs in seen_in:
            decoder_layers(dense)[layer](x, **{k: v for k, v in kwargs.items() if k != "hidden_states"})
    h.remove()
    return torch.cat([o.reshape(-1, o.shape[-1]) for o in out])


def test_nothing_removed_gives_the_original_weights():
    dense, _, _, _ = pruned_pair(Mix(30))
    n = find_mlps(dense).neurons
    pruned = copy.deepcopy(dense)
    everything = [torch.arange(n) for _ in range(2)]
    reconstruct(dense, pruned, everything, {}, layout_of(dense, "heads"), "ls", "dense", 0.05, WINDOWS,
                progress=False)  # fmt: skip
    for (name, a), (_, b) in zip(dense.named_parameters(), pruned.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_the_folded_layer_map_equals_the_explicit_h_plus_mt_path():
    """Layer 1 of 3 removed: the map T (fit here by an explicit solve on layer 0's MLP output M and the target
    y - a) folded into layer 0's down_proj gives the logits of the unfolded model with M replaced by M T."""
    dense, _, _, _ = pruned_pair(Mix(30), layers=3)
    kept = {"layers": torch.tensor([0, 2])}
    pruned = sliced_copy(dense, Mix(None, StructureSizes(layers_remove=1)), None, kept)
    unfolded = copy.deepcopy(pruned)
    reconstruct(dense, pruned, None, kept, layout_of(dense, "heads"), "ls", "dense", 0.0, WINDOWS, progress=False,
                weighting="uniform")  # fmt: skip
    # the explicit path on the unfolded copy: M and a from its layer 0, y from the dense model after layer 1
    m_out, h_out = [], []
    mlp = decoder_layers(unfolded)[0].mlp
    handles = [mlp.down_proj.register_forward_hook(lambda mod, a, out: m_out.append(out)),
               decoder_layers(unfolded)[0].register_forward_hook(lambda mod, a, out: h_out.append(out))]  # fmt: skip
    with torch.no_grad():
        unfolded(WINDOWS)
        y = dense(WINDOWS, output_hidden_states=True).hidden_states[2]  # after dense layers 0 and 1
    for h in handles:
        h.remove()
    m = m_out[0].reshape(-1, m_out[0].shape[-1])
    h0 = (h_out[0][0] if isinstance(h_out[0], tuple) else h_out[0]).reshape(-1, m.shape[-1])
    target = y.reshape(-1, m.shape[-1]) - (h0 - m)
    t = torch.linalg.inv(m.t() @ m) @ (m.t() @ target)
    handle = mlp.down_proj.register_forward_hook(lambda mod, a, out: out @ t)
    with torch.no_grad():
        expected = unfolded(WINDOWS).logits
        got = pruned(WINDOWS).logits
    handle.remove()
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("layers_removed", [False, True])
def test_each_dense_layer_runs_whole_once_per_batch(layers_removed):
    """The dense stream after a kept layer is computed once (by the refit of its MLP writer, or by a layer map) and
    read from there by what follows, not run again; a removed layer runs once too."""
    dense, pruned, mlp_keep, kept = pruned_pair(Mix(30), layers=3)
    if layers_removed:
        kept = {"layers": torch.tensor([0, 2])}
        pruned, mlp_keep = sliced_copy(dense, Mix(None, StructureSizes(layers_remove=1)), None, kept), None
    calls = [0] * 3
    handles = [layer.register_forward_hook(lambda mod, a, out, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, layer in enumerate(decoder_layers(dense))]  # fmt: skip
    reconstruct(dense, pruned, mlp_keep, kept, layout_of(dense, "heads"), "ls", "dense", 0.1, WINDOWS,
                progress=False)  # fmt: skip
    for h in handles:
        h.remove()
    # batch size 1: one whole forward of each dense layer per window, plus the one full forward that reads every
    # layer's keyword arguments (module/sparse/layerwise.py layer_inputs); before: two per window
    assert calls == [len(WINDOWS) + 1] * 3


def test_a_singular_gram_gives_a_finite_refit():
    """Dead inputs (a column never active) and no ridge: the minimum-norm least-squares solution, no NaN."""
    x = torch.randn(50, 6, dtype=torch.float64)
    x[:, 2] = 0  # a dead neuron
    keep = torch.tensor([0, 2, 3, 5])
    w = torch.randn(3, 6, dtype=torch.float64)
    stats = PairStats.zeros(3, 4, "cpu", dtype=torch.float64)
    stats.add(x @ w.t(), x[:, keep])
    out = refit(w[:, keep], stats, damp=0.0)
    assert torch.isfinite(out).all()
    residual = lambda v: (v @ x[:, keep].t() - w @ x.t()).norm()  # noqa: E731
    best = torch.linalg.lstsq(x[:, keep], x @ w.t()).solution.t()  # the least-squares optimum itself
    assert residual(out) <= residual(best) + 1e-9 and residual(out) < residual(w[:, keep])


def test_the_refits_peak_memory_is_its_own_not_the_processes_lifetime_peak():
    """The report's peak is the block's: ru_maxrss, read after a second block, would give it the first one's. In a
    fresh interpreter: after a long test session freed memory stays resident and a new tensor need not grow it."""
    import subprocess
    import sys
    from pathlib import Path

    code = """
import time, torch
from utils.report import PeakMemory, resident_bytes
assert resident_bytes() is not None
size = 256 * 2**20
with PeakMemory(torch.device("cpu")) as big:
    block = torch.ones(size // 4)
    deadline = time.monotonic() + 30
    while big.bytes - big.start < 0.8 * size and time.monotonic() < deadline:
        time.sleep(0.01)
    del block
with PeakMemory(torch.device("cpu")) as small:
    time.sleep(0.05)
print(big.bytes - small.bytes, small.bytes, resident_bytes(), big.above_start, small.above_start)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout.split()  # fmt: skip
    growth, small, now, big_above, small_above = (int(v) for v in out)
    assert growth > 0.8 * 256 * 2**20
    assert small >= 0.8 * now  # the resident set itself, not the growth
    assert big_above > 0.8 * 256 * 2**20 and small_above < 0.2 * 256 * 2**20  # the part above the block's entry


def test_tiny_model_family_without_structures_refits_its_mlp():
    """MLP neurons of a family with only an MLP adapter (GPT-2's Conv1D): the refit lowers the output error."""
    dense = tiny_model("gpt2").double()
    mlps = find_mlps(dense)
    keep = [torch.arange(0, mlps.neurons, 2) for _ in mlps.layers]
    pruned = sliced_copy(dense, Mix(len(keep[0])), keep, {})
    plain = copy.deepcopy(pruned)
    reconstruct(dense, pruned, keep, {}, None, "ls", "dense", 0.01, WINDOWS, progress=False)
    with torch.no_grad():
        ref = dense(WINDOWS).logits
        assert (pruned(WINDOWS).logits - ref).norm() < (plain(WINDOWS).logits - ref).norm()


def ridge_error(y, x, cols, lam) -> float:
    """min_W sum_t |y_t - W x_t[cols]|^2 + lam |W|^2, by an explicit inverse (fp64)."""
    xs = x[:, cols]
    w = y.t() @ xs @ torch.linalg.inv(xs.t() @ xs + lam * torch.eye(len(cols), dtype=x.dtype))
    return float((y - xs @ w.t()).pow(2).sum() + lam * w.pow(2).sum())


@pytest.mark.parametrize("damp", [0.0, 0.1])
@pytest.mark.parametrize("m,keep", [(9, 3), (32, 6)])
def test_greedy_keep_removes_at_each_step_the_input_whose_explicit_refit_loses_least(damp, m, keep):
    """Independent greedy backward elimination: at each step solve the ridge fit without each remaining input
    and drop the one with the smallest error; greedy_keep's factored downdates of W and H^-1 must choose the same
    (32 -> 6: 26 downdates accumulate)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, m, generator=gen, dtype=torch.float64) @ torch.randn(m, m, generator=gen,
                                                                              dtype=torch.float64)
    y = x @ torch.randn(m, 4, generator=gen, dtype=torch.float64) + 0.3 * torch.randn(400, 4, generator=gen,
                                                                                      dtype=torch.float64)
    stats = PairStats.zeros(4, m, "cpu", dtype=torch.float64)
    stats.add(y, x)
    lam = damp * float(torch.diagonal(x.t() @ x).mean())
    alive = list(range(m))
    while len(alive) > keep:
        errors = [ridge_error(y, x, [c for c in alive if c != j], lam) for j in alive]
        alive.remove(alive[min(range(len(alive)), key=errors.__getitem__)])
    assert greedy_keep(stats, keep, damp).tolist() == alive
    assert greedy_keep(stats, m, damp).tolist() == list(range(m))
    with pytest.raises(ValueError, match=f"cannot keep 0 of {m}"):
        greedy_keep(stats, 0, damp)


def test_greedy_keep_drops_a_dead_input_first_and_stays_finite_without_a_ridge():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    x[:, 2] = 0  # a dead neuron: G is singular and damp 0 adds no ridge
    stats = PairStats.zeros(3, 6, "cpu", dtype=torch.float64)
    stats.add(x @ torch.randn(6, 3, generator=gen, dtype=torch.float64), x)
    kept = greedy_keep(stats, 3, 0.0)
    live = torch.tensor([0, 1, 3, 4, 5])
    assert kept.tolist() == live[greedy_keep(stats.restricted(live), 3, 0.0)].tolist()  # as if it never existed


def test_obs_selection_fits_the_first_layer_better_than_random_neurons_and_keeps_what_it_reports(caplog):
    """Same count, neurons re-chosen: the first pruned layer's output (whose input both share) is closer to the
    dense layer's than with random kept neurons refit; the pruned gate/up rows are the dense rows of the new kept
    sets, which replace the old ones in place. Few tokens per neuron under a weak ridge: a warning says how many
    windows would do (not with enough of them, nor at the obs default ridge)."""
    dense, pruned, mlp_keep, kept = pruned_pair(Mix(36, StructureSizes()), layers=2)
    chosen = [k.clone() for k in mlp_keep]
    by_scores = copy.deepcopy(pruned)
    reconstruct(dense, by_scores, mlp_keep, kept, None, "ls", "dense", 0.01, WINDOWS, progress=False)
    report = reconstruct(dense, pruned, chosen, kept, None, "ls", "dense", 0.01, WINDOWS, progress=False,
                         select="obs")  # fmt: skip
    assert report["neurons_reselected"] > 0 and report["select"] == "obs"
    tokens, neurons = WINDOWS.numel(), decoder_layers(dense)[0].mlp.down_proj.in_features
    warned = [r.getMessage() for r in caplog.records if "--reconstruct_select obs chooses among" in r.getMessage()]
    assert tokens < 40 * neurons and len(warned) == 1 and f"{neurons} neurons per layer on {tokens} tokens" in warned[0]
    assert f"at least {math.ceil(40 * neurons / WINDOWS.shape[1])} windows" in warned[0]
    caplog.clear()
    enough = WINDOWS.repeat(math.ceil(40 * neurons / tokens), 1)
    Reconstructor(dense, copy.deepcopy(by_scores), [k.clone() for k in mlp_keep], kept, None, "ls", "dense", 0.01,
                  enough, select="obs")  # fmt: skip
    Reconstructor(dense, copy.deepcopy(by_scores), [k.clone() for k in mlp_keep], kept, None, "ls", "dense", 0.3,
                  WINDOWS, select="obs")  # fmt: skip
    assert not [r for r in caplog.records if "--reconstruct_select obs chooses among" in r.getMessage()]
    assert all(len(c) == len(k) for c, k in zip(chosen, mlp_keep)) and not all(map(torch.equal, chosen, mlp_keep))
    for layer in range(2):
        d_mlp, p_mlp = decoder_layers(dense)[layer].mlp, decoder_layers(pruned)[layer].mlp
        assert torch.equal(p_mlp.gate_proj.weight, d_mlp.gate_proj.weight[chosen[layer]])
        assert torch.equal(p_mlp.up_proj.weight, d_mlp.up_proj.weight[chosen[layer]])
    dense_out = stream(dense, 0, "out")
    assert (stream(pruned, 0, "out") - dense_out).norm() < (stream(by_scores, 0, "out") - dense_out).norm()


def run_prune(tmp_path, origin, out, *args):
    import prune

    return prune.main(["--origin_path", str(origin), "--output_dir", str(tmp_path / out), "--importance_cache",
                       str(tmp_path / "cache"), "--calib_dataset", "builtin", "--calib_samples", "6", "--seq_len", "24",
                       "--batch_size", "3", "--no_progress", "--eval_text", "builtin:heldout", "--eval_seq_len", "64",
                       "--eval_windows", "4", *args])  # fmt: skip


@pytest.mark.parametrize(("mode", "parts"), [("ls", ["--prune_parts", "mlp,heads,layers", "--pruning_ratio", "0.1",
                                                     "--heads_keep", "2", "--layers_remove", "1"]),
                                             ("ls", ["--prune_parts", "hidden", "--hidden_keep", "28"]),
                                             ("bias", ["--prune_parts", "mlp,heads,layers", "--pruning_ratio", "0.1",
                                                       "--heads_keep", "2", "--layers_remove", "1"]),
                                             ("bias", ["--prune_parts", "mlp,hidden", "--mix",  # hidden: no mean
                                                       "mlp_keep=40,hidden_keep=28", "--search_windows", "2"]),
                                             ("ls", ["--pruning_ratio", "0.1,0.2", "--reconstruct_writers",
                                                     "all"]),
                                             ("ls", ["--prune_parts", "mlp,heads", "--pruning_ratio", "0.1",
                                                     "--heads_keep", "2", "--reconstruct_select", "obs"])])  # fmt: skip
def test_prune_py_reconstructs_and_the_saved_model_reloads_as_it_was_scored(tmp_path, tiny_llama_dir, mode, parts):
    """The perplexity after (measured in the run on the reconstructed model) equals the reloaded folder's: the
    folder holds what was reconstructed, with plain from_pretrained (a bias mode sets the config key)."""
    import json

    from utils.perplexity import perplexity, text_windows

    assert run_prune(tmp_path, tiny_llama_dir, "out", *parts, "--reconstruct", mode) == 0
    folders = [tmp_path / "out"] if (tmp_path / "out" / "prune_report.json").is_file() else sorted(
        (tmp_path / "out").iterdir())  # fmt: skip
    from dataset.calibration import load_documents
    from utils.cli import load_tokenizer

    tok = load_tokenizer(str(tiny_llama_dir), "model")
    windows = text_windows(tok, load_documents("builtin:heldout"), 64)[:4]
    for folder in folders:
        report = json.loads((folder / "prune_report.json").read_text())
        assert report["reconstruction"]["mode"] == mode and report["reconstruction"]["consumers_refit"] > 0
        assert report["reconstruction"]["damp"] == (0.3 if "obs" in parts else 0.1)  # the default ridges
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert perplexity(model, windows, 4, False)["perplexity"] == pytest.approx(
            report["perplexity_after"]["perplexity"], rel=1e-5)  # fmt: skip
        if "obs" in parts:  # the neurons it re-chose are the ones recorded beside the model
            from safetensors.torch import load_file

            recorded = load_file(folder / "kept_neurons.safetensors")
            gate = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).model.layers[1].mlp.gate_proj.weight
            assert torch.equal(model.model.layers[1].mlp.gate_proj.weight, gate[recorded["layer.1"]])
            assert report["reconstruction"]["neurons_reselected"] > 0
        if mode == "bias":
            # a bias where something was removed: o_proj's only when heads were
            assert model.config.mlp_bias and model.config.attention_bias == any("heads" in a for a in parts)
            assert model.model.layers[0].mlp.down_proj.bias.abs().sum() > 0
        assert folder.name.endswith(f"-{mode}-s42") or folder == tmp_path / "out"


@pytest.mark.parametrize(("sizes", "target"), [(StructureSizes(heads_keep=2), "dense"),
                                               (StructureSizes(heads_keep=2), "own"),
                                               (StructureSizes(hidden_keep=24), "dense"),
                                               (StructureSizes(layers_remove=1), "dense"),
                                               (StructureSizes(layers_remove=1), "own")])  # fmt: skip
def test_reconstruction_brings_the_outputs_back_towards_the_dense_model(sizes, target):
    """On the calibration windows, every structure's refit lowers the logits' distance to the dense model (the
    middle one of 3 layers is the one removed: a leading run has no layer before it to fold a map into)."""
    dense, pruned, mlp_keep, kept = pruned_pair(Mix(36, sizes), layers=3)
    if sizes.layers_remove:
        kept = {"layers": torch.tensor([0, 2])}
        pruned = sliced_copy(dense, Mix(36, sizes), mlp_keep, kept)
    plain = copy.deepcopy(pruned)
    reconstruct(dense, pruned, mlp_keep, kept, layout_of(dense, "heads"), "ls", target, 0.01, WINDOWS, progress=False)
    with torch.no_grad():
        ref = dense(WINDOWS).logits
        assert (pruned(WINDOWS).logits - ref).norm() < 0.9 * (plain(WINDOWS).logits - ref).norm()


@pytest.mark.parametrize("select", ["scores", "obs"])
def test_search_rescores_its_best_candidates_after_reconstruction(tmp_path, tiny_llama_dir, select):
    """obs: candidates that remove hidden channels keep the scores' neurons, the others are re-chosen."""
    import json

    assert run_prune(tmp_path, tiny_llama_dir, "mix", "--prune_parts", "auto", "--pruning_ratio", "0.2",
                     "--search_windows", "2", "--search_candidates", "8", "--reconstruct", "ls",
                     "--reconstruct_rescore", "3", "--reconstruct_select", select) == 0  # fmt: skip
    board = json.loads((tmp_path / "mix" / "prune_report.json").read_text())["search"]["leaderboard"]
    rescored = [r["kl_reconstructed"] for r in board[:3]]
    assert all(k is not None for k in rescored) and rescored == sorted(rescored)
    assert all(r["kl_reconstructed"] is None for r in board[3:])


@pytest.mark.parametrize(("args", "damp"), [([], 0.1), (["--reconstruct_select", "obs"], 0.3),
                                           (["--reconstruct_select", "obs", "--reconstruct_damp", "0.1"], 0.1),
                                           (["--reconstruct_damp", "0"], 0.0)])  # fmt: skip
def test_the_refit_ridge_defaults_by_the_selection_and_a_given_one_wins(tiny_llama_dir, args, damp):
    from cfg.prune_config import PruneConfig
    from module.prune.compensation import Settings
    from utils.cli import parse_config

    cfg = parse_config(PruneConfig, ["--origin_path", str(tiny_llama_dir), "--output_dir", "unused",
                                     "--pruning_ratio", "0.1", "--reconstruct", "ls", *args])  # fmt: skip
    assert Settings.of(cfg, None).damp == damp


def test_a_fixed_mix_is_reconstructed_once(tmp_path, tiny_llama_dir, monkeypatch):
    """--mix gives a board of one: re-ranking it would refit the same model twice (once for its KL, once to save)."""
    import module.prune.output as output
    import module.prune.pipeline as pipeline

    calls = []
    for mod in (output, pipeline):
        real = mod.reconstructed
        monkeypatch.setattr(mod, "reconstructed", lambda *a, real=real, name=mod.__name__: (calls.append(name),
                                                                                            real(*a))[1])  # fmt: skip
    assert run_prune(tmp_path, tiny_llama_dir, "mix", "--prune_parts", "mlp,layers", "--mix",
                     "mlp_keep=40,layers_remove=1", "--reconstruct", "ls", "--search_windows", "2") == 0  # fmt: skip
    assert calls == ["module.prune.output"]


@pytest.mark.parametrize(("family", "args", "message"), [
    ("qwen2", ["--pruning_ratio", "0.1", "--reconstruct", "bias"], "no config key that adds one"),
    ("llama", ["--prune_parts", "hidden", "--hidden_keep", "28", "--reconstruct", "ls", "--reconstruct_target",
               "own"], "needs the full hidden width"),
    ("llama", ["--pruning_ratio", "0.1", "--reconstruct", "refit"], "is not one of none, bias, ls"),
    ("llama", ["--prune_parts", "hidden", "--hidden_keep", "28", "--reconstruct", "bias"],
     "with --prune_parts hidden alone it would change nothing: use --reconstruct ls"),
    ("llama", ["--pruning_ratio", "0.1", "--reconstruct", "bias", "--reconstruct_writers", "all"],
     "needs --reconstruct ls and --reconstruct_target dense"),
    ("llama", ["--pruning_ratio", "0.1", "--reconstruct", "ls", "--reconstruct_weighting", "norm"],
     "is not one of uniform, rms"),
    ("llama", ["--pruning_ratio", "0.1", "--reconstruct_damp", "0.05"], "does not combine with --reconstruct_damp"),
    ("llama", ["--pruning_ratio", "0.1", "--reconstruct", "bias", "--reconstruct_select", "obs"],
     "--reconstruct_select obs chooses neurons by the least-squares refit"),
    ("llama", ["--pruning_ratio", "0.1", "--reconstruct", "ls", "--reconstruct_select", "best"],
     "is not one of scores, obs"),
    ("llama", ["--prune_parts", "mlp,hidden", "--pruning_ratio", "0.1", "--hidden_keep", "28", "--reconstruct", "ls",
               "--reconstruct_select", "obs"], "with hidden in --prune_parts use --reconstruct_select scores"),
])  # fmt: skip
def test_bad_reconstruction_input_is_one_line(tmp_path, tiny_tokenizer, capsys, family, args, message):
    origin = tmp_path / family
    tiny_model(family).save_pretrained(origin)
    tiny_tokenizer.save_pretrained(origin)
    assert run_prune(tmp_path, origin, "out", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if line.startswith("error")] == err[-1:] and message in err[-1], err[-1:]
    assert not (tmp_path / "out").exists()


def test_refit_windows_beyond_the_scoring_ones_keep_the_scores_and_their_cache_entry(tmp_path, tiny_llama_dir):
    """--reconstruct_samples 12 draws 12 windows; the first 6 (the draw of --calib_samples 6) score: the cache
    entry of a plain run is reused and the kept neurons are the same."""
    import json

    from safetensors.torch import load_file

    assert run_prune(tmp_path, tiny_llama_dir, "plain", "--pruning_ratio", "0.1") == 0
    assert run_prune(tmp_path, tiny_llama_dir, "refit", "--pruning_ratio", "0.1", "--reconstruct", "ls",
                     "--reconstruct_samples", "12") == 0  # fmt: skip
    report = json.loads((tmp_path / "refit" / "prune_report.json").read_text())
    assert report["cache_hit"] and report["reconstruction"]["windows"][0] == 12
    plain, refit = (load_file(tmp_path / d / "kept_neurons.safetensors") for d in ("plain", "refit"))
    assert all(torch.equal(plain[k], refit[k]) for k in plain)


def test_reconstruction_study_runs_on_a_tiny_model_and_resumes(tmp_path, tiny_long_llama_dir, capsys):
    import json

    from conftest import DATA

    from bench.studies import reconstruction as study

    out = tmp_path / "docs" / "RECONSTRUCTION_TINY.md"  # not the default name: the report names its own rows
    argv = ["--model", str(tiny_long_llama_dir), "--data_dir", str(DATA), "--out", str(out), "--work_dir",
            str(tmp_path / "work"), "--ratios", "0.2", "--seeds", "0,1", "--criteria", "entropy", "--modes",
            "none,ls,ls_obs", "--structures", "heads,layers", "--heads_keep", "2", "--layers_remove", "1",
            "--calib_samples", "3", "--reconstruct_samples", "5", "--seq_len", "32", "--tasks", "arc_easy_local",
            "--limit", "2", "--ppl_windows", "2", "--ppl_seq_len", "32", "--c4_windows", "2", "--c4_seq_len", "32",
            "--ablation", "false", "--mix_criteria", "entropy,entropy+layers=block_influence"]  # fmt: skip
    assert study.main(argv) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    names = {r["name"] for r in rows}
    assert {"dense", "mlp-entropy-0.2-ls-s1", "mix-entropy-0.2-none-s0", "heads-entropy-ls-s0",
            "layers-block_influence-ls-s1", "mlp-entropy-0.2-ls_obs-dense-d0.3-s1",
            "mix-entropy+layers=block_influence-0.2-ls-s1"} <= names  # fmt: skip
    # per seed: MLP and two mixes in 3 modes, heads and layers alone without ls_obs (no MLP neurons to re-choose)
    assert len(rows) == 1 + 2 * (3 + 2 * 3 + 2 + 2)
    assert not any("ls_obs" in n for n in names if n.startswith(("heads", "layers")))
    obs, ls = (next(r for r in rows if r["name"] == n) for n in ("mlp-entropy-0.2-ls_obs-dense-d0.3-s0",
                                                                   "mlp-entropy-0.2-ls-s0"))  # fmt: skip
    assert (obs["damp"], ls["damp"]) == (0.3, 0.1)  # each at prune.py's default ridge
    assert obs["params"] == ls["params"]  # re-chosen neurons, the same count
    dense = next(r for r in rows if r["name"] == "dense")
    assert all(r["params"] < dense["params"] and math.isfinite(r["c4_ppl"]) for r in rows if r is not dense)
    assert all(r["refit_seconds"] > 0 for r in rows if r.get("mode") == "ls")
    zero_shot = {r["name"] for r in rows if r["avg"] is not None}  # --zero_shot main: the first seed's rows
    assert "mlp-entropy-0.2-ls-s0" in zero_shot and "mlp-entropy-0.2-ls-s1" not in zero_shot
    text = out.read_text()
    assert "| 0.2 | mlp (entropy) | ls |" in text and "## Targets" in text and "layers alone" in text
    ls_line = next(line for line in text.splitlines() if line.startswith("| 0.2 | mlp (entropy) | ls |"))
    assert all(float(gib) > 0 for gib in ls_line.split("|")[-2].split(" / "))  # the refit's peak, each seed
    assert "from its rows (`RECONSTRUCTION_TINY.json`)" in text and "1 offline tasks, their first 2 items" in text
    capsys.readouterr()
    assert study.main([*argv, "--resume"]) == 0  # nothing measured again
    assert "ppl" not in capsys.readouterr().out


def test_the_mix_cell_names_each_seeds_choice_when_they_differ():
    from bench.studies.reconstruction import mixes_cell

    same = [{"mix": "mlp_keep=1017"}, {"mix": "mlp_keep=1017"}]
    differ = [{"mix": "mlp_keep=1017"}, {"mix": "mlp_keep=1070,layers_remove=1"}]
    assert mixes_cell(same) == "mlp_keep=1017"
    assert mixes_cell(differ) == "mlp_keep=1017 / mlp_keep=1070,layers_remove=1"


def perplexity_only_study(tmp_path, model_dir) -> tuple[Path, list[str]]:
    """A --limit 0 study on the tiny model (MLP, entropy, 20%, none and ls, seed 0): its report path and argv."""
    from conftest import DATA

    out = tmp_path / "REC.md"
    argv = ["--model", str(model_dir), "--data_dir", str(DATA), "--out", str(out), "--work_dir",
            str(tmp_path / "work"), "--ratios", "0.2", "--seeds", "0", "--criteria", "entropy", "--modes", "none,ls",
            "--structures", "", "--mix", "false", "--calib_samples", "3", "--reconstruct_samples", "5", "--seq_len",
            "32", "--tasks", "arc_easy_local", "--limit", "0", "--ppl_windows", "2", "--ppl_seq_len", "32",
            "--c4_windows", "2", "--c4_seq_len", "32", "--ablation", "false"]  # fmt: skip
    return out, argv


def committed_rows_only(out: Path, tmp_path, drop: str = "", worse_ppl: str = "") -> list[dict]:
    """The report's JSON rows without the field `drop` and with row `worse_ppl`'s perplexity 1% higher, written back,
    and the work dir's rows.jsonl removed (so --resume reads the report's rows alone); the rows written."""
    import json

    committed = json.loads(out.with_suffix(".json").read_text())
    for r in committed["rows"]:
        r.pop(drop, None)
        if r["name"] == worse_ppl:
            r["ppl"] *= 1.01
    out.with_suffix(".json").write_text(json.dumps(committed))
    for rows_file in (tmp_path / "work").glob("*/rows.jsonl"):
        rows_file.unlink()
    return committed["rows"]


def test_reconstruction_study_adds_zero_shot_to_rows_measured_without_it(tmp_path, tiny_long_llama_dir, capsys):
    """--limit 0, then --zero_shot_items 2 with --resume: each picked row's model is made again, its perplexity
    checked against the row's, and its zero-shot shown in the report; a row whose model no longer reproduces its
    perplexity stops the study with one line."""
    import json

    from bench.studies import reconstruction as study

    out, argv = perplexity_only_study(tmp_path, tiny_long_llama_dir)
    assert study.main(argv) == 0
    assert "not measured (--limit 0)" in out.read_text()
    assert study.main([*argv, "--resume", "--zero_shot_items", "2"]) == 0
    rows = {r["name"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    added = {n for n in rows if n.startswith("zs2|")}
    assert added == {"zs2|dense", "zs2|mlp-entropy-0.2-none-s0", "zs2|mlp-entropy-0.2-ls-s0"}
    for name in added:
        of = rows[rows[name]["of"]]
        assert abs(rows[name]["ppl"] / of["ppl"] - 1) < 1e-3 and of["avg"] is None and rows[name]["avg"] is not None
    text = out.read_text()
    assert "their first 2 items, on the rows that show one" in text
    ls_line = next(line for line in text.splitlines() if line.startswith("| 0.2 | mlp (entropy) | ls |"))
    assert f"| {rows['zs2|mlp-entropy-0.2-ls-s0']['avg']:.2f} |" in ls_line
    capsys.readouterr()
    assert study.main([*argv, "--resume", "--zero_shot_items", "2"]) == 0  # nothing measured again
    assert "ppl" not in capsys.readouterr().out
    # --zero_shot only picks rows: with --limit 0 it keeps the rows' key, so they are reused and the report keeps them
    assert study.main([*argv, "--resume", "--zero_shot_items", "2", "--zero_shot", "all"]) == 0
    assert "ppl" not in capsys.readouterr().out
    assert {r["name"] for r in json.loads(out.with_suffix(".json").read_text())["rows"]} == set(rows)
    # a row whose model no longer gives its perplexity: no zero-shot is added to it
    committed_rows_only(out, tmp_path, worse_ppl="mlp-entropy-0.2-ls-s0")
    assert study.main([*argv, "--resume", "--zero_shot_items", "3", "--only", "mlp-entropy-0.2-ls"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "mlp-entropy-0.2-ls-s0: made again it gives WikiText-2 perplexity" in err[-1]


def test_the_zero_shot_cell_gives_the_average_without_boolq_beside_it():
    from bench.studies.reconstruction import zero_shot_cell

    rows = [{"avg": 50.0, "tasks": {"boolq": 60.0, "arc_easy": 40.0, "piqa": 50.0}},
            {"avg": 40.0, "tasks": {"boolq": 30.0, "arc_easy": 40.0, "piqa": 50.0}}]  # fmt: skip
    assert zero_shot_cell(rows) == "50.00 / 40.00 (45.00 / 45.00)"
    assert zero_shot_cell([{"avg": 40.0, "tasks": {"arc_easy": 40.0}}]) == "40.00"
    assert zero_shot_cell([{"avg": None, "tasks": {}}]) == "–"
    # a seed without zero-shot keeps its place, so "– / 40.00" says it is seed 1's
    assert zero_shot_cell([{"avg": None, "tasks": {}}, rows[1]]) == "– / 40.00 (– / 45.00)"


def test_a_cell_keeps_each_seeds_place():
    from bench.studies.reconstruction import cell

    rows = [{"refit_peak_bytes": None}, {"refit_peak_bytes": 3 * 2**29}]
    assert cell(rows, "refit_peak_bytes", 2, 2**-30) == "– / 1.50"
    assert cell(rows[:1], "refit_peak_bytes") == "–"


def test_reconstruction_study_adds_the_refit_peak_to_rows_measured_without_it(tmp_path, tiny_long_llama_dir, capsys):
    """--refit_peak with --resume: a refit row that lacks its peak memory gets it from its model made again (the
    perplexity checked against the row's), nothing else of the row changes, and a row without a refit gets none."""
    import json

    from bench.studies import reconstruction as study

    out, argv = perplexity_only_study(tmp_path, tiny_long_llama_dir)
    assert study.main(argv) == 0
    report = out.with_suffix(".json")
    # as rows measured before the refit recorded its peak
    before = {r["name"]: r for r in committed_rows_only(out, tmp_path, drop="refit_peak_bytes")}
    assert "| ls | " in out.read_text()
    capsys.readouterr()
    assert study.main([*argv, "--resume", "--refit_peak", "true"]) == 0
    assert capsys.readouterr().out.count("(made again)") == 1
    after = {r["name"]: r for r in json.loads(report.read_text())["rows"]}
    ls = after["mlp-entropy-0.2-ls-s0"]
    assert ls["refit_peak_bytes"] > 2**20 and "refit_peak_bytes" not in after["mlp-entropy-0.2-none-s0"]
    assert {k: v for k, v in ls.items() if k != "refit_peak_bytes"} == before["mlp-entropy-0.2-ls-s0"]
    assert after.keys() == before.keys()
    ls_line = next(line for line in out.read_text().splitlines() if line.startswith("| 0.2 | mlp (entropy) | ls |"))
    assert ls_line.split("|")[-2].strip() == f"{ls['refit_peak_bytes'] / 2**30:.2f}"
    assert study.main([*argv, "--resume", "--refit_peak", "true"]) == 0  # nothing made again
    assert "made again" not in capsys.readouterr().out
    # a row whose model no longer gives its perplexity gets no peak
    committed_rows_only(out, tmp_path, drop="refit_peak_bytes", worse_ppl="mlp-entropy-0.2-ls-s0")
    assert study.main([*argv, "--resume", "--refit_peak", "true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "mlp-entropy-0.2-ls-s0: made again it gives WikiText-2 perplexity" in err[-1]
