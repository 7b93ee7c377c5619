"""The head walk through a fused projection split by ``chunk``, ``split`` or ``unbind``: the rules for
Split and Slice (``converters.heads`` describes the walk).

The heads lie along one axis in ``outer`` blocks of ``n * inner`` entries (3 blocks for a fused Q/K/V,
2 for a fused kv). A Split or Slice along another axis (``unbind`` of a ``[3, N, H, L, head_dim]``
tensor) keeps the heads where they are, in every output. Along the heads' axis each piece must start
and end on a block boundary: it then holds the same heads, in as many blocks as it covers (``chunk(3)``
of Q/K/V: one each). Removing heads shrinks every block, so each piece's size (a Split's sizes) or
bounds (a Slice's starts and ends) get a constant of their own, edited by ``inner`` entries per block
before them per removed head. Bounds computed at run time (the TorchScript exporter's ``chunk`` reads
the projection's width with Shape) are frozen to the values measured in onnxruntime, which every probe
must agree on; the proof of ``converters.heads`` then checks the frozen graph.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from onnx_admm.converters.channel_select import slice_axes
from onnx_admm.converters.channels import ChannelLayout, NotPrunable, ShapeEdit
from onnx_admm.converters.graphinfo import node_attr

__all__ = ["slice_step", "split_step"]

def split_step(walk: Any, i: int, layout: ChannelLayout, rank: int) -> list[tuple[str, ChannelLayout]]:
    """Split node ``i`` of the head walk ``walk`` (a ``heads.HeadWalk``), its data holding the heads in
    ``layout`` (a tensor of ``rank`` axes): every output that holds them, and where.

    Raises:
        NotPrunable: the sizes are not known, or a piece cuts through a block of heads.
    """
    a = walk.a
    node, label = a.nodes[i], a.labels[i]
    _data_only(walk, i)
    outputs = list(node.output)
    axis = node_attr(node, "axis", 0) % rank
    if axis != layout.axis:
        return [(out, layout) for out in outputs if out]
    if node_attr(node, "split") is not None:
        raise NotPrunable(f"Split {label} holds its sizes in an attribute (opset < 13), which is not edited")
    length = walk.entries(layout)
    given = len(node.input) > 1 and node.input[1]
    if given:
        sizes = _values(walk, node.input[1], f"the sizes of Split {label}")
    elif length % len(outputs):
        raise NotPrunable(f"Split {label} cuts {length} entries into {len(outputs)} unequal pieces")
    else:
        sizes = [length // len(outputs)] * len(outputs)
    block = _block(walk, layout, label)
    found, start = [], 0
    for k, (out, size) in enumerate(zip(outputs, sizes)):
        if start % block or size % block:
            at = start if start % block else start + size
            raise NotPrunable(f"Split {label} cuts the heads' axis at {at}, inside a block of {walk.n} heads of "
                              f"{layout.inner}")
        if given:  # equal pieces (no sizes given) stay equal by themselves
            walk.reshapes.append(ShapeEdit("", label, k, layout.inner * (size // block)))
        if out:
            found.append((out, dataclasses.replace(layout, outer=size // block)))
        start += size
    if given:
        _own(walk, i, 1, sizes, "split")
    return found


def slice_step(walk: Any, i: int, layout: ChannelLayout, rank: int) -> list[tuple[str, ChannelLayout]]:
    """Slice node ``i`` of the head walk ``walk``, its data holding the heads in ``layout``: its output
    holds them (fewer blocks where it slices the heads' axis).

    Raises:
        NotPrunable: steps other than 1, computed axes, bounds not known or not on block boundaries.
    """
    a = walk.a
    node, label = a.nodes[i], a.labels[i]
    _data_only(walk, i)
    if len(node.input) < 3:
        raise NotPrunable(f"Slice {label} holds its bounds in attributes (opset < 10), which are not edited")
    starts, ends = node.input[1], node.input[2]
    axes = slice_axes(a, node)
    if axes is None:
        raise NotPrunable(f"Slice {label} has computed axes, or a number of bounds that is unknown")
    axes = [x % rank for x in axes]
    if len(node.input) > 4 and node.input[4]:
        steps = walk.a.known(node.input[4])
        if steps is None or any(int(x) != 1 for x in steps.reshape(-1)):
            raise NotPrunable(f"Slice {label} steps by other than 1 (or by computed steps)")
    if layout.axis not in axes:
        return [(node.output[0], layout)]
    j = axes.index(layout.axis)
    bounds = [_values(walk, name, f"the {what} of Slice {label}") for what, name in (("starts", starts),
                                                                                       ("ends", ends))]
    length, block = walk.entries(layout), _block(walk, layout, label)
    start, end = (min(max(v + length if v < 0 else v, 0), length) for v in (bounds[0][j], bounds[1][j]))
    if start % block or end % block or end <= start:
        raise NotPrunable(f"Slice {label} takes entries {start}..{end} of the heads' axis, not whole blocks of "
                          f"{walk.n} heads of {layout.inner}")
    for k, name, values in ((1, starts, bounds[0]), (2, ends, bounds[1])):
        # A bound at or beyond either end of the axis is clamped there, whatever its length; one m blocks
        # from the start (negative: from the end) moves by m * inner entries per removed head.
        inside = -length < values[j] < length and values[j] != 0
        if inside:
            walk.reshapes.append(ShapeEdit("", label, j, layout.inner * (values[j] // block)))
        if inside or a.constant(name) is None:  # computed bounds are frozen
            _own(walk, i, k, values, "starts" if k == 1 else "ends")
    return [(node.output[0], dataclasses.replace(layout, outer=(end - start) // block))]


def _data_only(walk: Any, i: int) -> None:
    node = walk.a.nodes[i]
    if any(name in walk.reached for name in node.input[1:]):
        raise NotPrunable(f"the heads reach a sizes or bounds input of {node.op_type} {walk.a.labels[i]}")


def _block(walk: Any, layout: ChannelLayout, label: str) -> int:
    """The entries of one block of heads along their axis."""
    if layout.total is not None:
        raise NotPrunable(f"{label} splits heads joined with other channels by a Concat")
    return walk.n * layout.inner


def _values(walk: Any, name: str, what: str) -> list[int]:
    """The values of ``name``: a constant, or measured alike by every probe.

    Raises:
        NotPrunable: they follow the inputs' dynamic dims (or were not measured).
    """
    value = walk.a.known(name)
    if value is None:
        raise NotPrunable(f"{what} are computed from the inputs' dynamic dims")
    return [int(x) for x in value.reshape(-1)]


def _own(walk: Any, i: int, input: int, values: list[int], what: str) -> None:
    """Give input ``input`` of node ``i`` a constant of its own holding ``values`` and point the edits
    just recorded for it (those with no tensor yet) at that constant."""
    tensor = walk.own_copy(i, values, input, what)
    label = walk.a.labels[i]
    walk.reshapes[:] = [dataclasses.replace(e, tensor=tensor) if e.node == label and not e.tensor else e
                        for e in walk.reshapes]
