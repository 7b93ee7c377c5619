"""Per-layer sensitivity: what the task metric loses when one layer alone is pruned (or quantized), and a
global budget split from those curves (pure torch).

``measure`` sets one layer at a time to a constraint's projection (magnitude pruning to a keep count, or
k-bit levels), evaluates the whole model with a callable the caller gives (accuracy with labels, the task
metric against the original without them) and puts the layer back: every other layer stays dense. The
result is a ``Curve`` per layer: the metric at each measured keep count, from the dense one down to the
layer's minimum (``allocation.Allocation.minimum``), so a split never needs to extrapolate.

``split`` divides a global keep budget over the layers from those curves, greedily: start dense (or at the
previous stage's counts) and repeatedly remove weights from the layer whose next measured segment costs the
least per removed weight, interpolating linearly between measured points. A point's cost is
``-log(metric / dense)``: each layer alone keeps a share of the dense metric, and the split minimises the
sum of the logs, i.e. it predicts the metric of the layers pruned together as the dense one times every
layer's share. Summed drops (the plain reading) fail at saturation: a layer pruned until it alone breaks
the model loses nothing more when pruned further, so its last weights look free (measured: LeNet-5's fc1
split to a single weight at 200x, 14% top-1); in log shares a layer already down to a quarter of the
metric pays as much to halve it again as a dense layer pays to lose half. Drops are made monotone in
sparsity first (a running maximum), and the cost per weight never falls along a curve (``Curve.costs``: a
plateau at chance costs what the step before it cost), so noise cannot make pruning more look cheaper than
pruning less. The greedy order is then a sort by cost that does not depend on the budget, so a larger
budget's split contains a smaller one's (progressive stages stay nested); the counts sum to the budget
exactly. Ties go to the larger layer, then to the earlier one.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from onnx_admm.projections import Unstructured, keep_count
from onnx_admm.schedule import ANALYZE_LEVELS

logger = logging.getLogger(__name__)

__all__ = ["ANALYZE_LEVELS", "ALLOCATION_LEVELS", "Curve", "Curves", "Probe", "check_levels", "keep_counts",
           "measure", "split"]

# What ``allocation = "sensitivity"`` measures inside compress: deeper levels too, since a 200x target sends
# the largest layers past 99.5% (LeNet-5's fc1 keeps 0.16% under LAMP).
ALLOCATION_LEVELS = (0.5, 0.75, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999)

Progress = Callable[[dict], None]

# The least share of the dense metric a cost is computed from (-log of the share): a layer measured at 0 still
# has a finite cost.
FLOOR = 1e-3


def check_levels(levels: Sequence[float]) -> tuple[float, ...]:
    """Sparsity levels as a sorted tuple, each in (0, 1).

    Raises:
        ValueError: a level outside (0, 1), or none at all.
    """
    out = tuple(sorted({float(s) for s in levels}))
    if not out:
        raise ValueError("give at least one sparsity level, e.g. 0.5,0.9,0.98")
    bad = [s for s in out if not 0 < s < 1]
    if bad:
        raise ValueError(f"a sparsity level is a fraction of zeros in (0, 1) (0.975 = 40x), got {bad[0]!r}")
    return out


def keep_counts(n: int, levels: Sequence[float], minimum: int) -> list[int]:
    """The distinct keep counts a layer of ``n`` weights is measured at: each level's, not below
    ``minimum``, then ``minimum`` itself (the deepest the layer can go), falling."""
    counts = {max(minimum, keep_count(n, s)) for s in levels} | {minimum}
    return sorted((k for k in counts if k < n), reverse=True)


@dataclass(frozen=True)
class Probe:
    """One measurement of one layer: a constraint projected onto it alone.

    Attributes:
        constraint: What the layer is set to (``projections.Unstructured(keep)``, a quantizer).
        keep: The pruning's keep count, or None for a quantization probe.
        bits: The quantization's bit width, or None for a pruning probe.
    """

    constraint: object
    keep: int | None = None
    bits: int | None = None

    @classmethod
    def prune(cls, keep: int) -> Probe:
        return cls(Unstructured(keep), keep=keep)


@dataclass(frozen=True)
class Curve:
    """The measured sensitivity of one layer.

    Attributes:
        size: Weights in the layer.
        dense: The metric of the unpruned model.
        points: ``(keep, metric)`` pairs, keep falling, each with this layer alone pruned to ``keep`` weights
            by magnitude.
        bits: ``(bits, metric)`` pairs with this layer alone quantized (empty when not measured).
    """

    size: int
    dense: float
    points: tuple[tuple[int, float], ...]
    bits: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        keeps = [k for k, _ in self.points]
        if any(b >= a for a, b in zip(keeps, keeps[1:])) or any(not 0 <= k < self.size for k in keeps):
            raise ValueError(f"a curve's keep counts must fall strictly within [0, {self.size}), got {keeps}")

    def drops(self) -> list[tuple[int, float]]:
        """``(keep, drop)`` from the dense point ``(size, 0)`` on, the drop made monotone (module doc)."""
        out, worst = [(self.size, 0.0)], 0.0
        for keep, metric in self.points:
            worst = max(worst, self.dense - metric)
            out.append((keep, worst))
        return out

    def drop_at(self, keep: int) -> float:
        """The (monotone) drop at ``keep`` weights, linear between measured points."""
        points = self.drops()
        for (k0, d0), (k1, d1) in zip(points, points[1:]):
            if k1 <= keep <= k0:
                return d0 if k0 == k1 else d0 + (d1 - d0) * (k0 - keep) / (k0 - k1)
        raise ValueError(f"keep {keep} is outside the measured range [{points[-1][0]}, {self.size}]")

    def costs(self) -> list[tuple[int, float]]:
        """``(keep, cost)``: ``-log`` of the share of the dense metric kept (at least ``FLOOR``), each segment's
        cost per removed weight at least the previous segment's (module doc): what ``split`` reads."""
        base = self.dense if self.dense > 0 else 1.0  # a model measured at 0 has no share to lose: all cost 0
        points = [(keep, -math.log(max(base - drop, FLOOR * base) / base)) for keep, drop in self.drops()]
        out, slope = [points[0]], 0.0
        for (k0, d0), (k1, d1) in zip(points, points[1:]):
            slope = max(slope, (d1 - d0) / (k0 - k1))
            out.append((k1, out[-1][1] + slope * (k0 - k1)))
        return out


# Layer name -> its curve; what ``allocation.Allocation.curves`` holds.
Curves = Mapping[str, Curve]


@torch.no_grad()
def measure(params: Mapping[str, Tensor], probes: Mapping[str, Sequence[Probe]],
            evaluate: Callable[[], float | None], emit: Progress | None = None) -> dict[str, Curve]:
    """Each layer alone set to each of its probes, the model evaluated, the layer put back.

    Args:
        params: Layer name -> its parameter (changed in place, restored before returning).
        probes: Layer name -> its probes (pruning ones with falling keep counts).
        evaluate: The metric of the model as it stands (higher is better).
        emit: Progress events ``measure_start`` (``total``) and ``measure`` (``layer``, ``done``, ``total``,
            ``metric``, ``keep`` or ``bits``, ``last``: the layer's last probe).

    Returns:
        Layer name -> Curve.

    Raises:
        ValueError: ``evaluate`` returns None (no score output to measure on).
    """
    emit = emit or (lambda event: None)
    total = sum(len(p) for p in probes.values())
    emit({"kind": "measure_start", "total": total})
    dense = _metric(evaluate)
    curves, done = {}, 0
    for name, layer_probes in probes.items():
        param = params[name]
        saved = param.detach().clone()
        pruned, quantized = [], []
        try:
            for i, probe in enumerate(layer_probes):
                param.copy_(probe.constraint.project(saved))
                metric = _metric(evaluate)
                (pruned if probe.bits is None else quantized).append(
                    (probe.keep if probe.bits is None else probe.bits, metric))
                done += 1
                emit({"kind": "measure", "layer": name, "done": done, "total": total, "metric": metric,
                      "keep": probe.keep, "bits": probe.bits, "last": i == len(layer_probes) - 1})
        finally:
            param.copy_(saved)
        curves[name] = Curve(param.numel(), dense, tuple(pruned), tuple(quantized))
        logger.debug("sensitivity of %s: %s", name, curves[name])
    return curves


def _metric(evaluate: Callable[[], float | None]) -> float:
    value = evaluate()
    if value is None:
        raise ValueError("the model has no score output to measure a metric on")
    return float(value)


def split(curves: Curves, keep: int, mins: Mapping[str, int], caps: Mapping[str, int] | None = None) -> dict[str, int]:
    """Keep counts per layer summing to ``keep``, chosen greedily from ``curves`` (module doc).

    Args:
        curves: Layer name -> Curve, measured down to at most ``mins[name]`` weights.
        keep: The budget, between ``sum(mins)`` and ``sum(caps)``.
        mins: Layer name -> the least it keeps.
        caps: Layer name -> the most it keeps (the previous stage's support); default: its size.

    Raises:
        ValueError: a layer has no curve, or a curve does not reach down to its minimum.
    """
    missing = [name for name in mins if name not in curves]
    if missing:
        raise ValueError(f"no sensitivity curve for {missing[0]!r}; measure every layer of the pool")
    keeps = {name: (curves[name].size if caps is None else caps[name]) for name in mins}
    costs = {name: curves[name].costs() for name in mins}
    for name, points in costs.items():
        if points[-1][0] > mins[name]:
            raise ValueError(f"the sensitivity curve of {name!r} stops at {points[-1][0]} weights, above its minimum "
                             f"{mins[name]}; measure down to the minimum")
    remove = sum(keeps.values()) - keep
    heap: list[tuple[float, int, int, str, int, int]] = []
    order = {name: i for i, name in enumerate(mins)}

    def push(name: str) -> None:
        """The layer's next segment, from its current count down to the next measured point (or its minimum)."""
        start = keeps[name]
        if start <= mins[name]:
            return
        points = costs[name]
        end = max(mins[name], max(k for k, _ in points if k < start))
        k0, c0 = min((p for p in points if p[0] >= start), key=lambda p: p[0])
        k1, c1 = max((p for p in points if p[0] <= end), key=lambda p: p[0])
        heapq.heappush(heap, ((c1 - c0) / (k0 - k1), -curves[name].size, order[name], name, start, end))

    for name in mins:
        push(name)
    while remove > 0:
        _, _, _, name, start, end = heapq.heappop(heap)
        taken = min(remove, start - end)
        keeps[name] = start - taken
        remove -= taken
        if keeps[name] == end:
            push(name)
    return keeps
