"""What ``compress`` returns and raises: each stage's result, the whole result (``.model()``, ``.save()``,
``.report``), and the exceptions that carry a partial or failed result."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from onnx_admm.converters.encoders import DENSE_ENCODERS, QuantSpec
from onnx_admm.converters.errors import OnnxAdmmError, UserError
from onnx_admm.converters.groups import ChannelGroup
from onnx_admm.converters.importer import ImportedModel
from onnx_admm.converters.modelio import save_model
from onnx_admm.converters.shrink import cut_update, shrink
from onnx_admm.converters.opset import default_opset
from onnx_admm.converters.writeback import WriteBackResult, write_back
from onnx_admm import __version__
from onnx_admm.activations import int8_output
from onnx_admm.data import Dataset
from onnx_admm.memory import PeakMemory
from onnx_admm.pipeline.batch import BatchChoice
from onnx_admm.outputs import check_collisions, data_file, model_output
from onnx_admm.quant_choices import QuantChoice
from onnx_admm.preflight import check_writable
from onnx_admm.recipe import CompressConfig
from onnx_admm.signals import deferred, exit_status, pending_interrupt, signal_name
from onnx_admm.structured import NM


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
    admm_steps: int = 0  # optimizer steps the ADMM phase took (what the hand-over weighs: Runner.skip_admm_after)
    stopped: list[str] = field(default_factory=list)  # phases a non-finite loss rolled back and stopped
    quant_specs: dict[str, QuantSpec] = field(default_factory=dict, repr=False)  # for the quantized encoders
    patterns: dict[str, NM] = field(default_factory=dict)  # N:M weights: param name -> pattern (torch layout)
    # One record per epoch trained (the ``epoch_end`` progress event): phase, epoch, loss, train_metric,
    # metric (selection split), residual (mean ADMM primal residual), samples, seconds.
    history: list[dict[str, Any]] = field(default_factory=list)
    # Layers refit after the hard projection (pipeline/reconstruction.summary); None: reconstruction off.
    reconstruction: dict[str, Any] | None = None
    # A stage that only quantizes, after an ADMM phase: which state was kept ("retrained", or "stage start":
    # its starting weights projected onto levels) and both selection metrics (pipeline/reconstruction).
    quantized_start: dict[str, Any] | None = None
    # A stage the hand-over reached (pipeline/stages.py ``Runner.handover_check``): the selection metric of
    # the state the stage starts from and of its refit projection onto the stage's target, and whether the
    # stage took its ADMM phase back.
    handover: dict[str, Any] | None = None
    # Whether an epoch of the retraining phase scored at least its start on the selection split (False: the
    # start was kept and the retraining discarded; None: no retraining phase).
    retrained: bool | None = None

    def summary(self) -> dict[str, Any]:
        # The mean primal residual ||W - Z|| / ||W|| over the stage's weights at each Z/U update: it
        # should fall during the ADMM phase.
        histories = [h for h in self.residuals.values() if h]
        n = min((len(h) for h in histories), default=0)
        mean = [sum(h[k] for h in histories) / len(histories) for k in range(n)]
        return {
            "index": self.index, "target": self.target, "sparsity": self.sparsity,
            "val_metric": self.val_metric, "rolled_back": self.rolled_back, "epochs": self.epochs,
            "admm_steps": self.admm_steps,
            "mean_residual": mean, "history": self.history, "reconstruction": self.reconstruction,
            "quantized_start": self.quantized_start, "handover": self.handover, "retrained": self.retrained,
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
    calibration: Dataset | None = field(default=None, repr=False)  # training samples for int8 activations
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
        # check it on the dense weight, and a COO sparse initializer saves little at 2:4. So does every weight
        # without output.sparse_weights.
        dense = not self.config.output.sparse_weights
        updates = [dataclasses.replace(u, encoders=DENSE_ENCODERS) if dense or e.param in chosen.patterns else u
                   for e, u in zip(self.imported.weights, updates)]
        shrunk = None
        if chosen.kept_channels:
            # Filters removed: shrink the original graph first, then write the cut values into it, so the
            # quantized encoders store the shrunk tensors as integers (cut before encoding, not after).
            shrunk = shrink(target, chosen.kept_channels, groups=list(self.groups.values()))
            target, updates = shrunk.model, [cut_update(u, shrunk.cuts) for u in updates]
        # The If nodes a folding puts back hold nodes the opset verification never saw: keep the opset.
        result = write_back(target, updates, metadata=metadata,
                            max_opset=default_opset(target) if self.imported.folding is not None else None)
        if shrunk is not None:
            result.changes[:0] = shrunk.changes
        if self.config.output.activations == "int8":
            result = int8_output(result, self.calibration, self.config.output.ranges)
        if self.imported.folding is not None:
            self.imported.folding.restore(result.model)
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
        pending_interrupt()  # the signal is accounted for here: a later run in this process starts clean
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

    exit_status = 3  # the command line's (cli.EXIT_GATE), which the other ranks of a torchrun end with too

    def __init__(self, result: CompressResult, reason: str, saved: Path | None) -> None:
        where = (f"the model is saved as {saved}, not under the output name" if saved is not None
                 else "the model was not written")
        super().__init__(f"{reason}; {where}")
        self.result, self.reason, self.saved = result, reason, saved


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


@dataclass
class Measured:
    """What the training leaves for the report: the held-out split, the dense metric, notes."""

    held_out: Dataset
    dense_metric: float | None
    left_alone: dict[str, str]
    warnings: list[str]
    memory: PeakMemory
    batch: BatchChoice
    distributed: dict[str, Any] | None = None  # processes and per-rank batch size (onnx_admm.distributed)
    sensitivity: dict[str, Any] | None = None  # allocation = "sensitivity": the curves it split from
