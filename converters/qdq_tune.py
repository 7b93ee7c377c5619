"""The QDQ model checked against onnxruntime: which pairs buy an integer kernel, and which clipping of each
activation range makes the int8 model's outputs closest to the float model's on the calibration data.

:func:`unfused` lists the Conv/Gemm/MatMul nodes onnxruntime leaves float in a QDQ model (a pattern its
fusion does not take: a second reader of the Conv's output, say); their Q/DQ pairs round the activations
and buy no integer kernel, so the caller plans again without them (``plan_qdq(left_float=...)``).

Min/max over the calibration data (what onnxruntime's ``quantize_static`` uses by default) spends the
255 steps of a tensor on its rarest values: a few outliers of a LayerNorm or attention output widen the
step for every other value. Clipping them costs those few values and saves rounding on the rest; which
of the two matters more depends on what the layers after the tensor do with it, so it is measured on the
outputs rather than guessed from the tensor alone. :func:`fit_ranges` tries, tensor by tensor in graph
order, the min/max range scaled by each of ``shrink`` (both ends by the same factor, so 0 stays inside)
and keeps a candidate when the squared error of the graph's float outputs against the float model's,
each output normalised by its own mean square, falls; later tensors are tried with the earlier choices
in place. The result is never worse than min/max on the calibration data (min/max is the starting point
and only improvements are kept). Each try is one onnxruntime session over the calibration data:
``1 + (len(shrink) - 1) x calibrated tensors`` runs in all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_admm.converters.modelio import scratch_dir

from onnx_admm.converters.qdq import INTEGER_OPS, ActivationRange, QdqPlan, cpu_session, insert_qdq

# Fractions of the min/max range tried for each tensor (1.0, min/max itself, is the starting point).
SHRINK = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)


@dataclass(frozen=True)
class RangeFit:
    """The chosen ranges and what they changed.

    Attributes:
        ranges: calibrated tensor -> its range (min/max scaled by ``factors``).
        factors: calibrated tensor -> the fraction of its min/max range kept (1.0: min/max).
        minmax_error, error: the normalised output error on the calibration data with min/max ranges and
            with ``ranges``; ``error <= minmax_error``.
        runs: onnxruntime runs over the calibration data the search took.
    """

    ranges: Mapping[str, ActivationRange]
    factors: Mapping[str, float]
    minmax_error: float
    error: float
    runs: int

    def __post_init__(self) -> None:
        if self.error > self.minmax_error:
            raise ValueError(f"RangeFit error {self.error} above the min/max error {self.minmax_error}")


def unfused(qdq: onnx.ModelProto, plan: QdqPlan) -> frozenset[str]:
    """The nodes of ``plan`` (by output) that onnxruntime's CPU session runs as float Conv/Gemm/MatMul in
    ``qdq``: a fused node's output is renamed to its quantized tensor or replaced, an unfused one keeps
    its op type and output."""
    with scratch_dir() as tmp:
        path = str(Path(tmp) / "optimized.onnx")
        cpu_session(qdq, path)
        optimized = onnx.load(path, load_external_data=False)
    return frozenset(n.output[0] for n in optimized.graph.node
                     if n.op_type in INTEGER_OPS and n.output and n.output[0] in plan.nodes)


def _float_outputs(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output if o.type.tensor_type.elem_type in (
        onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)]


def fit_ranges(model: onnx.ModelProto, plan: QdqPlan, minmax: Mapping[str, ActivationRange],
               feeds: Sequence[Mapping[str, np.ndarray]], shrink: Sequence[float] = SHRINK) -> RangeFit:
    """The activation ranges, scaled from ``minmax`` per tensor, whose int8 model matches ``model`` best on
    ``feeds`` (see the module docstring). ``feeds`` is run once per try: keep it to the calibration data.

    Raises:
        ValueError: a factor of ``shrink`` outside (0, 1], or no feeds.
    """
    if not feeds:
        raise ValueError("fit_ranges needs calibration feeds")
    if any(not 0 < f <= 1 for f in shrink):
        raise ValueError(f"fit_ranges: shrink factors must be in (0, 1], got {tuple(shrink)}")
    names = _float_outputs(model)
    if not names:  # nothing to compare: min/max as it is
        return RangeFit(dict(minmax), {t: 1.0 for t in plan.calibrated}, 0.0, 0.0, 0)
    reference_session = cpu_session(model)
    reference = [reference_session.run(names, dict(feed)) for feed in feeds]
    # Each output weighs the same whatever its magnitude: its error over its own mean square.
    power = [max(float(np.mean([np.mean(np.square(r[i], dtype=np.float64)) for r in reference])), 1e-30)
             for i in range(len(names))]

    qdq = insert_qdq(model, plan, minmax).model
    # The scale and zero point each calibrated tensor sets: those of the QuantizeLinear nodes of the
    # activations that take its range (itself and the tensors beside value-moving ops).
    quantizers = {n.input[0]: n for n in qdq.graph.node if n.op_type == "QuantizeLinear"}
    initializers = {t.name: t for t in qdq.graph.initializer}
    params = {t: [(initializers[quantizers[a].input[1]], initializers[quantizers[a].input[2]])
                  for a in plan.activations if plan.ranges_of[a] == t] for t in plan.calibrated}

    def set_range(tensor: str, value: ActivationRange) -> None:
        for scale, zero_point in params[tensor]:
            scale.CopyFrom(numpy_helper.from_array(np.asarray(value.scale, np.float32), scale.name))
            zero_point.CopyFrom(numpy_helper.from_array(np.asarray(value.zero_point, np.int8), zero_point.name))

    def error() -> float:
        session = cpu_session(qdq)
        total = 0.0
        for feed, ref in zip(feeds, reference):
            for i, out in enumerate(session.run(names, dict(feed))):
                total += float(np.mean(np.square(out.astype(np.float64) - ref[i]))) / power[i]
        return total / (len(feeds) * len(names))

    chosen = dict(minmax)
    factors = {t: 1.0 for t in plan.calibrated}
    best = first = error()
    runs = 1
    for tensor in plan.calibrated:
        base = minmax[tensor]
        for factor in shrink:
            if factor == 1.0:
                continue
            candidate = ActivationRange(base.low * factor, base.high * factor)
            set_range(tensor, candidate)
            trial = error()
            runs += 1
            if trial < best:
                best, chosen[tensor], factors[tensor] = trial, candidate, factor
        set_range(tensor, chosen[tensor])
    return RangeFit(chosen, factors, first, best, runs)
