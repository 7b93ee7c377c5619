"""The learning-rate policies, the split of a total epoch budget, and the automatic stage count."""

from __future__ import annotations

import math

import pytest

from onnx_admm.recipe import DEFAULT_EPOCHS, CompressConfig
from onnx_admm.schedule import FINAL_SHARE, PhaseBudget, auto_stages, cubic_stages, lr_factor, split_budget
from onnx_admm.converters.errors import UserError


def test_cosine_anneals_from_one_to_zero_over_the_phase():
    factors = [lr_factor(s, 10, "cosine") for s in range(11)]
    assert factors[0] == 1.0 and factors[10] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(factors, factors[1:]))
    assert [lr_factor(s, 10, "constant") for s in range(10)] == [1.0] * 10


def test_reset_restarts_at_every_period_and_anneals_a_short_last_one():
    factors = [lr_factor(s, 10, "reset", period=4) for s in range(10)]
    assert factors[0] == factors[4] == factors[8] == 1.0  # restarts at each Z/U update
    assert factors[2] == pytest.approx(0.5) and factors[6] == pytest.approx(0.5)
    assert factors[9] == pytest.approx(0.5)  # the last period has 2 steps: 1.0, 0.5
    with pytest.raises(ValueError, match="period"):
        lr_factor(0, 10, "reset")
    with pytest.raises(ValueError, match="lr policy"):
        lr_factor(0, 10, "step")


@pytest.mark.parametrize("epochs", [1, 2.5, 10, 37])
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_split_budget_sums_to_the_budget(epochs, n):
    for admm in (True, False):
        parts = split_budget(epochs, n, share=0.6 if admm else 0.0)
        assert len(parts) == n
        assert sum(p.admm + p.retrain for p in parts) == pytest.approx(epochs)
        assert all(p.admm >= 0 and p.retrain > 0 for p in parts)
        if not admm:
            assert all(p.admm == 0 for p in parts)
        # the last stage closes with the final share of masked retraining
        assert parts[-1].retrain >= FINAL_SHARE * epochs - 1e-9


def test_split_budget_rejects_nonsense():
    with pytest.raises(ValueError, match="> 0 epochs"):
        split_budget(0, 2)
    with pytest.raises(ValueError, match="n_stages"):
        split_budget(10, 0)


def test_auto_stages_grow_with_the_ratio_and_fit_the_budget():
    assert auto_stages(0.0, None) == 1
    assert [auto_stages(1 - 1 / r, None) for r in (2, 5, 10, 40, 200, 400, 1000)] == [2, 2, 3, 4, 4, 5, 5]
    assert auto_stages(1 - 1 / 1000, 4) == 2  # at most one stage per 2 epochs
    assert auto_stages(1 - 1 / 1000, 1) == 1


def test_cubic_stages_follow_gradual_pruning():
    assert cubic_stages(0.995, 4) == pytest.approx([0.575234375, 0.870625, 0.979453125, 0.995])
    assert cubic_stages(0.9, 1) == [0.9]
    with pytest.raises(ValueError):
        cubic_stages(1.0, 2)


def test_recipe_budget_resolution():
    assert CompressConfig().budget == DEFAULT_EPOCHS
    cfg = CompressConfig.from_dict({"train": {"epochs": 10}})
    assert cfg.budget == 10 and sum(p.admm + p.retrain for p in cfg.stage_budgets(3)) == pytest.approx(10)
    fixed = CompressConfig.from_dict({"admm": {"epochs": 4, "retrain_epochs": 2}})
    assert fixed.budget is None and fixed.stage_budgets(2) == [PhaseBudget(4, 2)] * 2
    retrain_only = CompressConfig.from_dict({"train": {"epochs": 8}, "admm": {"epochs": 0}})
    assert all(p.admm == 0 for p in retrain_only.stage_budgets(2))
    with pytest.raises(UserError, match="contradict"):
        CompressConfig.from_dict({"train": {"epochs": 10}, "admm": {"epochs": 3}})
    with pytest.raises(UserError, match="train.epochs"):
        CompressConfig.from_dict({"train": {"epochs": -1}})
    with pytest.raises(UserError, match="lr_policy"):
        CompressConfig.from_dict({"admm": {"lr_policy": "warm"}})
    assert math.isclose(sum(p.admm + p.retrain for p in CompressConfig().stage_budgets(1)), DEFAULT_EPOCHS)
