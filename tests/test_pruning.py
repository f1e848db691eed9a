"""Ratio solving, keep selection and nested kept sets."""

import pytest
import torch
from conftest import tiny_model

from module.model.mlp import count_parameters, find_mlps
from module.prune.criteria import top_k_sorted
from module.prune.plan import PruningError, plan_keep, relative_keep


def brute_force_k(params: int, per_k: int, neurons: int, ratio: float) -> int:
    """The k whose removed share is closest to `ratio`, by trying every k."""
    return min(range(1, neurons + 1), key=lambda k: abs((neurons - k) * per_k / params - ratio))


@pytest.mark.parametrize("ratio", [0.01, 0.05, 0.1, 0.137, 0.2])
def test_pruning_ratio_is_solved_exactly(ratio):
    model = tiny_model("qwen2")  # 2 layers x 48 neurons x (3 x 32) parameters each
    params = count_parameters(model)
    plan = plan_keep(params, find_mlps(model), pruning_ratio=ratio)
    assert plan.k == brute_force_k(params, 2 * 96, 48, ratio)
    assert plan.achieved_ratio == pytest.approx((48 - plan.k) * 192 / params)
    assert plan.params_after == params - (48 - plan.k) * 192


def test_round_to_reports_exact_and_rounded():
    model = tiny_model("qwen2")
    params = count_parameters(model)
    plan = plan_keep(params, find_mlps(model), pruning_ratio=0.137, round_to=8)
    assert plan.k % 8 == 0 and abs(plan.k - plan.k_exact) <= 4
    assert plan.achieved_ratio_exact == pytest.approx((48 - plan.k_exact) * 192 / params)
    assert plan.achieved_ratio == pytest.approx((48 - plan.k) * 192 / params)


def test_mlp_ratio_uses_the_release_semantics():
    model = tiny_model("llama")
    plan = plan_keep(count_parameters(model), find_mlps(model), mlp_ratio=1.1, hidden_size=32)
    assert plan.k == int(1.1 * 32) == 35


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"pruning_ratio": 0.9}, "removes more than the MLPs hold"),
        ({"pruning_ratio": 0.0}, "must be in"),
        ({"pruning_ratio": 1.0}, "must be in"),
        ({"mlp_ratio": 2.0, "hidden_size": 32}, "valid is 1..48"),
        ({"mlp_ratio": 0.01, "hidden_size": 32}, "valid is 1..48"),
    ],
)
def test_impossible_sizes_fail(kw, message):
    model = tiny_model("qwen2")
    with pytest.raises(PruningError, match=message):
        plan_keep(count_parameters(model), find_mlps(model), **kw)


def test_ratio_that_removes_every_neuron_fails():
    model = tiny_model("qwen2")
    params = count_parameters(model)
    mlp_share = 48 * 192 / params  # removing all 48 neurons: allowed by the MLP total, not by k >= 1
    with pytest.raises(PruningError, match="every MLP neuron"):
        plan_keep(params, find_mlps(model), pruning_ratio=mlp_share - 1e-9)


def test_top_k_breaks_ties_by_index_and_nests():
    scores = torch.tensor([0.5, 0.9, 0.5, 0.1, 0.9, 0.5], dtype=torch.float64)
    assert top_k_sorted(scores, 3).tolist() == [0, 1, 4]
    assert top_k_sorted(scores, 4).tolist() == [0, 1, 2, 4]
    for k_small in range(1, 6):
        small, large = set(top_k_sorted(scores, k_small).tolist()), set(top_k_sorted(scores, k_small + 1).tolist())
        assert small < large


def test_relative_keep_maps_into_the_current_numbering():
    current = torch.tensor([1, 4, 6, 9])
    assert relative_keep(current, torch.tensor([4, 9])).tolist() == [1, 3]
    with pytest.raises(PruningError):
        relative_keep(current, torch.tensor([4, 5]))
