"""Models quantized by onnxruntime's quantizer, rewritten as float graphs so they can be compressed.

onnxruntime.quantization writes two forms, and onnx2torch converts neither:

- **QOperator**: integer operators. ``quantize_dynamic`` writes ``DynamicQuantizeLinear`` of each
  activation feeding ``ConvInteger`` / ``MatMulInteger`` (int32 result -> Cast -> Mul by the product
  of the two scales) and ``com.microsoft.DynamicQuantizeLSTM`` / ``DynamicQuantizeMatMul``;
  ``quantize_static(QuantFormat.QOperator)`` writes ``QLinearConv``, ``QLinearMatMul`` and the
  ``com.microsoft`` ``QGemm``, ``QLinearAdd``, ``QLinearMul``, ``QLinearSoftmax`` ... with shape ops
  (MaxPool, Flatten, Reshape, Transpose ...) running on the uint8/int8 tensors between them.
- **QDQ**: float operators between ``QuantizeLinear`` -> ``DequantizeLinear`` pairs on activations,
  weights stored as integers feeding a ``DequantizeLinear``.

:func:`dequantize_model` returns a float copy that computes what the quantized model approximates:

1. each integer operator becomes its float operator under the same node name, reading float weights
   ``(q - zero_point) * scale`` (new initializers named after the original float tensor, which the
   quantizer named ``<name>_quantized``) and, for the static form, between a DequantizeLinear of its
   inputs and a QuantizeLinear of its output, which step 2 removes;
2. every activation QuantizeLinear, with the DequantizeLinear nodes its integers reach through shape
   ops, is removed: the shape ops run on the float tensor. The quantizer drops a Relu in front of a
   QuantizeLinear whose range starts at 0 (the zero point at the bottom of the integer range); such a
   QuantizeLinear becomes that Relu again. The upper end of a calibrated range (a clip at the largest
   value seen in calibration, a Clip(0, 6) the quantizer dropped) is not kept;
3. weight DequantizeLinear nodes of the QDQ form (every input a constant) become float initializers
   under their output's name (``converters.dequantize.fold_weight_decoders``). Kept, they would not
   leave a float graph: onnxruntime fuses a weight DequantizeLinear feeding MatMul into a kernel that
   quantizes the activation on the fly (measured: 7e-4 of max|output| away from the float MatMul).

Everything else -- node names, the other nodes, graph inputs and outputs -- stays as it was. The
float model differs from the quantized one by the activation rounding it no longer does (the tests
state the tolerance). A model without onnxruntime's quantized operators or activation
QuantizeLinear is returned unchanged, so a model compressed by this tool (DequantizeLinear weights
only) keeps its decoders.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnx_admm.converters.dequantize import fold_weight_decoders, integer_element_bits
from onnx_admm.converters.quantized_ops import REWRITES
from onnx_admm.converters.optable import DEFAULT_DOMAINS, VALUE_MOVERS
from onnx_admm.converters.graphinfo import (constant_sources, live_nodes, node_label, tensor_shape_and_type,
                                            tensor_value)

logger = logging.getLogger(__name__)

_MS = "com.microsoft"

_RANGE_MIN = {onnx.TensorProto.UINT8: 0, onnx.TensorProto.INT8: -128, onnx.TensorProto.UINT16: 0,
              onnx.TensorProto.INT16: -32768}


def is_quantized(model: onnx.ModelProto) -> bool:
    """Whether ``model`` holds onnxruntime quantizer output (integer operators or activation QuantizeLinear)."""
    sources = constant_sources(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        if node.domain in DEFAULT_DOMAINS or node.domain == _MS:
            if node.op_type == "DequantizeLinear":
                if _gathered_table(node, producers, sources):
                    return True
            elif node.op_type in REWRITES or node.op_type == "DynamicQuantizeLinear":
                return True
            if node.op_type == "QuantizeLinear" and node.input[0] not in sources:
                return True
    return False


def _gathered_table(node: onnx.NodeProto, producers: dict, sources: dict) -> bool:
    """A DequantizeLinear of rows Gathered from a constant (an embedding table quantized by onnxruntime; every
    other DequantizeLinear decodes a constant weight or an activation)."""
    gather = producers.get(node.input[0])
    return gather is not None and gather.op_type == "Gather" and gather.input[0] in sources


def integer_weight_bits(model: onnx.ModelProto) -> int | None:
    """The narrowest integer width ``model`` stores a weight in (a constant DequantizeLinear input, MatMulNBits'
    ``bits``, 8 for onnxruntime's other integer operators), or None when every weight is float: what --bits
    keeps a compressed copy of it as small."""
    sources = constant_sources(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    widths = []
    for node in model.graph.node:
        if node.domain not in DEFAULT_DOMAINS and node.domain != _MS:
            continue
        if node.op_type == "MatMulNBits":
            widths.append(next((a.i for a in node.attribute if a.name == "bits"), 4))
        elif node.op_type == "DequantizeLinear" and (node.input[0] in sources or
                                                     _gathered_table(node, producers, sources)):
            weight = node.input[0] if node.input[0] in sources else producers[node.input[0]].input[0]
            width = integer_element_bits(tensor_shape_and_type(model, sources[weight])[1])
            widths.extend([width] if width else [])
        elif node.op_type in REWRITES and node.op_type != "DequantizeLinear":
            widths.append(8)
    return min(widths, default=None)


def dequantize_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A float copy of a quantized ``model`` (module doc) and one line per replacement made.

    Returns ``model`` itself and ``[]`` when it holds nothing to replace.
    """
    if not is_quantized(model):
        return model, []
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    rewriter = _Rewriter(copy)
    rewriter.fold_constant_quantize()
    rewriter.rewrite_operators()
    rewriter.remove_activation_quantization()
    rewriter.finish()
    if fold_weight_decoders(copy):
        rewriter.notes.append("weight DequantizeLinear nodes folded into float initializers")
    for line in rewriter.notes:
        logger.info("dequantized: %s", line)
    return copy, rewriter.notes


class _Rewriter:
    """The passes of :func:`dequantize_model` over one model copy, sharing its constant table."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.sources = constant_sources(model)
        self.new_inits: dict[str, np.ndarray] = {}
        self.notes: list[str] = []
        self.changed_types: set[str] = set()
        self.used_names = ({t.name for t in self.graph.initializer} | {o for n in self.graph.node for o in n.output}
                           | {i.name for i in self.graph.input})
        self.opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 13)

    # -- helpers ------------------------------------------------------------------------------------

    def const(self, name: str) -> np.ndarray | None:
        if not name:
            return None
        if name in self.new_inits:
            return self.new_inits[name]
        source = self.sources.get(name)
        return None if source is None else tensor_value(self.model, source)

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.used_names:
            name, k = f"{base}_{k}", k + 1
        self.used_names.add(name)
        return name

    def add_init(self, base: str, value: np.ndarray) -> str:
        # The quantizer names a weight <float name>_quantized: give the float tensor its name back.
        if base.endswith("_quantized"):
            base = base[: -len("_quantized")]
        name = self.fresh(base)
        self.new_inits[name] = np.ascontiguousarray(value)
        return name

    def readers(self) -> dict[str, list[onnx.NodeProto]]:
        found: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for name in node.input:
                if name:
                    found[name].append(node)
        return found

    # -- pass 0: QuantizeLinear of a constant (a QDQ weight kept in float) ----------------------------

    def fold_constant_quantize(self) -> None:
        keep = []
        for node in self.graph.node:
            if node.op_type == "QuantizeLinear" and node.domain in DEFAULT_DOMAINS and all(
                    self.const(name) is not None for name in node.input if name):
                feeds = {name: self.const(name) for name in node.input if name}
                (value,) = ReferenceEvaluator(node, opsets={"": self.opset}).run(None, feeds)
                self.new_inits[node.output[0]] = np.asarray(value)
                continue
            keep.append(node)
        self._replace_nodes(keep)

    # -- pass 1: integer operators -> float operators ---------------------------------------------------

    def rewrite_operators(self) -> None:
        producers = {out: node for node in self.graph.node for out in node.output}
        readers = self.readers()
        out: list[onnx.NodeProto] = []
        removed: set[int] = set()
        for index, node in enumerate(self.graph.node):
            rewrite = REWRITES.get(node.op_type) if node.domain in DEFAULT_DOMAINS or node.domain == _MS else None
            replacement = rewrite(self, node, producers, readers, removed) if rewrite else None
            if replacement is None:
                out.append(node)
                continue
            out.extend(replacement)
            self.notes.append(f"{node.op_type} {node_label(node, index)!r} -> {_main_op(replacement)}")
        out = [n for n in out if id(n) not in removed]
        # DynamicQuantizeLinear nodes and scale products nothing reads any more.
        out = self._drop_dead(out, {"DynamicQuantizeLinear", "Mul", "Cast"})
        self._replace_nodes(out)

    # -- pass 2: activation QuantizeLinear / DequantizeLinear ------------------------------------------

    def remove_activation_quantization(self) -> None:
        readers = self.readers()
        graph_outputs = {o.name for o in self.graph.output}
        producers = {out: node for node in self.graph.node for out in node.output}
        to_relu: dict[int, onnx.NodeProto] = {}
        to_identity: set[int] = set()
        removed_pairs = 0
        for node in list(self.graph.node):
            if node.op_type != "QuantizeLinear" or node.domain not in DEFAULT_DOMAINS or node.input[0] in self.sources:
                continue
            closure, dequantizers = self._integer_closure(node.output[0], readers, graph_outputs)
            if closure is None:
                logger.debug("keeping QuantizeLinear %r: its integers reach an operator that needs them", node.name)
                continue
            removed_pairs += 1
            self.changed_types |= closure
            to_identity.update(id(d) for d in dequantizers)
            source = producers.get(node.input[0])
            if self._range_starts_at_zero(node) and not (source is not None and source.op_type == "Relu"):
                to_relu[id(node)] = node
            else:
                to_identity.add(id(node))
        if not removed_pairs:
            return
        relus = 0
        for node in self.graph.node:
            if id(node) in to_relu:
                _become(node, "Relu", [node.input[0]])
                relus += 1
            elif id(node) in to_identity:
                _become(node, "Identity", [node.input[0]])
        self._drop_identities({id(n) for n in self.graph.node if id(n) in to_identity}, graph_outputs)
        self.notes.append(f"{removed_pairs} activation QuantizeLinear (with their DequantizeLinear) removed"
                          + (f", {relus} of them as the Relu their range implies" if relus else ""))

    def _integer_closure(self, start: str, readers, graph_outputs) -> tuple[set[str] | None, list[onnx.NodeProto]]:
        """The tensors holding ``start``'s integers through shape ops, and the DequantizeLinear nodes
        ending them; None when the integers reach anything else (or a graph output)."""
        closure, dequantizers, stack = {start}, [], [start]
        while stack:
            name = stack.pop()
            if name in graph_outputs:
                return None, []
            for reader in readers.get(name, []):
                if reader.op_type == "DequantizeLinear" and reader.input[0] == name:
                    dequantizers.append(reader)
                elif reader.op_type in VALUE_MOVERS and reader.domain in DEFAULT_DOMAINS and reader.input[0] == name:
                    for out in reader.output:
                        if out and out not in closure:
                            closure.add(out)
                            stack.append(out)
                else:
                    return None, []
        return closure, dequantizers

    def _range_starts_at_zero(self, node: onnx.NodeProto) -> bool:
        zero_point = self.const(node.input[2]) if len(node.input) > 2 else None
        if zero_point is None:
            return len(node.input) <= 2 or not node.input[2]  # no zero point: uint8, zero point 0
        dtype = helper.np_dtype_to_tensor_dtype(zero_point.dtype)
        return dtype in _RANGE_MIN and bool(np.all(zero_point == _RANGE_MIN[dtype]))

    # -- finishing --------------------------------------------------------------------------------------

    def finish(self) -> None:
        graph = self.graph
        graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in self.new_inits.items())
        read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        for container in (graph.initializer,):
            kept = [t for t in container if t.name in read]
            del container[:]
            container.extend(kept)
        # Shape ops now carry floats: the integer types recorded for their outputs are stale.
        kept_info = [v for v in graph.value_info if v.name not in self.changed_types]
        del graph.value_info[:]
        graph.value_info.extend(kept_info)

    def _replace_nodes(self, nodes: list[onnx.NodeProto]) -> None:
        copies = [onnx.NodeProto() for _ in nodes]
        for c, n in zip(copies, nodes):
            c.CopyFrom(n)
        del self.graph.node[:]
        self.graph.node.extend(copies)

    def _drop_dead(self, nodes: list[onnx.NodeProto], op_types: set[str]) -> list[onnx.NodeProto]:
        return live_nodes(nodes, {o.name for o in self.graph.output}, op_types)

    def _drop_identities(self, ids: set[int], graph_outputs: set[str]) -> None:
        """Drop the Identity nodes in ``ids`` whose output is no graph output, rewiring their readers."""
        alias: dict[str, str] = {}
        kept = []
        for node in self.graph.node:
            if id(node) in ids and node.output[0] not in graph_outputs:
                alias[node.output[0]] = alias.get(node.input[0], node.input[0])
                continue
            kept.append(node)
        for node in kept:
            for i, name in enumerate(node.input):
                if name in alias:
                    node.input[i] = alias[name]
        self._replace_nodes(kept)


def _become(node: onnx.NodeProto, op_type: str, inputs: list[str]) -> None:
    node.op_type = op_type
    node.domain = ""
    del node.input[:]
    node.input.extend(inputs)
    del node.attribute[:]


def _main_op(nodes: list[onnx.NodeProto]) -> str:
    ops = [n.op_type for n in nodes if n.op_type not in ("DequantizeLinear", "QuantizeLinear")]
    return " + ".join(ops)
