"""Tests for onnx_admm.schedule: stage lists and nested masks over a progressive run."""

from __future__ import annotations

import pytest
import torch

from onnx_admm.allocation import Allocation, allocate
from onnx_admm.projections import Unstructured, Within, keep_count
from onnx_admm.schedule import (FALLBACK_RHO, ADMMPeriod, admm_period, auto_rho, geometric_stages, initial_rho,
                                rho_cap, rho_limit, validate_stages)


def test_geometric_stages_values():
    assert geometric_stages(0.99, 2) == pytest.approx([0.9, 0.99])
    assert geometric_stages(0.99, 2)[-1] == 0.99
    assert geometric_stages(0.975, 1) == [0.975]
    ratios = [1 / (1 - s) for s in geometric_stages(0.999, 3)]
    assert ratios == pytest.approx([10, 100, 1000])
    ratios = [1 / (1 - s) for s in geometric_stages(1 - 1 / 246, 4, first_ratio=4)]
    assert ratios == pytest.approx([4, 15.78, 62.3, 246], rel=1e-3)


@pytest.mark.parametrize(
    "args,match",
    [((1.0, 2), r"\[0, 1\)"), ((-0.1, 2), r"\[0, 1\)"), ((0.9, 0), ">= 1"), ((0.9, 2.0), ">= 1"),
     ((0.0, 3), "rise strictly"), ((0.9, 3, 20.0), "first_ratio")],
)
def test_geometric_stages_validates(args, match):
    with pytest.raises(ValueError, match=match):
        geometric_stages(*args)


def test_validate_stages():
    assert validate_stages((0.5, 0.9)) == [0.5, 0.9]
    for bad, match in (([], "at least one"), ([0.5, 0.5], "rise strictly"), ([0.9, 0.5], "rise strictly"),
                       ([0.5, 1.0], r"\[0, 1\)")):
        with pytest.raises(ValueError, match=match):
            validate_stages(bad)


@pytest.mark.parametrize("global_target", [False, True])
def test_progressive_masks_are_nested(global_target):
    """Between stages every weight drifts (worst case: even pruned ones move, and kept ones hit 0)."""
    g = torch.Generator().manual_seed(0)
    weights = {"conv": torch.randn(8, 4, 3, 3, generator=g), "fc": torch.randn(20, 30, generator=g)}
    supports = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    for stage, sparsity in enumerate(geometric_stages(0.98, 4)):
        for name, w in weights.items():
            w.add_(torch.randn(w.shape, generator=g))
            w[supports[name] & (torch.rand(w.shape, generator=g) < 0.3)] = 0.0  # kept weights that are exactly 0
        if global_target:
            keeps = allocate(weights, keep_count(sum(w.numel() for w in weights.values()), sparsity),
                             Allocation("global", floor=0.01), allowed=supports)
        else:
            keeps = {n: keep_count(w.numel(), sparsity) for n, w in weights.items()}
        new = {n: Within(Unstructured(keeps[n]), supports[n]).support(w) for n, w in weights.items()}
        for name in weights:
            assert not (new[name] & ~supports[name]).any(), f"stage {stage} revived a pruned entry of {name}"
            assert int(new[name].sum()) == keeps[name]
        supports = new
    if global_target:
        total = sum(int(s.sum()) for s in supports.values())
        assert total == keep_count(sum(w.numel() for w in weights.values()), 0.98)


def test_plain_projection_of_masked_weights_is_not_enough():
    """Why Within exists: projecting w * previous_support breaks ties at 0 by index, not by support."""
    w = torch.tensor([0.0, 0.0, 0.7, 0.0])
    previous = torch.tensor([False, False, True, True])  # entry 3 was kept but is now exactly 0
    assert Unstructured(2).support(w * previous).tolist() == [True, False, True, False]
    assert Within(Unstructured(2), previous).support(w).tolist() == [False, False, True, True]


def test_auto_rho_gives_the_same_pull_per_period_at_any_budget():
    from onnx_admm.schedule import PULL_START, admm_updates, auto_rho, rho_cap

    for lr, momentum, every in ((0.01, 0.9, 11), (0.1, 0.0, 40), (0.001, 0.5, 300)):
        rho = auto_rho(lr, momentum, every)
        assert rho * lr / (1 - momentum) * every == pytest.approx(PULL_START)
    assert auto_rho(0.01, 0.9, 10) == pytest.approx(10 * auto_rho(0.01, 0.9, 100))
    assert rho_cap(0.01, 0.9) == pytest.approx(1.0)  # one step alone closes 10% of the gap
    with pytest.raises(ValueError, match="auto_rho needs"):
        auto_rho(0.0, 0.9, 10)
    # at most one Z/U update per 10 steps, at least one
    assert [admm_updates(steps, 10) for steps in (0, 5, 10, 38, 99, 100, 5000)] == [1, 1, 1, 3, 9, 10, 10]


def test_admm_period_in_steps_makes_the_wanted_updates():
    # 3 epochs of 40 steps, 4 updates: every 30 steps, at most 4.
    assert admm_period(3, 40, None, 4) == ADMMPeriod(30, 4, in_steps=True)
    # 2 epochs of 10 steps: periods of MIN_PERIOD_STEPS (10) allow only 2 updates.
    assert admm_period(2, 10, None, 8) == ADMMPeriod(10, 2, in_steps=True)
    # An explicit period in epochs (a fraction with known lengths) updates at every period.
    assert admm_period(3, 40, 0.5, 4) == ADMMPeriod(20, None, in_steps=True)


def test_admm_period_of_a_plugin_counts_epochs():
    assert admm_period(6, None, None, 3) == ADMMPeriod(2, 3, in_steps=False)
    assert admm_period(6, None, 2, 3) == ADMMPeriod(2, None, in_steps=False)
    with pytest.raises(ValueError, match="admm.period below 1 needs in-memory data"):
        admm_period(6, None, 0.5, 3)


def test_initial_rho_and_its_limit():
    steps, epochs = ADMMPeriod(30, 4, True), ADMMPeriod(2, 3, False)
    assert initial_rho(0.5, "sgd", 0.01, 0.9, steps) == 0.5
    assert initial_rho(None, "sgd", 0.01, 0.9, steps, pull=0.3) == auto_rho(0.01, 0.9, 30, 0.3)
    assert initial_rho(None, "adam", 0.01, 0.9, steps) == FALLBACK_RHO
    assert initial_rho(None, "sgd", 0.01, 0.9, epochs) == FALLBACK_RHO
    assert rho_limit(7.0, 0.1, "sgd", 0.01, 0.9) == 7.0
    assert rho_limit(None, 0.1, "sgd", 0.01, 0.9) == max(0.1, rho_cap(0.01, 0.9))
    assert rho_limit(None, 1e9, "sgd", 0.01, 0.9) == 1e9
    assert rho_limit(None, 0.1, "adam", 0.01, 0.9) == float("inf")
