"""Property tests for onnx_admm.projections: exact counts, idempotence, ties, Euclidean optimality."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from onnx_admm.projections import (
    Channel,
    Constraint,
    Filter,
    Unstructured,
    Within,
    allocate_global,
    keep_count,
    topk_mask,
)

SHAPES = [(1,), (7,), (4, 5), (3, 2, 3, 3), (16, 8)]


def _random(shape, seed, quantize=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    if quantize:  # few distinct values: many ties, including ties across signs
        w = torch.randint(-2, 3, shape, generator=g).float()
    return w


def _cases():
    for seed in range(12):
        for shape in SHAPES:
            yield seed, shape, seed % 3 == 0


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_topk_mask_exact_count_and_largest(fraction):
    for seed, shape, quantize in _cases():
        w = _random(shape, seed, quantize)
        keep = int(fraction * w.numel())
        mask = topk_mask(w, keep)
        assert mask.dtype == torch.bool and mask.shape == w.shape
        assert int(mask.sum()) == keep
        if 0 < keep < w.numel():
            assert w.abs()[mask].min() >= w.abs()[~mask].max()


def test_topk_mask_ties_lowest_index_wins():
    w = torch.full((4, 4), 0.5)
    mask = topk_mask(w, 8)
    assert mask.reshape(-1).tolist() == [True] * 8 + [False] * 8
    # sign does not break a tie in |w|
    w = torch.tensor([1.0, -2.0, 2.0, -1.0, 2.0])
    assert topk_mask(w, 2).tolist() == [False, True, True, False, False]
    assert topk_mask(w, 4).tolist() == [True, True, True, False, True]


def test_topk_mask_is_deterministic_across_calls():
    w = _random((64, 64), 3, quantize=True)
    first = topk_mask(w, 1000)
    for _ in range(3):
        assert torch.equal(topk_mask(w.clone(), 1000), first)


def test_topk_mask_bounds():
    w = torch.randn(3, 4)
    assert not topk_mask(w, 0).any()
    assert topk_mask(w, 12).all()
    with pytest.raises(ValueError, match="keep must be in"):
        topk_mask(w, 13)
    with pytest.raises(ValueError, match="keep must be in"):
        topk_mask(w, -1)


def test_topk_mask_allowed_ranks_first_even_when_zero():
    w = torch.tensor([5.0, 0.0, 4.0, 0.0, 3.0])
    allowed = torch.tensor([False, True, True, True, False])
    assert topk_mask(w, 2, allowed).tolist() == [False, True, True, False, False]
    assert topk_mask(w, 3, allowed).tolist() == [False, True, True, True, False]
    with pytest.raises(ValueError, match="allowed entries"):
        topk_mask(w, 4, allowed)
    with pytest.raises(ValueError, match="bool tensor"):
        topk_mask(w, 1, allowed.float())


def test_keep_count_rounding():
    assert keep_count(1000, 0.975) == 25
    assert keep_count(5, 0.9) == 1  # 0.5 rounds up despite 1 - 0.9 < 0.1 in binary
    assert keep_count(5, 0.7) == 2  # 1.5 -> 2
    assert keep_count(5, 0.5) == 3  # 2.5 -> 3 (half up, not half even)
    assert keep_count(0, 0.5) == 0
    assert keep_count(7, 0.0) == 7
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            keep_count(10, bad)


def test_unstructured_project_properties():
    for seed, shape, quantize in _cases():
        w = _random(shape, seed, quantize)
        before = w.clone()
        for keep in {0, 1, w.numel() // 3, w.numel()}:
            c = Unstructured(keep)
            p = c.project(w)
            assert torch.equal(w, before), "project must not modify its input"
            assert p.shape == w.shape and p.dtype == w.dtype
            support = c.support(w)
            assert int(support.sum()) == keep
            assert torch.equal(p[support], w[support]) and not p[~support].any()
            assert torch.equal(c.project(p), p), "idempotence"


def test_unstructured_is_the_euclidean_nearest_point():
    for seed in range(20):
        w = _random((6,), seed, quantize=seed % 2 == 0)
        for keep in range(7):
            best = min(
                float(torch.linalg.vector_norm(w - w * torch.tensor([i in s for i in range(6)])))
                for s in itertools.combinations(range(6), keep)
            )
            got = float(torch.linalg.vector_norm(w - Unstructured(keep).project(w)))
            assert got == pytest.approx(best, abs=1e-6)


def test_project_keeps_dtype_and_handles_inf():
    w = torch.tensor([1.0, float("inf"), -3.0, 0.5], dtype=torch.float16)
    p = Unstructured(2).project(w)
    assert p.dtype == torch.float16
    assert p.tolist() == [0.0, float("inf"), -3.0, 0.0]
    assert not torch.isnan(Unstructured(0).project(w)).any()


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_constraints_validate(bad):
    with pytest.raises(ValueError, match="keep_count"):
        Unstructured(bad)
    with pytest.raises(ValueError, match="keep_count"):
        Filter(bad)


def test_constraints_are_hashable_values_and_satisfy_protocol():
    assert Unstructured(3) == Unstructured(3) and len({Unstructured(3), Unstructured(3), Filter(3)}) == 2
    for c in (Unstructured(1), Filter(1), Channel(1), Within(Unstructured(1), torch.ones(2, dtype=torch.bool))):
        assert isinstance(c, Constraint)
    with pytest.raises(ValueError, match="bool tensor"):
        Within(Unstructured(1), torch.ones(2))


@pytest.mark.parametrize("cls,dim", [(Filter, 0), (Channel, 1)])
def test_group_constraints(cls, dim):
    for seed in range(10):
        w = _random((6, 5, 3, 3), seed)
        n_groups = w.shape[dim]
        for keep in range(n_groups + 1):
            c = cls(keep)
            support = c.support(w)
            # whole groups only, exactly `keep` of them
            groups = support.movedim(dim, 0).reshape(n_groups, -1)
            assert torch.equal(groups.all(dim=1), groups.any(dim=1))
            assert int(groups.all(dim=1).sum()) == keep
            p = c.project(w)
            assert torch.equal(c.project(p), p)
            norms = torch.linalg.vector_norm(w.movedim(dim, 0).reshape(n_groups, -1), dim=1)
            kept = groups.all(dim=1)
            if 0 < keep < n_groups:
                assert norms[kept].min() >= norms[~kept].max()
    with pytest.raises(ValueError, match="keep must be in"):
        cls(w.shape[dim] + 1).project(w)


def test_channel_needs_two_dims():
    with pytest.raises(ValueError, match="use Unstructured"):
        Channel(1).support(torch.ones(4))


def test_within_restricts_groups_and_entries():
    w = _random((4, 3), 0)
    allowed = torch.ones(4, 3, dtype=torch.bool)
    allowed[0] = False
    allowed[1, 0] = False
    s = Within(Filter(3), allowed).support(w)
    assert not s[0].any() and not s[1, 0] and s[1:].sum() == 8
    with pytest.raises(ValueError, match="allowed entries"):
        Within(Filter(4), allowed).support(w)


def _global_reference(weights, keeps):
    """Entries chosen by per-layer top-k with the allocated keeps."""
    return {n: topk_mask(w, keeps[n]) for n, w in weights.items()}


def test_allocate_global_sums_exactly_and_respects_floors():
    for seed in range(15):
        g = torch.Generator().manual_seed(seed)
        weights = {
            "conv": torch.randn(8, 3, 3, 3, generator=g) * 3,
            "fc1": torch.randn(300, 40, generator=g) * 0.1,
            "fc2": torch.randint(-1, 2, (10, 30), generator=g).float(),  # ties
        }
        n_total = sum(w.numel() for w in weights.values())
        for sparsity in (0.0, 0.5, 0.9, 0.97):
            keeps = allocate_global(weights, sparsity, floor=0.01)
            assert sum(keeps.values()) == keep_count(n_total, sparsity)
            for name, w in weights.items():
                assert max(1, math.ceil(0.01 * w.numel())) <= keeps[name] <= w.numel()
            assert allocate_global(weights, sparsity, floor=0.01) == keeps


def test_allocate_global_follows_global_ranking_without_floors():
    g = torch.Generator().manual_seed(1)
    weights = {"a": torch.randn(50, generator=g), "b": torch.randn(30, generator=g) * 2}
    keeps = allocate_global(weights, 0.75, floor=0.0)
    all_mag = torch.cat([w.abs() for w in weights.values()])
    threshold = all_mag.sort(descending=True).values[keeps["a"] + keeps["b"] - 1]
    assert keeps == {n: int((w.abs() >= threshold).sum()) for n, w in weights.items()}


def test_allocate_global_floor_never_empties_a_layer():
    weights = {"big": torch.full((100,), 10.0), "tiny": torch.full((100,), 1e-6)}
    assert allocate_global(weights, 0.9, floor=0.0) == {"big": 19, "tiny": 1}
    assert allocate_global(weights, 0.9, floor=0.05) == {"big": 15, "tiny": 5}
    # ties across layers go to the earlier layer
    assert allocate_global({"x": torch.ones(4), "y": torch.ones(4)}, 0.5, floor=0.0) == {"x": 3, "y": 1}


def test_allocate_global_impossible_floors_raise():
    weights = {"a": torch.randn(100), "b": torch.randn(100)}
    with pytest.raises(ValueError, match="lower floor"):
        allocate_global(weights, 0.95, floor=0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        allocate_global(weights, 1.0)
    with pytest.raises(ValueError, match="floor"):
        allocate_global(weights, 0.5, floor=1.5)


def test_allocate_global_with_allowed_matches_within_projection():
    g = torch.Generator().manual_seed(2)
    weights = {"a": torch.randn(40, generator=g), "b": torch.randn(6, 10, generator=g)}
    prev = allocate_global(weights, 0.5)
    allowed = {n: topk_mask(w, prev[n]) for n, w in weights.items()}
    drifted = {n: w + 0.5 * torch.randn(w.shape, generator=g) for n, w in weights.items()}
    keeps = allocate_global(drifted, 0.8, allowed=allowed)
    assert sum(keeps.values()) == keep_count(100, 0.8)
    for n, w in drifted.items():
        s = Within(Unstructured(keeps[n]), allowed[n]).support(w)
        assert not (s & ~allowed[n]).any()
    with pytest.raises(ValueError, match="higher sparsity"):
        allocate_global(drifted, 0.3, allowed=allowed)
