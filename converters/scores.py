"""The score output: which tensor of a graph the loss and the task metric read, and how (class scores over
an axis, per-element probabilities), found by walking back from the graph outputs to what computes them.

Everything here reads the ORIGINAL ModelProto, so ``inspect``, ``validate`` and the importer agree on it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import onnx

from onnx_admm.converters.errors import UserError
from onnx_admm.converters.graphinfo import FLOAT_TYPES, GraphView, if_branch, node_attr
from onnx_admm.converters.shapes import dim_value, inferred_types


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
    # The graph output this inner tensor was found through, if any: integer ids its ArgMax gives, or a
    # detector's Concat of boxes and these probabilities.
    feeds: str | None = None

    @property
    def internal(self) -> bool:
        return self.index is None



logger = logging.getLogger(__name__)

# Ops a score passes through unchanged in meaning, walking back from an output to its producer.
# A QuantizeLinear / DequantizeLinear pair of onnxruntime's QDQ format carries the probabilities it rounds.
_SCORE_PASSTHROUGH = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Transpose", "If",
                      "QuantizeLinear", "DequantizeLinear")
# Binary ops a walk back may cross by their computed operand (a bias Add, a scale Mul).
_ELEMENTWISE = ("Add", "Mul")


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


def _through(node: onnx.NodeProto, name: str, producers: dict[str, onnx.NodeProto]) -> str:
    """The tensor a walk back from ``name`` goes on to: an If's then-branch output; the computed operand of
    an elementwise op whose other operand is a constant (TorchScript writes a head's bias first,
    ``Add(bias, MatMul)``); else the first input."""
    if node.op_type == "If":
        return if_branch(node).output[list(node.output).index(name)].name
    if node.op_type in _ELEMENTWISE and len(node.input) == 2:
        def computed(tensor: str) -> bool:
            return tensor in producers and producers[tensor].op_type != "Constant"

        if not computed(node.input[0]) and computed(node.input[1]):
            return node.input[1]
    return node.input[0]


def _score_kind(name: str, producers: dict[str, onnx.NodeProto], rank: int | None) -> str:
    """What made ``name``: a Softmax/LogSoftmax over the class axis, a Sigmoid, or neither (logits)."""
    node = _producer(name, producers)
    if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
        axis = int(node_attr(node, "axis", -1))
        # A softmax over another axis (attention weights, a channel-last map) is not over the classes.
        if rank is not None and rank >= 2 and axis % rank != class_axis(rank):
            return "logits"
        return "probabilities" if node.op_type == "Softmax" else "log_probabilities"
    return "binary_probabilities" if node is not None and node.op_type == "Sigmoid" else "logits"


def _made_by_a_linear_head(name: str, producers: dict[str, onnx.NodeProto]) -> bool:
    """Whether a MatMul/Gemm (+ bias Add) computes ``name``: a classifier head, not a Concat of a
    detector's boxes and scores."""
    node = _producer(name, producers, _SCORE_PASSTHROUGH + ("Add",))
    return node is not None and node.op_type in ("MatMul", "Gemm")


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
    found = _producer(name, producers, reached=True)
    if found is None:
        return None
    node, out = found
    if node.op_type not in ("ArgMax", "TopK") or (node.op_type == "TopK" and list(node.output).index(out) != 1):
        return None
    source = node.input[0]
    elem, dims = types.get(source, (None, None))
    if elem not in FLOAT_TYPES or dims is None or len(dims) < 2:
        return None
    axis = int(node_attr(node, "axis", -1 if node.op_type == "TopK" else 0))
    return source if axis % len(dims) == class_axis(len(dims)) else None


def find_score_output(model: onnx.ModelProto, override: str | None = None) -> ScoreOutput | None:
    """The tensor the loss and the agreement metric use, or None (the loss is then MSE on every float output).

    In order (an L2-normalized output, an embedding, is none of them): the first float output shaped
    [N, C >= 2]; else the first made by a Softmax/LogSoftmax
    over its class axis (sequences, maps) or a Sigmoid (per-element probabilities); else the first
    [N, T, C] / [T, N, C] float output a MatMul/Gemm head computes (per-position logits); else, when the outputs are integer ids,
    the float tensor their ArgMax reads; else the largest Sigmoid output an output's Concat joins (a detector's
    probabilities beside its boxes). ``override`` names a graph output or any tensor a node computes.
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
            raise UserError(f"output {override!r} is neither a graph output nor a tensor a node computes; "
                            f"choose one of the graph outputs {names} or an inner tensor by name")
        if elem not in FLOAT_TYPES and elem is not None:
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
        if kind == "logits" and _l2_normalized(value.name, producers):
            continue  # an embedding: compared by its values (the outputs' R^2), not read as class scores
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
    for value in outputs:
        source = _joined_probabilities(value.name, producers, types())
        if source is not None:
            return ScoreOutput(source, None, "binary_probabilities", feeds=value.name)
    return None


# Ops between a vector's norm and the Div by it: the clamp against 0 (Clip, Max, Add of an eps), the
# broadcast back (Expand, Unsqueeze, Reshape) and casts.
_NORM_PASSTHROUGH = ("Clip", "Max", "Add", "Expand", "Unsqueeze", "Reshape", "Identity", "Cast")


def _l2_normalized(name: str, producers: dict[str, onnx.NodeProto]) -> bool:
    """Whether ``name`` is divided by its own L2 norm (``F.normalize``'s ReduceL2 / Clip / Expand / Div, a
    LpNormalization, a Sqrt of a sum of squares): an embedding, whose largest entry says nothing of a class."""
    node = _producer(name, producers)
    if node is None or node.op_type not in ("Div", "LpNormalization"):
        return False
    if node.op_type == "LpNormalization":
        return int(node_attr(node, "p", 2)) == 2
    stack, seen = [node.input[1]], set()
    while stack:
        tensor = stack.pop()
        if tensor in seen or tensor not in producers:
            continue
        seen.add(tensor)
        step = producers[tensor]
        if step.op_type in ("ReduceL2", "ReduceSumSquare"):
            return True
        if step.op_type == "Sqrt":
            inner = producers.get(step.input[0])
            return inner is not None and inner.op_type in ("ReduceSum", "ReduceSumSquare")
        if step.op_type in _NORM_PASSTHROUGH:
            stack.extend(t for t in (step.input if step.op_type in ("Max", "Add") else step.input[:1]) if t)
    return False


def _producer(name: str, producers: dict[str, onnx.NodeProto], through: tuple[str, ...] = _SCORE_PASSTHROUGH,
              reached: bool = False):
    """The first node back from ``name`` that is not of the ``through`` ops (None: a graph input or a
    constant); with ``reached``, (that node, its output the walk arrived by)."""
    seen = set()
    while name in producers and name not in seen:
        seen.add(name)
        node = producers[name]
        if node.op_type not in through:
            return (node, name) if reached else node
        name = _through(node, name, producers)
    return None


def _joined_probabilities(name: str, producers: dict[str, onnx.NodeProto], types: dict) -> str | None:
    """The largest Sigmoid output that the Concat computing ``name`` joins (through pass-through ops and
    Concats of Concats): a detector's class or objectness probabilities beside its boxes, YOLOv8's
    ``Concat(boxes, Sigmoid(classes))`` or YOLOX's per-level ``Concat(boxes, Sigmoid(objectness),
    Sigmoid(classes))``. Without it such a model has no score, so nothing measures its task and the gate's
    floor cannot fail a run that destroyed it; the probabilities' positive set can."""
    top = _producer(name, producers)
    if top is None or top.op_type != "Concat":
        return None
    found: list[tuple[int, str]] = []
    stack, seen = [top], set()
    while stack:
        concat = stack.pop(0)
        for tensor in concat.input:
            node = _producer(tensor, producers)
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type == "Concat":
                stack.append(node)
            elif node.op_type == "Sigmoid":
                elem, dims = types.get(node.output[0], (None, None))
                if elem in FLOAT_TYPES and dims is not None and len(dims) >= 2:
                    # Elements per sample where static: the widest probabilities (classes over objectness).
                    found.append((math.prod(d if isinstance(d, int) and d > 0 else 1 for d in dims[1:]),
                                  node.output[0]))
    # The largest; the first of equals.
    return max(found, key=lambda f: f[0])[1] if found else None


def other_probabilities(model: onnx.ModelProto, score: ScoreOutput | None) -> list[ScoreOutput]:
    """Per-element probabilities beside the score that the gate reads too: every other float output a Sigmoid
    makes (more than one element per sample), and the widest Sigmoid that another output's Concat joins (a
    detector's objectness beside its boxes, ``_joined_probabilities``). A model with a segmentation map and
    a detection head is measured on both: a destroyed head no longer hides behind an intact map."""
    if score is None:
        return []
    producers = _branch_producers(model)
    taken = {score.name, score.feeds}
    outputs = [(index, value) for index, value in enumerate(model.graph.output) if value.name not in taken]
    types = inferred_types(model) if outputs else {}  # shape inference only for a model with other outputs
    found: list[ScoreOutput] = []
    for index, value in outputs:
        elem, dims = types.get(value.name, (value.type.tensor_type.elem_type, None))
        if elem not in FLOAT_TYPES:
            continue
        rank = len(dims) if dims is not None else None
        if rank is not None and rank >= 2 and _score_kind(value.name, producers, rank) == "binary_probabilities":
            found.append(ScoreOutput(value.name, index, "binary_probabilities"))
            continue
        inner = _joined_probabilities(value.name, producers, types)
        if inner is not None and inner not in taken:
            found.append(ScoreOutput(inner, None, "binary_probabilities", feeds=value.name))
    return found


def score_of_a_cut(original: onnx.ModelProto, cut: onnx.ModelProto, trained: list[str]) -> ScoreOutput | None:
    """The score of a model whose trained part stops before some graph outputs (passed through).

    The original's own score where the trained part computes it; none where that score lies past the cut
    (a tensor before it, the first [N, C] among hidden units or a mask, means nothing as class scores, so
    the loss is the trained outputs' MSE to the original's); else the cut's own (a classifier's Softmax
    read by skl2onnx's ZipMap, whose output is no tensor).
    """
    wanted = find_score_output(original)
    if wanted is None:
        return find_score_output(cut)
    if wanted.name in trained:
        return replace(wanted, index=trained.index(wanted.name))
    logger.warning("the score output %r is computed past the part of the graph onnx-admm trains: training matches "
                   "the trained part's outputs instead (name one with [train] output to train on it)", wanted.name)
    return None
