"""Every MLP adapter on a tiny random model: detection, logit head, exact slicing, save and reload."""

import copy

import pytest
import torch
from conftest import EXPECTED_SHAPE, FAMILIES, VOCAB, tiny_model
from torch import nn
from transformers import AutoModelForCausalLM

from module.entropy import LogitHead
from module.model.mlp import UnsupportedModelError, count_parameters, find_mlps
from module.model.slicing import prune_mlps
from module.prune.plan import plan_keep

IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_detects_shape_and_logit_head(family):
    model = tiny_model(family)
    mlps = find_mlps(model)
    assert mlps.shape.name == EXPECTED_SHAPE.get(family, "gated")
    assert len(mlps.layers) == 2 and mlps.neurons == 48
    with torch.no_grad():
        expected = model(IDS).logits
        hidden = model.base_model(input_ids=IDS).last_hidden_state
        ours, _ = LogitHead.from_model(model).logits(hidden.reshape(-1, hidden.shape[-1]))
    torch.testing.assert_close(ours.view_as(expected), expected.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_slicing_equals_zeroing_the_removed_neurons(family, tmp_path):
    """Removing neuron j must change the model exactly as zeroing its output column does."""
    model = tiny_model(family)
    dense_zeroed = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(3)
    keep = [torch.randperm(48, generator=gen)[:30].sort().values for _ in range(2)]
    for layer, k in zip(find_mlps(dense_zeroed).layers, keep):
        removed = torch.tensor(sorted(set(range(48)) - set(k.tolist())))
        layer.output.weight.data.index_fill_(layer.output.weight_axis, removed, 0.0)

    mlps = find_mlps(model)
    before = count_parameters(model)
    prune_mlps(mlps, model.config, keep)
    assert count_parameters(model) == before - 18 * sum(layer.params_per_neuron() for layer in find_mlps(model).layers)
    with torch.no_grad():
        pruned_logits = model(IDS).logits
        torch.testing.assert_close(pruned_logits, dense_zeroed(IDS).logits, rtol=1e-5, atol=1e-5)

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert find_mlps(reloaded).neurons == 30
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, pruned_logits, rtol=0, atol=0)


def test_params_per_neuron_counts_biases():
    gated_bias = find_mlps(tiny_model("llama")).layers[0]  # mlp_bias=True: gate and up biases go with the neuron
    assert gated_bias.params_per_neuron() == 3 * 32 + 2
    assert find_mlps(tiny_model("qwen2")).layers[0].params_per_neuron() == 3 * 32
    assert find_mlps(tiny_model("gpt2")).layers[0].params_per_neuron() == 2 * 32 + 1  # c_fc bias
    assert find_mlps(tiny_model("phi3")).layers[0].params_per_neuron() == 3 * 32


def test_plan_matches_real_parameter_count_after_pruning():
    model = tiny_model("gpt2")
    mlps = find_mlps(model)
    plan = plan_keep(count_parameters(model), mlps, pruning_ratio=0.05)
    prune_mlps(mlps, model.config, [torch.arange(plan.k)] * 2)
    assert count_parameters(model) == plan.params_after
    assert model.config.n_inner == plan.k


class MoEBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList([nn.Linear(4, 4)])


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.block_sparse_moe = MoEBlock()


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("C", (), {"num_hidden_layers": 2})()
        self.layers = nn.ModuleList([Layer(), Layer()])


def test_unsupported_model_names_the_modules_found():
    with pytest.raises(UnsupportedModelError, match="block_sparse_moe: MoEBlock"):
        find_mlps(Unsupported())
