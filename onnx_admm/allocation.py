"""How a global pruning budget is split over layers (pure torch).

A global target keeps ``K`` weights in total over a pool of layers. An *allocation* decides how many
each layer keeps; the per-layer projection then keeps that layer's largest ``|w|``. Methods:

- ``lamp`` (default): Layer-Adaptive Magnitude-based Pruning scores (Lee et al., ICLR 2021). Within a
  layer, with entries sorted by ``w**2`` ascending, entry ``u`` scores ``w_u**2 / sum_{v >= u} w_v**2``
  (its share of what is left of the layer when everything smaller is gone); the top ``K`` scores over
  all layers are kept. The score is scale-free per layer, so no layer is emptied because its weights
  happen to be small, and large layers lose the most.
- ``global``: raw ``|w|`` ranked over all layers. Keeping the top ``K`` is the Euclidean projection onto
  {at most ``K`` nonzeros in the pool} (with the minimums below: onto that set intersected with the
  per-layer minimums), which is what ADMM's Z step needs for an exact global constraint; but it depends
  on each layer's scale.
- ``erk``: Erdos-Renyi-Kernel densities (Evci et al., 2020): density proportional to
  ``sum(shape) / prod(shape)``, capped at 1, scaled to the budget.
- ``uniform``: every layer keeps the same fraction.
- ``sensitivity``: from measured per-layer curves of the task metric against sparsity
  (``onnx_admm.sensitivity``: each layer pruned alone): the budget goes greedily where removing a weight
  costs the least measured drop. ``Allocation.curves`` holds them; compress measures them once per run,
  on the dense model, so the split does not follow W + U during ADMM.

Minimums: every layer keeps at least ``min_keep`` entries (default 1, so no layer is emptied unless
``min_keep = 0``), and at least ``ceil(floor * n)`` for a fractional ``floor`` (default 0). They are
minimum counts, taken first; if they alone exceed the budget the allocation fails with a message, and
:func:`floor_share` tells how much of the budget they hold (the report warns above one half).

With ``allowed`` (the previous stage's support, for nested progressive masks) only allowed entries are
ranked and counted; a layer never keeps more than it is allowed.

Counts are exact: the keeps sum to ``K`` and ties break deterministically (layer order, then flat index).
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from onnx_admm.schedule import ALLOCATIONS
from onnx_admm.sensitivity import Curves, split

logger = logging.getLogger(__name__)

__all__ = ["ALLOCATIONS", "Allocation", "allocate", "bounds", "erk_densities", "floor_share", "lamp_scores"]

_COUNT_DECIMALS = 9


@dataclass(frozen=True)
class Allocation:
    """How a global budget is split: the method and the per-layer minimums.

    Attributes:
        method: One of ``ALLOCATIONS``.
        min_keep: Every layer keeps at least this many entries (0 lets a layer be emptied).
        floor: Every layer keeps at least this fraction of its entries, in [0, 1).
        curves: For ``sensitivity``: layer name -> measured ``sensitivity.Curve`` (None until measured).
    """

    method: str = "lamp"
    min_keep: int = 1
    floor: float = 0.0
    curves: Curves | None = None

    def __post_init__(self) -> None:
        if self.method not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.method!r}")
        if not isinstance(self.min_keep, int) or isinstance(self.min_keep, bool) or self.min_keep < 0:
            raise ValueError(f"min_keep must be an integer >= 0, got {self.min_keep!r}")
        if not 0.0 <= self.floor < 1.0:
            raise ValueError(f"floor is a fraction of each layer in [0, 1), got {self.floor!r}")

    def minimum(self, n: int) -> int:
        """The least number of entries a layer of ``n`` entries keeps."""
        return min(n, max(self.min_keep, math.ceil(round(self.floor * n, _COUNT_DECIMALS))))


def _magnitudes(w: Tensor, allowed: Tensor | None) -> Tensor:
    """``|w|`` flat on the CPU, -1 outside ``allowed`` (below every magnitude)."""
    mag = w.detach().reshape(-1).abs().cpu()
    if allowed is not None:
        mag = torch.where(allowed.reshape(-1).cpu(), mag, torch.full_like(mag, -1.0))
    return mag


def _lamp_along(descending: Tensor) -> Tensor:
    """LAMP scores of magnitudes sorted in descending order, computed in place: ``descending`` (float64, the
    caller's own copy) becomes the scores. The scores fall along it: w^2 falls and the sum above it grows."""
    # In place: a layer of 38M weights (AlexNet's fc6) held five float64 copies at once.
    scores = descending.square_()
    # An entry's denominator: its own square and those of every entry ranked before it (at least as large).
    # It is 0 only where the entry is 0 (and every positive float32 squared is far above float64's tiny),
    # so clamping it gives those entries 0 without a second pass.
    denominator = torch.cumsum(scores, 0).clamp_min_(torch.finfo(torch.float64).tiny)
    return scores.div_(denominator)


def _sorted_lamp(w: Tensor, allowed: Tensor | None) -> tuple[Tensor, Tensor]:
    """LAMP scores of the allowed entries of ``w`` in descending |w| order (lower index first among ties),
    and that order (flat indices)."""
    mag = _magnitudes(w, allowed)
    order = torch.sort(mag, descending=True, stable=True).indices
    if allowed is not None:
        order = order[: int(allowed.sum())]
    return _lamp_along(mag[order].double()), order


def _lamp_multiset(w: Tensor, allowed: Tensor | None) -> Tensor:
    """The LAMP scores of ``_sorted_lamp`` without their order: equal magnitudes have equal squares, so
    whichever of them comes first, the scores along the sort are the same. An unstable sort of the
    values alone skips the index sort and the gather (a third of the time on ResNet-50's 25M weights)."""
    magnitudes = _magnitudes(w, allowed)
    ascending = (magnitudes if magnitudes.dtype in (torch.float32, torch.float64) else magnitudes.float()).numpy()
    ascending.sort()  # in place, and no indices (torch.sort makes both: 12 bytes an entry more)
    # The entries outside ``allowed`` (-1) sort first; the reversed view of the rest becomes one float64 copy.
    count = ascending.size if allowed is None else int(allowed.sum())
    return _lamp_along(torch.from_numpy(np.ascontiguousarray(ascending[ascending.size - count:][::-1],
                                                             dtype=np.float64)))


def lamp_scores(w: Tensor, allowed: Tensor | None = None) -> Tensor:
    """LAMP score of every entry of ``w`` (same shape, float64 on the CPU); -1 outside ``allowed``.

    Lee et al. (ICLR 2021): ``w_u^2 / sum of w_v^2 over the entries v with |w_v| >= |w_u|`` (u included),
    so every layer's largest weight scores 1 and a layer's scores do not depend on its scale. Ties in
    ``|w|`` rank by flat index (the lower index counts as the larger), as :func:`allocate` does.
    """
    sorted_scores, order = _sorted_lamp(w, allowed)
    scores = torch.full((w.numel(),), -1.0, dtype=torch.float64)
    scores[order] = sorted_scores
    return scores.reshape(w.shape)


def erk_densities(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, float]:
    """Unnormalised Erdos-Renyi-Kernel density of each layer: ``sum(shape) / prod(shape)``."""
    out = {}
    for name, shape in shapes.items():
        n = math.prod(shape)
        out[name] = (sum(shape) / n) if n else 0.0
    return out


def floor_share(weights: Mapping[str, Tensor], keep: int, allocation: Allocation) -> float:
    """Fraction of a budget of ``keep`` entries that the per-layer minimums alone take."""
    floors = sum(allocation.minimum(w.numel()) for w in weights.values())
    return floors / keep if keep else (1.0 if floors else 0.0)


def allocate(
    weights: Mapping[str, Tensor],
    keep: int,
    allocation: Allocation = Allocation(),
    allowed: Mapping[str, Tensor] | None = None,
) -> dict[str, int]:
    """Split a budget of ``keep`` entries over the layers of ``weights``.

    Args:
        weights: Layer name -> current values (the ADMM Z step passes W + U).
        keep: Total entries to keep, in [0, total].
        allocation: Method and minimums.
        allowed: Optional layer name -> bool mask; only allowed entries can be kept.

    Returns:
        Layer name -> entries to keep; the values sum to ``keep`` exactly.

    Raises:
        ValueError: the minimums alone exceed ``keep``, or ``keep`` exceeds what ``allowed`` permits.
    """
    mins, caps = bounds(weights, keep, allocation, allowed)
    if allocation.method == "sensitivity":
        if allocation.curves is None:
            raise ValueError("the sensitivity allocation needs measured curves (onnx_admm.sensitivity.measure); "
                             "compress measures them itself")
        keeps = split(allocation.curves, keep, mins, caps)
    elif allocation.method in ("lamp", "global"):
        keeps = _by_scores(weights, keep, allocation.method, mins, allowed)
    else:
        if allocation.method == "uniform":
            quotas = {n: float(w.numel()) for n, w in weights.items()}
        else:
            dens = erk_densities({n: tuple(w.shape) for n, w in weights.items()})
            quotas = {n: dens[n] * w.numel() for n, w in weights.items()}
        keeps = _integer_quotas(quotas, mins, caps, keep)
    logger.debug("%s allocation of %d: %s", allocation.method, keep, keeps)
    return keeps


def bounds(weights: Mapping[str, Tensor], keep: int, allocation: Allocation,
           allowed: Mapping[str, Tensor] | None = None) -> tuple[dict[str, int], dict[str, int]]:
    """The least and the most each layer may keep (its minimum; its size or what ``allowed`` permits), once
    the budget is checked against them: what every method of :func:`allocate` splits between.

    Raises:
        ValueError: the minimums alone exceed ``keep``, or ``keep`` exceeds what ``allowed`` permits.
    """
    if allowed is not None and set(allowed) != set(weights):
        raise ValueError("allowed must have exactly the same layer names as weights")
    total = sum(w.numel() for w in weights.values())
    if not 0 <= keep <= total:
        raise ValueError(f"keep must be in [0, {total}], got {keep}")
    caps = {n: w.numel() if allowed is None else int(allowed[n].sum()) for n, w in weights.items()}
    mins = {n: min(caps[n], allocation.minimum(w.numel())) for n, w in weights.items()}
    for name, w in weights.items():
        if allocation.minimum(w.numel()) > caps[name]:
            raise ValueError(f"layer {name!r} must keep at least {allocation.minimum(w.numel())} weights but only "
                             f"{caps[name]} are allowed by the previous stage; lower min_keep/floor")
    if sum(mins.values()) > keep:
        raise ValueError(f"the per-layer minimums alone keep {sum(mins.values())} weights but the target keeps "
                         f"only {keep} of {total}; lower min_keep/floor or the sparsity")
    if keep > sum(caps.values()):
        raise ValueError(f"the target keeps {keep} weights but only {sum(caps.values())} are allowed by the previous "
                         "stage; a nested stage must have a higher sparsity than the one before")
    return mins, caps


def _by_scores(weights, keep, method, mins, allowed) -> dict[str, int]:
    # Each layer's minimum comes from its own top entries (by |w|, which orders LAMP scores the same
    # way within a layer); the rest of the budget goes to the best remaining scores over all layers.
    # Only counts come out, so only each layer's multiset of remaining scores matters: no per-layer
    # sort for `global`, and no sort over all layers (``_top_counts``); ties between layers go to the
    # earlier layer, as a stable sort of the concatenation would.
    tails = []
    for name, w in weights.items():
        mask = None if allowed is None else allowed[name]
        if method == "lamp":
            # Ascending (LAMP scores fall along the descending sort): the flip's copy leaves the minimum's
            # entries behind, and a threshold's count in the layer is a binary search.
            tails.append(_lamp_multiset(w, mask)[mins[name]:].flip(0))
            continue
        score = w.detach().reshape(-1).abs().cpu()
        if mask is not None:
            score = score[mask.reshape(-1).cpu()]
        if mins[name]:
            score = score.clone()
            score[torch.topk(score, mins[name]).indices] = -1.0
            score = score[score >= 0]
        tails.append(score)
    keeps = dict(mins)
    rest = keep - sum(mins.values())
    if rest > 0:
        extra = _top_counts(tails, rest, ascending=method == "lamp")
        for name, more in zip(weights, extra):
            keeps[name] += more
    return keeps


def _top_counts(tails: list[Tensor], k: int, ascending: bool = False) -> list[int]:
    """How many entries of each of ``tails`` (1-D, >= 0) are among the ``k`` largest of all of them, ties to
    the earlier tails (as a stable descending sort of their concatenation takes them).

    The k-th largest value is found without joining the tails (a model of 61M weights held five float64
    copies of them at once, besides the training state): for ``ascending`` (sorted) tails by bisection on
    the bit patterns of non-negative doubles, which order as their values, counting each tail by binary
    search; else by one O(n) selection over their concatenation in the tails' own dtype.
    """
    sizes = [t.numel() for t in tails]
    if k >= sum(sizes):
        return sizes
    if ascending:
        def at_least(t: Tensor, value: float, strictly: bool = False) -> int:
            return t.numel() - int(torch.searchsorted(t, torch.tensor([value], dtype=t.dtype), right=strictly))

        low, high = 0, _bits(max(float(t[-1]) for t in tails if t.numel())) + 1  # counts k or more; fewer
        while high - low > 1:
            middle = (low + high) // 2
            if sum(at_least(t, _value(middle)) for t in tails) >= k:
                low = middle
            else:
                high = middle
        threshold = _value(low)
        above = [at_least(t, threshold, strictly=True) for t in tails]
        ties = [at_least(t, threshold) - a for t, a in zip(tails, above)]
    else:
        values = torch.cat(tails) if len({t.dtype for t in tails}) == 1 else torch.cat([t.double() for t in tails])
        threshold = torch.kthvalue(values, values.numel() - k + 1).values
        del values
        above = [int((t > threshold).sum()) for t in tails]
        ties = [int((t == threshold).sum()) for t in tails]
    short = k - sum(above)
    for i, tied in enumerate(ties):
        take = min(short, tied)
        above[i] += take
        short -= take
    return above


def _bits(value: float) -> int:
    """The bit pattern of a non-negative double as an integer (they order as the values)."""
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _value(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def _integer_quotas(quotas, mins, caps, keep) -> dict[str, int]:
    """Integers within [min, cap] summing to ``keep``, proportional to ``quotas`` where no bound binds."""
    names = list(quotas)

    def filled(t: float) -> dict[str, float]:
        return {n: min(caps[n], max(mins[n], t * quotas[n])) for n in names}

    lo, hi = 0.0, 1.0
    while sum(filled(hi).values()) < keep and hi < 1e30:
        hi *= 2
    for _ in range(200):  # bisection on the common scale
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(filled(mid).values()) < keep else (lo, mid)
    real = filled(hi)
    keeps = {n: min(caps[n], max(mins[n], math.floor(real[n]))) for n in names}
    short = keep - sum(keeps.values())
    # Largest remainders first; then any layer with room (caps can make the rounding uneven).
    order = sorted(names, key=lambda n: (-(real[n] - math.floor(real[n])), names.index(n)))
    while short > 0:
        progressed = False
        for n in order:
            if short and keeps[n] < caps[n]:
                keeps[n] += 1
                short -= 1
                progressed = True
        if not progressed:
            break
    while short < 0:
        progressed = False
        for n in reversed(order):
            if short and keeps[n] > mins[n]:
                keeps[n] -= 1
                short += 1
                progressed = True
        if not progressed:  # cannot happen while sum(mins) <= keep, which allocate checks
            break
    return keeps
