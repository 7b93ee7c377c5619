"""Where each entry of a computed shape tensor comes from: a dim of some tensor's Shape, a constant, or
arithmetic on those.

Exporters compute a Resize's output sizes at run time from the shapes of the tensors around it (torch's
``F.interpolate(x, size=y.shape[2:])``; paddle2onnx's ``Shape -> Slice -> Cast -> Mul -> Cast -> Concat``).
Whether filter pruning may cut the channels such a Resize carries depends on each entry: the channel axis's
size must be the very dim of a tensor cut the same way, and no other entry may depend on a channel count.
``shape_entries`` answers that by following the 1-D integer computation back to its Shape nodes and constants;
anything it does not know gives None (the caller refuses). ``check_shape_reads`` applies that to a channel
group's walk: every Shape of a tensor carrying the group's channels must feed only shapes the cut keeps right.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnx_admm.converters.channels import NotPrunable
from onnx_admm.converters.graphinfo import node_attr


@dataclass(frozen=True)
class Entry:
    """One entry of a shape tensor: ``dim`` is ``(tensor, axis)`` when the entry is exactly that dim of the
    tensor's Shape; ``deps`` every such dim it is computed from (empty for a constant); ``factors`` the dims
    whose product it is, when it is one (a Shape's dims multiplied, Keras' Tensordot's ``ReduceProd``);
    ``value`` a constant's."""

    deps: frozenset[tuple[str, int]]
    dim: tuple[str, int] | None = None
    factors: tuple[tuple[str, int], ...] | None = None
    value: int | None = None


# Ops that compute on a Shape's output (the dims) on its way to a Reshape's shape or a Resize's sizes.
SHAPE_ARITHMETIC = frozenset({"Slice", "Gather", "Concat", "Cast", "Unsqueeze", "Squeeze", "Identity", "Mul", "Div",
                              "Add", "Sub", "ReduceProd"})
# 1-D integer arithmetic: each output entry depends on the entries it is computed from.
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Mod", "Max", "Min", "Floor", "Ceil", "Neg", "Abs"})
# Ops that keep the entries in order (a 1-D shape vector squeezed to a scalar, cast, reshaped to [1]).
PASS = frozenset({"Identity", "Cast", "Squeeze", "Unsqueeze", "Reshape", "Flatten"})


def shape_entries(a: Any, name: str, memo: dict[str, list[Entry] | None] | None = None) -> list[Entry] | None:
    """The entries of the 1-D (or scalar) integer tensor ``name``, or None where it is computed by an op not
    followed here. ``a``: the graph facts of ``groups._Analysis`` (nodes, producers, constants, shapes)."""
    memo = {} if memo is None else memo
    if name not in memo:
        memo[name] = None  # a cycle (there is none in a valid graph) or a failure below stays None
        memo[name] = _entries(a, name, memo)
    return memo[name]


def _entries(a: Any, name: str, memo: dict) -> list[Entry] | None:
    src = a.constant(name)
    if src is not None:
        values = a.value(src)
        return None if values.ndim > 1 else [Entry(frozenset(), value=int(v)) for v in values.reshape(-1)]
    index = a.producer_index.get(name)
    if index is None:
        return None  # a graph input
    node = a.nodes[index]
    op = node.op_type
    if op == "Shape":
        dims = a.shape(node.input[0])
        if dims is None:
            return None
        start, end = node_attr(node, "start", 0), node_attr(node, "end", len(dims))
        return [Entry(frozenset({(node.input[0], d)}), (node.input[0], d), ((node.input[0], d),))
                for d in range(len(dims))[start:end]]
    inputs = [shape_entries(a, x, memo) if x else None for x in node.input]
    if op in PASS:
        out = a.shape(node.output[0])
        return inputs[0] if out is not None and len(out) <= 1 else None
    if op == "Concat":
        return None if any(x is None for x in inputs) else [e for x in inputs for e in x]
    if op == "Slice":
        return _slice(a, node, inputs[0])
    if op == "Gather":
        indices = a.constant(node.input[1]) if len(node.input) > 1 else None
        if inputs[0] is None or indices is None or node_attr(node, "axis", 0) != 0:
            return None
        picked = a.value(indices).reshape(-1)
        n = len(inputs[0])
        return [inputs[0][int(k)] for k in picked] if all(-n <= k < n for k in picked) else None
    if op in ELEMENTWISE or op == "ReduceProd":
        if any(x is None for x in inputs):
            return None
        deps = [frozenset().union(*(e.deps for e in x)) for x in inputs]
        if op == "ReduceProd":
            return [Entry(frozenset().union(*deps), factors=_product([e for x in inputs for e in x]))]
        width = max(len(x) for x in inputs)
        if any(len(x) not in (1, width) for x in inputs):
            return None
        operands = [[x[0 if len(x) == 1 else k] for x in inputs] for k in range(width)]
        return [Entry(frozenset().union(*(e.deps for e in row)), factors=_product(row) if op == "Mul" else None)
                for row in operands]
    return None


def _product(entries: list[Entry]) -> tuple[tuple[str, int], ...] | None:
    """The factors of the product of ``entries``, when each is a product of dims."""
    if any(e.factors is None for e in entries):
        return None
    return tuple(f for e in entries for f in e.factors)


def _slice(a: Any, node: onnx.NodeProto, data: list[Entry] | None) -> list[Entry] | None:
    """Entries ``data[start:end:step]`` of a 1-D Slice with constant bounds (inputs from opset 10, attributes
    before)."""
    if data is None:
        return None
    if len(node.input) == 1:
        bounds = [node_attr(node, key, None) for key in ("starts", "ends", "axes")] + [[1]]
    else:
        bounds = []
        for k in range(1, 5):
            if k >= len(node.input) or not node.input[k]:
                bounds.append(None if k < 3 else ([0] if k == 3 else [1]))
                continue
            src = a.constant(node.input[k])
            if src is None:
                return None
            bounds.append([int(v) for v in np.asarray(a.value(src)).reshape(-1)])
    starts, ends, axes, steps = bounds
    if starts is None or ends is None or len(starts) != 1 or (axes or [0])[0] not in (0, -1) or steps[0] == 0:
        return None
    # ONNX clamps its bounds (INT64_MAX for "to the end", negatives counted from the end) as Python does.
    return data[starts[0]:ends[0]:steps[0]]


def check_shape_reads(walk: Any) -> None:
    """A Shape of a tensor that carries the channels in ``walk`` (a ``channel_walk.ChannelWalk`` that has run)
    reads their count: allowed only where everything computed from it ends in the shape of a Reshape that
    gets a constant of its own (tf2onnx's Flatten: ``Reshape(x, Concat(Shape(x)[:1], [-1]))``), which no
    longer reads it once the cut replaces it, or in the sizes of a Resize that the cut keeps right
    (``_sizes_follow``; another Resize's sizes may take height and width from that shape, not the count). Where
    the dims computed from it no longer depend on the count (a Gather of the batch dim), nothing past is read."""
    a = walk.a
    frozen = {(f.node, f.input) for f in walk.frozen}
    for label, (entries, layout) in walk.sized.items():
        _sizes_follow(walk, label, entries, layout)
    memo: dict[str, list[Entry] | None] = {}
    for start in walk.shape_reads:
        queue, seen = list(a.nodes[start].output), set()
        while queue:
            name = queue.pop()
            if name in seen:
                continue
            seen.add(name)
            entries = shape_entries(a, name, memo)
            if entries is not None and not any(_counts(walk, dep) for entry in entries for dep in entry.deps):
                # The dims picked out no longer hold the count (an LSTM's zero state sized by Shape(x)[1], the batch).
                continue
            if name in a.outputs:
                raise NotPrunable(f"the shape of the channels reaches the graph output {name!r}")
            for i in a.readers.get(name, []):
                node, label = a.nodes[i], a.labels[i]
                computed = (label, 1) in frozen or label in walk.follows  # a constant of its own, or it follows the cut
                if node.op_type == "Reshape" and name == node.input[1] and computed:
                    continue
                if node.op_type == "Resize" and name in node.input[3:]:
                    # torch's F.interpolate(y, size=x.shape[-2:]) reads x's height and width, not its channels.
                    entries = shape_entries(a, node.input[3])
                    if label in walk.sized or (entries is not None and not any(
                            _counts(walk, dep) for entry in entries for dep in entry.deps)):
                        continue
                # A 1-D vector of dims reshaped (paddle2onnx's [1] before a Concat) is shape arithmetic too.
                vector = (node.op_type == "Reshape" and name == node.input[0]
                          and len(a.shape(node.output[0]) or (0, 0)) <= 1)
                if node.op_type not in SHAPE_ARITHMETIC and not vector:
                    # a Reshape not frozen would change with the cut
                    raise NotPrunable(f"the channels' shape read by Shape {a.labels[start]} reaches "
                                      f"{node.op_type} {label}")
                queue.extend(x for x in node.output if x)


def _counts(walk: Any, dep: tuple[str, int]) -> bool:
    """Whether dim ``dep`` (tensor, axis) of a Shape is the axis of a tensor that carries the channels."""
    reached = walk.reached.get(dep[0])
    return reached is not None and dep[1] == reached.axis


def _sizes_follow(walk: Any, label: str, entries: list[Entry], layout: Any) -> None:
    """The sizes of Resize ``label`` stay right after the cut: the channel axis's entry is the channel dim
    of a tensor that carries the channels one per position (so it is the cut count too), and no other entry
    is computed from such a count."""
    own = entries[layout.axis].dim
    plain = (layout.inner == 1 and layout.outer == 1 and layout.total is None and layout.stride is None)
    there = walk.reached.get(own[0]) if own is not None else None
    if not plain or there is None or own[1] != there.axis or there != layout:
        raise NotPrunable(f"Resize {label} takes the channel axis's entry of its sizes from a value the cut "
                          "does not change")
    for k, entry in enumerate(entries):
        if k != layout.axis and any(_counts(walk, dep) for dep in entry.deps):
            raise NotPrunable(f"Resize {label} computes entry {k} of its sizes from the count of the channels")


def computed_reshape(walk: Any, i: int, name: str, dims_out: list) -> tuple[list, int] | None:
    """Reshape node ``i`` of ``walk`` (data ``name``) computes its shape from the shapes of tensors that carry
    the channels so that the cut keeps it right; returns the output dims with the channels' entry at its
    present size (where shape inference left it unknown) and its position (nothing to edit there: it follows
    the cut), or None. Either no entry depends on a channel count and the channels' entry is -1 (TorchScript's
    ``x.flatten(1, 2)``: ``[Shape(x)[0], -1, Shape(x)[3]]``), or one entry is a product of dims with exactly one
    count among them, a count that shrinks with the units, and no other depends on one (torch dynamo's
    ``Shape(x)[2] * Shape(x)[3]``, Keras' Tensordot's ``ReduceProd`` of the dims it merges)."""
    a = walk.a
    entries = shape_entries(a, a.nodes[i].input[1])
    if entries is None or len(entries) != len(dims_out):
        return None
    counting = [k for k, e in enumerate(entries) if any(_counts(walk, dep) for dep in e.deps)]
    if not counting:
        free = [k for k, e in enumerate(entries) if e.value == -1]
        others = [e for e in entries if e.value != -1]
        picked = [e.dim[1] for e in others if e.dim is not None and e.dim[0] == name]
        dims_in = a.shape(name) or []
        rest = [d for k, d in enumerate(dims_in) if k not in picked]
        if len(free) != 1 or len(picked) != len(others) or len(set(picked)) != len(picked) or not all(
                isinstance(d, int) for d in rest):
            return None
        size, p = int(np.prod(rest)), free[0]
    elif len(counting) == 1:
        p = counting[0]
        factors = entries[p].factors or ()
        counts = [f for f in factors if _counts(walk, f)]
        sizes = [(a.shape(t) or [None] * (d + 1))[d] for t, d in factors]
        plain = all(walk.reached[t].total is None and walk.reached[t].stride is None for t, _ in counts)
        if len(counts) != 1 or not plain or not all(isinstance(v, int) for v in sizes):
            return None
        size = int(np.prod(sizes))
    else:
        return None
    walk.follows.add(a.labels[i])
    return [size if k == p else d for k, d in enumerate(dims_out)], p
