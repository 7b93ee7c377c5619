"""The types of channel-group analysis: which slices of which tensors go with a group of output channels.

``converters.groups`` finds the groups (``channel_groups``), ``converters.channel_walk`` holds the rules
per op that follow the channels through the graph, ``converters.shrink`` cuts them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TensorSlice:
    """The entries of constant ``tensor`` that belong to the group's channels, along ``axis``.

    Along ``axis`` (length ``outer * n_channels * inner``) channel ``c`` owns the positions
    ``o * total * inner + (offset + c) * inner + i`` for ``o < outer`` and ``i < inner``: ``inner = H*W``
    after a ``[C, H, W]`` flatten (or the multiplier of a depthwise Conv), ``outer = H*W`` after a
    channels-last one. ``total`` is the number of channels of the axis (``n_channels`` when None) and
    ``offset`` where the group's channels start: after a Concat on the channel axis each input's group
    owns its own range of the concatenated channels. ``stride`` (None: ``total``) replaces ``total`` as the
    distance between outer blocks: a Concat of two copies of the units beside other channels (YOLOv8's neck
    C2f) holds them in 2 blocks ``stride = n_channels`` apart from ``offset``, within ``total``. ``nodes``
    lists the (node label, input index) reads this slice accounts for.
    """

    tensor: str
    axis: int
    role: str  # weight | bias | batchnorm | constant | depthwise | consumer
    inner: int = 1
    outer: int = 1
    nodes: tuple[tuple[str, int], ...] = ()
    offset: int = 0
    total: int | None = None
    stride: int | None = None

    def positions(self, n_channels: int, channels: np.ndarray) -> np.ndarray:
        """Indices along ``axis`` owned by ``channels`` (sorted when ``channels`` is), for a group of
        ``n_channels``."""
        channels = np.asarray(channels, dtype=np.int64)
        total = n_channels if self.total is None else self.total
        step = total if self.stride is None else self.stride
        outer = np.arange(self.outer, dtype=np.int64)[:, None, None] * (step * self.inner)
        mid = (self.offset + channels[None, :, None]) * self.inner
        inner = np.arange(self.inner, dtype=np.int64)[None, None, :]
        return (outer + mid + inner).reshape(-1)


@dataclass(frozen=True)
class ShapeEdit:
    """Entry ``index`` of the constant shape ``tensor`` of Reshape ``node`` holds the merged size that
    contains the channels (or of a Split's sizes, a Slice's bounds: a multiple of the units' block); each
    removed channel takes ``per_channel`` from it (a negative bound counted from the end gives it back)."""

    tensor: str
    node: str
    index: int
    per_channel: int


@dataclass(frozen=True)
class FrozenShape:
    """Input ``input`` of ``node`` (a Reshape's shape; a Split's sizes, a Slice's bounds) gets a constant of
    its own, ``tensor`` holding ``values``, before the group's units are cut: it was computed at run time
    (from Shape nodes; -1 at a dim that follows the inputs' dynamic dims, 0 at one that copies the input's
    dim at the same index: the Reshape's allowzero becomes 0), or its constant is shared
    with other nodes (exporters share one per layer stack). ``ShapeEdit`` entries on ``tensor`` then edit
    this node's input alone. ``dims``: the constant's dims where it is not a 1-D list (a Mul's scalar
    head count)."""

    node: str
    tensor: str
    values: tuple[int, ...]
    input: int = 1
    dims: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ChannelGroup:
    """The output channels of one weight and everything coupled to them.

    Several producers whose outputs meet in a residual sum (Add/Sum of branches carrying the same
    channels) form ONE group: removing channel ``c`` removes it from every member at once.

    Attributes:
        name: The (first) producer's weight tensor (the key ``shrink`` takes).
        node: Label of the (first) producing node (``graphinfo.node_label``).
        op_type: Conv, ConvTranspose, Gemm, MatMul, or LSTM / GRU / RNN (hidden units; other weights appear as
            not prunable).
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
        members: The weights of every producer of the channels, ``name`` first (one for an uncoupled
            group); ``member_nodes`` their nodes' labels.
        unit: What one of the ``n_channels`` is: ``channel`` (a filter, a neuron) or ``head`` (an
            attention head: a block of rows of each of Q, K and V, of one fused projection or of each
            member, see ``converters.heads``).
        frozen: Computed Reshape shapes the shrink pass replaces with constants first.
        cleared: (node label, input index) of a recurrent layer's zero initial states, computed with its
            hidden size in their shape: the cut leaves those inputs out (zero by the op's definition).
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
    members: tuple[str, ...] = ()
    member_nodes: tuple[str, ...] = ()
    unit: str = "channel"
    frozen: tuple[FrozenShape, ...] = ()
    cleared: tuple[tuple[str, int], ...] = ()

    @property
    def producers(self) -> tuple[str, ...]:
        """The weights whose output channels these are: ``members``, or ``name`` alone."""
        return self.members or (self.name,)

    def units_kept(self, weight: str, rows: np.ndarray) -> np.ndarray:
        """Which of the ``n_channels`` units stay, from a bool per index of ``weight``'s output axis (a
        producer's filters): a unit stays while any of its rows does (a head owns a block of rows)."""
        piece = next((s for s in self.outputs if s.tensor == weight and s.role == "weight"), None)
        if piece is None or (piece.inner == 1 and piece.outer == 1):
            return np.asarray(rows, dtype=bool)
        return np.array([rows[piece.positions(self.n_channels, np.array([c]))].any()
                         for c in range(self.n_channels)])

    def blocks(self, weight: str) -> tuple[int, int]:
        """(outer, inner): how one unit's rows lie along ``weight``'s output axis (1, 1 for a filter)."""
        piece = next((s for s in self.outputs if s.tensor == weight and s.role == "weight"), None)
        return (1, 1) if piece is None else (piece.outer, piece.inner)

    @property
    def slices(self) -> tuple[TensorSlice, ...]:
        """Every constant slice of the group: outputs, depthwise, consumers."""
        return self.outputs + self.depthwise + self.consumers


class NotPrunable(Exception):
    """Raised inside the walk; its message is the group's ``reason``."""


def fed_at_run_time(tensor: str) -> NotPrunable:
    """The reason for a constant that is also a graph input: its shape is part of the graph's I/O, which a cut
    would change (the TorchScript exporter's ``keep_initializers_as_inputs=True`` lists every weight so)."""
    return NotPrunable(f"{tensor!r} is also a graph input (it can be fed at run time, as exports with "
                       "keep_initializers_as_inputs=True list every weight; re-export without it to remove filters)")


@dataclass(frozen=True)
class ChannelLayout:
    """Where the channels are in an activation: ``axis``, the inner/outer blocks and the range of a
    concatenated axis they hold (see TensorSlice)."""

    axis: int
    inner: int = 1
    outer: int = 1
    offset: int = 0
    total: int | None = None
    stride: int | None = None

    def along(self, axis: int) -> ChannelLayout:
        """The same channels (blocks and range) on another axis."""
        return ChannelLayout(axis, self.inner, self.outer, self.offset, self.total, self.stride)
