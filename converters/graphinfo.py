"""Read-only facts about an ONNX graph: its real inputs, its compressible weights, its score output.

Everything here works on the ORIGINAL ModelProto (no normalisation needed), so ``inspect``,
``validate`` and the importer agree on what "the compressible weights" of a model are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_admm.converters.optable import WEIGHT_INPUTS
from onnx_admm.converters.shapes import dim_value, inferred_types

logger = logging.getLogger(__name__)

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


@dataclass(frozen=True)
class InputSpec:
    """A graph input that the user must feed (initializers listed as inputs are excluded)."""

    name: str
    dtype: np.dtype
    # Each dim is an int, a symbolic name (str), or None when unknown.
    shape: tuple[int | str | None, ...] | None


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


@dataclass(frozen=True)
class ScoreOutput:
    """The tensor the loss and the agreement metric use (see ``find_score_output``)."""

    name: str
    # Its position among the graph outputs; None for a tensor inside the graph (one feeding an ArgMax
    # whose integer ids are the graph output, or one named by the override), which the importer and
    # ``validate`` expose as an extra output of a copy.
    index: int | None
    # "logits", "probabilities" (a Softmax made it), "log_probabilities" (a LogSoftmax made it):
    # class scores on the last axis ([N, C], [N, T, C], [T, N, C]), or on axis 1 for rank >= 4 maps.
    # "binary_probabilities" (a Sigmoid made it) / "binary_logits" (named by the override, one channel,
    # no Sigmoid): every element is a probability of its own, thresholded at 0.5.
    kind: str
    # The integer graph output (argmax ids) this float tensor was found through, if any.
    feeds: str | None = None

    @property
    def internal(self) -> bool:
        return self.index is None


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
    specs = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        ttype = value.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(ttype.elem_type)) if ttype.elem_type else np.dtype("float32")
        shape = None
        if ttype.HasField("shape"):
            shape = tuple(dim_value(d) for d in ttype.shape.dim)
        specs.append(InputSpec(value.name, dtype, shape))
    return specs


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


# Ops a score passes through unchanged in meaning, walking back from an output to its producer.
_SCORE_PASSTHROUGH = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Transpose", "If")
_CATEGORICAL = ("logits", "probabilities", "log_probabilities")


def class_axis(rank: int) -> int:
    """The class axis of a categorical score of this rank: last for [N, C], [N, T, C] and [T, N, C],
    1 for rank >= 4 maps ([N, C, H, W], ONNX's channel-first layout)."""
    return 1 if rank >= 4 else rank - 1


def _branch_producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Producers of the top graph and of every If's then-branch (at any depth), so the walks below see
    through an If to what computes its output (both branches of a model that chooses a network by an
    input compute the same kind of score)."""
    producers = dict(GraphView(model).producers)
    stack = [n for n in model.graph.node if n.op_type == "If"]
    while stack:
        node = stack.pop()
        branch = if_branch(node)
        producers.update({out: inner for inner in branch.node for out in inner.output if out})
        stack.extend(inner for inner in branch.node if inner.op_type == "If")
    return producers


def _through(node: onnx.NodeProto, name: str) -> str:
    """The tensor a walk back from ``name`` goes on to: an If's then-branch output, else the first input."""
    if node.op_type == "If":
        return if_branch(node).output[list(node.output).index(name)].name
    return node.input[0]


def _score_kind(name: str, producers: dict[str, onnx.NodeProto], rank: int | None) -> str:
    """What made ``name``: a Softmax/LogSoftmax over the class axis, a Sigmoid, or neither (logits)."""
    seen = set()
    while name in producers and name not in seen:
        seen.add(name)
        node = producers[name]
        if node.op_type in ("Softmax", "LogSoftmax"):
            axis = int(node_attr(node, "axis", -1))
            # A softmax over another axis (attention weights, a channel-last map) is not over the classes.
            if rank is not None and rank >= 2 and axis % rank != class_axis(rank):
                return "logits"
            return "probabilities" if node.op_type == "Softmax" else "log_probabilities"
        if node.op_type == "Sigmoid":
            return "binary_probabilities"
        if node.op_type not in _SCORE_PASSTHROUGH:
            break
        name = _through(node, name)
    return "logits"


def _made_by_a_linear_head(name: str, producers: dict[str, onnx.NodeProto]) -> bool:
    """Whether a MatMul/Gemm (+ bias Add) computes ``name``: a classifier head, not a Concat of a
    detector's boxes and scores."""
    seen = set()
    while name in producers and name not in seen:
        seen.add(name)
        node = producers[name]
        if node.op_type in ("MatMul", "Gemm"):
            return True
        if node.op_type not in _SCORE_PASSTHROUGH + ("Add",):
            return False
        name = _through(node, name)
    return False


def _qualifies(dims: tuple | None, kind: str, linear_head: bool = True) -> int | None:
    """The tier at which a float tensor is a score (1 wins over 2 over 3), or None.

    1: [N, C >= 2]; 2: made by a Softmax/LogSoftmax/Sigmoid (sequences, maps, [N, 1] probabilities);
    3: [N, T, C] or [T, N, C] logits of a linear head.
    """
    if dims is None:
        return None
    rank, last = len(dims), dims[-1] if dims else None
    if kind.startswith("binary"):
        return 2 if rank >= 2 else None
    if rank == 2 and not (isinstance(last, int) and last < 2):
        return 1
    if kind != "logits" and rank >= 3:
        return 2
    if rank == 3 and not (isinstance(last, int) and last < 2) and linear_head:
        return 3
    return None


def _argmax_source(name: str, producers: dict[str, onnx.NodeProto], types: dict) -> str | None:
    """The float tensor whose ArgMax (or TopK indices) over the class axis an integer output is."""
    seen = set()
    while name in producers and name not in seen:
        seen.add(name)
        node = producers[name]
        if node.op_type in ("ArgMax", "TopK") and (node.op_type == "ArgMax" or list(node.output).index(name) == 1):
            source = node.input[0]
            elem, dims = types.get(source, (None, None))
            if elem not in FLOAT_TYPES or dims is None or len(dims) < 2:
                return None
            axis = int(node_attr(node, "axis", -1 if node.op_type == "TopK" else 0))
            return source if axis % len(dims) == class_axis(len(dims)) else None
        if node.op_type not in _SCORE_PASSTHROUGH:
            return None
        name = _through(node, name)
    return None


def find_score_output(model: onnx.ModelProto, override: str | None = None) -> ScoreOutput | None:
    """The tensor the loss and the agreement metric use, or None (the loss is then MSE on every float output).

    In order: the first float output shaped [N, C >= 2]; else the first made by a Softmax/LogSoftmax
    over its class axis (sequences, maps) or a Sigmoid (per-element probabilities); else the first
    [N, T, C] / [T, N, C] float output a MatMul/Gemm head computes (per-position logits); else, when the outputs are integer ids,
    the float tensor their ArgMax reads. ``override`` names a graph output or any tensor a node computes.
    """
    producers = _branch_producers(model)
    outputs = list(model.graph.output)
    names = [o.name for o in outputs]
    declared = {o.name: (o.type.tensor_type.elem_type,
                         tuple(dim_value(d) for d in o.type.tensor_type.shape.dim)
                         if o.type.tensor_type.HasField("shape") else None) for o in outputs}
    inferred: dict = {}

    def types() -> dict:
        if not inferred:
            inferred.update(inferred_types(model))
            inferred.update({k: v for k, v in declared.items() if v[1] is not None})
        return inferred

    if override is not None:
        if override in names:
            elem, dims = declared[override]
            if dims is None:
                elem, dims = types().get(override, (elem, None))
            index = names.index(override)
        elif override in producers:
            elem, dims = types().get(override, (None, None))
            index = None
        else:
            from onnx_admm.converters.errors import UserError

            raise UserError(f"output {override!r} is neither a graph output nor a tensor a node computes; "
                            f"choose one of the graph outputs {names} or an inner tensor by name")
        if elem not in FLOAT_TYPES and elem is not None:
            from onnx_admm.converters.errors import UserError

            raise UserError(f"score tensor {override!r} is not a float tensor; name the float scores it is "
                            "computed from")
        rank = len(dims) if dims is not None else None
        kind = _score_kind(override, producers, rank)
        if kind == "logits" and dims is not None and rank >= 2 and dims[class_axis(rank)] == 1:
            kind = "binary_logits"  # one channel: its own probability per element, not a softmax over one class
        return ScoreOutput(override, index, kind)
    best: tuple[int, int, str] | None = None
    for index, value in enumerate(outputs):
        elem, dims = declared[value.name]
        if elem not in FLOAT_TYPES:
            continue
        if dims is None:
            dims = types().get(value.name, (elem, None))[1]
        kind = _score_kind(value.name, producers, len(dims) if dims is not None else None)
        tier = _qualifies(dims, kind, _made_by_a_linear_head(value.name, producers))
        if tier is not None and (best is None or tier < best[0]):
            best = (tier, index, kind)
    if best is not None:
        return ScoreOutput(names[best[1]], best[1], best[2])
    for value in outputs:
        if declared[value.name][0] in FLOAT_TYPES:
            continue
        source = _argmax_source(value.name, producers, types())
        if source is not None:
            return ScoreOutput(source, None, _score_kind(source, producers, len(types()[source][1])), feeds=value.name)
    return None


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
