"""The JSON report of a compress run: layers, encodings and storage, the validation in onnxruntime
(task metric, accuracy, size, latency), structure (MACs, latency by batch) and N:M facts."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch

from onnx_admm.converters.dequantize import stored_nbytes
from onnx_admm.converters.fused import weights_view
from onnx_admm.converters.graphinfo import constant_sources, tensor_value
from onnx_admm.converters.importer import ImportedModel
from onnx_admm.converters.modelio import Staged, load_model, save_model
from onnx_admm.converters.ort_nodes import in_onnxruntime
from onnx_admm.converters.quantized import dequantize_model
from onnx_admm.converters.shrink import count_macs
from onnx_admm.converters.writeback import WriteBackResult
from onnx_admm import __version__
from onnx_admm.data import Dataset
from onnx_admm.pipeline.fidelity import disagreement, written_vs_trained
from onnx_admm.pipeline.results import CompressResult, Measured
from onnx_admm.structures import nm_pattern
from onnx_admm.report_schema import SCHEMA_VERSION
from onnx_admm.structured import NM, nm_runtimes
from onnx_admm.storage import tensor_storage_bits
from onnx_admm.validate import latency_ms, validate

if TYPE_CHECKING:
    from onnx_admm.recipe import CompressConfig

logger = logging.getLogger(__name__)


_FLOAT_ENCODINGS = ("dense", "sparse", "unchanged")


def build_report(result: CompressResult, exported: WriteBackResult, compressed: Path, original_path: Path | None,
                 staged: Staged, measured: Measured, cfg, started) -> dict:
    """The JSON report of ``compressed`` (the saved final model) against the original, in onnxruntime."""
    imported = result.imported
    final = result.stages[-1]
    held_out = measured.held_out
    # The figures below come from the file: each weight as a runtime sees it (decoders evaluated, removed
    # filters gone) and the bytes the file spends on it.
    in_file = weights_view(exported.model)[0]
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
            # one scale (level set) per output channel, or one for the tensor (recipe.QuantizeConfig.per_channel_for)
            "per_channel": final.quant[entry.param].per_channel if entry.param in final.quant else None,
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
        save_model(imported.folding.original if imported.folding is not None else imported.original, orig)
    validation = validate(orig, compressed, held_out, batch_size=measured.batch.validation, threads=cfg.threads or 1,
                          score_output=cfg.output, scratch=folder, blank=cfg.blank, budget_mb=measured.batch.budget_mb)
    if final.kept_channels:
        structure = _structure_report(orig, compressed, final.kept_channels, held_out, cfg.threads or 1,
                                      imported.ort_batch)
    discarded = [stage.index + 1 for stage in result.stages if stage.retrained is False]
    retraining = (f"stage {', '.join(map(str, discarded))}: no retraining epoch beat the weights it started from on "
                  "the selection split, so those were kept and the retraining discarded (a lower train.lr may let "
                  "it help)") if discarded else None
    grown = _larger_file(validation.original.gzip_bytes, validation.compressed.gzip_bytes,
                         None if final.quant else imported.integer_bits)
    written = written_vs_trained(result, exported.model, compressed, held_out, staged.scratch(folder))
    for note in (disagreement(written), *validation.warnings(), retraining, grown):
        if note:
            warnings.append(note)
            logger.warning("%s", note)
    diffs = [d.max_abs for d in validation.outputs if d.max_abs is not None]
    return {
        "schema_version": SCHEMA_VERSION,  # the contract readers check first (onnx_admm.report_schema)
        "structure": structure,
        "nm": nm,
        # The file in onnxruntime against the trained weights in torch on a few held-out samples
        # (pipeline.fidelity); null with int8 activations.
        "written_vs_trained": written,
        "batch": {**_batch_report(imported, measured.batch.train, validation.batch_size),
                  "memory": measured.batch.describe()},
        # What was trained, and the graph outputs computed from it by nodes kept as they are.
        "trained_outputs": list(imported.output_names),
        # The tensor the loss and the agreement used, how (onnx_admm.train.describe_score), and for an
        # inner tensor the integer graph output it feeds.
        "score": validation.score,
        "passed_through": list(imported.passed_through),
        "not_converted": list(imported.not_converted),
        # Nodes without a torch converter that no gradient crosses, run in onnxruntime inside the module.
        "onnxruntime_nodes": in_onnxruntime(imported.normalized),
        # The papers' figure (nonzeros x value bits + index bits + codebooks), and the raw bits of the
        # compressed weights' encodings in the file.
        "storage_bits": {"original": 32 * total, "compressed": sum(layer["storage_bits"] for layer in layers),
                         "in_file": sum(layer["stored_bits"] or 0 for layer in layers)},
        "tool": {"name": "onnx-admm", "version": __version__},
        "config": _config(result.config),
        "original": {"bytes": validation.original.bytes, "bytes_gzip": validation.original.gzip_bytes},
        "compressed": {"bytes": validation.compressed.bytes, "bytes_gzip": validation.compressed.gzip_bytes},
        "params": {"total": total, "nonzero": nonzero},
        "compression_ratio": total / nonzero if nonzero else None,
        "layers": layers,
        # onnxruntime-quantized nodes the output replaced by float ones (converters.quantized)
        "dequantized": imported.dequantized,
        # onnxruntime's fused nodes imported as standard ops; the output keeps them (converters.fused)
        "unfused": imported.unfused,
        # allocation = "sensitivity": each pool layer's measured metric by keep count (pipeline.sensitivity)
        "sensitivity": measured.sensitivity,
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
        "peak_rss_mb": measured.memory.peak_mb,
    }


# The written file carries the run's recipe in its metadata (about a kilobyte): a tiny model may grow by that
# much without its weights taking more room.
GROWTH_SLACK, GROWTH_BYTES = 0.05, 4096


def _larger_file(before: int, after: int, bits: int | None) -> str | None:
    """A warning when the written file stores more than the original (gzip'd bytes, beyond ``GROWTH_SLACK`` and
    ``GROWTH_BYTES``): a pipeline would ship a larger model. Most often the original's weights were integers
    (onnxruntime's quantizers: ``bits`` the narrowest, None otherwise or where the run asked for levels) and the
    run stored them as float."""
    if after <= before * (1 + GROWTH_SLACK) or after - before <= GROWTH_BYTES:
        return None
    why = (f"; the original's weights were {bits}-bit integers and are written as float: add --bits {bits} "
           f"(quantize.bits = {bits}) to store them as integers again" if bits else "")
    return f"the compressed file is larger than the original ({after:,} against {before:,} bytes gzip'd){why}"


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
    # Counted per sample (per fixed batch) at the held-out inputs' own shapes: an image model whose height and
    # width the graph leaves dynamic has no Conv shapes otherwise. Weights behind DequantizeLinear / codebook
    # decoders count as the tensors they decode to; a model quantized by onnxruntime as its float form (its
    # ConvInteger / QLinearConv / MatMulInteger nodes counted nothing: 0 MACs before the shrink).
    feed = next(held_out.batches(fixed or 1))
    feed = {name: np.asarray(array) for name, array in feed.items() if name != "labels"}
    shapes = {name: array.shape for name, array in feed.items()}
    before, after = (count_macs(weights_view(dequantize_model(load_model(path))[0])[0], inputs=shapes, feeds=feed)
                     for path in (original, compressed))
    macs = {"original": before["macs"], "compressed": after["macs"], "samples": fixed or 1}
    if before["unknown"] or after["unknown"]:
        macs["uncounted_nodes"] = max(len(before["unknown"]), len(after["unknown"]))  # shapes unknown
    latency = {}
    for batch in (1, 64) if fixed is None else (fixed,):
        latency[f"batch_{batch}"] = dict(zip(("original_ms", "compressed_ms"),
                                             latency_ms(original, compressed, held_out, batch, threads=threads)))
    return {
        "kept_channels": {name: int(mask.sum()) for name, mask in kept.items()},
        "channels": {name: int(mask.size) for name, mask in kept.items()},
        "macs": macs,
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


def _config(config: CompressConfig) -> dict[str, Any]:
    """The recipe as the run used it: with the learning rate it trained at (a recipe without one gets its
    quantization's default, recipe.CompressConfig.lr)."""
    data = config.to_dict()
    data["train"]["lr"] = config.lr
    return data
