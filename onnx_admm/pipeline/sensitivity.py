"""Sensitivity measurements for a run: which layers, which probes, on which samples.

Shared by ``onnx-admm analyze`` (``onnx_admm.analyze``) and by compress's ``allocation = "sensitivity"``
(``Runner.run`` measures the global pool once, on the training split, before the first stage; the curves
then live in the plan's ``Allocation`` for every stage and Z/U update of the run).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence

from torch import Tensor

from onnx_admm.converters.errors import UserError
from onnx_admm.data import Dataset
from onnx_admm.plan import Plan, pool
from onnx_admm.schedule import SENSITIVITY_SAMPLES
from onnx_admm.sensitivity import ALLOCATION_LEVELS, Curve, Probe, keep_counts, measure
from onnx_admm.sources import PluginData

logger = logging.getLogger(__name__)


def sample(data: Dataset | PluginData, n: int, seed: int) -> Dataset:
    """``n`` samples of ``data``: a seeded random subset (a file sorted by class must not give one class), or a
    loader plugin's first ``n``."""
    if isinstance(data, PluginData):
        return data.take(n)
    if len(data) <= n:
        return data
    return data.split(n / len(data), seed)[1]


def pruning_probes(params: Mapping[str, Tensor], levels: Sequence[float],
                   minimum: Callable[[int], int]) -> dict[str, list[Probe]]:
    """Per layer, magnitude pruning to each level's keep count and down to its ``minimum(size)``."""
    return {name: [Probe.prune(k) for k in keep_counts(p.numel(), levels, minimum(p.numel()))]
            for name, p in params.items()}


def measure_curves(params: Mapping[str, Tensor], probes: Mapping[str, Sequence[Probe]],
                   evaluate: Callable[[], float | None], emit) -> dict[str, Curve]:
    """``sensitivity.measure``, its failure as a one-line UserError."""
    try:
        return measure(params, probes, evaluate, emit)
    except ValueError as exc:
        raise UserError(f"cannot measure the layers' sensitivity: {exc}; the sensitivity allocation needs a score "
                        "output (a [N, C] float output, or train.output naming one)") from None


def with_curves(plan: Plan, params: Mapping[str, Tensor], evaluate: Callable[[], float | None], emit) -> Plan:
    """``plan`` with its sensitivity allocation's curves measured on the pool's layers (unchanged when the
    allocation is another one or already has them)."""
    if plan.allocation.method != "sensitivity" or plan.allocation.curves is not None:
        return plan
    members = {w.spec.name: params[w.spec.name] for w in pool(plan)}
    if not members:
        return plan
    probes = pruning_probes(members, ALLOCATION_LEVELS, plan.allocation.minimum)
    curves = measure_curves(members, probes, evaluate, emit)
    logger.info("sensitivity measured on %d layers (%d probes)", len(curves), sum(map(len, probes.values())))
    return dataclasses.replace(plan, allocation=dataclasses.replace(plan.allocation, curves=curves))


def describe_curves(plan: Plan) -> dict | None:
    """The report's ``sensitivity``: what the split was chosen from (None for another allocation)."""
    curves = plan.allocation.curves
    if plan.allocation.method != "sensitivity" or not curves:
        return None
    labels = {w.spec.name: w.spec.label for w in plan.weights}
    return {"measured_on": f"{SENSITIVITY_SAMPLES} samples of the training split at most, each layer pruned alone by magnitude",
            "dense_metric": next(iter(curves.values())).dense,
            "layers": {labels[name]: {"params": c.size, "points": [{"keep": k, "metric": m} for k, m in c.points]}
                       for name, c in curves.items()}}
