"""The plan of a compress run and its constraints: per compressed weight, its per-stage sparsity (or
none), the structure of that sparsity (``onnx_admm.structures``), and its per-stage quantizer (or none);
the constraints of a stage are built from the weights' current values and the previous stage's supports
(nested masks: each stage only adds zeros).

Pure torch: the product reads a recipe into a plan (``onnx_admm.pipeline.planning``); a training loop of
one's own can build a ``Plan`` directly.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from onnx_admm.allocation import Allocation, allocate, bounds, floor_share
from onnx_admm.quant_choices import QuantChoice
from onnx_admm.projections import Within, keep_count, shared_groups
from onnx_admm.structured import NM, Heads
from onnx_admm.structures import NMPattern, Structure, Unstructured

logger = logging.getLogger(__name__)


class ImpossibleTarget(ValueError):
    """The per-layer minimums (``min_keep``, ``floor``) keep more weights than the global target allows."""


@dataclass(frozen=True)
class WeightSpec:
    """What the plan needs to know about one compressible weight (from the importer's weight map)."""

    name: str  # parameter name
    label: str  # ONNX tensor name (rules match it)
    op_type: str
    # Axes of the torch parameter that index output channels (filters) and input channels: 0 and 1 for
    # Conv/Linear, 1 and 0 for ConvTranspose [in, out/groups, k...] and a MatMul weight [K, N]; None where
    # they make no sense (Gather tables). ``in_axis`` defaults to the other one of the first two.
    out_axis: int | None = 0
    in_axis: int | None = None
    # The axis per-channel quantization scales run along: ``out_axis`` unless given (a recurrent W / R keeps
    # one scale per direction, axis 0).
    scale_axis: int | None = None

    def __post_init__(self) -> None:
        if self.in_axis is None and self.out_axis is not None:
            object.__setattr__(self, "in_axis", 0 if self.out_axis == 1 else 1)
        if self.scale_axis is None:
            object.__setattr__(self, "scale_axis", self.out_axis)


@dataclass(frozen=True)
class WeightPlan:
    spec: WeightSpec
    sparsity: tuple[float, ...] | None  # per stage; None: not pruned
    shared: bool  # part of the global pool (its keep count comes from global ranking)
    structure: Structure
    quant: tuple[QuantChoice | None, ...]  # per stage

    @property
    def pruned(self) -> bool:
        return self.sparsity is not None or self.shared

    @property
    def scale_axis(self) -> int:
        """The axis per-channel scales and levels run along (``WeightSpec.scale_axis``; 0 where there is none)."""
        return self.spec.scale_axis or 0

    def quantizer(self, stage: int):
        """Stage ``stage``'s quantizer of this weight, None when it is not quantized then."""
        choice = self.quant[stage]
        return None if choice is None else choice.quantizer(self.scale_axis)

    @property
    def removes_channels(self) -> bool:
        """Its pruned groups leave the written graph (filter pruning with a target)."""
        return self.structure.removes_channels and self.pruned


@dataclass(frozen=True)
class Plan:
    weights: tuple[WeightPlan, ...]
    n_stages: int
    global_stages: tuple[float, ...] | None
    allocation: Allocation
    # Filter-pruned weights (parameter names) that must lose the same output channels: the layers whose
    # outputs meet in one residual sum, or the separate Q, K and V projections of one attention block (the
    # same heads; converters.groups' coupled groups). Each set is projected jointly.
    coupled: tuple[tuple[str, ...], ...] = ()

    def by_name(self) -> dict[str, WeightPlan]:
        return {w.spec.name: w for w in self.weights}

    def untouched(self, specs: Sequence[WeightSpec]) -> list[str]:
        planned = {w.spec.name for w in self.weights}
        return [s.name for s in specs if s.name not in planned]


def _sparsity_constraint(w: WeightPlan, shape: torch.Size, keep: int | None, sparsity: float):
    """The sparsity constraint of one weight; ``keep`` is given for unstructured pool members."""
    return w.structure.constraint(shape, sparsity, (w.spec.out_axis, w.spec.in_axis), keep)


def reduction_axis(spec: WeightSpec) -> int:
    """The torch parameter's input (reduction) axis: 1 for Conv/Linear, 0 for ConvTranspose and a MatMul weight [K, N]."""
    return spec.in_axis if spec.in_axis is not None else 1


def nm_constraint(w: WeightPlan) -> NM | None:
    """The N:M constraint of a weight whose structure is an N:M pattern (runs along its input axis)."""
    if not isinstance(w.structure, NMPattern):
        return None
    return w.structure.constraint((), w.structure.sparsity, (w.spec.out_axis, reduction_axis(w.spec)))


def leave_alone(plan: Plan, labels: Sequence[str]) -> Plan:
    """The plan without the pruning of the weights ``labels`` names (ONNX names): a quantized one keeps
    its quantization, unpruned; the others leave the plan (untouched, they do not train either)."""
    weights = []
    for w in plan.weights:
        if w.spec.label in labels:
            if all(q is None for q in w.quant):
                continue
            w = dataclasses.replace(w, sparsity=None, shared=False, structure=Unstructured())
        weights.append(w)
    return dataclasses.replace(plan, weights=tuple(weights))


def pool(plan: Plan) -> list[WeightPlan]:
    """The unstructured weights that share the global target (one budget split over them)."""
    return [w for w in plan.weights if w.shared and isinstance(w.structure, Unstructured)]


def global_keep(plan: Plan, params: Mapping[str, Tensor], stage: int) -> int:
    """How many weights the global pool keeps at ``stage``."""
    return keep_count(sum(params[w.spec.name].numel() for w in pool(plan)), plan.global_stages[stage])


def check_budget(plan: Plan, params: Mapping[str, Tensor]) -> float | None:
    """Fail before any training when the per-layer minimums exceed the last stage's global budget.

    Returns:
        The share of the final budget the minimums take (None without a global pool).
    """
    members = pool(plan)
    if not members:
        return None
    weights = {w.spec.name: params[w.spec.name].detach() for w in members}
    keep = global_keep(plan, params, plan.n_stages - 1)
    # Only the bounds: a sensitivity allocation's curves are measured later, on the training data.
    _allocate(plan, weights, keep, None, bounds)
    return floor_share(weights, keep, plan.allocation)


def _allocate(plan: Plan, weights: Mapping[str, Tensor], keep: int, allowed, how=allocate) -> Any:
    try:
        return how(weights, keep, plan.allocation, allowed=allowed)
    except ValueError as exc:
        raise ImpossibleTarget(f"impossible target: {exc} (min_keep and floor are in the recipe's [prune] table)") from None


def sparsity_constraints(
    plan: Plan, values: Mapping[str, Tensor], stage: int, previous: Mapping[str, Tensor] | None
) -> dict[str, Any]:
    """Stage ``stage``'s sparsity constraint per pruned weight (restricted to the previous support).

    The global pool's budget is split over its layers by ranking ``values``: the weights themselves for
    the hard projection, W + U for an ADMM Z step (so the split follows training).
    """
    members = pool(plan)
    keeps: dict[str, int] = {}
    if members:
        weights = {w.spec.name: values[w.spec.name].detach() for w in members}
        keeps = _allocate(plan, weights, global_keep(plan, values, stage),
                          None if previous is None else {n: previous[n] for n in weights})
    out = {}
    for w in plan.weights:
        if w.sparsity is None and not w.shared:
            continue
        # Structured members of the global pool get the global target layer by layer.
        target = w.sparsity[stage] if w.sparsity is not None else plan.global_stages[stage]
        out[w.spec.name] = _sparsity_constraint(w, values[w.spec.name].shape, keeps.get(w.spec.name), target)
    by_name = plan.by_name()
    for names in plan.coupled:
        out.update(_coupled_filters({n: by_name[n] for n in names}, out, values, previous))
    return {name: c if previous is None or name not in previous else Within(c, previous[name])
            for name, c in out.items()}


def _coupled_filters(members: Mapping[str, WeightPlan], own: Mapping[str, Any], values: Mapping[str, Tensor],
                     previous: Mapping[str, Tensor] | None) -> dict[str, Any]:
    """The filters (or heads) a coupled set keeps together: ranked over all its members
    (``shared_groups`` over each member's units), as many as the least pruned member's own constraint
    keeps; each member's constraint keeps exactly those."""
    keep = max(own[name].keep_groups for name in members)
    # A unit is one index of the output axis (a filter), or a head: blocks of rows (the separate Q, K and V
    # projections of one attention block are coupled by their heads).
    units = {name: own[name] if isinstance(own[name], Heads) else Heads(keep, w.spec.out_axis)
             for name, w in members.items()}
    chosen = shared_groups([units[n].units(values[n]) for n in members], [0] * len(members), keep,
                           [None if previous is None or n not in previous else units[n].units(previous[n])
                            for n in members])
    return {name: Within(dataclasses.replace(own[name], keep_groups=keep), units[name].spread(chosen, values[name]))
            for name in members}
