"""A mask repeated once per head for several attention layers: each layer gets its own copy of the repeat
chain, so that each layer's heads form their own group (``converters.heads_mask`` follows one chain).

The dynamo exporter computes ``nn.TransformerEncoder``'s ``src_key_padding_mask`` repeated per head once
for the whole stack: an Expand (or Tile) with a constant count makes ``[N, H, 1, L]``, reshapes take it to
``[N*H, 1, L]`` and back to ``[N, H, 1, L]``, and every layer adds that one tensor to its scores. Left
shared, the copies join every layer's heads into one group (head h leaves every layer together), since
one count cannot lose different heads per layer. ``split_shared_repeats`` gives each consumer after the
first its own chain: the nodes from the repeat down to the tensor the layers add, with the shape pieces
those reshapes compute from the inputs' ``Shape`` (the Mul that makes ``N*H``, the Concats), copied with
fresh output names and constants of their own, which its layer's group edits. The layers' reshapes share
computed shapes too (every layer's Q, K and V views read one ``[N, H, L, head_dim]`` Concat, whose head
count the walk edits): a Concat of a shape that Reshapes of several layers read (a reader's layer: the
nearest layer with a constant weight behind its data) is copied alike for each layer after the first.
The first layer keeps the original nodes; nameless nodes are named by their label, so every node keeps
its label while the copies shift the indices.

A chain is split only where its last tensor is read by two or more elementwise ops, each adding it to
the output of a different MatMul of two computed tensors (the scores of different attention layers)
within ``SCORE_DEPTH`` producers, and where each computed shape input of the chain comes from ``Shape``
through ``SHAPE_OPS`` alone (one computed otherwise is left shared, and the layers stay one group). A
graph without such a chain is left as it is. The pass is a function of the graph alone: the analysis
(``converters.groups``) and the cut (``converters.cut``, which the written model goes through) apply it
alike and meet the same names; the proof of ``converters.heads`` checks each layer's group on the split
graph. Not split: a mask repeated to a count computed at run time (``converters.heads_mask`` does not
follow it), a chain that fans out before its last reshape, a stack whose layers the exporter gives
separate repeats (each already its own group).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_admm.converters.graphinfo import GraphView, constant_sources, fresh_name, tensor_names, tensor_value
from onnx_admm.converters.heads_mask import REPEATS
from onnx_admm.converters.optable import BROADCAST, LINEAR

__all__ = ["split_shared_repeats"]

# Ops that carry the repeated copies (input 0) on towards the scores without mixing them.
PASSES = ("Reshape", "Unsqueeze", "Squeeze", "Transpose", "Cast", "Identity", "Flatten")
# Ops of a computed shape or count (a Concat of pieces, the batch times H) copied with the chain.
SHAPE_OPS = ("Concat", "Reshape", "Unsqueeze", "Squeeze", "Cast", "Identity", "Mul", "Add", "Sub", "Div",
             "Gather", "Slice")
# How far back from a consumer of the chain the scores' MatMul is looked for (a scale Mul, a Where).
SCORE_DEPTH = 4


@dataclasses.dataclass
class _Copy:
    """Nodes (original indices, in graph order) copied for ``consumers``, which then read the copy of
    ``tensor`` instead."""

    nodes: list[int]
    consumers: list[int]
    tensor: str


def split_shared_repeats(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each repeat chain that several attention layers share copied once per layer after
    the first (and each computed shape that the layers' Reshapes share, once per layer after the first);
    the same ``model`` (not a copy) when no chain is shared."""
    view = GraphView(model)
    sources = constant_sources(model)
    copies = [c for i in range(len(view.nodes)) for c in _shared_chain(view, sources, i)]
    if not copies:
        return model
    chained = {k for c in copies for k in c.nodes}
    copies += [c for i in range(len(view.nodes)) if i not in chained for c in _shared_shape(view, sources, i)]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    for i, node in enumerate(graph.node):
        node.name = view.labels[i]  # labels of nameless nodes follow their index, which the copies shift
    taken = tensor_names(out) | {n.name for n in graph.node}
    before: dict[int, list[onnx.NodeProto]] = {}  # original index of a consumer -> the copies it reads
    for copy in copies:
        renamed: dict[str, str] = {}
        for k in copy.nodes:
            node = onnx.NodeProto()
            node.CopyFrom(graph.node[k])
            node.name = _take(node.name, taken)
            for x, name in enumerate(node.input):
                if name in renamed:
                    node.input[x] = renamed[name]
                elif name in sources:  # a constant of its own: the walk edits one layer's counts
                    own = renamed[name] = node.input[x] = _take(name, taken)
                    value = np.asarray(tensor_value(model, sources[name]))
                    graph.initializer.append(numpy_helper.from_array(value, own))
            for x, name in enumerate(node.output):
                node.output[x] = renamed[name] = _take(name, taken)
            before.setdefault(copy.consumers[0], []).append(node)
        for k in copy.consumers:
            target = graph.node[k]
            for x, name in enumerate(target.input):
                if name == copy.tensor:
                    target.input[x] = renamed[name]
    nodes = []
    for i, node in enumerate(graph.node):
        nodes += before.get(i, [])
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return out


def _take(base: str, taken: set[str]) -> str:
    """A fresh name for a copy of ``base`` (``base_own``, ``base_own2``, ...), taken."""
    name = fresh_name(f"{base}_own", taken)
    taken.add(name)
    return name


def _shared_chain(view: GraphView, sources: dict, i: int) -> list[_Copy]:
    """One copy per consumer of the chain that starts at node ``i`` when it is a repeat with a constant
    count whose copies reach, through ``PASSES``, a tensor that the scores of several attention layers
    add; else none."""
    node = view.nodes[i]
    if node.op_type not in REPEATS or len(node.input) < 2 or node.input[1] not in sources:
        return []
    if node.input[0] in sources or not (np.asarray(tensor_value(view.model, sources[node.input[1]])) > 1).any():
        return []
    outputs = {o.name for o in view.model.graph.output}
    chain, tensor = [i], node.output[0]
    while tensor not in outputs:
        readers = view.readers.get(tensor, [])
        if len(readers) != 1 or readers[0][1] != 0 or view.nodes[readers[0][0]].op_type not in PASSES:
            break
        chain.append(readers[0][0])
        tensor = view.nodes[readers[0][0]].output[0]
    consumers = sorted({k for k, _ in view.readers.get(tensor, [])})
    if tensor in outputs or len(consumers) < 2 or any(x < 0 for _, x in view.readers[tensor]):
        return []
    if any(view.nodes[k].op_type not in BROADCAST for k in consumers):
        return []
    scores = [_scores(view, sources, k, tensor) for k in consumers]
    if None in scores or len(set(scores)) < len(scores):
        return []
    shapes = _shape_nodes(view, sources, chain)
    if shapes is None or any(o in outputs for k in chain + shapes for o in view.nodes[k].output):
        return []
    return [_Copy(sorted(chain + shapes), [k], tensor) for k in consumers[1:]]


def _shared_shape(view: GraphView, sources: dict, i: int) -> list[_Copy]:
    """One copy per layer after the first of node ``i``'s output when it is a shape that a Concat
    computes (through ``SHAPE_OPS`` from ``Shape``) and that only Reshapes read, of several layers (each
    reader's layer: the projection behind its data): every layer's Q, K and V views read one
    ``[N, H, L, head_dim]``, whose head count each layer's group edits in its own copy."""
    node = view.nodes[i]
    readers = view.readers.get(node.output[0], []) if node.op_type == "Concat" else []
    if any(x != 1 or view.nodes[k].op_type != "Reshape" for k, x in readers):
        return []
    layers: dict[int | None, list[int]] = {}
    for k, _ in readers:
        layers.setdefault(_projection_behind(view, sources, view.nodes[k].input[0]), []).append(k)
    shapes = _shape_nodes(view, sources, [i], first=0)
    if len(layers) < 2 or shapes is None or node.output[0] in {o.name for o in view.model.graph.output}:
        return []
    return [_Copy(sorted({i, *shapes}), sorted(ks), node.output[0]) for ks in list(layers.values())[1:]]


def _projection_behind(view: GraphView, sources: dict, name: str) -> int | None:
    """The nearest node with a constant weight (``LINEAR``) that tensor ``name`` is computed from, not
    through ``Shape``; None where there is none (a branch from a graph input)."""
    front, seen = [name], set()
    while front:
        nxt = []
        for tensor in front:
            p = view.producer_index.get(tensor)
            if p is None or p in seen or view.nodes[p].op_type == "Shape":
                continue
            seen.add(p)
            node = view.nodes[p]
            if node.op_type in LINEAR and any(x in sources for x in node.input[1:]):
                return p
            nxt += [x for x in node.input if x and x not in sources]
        front = nxt
    return None


def _scores(view: GraphView, sources: dict, k: int, mask: str) -> int | None:
    """The MatMul of two computed tensors that node ``k``'s other operands come from, within
    ``SCORE_DEPTH`` producers and before any layer with a constant weight; None where there is none."""
    front = [x for x in view.nodes[k].input if x and x != mask and x not in sources]
    for _ in range(SCORE_DEPTH):
        nxt = []
        for name in front:
            p = view.producer_index.get(name)
            if p is None:
                continue
            node = view.nodes[p]
            computed = [x for x in node.input if x and x not in sources]
            if node.op_type == "MatMul" and len(computed) == 2:
                return p
            if node.op_type not in LINEAR or len(computed) == len(node.input):
                nxt += computed
        front = nxt
    return None


def _shape_nodes(view: GraphView, sources: dict, chain: list[int], first: int = 1) -> list[int] | None:
    """The nodes that compute the chain's other inputs (shapes, counts) from ``Shape`` outputs, graph
    inputs and constants through ``SHAPE_OPS``, in graph order; None where another op computes one."""
    found: set[int] = set()
    stack = [x for k in chain for x in view.nodes[k].input[first:] if x and x not in sources]
    while stack:
        p = view.producer_index.get(stack.pop())
        if p is None or p in found or view.nodes[p].op_type == "Shape":
            continue
        if view.nodes[p].op_type not in SHAPE_OPS:
            return None
        found.add(p)
        stack += [x for x in view.nodes[p].input if x and x not in sources]
    return sorted(found)
