"""Read-only facts about an ONNX graph: its real inputs, its compressible weights, its producers and consumers.

Everything here works on the ORIGINAL ModelProto (no normalisation needed), so ``inspect``,
``validate`` and the importer agree on what "the compressible weights" of a model are.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_admm.converters.optable import TRAINABLE_CONSUMERS, WEIGHT_INPUTS
from onnx_admm.converters.shapes import dim_value

logger = logging.getLogger(__name__)

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


@dataclass(frozen=True)
class InputSpec:
    """A graph input that the user must feed (initializers listed as inputs are excluded)."""

    name: str
    dtype: np.dtype
    # Each dim is an int, a symbolic name (str), or None when unknown.
    shape: tuple[int | str | None, ...] | None
    # NaN marks a missing value here: every node reading the input is an ai.onnx.ml Imputer replacing NaN
    # (skl2onnx's SimpleImputer), so data may hold NaN (not infinities).
    imputes_nan: bool = False


@dataclass(frozen=True)
class Consumer:
    """One use of a tensor: node ``node`` (see ``node_label``) reads it at ``input_index``."""

    node: str
    op_type: str
    input_index: int


@dataclass(frozen=True)
class TensorSource:
    """Where a constant tensor lives in the model."""

    name: str
    location: str  # "initializer" | "constant" | "sparse_initializer"


@dataclass(frozen=True)
class WeightInfo:
    """A compressible weight: a constant tensor read as the weight of Conv/ConvTranspose/Gemm/MatMul/Gather,
    or as W or R of LSTM/GRU/RNN."""

    name: str
    op_type: str
    shape: tuple[int, ...]
    location: str
    consumers: tuple[Consumer, ...] = field(default_factory=tuple)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


def node_attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    """The value of attribute ``name`` of ``node``, or ``default`` when the node does not set it."""
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def node_label(node: onnx.NodeProto, index: int) -> str:
    """A stable label for a node: its name, or one made from its op type and position when nameless.

    The normalize pass names nameless nodes with the same rule, so labels computed on the original
    graph match the module names of the imported copy.
    """
    return node.name or f"{node.op_type}_{index}_unnamed"


def fresh_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base2``, ``base3`` ... : the first not in ``taken``."""
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}{k}"
    return name


def tensor_names(model: onnx.ModelProto) -> set[str]:
    """Every tensor name the graph uses: initializers, sparse initializers, node outputs, inputs, outputs, value_info."""
    graph = model.graph
    return (
        {t.name for t in graph.initializer}
        | {s.values.name for s in graph.sparse_initializer}
        | {o for n in graph.node for o in n.output}
        | {v.name for v in (*graph.input, *graph.output, *graph.value_info)}
    )


def constant_sources(model: onnx.ModelProto) -> dict[str, TensorSource]:
    """All constant tensors of the main graph by name: initializers, sparse initializers, Constant outputs."""
    graph = model.graph
    sources = {t.name: TensorSource(t.name, "initializer") for t in graph.initializer}
    for sparse in graph.sparse_initializer:
        sources[sparse.values.name] = TensorSource(sparse.values.name, "sparse_initializer")
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            sources[node.output[0]] = TensorSource(node.output[0], "constant")
    return sources


def identity_aliases(model: onnx.ModelProto) -> dict[str, str]:
    """Map each Identity output to the tensor it ultimately copies (chains followed)."""
    direct = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity" and n.input}
    resolved = {}
    for out in direct:
        src, seen = direct[out], {out}
        while src in direct and src not in seen:
            seen.add(src)
            src = direct[src]
        resolved[out] = src
    return resolved


def resolve(name: str, aliases: dict[str, str]) -> str:
    return aliases.get(name, name)


def graph_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller feeds: graph inputs that are not initializers."""
    inits = {t.name for t in model.graph.initializer}
    # Who reads each input, only where some node imputes NaN (the index costs a pass over a large graph).
    view = GraphView(model) if any(map(_imputes_nan, model.graph.node)) else None
    specs = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        ttype = value.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(ttype.elem_type)) if ttype.elem_type else np.dtype("float32")
        shape = None
        if ttype.HasField("shape"):
            shape = tuple(dim_value(d) for d in ttype.shape.dim)
        readers = [view.nodes[i] for i, _ in view.readers.get(value.name, [])] if view else []
        specs.append(InputSpec(value.name, dtype, shape, bool(readers) and all(map(_imputes_nan, readers))))
    return specs


def _imputes_nan(node: onnx.NodeProto) -> bool:
    """Whether ``node`` is an ai.onnx.ml Imputer that replaces NaN (its float form's usual replaced value)."""
    if node.domain != "ai.onnx.ml" or node.op_type != "Imputer":
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return bool(attrs.get("imputed_value_floats")) and math.isnan(attrs.get("replaced_value_float", 0.0))


def tensor_shape_and_type(model: onnx.ModelProto, source: TensorSource) -> tuple[tuple[int, ...], int]:
    """(shape, ONNX elem type) of a constant tensor, wherever it is stored."""
    graph = model.graph
    if source.location == "initializer":
        t = next(t for t in graph.initializer if t.name == source.name)
        return tuple(t.dims), t.data_type
    if source.location == "sparse_initializer":
        s = next(s for s in graph.sparse_initializer if s.values.name == source.name)
        return tuple(s.dims), s.values.data_type
    node = next(n for n in graph.node if n.op_type == "Constant" and n.output and n.output[0] == source.name)
    for attr in node.attribute:
        if attr.name == "value":
            return tuple(attr.t.dims), attr.t.data_type
        if attr.name == "sparse_value":
            return tuple(attr.sparse_tensor.dims), attr.sparse_tensor.values.data_type
        if attr.name == "value_floats":
            return (len(attr.floats),), onnx.TensorProto.FLOAT
        if attr.name == "value_float":
            return (), onnx.TensorProto.FLOAT
    return (), onnx.TensorProto.UNDEFINED


def compressible_weights(model: onnx.ModelProto) -> list[WeightInfo]:
    """The float constant tensors used as weights by Conv, ConvTranspose, Gemm, MatMul, Gather, LSTM/GRU/RNN.

    Identity chains are followed back to the constant (exporters share tensors that way). A tensor used
    by several weight consumers is listed once with all of them. Scalars and 1-D tensors of MatMul are
    skipped: they are not weight matrices.
    """
    sources = constant_sources(model)
    aliases = identity_aliases(model)
    found: dict[str, tuple[str, list[Consumer]]] = {}
    for index, node in enumerate(model.graph.node):
        if node.domain not in ("", "ai.onnx") or node.op_type not in WEIGHT_INPUTS:
            continue
        for i in WEIGHT_INPUTS[node.op_type]:
            if i >= len(node.input) or not node.input[i]:
                continue
            src_name = resolve(node.input[i], aliases)
            if src_name not in sources:
                continue
            if node.op_type == "MatMul" and i == 0 and resolve(node.input[1], aliases) in sources:
                continue  # constant folding leftovers: both operands constant, not a layer
            entry = found.setdefault(src_name, (node.op_type, []))
            entry[1].append(Consumer(node_label(node, index), node.op_type, i))
    weights = []
    for name, (op_type, consumers) in found.items():
        shape, dtype = tensor_shape_and_type(model, sources[name])
        if dtype not in FLOAT_TYPES or len(shape) < 2:
            continue
        weights.append(WeightInfo(name, op_type, shape, sources[name].location, tuple(consumers)))
    return weights


class GraphView:
    """One index of a graph that the analyses share instead of each rebuilding its own: the nodes and
    their labels (``node_label``), the node that produces each tensor (and its index), who reads each
    tensor, and the Identity aliases (``identity_aliases``). Built once per graph; the graph must not
    change under it.

    ``readers[name]`` lists (node index, input index) in graph order; a subgraph (If branch, Loop/Scan
    body) reading an outer name counts as a read by its node, at input index -1.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.nodes = list(model.graph.node)
        self.labels = [node_label(n, i) for i, n in enumerate(self.nodes)]
        self.by_label = dict(zip(self.labels, self.nodes))
        self.producer_index = {out: i for i, node in enumerate(self.nodes) for out in node.output if out}
        self.producers = {out: self.nodes[i] for out, i in self.producer_index.items()}
        self.readers: dict[str, list[tuple[int, int]]] = {}
        for i, node in enumerate(self.nodes):
            reads = list(enumerate(node.input)) + [(-1, name) for name in sorted(subgraph_reads(node))]
            for k, name in reads:
                if name:
                    self.readers.setdefault(name, []).append((i, k))
        self._aliases: dict[str, str] | None = None

    @property
    def aliases(self) -> dict[str, str]:
        if self._aliases is None:
            self._aliases = identity_aliases(self.model)
        return self._aliases


# Ops whose output depends on their input's shape only: a tensor computed from them (a causal mask's
# Expand of ones to the sequence length) does not change when a weight does.
SHAPE_ONLY = frozenset({"Shape", "Size"})


def weight_dependent(model: onnx.ModelProto) -> set[str]:
    """The tensors whose value changes when a trainable weight does: the outputs of a node that reads a float
    initializer of one or more dims through a trainable op (``optable.TRAINABLE_CONSUMERS``), and everything
    computed from them except through ``SHAPE_ONLY`` ops. The graph is in topological order, as ONNX requires."""
    graph = model.graph
    weights = {t.name for t in graph.initializer if t.data_type in FLOAT_TYPES and len(t.dims) >= 1}
    dependent: set[str] = set()
    for node in graph.node:
        if node.op_type in SHAPE_ONLY:
            continue
        reads = [*node.input, *subgraph_reads(node)]
        if any(name in dependent for name in reads) or (
                node.op_type in TRAINABLE_CONSUMERS and any(name in weights for name in node.input)):
            dependent.update(name for name in node.output if name)
    return dependent


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The node's own subgraphs (If branches, Loop/Scan bodies), not those nested in them."""
    return [graph for attr in node.attribute
            for graph in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs))]


def if_branch(node: onnx.NodeProto, taken: bool = True) -> onnx.GraphProto:
    """An If node's then-branch (``taken``) or else-branch."""
    return next(a.g for a in node.attribute if a.name == ("then_branch" if taken else "else_branch"))


def live_nodes(nodes: list[onnx.NodeProto], outputs: set[str],
               removable: set[str] | None = None) -> list[onnx.NodeProto]:
    """``nodes`` without those (of the ``removable`` op types; None: any) whose outputs nothing reads, again
    until none is left: no later node, subgraph or graph output (``outputs``) reads them."""
    while True:
        read = {name for n in nodes for name in list(n.input) + sorted(subgraph_reads(n))} | outputs
        kept = [n for n in nodes if (removable is not None and n.op_type not in removable)
                or any(o in read for o in n.output if o)]
        if len(kept) == len(nodes):
            return kept
        nodes = kept


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Names the node's subgraphs (If branches, Loop/Scan bodies) read, at any depth."""
    names: set[str] = set()
    for graph in subgraphs(node):
        for inner in graph.node:
            names.update(n for n in inner.input if n)
            names.update(subgraph_reads(inner))
    return names


def tensor_value(model: onnx.ModelProto, source: TensorSource) -> np.ndarray:
    """The value of a constant tensor (external data must already be loaded)."""
    graph = model.graph
    if source.location == "initializer":
        return numpy_helper.to_array(next(t for t in graph.initializer if t.name == source.name))
    if source.location == "sparse_initializer":
        s = next(s for s in graph.sparse_initializer if s.values.name == source.name)
        return sparse_to_dense(s)
    node = next(n for n in graph.node if n.op_type == "Constant" and n.output and n.output[0] == source.name)
    value = constant_node_value(node)
    if value is None:
        raise ValueError(f"Constant {source.name!r} holds no numeric tensor")
    return value


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value a Constant node produces, whichever attribute holds it (None for strings)."""
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "sparse_value":
            return sparse_to_dense(attr.sparse_tensor)
        if attr.name == "value_float":
            return np.asarray(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.asarray(attr.floats, dtype=np.float32)
        if attr.name == "value_int":
            return np.asarray(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.asarray(attr.ints, dtype=np.int64)
    return None


def sparse_to_dense(sparse: onnx.SparseTensorProto) -> np.ndarray:
    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    dense = np.zeros(int(np.prod(sparse.dims)), dtype=values.dtype)
    if indices.ndim == 2:  # [NNZ, rank] coordinates
        indices = np.ravel_multi_index(tuple(indices.T), tuple(sparse.dims))
    dense[indices] = values
    return dense.reshape(tuple(sparse.dims))


def format_shape(shape: tuple[int | str | None, ...] | None) -> str:
    """An ``InputSpec`` shape as users write it: ``[N, 1, 28, 28]``; ``?`` for an unknown dim.

    A shape that is not declared at all reads ``[unknown shape]``.
    """
    if shape is None:
        return "[unknown shape]"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
