"""``onnx-admm analyze``: per-layer sensitivity of a model, and a recipe suggested from it.

Each layer that compress would prune (the plan of the recipe, or of a global target when the recipe gives
none) is pruned alone by magnitude at a few sparsities (and, on request, quantized alone at a few bit
widths, per channel); the task metric of the whole model is measured in torch after each
(``onnx_admm.sensitivity``): accuracy with labels, the metric against the original without them (what
validate reports). One point is measured again in onnxruntime, on the original graph with that layer's
pruned weights written back: the probe with the largest drop, which must agree with torch within
``ORT_TOLERANCE`` (plus the dense model itself).

``suggest`` splits a global compression ratio over the measured layers from those curves
(``sensitivity.split``) and ``recipe_text`` writes it as a TOML recipe of one rule per layer, whose keep
counts sum to exactly what compress's global target of that ratio keeps.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from onnx_admm.converters.errors import UserError
from onnx_admm.converters.graphinfo import graph_inputs
from onnx_admm.converters.importer import ImportedModel
from onnx_admm.converters.modelio import load_model, save_model, scratch_dir
from onnx_admm.converters.writeback import write_back
from onnx_admm.allocation import Allocation
from onnx_admm.api import import_for_data, weight_specs
from onnx_admm.check import trained_outputs_in_onnxruntime
from onnx_admm.data import Dataset
from onnx_admm.metrics import for_score
from onnx_admm.pipeline.batch import choose_batch, to_batches
from onnx_admm.pipeline.legalize import legalize
from onnx_admm.pipeline.sensitivity import measure_curves, pruning_probes, sample
from onnx_admm.pipeline.planning import make_plan, weight_names
from onnx_admm.plan import WeightSpec
from onnx_admm.preflight import check_labels, check_outputs
from onnx_admm.progress import Progress, percent
from onnx_admm.projections import Unstructured, keep_count
from onnx_admm.quant_choices import choice
from onnx_admm.recipe import CompressConfig
from onnx_admm.report_schema import SENSITIVITY_SCHEMA_VERSION
from onnx_admm.schedule import SENSITIVITY_SAMPLES
from onnx_admm.sensitivity import ANALYZE_LEVELS, Curve, Probe, check_levels, split
from onnx_admm.sources import PluginData, as_data
from onnx_admm.train import Batch, ScoreSpec, evaluate, predictions

logger = logging.getLogger(__name__)

# torch and onnxruntime sum in different orders, so a sample near a tie may flip its top-1: the two metrics
# must agree within half a point, or two samples when fewer than 400 are measured.
ORT_TOLERANCE = 0.005
_RATIO = re.compile(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*x?\s*", re.IGNORECASE)


class BadLayer(UserError):
    """A layer named on the command line is not one the analysis measures."""


def parse_ratio(text: str) -> float:
    """``"40x"`` or ``"40"`` -> 40.0: a compression ratio of the weights (40x keeps 1 in 40, sparsity 0.975).

    Raises:
        ValueError: not a number followed by an optional x, or below 1.
    """
    match = _RATIO.fullmatch(str(text))
    if match is None:
        raise ValueError(f"expected a compression ratio such as 40x (weights / nonzero weights), got {text!r}")
    ratio = float(match[1])
    if not ratio >= 1 or not math.isfinite(ratio):
        raise ValueError(f"a compression ratio is weights / nonzero weights and at least 1 (40x keeps 1 in 40, "
                         f"sparsity 0.975), got {text!r}")
    return ratio


def analyze(model: str | Path, data: Any, *, val_data: Any = None, labels: str | Path | np.ndarray | None = None,
            config: CompressConfig = CompressConfig(),
            levels: Sequence[float] = ANALYZE_LEVELS, bits: Sequence[int] = (), layers: Sequence[str] | None = None,
            samples: int = SENSITIVITY_SAMPLES, progress: Progress | None = None) -> dict[str, Any]:
    """Measure every compressible layer's sensitivity; returns the JSON-ready result (module doc).

    Args:
        model: the ONNX file.
        data: samples to measure on (any form compress takes); ``val_data``, when given, is used instead.
        labels: class ids of the measured samples (an array, a .npy, or an .npz with ``labels``), for data
            that has none.
        config: the recipe: its rules choose the layers (``skip``), ``prune.min_keep``/``floor`` the deepest
            point, ``train`` the output, batch and threads.
        levels: sparsities each layer is pruned to alone.
        bits: bit widths each layer is quantized to alone (per channel; 1 = binary).
        layers: ONNX weight names to measure (default: every layer compress would prune).
        samples: at most this many samples (a seeded random subset).
        progress: called with ``measure_start`` / ``measure`` events (``onnx_admm.progress``).

    Raises:
        BadLayer: a name in ``layers`` is not among them.
        UserError: bad model, data or recipe.
    """
    try:
        levels = check_levels(levels)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if any(not 1 <= b <= 8 for b in bits):
        raise UserError(f"bit widths are from 1 (binary) to 8, got {list(bits)}")
    threads = torch.get_num_threads()
    try:
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        return _measure(model, data, val_data, labels, config, levels, bits, layers, samples, progress)
    finally:
        torch.set_num_threads(threads)


def _measure(model, data, val_data, labels, config: CompressConfig, levels, bits, layers, samples,
             progress) -> dict[str, Any]:
    original = load_model(model)
    check_outputs(original)
    measured = val_data if val_data is not None else data
    dataset = as_data(measured, graph_inputs(original), "val_data" if val_data is not None else "data")
    imported = import_for_data(original, dataset, config.train.output)
    # The layers and the write-backs below are those of imported.original: a folded graph, a quantized one's
    # float form.
    specs = _measured_specs(imported, config, layers)
    dataset = sample(_with_labels(dataset, labels), samples, config.train.seed)
    check_labels(imported, dataset, dataset)
    score = ScoreSpec(imported.score.index if imported.score else None,
                      imported.score.kind if imported.score else "logits", config.train.blank)
    labelled = dataset.labels is not None
    teacher = None if labelled else copy.deepcopy(imported.module).eval().requires_grad_(False)
    batch, _ = choose_batch(imported, config.train, teacher is not None)

    def batches():
        return to_batches(dataset.batches(batch.chunk or batch.train), imported.input_names, torch.device("cpu"))

    params = {s.name: imported.module.get_parameter(s.name) for s in specs}
    minimum = Allocation(min_keep=config.prune.min_keep, floor=config.prune.floor).minimum
    probes = pruning_probes(params, levels, minimum)
    for s in specs:
        per_channel = s.scale_axis is not None
        probes[s.name] += [Probe(choice(bits=b, per_channel=per_channel).quantizer(s.scale_axis or 0), bits=b)
                           for b in sorted(set(bits), reverse=True)]
    labels_of = {s.name: s.label for s in specs}  # progress names the ONNX weights, as the table does
    emit = None if progress is None else (lambda e: progress({**e, "layer": labels_of[e["layer"]]} if "layer" in e else e))
    curves = measure_curves(params, probes, lambda: evaluate(imported.module, batches(), score, teacher), emit)
    metric = "accuracy" if labelled else _task_name(teacher, next(iter(batches())), score)
    report = _report(model, specs, curves, levels, dataset, metric)
    report["onnxruntime_check"] = _onnxruntime_check(imported, specs, curves, dataset, score, batch.validation)
    return report


def _with_labels(dataset: Dataset | PluginData, labels: str | Path | np.ndarray | None) -> Dataset | PluginData:
    """``dataset`` with ``labels`` (module doc of ``analyze``) as its class ids."""
    if labels is None:
        return dataset
    if isinstance(labels, (str, Path)):
        try:
            loaded = np.load(labels, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read the labels {labels}: {exc}; pass a .npy of class ids or an .npz with "
                            "`labels`") from None
        if isinstance(loaded, np.lib.npyio.NpzFile):
            if "labels" not in loaded:
                raise UserError(f"the labels file {labels} has no `labels` array (it holds {', '.join(loaded.files)})")
            loaded = loaded["labels"]
        labels = loaded
    labels = np.asarray(labels)
    if isinstance(dataset, PluginData):
        raise UserError("--labels applies to an .npz or arrays; a loader plugin yields its own `labels`")
    if labels.ndim != 1 or len(labels) != len(dataset) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"the labels must be {len(dataset)} integer class ids, one per measured sample; got "
                        f"{labels.dtype} shaped {list(labels.shape)}")
    return Dataset(dataset.inputs, labels.astype(np.int64), set(dataset.batched), dict(dataset.axes))


def _measured_specs(imported: ImportedModel, config: CompressConfig,
                    layers: Sequence[str] | None) -> list[WeightSpec]:
    """The weights compress would prune under ``config`` (a global target stands in when it has none)."""
    specs = weight_specs(imported)
    if not specs:
        raise UserError("the model has no compressible weight (Conv, ConvTranspose, Gemm, MatMul, Gather or recurrent) "
                        "in the part onnx-admm converts: there is nothing to analyze")
    if config.prune.sparsity is None and config.prune.targets is None:
        config = config.replace(prune={"sparsity": 0.5})
    plan = make_plan(specs, config)
    plan = legalize(plan, imported.original, {s.name: imported.module.get_parameter(s.name).shape for s in specs},
                    imported.held())[0]
    pruned = [w.spec for w in plan.weights if w.sparsity is not None or w.shared]
    if layers:
        known = {s.label: s for s in pruned}
        unknown = [name for name in layers if name not in known]
        if unknown:
            raise BadLayer(f"{unknown[0]!r} is not a layer analyze measures; the layers are {weight_names(pruned)} "
                           "(`onnx-admm inspect MODEL` lists every weight)")
        pruned = [known[name] for name in dict.fromkeys(layers)]
    if not pruned:
        raise UserError("the recipe leaves every compressible weight alone: there is nothing to analyze")
    return pruned


def _report(model, specs, curves: dict[str, Curve], levels, dataset: Dataset, metric: str) -> dict[str, Any]:
    dense = next(iter(curves.values())).dense
    rows = []
    for s in specs:
        curve = curves[s.name]
        rows.append({
            "name": s.label, "param": s.name, "op_type": s.op_type, "params": curve.size,
            "prune": [{"sparsity": 1 - keep / curve.size, "keep": keep, "metric": m, "drop": dense - m}
                      for keep, m in curve.points],
            "quantize": [{"bits": b, "metric": m, "drop": dense - m} for b, m in curve.bits],
        })
    return {"kind": "onnx-admm sensitivity", "schema_version": SENSITIVITY_SCHEMA_VERSION, "model": str(model),
            "metric": metric, "samples": len(dataset), "dense_metric": dense, "levels": list(levels), "layers": rows}


def _task_name(teacher: torch.nn.Module, first: Batch, score: ScoreSpec) -> str:
    """The task metric's name against the original (top-1 agreement, sequence match, positive-set F1), decided
    on the first batch the measurements read, as ``train.evaluate`` decides it (a CTC blank, found there)."""
    if score.index is None:
        return "none"
    with torch.no_grad():
        output = teacher(*first.inputs)[score.index]
    reference = predictions(output, score.kind).cpu().numpy()
    task = for_score(score.kind, tuple(output.shape), score.blank)
    task.add(reference, reference, first.inputs[0].shape[0] if first.inputs and first.inputs[0].dim() else None)
    return f"{task.name} with the original"


def curves_of(report: dict[str, Any]) -> dict[str, Curve]:
    """The curves of an analyze result, by ONNX weight name (what ``suggest`` splits from)."""
    dense = report["dense_metric"]
    return {layer["name"]: Curve(layer["params"], dense, tuple((p["keep"], p["metric"]) for p in layer["prune"]))
            for layer in report["layers"]}


def suggest(report: dict[str, Any], ratio: float) -> dict[str, Any]:
    """Per-layer keep counts for a global ``ratio`` over the measured layers, from their curves.

    The total kept is what compress keeps for the same global target (``keep_count`` of the pool at
    sparsity 1 - 1/ratio), so the recipe meets the ratio exactly as compress would.

    Raises:
        UserError: the ratio asks for fewer weights than the layers' minimums (their deepest measured points).
    """
    curves = curves_of(report)
    total = sum(c.size for c in curves.values())
    keep = keep_count(total, 1 - 1 / ratio)
    mins = {name: c.points[-1][0] if c.points else c.size for name, c in curves.items()}
    if keep < sum(mins.values()):
        raise UserError(f"{ratio:g}x keeps {keep} of the {total} weights, fewer than the {sum(mins.values())} the "
                        f"layers keep at their deepest point (min_keep, floor); ask for at most "
                        f"{total / sum(mins.values()):.4g}x")
    keeps = split(curves, keep, mins)
    layers = {name: {"keep": k, "params": curves[name].size, "sparsity": exact_sparsity(curves[name].size, k),
                     "drop": curves[name].drop_at(k)} for name, k in keeps.items()}
    dense = report["dense_metric"]
    # The split's own model (sensitivity module doc): each layer keeps its share of the dense metric.
    predicted = dense * math.prod(max(dense - layer["drop"], 0.0) / dense if dense else 0.0 for layer in layers.values())
    return {"ratio": ratio, "params": total, "keep": keep, "predicted_metric": predicted, "layers": layers}


def exact_sparsity(n: int, keep: int) -> float:
    """The shortest sparsity whose ``keep_count`` on ``n`` weights is exactly ``keep`` (a readable recipe)."""
    exact = 1 - keep / n
    for digits in range(3, 18):
        short = round(exact, digits)
        if short < 1 and keep_count(n, short) == keep:
            return short
    return exact


def recipe_text(suggestion: dict[str, Any], source: str) -> str:
    """The suggestion as a TOML recipe: one ``[[rules]]`` per layer, its own sparsity."""
    lines = [f"# onnx-admm analyze --suggest {suggestion['ratio']:g}x, from {source}: keeps {suggestion['keep']} of "
             f"{suggestion['params']} weights ({suggestion['params'] / suggestion['keep']:.4g}x), each layer's share "
             "chosen from its measured accuracy drop.", "# Add [train] / [admm] tables as you would to any recipe.", ""]
    for name, layer in suggestion["layers"].items():
        lines += ["[[rules]]", f"match = {_toml_string(_glob_literal(name))}",
                  f"sparsity = {layer['sparsity']!r}  # keeps {layer['keep']} of {layer['params']}", ""]
    return "\n".join(lines)


def _glob_literal(name: str) -> str:
    """A glob (fnmatch) matching ``name`` alone: its wildcard characters each in brackets."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _toml_string(text: str) -> str:
    # A JSON string is a valid TOML basic string: the same quotes and backslash escapes.
    return json.dumps(text)


def format_table(report: dict[str, Any], suggestion: dict[str, Any] | None = None) -> str:
    """The drops as a table: one row per layer, one column per level (and bit width), in points."""
    layers = report["layers"]
    levels = report["levels"]
    bits = sorted({q["bits"] for layer in layers for q in layer["quantize"]}, reverse=True)
    head = [f"{'layer':<32} {'params':>9}"] + [f"{_level(s):>7}" for s in levels] + [f"{'deepest':>15}"]
    head += [f"{str(b) + '-bit':>7}" for b in bits]
    if suggestion:
        head.append(f"{'suggested':>18}")
    lines = [f"sensitivity: {report['metric']} drop in points when one layer alone is pruned by magnitude (or "
             f"quantized); dense {percent(report['dense_metric'])} on {report['samples']} samples", "".join(head)]
    for layer in layers:
        by_keep = {p["keep"]: p for p in layer["prune"]}
        cells = [f"{layer['name'][:32]:<32} {layer['params']:>9}"]
        for s in levels:
            point = by_keep.get(keep_count(layer["params"], s))
            cells.append(f"{_points(point['drop']):>7}" if point else f"{'-':>7}")
        deepest = layer["prune"][-1] if layer["prune"] else None
        cells.append(f"{_points(deepest['drop']) + ' @' + str(deepest['keep']):>15}" if deepest else f"{'-':>15}")
        quant = {q["bits"]: q for q in layer["quantize"]}
        cells += [f"{_points(quant[b]['drop']):>7}" for b in bits]
        if suggestion:
            chosen = suggestion["layers"][layer["name"]]
            cells.append(f"{100 * (1 - chosen['sparsity']):>9.3g}% kept")
        lines.append("".join(cells))
    lines.append("deepest: the drop with only that many weights left (the layer's minimum, min_keep/floor)")
    check = report.get("onnxruntime_check")
    if check:
        lines.append(check["summary"])
    if suggestion:
        lines.append(f"suggested for {suggestion['ratio']:g}x: keeps {suggestion['keep']} of {suggestion['params']} "
                     f"weights; one shot, before any retraining, the curves predict {percent(suggestion['predicted_metric'])} "
                     "(the dense metric times each layer's share; compress retrains)")
    return "\n".join(lines)


def _level(s: float) -> str:
    return f"{100 * s:g}%"


def _points(drop: float) -> str:
    return f"{100 * drop:.2f}"


class _Session:
    """A model in onnxruntime called like the torch module: input tensors in, the trained outputs out."""

    def __init__(self, model, imported: ImportedModel, folder: Path, name: str) -> None:
        self.model, self.imported, self.folder = model, imported, folder
        self.path = folder / name
        save_model(model, self.path)

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = {name: t.numpy() for name, t in zip(self.imported.input_names, inputs)}
        outputs = trained_outputs_in_onnxruntime(self.model, self.path, feeds, self.imported, self.folder)
        return tuple(torch.from_numpy(np.asarray(o)) for o in outputs)


@torch.no_grad()
def _onnxruntime_check(imported: ImportedModel, specs, curves: dict[str, Curve], dataset: Dataset, score: ScoreSpec,
                       batch: int) -> dict[str, Any]:
    """The dense model and the probe with the largest drop, again in onnxruntime (module doc)."""
    name, keep = max(((s.name, k) for s in specs for k, _ in curves[s.name].points),
                     key=lambda p: curves[p[0]].dense - dict(curves[p[0]].points)[p[1]])
    spec = next(s for s in specs if s.name == name)
    entry = next(e for e in imported.weights if e.param == name)
    param = imported.module.get_parameter(name)
    saved = param.detach().clone()
    tolerance = max(ORT_TOLERANCE, 2 / len(dataset))
    with scratch_dir() as tmp:
        folder = Path(tmp)
        original = _Session(imported.original, imported, folder, "original.onnx")
        try:
            param.copy_(Unstructured(keep).project(saved))
            pruned = _Session(write_back(imported.original, imported.updates([entry])).model, imported, folder,
                              "pruned.onnx")
        finally:
            param.copy_(saved)
        teacher = None if dataset.labels is not None else original
        batches = to_batches(dataset.batches(batch), imported.input_names, torch.device("cpu"))
        dense_ort = evaluate(original, batches, score, teacher)
        batches = to_batches(dataset.batches(batch), imported.input_names, torch.device("cpu"))
        pruned_ort = evaluate(pruned, batches, score, teacher)
    torch_pruned = dict(curves[name].points)[keep]
    dense = curves[name].dense
    agrees = abs(pruned_ort - torch_pruned) <= tolerance and abs(dense_ort - dense) <= tolerance
    summary = (f"onnxruntime check ({'agrees' if agrees else 'DISAGREES'}, tolerance {100 * tolerance:.2g} points): "
               f"{spec.label} keeping {keep}: torch {percent(torch_pruned)}, onnxruntime {percent(pruned_ort)}; "
               f"dense: torch {percent(dense)}, onnxruntime {percent(dense_ort)}")
    return {"layer": spec.label, "keep": keep, "torch": torch_pruned, "onnxruntime": pruned_ort, "dense_torch": dense,
            "dense_onnxruntime": dense_ort, "tolerance": tolerance, "agrees": agrees, "summary": summary}
