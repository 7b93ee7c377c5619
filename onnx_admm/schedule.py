"""Progressive compression schedules: plain functions that return lists of stage sparsities.

Each stage starts from the previous stage's retrained weights and must keep its zeros (DESIGN section 6:
"progressive masks are nested"). Nesting is guaranteed by the projection, not by the weights' values:
wrap each stage's constraint as ``Within(constraint, previous_support)`` (and pass the previous supports
to ``allocate_global(..., allowed=...)`` for a global target). ``topk_mask`` then ranks every previously
kept entry above every previously pruned one, whatever their magnitudes, so even a kept weight that is
exactly 0.0 beats a pruned one in a tie, and a pruned weight that drifted away from 0 during the next
stage's ADMM training cannot come back. The only requirement is a rising target, which
:func:`validate_stages` checks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

logger = logging.getLogger(__name__)

__all__ = ["geometric_stages", "validate_stages"]


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
                f"stage {i} has sparsity {s}; each stage's sparsity is a fraction of zeros in [0, 1) "
                "(a compression ratio r is sparsity 1 - 1/r)"
            )
        if i and s <= out[i - 1]:
            raise ValueError(
                f"stage sparsities must rise strictly (nested masks can only gain zeros), "
                f"but stage {i} ({s}) is not above stage {i - 1} ({out[i - 1]})"
            )
    return out


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
