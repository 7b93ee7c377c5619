"""The sensitivity engine: measuring one layer at a time, and the greedy split of a budget from the curves."""

from __future__ import annotations

import math

import pytest
import torch

from onnx_admm.allocation import Allocation, allocate
from onnx_admm.sensitivity import Curve, Probe, check_levels, keep_counts, measure, split


def _curve(size: int, drops: list[tuple[int, float]], dense: float = 0.9) -> Curve:
    return Curve(size, dense, tuple((k, dense - d) for k, d in drops))


CURVES = {
    # cheap: loses nothing until 10% is left
    "big": _curve(1000, [(500, 0.0), (100, 0.0), (10, 0.2), (1, 0.8)]),
    # expensive from the first cut
    "small": _curve(100, [(50, 0.3), (10, 0.6), (1, 0.8)]),
    # noisy: measured better at 20 than at 60 (the running maximum takes 0.1 there)
    "noisy": _curve(200, [(60, 0.1), (20, 0.05), (1, 0.5)]),
}
MINS = {"big": 1, "small": 1, "noisy": 1}


def test_drops_are_monotone_and_interpolated_linearly():
    noisy = CURVES["noisy"]
    assert noisy.drops() == [(200, 0.0), (60, pytest.approx(0.1)), (20, pytest.approx(0.1)), (1, pytest.approx(0.5))]
    assert noisy.drop_at(130) == pytest.approx(0.05)  # halfway from (200, 0) to (60, 0.1)
    assert noisy.drop_at(10) == pytest.approx(0.1 + 0.4 * 10 / 19)
    with pytest.raises(ValueError, match="outside the measured range"):
        noisy.drop_at(0)
    with pytest.raises(ValueError, match="fall strictly"):
        Curve(10, 0.9, ((5, 0.8), (5, 0.7)))


def test_split_sums_exactly_spends_the_cheap_layer_first_and_stays_nested():
    total = sum(c.size for c in CURVES.values())
    previous = None
    for keep in range(total, 2, -7):  # falling budgets, as progressive stages ask
        keeps = split(CURVES, keep, MINS)
        assert sum(keeps.values()) == keep
        assert all(MINS[n] <= keeps[n] <= CURVES[n].size for n in keeps)
        if previous is not None:  # a smaller budget's split lies inside the larger one's
            assert all(keeps[n] <= previous[n] for n in keeps)
        previous = keeps
    # 900 removals: "big" costs 0 down to 100 kept, so it alone gives them
    assert split(CURVES, total - 900, MINS) == {"big": 100, "small": 100, "noisy": 200}
    # the caps of an earlier stage are taken as the start, and the result is the same as from scratch
    first = split(CURVES, 400, MINS)
    assert split(CURVES, 200, MINS, caps=first) == split(CURVES, 200, MINS)


def test_a_saturated_plateau_costs_what_the_step_before_it_cost():
    # "flat" breaks the model at 100 kept (drop 0.85: chance) and loses nothing more below: read as measured,
    # its last 99 weights would be free and the split would empty it before paying anything elsewhere
    curves = {"flat": _curve(1000, [(200, 0.0), (100, 0.85), (1, 0.85)]),
              "other": _curve(1000, [(500, 0.0), (100, 0.2), (10, 0.4), (1, 0.45)])}
    for curve in curves.values():  # -log(share of the dense metric kept), cost per weight never falling
        costs = curve.costs()
        slopes = [(c1 - c0) / (k0 - k1) for (k0, c0), (k1, c1) in zip(costs, costs[1:])]
        assert all(b >= a - 1e-12 for a, b in zip(slopes, slopes[1:])) and costs[0] == (curve.size, 0.0)
    flat = curves["flat"].costs()
    assert flat[2] == (100, pytest.approx(-math.log(0.05 / 0.9)))  # the step down to chance
    assert flat[3][1] - flat[2][1] == pytest.approx(99 * flat[2][1] / 100)  # the plateau costs as much per weight
    mins = {"flat": 1, "other": 1}
    # after both free segments and "other" down to 10: its last 9 weights (0.0056 each) before flat's
    # plateau (0.0085 each, as its step down to 100)
    assert split(curves, 60, mins) == {"flat": 59, "other": 1}
    previous = None
    for keep in range(2000, 1, -11):
        keeps = split(curves, keep, mins)
        assert sum(keeps.values()) == keep
        if previous is not None:
            assert all(keeps[n] <= previous[n] for n in keeps)
        previous = keeps


def test_a_model_measured_at_zero_still_splits():
    curves = {"a": Curve(100, 0.0, ((50, 0.0), (1, 0.0))), "b": Curve(300, 0.0, ((100, 0.0), (1, 0.0)))}
    assert curves["a"].costs() == [(100, 0.0), (50, 0.0), (1, 0.0)]
    assert split(curves, 201, {"a": 1, "b": 1}) == {"a": 100, "b": 101}  # free everywhere: the larger layer first


def test_measure_prunes_one_layer_at_a_time_and_restores_it():
    g = torch.Generator().manual_seed(0)
    params = {"a": torch.nn.Parameter(torch.randn(20, generator=g)), "b": torch.nn.Parameter(torch.randn(4, 5, generator=g))}
    before = {n: p.detach().clone() for n, p in params.items()}
    events = []

    def nonzero_share() -> float:  # a "metric" that sees exactly what is pruned
        return sum(int((p != 0).sum()) for p in params.values()) / 40

    probes = {"a": [Probe.prune(10), Probe.prune(2)], "b": [Probe.prune(5)]}
    curves = measure(params, probes, nonzero_share, events.append)
    assert curves["a"].points == ((10, 30 / 40), (2, 22 / 40)) and curves["b"].points == ((5, 25 / 40),)
    assert curves["a"].dense == 1.0
    assert all(torch.equal(params[n], before[n]) for n in params)
    assert [e["kind"] for e in events] == ["measure_start", "measure", "measure", "measure"]
    assert [e["last"] for e in events[1:]] == [False, True, True] and events[-1]["done"] == events[0]["total"] == 3
    with pytest.raises(ValueError, match="no score output"):
        measure(params, probes, lambda: None)
    assert all(torch.equal(params[n], before[n]) for n in params)


def test_levels_and_keep_counts():
    assert check_levels([0.9, 0.5, 0.9]) == (0.5, 0.9)
    for bad in ([], [0.0], [1.0], [1.5]):
        with pytest.raises(ValueError):
            check_levels(bad)
    # 144 weights: 72, 36, 14, 7, 3 kept, then the minimum; duplicates and counts under the minimum merge
    assert keep_counts(144, (0.5, 0.75, 0.9, 0.95, 0.98), 1) == [72, 36, 14, 7, 3, 1]
    assert keep_counts(10, (0.5, 0.9, 0.99), 2) == [5, 2]


def test_allocate_dispatches_to_the_curves_and_needs_them():
    weights = {name: torch.randn(c.size) for name, c in CURVES.items()}
    keeps = allocate(weights, 150, Allocation("sensitivity", curves=CURVES))
    assert keeps == split(CURVES, 150, MINS)
    with pytest.raises(ValueError, match="needs measured curves"):
        allocate(weights, 150, Allocation("sensitivity"))
    with pytest.raises(ValueError, match="minimums alone keep"):  # the shared bounds come first
        allocate(weights, 150, Allocation("sensitivity", floor=0.5, curves=CURVES))
