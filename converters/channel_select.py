"""Slice and Gather along an axis other than the channels' (``converters.groups`` describes the whole walk).

A bidirectional recurrent layer's Y ``[seq, 2, batch, H]`` is cut into its directions by a Slice of axis 1
(tf2onnx's Keras Bidirectional), and a classifier reads the last layer's state ``Y_h[-1]`` by a Gather of
axis 0 (torch's ``h[-1]``); a transformer's ``x[:, 0]`` picks its first token so. Each picks positions of
the other axes and leaves every channel where it was: the channels pass (a Gather with indices of rank r
replaces its axis by r axes). A Slice or Gather of the channel axis itself still stops the group.
"""

from __future__ import annotations

from typing import Any

from onnx_admm.converters.channels import ChannelLayout, NotPrunable
from onnx_admm.converters.graphinfo import node_attr

__all__ = ["select_step", "slice_axes"]


def select_step(walk: Any, i: int, layout: ChannelLayout, rank: int) -> list[tuple[str, ChannelLayout]]:
    """Slice or Gather node ``i`` of ``walk`` (a ``channel_walk.ChannelWalk``) reading the channels, held in
    ``layout`` by a tensor of ``rank``, through its data input: its output and where it holds them.

    Raises:
        NotPrunable: it picks along the channel axis, or along axes it computes or of unknown count.
    """
    a = walk.a
    node, label = a.nodes[i], a.labels[i]
    op = node.op_type
    if any(k != 0 for k, name in enumerate(node.input) if name in walk.reached):
        raise NotPrunable(f"the channels reach an index input of {op} {label}")
    if not rank:
        raise NotPrunable(f"the rank of the input of {op} {label} is unknown (shape inference failed)")
    if op == "Gather":
        axis = node_attr(node, "axis", 0) % rank
        if axis == layout.axis:
            raise NotPrunable(f"Gather {label} picks channels")
        indices = a.shape(node.input[1])
        if indices is None:
            raise NotPrunable(f"the indices of Gather {label} have an unknown rank")
        return [(node.output[0], layout if axis > layout.axis else layout.along(layout.axis - 1 + len(indices)))]
    axes = slice_axes(a, node)
    if axes is None:
        raise NotPrunable(f"Slice {label} slices axes it computes")
    if layout.axis in [x % rank for x in axes]:
        raise NotPrunable(f"Slice {label} slices the channel axis")
    return [(node.output[0], layout)]


def slice_axes(a: Any, node: Any) -> list[int] | None:
    """The axes a Slice cuts (opset 1's attribute, or the constant ``axes`` input; all the first len(starts)
    without it), None when they are computed or their count is unknown."""
    if len(node.input) == 1:  # opset < 10: starts, ends, axes are attributes
        axes = node_attr(node, "axes")
        return list(axes) if axes is not None else list(range(len(node_attr(node, "starts", []))))
    if len(node.input) > 3 and node.input[3]:
        value = a.known(node.input[3])
        return None if value is None else [int(v) for v in value.reshape(-1)]
    starts = a.shape(node.input[1])
    return None if starts is None or len(starts) != 1 or not isinstance(starts[0], int) else list(range(starts[0]))
