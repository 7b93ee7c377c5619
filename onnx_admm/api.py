"""The Python API: ``compress(model, data, config)`` runs progressive ADMM pruning end to end.

It reads as the pipeline it is: load and import the model, make the plan and legalise it against the
graph (``pipeline.legalize``), split the data, run the stages (``pipeline.stages``: per stage, ADMM epochs,
the exact hard projection, then masked retraining that keeps the best selection-split state), then
write the trained weights back into the original ONNX graph, validate it against the original in
onnxruntime on the held-out split and commit the outputs through the gate (``pipeline.commit``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from onnx_admm.converters.branches import FOLD_SAMPLES, Folding, fold_branches, weighted_ifs
from onnx_admm.converters.errors import UserError
from onnx_admm.converters.graphinfo import graph_inputs
from onnx_admm.converters.importer import ImportedModel, import_model
from onnx_admm.converters.modelio import load_model
from onnx_admm.activations import calibration_data
from onnx_admm.data import LABELS, Dataset
from onnx_admm.sources import PluginData, as_data
from onnx_admm.distributed import World, session
from onnx_admm.gate import DEFAULT_FLOOR, Gate
from onnx_admm.memory import PeakMemory
from onnx_admm.outputs import (RunFiles, external_locations, input_files)
from onnx_admm.preflight import check_config, check_labels, check_outputs, check_runs, check_weights
from onnx_admm.pipeline.planning import checked_budget, make_plan
from onnx_admm.plan import WeightSpec
from onnx_admm.progress import Progress, display
from onnx_admm.recipe import CompressConfig
from onnx_admm.signals import raise_swallowed_interrupt, sigterm_interrupts
from onnx_admm.pipeline.commit import finish, save_last, unwritten
from onnx_admm.pipeline.legalize import legalize
from onnx_admm.pipeline.results import (AccuracyGateFailed, CompressInterrupted, CompressResult, Measured,
                                        ReportFailed, StageResult)
from onnx_admm.pipeline.sensitivity import describe_curves
from onnx_admm.pipeline.stages import Runner

logger = logging.getLogger(__name__)

# The API: ``compress`` and what it returns and raises (defined in ``onnx_admm.pipeline.results``).
__all__ = ["AccuracyGateFailed", "CompressInterrupted", "CompressResult", "Data", "ReportFailed", "StageResult",
           "compress"]

# How many samples of a loader plugin's stream are held in memory for validation when no
# separate validation data is given.
PLUGIN_VAL_SAMPLES = 1000

# What ``compress`` takes as data (onnx_admm.sources.as_data): a path or plugin, arrays, dicts, a function.
Data = (str | Path | Mapping[str, Any] | Iterable[Mapping[str, Any]] | Callable[[], Iterable[Mapping[str, Any]]]
        | Dataset | PluginData)


def weight_specs(imported: ImportedModel) -> list[WeightSpec]:
    specs = []
    for entry in imported.compressible():
        specs.append(WeightSpec(entry.param, entry.onnx_name, entry.op_type, *entry.channel_axes, entry.scale_axis))
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
            plugin); or a Dataset. Every form is checked like an .npz (``onnx_admm.sources.as_data``): names,
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

    Under torchrun (WORLD_SIZE > 1) every process calls it the same way: the training is data-parallel
    (``onnx_admm.distributed``; ``config.train.batch_size`` per process), rank 0 alone writes, and the
    other ranks return the same result and report with no files of their own, or raise
    ``distributed.PeerFailed`` with rank 0's exit status when it failed.

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
    memory = PeakMemory()
    world = World.from_env()  # several processes under torchrun (onnx_admm.distributed)
    check_config(config, world.size, world.local_rank)
    shown = display(progress if world.main else None)
    original_path = Path(model) if not isinstance(model, onnx.ModelProto) else None
    files = RunFiles.plan(_model_name(original_path), output, report_path, save_stages,
                          gated=gate.active, keep_failed=keep_failed)
    # Read once: its external data files are inputs to protect, and the output keeps its weights outside too.
    locations = external_locations(original_path) if original_path is not None else set()
    inputs = input_files(model, data, val_data, protect, locations=locations)
    files.check(inputs)
    if not world.main:  # rank 0 alone writes: no code path of another rank can leave a file
        files = RunFiles()
    threads_before = torch.get_num_threads()
    with sigterm_interrupts():
        try:
            cfg = config.train
            original = load_model(model) if original_path is not None else model
            check_outputs(original)
            external = bool(locations)
            splits = _resolve_splits(data, val_data, graph_inputs(original), cfg)
            imported = import_for_data(original, splits[0], cfg.output)
            memory.mark("import")
            torch.manual_seed(cfg.seed)
            if cfg.threads:
                torch.set_num_threads(cfg.threads)
            raise_swallowed_interrupt()
            with shown as shown_emit, session(world, world.device(cfg.device)):
                def emit(event: dict, show=shown_emit or (lambda event: None)) -> None:
                    raise_swallowed_interrupt()  # each progress event is a point where the run can stop
                    show(event)

                # A model with an If folded to its branch trains and plans on the folded graph.
                graph = imported.original if imported.folding is not None else original
                result, measured = _compress(graph, original_path, external, imported, splits, config, emit, files,
                                             inputs, memory, world)
                return world.conclude(lambda: finish(result, measured, files, original_path, started, gate, emit),
                                      lambda report: _followed(result, report))
        except CompressInterrupted:  # raised by a later step with what it kept
            raise
        except KeyboardInterrupt as exc:  # before training started: nothing to keep
            raise CompressInterrupted(None, interrupt=exc) from None
        finally:
            torch.set_num_threads(threads_before)


def _compress(original, original_path, external, imported, splits, config, emit: Progress, files, inputs,
              memory: PeakMemory, world: World = World()) -> tuple[CompressResult, Measured]:
    """Plan and train; returns the result with every stage (its ``report`` still empty)."""
    cfg = config.train
    device = world.device(cfg.device)
    check_weights(imported)
    if not imported.compressible():
        raise UserError(_nothing_to_compress(imported))
    imported.module.to(device)
    specs = weight_specs(imported)
    plan = make_plan(specs, config)
    if plan.allocation.method != config.prune.allocation:  # whole groups only: the report names the split used
        config = dataclasses.replace(config, prune=dataclasses.replace(config.prune, allocation=plan.allocation.method))
    floors = checked_budget(plan, {s.name: imported.module.get_parameter(s.name) for s in specs})
    # The channel analysis reads the graph the shrink pass cuts: for a model quantized by onnxruntime its float
    # form (the quantized file's DynamicQuantizeLSTM / MatMulInteger hold no weight the analysis follows).
    plan, groups, left_alone = legalize(plan, imported.original, {s.name: imported.module.get_parameter(s.name).shape
                                                                  for s in specs}, imported.held())
    # A compressible weight without a target (skipped, or outside every rule with no global target) is
    # left untouched: it does not train either.
    for name in plan.untouched(specs):
        imported.module.get_parameter(name).requires_grad_(False)
    train_data, select, held_out = splits
    check_runs(original_path, imported, select)
    if imported.folding is not None and (groups or config.output.activations == "int8"):
        raise UserError(_folded_limits(imported.folding, bool(groups)))
    check_labels(imported, train_data, held_out)
    # The rate depends on whether the data has labels (recipe.CompressConfig.lr_for); from here on the config
    # carries the one the run trains at, as the report gives it.
    labelled = not (isinstance(train_data, Dataset) and train_data.labels is None)
    lr, source = config.lr_for(labelled=labelled)
    batch = config.train.batch_size
    small = config.small_data_schedule(len(train_data), labelled) if isinstance(train_data, Dataset) else None
    if small is not None:
        batch, lr = small
        source = (f"binary weights without labels on {len(train_data)} training inputs: batch {batch} for "
                  f"{len(train_data) // batch} steps an epoch, recipe.small_data_schedule")
    logger.info("training at lr %g (%s)", lr, source)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, lr=lr, batch_size=batch))
    if world.active and isinstance(train_data, PluginData):
        _check_same_start(world, select)
    calibration = calibration_data(original, train_data, config.output)
    runner = Runner(imported, config, plan, train_data, select, held_out, device, emit, groups, memory, world)
    name = _model_name(original_path)
    try:
        runner.run()
    except KeyboardInterrupt as exc:
        partial = runner.result(external, name, inputs) if runner.stages else None
        if partial is not None:
            partial.calibration = calibration
        saved = save_last(partial, files.model, None, None) if partial is not None else []
        raise CompressInterrupted(partial, saved, exc, unwritten=unwritten(files, saved)) from None
    result = runner.result(external, name, inputs)
    result.calibration = calibration
    diverged = _all_phases_rolled_back(result.stages)
    if diverged:
        raise UserError(f"training diverged in every phase (each was rolled back and stopped), so nothing was "
                        f"written; first: {diverged}; lower train.lr (now {config.lr}) or set admm.rho "
                        f"(now {config.admm.rho if config.admm.rho is not None else 'chosen per phase; see the log'})")
    warnings = list(runner.warnings)
    if imported.computed_recurrent:
        warnings.append(f"{len(imported.computed_recurrent)} recurrent weight(s) the graph computes from its "
                        f"constants ({', '.join(imported.computed_recurrent[:3])}) run as constants: they are not "
                        "trained or compressed")
        logger.warning("%s", warnings[-1])
    if floors is not None and floors > 0.5:
        warnings.append(f"the per-layer minimums (min_keep, floor) hold {100 * floors:.0f}% of the global budget: "
                        "the allocation barely chooses; lower them")
        logger.warning("%s", warnings[-1])
    return result, Measured(held_out, runner.dense_metric, left_alone, warnings, memory, runner.batch,
                            runner.world_report(), describe_curves(runner.plan))


def import_for_data(original: onnx.ModelProto, data: Dataset | PluginData, output: str | None) -> ImportedModel:
    """Import ``original`` as the samples of ``data`` run it: an If that reads weights is folded to the branch
    they take (``converters.branches``); the written model gets the If back."""
    folded, folding = fold_branches(original, _fold_feeds(data) if weighted_ifs(original) else ())
    return import_model(folded, output=output, folding=folding)


def _fold_feeds(data: Dataset | PluginData) -> list[dict[str, np.ndarray]]:
    """The first samples (FOLD_SAMPLES), in batches, without labels: what the If conditions are evaluated on."""
    samples = data.take(FOLD_SAMPLES)
    return [{k: v for k, v in feed.items() if k != LABELS} for feed in samples.batches(64)]


def _folded_limits(folding: Folding, channels: bool) -> str:
    what = "removing filters or channels (--structure filter/channel)" if channels else "int8 activations"
    return (f"{what} is not supported through a folded If ({'; '.join(folding.describe())}): its branch's nodes "
            "are not the graph's own; compress with weight-by-weight structures (unstructured, N:M, levels)")


def _followed(result: CompressResult, report: dict | None) -> CompressResult:
    """A rank other than 0 after rank 0 wrote the outputs: the same result and report, no files of its own."""
    result.report = report or {}
    return result


def _model_name(original_path: Path | None) -> str:
    """The file name outputs are named after (a ModelProto has none)."""
    return original_path.name if original_path is not None else "model.onnx"


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


def _check_same_start(world: World, select: Dataset) -> None:
    """Warn (rank 0) when a loader plugin's first samples differ between the ranks.

    Every rank reads the plugin itself and deals its batches round-robin (``PluginData.batches``), which
    gives disjoint shares only when the plugin yields the same stream on every rank; its first samples,
    the selection split and reconstruction's calibration sample, show whether it does. The run stays
    consistent either way (rank 0's selection metric and refit weights are shared), so this only warns.
    """
    hashes = world.gather(_fingerprint(select))
    if world.main and len(set(hashes)) > 1:
        logger.warning("the loader plugin's first %d samples differ between the ranks: it must yield the same "
                       "stream on every process (onnx-admm deals its batches to the ranks itself; do not shard it "
                       "by RANK); rank 0's selection split decides", len(select))


def _fingerprint(data: Dataset) -> str:
    """A SHA-256 of the samples' bytes, inputs in name order, then the labels."""
    h = hashlib.sha256()
    for key in sorted(data.inputs):
        h.update(key.encode() + np.ascontiguousarray(np.asarray(data.inputs[key])).tobytes())
    if data.labels is not None:
        h.update(np.ascontiguousarray(np.asarray(data.labels)).tobytes())
    return h.hexdigest()


# Encodings that store a weight as float32 values: a quantized weight stored so has lost its levels' savings.
