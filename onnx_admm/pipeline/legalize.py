"""Legalise a plan against the graph: structures go only where the graph can take them.

Filter pruning needs channels that can leave the graph (``converters.groups``); an N:M pattern needs a
Conv/Gemm/MatMul weight whose input axis splits into runs of M and keeps its length. Every weight
that cannot is left alone, with the reason (the report's ``left_alone``) and a warning; a plan with
no weight left is an error.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx
import torch

from onnx_admm.converters.dequantize import weight_decoders
from onnx_admm.converters.errors import UserError
from onnx_admm.converters.fused import unfuse
from onnx_admm.converters.groups import ChannelGroup, channel_groups
from onnx_admm.converters.optable import NM_OPS
from onnx_admm.plan import Plan, leave_alone, reduction_axis
from onnx_admm.structures import NMPattern

logger = logging.getLogger(__name__)


def legalize(plan: Plan, original: onnx.ModelProto, shapes: dict[str, torch.Size],
             held: set[str]) -> tuple[Plan, dict[str, ChannelGroup], dict[str, str]]:
    """(the plan without the weights that cannot take their structure, with ``coupled`` listing the
    filter-pruned members of each residual sum; the channel groups of the original graph by member
    weight name (empty without filter pruning); the weights left alone and why). ``held``: the ONNX
    names of the weights the imported module holds (a consumer outside them cannot be masked)."""
    groups: dict[str, ChannelGroup] = {}
    left_alone: dict[str, str] = {}
    if any(w.removes_channels for w in plan.weights):
        # Every member of a coupled group (the convs of one residual sum) finds the group by its weight.
        groups = {member: g for g in channel_groups(original) for member in g.producers}
        # Weights the graph computes from constants by moving entries (not DequantizeLinear / codebook decoders).
        computed = {name for name, d in weight_decoders(original).items() if d.op_type not in _DECODING_OPS}
        plan, left_alone = _keep_removable_filters(plan, groups, held, computed, _fused_hint(original))
    if any(isinstance(w.structure, NMPattern) for w in plan.weights):
        plan, nm_alone = _keep_nm_weights(plan, shapes, groups)
        left_alone.update(nm_alone)
    return plan, groups, left_alone


# The decoders that store a weight (quantized, or as codebook indices) rather than compute it from another.
_DECODING_OPS = ("DequantizeLinear", "Gather")


def _fused_hint(original: onnx.ModelProto) -> str:
    """What to do where onnxruntime's fused ops stop the channel analysis (it knows the standard ops only)."""
    fused = sorted({line.split(" ")[0] for line in unfuse(original).lines})
    return (f"onnxruntime's fused ops ({', '.join(fused)}) stop the channel analysis: filter-prune the model as "
            "exported, then let onnxruntime's optimizer fuse the result" if fused else "")


def _keep_removable_filters(plan: Plan, groups: dict[str, ChannelGroup], held: set[str],
                            computed: set[str], hint: str = "") -> tuple[Plan, dict[str, str]]:
    """Filter pruning only where the channels can leave the graph and every weight reading them trains
    (their input channels are masked with the filters), a coupled group's members all pruned together
    (``plan.coupled``) or all left alone."""
    filtered = [w for w in plan.weights if w.removes_channels]
    pruned = {w.spec.label: w.spec.name for w in filtered}
    left_alone = {}
    for w in filtered:
        label, group = w.spec.label, groups.get(w.spec.label)
        if group is None and label in computed:
            left_alone[label] = ("the graph computes this weight from a stored one (a slice of a packed projection), "
                                 "and the channel analysis follows stored weights only")
        elif group is None or not group.prunable:
            left_alone[label] = group.reason if group is not None else f"{w.spec.op_type} filters are not removable"
        elif outside := [piece.tensor for piece in group.consumers if piece.tensor not in held]:
            left_alone[label] = (f"its channels are read by {outside[0]}, past the part of the graph onnx-admm "
                                 "converts and trains")
        elif missing := [m for m in group.producers if m not in pruned]:
            left_alone[label] = (f"coupled with {', '.join(missing)} (their outputs meet in a residual sum), which "
                                 "the recipe does not filter-prune: a coupled group is pruned whole or not at all")
    # A weight that keeps its filters may still read channels that leave with another group's: say so, or the
    # report's table (that weight's zeros) reads against "left alone".
    feeding = {piece.tensor: g.name for label, g in groups.items() if label in pruned and label not in left_alone
               for piece in g.consumers}
    for w in filtered:
        if w.spec.label in left_alone and w.spec.label in feeding:
            left_alone[w.spec.label] += (f" (it keeps its filters, and its input channels still leave with the "
                                         f"filters of {feeding[w.spec.label]!r})")
    plan, left_alone = _left_alone(plan, left_alone, "filter pruning", "no weight can lose whole filters", hint)
    coupled = {g.name: tuple(pruned[m] for m in g.producers) for label, g in groups.items()
               if label in pruned and label not in left_alone and len(g.producers) > 1}
    # An attention projection loses whole heads, a recurrent layer whole hidden units: its rows are ranked and
    # kept by unit. A head count is kept exactly (4 heads do not round to 8).
    weights = tuple(dataclasses.replace(w, structure=_unit_structure(w.structure, groups[w.spec.label], w.spec.label))
                    if w.removes_channels and w.spec.label in groups else w for w in plan.weights)
    return dataclasses.replace(plan, weights=weights, coupled=tuple(coupled.values())), left_alone


def _unit_structure(structure, group: ChannelGroup, label: str):
    """``structure`` (filters) with the blocks one unit of ``group`` owns along ``label``'s output axis."""
    outer, inner = group.blocks(label)
    exact = {"round_to": 1} if group.unit == "head" else {}
    return dataclasses.replace(structure, outer=outer, inner=inner, **exact)


def _keep_nm_weights(plan: Plan, shapes: dict[str, torch.Size],
                     groups: dict[str, ChannelGroup]) -> tuple[Plan, dict[str, str]]:
    """N:M only on Conv/Gemm/MatMul weights whose input axis splits into runs of M and keeps its length;
    the others are left alone (as filters coupled through the graph are), since a layer with 3 input
    channels is common."""
    # Input channels removed with the filters that feed them would shift every run after them.
    shrinking = {piece.tensor: w.spec.label for w in plan.weights
                 if w.removes_channels and w.spec.label in groups
                 for piece in groups[w.spec.label].consumers}
    left_alone = {}
    for w in plan.weights:
        pattern = w.structure
        if not isinstance(pattern, NMPattern):
            continue
        length = shapes[w.spec.name][reduction_axis(w.spec)]
        if w.spec.op_type not in NM_OPS:
            left_alone[w.spec.label] = f"{w.structure} applies to Conv, Gemm and MatMul weights, not {w.spec.op_type}"
        elif length % pattern.m:
            left_alone[w.spec.label] = (f"{w.structure} needs the input axis in runs of {pattern.m}; it holds {length} "
                                        "(input channels per group of the layer)")
        elif w.spec.label in shrinking:
            left_alone[w.spec.label] = (f"its input channels leave the graph with the filters of "
                                        f"{shrinking[w.spec.label]!r} (filter pruning), which would break the runs")
    return _left_alone(plan, left_alone, "N:M", "no weight can take the N:M pattern")


def _left_alone(plan: Plan, reasons: dict[str, str], what: str, none_left: str,
                hint: str = "") -> tuple[Plan, dict[str, str]]:
    """``leave_alone`` with a warning per weight; an error when no weight keeps a target. ``hint``: what the
    user can do about the graph as a whole, said once (and first in the error)."""
    for label, reason in reasons.items():
        logger.warning("%s is left alone (%s): %s", label, what, reason)
    if reasons and hint:
        logger.warning("%s", hint)
    plan = leave_alone(plan, list(reasons))
    if not plan.weights:
        raise UserError(f"{none_left}" + (f" ({hint})" if hint else "") + ": "
                        + "; ".join(f"{k}: {v}" for k, v in reasons.items())
                        + "; choose another structure, or add rules for the weights that can take it")
    return plan, reasons
