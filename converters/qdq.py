"""Integer activations: a QDQ copy of a model, which onnxruntime runs with its integer kernels.

Weights stored as int8 behind DequantizeLinear save disk, not time: while the activations stay float,
onnxruntime dequantizes the weight once at load and runs the float Conv/Gemm/MatMul. Its QDQ fusion
turns ``DQ(x) -> Conv(DQ(w), DQ(b)) -> Q`` into QLinearConv (Gemm -> QGemm, MatMul -> QLinearMatMul or
MatMulIntegerToFloat) only when every input of the node comes from a DequantizeLinear: activation,
weight and bias (an int32 bias at scale ``x_scale * w_scale``). :func:`plan_qdq` finds where the
QuantizeLinear/DequantizeLinear pairs go, :func:`calibrate` measures the activation ranges on data,
:func:`insert_qdq` writes them.

Placement, as onnxruntime's own QDQ quantizer does it, but without removing or renaming any node (the
graph's inputs, outputs and node names stay; only Q/DQ nodes and their constants are added):

- the activation input of every Conv, Gemm and MatMul with a constant weight;
- its output, or the output of the Relu that alone reads it: a QuantizeLinear whose zero point is the
  int8 minimum makes that Relu a no-op, and onnxruntime's ReluQuantFusion drops it, so the Conv fuses
  with the Q behind the Relu; graph outputs stay float (the model's result is not rounded). A Gemm or
  MatMul output that no integer node reads stays float too: onnxruntime fuses those without a Q behind
  them (QGemm with a float output, MatMulIntegerToFloat), and rounding it would only add error;
- only the integer nodes (and value-moving ops towards them) read a tensor through its DequantizeLinear;
  a float op reading the same tensor (a residual Add) keeps the float value;
- through ops that only move values (Flatten, Reshape, MaxPool, ...) the range is taken from their
  input and both sides get the same scale and zero point, so onnxruntime drops the pair around them and
  runs them on int8.

Weights keep their integer levels when they have them: a weight already stored as DequantizeLinear of
int8/int4/int2 with zero point 0 is re-stored as int8 with the same integers and the same scales (it
decodes to the same floats bit for bit); any other weight (float, sparse, codebook) is quantized per
output channel, symmetric int8 on 7 bits (scale ``max|w| / 63``: ``WEIGHT_PEAK``). Activations are
asymmetric int8, per tensor, scale ``(max - min) / 255`` over the calibration range widened to include 0.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from onnx_admm.converters.optable import DEFAULT_DOMAINS
from onnx_admm.converters.dequantize import decode, remove_decoders, weight_decoders
from onnx_admm.converters.errors import UserError
from onnx_admm.converters.encoders import (DequantizeLinearEncoder, Encoding, QuantSpec, SparseDequantizeLinearEncoder,
                                 dequantize_node, integer_levels, rename_parts)
from onnx_admm.converters.graphinfo import (TensorSource, constant_sources, fresh_name, identity_aliases, node_attr, resolve,
                                  tensor_names, tensor_value)
from onnx_admm.converters.opset import default_opset

logger = logging.getLogger(__name__)

# Ops that run on integers once their inputs come from DequantizeLinear; the weight is input 1.
INTEGER_OPS = ("Conv", "Gemm", "MatMul")
# Ops that only move or select values: onnxruntime drops a DQ -> op -> Q pair around them when both
# sides share scale and zero point, and runs the op on int8.
_MOVERS = ("Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "MaxPool")
# The largest integer of a weight quantized here: 7 bits, not 8. On x86 CPUs without VNNI (AVX2, and AVX-512
# before it) onnxruntime's int8 kernels sum pairs of uint8 x int8 products in 16 bits (VPMADDUBSW), which
# saturates once 2 x 255 x |w| passes 32,767: with weights at +-127 the digits' int8 MatMul read 0.78 where
# 1.06 is right on an AMD EPYC (AVX2). At +-63 no pair can saturate, so the file computes the same on every
# CPU; onnxruntime's own quantizer calls this reduce_range.
WEIGHT_PEAK = 63
# The largest |level| of a kept weight that cannot saturate: 2 x 255 x 64 = 32,640 (7-bit levels, [-64, 63]).
SAFE_PEAK = 64

# Activations a QuantizeLinear with the int8 minimum as zero point makes redundant (ReluQuantFusion).
_FUSED = ("Relu",)
# Integer ops that onnxruntime fuses with a float output (no QuantizeLinear behind them).
_FLOAT_OUTPUT = ("Gemm", "MatMul")
_MIN_OPSET = 13  # per-axis DequantizeLinear
_INT8 = onnx.TensorProto.INT8


@dataclass(frozen=True)
class ActivationRange:
    """The calibrated range of one activation tensor and the int8 parameters it gives."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.low) and np.isfinite(self.high)) or self.low > self.high:
            raise ValueError(f"ActivationRange needs finite low <= high, got [{self.low}, {self.high}]")

    @property
    def scale(self) -> np.float32:
        # Widened to include 0 so that 0 (padding, Relu) is exact; a constant tensor keeps scale 1.
        low, high = min(self.low, 0.0), max(self.high, 0.0)
        return np.float32((high - low) / 255.0) if high > low else np.float32(1.0)

    @property
    def zero_point(self) -> np.int8:
        return np.int8(np.clip(np.rint(-128.0 - min(self.low, 0.0) / float(self.scale)), -128, 127))


@dataclass(frozen=True)
class QdqPlan:
    """Where the Q/DQ pairs go.

    Attributes:
        nodes: the Conv/Gemm/MatMul nodes that get integer inputs, by their output (unnamed nodes too).
        activations: every activation tensor that gets a QuantizeLinear/DequantizeLinear pair.
        ranges_of: activation -> the tensor whose calibrated range it uses (itself, or the input of the
            value-moving ops it comes out of).
        weights: node output -> (weight tensor, bias tensor or None).
        readers: activation -> the nodes (by output) that read its DequantizeLinear; every other reader
            keeps the float tensor. Absent: every reader reads the DequantizeLinear.
    """

    nodes: tuple[str, ...]
    activations: tuple[str, ...]
    ranges_of: Mapping[str, str]
    weights: Mapping[str, tuple[str, str | None]]
    readers: Mapping[str, frozenset[str]] = dataclasses.field(default_factory=dict)

    @property
    def calibrated(self) -> tuple[str, ...]:
        """The tensors whose ranges calibration measures."""
        return tuple(dict.fromkeys(self.ranges_of[a] for a in self.activations))


def plan_qdq(model: onnx.ModelProto, left_float: frozenset[str] = frozenset()) -> QdqPlan:
    """Where ``model`` gets Q/DQ pairs (see the module docstring); the Conv/Gemm/MatMul nodes whose outputs
    are in ``left_float`` get none (onnxruntime would not fuse them: ``qdq_tune.unfused``).

    Raises:
        UserError: no Conv, Gemm or MatMul with a constant weight, or an opset below 13.
    """
    graph = model.graph
    if default_opset(model) < _MIN_OPSET:
        raise UserError(f"integer activations need opset {_MIN_OPSET} or later (per-channel DequantizeLinear); "
                        f"the model has {default_opset(model)}: convert it with onnx.version_converter first")
    constants = set(constant_sources(model)) | set(weight_decoders(model))
    aliases = identity_aliases(model)
    graph_outputs = {o.name for o in graph.output}
    # Initializers an old exporter also lists as graph inputs: the graph input must stay as it is, so the
    # tensor cannot become a DequantizeLinear output; such a node stays float.
    overridable = {i.name for i in graph.input}
    producers = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    nodes, weights, wanted = [], {}, []
    points: dict[str, str] = {}  # outputs of the integer nodes (after their Relu) -> the node's op type
    integer_readers: dict[str, set[str]] = {}
    for node in graph.node:
        if node.op_type not in INTEGER_OPS or node.domain not in DEFAULT_DOMAINS or len(node.input) < 2:
            continue
        # A weight read through Identity (a tied weight) is the constant it copies: that one gets the decoder,
        # and onnxruntime removes the Identity before fusing.
        x, w = node.input[0], resolve(node.input[1], aliases)
        if w not in constants or x in constants or node.output[0] in left_float:
            continue
        if node.op_type == "Gemm" and (node_attr(node, "transA", 0) or node_attr(node, "alpha", 1.0) != 1.0
                                       or node_attr(node, "beta", 1.0) != 1.0):
            continue  # QGemm takes neither a transposed A nor scaled terms
        bias = resolve(node.input[2], aliases) if len(node.input) > 2 else None
        bias = bias if bias in constants else None
        if {w, bias} & overridable:
            logger.info("%s %s stays float: its weight or bias is also a graph input", node.op_type, node.name)
            continue
        nodes.append(node.output[0])
        weights[node.output[0]] = (w, bias)
        wanted.append(x)
        integer_readers.setdefault(x, set()).add(node.output[0])
        out = node.output[0]
        after = readers.get(out, [])
        if len(after) == 1 and after[0].op_type in _FUSED and out not in graph_outputs:
            out = after[0].output[0]
        wanted.append(out)
        points[out] = node.op_type
    if not nodes:
        raise UserError("integer activations need a Conv, Gemm or MatMul with a constant weight, and the model "
                        "has none; leave the activations float (output.activations = \"float\")")

    # An output no integer node reads is quantized only where the fusion needs it: QLinearConv needs the
    # QuantizeLinear behind the Conv, while a MatMul or Gemm without one still fuses (MatMulIntegerToFloat,
    # QGemm with a float output), and the rounding would only add error before float ops (bias and residual
    # Adds, LayerNorm). Measured on the ViT sample: 3x less output error and faster at batch 64.
    # (An output that value-moving ops carry to an integer node gets its pair from that node's input.)
    wanted = [t for t in wanted if points.get(t) not in _FLOAT_OUTPUT or t in integer_readers]
    ranges_of: dict[str, str] = {}
    for name in wanted:
        if name in graph_outputs or name in ranges_of:
            continue  # a graph output keeps its float value
        chain = [name]
        producer = producers.get(name)
        # Up through value-moving ops: each gets the same scale on both sides, so onnxruntime runs it on int8.
        while (producer is not None and producer.op_type in _MOVERS and producer.domain in DEFAULT_DOMAINS
               and producer.input[0] not in graph_outputs and producer.input[0] not in constants):
            integer_readers.setdefault(producer.input[0], set()).add(chain[-1])
            chain.append(producer.input[0])
            producer = producers.get(producer.input[0])
        root = ranges_of.get(chain[-1], chain[-1])
        for tensor in chain:
            ranges_of.setdefault(tensor, root)
    # A tensor that integer nodes (or value-moving ops towards them) read through the DequantizeLinear:
    # other readers keep the float tensor. Measured with onnxruntime 1.32 on the test models' residual
    # blocks: a DequantizeLinear that also feeds a float Add leaves the Conv / MatMul behind it unfused (the
    # Relu in front of the Q then stays, so the Conv before it runs float instead: one float Conv, not two).
    # A tensor no integer node reads (a Conv output into BatchNormalization) is read through it by all.
    readers = {t: frozenset(r) for t, r in integer_readers.items() if t in ranges_of}
    return QdqPlan(tuple(nodes), tuple(ranges_of), ranges_of, weights, readers)


def cpu_session(model: onnx.ModelProto, optimized: str | None = None) -> ort.InferenceSession:
    """A quiet one-thread CPU session of ``model`` (writing its optimized graph to ``optimized`` if given)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    if optimized is not None:
        options.optimized_model_filepath = optimized
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def calibrate(model: onnx.ModelProto, plan: QdqPlan, feeds: Iterable[Mapping[str, np.ndarray]]) -> dict[str, ActivationRange]:
    """Min and max of each tensor of ``plan.calibrated`` over ``feeds`` (batches run in onnxruntime).

    Raises:
        UserError: no feeds, or a tensor that never holds a finite value.
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = list(plan.calibrated)
    outputs = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in outputs)
    session = cpu_session(probe)
    low = {n: np.inf for n in names}
    high = {n: -np.inf for n in names}
    batches = 0
    for feed in feeds:
        batches += 1
        for name, value in zip(names, session.run(names, dict(feed))):
            finite = value[np.isfinite(value)]
            if finite.size:
                low[name] = min(low[name], float(finite.min()))
                high[name] = max(high[name], float(finite.max()))
    if not batches:
        raise UserError("integer activations need calibration data, and none was given")
    missing = [n for n in names if not np.isfinite(low[n])]
    if missing:
        raise UserError(f"calibration found no finite value in {missing[0]!r}; give data that the model computes "
                        "finite values on")
    return {n: ActivationRange(low[n], high[n]) for n in names}


@dataclass
class QdqResult:
    """The QDQ model and how each weight was stored (``kept``: its integer levels; ``quantized``: new);
    ``wide``: the kept weights whose levels pass ``SAFE_PEAK`` (saturating on x86 CPUs without VNNI)."""

    model: onnx.ModelProto
    weights: dict[str, str]
    wide: tuple[str, ...] = ()


def insert_qdq(model: onnx.ModelProto, plan: QdqPlan, ranges: Mapping[str, ActivationRange]) -> QdqResult:
    """A copy of ``model`` with the Q/DQ pairs of ``plan``, activation scales from ``ranges``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    taken = tensor_names(out)
    node_names = {n.name for n in graph.node}
    params = {a: (ranges[plan.ranges_of[a]].scale, ranges[plan.ranges_of[a]].zero_point) for a in plan.activations}

    front: list[onnx.NodeProto] = []
    how: dict[str, str] = {}
    weight_scales: dict[str, np.ndarray] = {}
    wide: list[str] = []
    for output in plan.nodes:
        # Looked up each time: dropping a decoder rebuilds graph.node.
        node = next(n for n in graph.node if n.output and n.output[0] == output)
        weight, bias = plan.weights[output]
        if weight not in weight_scales:
            scale, axis, q, how[weight], saturates = _int8_levels(out, weight, _channel_axis(node, out, weight))
            weight_scales[weight] = scale
            if saturates:
                wide.append(weight)
            if q is not None:  # None: already int8 behind DequantizeLinear (dense or sparse), kept as stored
                _drop_constant(out, weight, taken)
                encoding = _int8_encoding(weight, q, scale, axis)
                rename_parts(encoding, weight, taken, node_names)
                graph.initializer.extend(encoding.initializers)
                graph.sparse_initializer.extend(encoding.sparse_initializers)
                front.extend(encoding.nodes)
        if bias is not None and node.input[0] in params:
            scale = (params[node.input[0]][0] * weight_scales[weight]).astype(np.float32)
            value = _constant_value(out, bias).astype(np.float32)
            if value.ndim != 1 or (scale.ndim and scale.shape[0] != value.shape[0]):
                continue  # a broadcast bias onnxruntime's fusion does not take: left float
            scale = np.ascontiguousarray(np.broadcast_to(scale, value.shape))
            q = np.clip(np.rint(value / scale), -(2 ** 31), 2 ** 31 - 1).astype(np.int32)
            _drop_constant(out, bias, taken)
            tensors = [numpy_helper.from_array(q, f"{bias}_quantized"), numpy_helper.from_array(scale, f"{bias}_scale"),
                       numpy_helper.from_array(np.zeros_like(q), f"{bias}_zero_point")]
            _store(graph, tensors, dequantize_node(bias, [], 0), front, taken, node_names)

    # Activation pairs go right after their producer (graph inputs: at the front), consumers read the DQ.
    after: dict[str, list[onnx.NodeProto]] = {}
    dequantized: dict[str, str] = {}
    for tensor in plan.activations:
        scale, zero_point = params[tensor]
        s = numpy_helper.from_array(np.asarray(scale, np.float32), fresh_name(f"{tensor}_scale", taken))
        z = numpy_helper.from_array(np.asarray(zero_point, np.int8), fresh_name(f"{tensor}_zero_point", taken))
        q = fresh_name(f"{tensor}_quantized", taken)
        dq = fresh_name(f"{tensor}_dequantized", taken)
        taken.update({s.name, z.name, q, dq})
        graph.initializer.extend([s, z])
        pair = [helper.make_node("QuantizeLinear", [tensor, s.name, z.name], [q],
                                 name=fresh_name(f"{tensor}_QuantizeLinear", node_names)),
                helper.make_node("DequantizeLinear", [q, s.name, z.name], [dq],
                                 name=fresh_name(f"{tensor}_DequantizeLinear", node_names))]
        node_names.update(n.name for n in pair)
        after.setdefault(tensor, []).extend(pair)
        dequantized[tensor] = dq
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in dequantized and (name not in plan.readers or (node.output and node.output[0] in plan.readers[name])):
                node.input[i] = dequantized[name]
    ordered = front + [n for tensor in (i.name for i in graph.input) for n in after.get(tensor, [])]
    for node in graph.node:
        ordered.append(node)
        for output in node.output:
            ordered.extend(after.get(output, []))
    del graph.node[:]
    graph.node.extend(ordered)
    return QdqResult(out, how, tuple(wide))


def _channel_axis(node: onnx.NodeProto, model: onnx.ModelProto, weight: str) -> int:
    """The weight's output-channel axis: Conv 0; Gemm 0 with transB else 1; MatMul the last."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if node_attr(node, "transB", 0) else 1
    return _constant_value(model, weight).ndim - 1


def _int8_levels(model: onnx.ModelProto, weight: str,
                 axis: int) -> tuple[np.ndarray, int, np.ndarray | None, str, bool]:
    """(scale, axis, int8 levels, how, wide) for ``weight``: its own levels if it has them, else per-channel ones.

    The levels are None when the weight is stored as int8 with zero point 0 already: it stays as it is, and
    ``wide`` says whether kept levels pass ``SAFE_PEAK`` (levels made here never do).
    """
    decoder = weight_decoders(model).get(weight)
    value = _constant_value(model, weight)
    if decoder is not None and decoder.op_type == "DequantizeLinear":
        sources = constant_sources(model)
        dq = model.graph.node[decoder.nodes[-1]]
        scale = tensor_value(model, sources[dq.input[1]]).astype(np.float32)
        zero = tensor_value(model, sources[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] else np.zeros(1)
        own_axis = int(node_attr(dq, "axis", 1)) % value.ndim if scale.ndim else axis
        if not np.any(zero) and value.dtype == np.float32:
            if _elem_type(model, sources[dq.input[0]]) == _INT8:
                return scale, own_axis, None, "kept", _level_peak(value, scale, own_axis) > SAFE_PEAK
            q = integer_levels(value, QuantSpec(8, scale, own_axis if scale.ndim else None))
            if q is not None:  # int4 / int2 levels: the same integers in an int8 container
                return scale, own_axis, q, "kept", bool(np.abs(q).max(initial=0) > SAFE_PEAK)
    value = value.astype(np.float32)
    peak = np.abs(value).max(axis=tuple(i for i in range(value.ndim) if i != axis))
    scale = np.where(peak > 0, peak / WEIGHT_PEAK, 1.0).astype(np.float32)
    shape = [-1 if i == axis else 1 for i in range(value.ndim)]
    q = np.clip(np.rint(value / scale.reshape(shape)), -WEIGHT_PEAK, WEIGHT_PEAK).astype(np.int64)
    return scale, axis, q, "quantized", False


def _level_peak(value: np.ndarray, scale: np.ndarray, axis: int) -> float:
    """The largest |integer level| of ``value`` on ``scale`` (per channel along ``axis``, or one scale)."""
    shape = [-1 if i == axis else 1 for i in range(value.ndim)] if scale.ndim else []
    return float(np.abs(np.rint(value.astype(np.float64) / scale.reshape(shape))).max(initial=0.0))


def _int8_encoding(name: str, q: np.ndarray, scale: np.ndarray, axis: int) -> Encoding:
    """int8 levels behind DequantizeLinear, dense or in a sparse initializer, whichever is smaller.

    The writeback encoders pick the smallest container; onnxruntime's integer kernels take int8 only.
    """
    quant = QuantSpec(8, scale, axis if scale.ndim else None)
    shape = [-1 if i == axis else 1 for i in range(q.ndim)] if scale.ndim else []
    value = q.astype(np.float32) * scale.reshape(shape)
    dense = DequantizeLinearEncoder().encode(name, value, quant)
    while dense.kind != "int8":
        dense = dense.fallback
    sparse = SparseDequantizeLinearEncoder().encode(name, value, quant)
    return dense if sparse is None or dense.nbytes <= sparse.nbytes else sparse


def _elem_type(model: onnx.ModelProto, source: TensorSource) -> int | None:
    graph = model.graph
    if source.location == "initializer":
        return next(t.data_type for t in graph.initializer if t.name == source.name)
    if source.location == "sparse_initializer":
        return next(s.values.data_type for s in graph.sparse_initializer if s.values.name == source.name)
    return None  # a Constant node: re-stored


def _constant_value(model: onnx.ModelProto, name: str) -> np.ndarray:
    decoder = weight_decoders(model).get(name)
    return decode(model, decoder) if decoder is not None else tensor_value(model, constant_sources(model)[name])


def _drop_constant(model: onnx.ModelProto, name: str, taken: set[str]) -> None:
    """Remove the constant ``name`` (or its decoder, with the constants only the decoder reads): a
    DequantizeLinear producing ``name`` replaces it. The names that go are freed in ``taken``."""
    before = tensor_names(model)
    decoder = weight_decoders(model).get(name)
    graph = model.graph
    if decoder is not None:
        remove_decoders(model, [decoder])
    else:
        for container, key in ((graph.initializer, lambda t: t.name), (graph.sparse_initializer, lambda s: s.values.name)):
            for i, item in enumerate(container):
                if key(item) == name:
                    del container[i]
                    break
        for i, node in enumerate(graph.node):
            if node.op_type == "Constant" and node.output and node.output[0] == name:
                del graph.node[i]
                break
    taken -= before - tensor_names(model)


def _store(graph: onnx.GraphProto, tensors: list[onnx.TensorProto], node: onnx.NodeProto,
           front: list[onnx.NodeProto], taken: set[str], node_names: set[str]) -> None:
    """Add ``tensors`` (renamed where a name is taken) as ``node``'s inputs, and ``node`` to ``front``."""
    for tensor in tensors:
        tensor.name = fresh_name(tensor.name, taken)
        taken.add(tensor.name)
    node.input[:] = [t.name for t in tensors]
    node.name = fresh_name(node.name, node_names)
    node_names.add(node.name)
    graph.initializer.extend(tensors)
    front.append(node)
