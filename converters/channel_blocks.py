"""A group's channels split into pieces and joined again: YOLOv8's C2f block (``cv1``'s output split in two,
both pieces and the bottlenecks' sums joined by one Concat before ``cv2``) and an SPPF's Concat of a tensor
and its pools (``converters.groups`` describes the whole walk).

A Split of the channel axis into k equal pieces makes the group's units k-tuples of filters: unit j is filter
j of every piece, so each piece holds all the units once and removing unit j removes filter j from every
piece (the producer's weight is cut in k outer blocks, ``ChannelLayout.outer``). The walk meets the Split
holding the filters one by one; it raises :class:`Regroup` and the group's walk starts again from its
producers with ``n / k`` units in k blocks (``groups._Analysis._group``). Each piece's size shrinks by one
per removed unit (a constant of its own where given, ``ShapeEdit``); equal pieces without sizes stay equal.

A Concat whose inputs all carry the group's units, one block each, holds them in as many blocks (the C2f's
Concat of its pieces and of the bottlenecks that add to the second one, which the residual sums couple to
the group; an SPPF's of x and its three pools). Joined with other channels (a neck C2f without shortcut:
both halves, then the bottleneck's own channels), consecutive copies hold the units in blocks ``n`` apart
inside the joined axis (``ChannelLayout.stride``); anything else stops the group there with the reason. A Concat that the channels reach
through one input holds them as one range of the joined channels (``joined_range``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from onnx_admm.converters.channels import ChannelLayout, NotPrunable
from onnx_admm.converters.graphinfo import node_attr
from onnx_admm.converters.heads_split import split_step

__all__ = ["Regroup", "joined_blocks", "joined_range", "split_blocks"]


class Regroup(Exception):
    """The group's channels meet a Split into ``pieces`` equal pieces: start again with units of that many
    filters (one from each piece)."""

    def __init__(self, pieces: int, label: str) -> None:
        super().__init__(f"Split {label} cuts the channels into {pieces} pieces")
        self.pieces = pieces


def split_blocks(walk: Any, i: int, layout: ChannelLayout, rank: int) -> list[tuple[str, ChannelLayout]]:
    """Split node ``i`` of ``walk`` (a ``channel_walk.ChannelWalk``) with its data holding the channels in
    ``layout``: the outputs that hold them and where.

    Raises:
        Regroup: the Split cuts whole channels into equal pieces; the walk must start again in blocks.
        NotPrunable: pieces that cut through the units' blocks, unknown sizes.
    """
    a = walk.a
    node, label = a.nodes[i], a.labels[i]
    axis = node_attr(node, "axis", 0) % rank
    plain = (layout.outer == 1 and layout.inner == 1 and layout.offset == 0 and layout.total is None
             and layout.stride is None)
    outputs = [out for out in node.output]
    if axis == layout.axis and plain and len(outputs) > 1:
        if node_attr(node, "split") is not None:
            raise NotPrunable(f"Split {label} holds its sizes in an attribute (opset < 13), which is not edited")
        if len(node.input) > 1 and node.input[1]:
            value = a.known(node.input[1])
            if value is None:
                raise NotPrunable(f"the sizes of Split {label} are computed")
            sizes = [int(v) for v in value.reshape(-1)]
        else:
            sizes = [walk.n // len(outputs)] * len(outputs) if walk.n % len(outputs) == 0 else []
        if len(set(sizes)) != 1 or sizes[0] * len(sizes) != walk.n:
            raise NotPrunable(f"Split {label} cuts the {walk.n} channels into unequal pieces {sizes}")
        raise Regroup(len(sizes), label)
    return split_step(walk, i, layout, rank)


def joined_blocks(walk: Any, i: int, carried: list[tuple[int, str]], layout: ChannelLayout,
                  rank: int) -> ChannelLayout:
    """Concat node ``i`` of ``walk`` reached through several inputs (``carried``: index, tensor): every input
    must hold the group's units alike, in blocks; the output holds them in the blocks of all of them."""
    a = walk.a
    node, label = a.nodes[i], a.labels[i]
    axis = node_attr(node, "axis") % rank
    inputs = [k for k, name in enumerate(node.input) if name]
    if axis != layout.axis:
        raise NotPrunable(f"Concat {label} joins copies of the channels along axis {axis}, not the channel axis")
    layouts = {walk.reached[name] for _, name in carried}
    if (len(layouts) != 1 or layout.inner != 1 or layout.offset != 0 or layout.total is not None
            or layout.stride is not None):
        raise NotPrunable(f"the channels reach Concat {label} through several inputs in different layouts")
    indices = [k for k, _ in carried]
    if indices == inputs:
        return dataclasses.replace(layout, outer=layout.outer * len(carried))
    # Beside other channels (YOLOv8's neck C2f: both halves, then a bottleneck's own output): one block per
    # copy, consecutive, each of the units alone, ``stride`` = n apart within the joined axis.
    sizes = [(a.shape(name) or [None] * rank)[axis] if name else 0 for name in node.input]
    if (layout.outer != 1 or indices != list(range(indices[0], indices[-1] + 1))
            or any(sizes[k] != walk.n for k in indices) or any(not isinstance(s, int) for s in sizes)):
        raise NotPrunable(f"Concat {label} joins copies of the channels with other channels, not as consecutive "
                          "blocks of the units")
    return dataclasses.replace(layout, outer=len(carried), offset=sum(sizes[: indices[0]]), total=sum(sizes),
                               stride=walk.n)


def joined_range(walk: Any, i: int, carried: list[tuple[int, str]], layout: ChannelLayout,
                 rank: int) -> ChannelLayout:
    """Concat on the channel axis: the group's channels become one range of the joined channels (the
    other inputs' channels, another group's or none, keep theirs)."""
    a = walk.a
    node, label = a.nodes[i], a.labels[i]
    axis = node_attr(node, "axis")
    axis = axis + rank if axis < 0 else axis
    if axis != layout.axis:
        # Joined along another axis, both inputs hold the same channels: a coupling Concat does not make.
        raise NotPrunable(f"Concat {label} joins along axis {axis}, not the channel axis {layout.axis}")
    if layout.outer != 1 or layout.stride is not None:
        raise NotPrunable(f"Concat {label} joins channels laid out in outer blocks")
    sizes = [(a.shape(name) or [None] * rank)[axis] if name else 0 for name in node.input]
    if any(not isinstance(size, int) for size in sizes):
        raise NotPrunable(f"the inputs of Concat {label} have unknown sizes on the channel axis")
    before, total = sum(sizes[: carried[0][0]]), sum(sizes)
    if before % layout.inner or total % layout.inner:
        raise NotPrunable(f"Concat {label} joins blocks that do not line up with the channels' blocks")
    return dataclasses.replace(layout, offset=layout.offset + before // layout.inner, total=total // layout.inner)
