"""Weights stored through decoding nodes, and the normalize pass that folds them back into floats.

The quantized encoders of ``converters.writeback`` store a weight ``W`` as constants feeding small
decoding subgraphs whose output is named ``W``:

- ``DequantizeLinear(q, scale[, zero_point]) -> W`` (int8 / int4 / int2, per tensor or per axis, also
  with ``q`` in a sparse initializer);
- ``Gather(codebook, Cast(indices, to=INT64)) -> W`` (uint8 / uint4 / uint2 codebook indices).

A recurrent op's W / R / B, or a MatMul / Gemm weight, that nodes only moving entries compute from
constants alone (an exported LSTMCell's gate reordering; the query and key-value rows a dynamo-exported
cross-attention splits out of its packed ``in_proj_weight``, or TorchScript's slices of it at the width a Shape
reads) is found the same way (``_computed_weights``):
it imports and trains as the tensor it computes, and write-back replaces the computation with the trained
tensor.

:func:`weight_decoders` finds such subgraphs (every input a constant), :func:`decode` computes the float
tensor they produce, :func:`remove_decoders` deletes them with the constants only they read, and
:func:`fold_weight_decoders` -- a normalize pass -- puts the decoded floats back as initializers under the
weight's name, so a compressed model imports into onnx2torch and can be compressed again. Write-back
uses the same functions to replace a decoded weight of an already-compressed model.
:func:`stored_nbytes` counts the bytes a model file spends on each weight, decoders included.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from onnx_admm.converters.optable import DEFAULT_DOMAINS, RECURRENT_CONSTANT_INPUTS
from onnx_admm.converters.graphinfo import (GraphView, TensorSource, constant_sources, node_attr, resolve,
                                            subgraphs, tensor_value)
from onnx_admm.converters.shapes import inferred_types

logger = logging.getLogger(__name__)

_INDEX_TYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)


@dataclass(frozen=True)
class WeightDecoder:
    """A decoding subgraph fed only by constants, producing the tensor ``output``.

    ``nodes`` are positions in ``model.graph.node`` of the model it was found in (the decoding node last);
    ``inputs`` are the constant tensors those nodes read.
    """

    output: str
    op_type: str  # "DequantizeLinear", "Gather", or the last node computing a recurrent weight
    nodes: tuple[int, ...]
    inputs: tuple[str, ...]


def weight_decoders(model: onnx.ModelProto) -> dict[str, WeightDecoder]:
    """Every DequantizeLinear and codebook Gather of the main graph whose inputs are all constants.

    A Gather qualifies when its data is a 1-D constant (the codebook), it gathers along axis 0, and its
    indices are a constant or the output of a Cast to int32/int64 of a constant that nothing else reads
    (the Cast then belongs to the decoder). Outputs that are graph outputs are left alone.
    """
    graph = model.graph
    sources = constant_sources(model)
    graph_outputs = {o.name for o in graph.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    producers = {out: i for i, node in enumerate(graph.node) for out in node.output}
    found: dict[str, WeightDecoder] = {}
    for index, node in enumerate(graph.node):
        if node.domain not in DEFAULT_DOMAINS or len(node.output) != 1 or node.output[0] in graph_outputs:
            continue
        inputs = [name for name in node.input if name]
        if node.op_type == "DequantizeLinear" and inputs and all(name in sources for name in inputs):
            found[node.output[0]] = WeightDecoder(node.output[0], node.op_type, (index,), tuple(inputs))
        elif node.op_type == "Gather" and len(inputs) == 2 and inputs[0] in sources:
            if node_attr(node, "axis", 0) not in (0, -1):
                continue
            indices = inputs[1]
            if indices in sources:
                nodes, constants = (index,), tuple(inputs)
            else:
                cast_index = producers.get(indices)
                cast = graph.node[cast_index] if cast_index is not None else None
                if not (
                    cast is not None
                    and cast.op_type == "Cast"
                    and cast.domain in DEFAULT_DOMAINS
                    and len(cast.input) == 1
                    and cast.input[0] in sources
                    and node_attr(cast, "to", None) in _INDEX_TYPES
                    and readers.get(indices, 0) == 1
                ):
                    continue
                nodes, constants = (cast_index, index), (inputs[0], cast.input[0])
            # Checked last: reading the data tensor is the one costly step (an embedding table, say).
            if tensor_value(model, sources[inputs[0]]).ndim == 1:
                found[node.output[0]] = WeightDecoder(node.output[0], node.op_type, nodes, constants)
    found.update(_computed_weights(model, sources, producers, graph_outputs))
    return found


# The linear weight inputs whose computation from constants imports as a weight (the recurrent ones:
# RECURRENT_CONSTANT_INPUTS).
_LINEAR_WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {"MatMul": (1,), "Gemm": (1,)}


def _computed_weights(model: onnx.ModelProto, sources: dict[str, TensorSource], producers: dict[str, int],
                      graph_outputs: set[str]) -> dict[str, WeightDecoder]:
    """Recurrent and linear weights that nodes compute from constants alone (an LSTMCell exported without
    constant folding, often inside an If branch: Unsqueeze(Concat(Slice(W_ih, ...), ...)) reordering its gates;
    a dynamo-exported cross-attention: Transpose of each piece of Split(in_proj_weight), query and key-value
    rows).

    Such a weight imports as the constant it computes and trains; write-back stores the trained tensor under
    its name in place of the nodes, as for the other decoders. Every node on the weight's data path must only
    move entries (``_MOVES``; the positions a Slice or Reshape reads may be computed by any op). A recurrent
    weight's nodes must feed only its computation; a linear weight's may be shared (dynamo's Split of the packed
    weight into query, key and value rows feeds three): write-back keeps a node that something it does not
    replace still reads (``remove_decoders``).
    """
    graph = model.graph
    view = GraphView(model)
    readers = {name: {i for i, _ in reads} for name, reads in view.readers.items()}
    found: dict[str, WeightDecoder] = {}
    dims = None  # inferred shapes, for weights computed through Shape nodes
    linear_found: list[str] = []
    data: dict[str, frozenset[str]] = {}  # a linear weight's data constants
    for node in graph.node:
        if node.domain not in DEFAULT_DOMAINS:
            continue
        linear = node.op_type in _LINEAR_WEIGHT_INPUTS
        slots = _LINEAR_WEIGHT_INPUTS.get(node.op_type) or RECURRENT_CONSTANT_INPUTS.get(node.op_type, ())
        for slot in slots:
            name = node.input[slot] if slot < len(node.input) else ""
            if not name or name in sources or name in found or name in graph_outputs or name not in producers:
                continue
            if linear and resolve(name, view.aliases) in sources:
                continue  # an Identity of a constant: the constant itself is the weight, tied across its aliases
            closure = computed_from_constants(name, graph, sources, producers,
                                              moves=_LINEAR_MOVES if linear else _MOVES, shapes=linear)
            if closure is None:
                continue
            nodes, constants = closure.nodes, closure.constants
            if any(graph.node[i].op_type == "Shape" for i in nodes):
                dims = inferred_types(model) if dims is None else dims  # once for every such weight
                if not _static(model, WeightDecoder(name, graph.node[producers[name]].op_type, nodes, constants),
                               dims):
                    continue  # the weight follows a dynamic dim (a sequence length): it is computed at run time
            inner = {out for i in nodes for out in graph.node[i].output if out}
            if inner & graph_outputs or not linear and any(not readers.get(out, set()) <= set(nodes)
                                                            for out in inner - {name}):
                continue
            found[name] = WeightDecoder(name, graph.node[producers[name]].op_type, nodes, constants)
            if linear:
                linear_found.append(name)
                data[name] = closure.data
    # A linear weight whose entries come from a constant that something else reads too stays computed: a tied
    # embedding's Transpose for the output layer would train apart from the embedding and be stored twice.
    computing = {i for name in linear_found for i in found[name].nodes}
    for name in linear_found:
        if any(not readers.get(c, set()) <= computing for c in data[name]):
            del found[name]
    return found


def _static(model: onnx.ModelProto, decoder: WeightDecoder, dims: dict) -> bool:
    """Whether the weight ``decoder`` computes through Shape nodes is known: it has a shape for every Shape it
    reads, and the same values whatever size the dynamic dims take (two different ones tried)."""
    try:
        first, second = decode(model, decoder, fill=3, dims=dims), decode(model, decoder, fill=5, dims=dims)
    except Exception:  # noqa: BLE001 - onnx's reference evaluator raises its own errors on an impossible shape
        return False
    return first.shape == second.shape and bool(np.array_equal(first, second))


# Ops that only move or pick entries: a weight they compute has no more entries than its constants, so storing
# it as trained in their place never grows the file (a product of two factors would).
_MOVES = frozenset({"Slice", "Split", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Transpose", "Identity",
                    "Gather", "Cast"})
# Not Cast for a linear weight: storing an fp16 weight that a Cast widens as its float32 result would double it.
_LINEAR_MOVES = _MOVES - {"Cast"}


class Computation(NamedTuple):
    """How nodes compute a tensor from constants (``computed_from_constants``)."""

    nodes: tuple[int, ...]  # positions in the graph, in graph order
    constants: tuple[str, ...]  # every constant they read
    data: frozenset[str]  # the constants the tensor's entries come from (not a Slice's ends)


def computed_from_constants(name: str, graph: onnx.GraphProto, sources: dict[str, TensorSource],
                            producers: dict[str, int], moves: frozenset[str] | None = _MOVES,
                            shapes: bool = False) -> Computation | None:
    """How nodes compute ``name`` from constants, or None when something else feeds them (a graph input), a
    node holds a subgraph or is of another domain, or a node on the data path is not of ``moves`` (None: any
    op). The data path is what the entries of ``name`` come from: every input of a Concat, the first of the
    other moves; the rest (a Slice's ends, a Reshape's shape) may be computed by any op, as TorchScript
    computes a slice's end by an Add. With ``shapes``, off the data path a ``Shape`` node counts as a constant
    source too (TorchScript slices a cross-attention's packed weight at the query's width, read by Shape):
    ``decode`` evaluates it from inferred dims, and ``_computed_weights`` keeps it only where the weight does
    not depend on a dynamic one."""
    nodes: set[int] = set()
    constants: set[str] = set()
    data_constants: set[str] = set()
    stack = [(name, True)]
    while stack:
        current, data = stack.pop()
        if current in sources:
            constants.add(current)
            if data:
                data_constants.add(current)
            continue
        index = producers.get(current)
        if index is None:
            return None
        node = graph.node[index]
        if node.domain not in DEFAULT_DOMAINS or subgraphs(node) or (data and moves is not None
                                                                      and node.op_type not in moves):
            return None
        if index in nodes:
            continue
        nodes.add(index)
        if shapes and not data and node.op_type == "Shape":
            continue  # its value comes from the inferred dims (decode), not from its input
        data_inputs = len(node.input) if node.op_type == "Concat" else 1
        stack.extend((n, data and i < data_inputs) for i, n in enumerate(node.input) if n)
    return Computation(tuple(sorted(nodes)), tuple(sorted(constants)), frozenset(data_constants))


def decode(model: onnx.ModelProto, decoder: WeightDecoder, fill: int = 1, dims: dict | None = None) -> np.ndarray:
    """The tensor ``decoder`` produces, computed with onnx's reference implementation of its nodes; a Shape node
    among them gives its input's inferred dims (``dims``: ``shapes.inferred_types(model)``, computed when
    needed and not given), ``fill`` for each dynamic one."""
    sources = constant_sources(model)
    version = next((e.version for e in model.opset_import if e.domain in DEFAULT_DOMAINS), 0)
    values: dict[str, np.ndarray] = {}
    for index in decoder.nodes:
        node = model.graph.node[index]
        if node.op_type == "Shape" and node.input[0] not in sources and node.input[0] not in values:
            dims = inferred_types(model) if dims is None else dims
            known = dims.get(node.input[0], (0, None))[1]
            if known is None:
                raise ValueError(f"no inferred shape for {node.input[0]!r}, which Shape {node.name!r} reads")
            shape = [d if isinstance(d, int) and d >= 0 else fill for d in known]
            start, end = node_attr(node, "start", 0), node_attr(node, "end", len(shape))
            values[node.output[0]] = np.array(shape[start:end], np.int64)
            continue
        feeds = {
            name: values[name] if name in values else tensor_value(model, sources[name]) for name in node.input if name
        }
        outs = ReferenceEvaluator(node, opsets={"": version}).run(None, feeds)
        values.update((name, np.asarray(out)) for name, out in zip(node.output, outs) if name)
    return values[decoder.output]


def remove_decoders(model: onnx.ModelProto, decoders: Iterable[WeightDecoder]) -> None:
    """Delete the decoders' nodes, then every constant they read that nothing else reads any more.

    All ``decoders`` must come from one :func:`weight_decoders` call on ``model`` as it is now (node
    positions). Initializers, sparse initializers and Constant nodes are removed alike.
    """
    decoders = list(decoders)
    graph = model.graph
    dropped = {i for d in decoders for i in d.nodes}
    # A node another decoder shares (a Split of a packed weight, a slice's end) stays while a node that stays
    # reads it: back from the kept nodes, in reverse graph order.
    replaced = {d.output for d in decoders}  # an initializer of that name takes their place
    outputs = {i: set(graph.node[i].output) - replaced for i in dropped}
    read = {name for i, node in enumerate(graph.node) if i not in dropped for name in node.input}
    read |= {o.name for o in graph.output}
    for i in sorted(dropped, reverse=True):
        if outputs[i] & read:
            dropped.discard(i)
            read.update(graph.node[i].input)
    kept = [node for i, node in enumerate(graph.node) if i not in dropped]
    # A graph input's initializer is its default value, part of the graph's I/O: it stays (IR 3 files list
    # every initializer as an input).
    still_read = {name for node in kept for name in node.input} | {o.name for o in graph.output}
    still_read |= {value.name for value in graph.input}
    unused = {name for d in decoders for name in d.inputs} - still_read
    if unused:
        kept = [node for node in kept if not (node.op_type == "Constant" and node.output and node.output[0] in unused)]
        initializers = [t for t in graph.initializer if t.name not in unused]
        sparse = [s for s in graph.sparse_initializer if s.values.name not in unused]
        del graph.initializer[:]
        graph.initializer.extend(initializers)
        del graph.sparse_initializer[:]
        graph.sparse_initializer.extend(sparse)
    del graph.node[:]
    graph.node.extend(kept)


def fold_weight_decoders(model: onnx.ModelProto) -> bool:
    """Normalize pass: each weight decoder becomes a float initializer under its output name.

    Run it before the opset down-conversion (onnx2torch needs opset 17, where int4/int2 tensors do not
    exist). The decoded values are exactly what onnxruntime computes (float32 ``(q - zero_point) * scale``).
    """
    decoders = weight_decoders(model)
    if not decoders:
        return False
    shape_reads = any(model.graph.node[i].op_type == "Shape" for d in decoders.values() for i in d.nodes)
    dims = inferred_types(model) if shape_reads else None
    values = {name: decode(model, d, dims=dims) for name, d in decoders.items()}
    remove_decoders(model, decoders.values())
    model.graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in values.items())
    logger.debug("folded %d weight decoders: %s", len(values), sorted(values))
    return True


def decoded_view(model: onnx.ModelProto) -> tuple[onnx.ModelProto, set[str]]:
    """A copy of ``model`` whose weight decoders are float initializers, and the decoded names.

    Lets code that reads weights as constants (the weight map, inspect, validate's counts) see the
    weights of an already-compressed model; ``model`` itself is returned when it has no decoders.
    """
    decoders = weight_decoders(model)
    if not decoders:
        return model, set()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    fold_weight_decoders(copy)
    return copy, set(decoders)





# Bits per element of the packed sub-byte types; every other type stores whole numpy items.
_PACKED_BITS = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4, onnx.TensorProto.INT2: 2,
                onnx.TensorProto.UINT2: 2}


def integer_element_bits(elem_type: int) -> int | None:
    """Bits per element of an integer ONNX element type (int2 ... int64), None for any other."""
    if elem_type in _PACKED_BITS:
        return _PACKED_BITS[elem_type]
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    return 8 * dtype.itemsize if np.issubdtype(dtype, np.integer) else None


def _tensor_nbytes(tensor: onnx.TensorProto) -> int:
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    n = int(np.prod(tensor.dims)) if tensor.dims else 1
    if tensor.data_type in _PACKED_BITS:
        return -(-n * _PACKED_BITS[tensor.data_type] // 8)
    return n * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _sparse_nbytes(sparse: onnx.SparseTensorProto) -> int:
    return _tensor_nbytes(sparse.values) + _tensor_nbytes(sparse.indices)


def _constant_nbytes(model: onnx.ModelProto, source: TensorSource) -> int:
    graph, name, location = model.graph, source.name, source.location
    if location == "initializer":
        return _tensor_nbytes(next(t for t in graph.initializer if t.name == name))
    if location == "sparse_initializer":
        return _sparse_nbytes(next(s for s in graph.sparse_initializer if s.values.name == name))
    node = next(n for n in graph.node if n.op_type == "Constant" and n.output and n.output[0] == name)
    for attr in node.attribute:
        if attr.name == "value":
            return _tensor_nbytes(attr.t)
        if attr.name == "sparse_value":
            return _sparse_nbytes(attr.sparse_tensor)
    return tensor_value(model, source).nbytes  # value_float(s) / value_int(s) attributes


def stored_nbytes(model: onnx.ModelProto, names: Iterable[str]) -> dict[str, int]:
    """The raw bytes ``model`` spends on each weight of ``names`` (external data must be loaded).

    A plain or sparse constant counts its own data (a sparse one: values and indices); a weight made by a
    decoder counts every constant the decoder reads (integers + scale + zero point; indices + codebook).
    Names that are neither are left out. Names and protobuf framing are not counted: these are the bits
    of the values themselves, as the report's bits per weight states them.
    """
    sources = constant_sources(model)
    decoders = weight_decoders(model)
    out = {}
    for name in names:
        if name in decoders:
            parts = decoders[name].inputs
        elif name in sources:
            parts = (name,)
        else:
            continue
        out[name] = sum(_constant_nbytes(model, sources[part]) for part in parts)
    return out
