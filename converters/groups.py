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
  it: each channel then owns a block of ``H*W`` features; the Reshape constant is rewritten; or one that only
  regroups the dims before the channels (``[N*L, C]`` <-> ``[N, L, C]``, also once a channels-last
  merge holds them in outer blocks: a Keras Reshape ``[N, W, H, C] -> [N, W, H*C]`` before a Dense). A shape computed from the input
  with one dim that follows the inputs (tf2onnx's Keras Dense on a sequence) gets a constant of its own
  first (``ChannelGroup.frozen``), -1 at that dim;
- the consumers, whose INPUT channels shrink: Conv (weight axis 1), Gemm (B columns for transB=1, rows
  for transB=0), MatMul with a constant right operand (rows), an LSTM / GRU / RNN (W's axis 2);
- a Concat along another axis than the channels' (torch's stacked final states of an RNN's layers): every
  input holds the same channels, as a sum's operands do, so the producers of the others are coupled;
- Slice and Gather of another axis than the channels' (``converters.channel_select``), and a Reshape whose
  shape is computed from the channels' own dims so that it follows the cut (``shape_entries.computed_reshape``).

The hidden units of an LSTM, GRU or RNN are a group too (``converters.recurrent_units``): W and R are its two
members, its outputs Y, Y_h and Y_c carry the units on.

- Concat on the channel axis: the group's channels become one range of the joined channels
  (``ChannelLayout.offset``/``total``); each input's group cuts its own range of the consumers' input axis.
- Split of the channel axis into equal pieces (YOLOv8's C2f): the units become one filter of each piece, and
  a Concat that joins only copies of the units (the C2f's pieces and bottleneck sums, an SPPF's pools) holds
  them in blocks (``converters.channel_blocks``).

Channels that meet another branch in an elementwise sum or product (a residual Add/Sum, a
squeeze-excitation Mul) are *coupled*: the layers that produce the other branch (found by walking its
data inputs back to the nearest Conv/Gemm/MatMul) join the group, and the walk starts again from every
member, until no sum waits for a branch. The group then removes the same channels from all its members
(``ChannelGroup.members``): a ResNet stage, its stem or downsample conv and every block's last conv, is one
group.

Anything else stops the walk and marks the group not prunable, with the reason: a graph output, a
branch that comes from a graph input or whose channels are not the same layers' in the same layout,
unequal Split pieces, a Slice or Gather of the channels, Softmax, LayerNormalization, a Concat on another
axis or of copies of the units beside other channels (YOLOv8's neck C2f), a Reshape that splits or
reorders the channels, a grouped (non-depthwise) Conv, a tensor shared with a node outside the group
(exporters merge equal initializers), or an op this module does not know.

A MatMul/Gemm whose channels stop (an attention block's Q/K/V projection reaches Shape, a head-splitting
Reshape, Softmax) is tried as attention heads (``converters.heads``): its units are then heads, each a
block of rows of Q, K and V (of one fused projection, indexed or split by chunk/split/unbind, or of
separate ones, then all members of one group), proven in onnxruntime before the group is offered. A
mask repeated per head that several layers share is first copied per layer (``converters.heads_chains``),
so that each layer's heads are a group of their own.

The analysis reads the ORIGINAL ModelProto (external data loaded) and runs ONNX shape inference on a
copy; ``converters.shrink`` applies a keep-mask per group. The rules per op live in
``converters.channel_walk``, the types in ``converters.channels``.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from onnx_admm.converters.channel_blocks import Regroup
from onnx_admm.converters.channel_walk import ChannelWalk
from onnx_admm.converters.channels import (ChannelGroup, ChannelLayout, NotPrunable, ShapeEdit, TensorSlice,
                                            fed_at_run_time)
from onnx_admm.converters.graphinfo import GraphView, TensorSource, constant_sources, node_attr, resolve, tensor_names, tensor_value
from onnx_admm.converters.heads import Probe, feeds_attention, head_group, probe_shapes
from onnx_admm.converters.heads_chains import split_shared_repeats
from onnx_admm.converters.optable import BROADCAST, LINEAR, RECURRENT, WEIGHT_INPUTS
from onnx_admm.converters.recurrent_units import hidden_units, recurrent_starts
from onnx_admm.converters.shapes import inferred_types

logger = logging.getLogger(__name__)

__all__ = ["ChannelGroup", "ShapeEdit", "TensorSlice", "channel_groups", "channel_groups_summary"]


def channel_groups(model: onnx.ModelProto) -> list[ChannelGroup]:
    """The channel groups of every Conv/Gemm/MatMul weight and recurrent layer, in graph order.

    Depthwise, grouped and transposed Conv weights and MatMul weights on the left are listed as not
    prunable (a depthwise Conv's channels follow the group of the layer that feeds it).

    Args:
        model: The ONNX model, external data loaded; not modified.

    Returns:
        One ``ChannelGroup`` per group: per weight tensor, except that the producers coupled through a
        residual sum share one (named by the first, listing all in ``members``); prunable or with the
        reason it is not.
    """
    # A mask chain shared by several attention layers is copied per layer first (the cut copies it alike).
    return _Analysis(split_shared_repeats(model)).groups()


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
            "unit": g.unit,
            "prunable": g.prunable,
            "reason": g.reason,
            "members": list(g.producers),
            "sliced": [describe(s) for s in g.outputs],
            "depthwise": [describe(s) for s in g.depthwise],
            "consumers": [describe(s) for s in g.consumers],
            "reshapes": [f"{e.tensor}[{e.index}] (-{e.per_channel} per {g.unit})" for e in g.reshapes],
            "frozen": [f"{f.node}: {list(f.values)}" for f in g.frozen],
        }
        for g in groups
    ]


class _Analysis:
    """Graph facts shared by every group's walk."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        graph = model.graph
        view = GraphView(model)
        self.sources: dict[str, TensorSource] = constant_sources(model)
        self.aliases = view.aliases
        self.nodes, self.labels = view.nodes, view.labels
        self.producer_index = view.producer_index
        self.outputs = {o.name for o in graph.output}
        inits = {t.name for t in graph.initializer}
        self.constant_inputs = {v.name for v in graph.input if v.name in inits}
        self.readers: dict[str, list[int]] = {name: [i for i, _ in reads] for name, reads in view.readers.items()}
        # Reads of each constant (through Identity chains), by real nodes: who would see a sliced tensor.
        self.constant_reads: dict[str, set[tuple[str, int]]] = {}
        for name, reads in view.readers.items():
            src = self.constant(name)
            if src is None:
                continue
            for i, k in reads:
                if self.nodes[i].op_type != "Identity":
                    self.constant_reads.setdefault(src, set()).add((self.labels[i], k))
        self.shapes = {name: list(dims) for name, (_, dims) in inferred_types(model, data_prop=True).items()
                       if dims is not None}
        self._values: dict[str, np.ndarray] = {}
        self.names = tensor_names(model)  # what a constant added for the cut (a frozen shape) must not be called
        # Measured dims, for attention heads (converters.heads); why they could not be measured, once.
        self._probe: Probe | NotPrunable | None = None

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
        if name not in self.shapes and name in self.producer_index:
            # Shape inference stopped (an ai.onnx.ml Scaler has no shape function): the dims measured in
            # onnxruntime, a dim that follows the inputs' sizes unknown.
            probe = self.probe()
            if not isinstance(probe, NotPrunable) and name in probe.dims:
                self.shapes[name] = [d if isinstance(d, int) else None for d in probe.dims[name]]
        return self.shapes.get(name)

    def probe(self) -> Probe | NotPrunable:
        """Every tensor's dims measured in onnxruntime (``heads.probe_shapes``), once; why they could not be."""
        if self._probe is None:
            try:
                self._probe = probe_shapes(self.model)
            except NotPrunable as exc:
                self._probe = exc
        return self._probe

    # -- groups ---------------------------------------------------------------------------------------

    def groups(self) -> list[ChannelGroup]:
        groups: list[ChannelGroup] = []
        seen: set[str] = set()
        depthwise_of: dict[str, str] = {}  # depthwise node label -> group name
        pending_depthwise: list[tuple[int, str, int]] = []
        for i, node in enumerate(self.nodes):
            if node.domain not in ("", "ai.onnx") or node.op_type not in LINEAR | RECURRENT:
                continue
            # MatMul: the constant right operand; a constant left one is listed as not prunable.
            index = self._weight_input(i)
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
                group = self._heads(i, weight, str(exc))
            listed = sorted(seen.intersection(group.members) - {weight})
            if group.prunable and listed:
                # Members listed before, not prunable from their own start: each walk must see the same
                # coupling, or a tensor would be cut twice.
                group = ChannelGroup(weight, label, node.op_type, group.n_channels, prunable=False,
                                     reason=f"coupled with {listed}, whose own walk did not find this group")
            if group.prunable:
                depthwise_of.update({n: group.name for n in group.depthwise_nodes})
                seen.update(group.members)
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

    def _heads(self, index: int, weight: str, reason: str) -> ChannelGroup:
        """The attention heads of a Q/K/V projection whose filters cannot leave the graph one by one; else
        the group, not prunable, with both reasons."""
        node = self.nodes[index]
        shape = self.value(weight).shape
        if node.op_type in ("MatMul", "Gemm") and feeds_attention(self, index):
            probe = self.probe()
            try:
                if isinstance(probe, NotPrunable):
                    raise probe
                return head_group(self, index, weight, probe)
            except NotPrunable as exc:
                reason = f"{reason}; as attention heads: {exc}"
        return ChannelGroup(weight, self.labels[index], node.op_type, _out_channels(node, shape), prunable=False,
                            reason=reason)

    def _weight_order(self) -> list[str]:
        names = []
        for node in self.nodes:
            for name in node.input:
                src = self.constant(name) if name else None
                if src is not None and src not in names:
                    names.append(src)
        return names

    def _group(self, index: int, weight: str) -> ChannelGroup:
        """The group of node ``index``'s output channels: its walk, grown by the producers of every branch
        its channels are summed with, until no sum waits for a branch."""
        n_channels = _out_channels(self.nodes[index], self.value(weight).shape)
        members = [index]
        blocks: dict[int, int] = {}  # member -> outer blocks of its filters, once a Split regrouped them
        while True:
            walk = ChannelWalk(self, weight, n_channels, names=self.names)
            try:
                walk.run([start for i in members for start in self._starts(walk, i, blocks.get(i, 1))])
            except Regroup as exc:
                if blocks:  # pieces of pieces
                    raise NotPrunable(f"{exc} after another Split regrouped them") from None
                n_channels //= exc.pieces
                blocks = {i: exc.pieces for i in members}
                continue
            if not walk.blocked:
                break
            found = []
            for i, other in walk.blocked.items():
                for producer in self.branch_producers(i, other):
                    if producer not in members and producer not in found:
                        found.append(producer)
            if not found:
                i, other = next(iter(walk.blocked.items()))
                raise NotPrunable(
                    f"coupled through {self.nodes[i].op_type} {self.labels[i]} with a branch ({other!r}) whose "
                    "channels do not come from the same layers in the same layout"
                )
            members += found
        walk.check_sharing()
        walk.check_shape_reads()
        members.sort()  # graph order: the first producer names the group
        # A recurrent layer's units are rows of both its W and its R.
        weights = tuple(self.constant(self.nodes[i].input[k]) for i in members
                        for k in (WEIGHT_INPUTS[self.nodes[i].op_type] if self.nodes[i].op_type in RECURRENT
                                  else (self._weight_input(i),)))
        return ChannelGroup(
            name=weights[0],
            node=self.labels[members[0]],
            op_type=self.nodes[members[0]].op_type,
            n_channels=walk.n,
            outputs=tuple(walk.outputs),
            consumers=tuple(walk.consumers),
            depthwise=tuple(walk.depthwise),
            depthwise_nodes=tuple(walk.depthwise_nodes),
            reshapes=tuple(walk.reshapes),
            activations=tuple(walk.reached),
            members=weights,
            member_nodes=tuple(self.labels[i] for i in members),
            frozen=tuple(walk.frozen),
            cleared=tuple(walk.cleared),
        )

    def _weight_input(self, index: int) -> int:
        """The input of a Conv/Gemm/MatMul node that holds its weight (MatMul: the constant operand)."""
        node = self.nodes[index]
        return 0 if node.op_type == "MatMul" and self.constant(node.input[1]) is None else 1

    def branch_producers(self, index: int, name: str) -> list[int]:
        """The layers whose output channels reach operand ``name`` of the sum ``index`` (walking back
        through its data inputs to the nearest Conv/Gemm/MatMul with a constant weight).

        Raises:
            NotPrunable: the branch comes from a graph input or from nothing such a layer produces.
        """
        node, label = self.nodes[index], self.labels[index]
        found: list[int] = []
        stack, seen = [name], set()
        while stack:
            tensor = stack.pop()
            if tensor in seen:
                continue
            seen.add(tensor)
            i = self.producer_index.get(tensor)
            if i is None:
                raise NotPrunable(
                    f"coupled through {node.op_type} {label} with a branch from the graph input {tensor!r}"
                )
            producer = self.nodes[i]
            weight = self.constant(producer.input[1]) if len(producer.input) > 1 else None
            if producer.op_type in RECURRENT and weight is not None:
                found.append(i)  # its hidden units
                continue
            if producer.op_type in LINEAR and weight is not None:
                # A depthwise Conv passes its input's channels on; any other layer makes the branch's
                # channels (a ConvTranspose too: the group then stops at its start, with the reason).
                depthwise = producer.op_type == "Conv" and node_attr(producer, "group", 1) != 1 and (
                    self.value(weight).shape[1] == 1)
                if not depthwise:
                    found.append(i)
                    continue
            # The channels come through the data operand (every computed operand of an elementwise op).
            inputs = producer.input if producer.op_type in BROADCAST else producer.input[:1]
            stack.extend(x for x in inputs if x and self.constant(x) is None)
        return found

    def known(self, name: str) -> np.ndarray | None:
        """The value of ``name`` when it is a constant, else None (``heads_split``'s rules read sizes so)."""
        src = self.constant(name)
        return self.value(src) if src is not None else None

    def _starts(self, walk: ChannelWalk, index: int, blocks: int = 1) -> list[tuple[str, ChannelLayout]]:
        """Record node ``index``'s weight (and bias) as cut along its output channels (in ``blocks`` outer
        blocks of the units, after a Split regrouped them: ``channel_blocks``); returns its outputs with where
        they hold them (a recurrent layer's hidden units: ``recurrent_units``)."""
        node, label = self.nodes[index], self.labels[index]
        if node.op_type in RECURRENT:
            if blocks != 1:
                raise NotPrunable(f"the hidden units of {node.op_type} {label} are split into pieces")
            return recurrent_starts(self, walk, index)
        return [self._start(walk, index, blocks)]

    def _start(self, walk: ChannelWalk, index: int, blocks: int) -> tuple[str, ChannelLayout]:
        """``_starts`` for a Conv, ConvTranspose, Gemm or MatMul: its one output."""
        node, label = self.nodes[index], self.labels[index]
        weight = self.constant(node.input[self._weight_input(index)])
        if weight in self.constant_inputs:
            raise fed_at_run_time(weight)
        shape = self.value(weight).shape
        if blocks != 1 and node.op_type != "Conv":
            raise NotPrunable(f"the filters of {node.op_type} {label} are split into pieces, which only a Conv's are")
        if node.op_type == "Conv":
            groups = node_attr(node, "group", 1)
            if groups != 1:
                if shape[1] == 1:  # weight [C*m, C_in/group, ...] with C_in/group == 1
                    raise _Depthwise
                raise NotPrunable(f"grouped Conv (group={groups}) is not handled")
            walk.slice(weight, 0, "weight", ChannelLayout(0, outer=blocks), (label, 1))
            if len(node.input) > 2 and node.input[2]:
                walk.slice_input(node.input[2], 0, "bias", ChannelLayout(0, outer=blocks), (label, 2))
            return node.output[0], ChannelLayout(1, outer=blocks)
        if node.op_type == "ConvTranspose":  # weight [C_in, C_out, k...]: the filters are along axis 1
            if node_attr(node, "group", 1) != 1:
                raise NotPrunable(f"grouped ConvTranspose (group={node_attr(node, 'group', 1)}) is not handled")
            walk.slice(weight, 1, "weight", ChannelLayout(0), (label, 1))
            if len(node.input) > 2 and node.input[2]:
                walk.slice_input(node.input[2], 0, "bias", ChannelLayout(0), (label, 2))
            return node.output[0], ChannelLayout(1)
        if node.op_type == "Gemm":
            trans_b = node_attr(node, "transB", 0)
            walk.slice(weight, 0 if trans_b else 1, "weight", ChannelLayout(0), (label, 1))
            if len(node.input) > 2 and node.input[2]:
                if self.constant(node.input[2]) is None:
                    raise NotPrunable(f"Gemm {label} adds a computed C")
                walk.broadcast_constant(node.input[2], ChannelLayout(1), (label, 2), out_rank=2, role="bias")
            return node.output[0], ChannelLayout(1)
        if node.op_type == "MatMul":
            if self.constant(node.input[1]) is None:
                raise NotPrunable("MatMul with a constant left operand: its output channels are not its weight's")
            if len(shape) != 2:
                raise NotPrunable(f"MatMul weight of rank {len(shape)} is not handled")
            walk.slice(weight, 1, "weight", ChannelLayout(0), (label, 1))
            out_shape = self.shape(node.output[0])
            if out_shape is None:
                raise NotPrunable(f"the shape of {node.output[0]!r} is unknown (shape inference failed)")
            return node.output[0], ChannelLayout(len(out_shape) - 1)
        raise NotPrunable(f"{node.op_type} weights are not handled (only Conv, ConvTranspose, Gemm, MatMul)")


class _Depthwise(Exception):
    """The weight is a depthwise Conv's: listed after the groups that carry it."""


def _out_channels(node: onnx.NodeProto, shape: tuple[int, ...]) -> int:
    if node.op_type in RECURRENT:
        return hidden_units(node, shape)
    if node.op_type == "Gemm":
        return shape[0] if node_attr(node, "transB", 0) else shape[1]
    if node.op_type == "MatMul":
        return shape[-1]
    if node.op_type == "ConvTranspose":
        return shape[1] * node_attr(node, "group", 1)
    return shape[0]
