"""The forward walk of one channel group: the rules per op that say where the channels go and what must
shrink with them (``converters.groups`` describes the whole analysis)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import onnx

from onnx_admm.converters.channel_blocks import joined_blocks, joined_range, split_blocks
from onnx_admm.converters.channel_reshape import flatten_layout, reshape_layout
from onnx_admm.converters.channel_select import select_step
from onnx_admm.converters.channels import (ChannelLayout, FrozenShape, NotPrunable, ShapeEdit, TensorSlice,
                                            fed_at_run_time)
from onnx_admm.converters.graphinfo import fresh_name, node_attr
from onnx_admm.converters.optable import BROADCAST, POOLS, RECURRENT, REDUCE, UNARY
from onnx_admm.converters.shape_entries import Entry, check_shape_reads, shape_entries


@dataclass
class ChannelWalk:
    """One group's forward walk from its producer's output."""

    a: Any  # the graph facts of groups._Analysis: nodes, labels, readers, constants and shapes
    name: str
    n: int
    reached: dict[str, ChannelLayout] = field(default_factory=dict)
    outputs: list[TensorSlice] = field(default_factory=list)
    consumers: list[TensorSlice] = field(default_factory=list)
    depthwise: list[TensorSlice] = field(default_factory=list)
    depthwise_nodes: list[str] = field(default_factory=list)
    reshapes: list[ShapeEdit] = field(default_factory=list)
    # Computed inputs (a Reshape's shape) that get a constant of their own before the cut; ``names``: every
    # tensor name of the model, which those constants must not take.
    frozen: list[FrozenShape] = field(default_factory=list)
    # (node label, input index) of zero initial states that the cut drops (``converters.recurrent_units``).
    cleared: list[tuple[str, int]] = field(default_factory=list)
    names: set[str] = field(default_factory=set)
    # Reshapes whose computed shape follows the cut (``shape_entries.computed_reshape``).
    follows: set[str] = field(default_factory=set)
    # Shape nodes that read a tensor carrying the channels (``check_shape_reads``).
    shape_reads: list[int] = field(default_factory=list)
    # Resize nodes given sizes computed at run time: label -> the sizes' entries and the channels' layout,
    # checked once the walk knows every tensor that carries the channels (``check_shape_reads``).
    sized: dict[str, tuple[list[Entry], ChannelLayout]] = field(default_factory=dict)

    # Broadcasting ops (node index) whose other computed operand (the value) does not carry the channels:
    # ``run`` leaves them waiting here; ``groups`` couples the producers of that operand or gives up.
    blocked: dict[int, str] = field(default_factory=dict)

    def entries(self, layout: ChannelLayout) -> int:
        """Length of the channel axis of an activation or constant holding the channels in ``layout``."""
        if layout.stride is not None:  # blocks inside a joined axis of ``total`` channels
            return layout.total * layout.inner
        return layout.outer * (self.n if layout.total is None else layout.total) * layout.inner

    def run(self, starts: list[tuple[str, ChannelLayout]]) -> None:
        """Follow the channels from the producers' outputs ``starts``; ops waiting for another branch are
        left in ``blocked``."""
        queue = list(starts)
        done: set[int] = set()
        waiting: dict[int, str] = {}  # node index -> the operand not (yet) known to carry the channels
        # Concats step once everything else has: every input that carries the channels is known by then (a
        # C2f block's Concat of both Split pieces and the bottleneck's sum; an SPPF's of x and its pools).
        joins: set[int] = set()
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
                        # Stepped already through another input. A broadcasting op waits for all its operands, so
                        # this is another op reading the channels twice (an SPPF's Concat of x and its pools):
                        # its second copy would keep every channel.
                        if self.a.nodes[i].op_type not in BROADCAST and not self._stacks(i):
                            raise NotPrunable(f"the channels reach {self.a.nodes[i].op_type} {self.a.labels[i]} "
                                              "through several inputs")
                        continue
                    if self.a.nodes[i].op_type == "Concat" and not self._stacks(i):
                        joins.add(i)
                        continue
                    other = self._blocking_operand(i)
                    if other is not None:
                        waiting[i] = other
                        continue
                    waiting.pop(i, None)
                    done.add(i)
                    queue.extend(self._step(i))
            ready = [i for i in waiting if self._blocking_operand(i) is None]
            if ready:
                for i in ready:
                    del waiting[i]
                    done.add(i)
                    queue.extend(self._step(i))
            elif joins and not waiting:
                # The first in graph order (a later Concat may read what it joins, not the reverse), once no sum
                # waits for a branch: coupling it may bring the Concat another of its inputs.
                i = min(joins)
                joins.discard(i)
                done.add(i)
                queue.extend(self._step(i))
            else:
                break
        self.blocked = waiting

    def _blocking_operand(self, i: int) -> str | None:
        """For a broadcasting op (or a Concat along another axis), an operand that is computed but does not carry
        this group's channels."""
        node = self.a.nodes[i]
        if node.op_type not in BROADCAST and not self._stacks(i):
            return None
        for name in node.input:
            if name and name not in self.reached and self.a.constant(name) is None and (
                    self._reshaped_constant(name) is None):
                return name
        return None

    def _stacks(self, i: int) -> bool:
        """Node ``i`` is a Concat along another axis than the channels' (the stacked final states of a torch
        RNN's layers, a class token before the patches): every input holds the same channels, as a sum's
        operands do (the producers of the others are coupled to the group), a constant one is cut alike."""
        node = self.a.nodes[i]
        carried = next((x for x in node.input if x in self.reached), None)
        if node.op_type != "Concat" or carried is None:
            return False
        rank = len(self.a.shape(carried) or ())
        return bool(rank) and node_attr(node, "axis", 0) % rank != self.reached[carried].axis

    # -- slices -----------------------------------------------------------------------------------------

    def slice(self, tensor: str, axis: int, role: str, layout: ChannelLayout, read: tuple[str, int]) -> None:
        """Record that ``tensor`` (a constant) is cut along ``axis`` with the blocks of ``layout``."""
        shape = self.a.value(tensor).shape
        expected = self.entries(layout)
        if axis >= len(shape) or shape[axis] != expected:
            raise NotPrunable(
                f"{tensor!r} of shape {list(shape)} does not have {expected} entries along axis {axis}"
            )
        target = {"consumer": self.consumers, "depthwise": self.depthwise}.get(role, self.outputs)
        new = TensorSlice(tensor, axis, role, layout.inner, layout.outer, (read,), layout.offset, layout.total,
                          layout.stride)
        for k, existing in enumerate(target):
            if existing.tensor == tensor:
                if dataclasses.replace(existing, role=role, nodes=new.nodes) != new:
                    raise NotPrunable(f"{tensor!r} would be cut in two different ways")
                target[k] = dataclasses.replace(existing, nodes=existing.nodes + (read,))
                return
        for other in self.outputs + self.consumers + self.depthwise:
            if other.tensor == tensor and other.axis == axis:
                raise NotPrunable(f"{tensor!r} would be cut in two different ways")
        target.append(new)

    def slice_input(self, name: str, axis: int, role: str, layout: ChannelLayout, read: tuple[str, int]) -> None:
        src = self.a.constant(name)
        if src is None:
            raise NotPrunable(f"{role} {name!r} of {read[0]} is computed, not a constant")
        self.slice(src, axis, role, layout, read)

    def broadcast_constant(
        self, name: str, layout: ChannelLayout, read: tuple[str, int], out_rank: int, role: str = "constant"
    ) -> None:
        """A constant operand of a broadcasting op: cut it when it has one entry per channel position."""
        src = self.a.constant(name)
        assert src is not None
        shape = self.a.value(src).shape
        full = self.entries(layout)
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
                raise fed_at_run_time(tensor)
            extra = sorted(self.a.constant_reads.get(tensor, set()) - reads)
            if extra:
                raise NotPrunable(
                    f"{tensor!r} is also read by {extra[0][0]} (input {extra[0][1]}); exporters merge equal "
                    "initializers: give each use its own copy first"
                )

    def check_shape_reads(self) -> None:
        """Every Shape of a tensor that carries the channels feeds only what the cut keeps right
        (``shape_entries.check_shape_reads``)."""
        check_shape_reads(self)

    def own_copy(self, i: int, values: list[int], input: int = 1, what: str = "shape",
                 dims: tuple[int, ...] | None = None) -> str:
        """A new constant holding ``values`` (of ``dims`` where not 1-D) that the shrink pass feeds to input
        ``input`` of node ``i`` alone (a Reshape's shape; a Split's sizes, a Slice's bounds; an Expand's
        shape, a Mul's head count)."""
        label = self.a.labels[i]
        tensor = fresh_name(f"{label}_{what}", self.names | {f.tensor for f in self.frozen})
        self.frozen.append(FrozenShape(label, tensor, tuple(int(v) for v in values), input,
                                       None if dims is None else tuple(dims)))
        return tensor

    # -- one node ------------------------------------------------------------------------------------

    def _step(self, i: int) -> list[tuple[str, ChannelLayout]]:
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
            return self._broadcast(i, layout)
        if op in POOLS:
            data_input_only()
            outputs_used((0,))
            self._need_nchw(layout, op, label)
            return [(node.output[0], layout)]
        if op in ("Resize", "Upsample"):
            # Upsampling in FPNs and decoders: the channels pass when the channel axis keeps scale 1, or its
            # size is computed from the channels' own count. Constant sizes are not handled.
            data_input_only()
            outputs_used((0,))
            # Upsample and opset 10's Resize: (X, scales); from opset 11 Resize: (X, roi, scales, sizes).
            scales = node.input[1] if len(node.input) == 2 else node.input[2]
            sizes = node.input[3] if op == "Resize" and len(node.input) > 3 else ""
            if sizes:
                # Sizes computed from the shapes around it (torch's size=y.shape[2:], paddle2onnx's upsampling):
                # checked once the walk is done, when every tensor that carries the channels is known.
                entries = shape_entries(a, sizes)
                if entries is None or len(entries) != rank:
                    raise NotPrunable(f"{op} {label} takes sizes computed in a way that is not followed")
                self.sized[label] = (entries, layout)
                return [(node.output[0], layout)]
            constant = a.constant(scales) if scales else None
            if constant is None:
                raise NotPrunable(f"{op} {label} takes its scales at run time, which is not handled")
            values = a.value(constant).reshape(-1)
            if len(values) != rank or values[layout.axis] != 1:
                raise NotPrunable(f"{op} {label} scales the channel axis")
            return [(node.output[0], layout)]
        if op in ("BatchNormalization", "InstanceNormalization"):
            data_input_only()
            outputs_used((0,))
            self._need_nchw(layout, op, label)
            for k2 in range(1, len(node.input)):
                self.slice_input(node.input[k2], 0, "batchnorm", layout.along(0), (label, k2))
            return [(node.output[0], layout)]
        if op == "Conv":
            data_input_only()
            return self._conv(i, layout)
        if op == "ConvTranspose":  # weight [C_in, C_out, k...]: it reads the channels along axis 0
            data_input_only()
            self._need_nchw(layout, op, label)
            if a.constant(node.input[1]) is None or node_attr(node, "group", 1) != 1:
                raise NotPrunable(f"the channels reach ConvTranspose {label} with a computed weight or groups")
            self.slice_input(node.input[1], 0, "consumer", layout, (label, 1))
            return []
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
        if op in RECURRENT:
            # A CRNN's last conv feeding its LSTM: W [directions, gates * hidden, input] reads the channels along
            # axis 2 (X is [seq, batch, input] or batch first: the input axis is last either way); R and the
            # hidden units stay.
            data_input_only()
            if layout.axis != rank - 1:
                raise NotPrunable(f"{op} {label} reads the channels on an axis other than its input axis")
            if a.constant(node.input[1]) is None:
                raise NotPrunable(f"the channels reach {op} {label}, whose input weight is computed")
            self.slice_input(node.input[1], 2, "consumer", layout, (label, 1))
            return []
        if layout.stride is not None and op in ("Flatten", "Reshape"):
            raise NotPrunable(f"{op} {label} reshapes channels held in blocks among other channels")
        if op == "Flatten":
            data_input_only()
            dims = a.shape(name)
            axis = node_attr(node, "axis", 1)
            return [(node.output[0], flatten_layout(self, dims, layout, axis + rank if axis < 0 else axis, label))]
        if op == "Reshape":
            data_input_only()
            return [(node.output[0], self._reshape(i, name, layout))]
        if op == "Transpose":
            data_input_only()
            perm = list(node_attr(node, "perm", list(range(rank))[::-1]))
            return [(node.output[0], layout.along(perm.index(layout.axis)))]
        if op in ("Squeeze", "Unsqueeze"):
            data_input_only()
            axes = self._axes(node, label)
            if op == "Unsqueeze":
                out_rank = rank + len(axes)
                new = layout.axis
                for ax in sorted(x % out_rank for x in axes):
                    if ax <= new:
                        new += 1
                return [(node.output[0], layout.along(new))]
            dims = a.shape(name) or []
            squeezed = [x % rank for x in axes] if axes is not None else [d for d, v in enumerate(dims) if v == 1]
            if axes is None and any(not isinstance(v, int) for v in dims):
                raise NotPrunable(f"Squeeze {label} without axes on a tensor of unknown shape")
            if layout.axis in squeezed:
                raise NotPrunable(f"Squeeze {label} removes the channel axis")
            new = layout.axis - sum(ax < layout.axis for ax in squeezed)
            return [(node.output[0], layout.along(new))]
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
            return [(node.output[0], layout.along(new))]
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
        if op == "Concat" and self._stacks(i):
            return self._broadcast(i, layout)
        if op == "Concat":
            if len(carried) > 1:  # the group's channels joined to themselves: blocks of the same units
                return [(node.output[0], joined_blocks(self, i, carried, layout, rank))]
            return [(node.output[0], joined_range(self, i, carried, layout, rank))]
        if op == "Shape":  # reads the dims alone: allowed where they only feed shapes frozen to constants
            self.shape_reads.append(i)
            return []
        if op == "Split":
            return split_blocks(self, i, layout, rank)
        if op in ("Slice", "Gather"):
            return select_step(self, i, layout, rank)
        if op in ("Softmax", "LogSoftmax", "LayerNormalization"):
            raise NotPrunable(f"the channels reach {op} {label}, which is not handled")
        raise NotPrunable(f"the channels reach {op} {label}, an op this analysis does not know")

    def _broadcast(self, i: int, layout: ChannelLayout, passive: frozenset[str] = frozenset()) -> list[
            tuple[str, ChannelLayout]]:
        """An elementwise op: every operand that carries the channels holds them alike, a constant one is
        cut where it has an entry per channel; ``passive`` operands (computed, the same for every
        channel) are left as they are."""
        a = self.a
        node, label = a.nodes[i], a.labels[i]
        out_shape = a.shape(node.output[0])
        if out_shape is None:
            raise NotPrunable(f"the shape of the output of {node.op_type} {label} is unknown")
        out_rank = len(out_shape)
        for k, name in enumerate(node.input):
            if not name or name in passive:
                continue
            if name in self.reached:
                if self.reached[name] != layout or len(a.shape(name) or ()) != out_rank:
                    raise NotPrunable(f"the operands of {node.op_type} {label} hold the channels in different layouts")
            elif self._reshaped_constant(name) is not None:
                self._cut_reshaped_constant(name, layout, out_rank)
            else:
                self.broadcast_constant(name, layout, (label, k), out_rank)
        return [(node.output[0], layout)]

    def _reshaped_constant(self, name: str) -> int | None:
        """The node index of the Reshape that computes ``name`` from a 1-D constant and a constant shape (the
        float form of quantize_dynamic's conv adds its bias so: ``Reshape(bias, [1, C, 1, 1])``), else None."""
        i = self.a.producer_index.get(name)
        if i is None or self.a.nodes[i].op_type != "Reshape" or len(self.a.readers.get(name, [])) != 1:
            return None
        source, shape = (self.a.constant(x) for x in self.a.nodes[i].input[:2])
        return i if source is not None and shape is not None and self.a.value(source).ndim == 1 else None

    def _cut_reshaped_constant(self, name: str, layout: ChannelLayout, out_rank: int) -> None:
        """Cut the 1-D constant behind ``name`` (``_reshaped_constant``) and the Reshape's shape entry that holds
        the channels, when it has an entry per channel position (a size of 1 there broadcasts: nothing to cut)."""
        a = self.a
        i = self._reshaped_constant(name)
        label, (source, shape) = a.labels[i], (a.constant(x) for x in a.nodes[i].input[:2])
        target = [int(v) for v in a.value(shape).reshape(-1)]
        axis = layout.axis - (out_rank - len(target))
        if len(target) > out_rank or axis < 0 or target[axis] == 1:
            if len(target) > out_rank:
                raise NotPrunable(f"Reshape {label} raises the rank of the constant it broadcasts")
            return
        # -1 there takes whatever the cut constant holds (quantize_dynamic's [1, -1, 1, 1]); a size is edited.
        entries = self.entries(layout)
        size = entries if target[axis] == -1 and target.count(-1) == 1 and 0 not in target else target[axis]
        if size != entries or len(a.value(source)) != entries:
            raise NotPrunable(f"Reshape {label} of a constant does not hold one entry per channel on the channel axis")
        self.slice(source, 0, "constant", layout.along(0), (label, 0))
        if target[axis] != -1:
            self.reshapes.append(ShapeEdit(shape, label, axis, layout.inner * layout.outer))
        self.reached[name] = layout.along(axis)

    def _need_nchw(self, layout: ChannelLayout, op: str, label: str) -> None:
        # Outer blocks on axis 1 (a C2f's Concat of its pieces) are channel positions like any other: the
        # slices cut a Conv's input axis, a norm's parameters at the same positions.
        if layout.axis != 1:
            raise NotPrunable(f"{op} {label} expects the channels on axis 1")

    def _conv(self, i: int, layout: ChannelLayout) -> list[tuple[str, ChannelLayout]]:
        a = self.a
        node, label = a.nodes[i], a.labels[i]
        self._need_nchw(layout, "Conv", label)
        weight = a.constant(node.input[1])
        if weight is None:
            raise NotPrunable(f"Conv {label} has a computed weight")
        shape = a.value(weight).shape
        groups = node_attr(node, "group", 1)
        full = self.entries(layout)
        if groups == 1:
            self.slice(weight, 1, "consumer", layout, (label, 1))
            return []
        if groups == full and shape[1] == 1 and layout.outer == 1:
            multiplier = shape[0] // groups
            follows = dataclasses.replace(layout, inner=layout.inner * multiplier)
            self.slice(weight, 0, "depthwise", follows.along(0), (label, 1))
            if len(node.input) > 2 and node.input[2]:
                self.slice_input(node.input[2], 0, "depthwise", follows.along(0), (label, 2))
            self.depthwise_nodes.append(label)
            return [(node.output[0], follows)]
        raise NotPrunable(f"the channels reach grouped Conv {label} (group={groups}), which is not handled")

    def _reshape(self, i: int, name: str, layout: ChannelLayout) -> ChannelLayout:
        """Where Reshape ``i`` puts the channels (attention heads follow rules of their own)."""
        return reshape_layout(self, i, name, layout)

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
