"""Integer activations as an output option (``output.activations = "int8"``, ``--activations int8``).

onnxruntime gains no speed from int8 weights behind DequantizeLinear while the activations stay float:
it dequantizes them at load and runs float kernels. With ``int8`` the written model also gets
QuantizeLinear/DequantizeLinear pairs on the activations around each Conv, Gemm and MatMul
(``converters.qdq``), with ranges calibrated on the first ``output.calibration`` samples of the training
data (never the held-out data; ``output.ranges``: their min/max, or fitted to the outputs by
``converters.qdq_tune``), and onnxruntime fuses them into QLinearConv / QGemm / QLinearMatMul /
MatMulIntegerToFloat; nodes it would leave float get no pairs.
The weights keep the integer levels ADMM or straight-through training gave them (8-bit levels exactly);
weights that were not quantized are quantized per output channel, symmetric int8.

:func:`int8_output` turns a write-back result into the QDQ model; :func:`activation_report` is the
report's ``activations`` field: accuracy (or agreement with the original) and onnxruntime latency at
batch 1 and 64 of the float-activation compressed model, the int8 one, and onnxruntime's own
``quantize_static`` (QDQ, per channel, same calibration samples) of the original, timed interleaved.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnx_admm.converters.errors import first_line
from onnx_admm.converters.modelio import save_model, scratch_dir
from onnx_admm.converters.qdq import SAFE_PEAK, calibrate, insert_qdq, plan_qdq
from onnx_admm.converters.qdq_tune import fit_ranges, unfused
from onnx_admm.converters.writeback import WriteBackResult
from onnx_admm.data import LABELS, Dataset
from onnx_admm.sources import PluginData
from onnx_admm.recipe import OutputConfig
from onnx_admm.validate import _latencies, open_session, validate

if TYPE_CHECKING:
    from onnx_admm.api import CompressResult

logger = logging.getLogger(__name__)

_CALIBRATION_BATCH = 64
# Batch sizes the report times, and timed runs per model at each (medians, interleaved).
LATENCY_BATCHES = (1, 64)
_LATENCY_RUNS = 200


def calibration_data(model: onnx.ModelProto, data: Dataset | PluginData, config: OutputConfig) -> Dataset | None:
    """The training samples that calibrate the activation ranges (None when the activations stay float).

    Called before training, so that a model int8 activations cannot apply to fails first (UserError).
    """
    if config.activations == "float":
        return None
    plan_qdq(model)
    return data.take(config.calibration)


def _feeds(data: Dataset) -> Iterator[dict[str, np.ndarray]]:
    for feed in data.batches(_CALIBRATION_BATCH):
        feed.pop(LABELS, None)
        yield feed


def int8_model(model: onnx.ModelProto, calibration: Dataset,
               ranges: str = "minmax") -> tuple[onnx.ModelProto, dict[str, str]]:
    """``model`` with int8 activations calibrated on ``calibration``, and how each weight was stored
    (``kept``: its own integer levels; ``quantized``: per-channel int8 levels made here).

    The nodes onnxruntime would leave float get no pairs (they would round activations for no integer
    kernel); ``ranges`` is ``output.ranges``: "minmax", or "fit" (each range clipped where that brings the
    outputs closer to ``model``'s on the calibration data; converters.qdq_tune).

    Raises:
        UserError: the model has no Conv/Gemm/MatMul with a constant weight, or an opset below 13.
    """
    plan = plan_qdq(model)
    measured = calibrate(model, plan, _feeds(calibration))  # streamed: min/max need one pass
    left = unfused(insert_qdq(model, plan, measured).model, plan)
    if left and len(left) < len(plan.nodes):
        logger.info("int8 activations: onnxruntime leaves %d of %d nodes float, planned without them: %s",
                    len(left), len(plan.nodes), sorted(left))
        plan = plan_qdq(model, left)  # its calibrated tensors are some of the first plan's
    chosen = {t: measured[t] for t in plan.calibrated}
    if ranges == "fit":
        fit = fit_ranges(model, plan, chosen, list(_feeds(calibration)))  # run once per try
        logger.info("int8 activations: ranges fitted in %d runs, output error %.3g -> %.3g of min/max, clipped %s",
                    fit.runs, fit.minmax_error, fit.error, {t: f for t, f in fit.factors.items() if f != 1.0})
        chosen = dict(fit.ranges)
    result = insert_qdq(model, plan, chosen)
    if result.wide:
        logger.warning("int8 activations: %d weight(s) keep 8-bit levels beyond +-%d (%s): on x86 CPUs without VNNI "
                       "onnxruntime's int8 kernels saturate their products, and the file computes less exactly "
                       "there; compress with --bits 7 for a file exact on every CPU", len(result.wide), SAFE_PEAK,
                       ", ".join(result.wide[:3]))
    logger.info("int8 activations: %d nodes, %d Q/DQ pairs, weights %s", len(plan.nodes), len(plan.activations),
                result.weights)
    return result.model, result.weights


def int8_output(exported: WriteBackResult, calibration: Dataset | None, ranges: str = "minmax") -> WriteBackResult:
    """The write-back result with the QDQ model in place of the float-activation one."""
    if calibration is None:
        raise ValueError("int8 activations need the calibration samples (CompressResult.calibration)")
    model, weights = int8_model(exported.model, calibration, ranges)
    encodings = dict(exported.encodings)
    encodings.update({name: "int8" for name in weights})
    changes = exported.changes + [f"{name}: int8 ({how} levels) behind DequantizeLinear" for name, how in weights.items()]
    return dataclasses.replace(exported, model=model, encodings=encodings, changes=changes)


def activation_report(result: CompressResult, compressed: Path, original: onnx.ModelProto, held_out: Dataset,
                      threads: int = 1) -> dict:
    """The report's ``activations`` field: the three int8 / float candidates side by side.

    ``compressed`` is the int8 file just written; the float-activation model is the same stage exported
    without the Q/DQ pairs.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    calibration = result.calibration

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = _feeds(calibration)

        def get_next(self) -> dict | None:
            return next(self.feeds, None)

    as_float = dataclasses.replace(result, config=result.config.replace(output={"activations": "float"}))
    with scratch_dir() as tmp:
        tmp = Path(tmp)
        paths = {"original": tmp / "original.onnx", "compressed_fp32": tmp / "fp32.onnx",
                 "compressed_int8": Path(compressed), "quantize_static": tmp / "static.onnx"}
        save_model(original, paths["original"])
        save_model(as_float.export(-1).model, paths["compressed_fp32"])
        # onnxruntime's own static quantization of the original, on the same calibration samples: the bar.
        # It logs a pre-processing hint on the root logger at every call: not the user's concern here. It can
        # fail where ours does not (a model onnxruntime's optimizer fused: its calibration cannot type the
        # tensors after a com.microsoft op); the report then says why the bar is missing.
        rows: dict[str, dict] = {}
        logging.disable(logging.WARNING)
        try:
            quantize_static(str(paths["original"]), str(paths["quantize_static"]), _Reader(),
                            quant_format=QuantFormat.QDQ, per_channel=True)
        except Exception as exc:  # onnxruntime's quantizer raises bare ValueErrors / RuntimeErrors
            rows["quantize_static"] = {"accuracy": None, "agreement": None, "bytes": None, "latency_ms": {},
                                       "error": first_line(exc)}
            logger.warning("onnxruntime's quantize_static of the original failed, so the report has no bar for the "
                           "int8 model: %s", first_line(exc))
        finally:
            logging.disable(logging.NOTSET)
        for key in ("compressed_fp32", "compressed_int8", "quantize_static"):
            if key in rows:
                continue
            check = validate(paths["original"], paths[key], held_out, threads=threads, latency_batches=0,
                             score_output=result.config.train.output, scratch=tmp)
            rows[key] = {"accuracy": check.compressed.accuracy, "agreement": check.agreement,
                         "bytes": check.compressed.bytes, "latency_ms": {}}
        keys = [key for key in rows if "error" not in rows[key]]
        sessions = tuple(open_session(paths[key], threads) for key in keys)
        for batch in LATENCY_BATCHES:
            feed = _latency_feed(held_out, batch)
            for key, ms in zip(keys, _latencies(sessions, [feed], _LATENCY_RUNS)):
                rows[key]["latency_ms"][str(batch)] = ms
    return {"calibration_samples": len(calibration), "threads": threads, "runs": _LATENCY_RUNS,
            "original_accuracy": check.original.accuracy, **rows}


def _latency_feed(data: Dataset, batch: int) -> dict[str, np.ndarray]:
    """The first ``batch`` samples (repeated when the data holds fewer), labels dropped."""
    feed = next(data.batches(batch))
    feed.pop(LABELS, None)
    reps = -(-batch // len(data))
    return {k: (np.concatenate([v] * reps)[:batch] if k in data.batched else v) for k, v in feed.items()}
