"""From a recipe to constraints: which weights are compressed, how, and with what target at each stage.

Pure torch (plus the recipe dataclasses). A *plan* fixes, per compressed weight, its per-stage
sparsity (or none), the structure of that sparsity, and its per-stage quantizer (or none); the
constraints of a stage are then built from the weights' current values and the previous stage's
supports (nested masks: each stage only adds zeros).

Stage counts: the pruning schedule (``prune.stages`` or ``prune.targets``) and the bit schedule
(``quantize.bits = [8, 4, 2]``) run side by side; a schedule of one stage applies at every stage;
two schedules of several stages must have the same length.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from converters.errors import UserError
from onnx_admm.allocation import Allocation, allocate, bounds, floor_share
from onnx_admm.projections import Channel, Filter, Unstructured, Within, keep_count, shared_groups, spread
from onnx_admm.recipe import CompressConfig, Rule, nm_pattern
from onnx_admm.schedule import auto_stages, cubic_stages, geometric_stages
from onnx_admm.structured import NM, Block, Column, group_keep_count

logger = logging.getLogger(__name__)


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

    def __post_init__(self) -> None:
        if self.in_axis is None and self.out_axis is not None:
            object.__setattr__(self, "in_axis", 0 if self.out_axis == 1 else 1)


@dataclass(frozen=True)
class QuantChoice:
    """One stage's quantization of one weight (what [quantize] or a rule asked for)."""

    bits: int | None = None  # 1 = binary
    ternary: bool = False
    clusters: int | None = None
    per_channel: bool = False
    symmetric: bool = False  # k-bit: drop the container's most negative level

    def describe(self) -> str:
        if self.ternary:
            return "ternary"
        if self.clusters:
            return f"{self.clusters} clusters"
        return "binary" if self.bits == 1 else f"{self.bits}-bit"


@dataclass(frozen=True)
class WeightPlan:
    spec: WeightSpec
    sparsity: tuple[float, ...] | None  # per stage; None: not pruned
    shared: bool  # part of the global pool (its keep count comes from global ranking)
    structure: str
    quant: tuple[QuantChoice | None, ...]  # per stage


@dataclass(frozen=True)
class Plan:
    weights: tuple[WeightPlan, ...]
    n_stages: int
    global_stages: tuple[float, ...] | None
    allocation: Allocation
    block: tuple[int, int]
    # Filter-pruned weights (parameter names) that must lose the same output channels: the layers whose
    # outputs meet in one residual sum (converters.groups' coupled groups). Each set is projected jointly.
    coupled: tuple[tuple[str, ...], ...] = ()

    def by_name(self) -> dict[str, WeightPlan]:
        return {w.spec.name: w for w in self.weights}

    def untouched(self, specs: Sequence[WeightSpec]) -> list[str]:
        planned = {w.spec.name for w in self.weights}
        return [s.name for s in specs if s.name not in planned]


def _stretch(values: Sequence[Any], n: int, what: str) -> tuple[Any, ...]:
    if len(values) == n:
        return tuple(values)
    if len(values) == 1:
        return tuple(values) * n
    raise UserError(f"{what} has {len(values)} stages but the run has {n}; give both schedules the same "
                    "number of stages, or one of them a single stage")


# How many weight names an unmatched-rule error lists before it counts the rest (a transformer has
# hundreds; the message must stay one readable line).
LISTED_NAMES = 12


def check_rules(specs: Sequence[WeightSpec], rules: Sequence[Rule]) -> None:
    """Every rule decides at least one weight: one that matches none, or only weights an earlier rule
    already claims, does nothing, and a recipe that silently does something else is worse than an error.

    Raises:
        UserError: naming the rule and the weights that exist (the names ``onnx-admm inspect`` prints).
    """
    claimed: dict[str, int] = {}
    for number, rule in enumerate(rules, start=1):
        matched = [s for s in specs if rule.matches(s.label, s.op_type)]
        if not matched:
            raise UserError(f"recipe rule {number} ({rule.describe()}) matches no compressible weight of this "
                            f"model, whose weights are {weight_names(specs)}; match those names (globs work, e.g. "
                            f"\"{_glob_example(specs[0].label)}\") or op types, or remove the rule "
                            "(`onnx-admm inspect MODEL` lists every name)")
        fresh = [s for s in matched if s.label not in claimed]
        if not fresh:
            earlier = sorted({claimed[s.label] for s in matched})
            raise UserError(f"recipe rule {number} ({rule.describe()}) matches only {weight_names(matched)}, "
                            f"which an earlier rule ({', '.join(map(str, earlier))}) claims first (the first "
                            "matching rule wins): the rule does nothing; reorder or remove it")
        claimed.update((s.label, number) for s in fresh)


def weight_names(specs: Sequence[WeightSpec], limit: int = LISTED_NAMES) -> str:
    """``name (op), ...`` for messages, the first ``limit`` of them and a count of the rest."""
    shown = ", ".join(f"{s.label} ({s.op_type})" for s in specs[:limit])
    return shown + (f" and {len(specs) - limit} more" if len(specs) > limit else "")


def _glob_example(name: str) -> str:
    """A glob that matches ``name`` and its siblings: ``0.weight`` -> ``0.*``, ``conv1`` -> ``conv1*``."""
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return f"{stem}.*" if stem != name else f"{name}*"


def make_plan(specs: Sequence[WeightSpec], config: CompressConfig) -> Plan:
    """Decide, for every compressible weight, its targets; raises UserError when nothing is compressed
    or a recipe rule decides no weight."""
    check_rules(specs, config.rules)
    prune, quantize = config.prune, config.quantize
    global_target = prune.targets[-1] if prune.targets else prune.sparsity
    own_targets = [r.sparsity for r in config.rules if r.sparsity is not None]
    deepest = max([t for t in [global_target, *own_targets] if t is not None], default=0.0)
    # Stages: as given; else chosen from the ratio when the tool splits a total budget; one stage when the
    # recipe fixes each stage's epochs itself (admm.epochs / retrain_epochs).
    prune_stages = (len(prune.targets) if prune.targets
                    else prune.stages if prune.stages is not None
                    else auto_stages(deepest, config.budget) if config.budget is not None else 1)
    bit_stages = len(quantize.bits) if isinstance(quantize.bits, tuple) else 1
    rows = []
    for spec in specs:
        rule = config.rule_for(spec.label, spec.op_type)
        if rule is not None and rule.skip:
            continue
        sparsity = rule.sparsity if rule is not None and rule.sparsity is not None else None
        shared = sparsity is None and global_target is not None
        structure = (rule.structure if rule is not None and rule.structure else None) or prune.structure
        pattern = nm_pattern(structure)
        if pattern is not None:  # the pattern is the target: N of every M kept, whatever the pool does
            sparsity, shared = 1 - pattern[0] / pattern[1], False
        if rule is not None and (rule.bits is not None or rule.ternary or rule.clusters is not None):
            quant = (rule.bits, rule.ternary, rule.clusters)
        else:
            quant = (quantize.bits, quantize.ternary, quantize.clusters)
        if sparsity is None and not shared and not any(q not in (None, False) for q in quant):
            continue
        if structure != "unstructured" and (sparsity is not None or shared):
            if spec.out_axis is None:
                has = "input axis to group along" if pattern is not None else "filters or channels"
                raise UserError(f"weight {spec.label!r} ({spec.op_type}) has no {has}: structure {structure!r} "
                                "cannot apply; add a rule with structure = \"unstructured\"")
        rows.append((spec, sparsity, shared, structure, quant))
    if not rows:
        raise UserError("nothing to compress: no compressible weight has a target; pass --sparsity (e.g. 0.9), "
                        "--bits, or a recipe rule with `sparsity` or `bits`")
    n = max([prune_stages if any(r[1] is not None or r[2] for r in rows) else 1]
            + [len(r[4][0]) if isinstance(r[4][0], tuple) else 1 for r in rows] + [bit_stages if quantize.enabled else 1])
    global_stages = None
    if any(r[2] for r in rows):
        global_stages = _stretch(list(prune.targets) if prune.targets else _spaced(global_target, prune_stages, prune.spacing),
                                 n, "the pruning schedule")
    weights = []
    for spec, sparsity, shared, structure, (bits, ternary, clusters) in rows:
        if nm_pattern(structure) is not None:
            own = (sparsity,) * n  # the whole pattern at every stage
        else:
            own = None if sparsity is None else _stretch(_spaced(sparsity, prune_stages, prune.spacing), n,
                                                         "the pruning schedule")
        if bits is not None:
            bit_list = bits if isinstance(bits, tuple) else (bits,)
            quant = _stretch([QuantChoice(bits=b, per_channel=config.quantize.per_channel,
                                          symmetric=config.quantize.symmetric) for b in bit_list], n,
                             "the bit schedule")
        elif ternary or clusters is not None:
            quant = (QuantChoice(ternary=ternary, clusters=clusters, per_channel=config.quantize.per_channel),) * n
        else:
            quant = (None,) * n
        weights.append(WeightPlan(spec, own, shared, structure, quant))
    return Plan(tuple(weights), n, global_stages, Allocation(prune.allocation, prune.min_keep, prune.floor), prune.block)


def _spaced(target: float, n: int, spacing: str) -> list[float]:
    if target <= 0:
        return [0.0] * n
    return cubic_stages(target, n) if spacing == "cubic" else geometric_stages(target, n)


def _sparsity_constraint(w: WeightPlan, shape: torch.Size, keep: int | None, sparsity: float, block: tuple[int, int]):
    """The sparsity constraint of one weight; ``keep`` is given for unstructured pool members."""
    structure = w.structure
    if structure == "unstructured":
        return Unstructured(keep if keep is not None else keep_count(int(torch.Size(shape).numel()), sparsity))
    out_axis = w.spec.out_axis
    if structure in ("filter", "channel"):
        # filters index the output-channel axis, channels the input-channel axis
        axis = out_axis if structure == "filter" else w.spec.in_axis
        n_groups = shape[axis]
        cls = Filter if axis == 0 else Channel
        return cls(group_keep_count(n_groups, sparsity))
    if structure == "column":
        return Column(group_keep_count(Column.n_groups(shape), sparsity))
    if nm_pattern(structure) is not None:
        return nm_constraint(w)
    rows, cols = block
    return Block(rows, cols, group_keep_count(Block(rows, cols, 0).n_groups(shape), sparsity))


def reduction_axis(spec: WeightSpec) -> int:
    """The torch parameter's input (reduction) axis: 1 for Conv/Linear, 0 for ConvTranspose and a MatMul weight [K, N]."""
    return spec.in_axis if spec.in_axis is not None else 1


def nm_constraint(w: WeightPlan) -> NM | None:
    """The N:M constraint of a weight whose structure is an N:M pattern (runs along its input axis)."""
    pattern = nm_pattern(w.structure)
    return None if pattern is None else NM(*pattern, axis=reduction_axis(w.spec))


def leave_alone(plan: Plan, labels: Sequence[str]) -> Plan:
    """The plan without the pruning of the weights ``labels`` names (ONNX names): a quantized one keeps
    its quantization, unpruned; the others leave the plan (untouched, they do not train either)."""
    weights = []
    for w in plan.weights:
        if w.spec.label in labels:
            if all(q is None for q in w.quant):
                continue
            w = dataclasses.replace(w, sparsity=None, shared=False, structure="unstructured")
        weights.append(w)
    return dataclasses.replace(plan, weights=tuple(weights))


def pool(plan: Plan) -> list[WeightPlan]:
    """The unstructured weights that share the global target (one budget split over them)."""
    return [w for w in plan.weights if w.shared and w.structure == "unstructured"]


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
        raise UserError(f"impossible target: {exc} (min_keep and floor are in the recipe's [prune] table)") from None


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
        out[w.spec.name] = _sparsity_constraint(w, values[w.spec.name].shape, keeps.get(w.spec.name), target,
                                                plan.block)
    by_name = plan.by_name()
    for names in plan.coupled:
        out.update(_coupled_filters({n: by_name[n] for n in names}, out, values, previous))
    return {name: c if previous is None or name not in previous else Within(c, previous[name])
            for name, c in out.items()}


def _coupled_filters(members: Mapping[str, WeightPlan], own: Mapping[str, Any], values: Mapping[str, Tensor],
                     previous: Mapping[str, Tensor] | None) -> dict[str, Any]:
    """The filters a coupled set keeps together: ranked over all its members (``shared_groups``), as many
    as the least pruned member's own constraint keeps; each member's constraint keeps exactly those."""
    keep = max(own[name].keep_groups for name in members)
    axes = [w.spec.out_axis for w in members.values()]
    chosen = shared_groups([values[n] for n in members], axes, keep,
                           [None if previous is None else previous.get(n) for n in members])
    return {name: Within(type(own[name])(keep), spread(chosen, values[name], axis))
            for name, axis in zip(members, axes)}
