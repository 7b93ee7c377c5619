"""The shrink pass: physically remove pruned output channels from an ONNX graph, and count MACs.

``shrink(model, keep)`` takes, per channel group of ``converters.groups`` (named by the producer's
weight), the channels to keep, and cuts every tensor of the group: the producer's weight and bias
(every member's, for producers coupled through a residual sum), BatchNormalization parameters,
per-channel constants, depthwise Conv weights (and their ``group`` attribute), the consumers' input
channels (Conv axis 1; Gemm B columns for transB=1, rows for transB=0; MatMul rows; a block of ``H*W``
features per channel after a flatten) and the Reshape shape constants holding a flattened size; after a
Concat each group cuts its own range of the joined channels. Graph inputs, outputs and node names stay
as they were (the shrink pass changes shapes, never graph I/O); the ``value_info`` of every tensor whose
shape changes is dropped, so no stale shape survives (onnxruntime re-infers).

Removing channel ``c`` computes exactly what the dense model computes once the consumers' weights that
read ``c`` are zero; whatever the producer's filter and bias hold. A filter that was zeroed but whose
consumers still read it (a bias or a BatchNorm shift makes the channel a nonzero constant) is *not*
equivalent to removing it: prune the consumers' input channels with the filters.

Tensors may live in initializers, sparse initializers (re-encoded as COO) or Constant nodes; external
data must be loaded. ``ShrinkResult.cuts`` records what was taken out of each tensor, so that
:func:`cut_update` can cut a trained value and its quantization (a per-channel scale along a cut axis)
the same way: compress shrinks the original graph first and then writes the cut, still quantized values
into it, so the encoders of ``converters.writeback`` (int8/int4/int2 + DequantizeLinear, codebook) see
the shrunk tensors. ``count_macs`` gives multiply-accumulates per Conv/ConvTranspose/Gemm/MatMul and LSTM/GRU/RNN node
from shapes inferred at a fixed batch size, and parameter counts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from onnx_admm.converters.cut import ShrinkResult, TensorCut, cut, cut_update, kept_channels
from onnx_admm.converters.errors import first_line
from onnx_admm.converters.evaluate import evaluate
from onnx_admm.converters.graphinfo import constant_sources, dim_value, graph_inputs, node_label, tensor_value
from onnx_admm.converters.groups import ChannelGroup, channel_groups
from onnx_admm.converters.optable import LINEAR, RECURRENT

logger = logging.getLogger(__name__)

__all__ = ["ShrinkResult", "TensorCut", "count_macs", "cut_update", "kept_channels", "shrink"]


def shrink(
    model: onnx.ModelProto,
    keep: Mapping[str, np.ndarray | Sequence[int] | Sequence[bool]],
    groups: Sequence[ChannelGroup] | None = None,
) -> ShrinkResult:
    """Remove the channels not kept from the graph; a new model, ``model`` is not modified.

    Args:
        model: The ONNX model, external data loaded.
        keep: Group name (the producer's weight tensor, see ``channel_groups``) -> bool mask of the
            channels kept, or their indices. Groups not named keep every channel.
        groups: ``channel_groups(model)`` when already computed.

    Returns:
        The shrunk model, the list of changes and what was cut out of each constant.

    Raises:
        ValueError: a name is not a group, a group is not prunable, or a mask does not fit.
    """
    return cut(model, keep, channel_groups(model) if groups is None else groups)


def count_macs(model: onnx.ModelProto, batch: int = 1, inputs: Mapping[str, Sequence[int]] | None = None,
               feeds: Mapping[str, np.ndarray] | None = None) -> dict:
    """Multiply-accumulates per Conv/ConvTranspose/Gemm/MatMul and recurrent node at ``batch``, and parameter
    counts.

    The batch size replaces the first dim of every graph input that is symbolic or unknown, and ``inputs``
    gives whole shapes (an image's height and width the graph leaves dynamic); shapes come from ONNX shape
    inference on a copy (stored ``value_info`` is ignored).

    Args:
        model: The ONNX model, external data loaded.
        batch: Batch size the MACs are counted at.
        inputs: Shapes of graph inputs, by name, used as given (their batch included).
        feeds: Inputs to run the model on in onnxruntime where inference leaves a node's shapes unknown.

    Returns:
        ``{"batch", "macs", "params", "nodes": {label: {"op_type", "macs", "params"}}, "unknown": [labels]}``:
        ``macs`` sums the nodes whose shapes are known (the others are listed in ``unknown`` with
        ``macs`` None); ``params`` counts every float constant of the graph; a node's ``params`` its
        constant inputs.
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
    real_inputs = {spec.name for spec in graph_inputs(probe)}
    for value in probe.graph.input:
        dims = value.type.tensor_type.shape.dim
        if inputs is not None and value.name in inputs:
            value.type.tensor_type.shape.Clear()
            value.type.tensor_type.shape.dim.extend(onnx.TensorShapeProto.Dimension(dim_value=int(d))
                                                    for d in inputs[value.name])
        elif value.name in real_inputs and dims and not isinstance(dim_value(dims[0]), int):
            dims[0].Clear()
            dims[0].dim_value = batch
    inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    shapes: dict[str, list[int | None]] = {}
    for value in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        ttype = value.type.tensor_type
        if ttype.HasField("shape"):
            shapes[value.name] = [d if isinstance(d, int) else None for d in map(dim_value, ttype.shape.dim)]
    sources = constant_sources(model)
    constant_shapes: dict[str, tuple[int, ...]] = {}
    params = 0
    for name, source in sources.items():
        value = tensor_value(model, source)
        constant_shapes[name] = value.shape
        if np.issubdtype(value.dtype, np.floating) or value.dtype.name == "bfloat16":
            params += value.size
    for name, shape in constant_shapes.items():
        shapes[name] = list(shape)

    counted = [(i, node) for i, node in enumerate(model.graph.node)
               if node.op_type in LINEAR | RECURRENT and node.domain in ("", "ai.onnx")]
    missing = [node for _, node in counted if _node_macs(node, shapes) is None]
    if feeds is not None and missing:
        # Where inference loses the shapes (BERT's position ids cut to the sequence by a computed Slice, and
        # everything after them), they are read from one onnxruntime run of the feeds.
        names = sorted({x for node in missing for x in (*node.input[:2], node.output[0])
                        if x and x not in constant_shapes})
        try:
            values = next(evaluate(model, names, [feeds]))
        except Exception as exc:  # onnxruntime's own error types; the count is a figure, not the run's result
            logger.info("MACs: onnxruntime could not run the model for its shapes (%s); %d nodes stay uncounted",
                        first_line(exc), len(names))
            values = []
        for name, value in zip(names, values):
            shapes[name] = list(np.shape(value))
    nodes: dict[str, dict] = {}
    unknown: list[str] = []
    total = 0
    for i, node in counted:
        label = node_label(node, i)
        macs = _node_macs(node, shapes)
        node_params = sum(math.prod(constant_shapes[n]) for n in node.input if n in constant_shapes)
        nodes[label] = {"op_type": node.op_type, "macs": macs, "params": node_params}
        if macs is None:
            unknown.append(label)
        else:
            total += macs
    return {"batch": batch, "macs": total, "params": params, "nodes": nodes, "unknown": unknown}


def _node_macs(node: onnx.NodeProto, shapes: Mapping[str, list[int | None]]) -> int | None:
    def known(name: str) -> list[int] | None:
        dims = shapes.get(name)
        return dims if dims is not None and all(isinstance(d, int) and d > 0 for d in dims) else None

    weight = known(node.input[1]) if len(node.input) > 1 else None
    if node.op_type in RECURRENT:  # every step: W [directions, gates * hidden, input] and R [.., hidden]
        x, r = known(node.input[0]), known(node.input[2]) if len(node.input) > 2 else None
        return None if x is None or weight is None or r is None else x[0] * x[1] * (math.prod(weight) + math.prod(r))
    out = known(node.output[0]) if node.output[0] else None
    if node.op_type == "Conv":
        return None if out is None or weight is None else math.prod(out) * math.prod(weight[1:])
    if node.op_type == "ConvTranspose":
        x = known(node.input[0])
        return None if x is None or weight is None else math.prod(x) * math.prod(weight[1:])
    a = known(node.input[0])
    if out is None or a is None or not a:
        return None
    if node.op_type == "Gemm":
        trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
        return math.prod(out) * (a[0] if trans_a else a[-1])
    return math.prod(out) * a[-1]  # MatMul
