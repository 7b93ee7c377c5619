"""The reconstruction step of a stage: after the hard projection, each layer that lost weights (pruned, or
reading channels that filter pruning removed) and has a tap gets its kept weights refit on the Gram matrix
of its inputs (``onnx_admm.reconstruct``).

The inputs are those of the model just before the projection (the weights the ADMM phase ended with), on a
seeded sample of the training data that is the same on every process; Gram matrices are collected in groups
whose memory stays under a budget, one calibration pass per group, with the pre-projection weights swapped
in for the pass. Without labels the refit aims at the original model's layer outputs (the teacher's).

A short ADMM phase can leave the weights further from the task than the stage started (the penalty pulls
them towards their projection faster than a few steps can recover): so for a pruning-only stage the
stage's starting weights are also projected (with the same per-layer counts; filters with their consumers'
input channels) and refit, and the retraining starts from whichever of the two scores better on the
selection split (the report's ``reconstruction.start``). Once that start wins, a budget the tool split gives
the later stages' ADMM epochs to retraining (``pipeline.stages.Runner.skip_admm_after``); ``handover_check``
scores the same kind of candidate before each such stage and gives the stage its ADMM phase back when the
projection costs too much.

A stage that quantizes every weight, pruning them in the same step or not, keeps its starting weights
projected onto levels (and masks) of their own as a candidate (``quantized_start``; the report's
``quantized_start``): the retraining still starts from the ADMM projection, and the candidate replaces the
retrained state at the end when it scores better on the selection split. At 8 bits that projection is
nearly the float model, and two ADMM epochs at the training learning rate left the ViT sample's weights
further from the task (-0.06 and -0.21 point on two seeds) than rounding does; on LeNet-5 the same two
epochs once gained 0.8 point, which choosing the restart before retraining (tried first) threw away. With
pruning in the step the candidate is the stage start pruned and rounded by GPTQ with the mask: a label-free
BERT at 50% + 8 bits kept 0.873 of the original's decisions from the ADMM phase and 0.958 from it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from onnx_admm.converters.importer import ImportedModel
from onnx_admm.converters.taps import weight_taps
from onnx_admm.pipeline.rollback import load_values, snapshot
from onnx_admm.quant_base import along
from onnx_admm.quant_choices import KBit
from onnx_admm.quantizers import Joint, UniformQuant, quantize
from onnx_admm.reconstruct import (FEW_POSITIONS, FEW_POSITIONS_LABELLED, Grid, Refit, Tap, collect_grams, gram_bytes,
                                   reconstruct)
from onnx_admm.train import Standing

logger = logging.getLogger(__name__)

# Selection-metric points a stage's refit projection of its starting weights may lose before a stage the
# hand-over reached takes its ADMM phase back (``handover_check``). LeNet-5 on Fashion-MNIST (two seeds) lost
# at most 6.9 points at 40x and 12.2 at 100x (97.45%), where retraining alone won by 1.3 points over ADMM in
# every stage; 16.8-20.7 at the 97.95% stage of 200x and the 98.95% stage of 400x, where the ADMM phases
# back won 1.2 points at 400x and lost 0.25 (noise) at 200x (samples/lenet5_fashion_mnist/RESULTS.md,
# 2026-12-06 third session).
HANDOVER_DROP = 0.15

# Optimizer steps from which an ADMM phase that lost to the refit stage start is kept in the later stages
# (``Runner.skip_admm_after``): the hand-over pays where phases are short and costs where they are long.
# LeNet-5 on Fashion-MNIST, 10 epochs, two seeds: on 20,000 images (ADMM phases of about 150 steps) handing
# over won 0.60 / 1.43 points at 40x / 100x; on all 60,000 (about 440 steps; 350 at 400x) keeping the ADMM
# phases won 0.24 / 0.76 (three seeds) at 100x / 200x and was level at 40x (-0.09) and 400x
# (samples/lenet5_fashion_mnist/RESULTS.md, 2026-12-06 fifth session).
HANDOVER_MAX_STEPS = 300

# Gram matrices held at once (float32 sums, reconstruct.gram_bytes); a layer alone above it is left as projected.
GRAM_BUDGET_BYTES = 1 << 30
# Calibration passes a refit without labels takes at most, one per wave of layers in forward order, each
# wave refit on the inputs the earlier waves' refit weights give it (``refit_projection``). Against one pass
# for all layers (each fit on the inputs of the model as it was), label-free 50% pruning of the corpus, 2 + 1
# epochs, held-out agreement (seed 0): random-weight transformer 0.861 -> 0.898, random-weight LSTM
# 0.945 -> 0.967, byte classifier 0.984 -> 0.992, ViT level at 0.998 (samples/corpus/RESULTS.md, tenth
# session). With labels the refit aims at the layer outputs before the projection, in one pass.
SEQUENTIAL_WAVES = 16
# Samples per calibration call: the calls alternate between the half a refit is fit on and the half that
# checks it, and with a teacher every layer's inputs of the student's call wait for the teacher's, so the
# chunk also bounds that memory.
CALIBRATION_CHUNK = 16


def split_batch(inputs: tuple[Tensor, ...], size: int) -> list[tuple[Tensor, ...]]:
    """``inputs`` in chunks of at most ``size`` samples, at least two when there are two samples, when every
    input has the same leading (sample) axis; else whole."""
    n = inputs[0].shape[0] if inputs and inputs[0].dim() else 0
    if n < 2 or any(t.dim() == 0 or t.shape[0] != n for t in inputs):
        return [inputs]
    size = min(size, -(-n // 2))
    return [tuple(t[i:i + size] for t in inputs) for i in range(0, n, size)]


def taps_for(imported: ImportedModel, names: list[str]) -> dict[str, Tap]:
    return {name: Tap(modules, 0, kind) for name, (modules, kind) in weight_taps(imported, names).items()}


def groups(taps: Mapping[str, Tap], params: Mapping[str, Tensor], budget: int = GRAM_BUDGET_BYTES,
           teacher: bool = False) -> list[list[str]]:
    """The tapped weights in groups whose Gram matrices fit ``budget`` together (too-large ones left out)."""
    out: list[list[str]] = [[]]
    used = 0
    for name, tap in taps.items():
        size = gram_bytes(params[name], tap, teacher)
        if size > budget:
            logger.info("%s: no reconstruction (its Gram matrix would take %.0f MB)", name, size / 2**20)
            continue
        if used + size > budget and out[-1]:
            out.append([])
            used = 0
        out[-1].append(name)
        used += size
    return [g for g in out if g]


@contextmanager
def swapped(params: Mapping[str, nn.Parameter], values: Mapping[str, Tensor]):
    """``values`` in the parameters for the duration, the current ones back afterwards."""
    current = {name: params[name].detach().clone() for name in values}
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in current.items():
                params[name].copy_(value)


def teacher_taps(taps: Mapping[str, Tap], module: nn.Module, teacher: nn.Module) -> dict[str, Tap]:
    """The same taps in ``teacher``, a copy of ``module`` (its submodules have the same names)."""
    names = {id(m): n for n, m in module.named_modules()}
    return {name: Tap(tuple(teacher.get_submodule(names[id(m)]) for m in tap.modules), tap.arg, tap.kind)
            for name, tap in taps.items()}


def refit_projection(taps: Mapping[str, Tap], params: Mapping[str, nn.Parameter], before: Mapping[str, Tensor],
                     supports: Mapping[str, Tensor],
                     calibrate: Callable[[], tuple[Iterable[tuple[Callable[[], None], int]], int]],
                     teacher: tuple[Mapping[str, Tap], Mapping[str, Tensor]] | None = None,
                     few: float = FEW_POSITIONS, grids: Mapping[str, Grid] | None = None,
                     compensated: dict[str, Tensor] | None = None, sequential: int = 0) -> tuple[dict[str, Refit], int]:
    """Refit every tapped weight (projected in place, ``before`` its pre-projection copy) group by group.

    ``calibrate()`` gives the calls that feed the model a few samples each, with their sample counts, and
    the samples of all calls. With ``teacher`` (its taps and its values of the weights; each call then runs
    it after the model on the same samples) the refit aims at the original layers' outputs instead of the
    pre-projection ones; ``few`` is :func:`collect_grams`' cut for layers fed too few positions; weights in
    ``grids`` are rounded onto their k-bit grids instead (``reconstruct.reconstruct``). With a teacher and
    ``sequential`` > 1 the weights are refit in up to that many waves in the model's forward order, each on
    the inputs the earlier waves' refit weights give it (aiming at the teacher's outputs from those inputs):
    the errors of the earlier layers are made up where they arrive instead of added up. Returns the refits
    and the calibration passes they took (one per group or wave).
    """
    results: dict[str, Refit] = {}
    parts = groups(taps, params, teacher=teacher is not None)
    if teacher is not None and sequential > 1:
        order = forward_order(taps, calibrate)
        names = sorted((n for group in parts for n in group), key=lambda n: order.get(n, len(order)))
        waves = [wave for chunk in _split(names, sequential)
                 for wave in groups({n: taps[n] for n in chunk}, params, teacher=True)]
        for index, wave in enumerate(waves):
            # This wave and the later ones as they were; the earlier ones refit: the wave's inputs are those
            # the refit model will give it.
            with swapped(params, {n: before[n] for later in waves[index:] for n in later}), torch.no_grad():
                calls, total = calibrate()
                grams = collect_grams({n: taps[n] for n in wave}, calls,
                                      {n: (teacher[0][n], teacher[1][n]) for n in wave}, total, few)
            results.update(reconstruct(params, before, supports, taps, grams, teacher[1], grids=grids,
                                       compensated=compensated))
        return results, len(waves)
    for group in parts:
        chosen = {n: taps[n] for n in group}
        with swapped(params, before), torch.no_grad():
            calls, total = calibrate()
            grams = collect_grams(chosen, calls, {n: (teacher[0][n], teacher[1][n]) for n in group} if teacher else None,
                                  total, few)
        results.update(reconstruct(params, before, supports, taps, grams, teacher[1] if teacher else None,
                                   grids=grids, compensated=compensated))
    return results, len(parts)


def _split(items: list, n: int) -> list[list]:
    size = -(-len(items) // n)
    return [items[i:i + size] for i in range(0, len(items), size)]


def forward_order(taps: Mapping[str, Tap], calibrate) -> dict[str, int]:
    """The position of each tapped weight's first call in one calibration call (the model's forward order)."""
    seen: dict[str, int] = {}
    handles = []

    def hook(name):
        def record(module, args):
            seen.setdefault(name, len(seen))
        return record

    try:
        for name, tap in taps.items():
            for module in tap.modules:
                handles.append(module.register_forward_pre_hook(hook(name)))
        calls, _ = calibrate()
        with torch.no_grad():
            for call, _n in calls:
                call()
                break
    finally:
        for handle in handles:
            handle.remove()
    return seen


def summary(results: Mapping[str, Refit], candidates: int, passes: int = 0,
            rounded: Mapping[str, Refit] | None = None, quantized: int = 0) -> dict[str, Any]:
    """The report's per-stage ``reconstruction``: layers refit, of how many pruned ones, the output error
    left after the refit as a share of the plain projection's (summed over the refit layers, on the
    calibration half the refit was not fit on) and the calibration passes it took; with ``quantized``
    k-bit weights, the same for the ones rounded onto their grids (``rounded``)."""
    def ratio(used: Mapping[str, Refit]) -> float | None:
        projected = sum(r.projected for r in used.values())
        return (sum(r.refit for r in used.values()) / projected) if projected > 0 else None

    used = {n: r for n, r in results.items() if r.used}
    out = {"layers": len(used), "pruned_layers": candidates, "tapped_layers": len(results),
           "error_ratio": ratio(used), "passes": passes}
    if quantized:
        done = {n: r for n, r in (rounded or {}).items() if r.used}
        out["rounding"] = {"layers": len(done), "quantized_layers": quantized, "tapped_layers": len(rounded or {}),
                           "error_ratio": ratio(done)}
    return out


def _apply(params: Mapping[str, nn.Parameter], imported: ImportedModel, supports: Mapping[str, Tensor]) -> None:
    """Zero every weight outside its support (a consumer's mask may name a weight outside ``params``)."""
    with torch.no_grad():
        for name, support in supports.items():
            p = params[name] if name in params else imported.module.get_parameter(name)
            p.mul_(support.to(p.device))


@dataclass(frozen=True)
class StartCandidate:
    """A quantizing stage's starting weights projected onto their levels: selection standing, values, scales."""

    standing: Standing
    values: dict[str, Tensor]
    scales: dict[str, Any]

    def keep(self, retrained: Standing) -> tuple[bool, dict[str, Any]]:
        """Whether this beats the retrained state's selection standing, and the report's ``quantized_start``."""
        better = self.standing.compare(retrained) > 0
        ours, theirs = self.standing.metric, retrained.metric
        logger.info("kept: the %s (selection metric %s against %s)",
                    "projection of the stage's starting weights" if better else "retrained state",
                    ours if better else theirs, theirs if better else ours)
        return better, {"kept": "stage start" if better else "retrained",
                        "select_metric": {"retrained": theirs, "stage_start": ours},
                        "select_loss": {"retrained": retrained.loss, "stage_start": self.standing.loss}}


class StageRefit:
    """Reconstruction for one stage of a compress run (``runner``: ``pipeline.stages.Runner``).

    ``before()`` copies the weights just before the hard projection; ``run`` refits the tapped ones after it
    and, when the stage only prunes and had an ADMM phase, tries the stage's starting weights too.
    """

    def __init__(self, runner: Any, stage: int, quantized: Mapping[str, Any], had_admm: bool) -> None:
        self.runner = runner
        on = runner.config.prune.reconstruct
        # Every compressible weight that is not quantized this stage: the pruned ones, and the consumers
        # of removed channels, which lose input channels without being planned (where the loss of a removed
        # filter or head can be made up). Which of them this stage masks is known after the projection.
        names = [e.param for e in runner.imported.compressible() if e.param not in quantized] if on else []
        # k-bit weights are rounded onto their grids again (quantize.rounding): binary, ternary and codebook
        # levels are refit or shared during the retraining, which would undo a rounding chosen here.
        self.rounded = ([name for name, w in quantized.items() if isinstance(w.quant[stage], KBit)]
                        if runner.config.quantize.rounding == "gptq" else [])
        self.weights = {name: runner.imported.module.get_parameter(name) for name in names + self.rounded}
        self.taps = taps_for(runner.imported, names + self.rounded) if names or self.rounded else {}
        # The restart candidate needs no levels: pruning-only stages (channel removal included).
        self.start = snapshot(runner.imported) if self.taps and had_admm and not quantized else None
        # A stage whose weights are all quantized (pruned ones are known after the projection) gets its own.
        self.quant_start = (snapshot(runner.imported) if had_admm and quantized
                            and set(quantized) >= set(runner.params) else None)

    def before(self) -> dict[str, Tensor]:
        # Every weight the projection may change, not only the tapped ones: the calibration pass must see
        # the whole model as it was before the projection. With the untapped ones (depthwise convs) already
        # projected, each layer was fit to undo their loss alone, all at once, and the first stage took a
        # teacher pass it did not need: mobilenet_v3_small's 50% refit (no training) agreed on 0.883 of
        # held-out images, against 0.953 refit on the model as it was.
        return {name: w.detach().clone() for name, w in self.weights.items()} if self.taps else {}

    def run(self, admm: Any, before: dict[str, Tensor], supports: dict[str, Tensor], kept: dict[str, Any],
            latent: dict[str, Tensor], scales: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any],
                                                                              dict[str, Any] | None]:
        """Refit the projected weights and round the k-bit ones again; returns the supports and kept channels
        the retraining goes on with, and the report's entry (with the wall ``seconds`` of the whole step).
        ``latent`` (where the quantized weights' retraining starts) gets the rounded weights' compensated
        values; ``scales``: the quantized weights' levels of the hard projection (``quantize``)."""
        start = time.perf_counter()
        supports, kept, entry = self._run(admm, before, supports, kept, latent, scales)
        if entry is not None:
            entry["seconds"] = round(time.perf_counter() - start, 3)
        return supports, kept, entry

    def _run(self, admm: Any, before: dict[str, Tensor], supports: dict[str, Tensor], kept: dict[str, Any],
             latent: dict[str, Tensor], scales: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any],
                                                                               dict[str, Any] | None]:
        if not self.taps:  # off, or nothing it can refit this stage (quantized weights, no taps)
            return supports, kept, summary({}, self.masked(supports)) if self.runner.config.prune.reconstruct else None
        out = self.refit(before, supports, self.grids(admm, scales), latent)
        if self.start is None:
            return supports, kept, out
        runner = self.runner
        _apply(runner.params, runner.imported, supports)  # consumers of removed channels too, before measuring
        ours = runner.select_standing()
        values = snapshot(runner.imported)
        load_values(runner.imported, self.start)
        with torch.no_grad():
            restart = {name: constraint.support(runner.params[name].detach())
                       for name, constraint in admm.constraints.items()}
        restart_kept = runner.removed_filters(restart)  # adds the consumers' input-channel masks
        _apply(runner.params, runner.imported, restart)
        device = next(iter(runner.params.values())).device
        other = self.refit({n: self.start[n].to(device) for n in self.weights}, restart)
        theirs = runner.select_standing()
        better = theirs.compare(ours) > 0
        logger.info("retraining starts from the %s (selection metric %s, loss %s, against %s, %s)",
                    "projection of the stage's starting weights" if better else "ADMM phase's projection",
                    *((theirs.metric, theirs.loss, ours.metric, ours.loss) if better else
                      (ours.metric, ours.loss, theirs.metric, theirs.loss)))
        choice = {"select_metric": {"admm": ours.metric, "stage_start": theirs.metric},
                  "select_loss": {"admm": ours.loss, "stage_start": theirs.loss}, "passes": out["passes"] + other["passes"]}
        if better:
            runner.world.broadcast_(list(restart.values()))
            return restart, restart_kept, {**other, "start": "stage start", **choice}
        load_values(runner.imported, values)
        return supports, kept, {**out, "start": "admm", **choice}

    def projected_metric(self, constraints: Mapping[str, Any]) -> float | None:
        """The selection metric of the current weights projected onto ``constraints`` (pruning ones) and
        refit, as the stage's hard projection would leave them without an ADMM phase; the current weights
        are put back. None with nothing to refit (reconstruction off, or no tapped weight)."""
        if not self.taps:
            return None
        runner = self.runner
        values = snapshot(runner.imported)
        with torch.no_grad():
            supports = {name: c.support(runner.params[name].detach()) for name, c in constraints.items()}
        runner.removed_filters(supports)  # adds the consumers' input-channel masks
        _apply(runner.params, runner.imported, supports)
        device = next(iter(runner.params.values())).device
        self.refit({n: values[n].to(device) for n in self.weights}, supports)
        metric = runner.select_metric()
        load_values(runner.imported, values)
        return metric

    def quantized_start(self, admm: Any) -> StartCandidate | None:
        """Right after the hard projection of a stage that quantizes every weight: the stage's starting weights
        projected onto levels (and, where the stage also prunes, masks) of their own, k-bit ones rounded by
        GPTQ, scored on the selection split; the ADMM projection is put back for the retraining. None when
        some weight is not quantized this stage or the stage had no ADMM phase."""
        if self.quant_start is None:
            return None
        runner = self.runner
        values, constraints = snapshot(runner.imported), admm.constraints
        load_values(runner.imported, self.quant_start)
        latent = {name: runner.params[name].detach().clone() for name in constraints}
        before = self.before()
        supports = admm.hard_project()
        scales = {name: quantize(admm.constraints[name], latent[name]) for name in latent}
        if self.rounded:  # k-bit levels put on by GPTQ, as the retraining's start gets them
            self.refit(before, supports, self.grids(admm, scales))
        candidate = StartCandidate(runner.select_standing(), snapshot(runner.imported), scales)
        load_values(runner.imported, values)
        admm.constraints = constraints
        return candidate

    def masked(self, supports: Mapping[str, Tensor]) -> int:
        """How many of the weights refit after pruning this stage masks (the k-bit ones are rounded instead)."""
        return sum(1 for name in self.weights if name in supports and name not in self.rounded)

    def grids(self, admm: Any, scales: Mapping[str, Any]) -> dict[str, Grid]:
        """The k-bit grid each rounded weight was projected onto, from ``scales``: its constraint's levels for
        the weights before the projection (``quantize``), the hard projection's own."""
        out = {}
        for name in self.rounded:
            constraint = admm.constraints[name]
            inner = constraint.quant if isinstance(constraint, Joint) else constraint
            if isinstance(inner, UniformQuant):  # a Within (N:M patterns) keeps its nearest levels
                qt = scales[name]
                out[name] = Grid(along(qt.scale, qt.axis, qt.q.dim()), inner.qmin, inner.qmax)
        return out

    def refit(self, before: dict[str, Tensor], supports: Mapping[str, Tensor], grids: Mapping[str, Grid] | None = None,
              latent: dict[str, Tensor] | None = None) -> dict[str, Any]:
        """Refit the projected weights (and round the ones in ``grids`` again, their compensated values into
        ``latent``) on calibration inputs; every process computes the same refit on the same samples, and rank
        0's values are broadcast so that they stay bit-identical."""
        runner = self.runner
        samples = runner.calibration()
        # Without labels the goal is the original's outputs: the refit aims at its layers' outputs.
        teacher = runner.teacher if runner.teacher is not None and not runner.train_labeled else None
        module = runner.imported.module
        # Without labels the teacher's pass runs even where the weights refit from are the original's (the
        # first stage): the sequential waves need the original's layer inputs beside the refit model's.

        def calls() -> Iterator[tuple[Callable[[], None], int]]:
            for batch in runner.batches(samples, False):
                for inputs in split_batch(batch.inputs, CALIBRATION_CHUNK):
                    def call(inputs=inputs) -> None:
                        module(*inputs)
                        if teacher is not None:
                            teacher(*inputs)
                    yield call, (inputs[0].shape[0] if inputs and inputs[0].dim() else 1)

        def calibrate() -> tuple[Iterator[tuple[Callable[[], None], int]], int]:
            return calls(), len(samples)

        grids = grids or {}
        # What this stage masks, and the k-bit weights it rounds (the others keep their nearest levels).
        taps = {name: tap for name, tap in self.taps.items()
                if name in supports and (name not in self.rounded or name in grids)}
        pair = None
        if teacher is not None:
            pair = (teacher_taps(taps, module, teacher), {n: teacher.get_parameter(n).detach() for n in taps})
        few = FEW_POSITIONS_LABELLED if runner.train_labeled else FEW_POSITIONS
        compensated: dict[str, Tensor] = {}
        results, passes = refit_projection(taps, self.weights, before, supports, calibrate, pair, few, grids,
                                           compensated, SEQUENTIAL_WAVES)
        runner.world.broadcast_([self.weights[n].data for n, r in results.items() if r.used])
        if latent is not None and compensated:
            runner.world.broadcast_(list(compensated.values()))
            latent.update(compensated)
        pruned = {n: r for n, r in results.items() if n not in grids}
        out = summary(pruned, self.masked(supports), passes, {n: r for n, r in results.items() if n in grids},
                      len(self.rounded))
        logger.info("reconstruction: %d of %d pruned layers refit, output error %s of the projection's",
                    out["layers"], out["pruned_layers"],
                    "n/a" if out["error_ratio"] is None else f"{out['error_ratio']:.3f}")
        if "rounding" in out:
            rounding = out["rounding"]
            logger.info("rounding: %d of %d k-bit layers rounded by GPTQ, output error %s of nearest rounding's",
                        rounding["layers"], rounding["quantized_layers"],
                        "n/a" if rounding["error_ratio"] is None else f"{rounding['error_ratio']:.3f}")
        return out


def handover_check(runner: Any, stage: int, previous: Mapping[str, Tensor] | None) -> dict[str, Any] | None:
    """Before a stage the hand-over gave its ADMM epochs to (``runner``: ``pipeline.stages.Runner``): the
    weights it starts from, projected onto its target and refit, against their selection metric as they are.

    Losing more than ``HANDOVER_DROP`` means the stage prunes past what retraining from a projection
    repairs (LeNet-5 at 400x: 17.7 points at 98.95% sparsity, where the ADMM phase's projection had won by
    6.8), so the stage and the later ones take their ADMM phases back (``admm``). None where it cannot be
    judged (no metric, a weight quantized this stage, nothing to refit): the hand-over then holds.
    """
    kept = runner.stages[-1].val_metric if runner.stages else None
    if kept is None or any(w.quant[stage] for w in runner.plan.weights):
        return None
    values = {name: p.detach() for name, p in runner.params.items()}
    metric = StageRefit(runner, stage, {}, had_admm=False).projected_metric(runner.constraints(stage, previous, values))
    if metric is None:
        return None
    admm = kept - metric > HANDOVER_DROP
    logger.info("stage %d: the refit projection of its starting weights scores %.4f against %.4f: %s", stage,
                metric, kept, "the ADMM phases are back" if admm else "the hand-over holds")
    return {"select_metric": {"start": kept, "projected": metric}, "admm": admm}
