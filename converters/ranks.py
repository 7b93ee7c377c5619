"""Tell onnx2torch the rank of tensors that ONNX shape inference leaves without one.

onnx2torch picks the torch layer of BatchNormalization, InstanceNormalization, MaxPool, AveragePool
and GlobalAveragePool from the rank of their input's inferred shape (``BatchNorm2d`` for rank 4 ...), and fails ("spatial rank == -2")
when inference gives none: after a Squeeze without axes, an Unsqueeze or Reshape with computed axes or
shape, or ops inference does not know. The rank usually still follows from the graph itself:

- forward from tensors whose rank is known: elementwise and normalization ops keep the rank, a
  broadcast takes the largest, Conv outputs have their weight's rank, pools len(kernel_shape) + 2,
  Flatten and Gemm 2, Transpose len(perm), Unsqueeze adds its constant axes, Reshape takes its constant
  shape's length;
- backward from consumers: a rank-keeping op's input has its output's rank, a Conv's or a pool's input
  the rank its weight or kernel implies, a broadcast input the output's rank when every other input
  has fewer dims.

``annotate_unknown_ranks`` runs both to a fixed point and writes a ``value_info`` (rank known, dims
unknown) for the input of every rank-dependent node that lacked one. When the rank still cannot be
told, it raises a one-line ``UserError`` naming the node.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_admm.converters.errors import UserError
from onnx_admm.converters.graphinfo import node_attr, node_label
from onnx_admm.converters.optable import BROADCAST, KERNEL_POOLS, UNARY
from onnx_admm.converters.shapes import inferred_types

logger = logging.getLogger(__name__)

# Ops whose onnx2torch converter reads the rank of input 0 from its inferred shape (GlobalAveragePool
# would silently average over no axis without it).
RANK_DEPENDENT = frozenset({"BatchNormalization", "InstanceNormalization", "MaxPool", "AveragePool", "GlobalAveragePool"})
# Ops whose output 0 has the rank of input 0.
_KEEP_RANK = UNARY | {
    "BatchNormalization", "InstanceNormalization", "GroupNormalization", "LayerNormalization", "LRN",
    "Softmax", "LogSoftmax", "Hardmax", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "Resize", "Upsample",
}


def _implied_input_rank(node: onnx.NodeProto, inits: dict[str, np.ndarray]) -> int | None:
    """The rank input 0 must have whatever the graph computes before it (Conv weight, pool kernel)."""
    if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1 and node.input[1] in inits:
        return inits[node.input[1]].ndim
    if node.op_type in KERNEL_POOLS and node_attr(node, "kernel_shape") is not None:
        return len(node_attr(node, "kernel_shape")) + 2
    return None


def _forward(node: onnx.NodeProto, ranks: dict[str, int], inits: dict[str, np.ndarray]) -> int | None:
    op, known = node.op_type, [ranks.get(name) if name else None for name in node.input]
    if op in _KEEP_RANK:
        return known[0] if known else None
    if op in BROADCAST:
        return max(known) if known and None not in known else None
    if op in ("Conv", "ConvTranspose") or op in KERNEL_POOLS:
        return _implied_input_rank(node, inits)
    if op in ("Flatten", "Gemm"):
        return 2
    if op == "Transpose" and node_attr(node, "perm") is not None:
        return len(node_attr(node, "perm"))
    if op == "Unsqueeze" and known and known[0] is not None:
        axes = node_attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1] in inits:
            axes = inits[node.input[1]].reshape(-1).tolist()
        return known[0] + len(axes) if axes is not None else None
    if op == "Reshape" and len(node.input) > 1 and node.input[1] in inits:
        return int(inits[node.input[1]].size)
    return None


def _backward(node: onnx.NodeProto, ranks: dict[str, int], inits: dict[str, np.ndarray]) -> dict[str, int]:
    """Ranks the output (or the op itself) implies for inputs that have none yet."""
    x = node.input[0] if node.input else ""
    if not x or x in ranks:
        return {}
    implied = _implied_input_rank(node, inits)
    if implied is not None:
        return {x: implied}
    out = ranks.get(node.output[0]) if node.output else None
    if out is None:
        return {}
    if node.op_type in _KEEP_RANK:
        return {x: out}
    if node.op_type in BROADCAST:
        unknown = [name for name in node.input if name and name not in ranks]
        if len(unknown) == 1 and all(ranks[name] < out for name in node.input if name and name in ranks):
            return {unknown[0]: out}
    return {}


def annotate_unknown_ranks(model: onnx.ModelProto) -> bool:
    """Give the input of every rank-dependent node a rank where inference left none (module doc).

    Raises:
        UserError: such an input's rank cannot be derived from the graph.
    """
    graph = model.graph
    # Only onnx2torch's own converters read the rank (ops moved to normalize's stash domain do not).
    needy = [node for node in graph.node
             if node.op_type in RANK_DEPENDENT and node.domain in ("", "ai.onnx") and node.input]
    if not needy:
        return False
    types = inferred_types(model)
    ranks = {name: len(dims) for name, (_, dims) in types.items() if dims is not None}
    if all(node.input[0] in ranks for node in needy):
        return False
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    ranks.update({name: value.ndim for name, value in inits.items()})
    derived: dict[str, int] = {}
    changed = True
    while changed:
        changed = False
        for node in graph.node:
            if node.output and node.output[0] not in ranks:
                rank = _forward(node, ranks, inits)
                if rank is not None:
                    ranks[node.output[0]] = derived[node.output[0]] = rank
                    changed = True
            for name, rank in _backward(node, ranks, inits).items():
                ranks[name] = derived[name] = rank
                changed = True
    annotated = False
    needy_ids = {id(node) for node in needy}
    for index, node in enumerate(graph.node):
        if id(node) not in needy_ids:
            continue
        name = node.input[0]
        if name in derived and all(v.name != name for v in graph.value_info):
            elem_type = types.get(name, (0, None))[0] or onnx.TensorProto.FLOAT
            graph.value_info.append(helper.make_tensor_value_info(name, elem_type, [None] * derived[name]))
            logger.debug("rank of %r (input of %s) derived from the graph: %d", name, node_label(node, index),
                         derived[name])
            annotated = True
        elif name not in ranks:
            raise UserError(
                f"cannot tell the rank of {name!r}, the input of node {node_label(node, index)!r} ({node.op_type}): "
                "ONNX shape inference leaves it unknown and no neighbouring Conv, pool or reshape fixes it; "
                "declare the graph inputs' shapes and re-export"
            )
    return annotated
