"""Schedules: plain functions for progressive stage sparsities, learning rates and the epoch budget.

Each stage starts from the previous stage's retrained weights and must keep its zeros (progressive
masks are nested). Nesting is guaranteed by the projection, not by the weights' values:
wrap each stage's constraint as ``Within(constraint, previous_support)`` (and pass the previous supports
to ``allocation.allocate(..., allowed=...)`` for a global target). ``topk_mask`` then ranks every previously
kept entry above every previously pruned one, whatever their magnitudes, so even a kept weight that is
exactly 0.0 beats a pruned one in a tie, and a pruned weight that drifted away from 0 during the next
stage's ADMM training cannot come back. The only requirement is a rising target, which
:func:`validate_stages` checks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

__all__ = ["PhaseBudget", "admm_updates", "auto_rho", "auto_stages", "cubic_stages", "geometric_stages", "lr_factor", "split_budget",
           "rho_cap", "validate_stages"]


def validate_stages(stages: Sequence[float]) -> list[float]:
    """Check a list of stage sparsities and return it as a list of floats.

    Args:
        stages: Sparsities, strictly increasing, each in [0, 1).

    Returns:
        ``list(stages)`` as floats.
    """
    out = [float(s) for s in stages]
    if not out:
        raise ValueError("a schedule needs at least one stage, e.g. [0.975]")
    for i, s in enumerate(out):
        if not 0.0 <= s < 1.0:
            raise ValueError(
                f"stage {i + 1} has sparsity {s}; each stage's sparsity is a fraction of zeros in [0, 1) "
                "(a compression ratio r is sparsity 1 - 1/r)"
            )
        if i and s <= out[i - 1]:
            raise ValueError(
                f"stage sparsities must rise strictly (nested masks can only gain zeros), "
                f"but stage {i + 1} ({s}) is not above stage {i} ({out[i - 1]})"
            )
    return out


def cubic_stages(target_sparsity: float, n_stages: int) -> list[float]:
    """Stage sparsities on gradual magnitude pruning's cubic curve: ``s_f (1 - (1 - k/n)**3)``, k = 1..n.

    Zhu and Gupta (2017): the steps are large while many redundant weights remain and small near the
    target, so the late stages (where each weight counts) get the most retraining per weight removed.
    """
    if not 0.0 <= target_sparsity < 1.0:
        raise ValueError(f"target_sparsity must be in [0, 1), got {target_sparsity}; 40x is 0.975")
    if not isinstance(n_stages, int) or isinstance(n_stages, bool) or n_stages < 1:
        raise ValueError(f"n_stages must be an int >= 1, got {n_stages!r}")
    stages = [target_sparsity * (1 - (1 - k / n_stages) ** 3) for k in range(1, n_stages)] + [float(target_sparsity)]
    return validate_stages(stages)


SPACINGS = ("cubic", "geometric")

# How a global target is split over the layers (onnx_admm.allocation). The names live here, with the other
# recipe choices, so that the recipe (and the command line's option checks) can be read without torch.
ALLOCATIONS = ("lamp", "global", "erk", "uniform", "sensitivity")
# The sparsities ``onnx-admm analyze`` prunes each layer to alone by default, and the samples each of its
# measurements evaluates (onnx_admm.sensitivity): here for the same reason, the command line's defaults.
# 2,000 samples resolve a drop of 0.05 point, and 10 probes per layer of a model with dozens of layers
# stay a few hundred evaluations.
ANALYZE_LEVELS = (0.5, 0.75, 0.9, 0.95, 0.98)
SENSITIVITY_SAMPLES = 2000


def geometric_stages(target_sparsity: float, n_stages: int, first_ratio: float | None = None) -> list[float]:
    """Stage sparsities whose compression ratios 1/(1 - s) rise geometrically to the target.

    Without ``first_ratio`` the ratios are ``R**(k/n)`` for k = 1..n (R = 1/(1 - target)), so 0.99 (100x) in
    2 stages gives 10x, 100x -> [0.9, 0.99]. With ``first_ratio`` the ratios go geometrically from it to R,
    as in the paper's 4x -> 16x -> 64x -> 246x. The last stage is exactly ``target_sparsity``.

    Args:
        target_sparsity: Final sparsity, in [0, 1).
        n_stages: Number of stages, >= 1 (1 gives ``[target_sparsity]``).
        first_ratio: Optional compression ratio of the first stage, in [1, R).

    Returns:
        ``n_stages`` strictly increasing sparsities ending at ``target_sparsity``.
    """
    if not 0.0 <= target_sparsity < 1.0:
        raise ValueError(f"target_sparsity must be in [0, 1), got {target_sparsity}; 40x is 0.975")
    if not isinstance(n_stages, int) or isinstance(n_stages, bool) or n_stages < 1:
        raise ValueError(f"n_stages must be an int >= 1, got {n_stages!r}")
    if n_stages == 1:
        return [float(target_sparsity)]
    final = 1.0 / (1.0 - target_sparsity)
    if first_ratio is None:
        ratios = [final ** (k / n_stages) for k in range(1, n_stages)]
    else:
        if not 1.0 <= first_ratio < final:
            raise ValueError(
                f"first_ratio must be in [1, {final:g}) (below the target's ratio) for {n_stages} rising stages, "
                f"got {first_ratio}"
            )
        ratios = [first_ratio * (final / first_ratio) ** (k / (n_stages - 1)) for k in range(n_stages - 1)]
    stages = [1.0 - 1.0 / r for r in ratios] + [float(target_sparsity)]
    logger.debug("geometric stages to %s: %s", target_sparsity, stages)
    return validate_stages(stages)


LR_POLICIES = ("reset", "cosine", "constant")


def lr_factor(step: int, total: int, policy: str, period: int | None = None) -> float:
    """Learning-rate multiplier at ``step`` (0-based) of a phase of ``total`` steps.

    ``cosine`` anneals from 1 to 0 over the phase; ``reset`` anneals from 1 to 0 inside every ADMM period
    of ``period`` steps and starts again at each Z/U update (the authors' progressive code does this: W
    settles before each projection); ``constant`` is 1 throughout.
    """
    if policy not in LR_POLICIES:
        raise ValueError(f"lr policy must be one of {', '.join(LR_POLICIES)}, got {policy!r}")
    if policy == "constant" or total <= 0:
        return 1.0
    if policy == "reset":
        if not period or period < 1:
            raise ValueError(f"the reset policy needs a period of >= 1 step, got {period!r}")
        # The last period can be cut short by the end of the phase: it anneals over what is left.
        start = (step // period) * period
        length = min(period, total - start)
        return 0.5 * (1.0 + math.cos(math.pi * (step - start) / max(1, length)))
    return 0.5 * (1.0 + math.cos(math.pi * step / total))


@dataclass(frozen=True)
class PhaseBudget:
    """Epochs of one stage's two phases (fractions allowed: the last epoch of a phase is cut short)."""

    admm: float
    retrain: float


# How a total budget of E epochs is split when the user gives one number (train.epochs):
# FINAL_SHARE of it is the last stage's closing masked retraining; the rest is spread evenly over the
# stages, ADMM_SHARE of each stage's part in ADMM and the remainder in masked retraining.
FINAL_SHARE = 0.3
ADMM_SHARE = 0.6


def split_budget(epochs: float, n_stages: int, share: float = ADMM_SHARE) -> list[PhaseBudget]:
    """Split ``epochs`` over ``n_stages`` stages; with ``share=0`` every epoch is masked retraining.

    Each stage gets ``(1 - FINAL_SHARE) * epochs / n_stages`` epochs, ``share`` of them ADMM; the last
    stage's retraining also gets the closing ``FINAL_SHARE * epochs``. The parts sum to ``epochs``.
    """
    if not epochs > 0:
        raise ValueError(f"the training budget must be > 0 epochs, got {epochs!r}")
    if not isinstance(n_stages, int) or n_stages < 1:
        raise ValueError(f"n_stages must be an int >= 1, got {n_stages!r}")
    if not 0 <= share < 1:
        raise ValueError(f"share must be in [0, 1), got {share!r}")
    part = (1.0 - FINAL_SHARE) * epochs / n_stages
    admm_part = share * part
    out = [PhaseBudget(admm_part, part - admm_part) for _ in range(n_stages)]
    out[-1] = PhaseBudget(admm_part, epochs - admm_part - (n_stages - 1) * part)
    return out


# Progressive stages: one per STAGE_RATIO of compression plus one (measured on Fashion-MNIST LeNet-5 at
# 200x, 10 epochs: 4 cubic stages beat 3 geometric ones by 0.2-0.8 point), at most one per
# MIN_STAGE_EPOCHS of budget.
STAGE_RATIO = 6.0
MIN_STAGE_EPOCHS = 2.0


def auto_stages(target_sparsity: float, epochs: float | None) -> int:
    """Number of progressive stages to reach ``target_sparsity`` when the user does not say."""
    if target_sparsity <= 0:
        return 1
    ratio = 1.0 / (1.0 - target_sparsity)
    n = 1 + max(1, math.ceil(math.log(ratio) / math.log(STAGE_RATIO) - 1e-9))
    if epochs is not None:
        n = min(n, max(1, int(epochs // MIN_STAGE_EPOCHS)))
    return n


# The pull of the ADMM penalty over one Z/U period: how much of the gap between W and Z - U the penalty
# alone closes in ``every`` SGD steps, kappa = rho * lr / (1 - momentum) * every (the relaxation rate of the
# quadratic term per step, times the steps). A fixed rho means very different things at different
# budgets: rho 1e-2 with lr 0.01, momentum 0.9 and 11 steps per period is kappa 0.011, the penalty
# barely acts and W walks away from Z (the primal residual rose in every stage, measured on LeNet-5 at
# 200x). The authors' rho 1e-3 works for them because a period is one or more whole epochs (thousands
# of steps). ``auto_rho`` picks the rho whose first period has pull PULL_START; the schedule's growth
# then raises it per update (1.3^9 = 10.6 over 10 updates), so late periods close most of the gap.
PULL_START = 0.2
# ADMM assumes each W step nearly converges between Z/U updates; a period of one or two steps with a
# dual update each time oscillates (measured on the digits CNN: residuals above 1 and a dead network at a
# 6-epoch budget, 17 steps for 10 updates). So a phase makes at most one update per MIN_PERIOD_STEPS
# steps, and rho stops growing where one step alone would close STEP_PULL_MAX of the gap.
MIN_PERIOD_STEPS = 10
STEP_PULL_MAX = 0.1


def admm_updates(steps: int, wanted: int) -> int:
    """Z/U updates for an ADMM phase of ``steps`` steps: ``wanted``, fewer when periods would drop below
    MIN_PERIOD_STEPS steps, at least 1."""
    return max(1, min(wanted, steps // MIN_PERIOD_STEPS))


def rho_cap(lr: float, momentum: float) -> float:
    """The rho at which one SGD step's pull is STEP_PULL_MAX (the cap of the automatic schedule)."""
    return STEP_PULL_MAX * (1 - momentum) / lr


def auto_rho(lr: float, momentum: float, every: int, pull: float = PULL_START) -> float:
    """The initial rho whose penalty alone closes about ``pull`` of the W-to-Z gap in one period of ``every``
    SGD steps at learning rate ``lr`` and ``momentum`` (see PULL_START)."""
    if not lr > 0 or not 0 <= momentum < 1 or every < 1 or not pull > 0:
        raise ValueError(f"auto_rho needs lr > 0, momentum in [0, 1), every >= 1, pull > 0; got "
                         f"{lr}, {momentum}, {every}, {pull}")
    return pull * (1 - momentum) / (lr * every)


@dataclass(frozen=True)
class ADMMPeriod:
    """When an ADMM phase updates Z and U: every ``every`` steps (in-memory data, whose epoch length is
    known) or epochs (a loader plugin), at most ``limit`` times (None: at every period)."""

    every: int
    limit: int | None
    in_steps: bool


def admm_period(epochs: float, per_epoch: int | None, period: float | None, updates: int) -> ADMMPeriod:
    """The Z/U period of a phase of ``epochs`` epochs of ``per_epoch`` steps (None: a plugin's unknown
    length). ``period`` (epochs, may be a fraction with known lengths) wins; without it the phase makes
    exactly ``updates`` updates (the last period runs longer), fewer when periods would fall under
    MIN_PERIOD_STEPS steps (``admm_updates``)."""
    if per_epoch is None:
        if period is not None and period < 1:
            raise ValueError("admm.period below 1 needs in-memory data (.npz), whose batches per epoch are "
                             "known; use a whole number of epochs with a loader plugin")
        every = int(period) if period is not None else max(1, round(epochs) // updates)
        return ADMMPeriod(every, updates if period is None else None, in_steps=False)
    if period is not None:
        return ADMMPeriod(max(1, round(period * per_epoch)), None, in_steps=True)
    steps = round(epochs * per_epoch)
    n = admm_updates(steps, updates)
    return ADMMPeriod(max(1, steps // n), n, in_steps=True)


# The initial rho when the automatic rule does not apply (Adam's steps are not lr-sized; a plugin's
# period length in steps is unknown).
FALLBACK_RHO = 1e-2


def initial_rho(rho: float | None, optimizer: str, lr: float, momentum: float, period: ADMMPeriod,
                pull: float = PULL_START) -> float:
    """``rho`` when given, else the one whose pull per Z/U period is the same at every budget (auto_rho);
    with Adam, or a period counted in epochs, FALLBACK_RHO."""
    if rho is not None:
        return rho
    if optimizer != "sgd" or not period.in_steps:
        return FALLBACK_RHO
    return auto_rho(lr, momentum, period.every, pull)


def rho_limit(rho_max: float | None, rho: float, optimizer: str, lr: float, momentum: float) -> float:
    """Where rho stops growing: ``rho_max`` when given; with SGD at least ``rho`` and rho_cap; with Adam none."""
    if rho_max is not None:
        return rho_max
    return max(rho, rho_cap(lr, momentum)) if optimizer == "sgd" else math.inf
