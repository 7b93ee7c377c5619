"""The Python API: ``compress(model, data, config)`` runs progressive ADMM pruning end to end.

Per stage (targets rising, masks nested): ADMM epochs (W step with the penalty gradient, Z/U update
every period, rho growing), the exact hard projection, then masked retraining that keeps the best
validation state. The result writes the trained weights back into the original ONNX graph and
validates it against the original in onnxruntime on the held-out split.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import logging
import math
import resource
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from converters.dequantize import decoded_view, stored_nbytes
from converters.errors import OnnxAdmmError, UserError
from converters.graphinfo import constant_sources, graph_inputs, tensor_value
from converters.groups import ChannelGroup, channel_groups
from converters.importer import ImportedModel, import_model
from converters.modelio import Staged, load_model, save_model
from converters.shrink import count_macs, cut_update, shrink
from converters.encoders import DENSE_ENCODERS, QuantSpec
from converters.writeback import WriteBackResult, write_back
from onnx_admm import __version__
from onnx_admm.admm import ADMM, FixedSupport, RhoSchedule
from onnx_admm.data import LABELS, Dataset, PluginData, as_data
from onnx_admm.gate import DEFAULT_FLOOR, Gate, retained
from onnx_admm.levels import FixedLevels, StraightThrough
from onnx_admm.outputs import (RunFiles, check_collisions, data_file, external_locations, input_files, model_output,
                               stage_path)
from onnx_admm.preflight import check_config, check_labels, check_outputs, check_weights, check_writable
from onnx_admm.plan import (Plan, QuantChoice, WeightPlan, WeightSpec, check_budget, leave_alone, make_plan,
                            nm_constraint, reduction_axis, sparsity_constraints)
from onnx_admm.progress import Progress, display
from onnx_admm.quantizers import Binary, Codebook, Joint, Ternary, UniformQuant, quantize
from onnx_admm.recipe import CompressConfig, nm_pattern
from onnx_admm.schedule import PhaseBudget, admm_updates, auto_rho, lr_factor, rho_cap
from onnx_admm.structured import NM, nm_runtimes
from onnx_admm.signals import deferred, exit_status, sigterm_interrupts, signal_name
from onnx_admm.validate import latency_ms, tensor_storage_bits, validate
from onnx_admm.train import Batch, EmptyEpoch, Loss, NonFiniteLoss, ScoreSpec, evaluate, make_optimizer, train_epoch

logger = logging.getLogger(__name__)

# How many samples of a loader plugin's stream are held in memory for validation when no
# separate validation data is given.
PLUGIN_VAL_SAMPLES = 1000

# What ``compress`` takes as data (onnx_admm.data.as_data): a path or plugin, arrays, dicts, a function.
Data = (str | Path | Mapping[str, Any] | Iterable[Mapping[str, Any]] | Callable[[], Iterable[Mapping[str, Any]]]
        | Dataset | PluginData)


@dataclass
class StageResult:
    """One completed stage: its target, what it reached, and the weights (ONNX layout) to save it."""

    index: int
    target: float | None  # global target sparsity of the stage (None: per-weight targets only)
    sparsity: float  # achieved, over the compressed weights
    val_metric: float | None  # accuracy (labels) or agreement (no labels) on the held-out split, in torch
    rolled_back: str | None
    values: dict[str, torch.Tensor] = field(repr=False)  # param name -> tensor snapshot (CPU)
    residuals: dict[str, list[float]] = field(default_factory=dict)
    quant: dict[str, QuantChoice] = field(default_factory=dict)  # quantized weights of this stage
    kept_channels: dict[str, np.ndarray] = field(default_factory=dict)  # filter groups: channels kept
    epochs: dict[str, float] = field(default_factory=dict)  # epochs of each phase
    stopped: list[str] = field(default_factory=list)  # phases a non-finite loss rolled back and stopped
    quant_specs: dict[str, QuantSpec] = field(default_factory=dict, repr=False)  # for the quantized encoders
    patterns: dict[str, NM] = field(default_factory=dict)  # N:M weights: param name -> pattern (torch layout)
    # One record per epoch trained (the ``epoch_end`` progress event): phase, epoch, loss, train_metric,
    # metric (selection split), residual (mean ADMM primal residual), samples, seconds.
    history: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        # The mean primal residual ||W - Z|| / ||W|| over the stage's weights at each Z/U update: it
        # should fall during the ADMM phase.
        histories = [h for h in self.residuals.values() if h]
        n = min((len(h) for h in histories), default=0)
        mean = [sum(h[k] for h in histories) / len(histories) for k in range(n)]
        return {
            "index": self.index, "target": self.target, "sparsity": self.sparsity,
            "val_metric": self.val_metric, "rolled_back": self.rolled_back, "epochs": self.epochs,
            "mean_residual": mean, "history": self.history,
        }


@dataclass
class CompressResult:
    """What ``compress`` returns: ``.save(path)`` writes the ONNX model; ``.report`` is the JSON report."""

    imported: ImportedModel
    config: CompressConfig
    stages: list[StageResult]
    report: dict[str, Any] = field(default_factory=dict)
    external_data: bool = False  # the original kept its weights in a .data file: so does the output
    groups: dict[str, ChannelGroup] = field(default_factory=dict, repr=False)  # of the original graph
    name: str = "model.onnx"  # the original's file name: a folder given to save() gets its stem + .admm.onnx
    inputs: list[tuple[str, Path]] = field(default_factory=list, repr=False)  # files save() must not overwrite
    files: list[Path] = field(default_factory=list)  # what compress(output=...) wrote
    # The last write-back, by (stage index, metadata): asking for the same stage again (the final model
    # saved, then again among --save-stages) reuses it. One only, so memory stays one model's.
    _export_cache: tuple | None = field(default=None, repr=False)

    def model(self, stage: int = -1) -> onnx.ModelProto:
        """The original graph with the weights of ``stage`` (default: the last) written back (a copy the
        caller may change)."""
        model = onnx.ModelProto()
        model.CopyFrom(self.export(stage, self.metadata(stage)).model)
        return model

    def metadata(self, stage: int = -1) -> dict[str, str]:
        """The ``metadata_props`` a saved model carries: tool version, recipe and stage."""
        return {
            "onnx_admm.version": __version__,
            "onnx_admm.recipe": json.dumps(self.config.to_dict(), sort_keys=True),
            "onnx_admm.stage": str(self.stages[stage].index),
        }

    def export(self, stage: int = -1, metadata: dict[str, str] | None = None) -> WriteBackResult:
        """Write-back of ``stage``'s weights: the model, and how each changed tensor is stored (computed
        once per stage and metadata; the live module is left as it is)."""
        key = (range(len(self.stages))[stage], tuple(sorted((metadata or {}).items())))
        if self._export_cache is None or self._export_cache[0] != key:
            self._export_cache = (key, self._export(self.stages[stage], metadata))
        return self._export_cache[1]

    def _export(self, chosen: StageResult, metadata: dict[str, str] | None) -> WriteBackResult:
        target = self.imported.original
        updates = self.imported.updates(quant=chosen.quant_specs, values=chosen.values)
        # N:M weights stay in their own shape, zeros included: the runtimes that read the pattern (TensorRT)
        # check it on the dense weight, and a COO sparse initializer saves little at 2:4.
        updates = [dataclasses.replace(u, encoders=DENSE_ENCODERS) if e.param in chosen.patterns else u
                   for e, u in zip(self.imported.weights, updates)]
        shrunk = None
        if chosen.kept_channels:
            # Filters removed: shrink the original graph first, then write the cut values into it, so the
            # quantized encoders store the shrunk tensors as integers (cut before encoding, not after).
            shrunk = shrink(target, chosen.kept_channels, groups=list(self.groups.values()))
            target, updates = shrunk.model, [cut_update(u, shrunk.cuts) for u in updates]
        result = write_back(target, updates, metadata=metadata)
        if shrunk is not None:
            result.changes[:0] = shrunk.changes
        return result

    def save(self, path: str | Path, stage: int = -1) -> list[Path]:
        """Write the model atomically (with external data if the original had it); returns the files.

        ``path`` may be a folder (existing, or ending in ``/``): the file is then the original's stem +
        ``.admm.onnx`` in it. A path that is one of the run's inputs is refused (UserError). Ctrl-C and
        SIGTERM wait until the file is written.
        """
        target = model_output(path, self.name)
        check_collisions([("the output", target), ("the output's external data", data_file(target))], self.inputs)
        check_writable(target, "the output")
        with deferred():
            return save_model(self.model(stage), target, external_data=self.external_data)


class CompressInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during ``compress``: a KeyboardInterrupt, so a caller's ``except Exception``
    does not swallow the user's request to stop.

    ``result`` holds the completed stages (None when none completed); ``saved`` the files written
    (with ``output``, the last completed stage is saved there before this is raised); ``final``
    says training had finished; ``exit_status`` is the shell's code for the signal (130 or 143).
    """

    def __init__(self, result: CompressResult | None, saved: list[Path] | None = None,
                 interrupt: BaseException | None = None, final: bool = False, unwritten: list[Path] | None = None) -> None:
        super().__init__("interrupted")
        self.result, self.saved, self.final = result, list(saved or []), final
        self.unwritten = list(unwritten or [])
        self.signal = signal_name(interrupt)
        self.exit_status = exit_status(interrupt)

    def describe(self) -> str:
        """One line: what was interrupted and what was written."""
        if self.result is None:
            return f"interrupted by {self.signal} before the first stage completed; nothing was written"
        last = self.result.stages[-1]
        when = "after training" if self.final else f"during stage {last.index + 2}"
        stage = f"stage {last.index + 1} (sparsity {last.sparsity:.4f})"
        if not self.saved:
            return f"interrupted by {self.signal} {when}; {stage} is complete but nothing was written (no output given)"
        line = f"interrupted by {self.signal} {when}: saved {stage} to {self.saved[0]}"
        if self.unwritten:
            line += f"; not written: {', '.join(map(str, self.unwritten))}"
        return line


class AccuracyGateFailed(OnnxAdmmError):
    """The compressed model fails the gate (``onnx_admm.gate``: the accuracy drop exceeds
    ``max_accuracy_drop``, or its task metric falls under the floor); the outputs are written, the model
    under its ``.gate-failed`` name (or not at all without ``keep_failed``)."""

    def __init__(self, result: CompressResult, reason: str, saved: Path | None) -> None:
        where = (f"the model is saved as {saved}, not under the output name" if saved is not None
                 else "the model was not written")
        super().__init__(f"{reason}; {where}")
        self.result, self.reason, self.saved = result, reason, saved


def _load_values(imported: ImportedModel, values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for entry in imported.weights:
            imported.parameter(entry).copy_(values[entry.param])


def _snapshot(imported: ImportedModel) -> dict[str, torch.Tensor]:
    return {e.param: imported.parameter(e).detach().to("cpu", copy=True) for e in imported.weights}


def _to_batches(feeds, input_names: list[str], device: torch.device):
    for feed in feeds:
        inputs = tuple(torch.from_numpy(np.ascontiguousarray(feed[n])).to(device) for n in input_names)
        labels = feed.get(LABELS)
        yield Batch(inputs, None if labels is None else torch.from_numpy(labels).to(device))


def _weight_specs(imported: ImportedModel) -> list[WeightSpec]:
    specs = []
    for entry in imported.compressible():
        specs.append(WeightSpec(entry.param, entry.onnx_name, entry.op_type, *entry.channel_axes))
    return specs


def compress(
    model: str | Path | onnx.ModelProto,
    data: Data,
    config: CompressConfig = CompressConfig(),
    *,
    val_data: Data | None = None,
    progress: Progress | str | None = None,
    output: str | Path | None = None,
    report_path: str | Path | None = None,
    save_stages: str | Path | None = None,
    max_accuracy_drop: float | None = None,
    metric_floor: float = DEFAULT_FLOOR,
    keep_failed: bool = True,
    protect: dict[str, str | Path | None] | None = None,
) -> CompressResult:
    """Compress ``model`` with progressive ADMM pruning and validate it in onnxruntime.

    Args:
        model: path to an ONNX file (external data beside it), or a loaded ModelProto.
        data: training data: an .npz path or a ``module:function`` loader plugin; a dict
            ``{input_name: array, "labels": class ids}`` of numpy arrays or torch tensors; an iterable of
            such dicts (read once into memory); a function returning one (called once per epoch, like a
            plugin); or a Dataset. Every form is checked like an .npz (``onnx_admm.data.as_data``): names,
            dtypes (float64 is cast to the graph's float type), shapes, finite values, labels.
        config: the recipe (see ``onnx_admm.recipe``).
        val_data: held-out data, in any form ``data`` takes; default: ``config.train.val_fraction`` of ``data`` (npz) or the first
            ``PLUGIN_VAL_SAMPLES`` samples of a plugin.
        progress: a callable, called with event dicts (``onnx_admm.progress`` lists them); or a display mode:
            ``"auto"`` (a tqdm bar per phase on a terminal, else a log line per epoch), ``"bars"``, ``"lines"``
            or ``"off"``, written to stderr. None: no progress.
        output: where to save the compressed model (a folder, existing or ending in ``/``, gets the
            model's stem + ``.admm.onnx``). It is saved as soon as training ends, beside its target under
            a temporary name, validated there, then renamed into place, so a failure in the validation
            keeps it (``ReportFailed``).
        report_path: where to write the JSON report.
        save_stages: a folder that also gets every stage's model (``<output stem>.stage<N>.onnx``).
        max_accuracy_drop: the accuracy gate: a larger drop on the held-out split (without labels:
            1 - the task metric against the original) raises ``AccuracyGateFailed`` after writing the
            model as ``<output stem>.gate-failed.onnx``.
        metric_floor: the compressed model must keep this share of the original's figure on the
            held-out split (accuracy with labels, else the task metric against the original), or
            ``AccuracyGateFailed`` is raised the same way; 0 turns it off (``onnx_admm.gate``).
        keep_failed: False: a model that fails the gate is not written at all.
        protect: more files the run reads (label -> path, e.g. the recipe) that no output may overwrite.

    Every output is checked before any work: writable, and none of them an input (the model, its
    external data, the data files, ``protect``) or another output. While compress runs in the main
    thread SIGTERM acts like Ctrl-C, and a signal during a file write waits until the file is whole.

    Returns:
        A CompressResult with ``.save(path)``, ``.report`` and ``.files`` (what was written).

    Raises:
        UserError: bad model, data, recipe or output path; every training phase diverged; or
            (``ReportFailed``, the model saved to ``output``) the validation or the report failed after training.
        CompressInterrupted: on Ctrl-C or SIGTERM, carrying the completed stages (the last one saved to
            ``output`` when given).
        AccuracyGateFailed: the drop exceeds ``max_accuracy_drop`` or the task metric falls under
            ``metric_floor`` (the outputs are written).
    """
    started = time.perf_counter()
    gate = Gate(max_accuracy_drop, metric_floor)
    check_config(config)
    shown = display(progress)
    original_path = Path(model) if not isinstance(model, onnx.ModelProto) else None
    files = RunFiles.plan(_model_name(original_path), output, report_path, save_stages,
                          gated=gate.active, keep_failed=keep_failed)
    # Read once: its external data files are inputs to protect, and the output keeps its weights outside too.
    locations = external_locations(original_path) if original_path is not None else set()
    inputs = input_files(model, data, val_data, protect, locations=locations)
    files.check(inputs)
    threads_before = torch.get_num_threads()
    with sigterm_interrupts():
        try:
            cfg = config.train
            original = load_model(model) if original_path is not None else model
            check_outputs(original)
            external = bool(locations)
            imported = import_model(original, output=cfg.output)
            torch.manual_seed(cfg.seed)
            if cfg.threads:
                torch.set_num_threads(cfg.threads)
            with shown as emit:
                emit = emit or (lambda event: None)
                result, measured = _compress(original, original_path, external, imported, data, val_data, config,
                                             emit, files, inputs)
                return _finish(result, measured, files, original_path, started, gate, emit)
        except CompressInterrupted:  # raised by a later step with what it kept
            raise
        except KeyboardInterrupt as exc:  # before training started: nothing to keep
            raise CompressInterrupted(None, interrupt=exc) from None
        finally:
            torch.set_num_threads(threads_before)


def _compress(original, original_path, external, imported, data, val_data, config, emit: Progress, files,
              inputs) -> tuple[CompressResult, _Measured]:
    """Plan and train; returns the result with every stage (its ``report`` still empty)."""
    cfg = config.train
    device = torch.device(cfg.device)
    check_weights(imported)
    if not imported.compressible():
        raise UserError(_nothing_to_compress(imported))
    imported.module.to(device)
    specs = _weight_specs(imported)
    plan = make_plan(specs, config)
    floors = check_budget(plan, {s.name: imported.module.get_parameter(s.name) for s in specs})
    groups, left_alone = {}, {}
    if any(w.structure == "filter" and (w.sparsity is not None or w.shared) for w in plan.weights):
        # Every member of a coupled group (the convs of one residual sum) finds the group by its weight.
        groups = {member: g for g in channel_groups(original) for member in g.producers}
        plan, left_alone = _keep_removable_filters(plan, groups)
    if any(nm_pattern(w.structure) for w in plan.weights):
        shapes = {s.name: imported.module.get_parameter(s.name).shape for s in specs}
        plan, nm_alone = _keep_nm_weights(plan, shapes, groups)
        left_alone.update(nm_alone)
    # A compressible weight without a target (skipped, or outside every rule with no global target) is
    # left untouched: it does not train either.
    for name in plan.untouched(specs):
        imported.module.get_parameter(name).requires_grad_(False)
    train_data, select, held_out = _resolve_splits(data, val_data, graph_inputs(original), cfg)
    check_labels(imported, train_data, held_out)
    runner = _Runner(imported, config, plan, train_data, select, held_out, device, emit, groups)
    name = _model_name(original_path)
    try:
        runner.run()
    except KeyboardInterrupt as exc:
        partial = runner.result(external, name, inputs) if runner.stages else None
        saved = _save_last(partial, files.model, None, None) if partial is not None else []
        raise CompressInterrupted(partial, saved, exc, unwritten=_unwritten(files, saved)) from None
    result = runner.result(external, name, inputs)
    diverged = _all_phases_rolled_back(result.stages)
    if diverged:
        raise UserError(f"training diverged in every phase (each was rolled back and stopped), so nothing was "
                        f"written; first: {diverged}; lower train.lr (now {cfg.lr}) or set admm.rho "
                        f"(now {config.admm.rho if config.admm.rho is not None else 'chosen per phase; see the log'})")
    warnings = []
    if floors is not None and floors > 0.5:
        warnings.append(f"the per-layer minimums (min_keep, floor) hold {100 * floors:.0f}% of the global budget: "
                        "the allocation barely chooses; lower them")
        logger.warning("%s", warnings[-1])
    return result, _Measured(held_out, runner.dense_metric, left_alone, warnings)


def _model_name(original_path: Path | None) -> str:
    """The file name outputs are named after (a ModelProto has none)."""
    return original_path.name if original_path is not None else "model.onnx"


@dataclass
class _Measured:
    """What the training leaves for the report: the held-out split, the dense metric, notes."""

    held_out: Dataset
    dense_metric: float | None
    left_alone: dict[str, str]
    warnings: list[str]


def _finish(result: CompressResult, measured: _Measured, files: RunFiles, original_path: Path | None,
            started: float, gate: Gate, emit: Progress) -> CompressResult:
    """Save, validate and report; then put every output in place, each whole or not at all.

    The model is staged (written beside its target under a temporary name) first and validated
    there, so the report describes exactly the file that lands; only then do the files take their
    names: the model first (it is the work of the whole run), then the stage files and the report.
    Any exit the process can handle removes what was staged and not committed; an interrupt at any
    point still leaves the trained model at ``output``.
    """
    out = _Writing()
    with Staged() as staged:
        try:
            return _write_outputs(result, measured, files, original_path, started, gate, staged, out, emit)
        except KeyboardInterrupt as exc:
            if not out.model_done:
                out.written = _save_last(result, out.target if out.decided else files.model, staged, out.model_files)
            raise CompressInterrupted(result, out.written, exc, final=True,
                                      unwritten=_unwritten(files, out.written)) from None


@dataclass
class _Writing:
    """How far ``_finish`` got: the staged final model, the files committed so far."""

    model_files: list[Path] | None = None
    decided: bool = False  # the gate has chosen ``target``: OUT, the gate-failed name, or None (not written)
    target: Path | None = None
    model_done: bool = False  # the final model is at ``target``, or goes nowhere
    written: list[Path] = field(default_factory=list)


def _write_outputs(result, measured, files, original_path, started, gate: Gate, staged: Staged,
                   out: _Writing, emit: Progress) -> CompressResult:
    cfg = result.config.train
    exported = result.export(-1, result.metadata(-1))  # exactly what save() writes
    try:
        with deferred():
            if files.model is not None:
                out.model_files = staged.model(exported.model, files.model, result.external_data)
                compressed = out.model_files[0]
            else:
                compressed = staged.scratch(Path(tempfile.gettempdir())) / "compressed.onnx"
                save_model(exported.model, compressed, external_data=result.external_data)
        emit({"kind": "validate", "samples": len(measured.held_out)})
        report = _report(result, exported, compressed, original_path, staged, measured, cfg, started)
    except Exception as exc:
        if out.model_files is None:
            if isinstance(exc, OSError):
                raise UserError(f"training finished but saving the model to {files.model or 'a temporary file'} "
                                f"failed ({exc.strerror or exc}); nothing was written") from None
            raise
        out.written = _save_last(result, files.model, staged, out.model_files)
        out.model_done = True
        logger.debug("after training", exc_info=True)
        raise ReportFailed(result, out.written[0], exc) from None
    if measured.left_alone:
        report["left_alone"] = measured.left_alone
    report["warnings"] = measured.warnings + report["warnings"]
    m = report["metrics"]
    report["gate"], failure = gate.judge(report["accuracy_drop"],
                                         retained(m["original_accuracy"], m["compressed_accuracy"], m["task"]))
    passed = failure is None
    target = files.model if passed else files.failed
    out.target, out.decided = target, True
    report["output"] = None if target is None else str(target)
    result.report = report

    writing = target
    try:
        with deferred():
            if target is not None:
                if target != files.model:  # saved again so that its external data is named after it
                    out.model_files = staged.model(exported.model, target, result.external_data)
                out.written += staged.commit(out.model_files)
            out.model_done = True
        for k, stage in enumerate(result.stages if files.stages is not None else []):
            writing = stage_path(files.stages, files.model or Path(result.name), stage.index)
            with deferred():
                out.written += staged.commit(staged.model(result.model(k), writing, result.external_data))
        if files.report is not None:
            writing = files.report
            with deferred():
                out.written += staged.commit([staged.json(report, files.report)])
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if target is not None and out.written:
            raise UserError(f"the compressed model is saved to {out.written[0]}, but writing {writing} failed: "
                            f"{reason}") from None
        raise UserError(f"training finished but writing {writing} failed ({reason}); choose a writable location") from None
    result.files = list(out.written)
    if not passed:
        raise AccuracyGateFailed(result, failure, target)
    return result


def _save_last(result: CompressResult, target: Path | None, staged: Staged | None,
               model_files: list[Path] | None) -> list[Path]:
    """Put the last completed stage at ``target`` (its staged copy, if one is ready for that name) while
    already handling an interrupt or a failure: a second signal must neither cut this save short nor
    escape as a bare one."""
    if target is None:
        return []
    with deferred(deliver=False):
        if model_files is not None and model_files[0].name == target.name:
            return staged.commit(model_files)
        return save_model(result.model(-1), target, external_data=result.external_data)


def _unwritten(files: RunFiles, written: list[Path]) -> list[Path]:
    stages = [] if files.stages is None or any(p.parent == files.stages for p in written) else [files.stages]
    return [p for p in (files.report,) if p is not None and p not in written] + stages


class ReportFailed(UserError):
    """Training finished and the model was saved, but validating it or building the report failed."""

    def __init__(self, result: CompressResult, output: str | Path, cause: BaseException) -> None:
        text = str(cause).strip().splitlines()
        line = text[0] if text else type(cause).__name__
        if not isinstance(cause, UserError):
            line = f"{type(cause).__name__}: {line}"
        super().__init__(f"training finished and the compressed model is saved to {output}, but validating it "
                         f"failed: {line}")
        self.result = result


def _nothing_to_compress(imported: ImportedModel) -> str:
    where = ""
    if imported.passed_through:
        where = (f" (onnx-admm trains {', '.join(imported.output_names)} and passes {', '.join(imported.passed_through)} "
                 f"through unconverted nodes: {'; '.join(imported.not_converted)})")
    return (f"the model has no compressible weight that onnx-admm can train{where}; compress needs a Conv, "
            "ConvTranspose, Gemm, MatMul, Gather or recurrent weight in the converted part of the graph")


def _all_phases_rolled_back(stages: list[StageResult]) -> str | None:
    """The first rollback note when every phase that had epochs was rolled back and stopped, else None."""
    if not stages:
        return None
    for stage in stages:
        phases = {phase for phase, epochs in stage.epochs.items() if epochs > 0}
        if not phases or not phases <= set(stage.stopped):
            return None
    return stages[0].rolled_back.split(";")[0]


class _Runner:
    """One compress run: the stages of ADMM, hard projection and retraining over the planned weights."""

    def __init__(self, imported: ImportedModel, config: CompressConfig, plan: Plan, train_data, select: Dataset,
                 held_out: Dataset, device: torch.device, emit: Progress, groups: dict[str, ChannelGroup]) -> None:
        self.imported, self.config, self.plan, self.groups = imported, config, plan, groups
        self.cfg = config.train
        self.train_data, self.select, self.held_out, self.device, self.emit = train_data, select, held_out, device, emit
        score = imported.score
        self.score = ScoreSpec(score.index if score else None, score.kind if score else "logits", self.cfg.blank)
        # The teacher serves distillation (training batches without labels, or any batch when there is no
        # score output for labels to apply to) and agreement (held-out split without labels). A plugin's
        # labels are unknown until it runs, so it always gets one.
        train_labeled = isinstance(train_data, Dataset) and train_data.labels is not None
        self.teacher = None
        if (held_out.labels is None or select.labels is None or not train_labeled or self.score.index is None
                or self.cfg.distill > 0):
            self.teacher = copy.deepcopy(imported.module).eval()
            self.teacher.requires_grad_(False)
        if self.score.index is None and held_out.labels is not None:
            logger.warning("the model has no score output ([N, C] float): labels are ignored and the loss is MSE "
                           "to the original model's outputs")
        self.loss_fn = Loss(self.score, distill=self.cfg.distill)
        self.params = {w.spec.name: imported.module.get_parameter(w.spec.name) for w in plan.weights}
        self.stages: list[StageResult] = []
        self.epoch_counter = 0
        self.history: list[dict[str, Any]] = []  # the current stage's epoch records
        self.dense_metric = self.val_metric()

    # -- helpers

    def batches(self, ds, shuffle: bool, seed: int | None = None):
        return _to_batches(ds.batches(self.cfg.batch_size, shuffle=shuffle, seed=seed), self.imported.input_names,
                           self.device)

    def val_metric(self) -> float | None:
        """The metric on the held-out split (reported only, never used to choose)."""
        return evaluate(self.imported.module, self.batches(self.held_out, False), self.score, self.teacher)

    def select_metric(self) -> float | None:
        """The metric on the selection split, which picks the retraining state kept."""
        return evaluate(self.imported.module, self.batches(self.select, False), self.score, self.teacher)

    def optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        return make_optimizer(self.imported.module.parameters(), cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)

    def result(self, external: bool, name: str, inputs: list[tuple[str, Path]]) -> CompressResult:
        return CompressResult(self.imported, self.config, list(self.stages), external_data=external,
                              groups=self.groups, name=name, inputs=inputs)

    # -- the run

    def run(self) -> None:
        previous: dict[str, torch.Tensor] | None = None
        budgets = self.config.stage_budgets(self.plan.n_stages)
        lengths = [self.phase_length(epochs)[1] for b in budgets for epochs in (b.admm, b.retrain)]
        self.emit({"kind": "run", "stages": self.plan.n_stages, "batches": self.steps_per_epoch(),
                   "steps": None if None in lengths else sum(lengths)})
        for stage in range(self.plan.n_stages):
            previous = self.stage(stage, previous, budgets[stage])

    def constraints(self, stage: int, previous: dict[str, torch.Tensor] | None,
                    values: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Each weight's constraint at ``stage``; a global budget is split over layers by ``values``."""
        sparsity = sparsity_constraints(self.plan, values, stage, previous)
        out = {}
        for w in self.plan.weights:
            name, choice = w.spec.name, w.quant[stage]
            quant = None if choice is None else _quantizer(choice, w.spec)
            if quant is not None and name in sparsity:
                out[name] = Joint(sparsity[name], quant)
            elif quant is not None:
                out[name] = quant
            else:
                out[name] = sparsity[name]
        return out

    def current(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.params.items()}

    def stage(self, stage: int, previous: dict[str, torch.Tensor] | None, budget: PhaseBudget) -> dict[str, torch.Tensor]:
        params = {name: self.params[name] for name in self.constraints(stage, previous, self.current())}
        self.history = []
        self.emit({"kind": "stage", "stage": stage, "stages": self.plan.n_stages,
                   "target": self.plan.global_stages[stage] if self.plan.global_stages else None})
        rolled, admm = self.admm_phase(stage, params, previous, budget.admm)
        quantized = {w.spec.name: w for w in self.plan.weights if w.spec.name in params and w.quant[stage]}
        # Integer levels and scales of the hard projection, for export (the retraining keeps its levels).
        final = self.constraints(stage, previous, self.current())
        scales = {name: quantize(final[name], params[name].detach()) for name in quantized}
        latent = {name: params[name].detach().clone() for name in quantized}  # where STE starts (levels.py)
        supports = admm.hard_project()
        levels = {name: FixedLevels.of(params[name].detach(), supports[name], _level_axis(w, stage))
                  for name, w in quantized.items()}
        kept = self.removed_filters(supports)
        masked = {name: self.imported.module.get_parameter(name) for name in supports}
        metric, values, rolled_r = self.retrain_phase(stage, masked, supports, levels, budget.retrain, latent)
        _load_values(self.imported, values)
        total = sum(p.numel() for p in params.values())
        zeros = sum(int((p == 0).sum()) for p in params.values())
        self.stages.append(StageResult(
            index=stage, target=self.plan.global_stages[stage] if self.plan.global_stages else None,
            sparsity=zeros / total, val_metric=metric,
            rolled_back="; ".join(m for m in (rolled, rolled_r) if m) or None,
            values=values, residuals={n: list(h) for n, h in admm.residual_history.items()},
            quant={n: w.quant[stage] for n, w in quantized.items()}, kept_channels=kept,
            quant_specs={n: _quant_spec(self.imported, n, w.quant[stage], scales[n]) for n, w in quantized.items()},
            patterns={w.spec.name: nm_constraint(w) for w in self.plan.weights
                      if w.spec.name in params and nm_constraint(w) is not None},
            epochs={"admm": budget.admm, "retrain": budget.retrain},
            stopped=[phase for phase, note in (("admm", rolled), ("retrain", rolled_r)) if note],
            history=self.history,
        ))
        logger.info("stage %d done: sparsity %.4f, selection metric %s", stage, zeros / total, metric)
        return supports

    def removed_filters(self, supports: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Kept channels per filter-pruned group; adds masks zeroing the consumers' input channels.

        Removing a channel from the graph equals zeroing every consumer weight that reads it (its bias or
        BatchNorm shift would otherwise still reach the next layer), so those weights are masked too and
        the masked model computes exactly what the shrunk graph will.
        """
        entries = {e.onnx_name: e for e in self.imported.weights if e.owns_tensor}
        kept_channels, device = {}, None
        for w in self.plan.weights:
            if w.structure != "filter" or w.spec.label not in self.groups:
                continue
            group = self.groups[w.spec.label]
            support = supports[w.spec.name]
            axis, device = w.spec.out_axis, support.device
            kept = support.movedim(axis, 0).reshape(support.shape[axis], -1).any(dim=1).cpu().numpy()
            # The members of a coupled group were projected together (plan.coupled): a channel stays in the
            # graph while any member keeps it.
            kept_channels[group.name] = kept | kept_channels.get(group.name, False)
        for name, kept in kept_channels.items():
            group = self.groups[name]
            removed = np.flatnonzero(~kept)
            for piece in group.consumers:
                entry = entries[piece.tensor]
                mask = np.ones(entry.onnx_shape, dtype=bool)
                index = [slice(None)] * mask.ndim
                index[piece.axis] = piece.positions(group.n_channels, removed)
                mask[tuple(index)] = False
                mask_t = torch.from_numpy(np.ascontiguousarray(mask.T if entry.layout.transpose else mask))
                mask_t = mask_t.to(device)
                supports[entry.param] = supports[entry.param] & mask_t if entry.param in supports else mask_t
        return kept_channels

    def initial_rho(self, steps_per_period: int | None) -> float:
        """admm.rho, or the one whose pull per Z/U period is the same at every budget (schedule.auto_rho).
        With Adam, or a loader plugin (steps per period unknown), 1e-2."""
        if self.config.admm.rho is not None:
            return self.config.admm.rho
        if self.cfg.optimizer != "sgd" or steps_per_period is None:
            return 1e-2
        return auto_rho(self.cfg.lr, self.cfg.momentum, steps_per_period, self.config.admm.pull)

    def admm_phase(self, stage, params, previous, epochs: float):
        """ADMM epochs; weights pruned by earlier stages stay at zero throughout (nested masks)."""
        admm_cfg = self.config.admm
        pinned = None
        if previous:  # every earlier mask, consumers of removed channels included
            pinned = FixedSupport({n: self.imported.module.get_parameter(n) for n in previous}, previous)
        per_epoch = self.steps_per_epoch()
        # Z/U period in steps (in-memory data) or epochs (a plugin, whose epoch length is unknown).
        period = admm_cfg.period
        if per_epoch is None:
            if period is not None and period < 1:
                raise UserError("admm.period below 1 needs in-memory data (.npz), whose batches per epoch are "
                                "known; use a whole number of epochs with a loader plugin")
            every = int(period) if period is not None else max(1, round(epochs) // admm_cfg.updates)
        elif period is not None:
            every = max(1, round(period * per_epoch))
        else:
            updates = admm_updates(round(epochs * per_epoch), admm_cfg.updates)
            every = max(1, round(epochs * per_epoch) // updates)
        # Without a period the phase makes exactly `updates` Z/U updates (the last period runs longer),
        # fewer in a phase too short for periods of schedule.MIN_PERIOD_STEPS steps.
        limit = (updates if per_epoch is not None else admm_cfg.updates) if period is None else None
        rho = self.initial_rho(every if per_epoch is not None else None)
        cap = admm_cfg.rho_max
        if cap is None:
            cap = max(rho, rho_cap(self.cfg.lr, self.cfg.momentum)) if self.cfg.optimizer == "sgd" else math.inf
        admm = ADMM(params, lambda values: self.constraints(stage, previous, values),
                    RhoSchedule(rho, admm_cfg.rho_growth, cap), rescale_dual=admm_cfg.rescale_dual)
        logger.info("stage %d ADMM: rho %.3g (x%.3g per update), a Z/U update every %d %s", stage, rho,
                    admm_cfg.rho_growth, every, "steps" if per_epoch is not None else "epochs")
        optimizer = self.optimizer()
        hooks_b = [admm.add_penalty_grad] + ([pinned.mask_grads] if pinned else [])
        hooks_s = [lambda: pinned.apply(optimizer)] if pinned else []
        if per_epoch is not None:
            steps = [0]

            def step_update() -> None:
                steps[0] += 1
                if steps[0] % every == 0 and (limit is None or admm.n_updates < limit):
                    admm.update()

            hooks_s.append(step_update)

        def on_epoch_end(epoch, stats) -> dict[str, Any]:
            if per_epoch is None and (epoch + 1) % every == 0 and (limit is None or admm.n_updates < limit):
                admm.update()  # a plugin: periods are whole epochs
            # For people watching: the dense W on the selection split, and how far W still is from Z.
            return {"metric": self.select_metric(), "residual": _mean_residual(admm)}

        message = self.run_phase("admm", stage, epochs, optimizer, hooks_b, hooks_s, on_epoch_end,
                                 lr=lambda step, total: lr_factor(step, total, admm_cfg.lr_policy, every))
        return message, admm

    def retrain_phase(self, stage, params, supports, levels, epochs: float, latent=None):
        """Masked retraining (LR annealed to 0 over the phase) that keeps the best state on the selection
        split; quantized weights train through the straight-through estimator on the hard projection's levels."""
        fixed = FixedSupport(params, supports)
        fixed.apply()
        ste = StraightThrough({n: params[n] for n in levels}, levels, supports, latent) if levels else None
        optimizer = self.optimizer()
        with ste.projected() if ste else nullcontext():
            best = {"metric": self.select_metric(), "values": _snapshot(self.imported)}

        def epoch_end(epoch, stats) -> dict[str, Any]:
            with ste.projected() if ste else nullcontext():
                metric = self.select_metric()
                if metric is None or best["metric"] is None or metric >= best["metric"]:
                    best.update(metric=metric if metric is not None else best["metric"], values=_snapshot(self.imported))
            return {"metric": metric}

        hooks_b = [fixed.mask_grads] + ([ste.before_step] if ste else [])
        hooks_f = [ste.before_forward] if ste else []
        message = self.run_phase("retrain", stage, epochs, optimizer, hooks_b, [lambda: fixed.apply(optimizer)],
                                 epoch_end, hooks_f, lr=lambda step, total: lr_factor(step, total, "cosine"))
        return best["metric"], best["values"], message

    def steps_per_epoch(self) -> int | None:
        if not isinstance(self.train_data, Dataset):
            return None
        return -(-len(self.train_data) // self.cfg.batch_size)

    def phase_length(self, epochs: float) -> tuple[int, int | None]:
        """(epochs run, steps) of a phase of ``epochs`` epochs; steps are None for a loader plugin, which
        runs whole epochs of unknown length."""
        per_epoch = self.steps_per_epoch()
        if per_epoch is None:
            return (max(1, round(epochs)) if epochs > 0 else 0), None
        total = round(epochs * per_epoch)
        return -(-total // per_epoch), total

    def run_phase(self, phase: str, stage: int, epochs: float, optimizer, hooks_backward, hooks_step, on_epoch_end,
                  hooks_forward=(), lr: Callable[[int, int], float] | None = None) -> str | None:
        """Train ``epochs`` epochs (the last one cut short for a fraction); ``lr(step, total)`` scales the
        learning rate per step. On a non-finite loss roll back to the epoch's start and stop the phase.

        ``on_epoch_end(epoch, stats)`` returns the epoch's ``metric`` and ``residual`` for its history record.
        """
        imported = self.imported
        per_epoch = self.steps_per_epoch()
        n_epochs, total = self.phase_length(epochs)  # a loader plugin: the LR schedule counts epochs
        where = {"stage": stage, "stages": self.plan.n_stages, "phase": phase}
        if n_epochs:
            self.emit({"kind": "phase", **where, "epochs": n_epochs, "steps": total, "batches": per_epoch})
        base = [group["lr"] for group in optimizer.param_groups]
        done = [0]

        def set_lr() -> None:
            if lr is None:
                return
            factor = lr(done[0], total) if total is not None else lr(epoch, n_epochs)
            for group, value in zip(optimizer.param_groups, base):
                group["lr"] = value * factor

        def count() -> None:
            done[0] += 1
            if total is not None:
                set_lr()

        for epoch in range(n_epochs):
            started = time.perf_counter()
            snapshot = (_snapshot(imported), copy.deepcopy(optimizer.state_dict()))
            set_lr()
            steps = None if total is None else min(per_epoch, total - epoch * per_epoch)
            self.emit({"kind": "epoch", **where, "epoch": epoch, "epochs": n_epochs, "batches": steps})
            batches = self.batches(self.train_data, True, self.cfg.seed + self.epoch_counter)
            if steps is not None:
                batches = itertools.islice(batches, steps)
            try:
                stats = train_epoch(
                    imported.module, batches, self.loss_fn, optimizer, self.teacher, hooks_backward,
                    [*hooks_step, count],
                    on_batch=lambda i, loss, acc: self.emit({"kind": "batch", "stage": stage, "phase": phase,
                                                             "epoch": epoch, "batch": i, "loss": loss, "acc": acc}),
                    before_forward=hooks_forward,
                )
                # The loss check sees a step's damage only at the next batch: after the epoch's last step
                # a non-finite weight would otherwise reach the next snapshot and make rollback useless.
                if not all(bool(torch.isfinite(imported.parameter(e)).all()) for e in imported.weights):
                    raise NonFiniteLoss("a weight is NaN or infinite after the epoch's last step")
            except NonFiniteLoss as exc:
                _load_values(imported, snapshot[0])
                optimizer.load_state_dict(snapshot[1])
                message = (f"stage {stage} {phase} epoch {epoch}: {exc}; rolled back to the start of the epoch "
                           f"and stopped the {phase} phase")
                logger.warning("%s", message)
                self.emit({"kind": "phase_end", **where, "stopped": message})
                return message
            except EmptyEpoch:
                # A loader plugin that returns an exhausted generator yields data once, then nothing.
                raise UserError(
                    f"the training data yielded no samples in stage {stage} {phase} epoch {epoch}; a loader "
                    "plugin is called once per epoch and must yield a fresh, non-empty stream every time"
                ) from None
            finally:
                self.epoch_counter += 1
            measured = on_epoch_end(epoch, stats)
            record = {"phase": phase, "epoch": epoch, "loss": stats.loss, "train_metric": stats.accuracy,
                      "metric": measured.get("metric"), "residual": measured.get("residual"),
                      "samples": stats.samples, "seconds": time.perf_counter() - started}
            self.history.append(record)
            self.emit({"kind": "epoch_end", **where, "epochs": n_epochs, **record})
        if n_epochs:
            self.emit({"kind": "phase_end", **where, "stopped": None})
        return None


def _mean_residual(admm: ADMM) -> float | None:
    """The mean over the weights of the primal residual at the last Z/U update (None before the first)."""
    last = [h[-1] for h in admm.residual_history.values() if h]
    return sum(last) / len(last) if last else None


def _keep_removable_filters(plan: Plan, groups: dict[str, ChannelGroup]) -> tuple[Plan, dict[str, str]]:
    """Filter pruning only where the channels can leave the graph, a coupled group's members all pruned
    together (``plan.coupled``) or all left alone."""
    filtered = [w for w in plan.weights if w.structure == "filter" and (w.sparsity is not None or w.shared)]
    pruned = {w.spec.label: w.spec.name for w in filtered}
    left_alone = {}
    for w in filtered:
        label, group = w.spec.label, groups.get(w.spec.label)
        if group is None or not group.prunable:
            left_alone[label] = group.reason if group is not None else f"{w.spec.op_type} filters are not removable"
        elif missing := [m for m in group.producers if m not in pruned]:
            left_alone[label] = (f"coupled with {', '.join(missing)} (their outputs meet in a residual sum), which "
                                 "the recipe does not filter-prune: a coupled group is pruned whole or not at all")
    plan, left_alone = _left_alone(plan, left_alone, "filter pruning", "no weight can lose whole filters")
    coupled = {g.name: tuple(pruned[m] for m in g.producers) for label, g in groups.items()
               if label in pruned and label not in left_alone and len(g.producers) > 1}
    return dataclasses.replace(plan, coupled=tuple(coupled.values())), left_alone


# The ops whose weights the N:M kernels of sparse tensor cores read (TensorRT's Convolution and fully
# connected layers); a ConvTranspose, an embedding or a recurrent weight gains nothing from the pattern.
_NM_OPS = ("Conv", "Gemm", "MatMul")


def _keep_nm_weights(plan: Plan, shapes: dict[str, torch.Size],
                     groups: dict[str, ChannelGroup]) -> tuple[Plan, dict[str, str]]:
    """N:M only on Conv/Gemm/MatMul weights whose input axis splits into runs of M and keeps its length;
    the others are left alone (as filters coupled through the graph are), since a layer with 3 input
    channels is common."""
    # Input channels removed with the filters that feed them would shift every run after them.
    shrinking = {piece.tensor: w.spec.label for w in plan.weights
                 if w.structure == "filter" and (w.sparsity is not None or w.shared) and w.spec.label in groups
                 for piece in groups[w.spec.label].consumers}
    left_alone = {}
    for w in plan.weights:
        pattern = nm_pattern(w.structure)
        if pattern is None:
            continue
        length = shapes[w.spec.name][reduction_axis(w.spec)]
        if w.spec.op_type not in _NM_OPS:
            left_alone[w.spec.label] = f"{w.structure} applies to Conv, Gemm and MatMul weights, not {w.spec.op_type}"
        elif length % pattern[1]:
            left_alone[w.spec.label] = (f"{w.structure} needs the input axis in runs of {pattern[1]}; it holds {length} "
                                        "(input channels per group of the layer)")
        elif w.spec.label in shrinking:
            left_alone[w.spec.label] = (f"its input channels leave the graph with the filters of "
                                        f"{shrinking[w.spec.label]!r} (filter pruning), which would break the runs")
    return _left_alone(plan, left_alone, "N:M", "no weight can take the N:M pattern")


def _left_alone(plan: Plan, reasons: dict[str, str], what: str, none_left: str) -> tuple[Plan, dict[str, str]]:
    """``leave_alone`` with a warning per weight; an error when no weight keeps a target."""
    for label, reason in reasons.items():
        logger.warning("%s is left alone (%s): %s", label, what, reason)
    plan = leave_alone(plan, list(reasons))
    if not plan.weights:
        raise UserError(f"{none_left}: " + "; ".join(f"{k}: {v}" for k, v in reasons.items())
                        + "; choose another structure, or add rules for the weights that can take it")
    return plan, reasons


def _quantizer(choice: QuantChoice, spec: WeightSpec):
    axis = spec.out_axis or 0
    if choice.ternary:
        return Ternary(per_channel=choice.per_channel, axis=axis)
    if choice.clusters is not None:
        return Codebook(choice.clusters)
    if choice.bits == 1:
        return Binary(per_channel=choice.per_channel, axis=axis)
    return UniformQuant(choice.bits, per_channel=choice.per_channel, axis=axis, symmetric=choice.symmetric)


def _quant_spec(imported: ImportedModel, param: str, choice: QuantChoice, qt) -> QuantSpec:
    """How a quantized weight is stored, in its ONNX layout (Gemm weights may be transposed and scaled)."""
    if qt is None:  # a codebook: its levels are the values themselves
        return QuantSpec(bits=max(1, math.ceil(math.log2(max(2, choice.clusters)))))
    entry = next(e for e in imported.weights if e.param == param)
    scale = qt.scale.detach().cpu().numpy().astype(np.float32) / np.float32(entry.layout.scale)
    axis = qt.axis
    if axis is not None and entry.layout.transpose:
        axis = qt.q.dim() - 1 - axis
    return QuantSpec(bits=qt.bits, scale=scale, axis=axis)


def _level_axis(w: WeightPlan, stage: int) -> int | None:
    """Per-channel quantizers keep one level set per output channel; the others one per tensor."""
    choice = w.quant[stage]
    return (w.spec.out_axis or 0) if choice.per_channel and choice.clusters is None else None


def _resolve_splits(data, val_data, specs, cfg) -> tuple[Dataset | PluginData, Dataset, Dataset]:
    """Training data, the selection split and the held-out split.

    The selection split (``val_fraction`` of the training data, never trained on) picks the best
    retraining state; the held-out split (``val_data``, else another ``val_fraction`` of the training
    data) is only measured: the report and the accuracy gate read it, nothing is chosen by it.
    """
    data = as_data(data, specs, "data")
    if val_data is not None:
        val_data = as_data(val_data, specs, "val_data")
        if isinstance(val_data, PluginData):
            val_data = val_data.take(PLUGIN_VAL_SAMPLES)
    if isinstance(data, PluginData):
        logger.warning("selecting retraining states on the first %d samples of the loader plugin (they are also "
                       "trained on)", PLUGIN_VAL_SAMPLES)
        select = data.take(PLUGIN_VAL_SAMPLES)
        if val_data is None:
            logger.warning("validating on the same %d samples; pass val_data for a true held-out split",
                           PLUGIN_VAL_SAMPLES)
        return data, select, val_data if val_data is not None else select
    if len(data) == 0:
        raise UserError("the data holds no samples; pass a non-empty .npz")
    if val_data is None:
        data, val_data = data.split(cfg.val_fraction, cfg.seed)
    data, select = data.split(cfg.val_fraction, cfg.seed + 1)
    return data, select, val_data


# Encodings that store a weight as float32 values: a quantized weight stored so has lost its levels' savings.
_FLOAT_ENCODINGS = ("dense", "sparse", "unchanged")


def _report(result: CompressResult, exported: WriteBackResult, compressed: Path, original_path: Path | None,
            staged: Staged, measured: _Measured, cfg, started) -> dict:
    """The JSON report of ``compressed`` (the saved final model) against the original, in onnxruntime."""
    imported = result.imported
    final = result.stages[-1]
    held_out = measured.held_out
    # The figures below come from the file: each weight as a runtime sees it (decoders evaluated, removed
    # filters gone) and the bytes the file spends on it.
    in_file = decoded_view(exported.model)[0]
    file_sources = constant_sources(in_file)
    nbytes = stored_nbytes(exported.model, [e.onnx_name for e in imported.compressible()])
    layers, warnings = [], []
    total = nonzero = 0
    for entry in imported.compressible():
        value = final.values[entry.param]
        n, nz = value.numel(), int((value != 0).sum())
        total += n
        nonzero += nz
        name = entry.onnx_name
        stored = (tensor_value(in_file, file_sources[name]) if name in file_sources
                  else entry.layout.to_onnx(value.numpy()))
        bits = 8 * nbytes[name] if name in nbytes else None
        encoding = exported.encodings.get(name, "unchanged")
        quantization = final.quant[entry.param].describe() if entry.param in final.quant else None
        layers.append({
            "name": name, "op_type": entry.op_type, "shape": list(entry.onnx_shape),
            "stored_shape": list(stored.shape),
            "params": n, "nonzero": nz, "sparsity": 1 - nz / n,
            "residual": final.residuals[entry.param][-1] if final.residuals.get(entry.param) else None,
            "residual_history": final.residuals.get(entry.param, []),
            "levels": int(torch.unique(value).numel()) if entry.param in final.quant else None,
            "quantization": quantization,
            "storage_bits": tensor_storage_bits(stored),
            # how write-back stored it: encoding, raw bits in the file and bits per stored weight
            "encoding": encoding,
            "stored_bits": bits,
            "stored_bits_per_weight": bits / stored.size if bits is not None and stored.size else None,
            "note": exported.notes.get(name),
        })
        if quantization is not None and encoding in _FLOAT_ENCODINGS:
            why = exported.notes.get(name) or "no integer or codebook encoding reproduces its values here"
            warnings.append(f"{name} is on {quantization} levels but stored as float32 ({encoding}): {why}")
            logger.warning("%s", warnings[-1])
    nm = _nm_report(imported, final.patterns, in_file, file_sources)
    for layer in (nm or {}).get("layers", []):
        if not layer["holds"]:
            warnings.append(f"{layer['name']} should hold {layer['pattern']} but a run of the file holds "
                            f"{layer['max_nonzeros_per_run']} nonzeros")
            logger.warning("%s", warnings[-1])
    structure = None
    # compressed lies in a temporary folder beside the output (or in the system's temporary folder):
    # every other temporary file of the report goes there too, never elsewhere.
    folder = compressed.parent.parent
    orig = original_path
    if orig is None:  # a ModelProto: onnxruntime needs a file
        orig = staged.scratch(folder) / "original.onnx"
        save_model(imported.original, orig)
    validation = validate(orig, compressed, held_out, batch_size=cfg.batch_size, threads=cfg.threads or 1,
                          score_output=cfg.output, scratch=folder, blank=cfg.blank)
    if final.kept_channels:
        structure = _structure_report(orig, compressed, final.kept_channels, held_out, cfg.threads or 1,
                                      imported.ort_batch)
    diffs = [d.max_abs for d in validation.outputs if d.max_abs is not None]
    return {
        "structure": structure,
        "nm": nm,
        "batch": _batch_report(imported, cfg.batch_size, validation.batch_size),
        # What was trained, and the graph outputs computed from it by nodes kept as they are.
        "trained_outputs": list(imported.output_names),
        # The tensor the loss and the agreement used, how (onnx_admm.train.describe_score), and for an
        # inner tensor the integer graph output it feeds.
        "score": validation.score,
        "passed_through": list(imported.passed_through),
        "not_converted": list(imported.not_converted),
        # The papers' figure (nonzeros x value bits + index bits + codebooks), and the raw bits of the
        # compressed weights' encodings in the file.
        "storage_bits": {"original": 32 * total, "compressed": sum(layer["storage_bits"] for layer in layers),
                         "in_file": sum(layer["stored_bits"] or 0 for layer in layers)},
        "tool": {"name": "onnx-admm", "version": __version__},
        "config": result.config.to_dict(),
        "original": {"bytes": validation.original.bytes, "bytes_gzip": validation.original.gzip_bytes},
        "compressed": {"bytes": validation.compressed.bytes, "bytes_gzip": validation.compressed.gzip_bytes},
        "params": {"total": total, "nonzero": nonzero},
        "compression_ratio": total / nonzero if nonzero else None,
        "layers": layers,
        # onnxruntime-quantized nodes the output replaced by float ones (converters.quantized)
        "dequantized": imported.dequantized,
        "stages": [s.summary() for s in result.stages],
        "metrics": {
            "original_accuracy": validation.original.accuracy,
            "compressed_accuracy": validation.compressed.accuracy,
            "agreement": validation.agreement,
            # The task metric against the original (onnx_admm.metrics): what the floor and, without
            # labels, the accuracy gate read.
            "task": validation.task,
            "max_abs_diff": max(diffs, default=None),
            "torch_dense_val_metric": measured.dense_metric,
        },
        "validation": _without_paths(validation.to_dict()),
        # Accuracy drop with labels, else 1 - the task metric: what --max-accuracy-drop reads.
        "accuracy_drop": validation.drop,
        "warnings": warnings,
        "wall_s": time.perf_counter() - started,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _batch_report(imported: ImportedModel, batch_size: int, validated_at: int) -> dict:
    """How the batch was handled: dynamic, a baked batch made dynamic, or a fixed batch kept."""
    if imported.fixed_batch is not None:
        b = imported.fixed_batch
        note = (f"{imported.fixed_batch_reason}: trained at the graph's fixed batch {b}, each step accumulating "
                f"the gradients of {batch_size} samples in chunks of {b}; validated in onnxruntime at batch {b}")
        mode = "fixed"
    elif imported.baked_batch is not None:
        b = imported.baked_batch
        note = f"fixed batch {b} made dynamic: trained at batch {batch_size}; onnxruntime runs the graph at batch {b}"
        mode = "unbaked"
    else:
        b, note, mode = None, "dynamic batch", "dynamic"
    return {"mode": mode, "graph_batch": b, "train_batch": batch_size, "validation_batch": validated_at, "note": note}


def _structure_report(original: Path, compressed: Path, kept: dict[str, np.ndarray], held_out: Dataset,
                      threads: int, fixed: int | None = None) -> dict:
    """MACs and parameters before/after the shrink pass, and onnxruntime latency at batch 1 and 64
    (only at its batch for a graph that runs at one batch)."""
    # Weights behind DequantizeLinear / codebook decoders count as the tensors they decode to.
    before, after = (count_macs(decoded_view(load_model(path))[0]) for path in (original, compressed))
    latency = {}
    for batch in (1, 64) if fixed is None else (fixed,):
        latency[f"batch_{batch}"] = dict(zip(("original_ms", "compressed_ms"),
                                             latency_ms(original, compressed, held_out, batch, threads=threads)))
    return {
        "kept_channels": {name: int(mask.sum()) for name, mask in kept.items()},
        "channels": {name: int(mask.size) for name, mask in kept.items()},
        "macs": {"original": before["macs"], "compressed": after["macs"]},
        "params": {"original": before["params"], "compressed": after["params"]},
        "latency": latency,
        "note": "column- and block-pruned weights stay dense with zeros; removed filters are gone from the graph",
    }


def _nm_report(imported: ImportedModel, patterns: dict[str, NM], in_file: onnx.ModelProto,
               sources: dict) -> dict | None:
    """The N:M weights as the file holds them: pattern, the ONNX axis its runs follow, the fullest run,
    and which runtimes can use the pattern."""
    if not patterns:
        return None
    layers = []
    for entry in imported.compressible():
        constraint = patterns.get(entry.param)
        if constraint is None:
            continue
        value = tensor_value(in_file, sources[entry.onnx_name])
        # A Gemm weight stored as B [K, N] (transB = 0) is the transpose of the torch weight.
        axis = value.ndim - 1 - constraint.axis if entry.layout.transpose else constraint.axis
        worst = dataclasses.replace(constraint, axis=axis).max_nonzeros(torch.tensor(value))
        layers.append({"name": entry.onnx_name, "pattern": constraint.pattern, "axis": axis,
                       "runs": value.size // constraint.m, "max_nonzeros_per_run": worst,
                       "holds": worst <= constraint.n})
    used = sorted({c.pattern for c in patterns.values()})
    return {
        "layers": layers,
        "runs": ("M consecutive weights along the input axis, as sparse tensor cores read them: K of a Gemm/MatMul "
                 "weight, the input channels of a Conv weight at each (output channel, kernel position)"),
        "storage": "dense weights with exact zeros (or their int8/int4/int2/codebook encoding), no sparse initializer",
        "runtimes": {p: nm_runtimes(*nm_pattern(p)) for p in used},
    }


def _without_paths(validation: dict) -> dict:
    """The validation ran on temporary copies: their paths mean nothing once compress returns."""
    for side in ("original", "compressed"):
        validation[side].pop("path", None)
        validation[side].pop("files", None)
    return validation
