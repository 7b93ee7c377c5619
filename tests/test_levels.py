"""Retraining on fixed levels: FixedLevels projection and the straight-through estimator."""

from __future__ import annotations

import pytest
import torch

from onnx_admm.levels import FixedLevels, RefitLevels, StraightThrough
from onnx_admm.quantizers import Binary, Ternary


def _random(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_fixed_levels_projects_to_the_nearest_level_per_tensor():
    levels = torch.tensor([-1.0, -0.25, 0.0, 0.5, 2.0])
    fixed = FixedLevels(levels[None])
    w = torch.tensor([[-3.0, -0.7, -0.1, 0.2, 0.3, 1.2, 1.3, 9.0]])
    expected = torch.tensor([[-1.0, -1.0, 0.0, 0.0, 0.5, 0.5, 2.0, 2.0]])
    assert torch.equal(fixed.project(w), expected)


def test_fixed_levels_of_a_projected_tensor_is_idempotent_and_keeps_values():
    w = _random((6, 10))
    q = torch.round(w * 3) / 3  # on a grid
    for axis in (None, 0, 1):
        fixed = FixedLevels.of(q, axis=axis)
        assert torch.equal(fixed.project(q), q)
        moved = fixed.project(w + 0.01)
        assert torch.equal(fixed.project(moved), moved)
        assert set(moved.unique().tolist()) <= set(q.unique().tolist())


def test_per_channel_levels_stay_in_their_channel():
    q = torch.tensor([[0.1, -0.1, 0.1], [5.0, -5.0, 5.0]])
    fixed = FixedLevels.of(q, axis=0)
    out = fixed.project(torch.tensor([[4.0, -4.0, 0.0], [0.2, 0.3, -9.0]]))
    assert torch.equal(out, torch.tensor([[0.1, -0.1, -0.1], [5.0, 5.0, -5.0]]))  # ties go to the lower level


def test_pruned_zero_is_not_a_level_for_kept_weights():
    q = torch.tensor([0.0, 0.0, 0.5, -0.5])
    support = torch.tensor([False, False, True, True])
    fixed = FixedLevels.of(q, support)
    out = fixed.project(torch.tensor([0.3, 0.01, 0.01, -0.02]), support)
    assert torch.equal(out, torch.tensor([0.0, 0.0, 0.5, -0.5]))  # kept entries never fall to 0


def test_straight_through_trains_latent_and_ends_on_levels():
    torch.manual_seed(0)
    target = _random((4, 8), 1)
    w = torch.nn.Parameter(_random((4, 8), 2))
    levels = FixedLevels(torch.tensor([[-1.0, -0.5, 0.5, 1.0]]))
    ste = StraightThrough({"w": w}, {"w": levels})
    optimizer = torch.optim.SGD([w], lr=0.1)
    losses = []
    for _ in range(60):
        ste.before_forward()
        assert set(w.detach().unique().tolist()) <= {-1.0, -0.5, 0.5, 1.0}
        loss = (w - target).pow(2).sum()
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        ste.before_step()
        optimizer.step()
    ste.finish()
    assert torch.equal(w.detach(), levels.project(w.detach()))  # exactly on levels
    best = float((levels.project(target) - target).pow(2).sum())  # the best point of the level set
    final = float((w.detach() - target).pow(2).sum())
    assert final < losses[0] / 2 and final <= best * 1.5, (losses[0], final, best)


def test_projected_context_restores_the_latent():
    w = torch.nn.Parameter(torch.tensor([0.3, -0.8]))
    ste = StraightThrough({"w": w}, {"w": FixedLevels(torch.tensor([[-1.0, 1.0]]))})
    with ste.projected():
        assert w.detach().tolist() == [1.0, -1.0]
    assert w.detach().tolist() == pytest.approx([0.3, -0.8])


def test_straight_through_can_start_from_the_weights_before_projection():
    # Binary levels {-1, +1}; the weight before the hard projection was +0.01 (one small step from
    # flipping), after it +1. The same gradient step flips the level only from the unprojected start.
    before = torch.tensor([0.01, -2.0])
    levels = FixedLevels(torch.tensor([[-1.0, 1.0]]))
    flipped = {}
    for start in (None, {"w": before}):
        p = torch.nn.Parameter(levels.project(before))
        ste = StraightThrough({"w": p}, {"w": levels}, start=start)
        ste.before_forward()
        assert torch.equal(p.detach(), torch.tensor([1.0, -1.0]))  # the forward pass sees the same levels
        (p * torch.tensor([1.0, 0.0])).sum().backward()
        ste.before_step()
        with torch.no_grad():
            p -= 0.05 * p.grad
        ste.finish()
        flipped[start is None] = p.detach()[0].item()
    assert flipped == {True: 1.0, False: -1.0}
    # a start outside the support is masked to 0 and stays 0
    p = torch.nn.Parameter(torch.zeros(2))
    ste = StraightThrough({"w": p}, {"w": levels}, {"w": torch.tensor([True, False])}, start={"w": before})
    ste.finish()
    assert torch.equal(p.detach(), torch.tensor([1.0, 0.0]))


def test_refit_levels_fit_like_the_quantizer_and_step_on_the_last_fit_in_between():
    ternary = Ternary(per_channel=True, axis=0)
    levels = RefitLevels(ternary, every=3)
    w = _random((4, 50), 3)
    assert torch.equal(levels.step(w), ternary.project(w))  # the first step fits
    a = levels.scale.clone()
    moved = w * 3
    out = levels.step(moved)  # between refits: nearest of {-a_c, 0, +a_c}, 0 below a_c / 2
    expected = torch.where(moved.abs() > a[:, None] / 2, torch.sign(moved) * a[:, None], torch.zeros(()))
    assert torch.equal(out, expected)
    levels.step(moved)
    assert torch.equal(levels.step(moved), ternary.project(moved))  # step 3: refit to the weights
    with pytest.raises(ValueError, match=r"RefitLevels\(every=...\) takes an int >= 1"):
        RefitLevels(ternary, every=0)


def _sign_training(ste, w, target, steps, lr):
    optimizer = torch.optim.SGD([w], lr=lr)
    for _ in range(steps):
        ste.before_forward()
        loss = (w - target).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        ste.before_step()
        optimizer.step()
    ste.finish()


def test_refit_binary_through_the_latent_flips_signs_a_projected_step_cannot():
    """Steps of lr * grad = 0.02 against levels of about 1: a weight trained on its projection alone snaps back
    to its sign after every step; the latent weights accumulate the steps and cross zero."""
    start = torch.tensor([[1.0, 0.9, -1.1, 1.2], [-2.0, 2.2, -1.8, 2.0]])
    target = torch.tensor([[-1.0, 1.0, 1.0, 1.0], [-2.0, -2.0, -2.0, 2.0]])
    w = torch.nn.Parameter(start.clone())
    quantizer = Binary(per_channel=True, axis=0)
    ste = StraightThrough({"w": w}, {"w": RefitLevels(quantizer)})
    _sign_training(ste, w, target, steps=150, lr=0.01)
    final = w.detach()
    assert torch.equal(torch.sign(final), torch.sign(target))
    for row in final:  # exactly {-a_c, +a_c}, one a per output channel
        assert row.abs().unique().numel() == 1
    assert torch.equal(final, quantizer.project(final))
    # The same steps on the projected weights (no latent): nothing flips.
    p = torch.nn.Parameter(quantizer.project(start))
    optimizer = torch.optim.SGD([p], lr=0.01)
    for _ in range(150):
        loss = (p - target).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            p.copy_(quantizer.project(p))
    assert torch.equal(torch.sign(p.detach()), torch.sign(start))


def test_clipping_keeps_latent_weights_within_a_factor_of_their_scale():
    """One entry pulled far out (steps of 0.1): unclipped its latent runs away from a = mean |w| (it ends far
    above 2a); clipped it stays within 2a of its channel's scale up to one step, and the weights end exactly
    on {-a_c, +a_c}."""
    start = torch.tensor([[0.5, -0.4, 0.6, -0.5], [0.01, -0.02, 0.03, 0.01]])
    target = torch.tensor([[50.0, -0.4, 0.6, -0.5], [0.01, -0.02, 0.03, 0.01]])
    binary = Binary(per_channel=True, axis=0)
    bounds = {}
    for clip in ({}, {"w": 2.0}):
        w = torch.nn.Parameter(start.clone())
        ste = StraightThrough({"w": w}, {"w": RefitLevels(binary)}, clip=clip)
        _sign_training(ste, w, target, steps=200, lr=0.001)
        scale = w.detach().abs().amax(dim=1)
        bounds[bool(clip)] = (ste.latent["w"].abs() / scale[:, None]).amax()
        assert torch.equal(w.detach(), binary.project(w.detach()))
    # 2a, plus the last step's push (0.1) measured against the scale refit after clipping
    assert bounds[True] <= 2.2 and bounds[False] > 3.0, bounds
    with pytest.raises(ValueError, match="clip factor of 'w' must be > 1"):
        StraightThrough({"w": w}, {"w": RefitLevels(binary)}, clip={"w": 1.0})
