"""From a recipe to a plan: which weights are compressed, how, and with what target at each stage.

The recipe's words (structures, bit schedules, rules) are read here once into the engine's values
(``onnx_admm.plan``: ``Plan``, ``WeightPlan``, ``QuantChoice``, ``onnx_admm.structures``); a rule that
decides no weight, or schedules of different lengths, are the user's errors.

Stage counts: the pruning schedule (``prune.stages`` or ``prune.targets``) and the bit schedule
(``quantize.bits = [8, 4, 2]``) run side by side; a schedule of one stage applies at every stage;
two schedules of several stages must have the same length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from onnx_admm.converters.errors import UserError
from onnx_admm.converters.optable import NM_OPS
from onnx_admm import structures
from onnx_admm.plan import ImpossibleTarget, Plan, WeightPlan, WeightSpec, check_budget
from onnx_admm.allocation import Allocation
from onnx_admm.recipe import CompressConfig, PruneConfig, Rule
from onnx_admm.quant_choices import choice
from onnx_admm.schedule import auto_stages, cubic_stages, geometric_stages
from onnx_admm.structures import NMPattern


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
        structure = structures.parse((rule.structure if rule is not None and rule.structure else None)
                                     or prune.structure, prune.block)
        if isinstance(structure, structures.Filters) and prune.round_to > 1:
            structure = dataclasses.replace(structure, round_to=prune.round_to)
        if isinstance(structure, NMPattern):  # the pattern is the target: N of every M kept, whatever the pool does
            sparsity, shared = structure.sparsity, False
        if rule is not None and (rule.bits is not None or rule.ternary or rule.clusters is not None):
            quant = (rule.bits, rule.ternary, rule.clusters)
        else:
            quant = (quantize.bits, quantize.ternary, quantize.clusters)
        if sparsity is None and not shared and not any(q not in (None, False) for q in quant):
            continue
        # A weight without filters (a Gather table), or a recurrent one under N:M, is left alone by legalize under
        # the run's structure, as a filter that cannot leave the graph is; a rule that names it so is a mistake.
        if structure.grouped and (sparsity is not None or shared) and rule is not None and rule.structure:
            nm = isinstance(structure, NMPattern)
            if spec.out_axis is None:
                has = "input axis to group along" if nm else "filters or channels"
                raise UserError(f"weight {spec.label!r} ({spec.op_type}) has no {has}: structure '{structure}' "
                                "cannot apply; add a rule with structure = \"unstructured\"")
            if nm and spec.op_type not in NM_OPS:
                raise UserError(f"weight {spec.label!r} ({spec.op_type}): structure '{structure}' applies to "
                                f"{', '.join(sorted(NM_OPS))} weights, the layers N:M kernels run; add a rule with "
                                "structure = \"unstructured\"")
        rows.append((spec, sparsity, shared, structure, quant))
    if not rows:
        raise UserError("nothing to compress: no compressible weight has a target; pass --sparsity (e.g. 0.9), "
                        "--bits, or a recipe rule with `sparsity` or `bits`")
    allocation = _allocation(prune, global_target, rows)
    n = max([prune_stages if any(r[1] is not None or r[2] for r in rows) else 1]
            + [len(r[4][0]) if isinstance(r[4][0], tuple) else 1 for r in rows] + [bit_stages if quantize.enabled else 1])
    global_stages = None
    if any(r[2] for r in rows):
        global_stages = _stretch(list(prune.targets) if prune.targets else _spaced(global_target, prune_stages, prune.spacing),
                                 n, "the pruning schedule")
    weights = []
    for spec, sparsity, shared, structure, (bits, ternary, clusters) in rows:
        if isinstance(structure, NMPattern):
            own = (sparsity,) * n  # the whole pattern at every stage
        else:
            own = None if sparsity is None else _stretch(_spaced(sparsity, prune_stages, prune.spacing), n,
                                                         "the pruning schedule")
        if isinstance(bits, tuple) and len(bits) == 1:
            bits = bits[0]
        if isinstance(bits, tuple):  # a progressive schedule: its own level set at each stage
            quant = _stretch([choice(bits=b, per_channel=config.quantize.per_channel_for(),
                                     symmetric=config.quantize.symmetric) for b in bits], n, "the bit schedule")
        elif bits is not None or ternary or clusters is not None:
            # One level set: the pruning stages train in float (so each can refit its pruned layers, which a
            # quantized weight cannot) and the last stage quantizes, as ADMM-NN prunes, then quantizes. On the
            # Fashion-MNIST LeNet-5 this kept 0.6 point more than quantizing at every stage at 40x + 4 bits (2 seeds)
            # and 0.95 at 100x + 2 bits (one seed).
            last = choice(bits=bits, ternary=ternary, clusters=clusters,
                          per_channel=config.quantize.per_channel_for(ternary, clusters is not None),
                          symmetric=config.quantize.symmetric)
            quant = (None,) * (n - 1) + (last,)
        else:
            quant = (None,) * n
        weights.append(WeightPlan(spec, own, shared, structure, quant))
    return Plan(tuple(weights), n, global_stages, Allocation(allocation, prune.min_keep, prune.floor))


def _allocation(prune: PruneConfig, target: float | None, rows: list) -> str:
    """The split the run uses: ``prune.allocation`` where single weights share the global target; ``uniform``
    where only whole groups (filters, channels, columns, blocks) do, since each such layer loses its own share
    of its groups. A split the recipe asks for by name there would do nothing, so it is an error."""
    pooled = any(shared and not structure.grouped for _, _, shared, structure, _ in rows)
    grouped = [structure for _, _, shared, structure, _ in rows if shared and structure.grouped]
    if pooled or not grouped:
        return prune.allocation
    if prune.allocation not in ("lamp", "uniform"):  # lamp is the default: a filter run that names none
        raise UserError(f"prune.allocation '{prune.allocation}' splits a global budget of single weights over the "
                        f"layers, and no weight here is pruned one by one: under structure '{grouped[0]}' every "
                        f"layer loses its own share ({target:g}) of its groups. Leave the allocation out, "
                        "or give layers their own sparsity with [[rules]] (onnx-admm inspect --filters lists them)")
    return "uniform"


def _spaced(target: float, n: int, spacing: str) -> list[float]:
    if target <= 0:
        return [0.0] * n
    return cubic_stages(target, n) if spacing == "cubic" else geometric_stages(target, n)


def checked_budget(plan: Plan, params: Mapping[str, Tensor]) -> float | None:
    """``plan.check_budget``, its impossible target as the user's error (the recipe sets the minimums)."""
    try:
        return check_budget(plan, params)
    except ImpossibleTarget as exc:
        raise UserError(str(exc)) from None
