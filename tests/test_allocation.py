"""Allocators of a global budget: exact totals, minimums, LAMP against a brute-force reference, and the
global allocation as the Euclidean projection onto the global set."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from onnx_admm.allocation import ALLOCATIONS, Allocation, allocate, floor_share, lamp_scores
from onnx_admm.projections import Unstructured, Within, keep_count, topk_mask
from onnx_admm.sensitivity import ALLOCATION_LEVELS, Curve, keep_counts


def _allocation(method: str, weights: dict[str, torch.Tensor], **minimums) -> Allocation:
    """``Allocation(method, **minimums)``; for ``sensitivity`` with curves measured on the weights themselves:
    the "metric" is the share of each layer's squared magnitude its top-k entries keep."""
    allocation = Allocation(method, **minimums)
    if method != "sensitivity":
        return allocation
    curves = {}
    for name, w in weights.items():
        kept = w.reshape(-1).double().square().sort(descending=True).values.cumsum(0)
        kept = kept / kept[-1].clamp_min(1e-30)
        counts = keep_counts(w.numel(), ALLOCATION_LEVELS, allocation.minimum(w.numel()))
        curves[name] = Curve(w.numel(), 1.0, tuple((k, float(kept[k - 1]) if k else 0.0) for k in counts))
    return Allocation(method, **minimums, curves=curves)


def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv": torch.randn(8, 3, 3, 3, generator=g) * 3,
        "fc1": torch.randn(300, 40, generator=g) * 0.1,
        "fc2": torch.randint(-1, 2, (10, 30), generator=g).float(),  # ties and zeros
    }


@pytest.mark.parametrize("method", ALLOCATIONS)
def test_every_allocator_sums_exactly_and_keeps_minimums(method):
    for seed in range(6):
        weights = _weights(seed)
        total = sum(w.numel() for w in weights.values())
        for sparsity in (0.0, 0.5, 0.9, 0.99, 0.998):
            keep = keep_count(total, sparsity)
            keeps = allocate(weights, keep, _allocation(method, weights))
            assert sum(keeps.values()) == keep
            for name, w in weights.items():
                assert 1 <= keeps[name] <= w.numel(), (method, sparsity, name)
            assert allocate(weights, keep, _allocation(method, weights)) == keeps  # deterministic


@pytest.mark.parametrize("method", ALLOCATIONS)
def test_min_keep_zero_may_empty_a_layer_and_floors_are_minimum_counts(method):
    weights = {"big": torch.randn(1000), "small": torch.randn(10)}
    keeps = allocate(weights, 5, _allocation(method, weights, min_keep=0))
    assert sum(keeps.values()) == 5
    keeps = allocate(weights, 200, _allocation(method, weights, min_keep=1, floor=0.05))
    assert keeps["big"] >= 50 and keeps["small"] >= 1 and sum(keeps.values()) == 200


def test_minimums_that_exceed_the_budget_raise_and_their_share_is_reported():
    weights = {"a": torch.randn(100), "b": torch.randn(100)}
    with pytest.raises(ValueError, match="minimums alone keep 20 weights but the target keeps only 10"):
        allocate(weights, 10, Allocation("lamp", floor=0.1))
    assert floor_share(weights, 40, Allocation("lamp", floor=0.1)) == 0.5
    assert floor_share(weights, 40, Allocation("lamp")) == 2 / 40
    with pytest.raises(ValueError, match="allocation must be one of"):
        Allocation("magnitude")
    with pytest.raises(ValueError, match="min_keep"):
        Allocation(min_keep=-1)


def _lamp_brute(w: torch.Tensor) -> torch.Tensor:
    """LAMP by its definition: w_u^2 / sum over entries v with |w_v| >= |w_u| (u included; among equal
    magnitudes the lower index counts as the larger)."""
    flat = w.reshape(-1).double()
    out = torch.empty_like(flat)
    order = sorted(range(flat.numel()), key=lambda i: (-abs(float(flat[i])), i))
    rank = {i: r for r, i in enumerate(order)}  # 0: the largest
    for u in range(flat.numel()):
        rest = sum(float(flat[v]) ** 2 for v in range(flat.numel()) if rank[v] <= rank[u])
        out[u] = float(flat[u]) ** 2 / rest if rest > 0 else 0.0
    return out.reshape(w.shape)


def test_lamp_scores_by_hand():
    # w^2 over the squares of the entries at least as large: the largest scores 1, the smallest least.
    scores = lamp_scores(torch.tensor([1.0, 3.0, -2.0]))
    assert torch.allclose(scores, torch.tensor([1 / 14, 1.0, 4 / 13], dtype=torch.float64))
    assert lamp_scores(torch.tensor([2.0, 2.0])).tolist() == [1.0, 0.5]  # ties: the lower index ranks first


def test_lamp_scores_match_a_brute_force_reference():
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(3, 5, generator=g)
        if seed % 3 == 0:
            w[0, :3] = 0.5  # ties
            w[1, 0] = 0.0
        assert torch.allclose(lamp_scores(w), _lamp_brute(w), atol=1e-12)
    assert torch.equal(lamp_scores(torch.zeros(4)), torch.zeros(4, dtype=torch.float64))


def test_lamp_allocation_is_top_k_of_lamp_scores_over_layers():
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        weights = {"conv": torch.randn(4, 2, 3, 3, generator=g) * 3, "fc1": torch.randn(30, 8, generator=g) * 0.1,
                   "fc2": torch.randint(-1, 2, (5, 6), generator=g).float()}
        scores = torch.cat([_lamp_brute(w).reshape(-1) for w in weights.values()])
        sizes = [w.numel() for w in weights.values()]
        for keep in (3, 50, 200):
            keeps = allocate(weights, keep, Allocation("lamp", min_keep=0))
            chosen = torch.sort(scores, descending=True, stable=True).indices[:keep]
            owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))[chosen]
            expected = torch.bincount(owner, minlength=len(sizes)).tolist()
            assert list(keeps.values()) == expected


def test_lamp_is_scale_free_per_layer_and_global_is_not():
    g = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(200, generator=g), "b": torch.randn(200, generator=g)}
    scaled = {"a": weights["a"] * 1e-3, "b": weights["b"]}
    assert allocate(weights, 40, Allocation("lamp")) == allocate(scaled, 40, Allocation("lamp"))
    assert allocate(scaled, 40, Allocation("global")) == {"a": 1, "b": 39}


def test_global_allocation_is_the_euclidean_projection_onto_the_global_set():
    """Brute force over every support of the right size: keeping the global top-k minimises ||W - Z||."""
    g = torch.Generator().manual_seed(3)
    weights = {"a": torch.randn(4, generator=g), "b": torch.randn(3, generator=g) * 2, "c": torch.randn(2, generator=g)}
    flat = torch.cat([w for w in weights.values()])
    for keep in range(3, 8):  # min_keep 1 per layer: supports with at least one entry per layer
        keeps = allocate(weights, keep, Allocation("global"))
        z = torch.cat([Unstructured(keeps[n]).project(w) for n, w in weights.items()])
        best = math.inf
        bounds = [(0, 4), (4, 7), (7, 9)]
        for support in itertools.combinations(range(9), keep):
            if not all(any(lo <= i < hi for i in support) for lo, hi in bounds):
                continue
            mask = torch.zeros(9, dtype=torch.bool)
            mask[list(support)] = True
            best = min(best, float(((flat - torch.where(mask, flat, torch.zeros(()))) ** 2).sum()))
        assert float(((flat - z) ** 2).sum()) == pytest.approx(best, abs=1e-9)


def test_uniform_and_erk_follow_their_densities():
    weights = {"conv": torch.randn(20, 1, 5, 5), "fc": torch.randn(500, 800)}
    keeps = allocate(weights, 4010, Allocation("uniform"))
    assert abs(keeps["conv"] / 500 - keeps["fc"] / 400000) < 2 / 500
    keeps = allocate(weights, 4010, Allocation("erk"))
    # ERK densities t * (20+1+5+5)/500 and t * (500+800)/400000 with 31 t + 1300 t = 4010: conv 93 of 500
    assert keeps == {"conv": 93, "fc": 3917}
    # a layer whose ERK density would pass 1 is kept dense, the rest rescaled to the budget
    keeps = allocate(weights, 40000, Allocation("erk"))
    assert keeps["conv"] == 500 and keeps["fc"] == 39500


def test_allowed_restricts_every_allocator():
    g = torch.Generator().manual_seed(2)
    weights = {"a": torch.randn(40, generator=g), "b": torch.randn(6, 10, generator=g)}
    for method in ALLOCATIONS:
        prev = allocate(weights, 50, _allocation(method, weights))
        allowed = {n: topk_mask(w, prev[n]) for n, w in weights.items()}
        drifted = {n: w + 0.5 * torch.randn(w.shape, generator=g) for n, w in weights.items()}
        keeps = allocate(drifted, 20, _allocation(method, weights), allowed=allowed)
        assert sum(keeps.values()) == 20
        for n, w in drifted.items():
            assert keeps[n] <= prev[n]
            s = Within(Unstructured(keeps[n]), allowed[n]).support(w)
            assert not (s & ~allowed[n]).any()
        with pytest.raises(ValueError, match="higher sparsity"):
            allocate(drifted, 60, _allocation(method, weights), allowed=allowed)
