"""Dependency analysis for filter pruning: which output channels of a layer can be removed from the graph.

A *channel group* is the set of output channels (filters) of one Conv (group=1), Gemm or MatMul weight,
together with every constant that must shrink with them for the graph to stay valid and to compute the
same thing on the kept channels ("a channel is physically removed only when every
consumer drops it"). Starting at the producer's output, the channels are followed forward through ops
that keep channels apart:

- the producer's own bias; BatchNormalization / InstanceNormalization parameters; per-channel constants
  of elementwise ops (Add/Mul/... with a constant, PRelu slopes);
- channel-wise ops: activations (Relu, Clip, Sigmoid, HardSwish, ...), pooling (MaxPool, AveragePool,
  GlobalAveragePool, ...), Dropout, Identity, Cast, Pad without channel padding, Reduce* over other axes,
  Transpose, Squeeze/Unsqueeze, and ``x * f(x)`` patterns (Swish) where both operands are the group's;
- depthwise Conv (group == channels): its filters follow the same mask, its ``group`` attribute shrinks,
  and its output carries the channels on;
- Flatten, and a Reshape whose constant shape merges the channel axis with the dims after (or before)
  it: each channel then owns a block of ``H*W`` features; the Reshape constant is rewritten;
- the consumers, whose INPUT channels shrink: Conv (weight axis 1), Gemm (B columns for transB=1, rows
  for transB=0), MatMul with a constant right operand (rows).

Anything else stops the walk and marks the group not prunable, with the reason: a graph output, a
residual Add/Mul/Sum with another branch (coupled channels: left alone, not pruned together), Concat,
Split, Slice, Gather, Softmax, LayerNormalization, a Reshape that splits or reorders the channels, a
grouped (non-depthwise) Conv, a tensor shared with a node outside the group (exporters merge equal
initializers), or an op this module does not know.

The analysis reads the ORIGINAL ModelProto (external data loaded) and runs ONNX shape inference on a
copy; ``converters.shrink`` applies a keep-mask per group.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from converters.graphinfo import (
    TensorSource,
    constant_sources,
    dim_value,
    identity_aliases,
    node_attr,
    node_label,
    resolve,
    tensor_value,
)
from converters.optable import BROADCAST, LINEAR, POOLS, REDUCE, UNARY
from converters.shapes import inferred_types

logger = logging.getLogger(__name__)

__all__ = ["ChannelGroup", "ShapeEdit", "TensorSlice", "channel_groups", "channel_groups_summary"]


@dataclass(frozen=True)
class TensorSlice:
    """The entries of constant ``tensor`` that belong to the group's channels, along ``axis``.

    Along ``axis`` (length ``outer * n_channels * inner``) channel ``c`` owns the positions
    ``o * n_channels * inner + c * inner + i`` for ``o < outer`` and ``i < inner``: ``inner = H*W`` after a
    ``[C, H, W]`` flatten (or the multiplier of a depthwise Conv), ``outer = H*W`` after a channels-last
    one. ``nodes`` lists the (node label, input index) reads this slice accounts for.
    """

    tensor: str
    axis: int
    role: str  # weight | bias | batchnorm | constant | depthwise | consumer
    inner: int = 1
    outer: int = 1
    nodes: tuple[tuple[str, int], ...] = ()

    def positions(self, n_channels: int, channels: np.ndarray) -> np.ndarray:
        """Indices along ``axis`` owned by ``channels`` (sorted when ``channels`` is), for a group of
        ``n_channels``."""
        channels = np.asarray(channels, dtype=np.int64)
        outer = np.arange(self.outer, dtype=np.int64)[:, None, None] * (n_channels * self.inner)
        mid = channels[None, :, None] * self.inner
        inner = np.arange(self.inner, dtype=np.int64)[None, None, :]
        return (outer + mid + inner).reshape(-1)


@dataclass(frozen=True)
class ShapeEdit:
    """Entry ``index`` of the constant shape ``tensor`` of Reshape ``node`` holds the merged size that
    contains the channels; each removed channel takes ``per_channel`` from it."""

    tensor: str
    node: str
    index: int
    per_channel: int


@dataclass(frozen=True)
class ChannelGroup:
    """The output channels of one weight and everything coupled to them.

    Attributes:
        name: The producer's weight tensor (the key ``shrink`` takes).
        node: Label of the producing node (``graphinfo.node_label``).
        op_type: Conv, Gemm or MatMul (ConvTranspose and other weights appear as not prunable).
        n_channels: Number of output channels (filters).
        outputs: Slices along the channel axis: the producer's weight and bias, normalisation
            parameters, per-channel constants.
        consumers: The consumers' weights, sliced along their input axis.
        depthwise: Depthwise Conv weights and biases that follow the mask (with ``depthwise_nodes``,
            whose ``group`` attribute shrinks).
        depthwise_nodes: Labels of those depthwise Conv nodes.
        reshapes: Reshape shape constants to rewrite.
        activations: Intermediate tensors that carry the channels (their shapes change).
        prunable: Whether ``shrink`` may remove channels of this group.
        reason: Why not, when ``prunable`` is False.
    """

    name: str
    node: str
    op_type: str
    n_channels: int
    outputs: tuple[TensorSlice, ...] = ()
    consumers: tuple[TensorSlice, ...] = ()
    depthwise: tuple[TensorSlice, ...] = ()
    depthwise_nodes: tuple[str, ...] = ()
    reshapes: tuple[ShapeEdit, ...] = ()
    activations: tuple[str, ...] = ()
    prunable: bool = True
    reason: str | None = None

    @property
    def slices(self) -> tuple[TensorSlice, ...]:
        """Every constant slice of the group: outputs, depthwise, consumers."""
        return self.outputs + self.depthwise + self.consumers


class NotPrunable(Exception):
    """Raised inside the walk; its message is the group's ``reason``."""


@dataclass(frozen=True)
class _Layout:
    """Where the channels are in an activation: ``axis``, and the inner/outer blocks (see TensorSlice)."""

    axis: int
    inner: int = 1
    outer: int = 1


def channel_groups(model: onnx.ModelProto) -> list[ChannelGroup]:
    """The channel groups of every Conv/Gemm/MatMul weight, in graph order.

    Depthwise, grouped and transposed Conv weights and MatMul weights on the left are listed as not
    prunable (a depthwise Conv's channels follow the group of the layer that feeds it).

    Args:
        model: The ONNX model, external data loaded; not modified.

    Returns:
        One ``ChannelGroup`` per weight tensor, prunable or with the reason it is not.
    """
    return _Analysis(model).groups()


def channel_groups_summary(groups: list[ChannelGroup]) -> list[dict]:
    """Plain dicts for ``inspect`` / JSON: one per group, tensors as ``name[axis]`` strings."""

    def describe(s: TensorSlice) -> str:
        block = f", block {s.inner}" if s.inner > 1 else ""
        block += f", outer {s.outer}" if s.outer > 1 else ""
        return f"{s.tensor}[axis {s.axis}{block}]"

    return [
        {
            "name": g.name,
            "node": g.node,
            "op_type": g.op_type,
            "channels": g.n_channels,
            "prunable": g.prunable,
            "reason": g.reason,
            "sliced": [describe(s) for s in g.outputs],
            "depthwise": [describe(s) for s in g.depthwise],
            "consumers": [describe(s) for s in g.consumers],
            "reshapes": [f"{e.tensor}[{e.index}] (-{e.per_channel} per channel)" for e in g.reshapes],
        }
        for g in groups
    ]


class _Analysis:
    """Graph facts shared by every group's walk."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        graph = model.graph
        self.sources: dict[str, TensorSource] = constant_sources(model)
        self.aliases = identity_aliases(model)
        self.nodes = list(graph.node)
        self.labels = [node_label(n, i) for i, n in enumerate(self.nodes)]
        self.outputs = {o.name for o in graph.output}
        inits = {t.name for t in graph.initializer}
        self.constant_inputs = {v.name for v in graph.input if v.name in inits}
        self.readers: dict[str, list[int]] = {}
        # Reads of each constant (through Identity chains), by real nodes: who would see a sliced tensor.
        self.constant_reads: dict[str, set[tuple[str, int]]] = {}
        for i, node in enumerate(self.nodes):
            # A subgraph (If/Loop/Scan body) reading an outer name counts as a read by its node, input -1.
            reads = list(enumerate(node.input)) + [(-1, name) for name in sorted(_subgraph_reads(node))]
            for k, name in reads:
                if not name:
                    continue
                self.readers.setdefault(name, []).append(i)
                src = self.constant(name)
                if src is not None and node.op_type != "Identity":
                    self.constant_reads.setdefault(src, set()).add((self.labels[i], k))
        self.shapes = {name: list(dims) for name, (_, dims) in inferred_types(model, data_prop=True).items()
                       if dims is not None}
        self._values: dict[str, np.ndarray] = {}

    # -- constants -----------------------------------------------------------------------------------

    def constant(self, name: str) -> str | None:
        """The constant tensor behind ``name`` (through Identity), or None when it is computed."""
        src = resolve(name, self.aliases)
        return src if src in self.sources else None

    def value(self, name: str) -> np.ndarray:
        if name not in self._values:
            self._values[name] = tensor_value(self.model, self.sources[name])
        return self._values[name]

    def shape(self, name: str) -> list[int | str | None] | None:
        src = self.constant(name)
        if src is not None:
            return list(self.value(src).shape)
        return self.shapes.get(name)

    # -- groups ---------------------------------------------------------------------------------------

    def groups(self) -> list[ChannelGroup]:
        groups: list[ChannelGroup] = []
        seen: set[str] = set()
        depthwise_of: dict[str, str] = {}  # depthwise node label -> group name
        pending_depthwise: list[tuple[int, str, int]] = []
        for i, node in enumerate(self.nodes):
            if node.domain not in ("", "ai.onnx") or node.op_type not in LINEAR:
                continue
            # MatMul: the constant right operand; a constant left one is listed as not prunable.
            index = 0 if node.op_type == "MatMul" and self.constant(node.input[1]) is None else 1
            if index >= len(node.input) or (weight := self.constant(node.input[index])) is None:
                continue
            shape = self.value(weight).shape
            if len(shape) < 2 or weight in seen:
                continue
            seen.add(weight)
            label = self.labels[i]
            try:
                group = self._group(i, weight)
            except _Depthwise:
                pending_depthwise.append((i, weight, shape[0]))
                continue
            except NotPrunable as exc:
                n_channels = _out_channels(node, shape)
                group = ChannelGroup(weight, label, node.op_type, n_channels, prunable=False, reason=str(exc))
            if group.prunable:
                depthwise_of.update({n: group.name for n in group.depthwise_nodes})
            groups.append(group)
        for i, weight, n_channels in pending_depthwise:
            label = self.labels[i]
            upstream = depthwise_of.get(label)
            reason = (
                f"depthwise Conv: its channels follow group {upstream!r}"
                if upstream
                else "depthwise Conv: its channels follow the layer that feeds it, which is not prunable"
            )
            groups.append(ChannelGroup(weight, label, "Conv", n_channels, prunable=False, reason=reason))
        order = {name: k for k, name in enumerate(self._weight_order())}
        groups.sort(key=lambda g: order.get(g.name, len(order)))
        return groups

    def _weight_order(self) -> list[str]:
        names = []
        for node in self.nodes:
            for name in node.input:
                src = self.constant(name) if name else None
                if src is not None and src not in names:
                    names.append(src)
        return names

    def _group(self, index: int, weight: str) -> ChannelGroup:
        node, label = self.nodes[index], self.labels[index]
        if weight in self.constant_inputs:
            raise NotPrunable(f"weight {weight!r} is also a graph input (it can be fed at run time)")
        shape = self.value(weight).shape
        walk = _Walk(self, weight, _out_channels(node, shape))
        if node.op_type == "Conv":
            groups = node_attr(node, "group", 1)
            if groups != 1:
                if shape[1] == 1:  # weight [C*m, C_in/group, ...] with C_in/group == 1
                    raise _Depthwise
                raise NotPrunable(f"grouped Conv (group={groups}) is not handled")
            walk.slice(weight, 0, "weight", _Layout(0), (label, 1))
            if len(node.input) > 2 and node.input[2]:
                walk.slice_input(node.input[2], 0, "bias", _Layout(0), (label, 2))
            start = _Layout(1)
        elif node.op_type == "Gemm":
            trans_b = node_attr(node, "transB", 0)
            walk.slice(weight, 0 if trans_b else 1, "weight", _Layout(0), (label, 1))
            if len(node.input) > 2 and node.input[2]:
                if self.constant(node.input[2]) is None:
                    raise NotPrunable(f"Gemm {label} adds a computed C")
                walk.broadcast_constant(node.input[2], _Layout(1), (label, 2), out_rank=2, role="bias")
            start = _Layout(1)
        elif node.op_type == "MatMul":
            if self.constant(node.input[1]) is None:
                raise NotPrunable("MatMul with a constant left operand: its output channels are not its weight's")
            if len(shape) != 2:
                raise NotPrunable(f"MatMul weight of rank {len(shape)} is not handled")
            walk.slice(weight, 1, "weight", _Layout(0), (label, 1))
            out_shape = self.shape(node.output[0])
            if out_shape is None:
                raise NotPrunable(f"the shape of {node.output[0]!r} is unknown (shape inference failed)")
            start = _Layout(len(out_shape) - 1)
        else:
            raise NotPrunable(f"{node.op_type} weights are not handled (only Conv, Gemm, MatMul)")
        walk.run(node.output[0], start)
        walk.check_sharing()
        return ChannelGroup(
            name=weight,
            node=label,
            op_type=node.op_type,
            n_channels=walk.n,
            outputs=tuple(walk.outputs),
            consumers=tuple(walk.consumers),
            depthwise=tuple(walk.depthwise),
            depthwise_nodes=tuple(walk.depthwise_nodes),
            reshapes=tuple(walk.reshapes),
            activations=tuple(walk.reached),
        )


class _Depthwise(Exception):
    """The weight is a depthwise Conv's: listed after the groups that carry it."""


def _out_channels(node: onnx.NodeProto, shape: tuple[int, ...]) -> int:
    if node.op_type == "Gemm":
        return shape[0] if node_attr(node, "transB", 0) else shape[1]
    if node.op_type == "MatMul":
        return shape[-1]
    if node.op_type == "ConvTranspose":
        return shape[1] * node_attr(node, "group", 1)
    return shape[0]


@dataclass
class _Walk:
    """One group's forward walk from its producer's output."""

    a: _Analysis
    name: str
    n: int
    reached: dict[str, _Layout] = field(default_factory=dict)
    outputs: list[TensorSlice] = field(default_factory=list)
    consumers: list[TensorSlice] = field(default_factory=list)
    depthwise: list[TensorSlice] = field(default_factory=list)
    depthwise_nodes: list[str] = field(default_factory=list)
    reshapes: list[ShapeEdit] = field(default_factory=list)

    def run(self, start: str, layout: _Layout) -> None:
        queue = [(start, layout)]
        done: set[int] = set()
        waiting: dict[int, str] = {}  # node index -> the operand not (yet) known to carry the channels
        while True:
            while queue:
                name, layout = queue.pop(0)
                if name in self.reached:
                    if self.reached[name] != layout:
                        raise NotPrunable(f"the channels reach {name!r} in two different layouts")
                    continue
                self.reached[name] = layout
                if name in self.a.outputs:
                    raise NotPrunable(f"the channels reach the graph output {name!r}")
                for i in self.a.readers.get(name, []):
                    if i in done:
                        continue
                    other = self._blocking_operand(i)
                    if other is not None:
                        waiting[i] = other
                        continue
                    waiting.pop(i, None)
                    done.add(i)
                    queue.extend(self._step(i))
            ready = [i for i in waiting if self._blocking_operand(i) is None]
            if not ready:
                break
            for i in ready:
                del waiting[i]
                done.add(i)
                queue.extend(self._step(i))
        if waiting:
            i, other = next(iter(waiting.items()))
            node = self.a.nodes[i]
            raise NotPrunable(
                f"coupled through {node.op_type} {self.a.labels[i]} with another branch ({other!r}): "
                "coupled channels are left alone"
            )

    def _blocking_operand(self, i: int) -> str | None:
        """For a broadcasting op, an operand that is computed but does not carry this group's channels."""
        node = self.a.nodes[i]
        if node.op_type not in BROADCAST:
            return None
        for name in node.input:
            if name and self.a.constant(name) is None and name not in self.reached:
                return name
        return None

    # -- slices -----------------------------------------------------------------------------------------

    def slice(self, tensor: str, axis: int, role: str, layout: _Layout, read: tuple[str, int]) -> None:
        """Record that ``tensor`` (a constant) is cut along ``axis`` with the blocks of ``layout``."""
        shape = self.a.value(tensor).shape
        expected = layout.outer * self.n * layout.inner
        if axis >= len(shape) or shape[axis] != expected:
            raise NotPrunable(
                f"{tensor!r} of shape {list(shape)} does not have {expected} entries along axis {axis}"
            )
        target = {"consumer": self.consumers, "depthwise": self.depthwise}.get(role, self.outputs)
        for k, existing in enumerate(target):
            if existing.tensor == tensor:
                if (existing.axis, existing.inner, existing.outer) != (axis, layout.inner, layout.outer):
                    raise NotPrunable(f"{tensor!r} would be cut in two different ways")
                target[k] = TensorSlice(
                    tensor, axis, existing.role, layout.inner, layout.outer, existing.nodes + (read,)
                )
                return
        for other in self.outputs + self.consumers + self.depthwise:
            if other.tensor == tensor and other.axis == axis:
                raise NotPrunable(f"{tensor!r} would be cut in two different ways")
        target.append(TensorSlice(tensor, axis, role, layout.inner, layout.outer, (read,)))

    def slice_input(self, name: str, axis: int, role: str, layout: _Layout, read: tuple[str, int]) -> None:
        src = self.a.constant(name)
        if src is None:
            raise NotPrunable(f"{role} {name!r} of {read[0]} is computed, not a constant")
        self.slice(src, axis, role, layout, read)

    def broadcast_constant(
        self, name: str, layout: _Layout, read: tuple[str, int], out_rank: int, role: str = "constant"
    ) -> None:
        """A constant operand of a broadcasting op: cut it when it has one entry per channel position."""
        src = self.a.constant(name)
        assert src is not None
        shape = self.a.value(src).shape
        full = layout.outer * self.n * layout.inner
        if len(shape) > out_rank:
            raise NotPrunable(f"constant {src!r} of {read[0]} raises the rank by broadcasting")
        axis = layout.axis - (out_rank - len(shape))
        if axis < 0 or shape[axis] == 1:
            return
        if shape[axis] != full:
            raise NotPrunable(
                f"constant {src!r} of {read[0]} has {shape[axis]} entries on the channel axis, not {full}"
            )
        self.slice(src, axis, role, layout, read)

    def check_sharing(self) -> None:
        """Every read of a sliced constant must be one the group accounts for, and cut the same way."""
        accounted: dict[str, set[tuple[str, int]]] = {}
        for s in self.outputs + self.consumers + self.depthwise:
            reads = set(s.nodes)
            if s.tensor in accounted and accounted[s.tensor] != reads:
                # e.g. one weight read as the producer (rows cut) and as a consumer (columns cut)
                raise NotPrunable(f"{s.tensor!r} is read by several nodes that need it cut differently")
            accounted[s.tensor] = reads
        for e in self.reshapes:
            accounted.setdefault(e.tensor, set()).add((e.node, 1))
        for tensor, reads in accounted.items():
            if tensor in self.a.constant_inputs:
                raise NotPrunable(f"{tensor!r} is also a graph input (it can be fed at run time)")
            extra = sorted(self.a.constant_reads.get(tensor, set()) - reads)
            if extra:
                raise NotPrunable(
                    f"{tensor!r} is also read by {extra[0][0]} (input {extra[0][1]}); exporters merge equal "
                    "initializers: give each use its own copy first"
                )

    # -- one node ------------------------------------------------------------------------------------

    def _step(self, i: int) -> list[tuple[str, _Layout]]:
        """Follow the channels through node ``i``; return the outputs that carry them on."""
        a = self.a
        node, label = a.nodes[i], a.labels[i]
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            raise NotPrunable(f"the channels reach {op} {label} of domain {node.domain!r}, which is not handled")
        carried = [(k, name) for k, name in enumerate(node.input) if name in self.reached]
        if not carried:
            raise NotPrunable(f"a subgraph of {op} {label} reads the channels")
        name = carried[0][1]
        layout = self.reached[name]
        rank = len(a.shape(name) or ())

        def data_input_only(allowed: tuple[int, ...] = (0,)) -> None:
            for k2, _ in carried:
                if k2 not in allowed:
                    raise NotPrunable(f"the channels reach input {k2} of {op} {label}")

        def outputs_used(indices: tuple[int, ...]) -> None:
            for j, out in enumerate(node.output):
                if j not in indices and out and (out in a.readers or out in a.outputs):
                    raise NotPrunable(f"output {j} of {op} {label} is used, which is not handled")

        if op in UNARY:
            data_input_only()
            return [(out, layout) for out in node.output if out]
        if op in BROADCAST:
            out_shape = a.shape(node.output[0])
            if out_shape is None:
                raise NotPrunable(f"the shape of the output of {op} {label} is unknown")
            out_rank = len(out_shape)
            for k2, name2 in enumerate(node.input):
                if not name2:
                    continue
                if name2 in self.reached:
                    if self.reached[name2] != layout or len(a.shape(name2) or ()) != out_rank:
                        raise NotPrunable(f"the operands of {op} {label} hold the channels in different layouts")
                else:
                    self.broadcast_constant(name2, layout, (label, k2), out_rank)
            return [(node.output[0], layout)]
        if op in POOLS:
            data_input_only()
            outputs_used((0,))
            self._need_nchw(layout, op, label)
            return [(node.output[0], layout)]
        if op in ("BatchNormalization", "InstanceNormalization"):
            data_input_only()
            outputs_used((0,))
            self._need_nchw(layout, op, label)
            for k2 in range(1, len(node.input)):
                self.slice_input(node.input[k2], 0, "batchnorm", _Layout(0, layout.inner, layout.outer), (label, k2))
            return [(node.output[0], layout)]
        if op == "Conv":
            data_input_only()
            return self._conv(i, layout)
        if op == "Gemm":
            data_input_only()
            if node_attr(node, "transA", 0) or rank != 2 or layout.axis != 1:
                raise NotPrunable(f"Gemm {label} reads the channels transposed")
            trans_b = node_attr(node, "transB", 0)
            self.slice_input(node.input[1], 1 if trans_b else 0, "consumer", layout, (label, 1))
            return []
        if op == "MatMul":
            data_input_only()
            if a.constant(node.input[1]) is None or len(a.shape(node.input[1]) or ()) != 2:
                raise NotPrunable(f"MatMul {label} multiplies the channels by a computed or batched operand")
            if layout.axis != rank - 1:
                raise NotPrunable(f"MatMul {label} does not contract the channel axis")
            self.slice_input(node.input[1], 0, "consumer", layout, (label, 1))
            return []
        if op == "Flatten":
            data_input_only()
            dims = a.shape(name)
            axis = node_attr(node, "axis", 1)
            return [(node.output[0], self._flatten(dims, layout, axis + rank if axis < 0 else axis, label))]
        if op == "Reshape":
            data_input_only()
            return [(node.output[0], self._reshape(i, name, layout))]
        if op == "Transpose":
            data_input_only()
            perm = list(node_attr(node, "perm", list(range(rank))[::-1]))
            return [(node.output[0], _Layout(perm.index(layout.axis), layout.inner, layout.outer))]
        if op in ("Squeeze", "Unsqueeze"):
            data_input_only()
            axes = self._axes(node, label)
            if op == "Unsqueeze":
                out_rank = rank + len(axes)
                new = layout.axis
                for ax in sorted(x % out_rank for x in axes):
                    if ax <= new:
                        new += 1
                return [(node.output[0], _Layout(new, layout.inner, layout.outer))]
            dims = a.shape(name) or []
            squeezed = [x % rank for x in axes] if axes is not None else [d for d, v in enumerate(dims) if v == 1]
            if axes is None and any(not isinstance(v, int) for v in dims):
                raise NotPrunable(f"Squeeze {label} without axes on a tensor of unknown shape")
            if layout.axis in squeezed:
                raise NotPrunable(f"Squeeze {label} removes the channel axis")
            new = layout.axis - sum(ax < layout.axis for ax in squeezed)
            return [(node.output[0], _Layout(new, layout.inner, layout.outer))]
        if op in REDUCE:
            data_input_only()
            axes = self._axes(node, label)
            if not axes:
                if node_attr(node, "noop_with_empty_axes", 0) and axes is not None:
                    return [(node.output[0], layout)]
                raise NotPrunable(f"{op} {label} reduces over every axis, channels included")
            axes = [x % rank for x in axes]
            if layout.axis in axes:
                raise NotPrunable(f"{op} {label} reduces over the channel axis")
            new = layout.axis if node_attr(node, "keepdims", 1) else layout.axis - sum(ax < layout.axis for ax in axes)
            return [(node.output[0], _Layout(new, layout.inner, layout.outer))]
        if op == "Pad":
            data_input_only()
            pads = node_attr(node, "pads")
            if pads is None and len(node.input) > 1 and a.constant(node.input[1]) is not None:
                pads = a.value(a.constant(node.input[1])).tolist()
            if pads is None or (len(node.input) > 3 and node.input[3]):
                raise NotPrunable(f"Pad {label} with computed pads or axes is not handled")
            if pads[layout.axis] or pads[layout.axis + rank]:
                raise NotPrunable(f"Pad {label} pads the channel axis")
            return [(node.output[0], layout)]
        if op in ("Concat", "Split", "Slice", "Gather", "Softmax", "LogSoftmax", "LayerNormalization", "Shape"):
            raise NotPrunable(f"the channels reach {op} {label}, which is not handled")
        raise NotPrunable(f"the channels reach {op} {label}, an op this analysis does not know")

    def _need_nchw(self, layout: _Layout, op: str, label: str) -> None:
        if layout.axis != 1 or layout.outer != 1:
            raise NotPrunable(f"{op} {label} expects the channels on axis 1")

    def _conv(self, i: int, layout: _Layout) -> list[tuple[str, _Layout]]:
        a = self.a
        node, label = a.nodes[i], a.labels[i]
        self._need_nchw(layout, "Conv", label)
        weight = a.constant(node.input[1])
        if weight is None:
            raise NotPrunable(f"Conv {label} has a computed weight")
        shape = a.value(weight).shape
        groups = node_attr(node, "group", 1)
        full = layout.outer * self.n * layout.inner
        if groups == 1:
            self.slice(weight, 1, "consumer", layout, (label, 1))
            return []
        if groups == full and shape[1] == 1:
            multiplier = shape[0] // groups
            follows = _Layout(1, layout.inner * multiplier, layout.outer)
            self.slice(weight, 0, "depthwise", _Layout(0, follows.inner, follows.outer), (label, 1))
            if len(node.input) > 2 and node.input[2]:
                self.slice_input(node.input[2], 0, "depthwise", _Layout(0, follows.inner, follows.outer), (label, 2))
            self.depthwise_nodes.append(label)
            return [(node.output[0], follows)]
        raise NotPrunable(f"the channels reach grouped Conv {label} (group={groups}), which is not handled")

    def _flatten(self, dims: list | None, layout: _Layout, start: int, label: str) -> _Layout:
        """Flatten(axis=start): dims ``start..`` become output axis 1."""
        if start > layout.axis:
            raise NotPrunable(f"Flatten {label} merges the channel axis into the first output axis")
        if dims is None or any(not isinstance(d, int) for d in dims[start:]):
            raise NotPrunable(f"Flatten {label} flattens dims of unknown size")
        outer = layout.outer * math.prod(dims[start : layout.axis])
        return _Layout(1, layout.inner * math.prod(dims[layout.axis + 1 :]), outer)

    def _reshape(self, i: int, name: str, layout: _Layout) -> _Layout:
        a = self.a
        node, label = a.nodes[i], a.labels[i]
        shape_src = a.constant(node.input[1])
        if shape_src is None:
            raise NotPrunable(f"Reshape {label} has a computed shape")
        target = [int(v) for v in a.value(shape_src).reshape(-1)]
        dims_in, dims_out = a.shape(name), a.shape(node.output[0])
        if dims_in is None or dims_out is None:
            raise NotPrunable(f"the shapes around Reshape {label} are unknown")
        r_in, r_out = len(dims_in), len(dims_out)
        for p in range(layout.axis + 1):
            q = r_in - r_out + p + 1
            if q <= layout.axis or q > r_in:
                continue
            merged = dims_in[p:q]
            kept_in = dims_in[:p] + dims_in[q:]
            kept_out = dims_out[:p] + dims_out[p + 1 :]
            kept_entries = target[:p] + target[p + 1 :]
            # An output dim inference left unknown or renamed (-1 beside a symbolic batch) is the input's dim
            # when every other dim lines up: the element counts must agree.
            if not all(
                d_in == d_out or (not isinstance(d_out, int) and entry in (-1, 0))
                for d_in, d_out, entry in zip(kept_in, kept_out, kept_entries)
            ):
                continue
            if any(not isinstance(d, int) for d in merged) or dims_out[p] != math.prod(merged):
                continue
            new = _Layout(
                p,
                layout.inner * math.prod(dims_in[layout.axis + 1 : q]),
                layout.outer * math.prod(dims_in[p : layout.axis]),
            )
            entry = target[p]
            if entry == 0 and q == p + 1:
                return new  # 0 copies the (single) channel dim, whatever its new size
            if entry == -1:
                return new
            if entry != dims_out[p]:
                raise NotPrunable(f"Reshape {label}: shape entry {p} is {entry}, not the size {dims_out[p]}")
            self.reshapes.append(ShapeEdit(shape_src, label, p, new.inner * new.outer))
            return new
        raise NotPrunable(f"Reshape {label} splits or reorders the channel axis")

    def _axes(self, node: onnx.NodeProto, label: str) -> list[int] | None:
        """The ``axes`` of Squeeze/Unsqueeze/Reduce*, from the attribute or a constant input; None if absent."""
        axes = node_attr(node, "axes")
        if axes is not None:
            return list(axes)
        if len(node.input) > 1 and node.input[1]:
            src = self.a.constant(node.input[1])
            if src is None:
                raise NotPrunable(f"{node.op_type} {label} has computed axes")
            return [int(v) for v in self.a.value(src).reshape(-1)]
        return None


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Names the node's subgraphs (If branches, Loop/Scan bodies) read, at any depth."""
    names: set[str] = set()
    for attr in node.attribute:
        for graph in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            for inner in graph.node:
                names.update(n for n in inner.input if n)
                names.update(_subgraph_reads(inner))
    return names
