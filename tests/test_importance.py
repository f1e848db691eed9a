"""The importance pass against an independent, per-window autograd computation (the release's way)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, tiny_model

from module.entropy import cross_entropy_and_grad, entropy_and_grad
from module.model.mlp import find_mlps
from module.prune.criteria import magnitude_scores, score_neurons, wanda_sp_scores
from module.prune.importance import collect_statistics

WINDOWS = torch.randint(0, VOCAB, (5, 16), generator=torch.Generator().manual_seed(7))


def reference_taylor(model, windows, criterion):
    """Batch 1, full logits, plain autograd with weight gradients on: sum_t |a * dL/da| per neuron."""
    mlps = find_mlps(model)
    acts = {}
    hooks = [
        layer.output.module.register_forward_pre_hook(lambda m, args, i=i: acts.__setitem__(i, args[0]))
        for i, layer in enumerate(mlps.layers)
    ]
    scores = [torch.zeros(mlps.neurons, dtype=torch.float64) for _ in mlps.layers]
    for w in windows:
        ids = w.unsqueeze(0)
        logits = model(ids).logits.float()
        for a in acts.values():
            a.retain_grad()
        if criterion == "entropy":
            p = logits.softmax(-1)
            loss = -(p * logits.log_softmax(-1)).sum(-1).mean()
        else:
            loss = F.cross_entropy(logits[0, :-1], ids[0, 1:])
        model.zero_grad()
        loss.backward()
        for i, a in acts.items():
            scores[i] += (a * a.grad).abs().sum(dim=(0, 1)).double()
    for h in hooks:
        h.remove()
    return scores


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "granite", "phi3", "opt"])
@pytest.mark.parametrize("criterion", ["entropy", "ce"])
def test_batched_chunked_scores_equal_per_window_autograd(family, criterion):
    model = tiny_model(family)
    expected = reference_taylor(model, WINDOWS, criterion)
    mlps = find_mlps(model)
    # batch 2 over 5 windows (a ragged last batch) and 7-token loss chunks that straddle windows
    stats = collect_statistics(model, mlps, WINDOWS, criterion, batch_size=2, chunk_tokens=7, progress=False)
    got = score_neurons(criterion, mlps, stats, seed=0)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=2e-5, atol=1e-9)
    assert all(p.requires_grad for p in model.parameters()), "requires_grad flags must be restored"


def test_batch_and_chunk_do_not_change_scores():
    model = tiny_model("qwen2")
    mlps = find_mlps(model)
    a = collect_statistics(model, mlps, WINDOWS, "entropy", batch_size=1, chunk_tokens=10_000, progress=False)
    b = collect_statistics(model, mlps, WINDOWS, "entropy", batch_size=5, chunk_tokens=3, progress=False)
    for x, y in zip(a.taylor, b.taylor):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=0)
    assert a.tokens == b.tokens == WINDOWS.numel()


def test_same_windows_give_identical_scores():
    model = tiny_model("mistral")
    mlps = find_mlps(model)
    runs = [collect_statistics(model, mlps, WINDOWS, "entropy", 2, progress=False).taylor for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(*runs))


def test_entropy_gradient_is_the_analytic_one():
    z = torch.randn(6, 11, dtype=torch.float64, requires_grad=True)
    p = z.softmax(-1)
    h = -(p * z.log_softmax(-1)).sum(-1)
    (h.sum() * 0.5).backward()
    ours_h, ours_g = entropy_and_grad(z.detach().clone(), 0.5)
    torch.testing.assert_close(ours_h, h.detach())
    torch.testing.assert_close(ours_g, z.grad)


def test_cross_entropy_gradient_ignores_masked_targets():
    z = torch.randn(6, 11, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([3, 0, 10, -100, 5, -100])
    loss = F.cross_entropy(z, y, reduction="sum", ignore_index=-100) * 0.25
    loss.backward()
    ce, g = cross_entropy_and_grad(z.detach().clone(), y, 0.25)
    torch.testing.assert_close(ce.sum() * 0.25, loss.detach())
    torch.testing.assert_close(g, z.grad)
    assert ce[3] == 0 and ce[5] == 0


def test_wanda_sp_is_activation_norm_times_mean_down_weight():
    model = tiny_model("llama")
    mlps = find_mlps(model)
    acts = []
    hook = mlps.layers[1].output.module.register_forward_pre_hook(lambda m, a: acts.append(a[0].detach()))
    with torch.no_grad():
        for w in WINDOWS:
            model(w.unsqueeze(0))
    hook.remove()
    x = torch.cat([a.reshape(-1, 48) for a in acts]).double()
    expected = x.norm(dim=0) * mlps.layers[1].output.module.weight.detach().double().abs().mean(dim=0)
    stats = collect_statistics(model, mlps, WINDOWS, "wanda_sp", batch_size=3, progress=False)
    torch.testing.assert_close(wanda_sp_scores(stats, mlps)[1], expected)


def test_magnitude_is_the_norm_of_each_neurons_weights():
    model = tiny_model("phi3")  # fused gate_up: the neuron owns row j and row j + 48
    layer = find_mlps(model).layers[0]
    gu = layer.inputs[0].module.weight.detach().double()
    down = layer.output.module.weight.detach().double()
    j = 5
    expected = torch.cat([gu[j], gu[j + 48], down[:, j]]).norm()
    torch.testing.assert_close(magnitude_scores(find_mlps(model))[0][j], expected)


def test_random_scores_follow_the_seed():
    mlps = find_mlps(tiny_model("llama"))
    a, b, c = (score_neurons("random", mlps, None, seed=s) for s in (1, 1, 2))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # GPT-2 has dropout modules that must stay off
def test_activation_checkpointing_does_not_change_scores(family):
    model = tiny_model(family)
    mlps = find_mlps(model)
    calls = []
    counter = mlps.layers[1].output.module.register_forward_pre_hook(lambda m, a: calls.append(1))
    plain = collect_statistics(model, mlps, WINDOWS, "entropy", batch_size=2, progress=False)
    n_plain = len(calls)
    ckpt = collect_statistics(model, mlps, WINDOWS, "entropy", 2, progress=False, activation_checkpointing=True)
    counter.remove()
    assert n_plain == 3 and len(calls) - n_plain == 6  # 3 batches; each layer recomputed once in backward
    for a, b in zip(plain.taylor, ckpt.taylor):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
    assert not model.training and not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_taylor_check_first_order_estimate_tracks_the_real_loss_change(tiny_llama_dir):
    """bench/studies/taylor_check.py's plumbing on a tiny model: the signed first-order estimate of removing a
    neuron must rank neurons like the loss change that removal really causes."""
    import importlib.util

    from conftest import ROOT
    from transformers import AutoModelForCausalLM

    spec = importlib.util.spec_from_file_location("taylor_check", ROOT / "bench" / "studies" / "taylor_check.py")
    taylor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(taylor)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    results = taylor.run(model, WINDOWS[:3], ["entropy", "ce"], [0, 1], per_layer=10, seed=0)
    for rows in results.values():
        assert [r["layer"] for r in rows] == [0, 1]
        assert all(r["spearman_estimate_vs_delta"] > 0.8 and r["mean_abs_delta"] > 0 for r in rows), rows
    assert results["entropy"][0]["mean_abs_delta"] != results["ce"][0]["mean_abs_delta"]
    assert taylor.spearman(torch.arange(5.0), torch.arange(5.0) ** 3) == pytest.approx(1.0)
    assert taylor.spearman(torch.arange(5.0), -torch.arange(5.0)) == pytest.approx(-1.0)
