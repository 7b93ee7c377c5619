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


