"""The output transaction of a compress run: the model staged beside its target and validated there,
the gate deciding its name, then every file renamed into place, each whole or not at all; an interrupt
still leaves the trained model at the output."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from onnx_admm.converters.errors import UserError
from onnx_admm.converters.modelio import Staged, save_model
from onnx_admm.activations import activation_report
from onnx_admm.gate import Gate, retained
from onnx_admm.outputs import RunFiles, stage_path
from onnx_admm.pipeline.report import build_report
from onnx_admm.pipeline.results import AccuracyGateFailed, CompressInterrupted, CompressResult, Measured, ReportFailed
from onnx_admm.progress import Progress
from onnx_admm.signals import deferred

logger = logging.getLogger(__name__)


def finish(result: CompressResult, measured: Measured, files: RunFiles, original_path: Path | None,
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
                out.written = save_last(result, out.target if out.decided else files.model, staged, out.model_files)
            raise CompressInterrupted(result, out.written, exc, final=True,
                                      unwritten=unwritten(files, out.written)) from None


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
        measured.memory.mark("export")
        emit({"kind": "validate", "samples": len(measured.held_out)})
        report = build_report(result, exported, compressed, original_path, staged, measured, cfg, started)
        if result.config.output.activations != "float":
            report["activations"] = activation_report(result, compressed, result.imported.original,
                                                      measured.held_out, cfg.threads or 1)
        measured.memory.mark("validate")
        # getrusage's peak restarts with every phase's reset: the run's peak is the largest phase peak.
        report["peak_rss_mb"] = measured.memory.peak_mb
        report["memory"] = measured.memory.to_dict()
    except Exception as exc:
        if out.model_files is None:
            if isinstance(exc, OSError):
                raise UserError(f"training finished but saving the model to {files.model or 'a temporary file'} "
                                f"failed ({exc.strerror or exc}); nothing was written") from None
            raise
        out.written = save_last(result, files.model, staged, out.model_files)
        out.model_done = True
        logger.debug("after training", exc_info=True)
        raise ReportFailed(result, out.written[0], exc) from None
    if measured.left_alone:
        report["left_alone"] = measured.left_alone
    report["distributed"] = measured.distributed
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


def save_last(result: CompressResult, target: Path | None, staged: Staged | None,
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


def unwritten(files: RunFiles, written: list[Path]) -> list[Path]:
    stages = [] if files.stages is None or any(p.parent == files.stages for p in written) else [files.stages]
    return [p for p in (files.report,) if p is not None and p not in written] + stages
