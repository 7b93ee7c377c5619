"""The head walk through a Reshape: which output axis holds the heads, and which shape entry holds their
count (``converters.heads`` describes the walk).

The heads are one digit of the row-major index, with ``inner * (dims after their axis)`` entries below
them; a reshape that keeps that digit inside one output axis keeps the heads (``[N, L, E]`` into
``[N, L, H, head_dim]`` or ``[L, N*H, head_dim]``, merged back into ``E``). The digit is found in the dims
measured by every probe run (``heads.probe_shapes``), so dims after the heads may follow the inputs (the
sequence length in ``[N*H, L, head_dim]``); every run must put it on the same axis with the same block.

The entry of the shape that holds the heads is edited per removed head, or left alone where it is -1
(or 0, copying the heads' own dim). A shape computed at run time (from the input's ``Shape``) is first
frozen to a constant of the Reshape's own, from the measured dims:

- one dim that follows the inputs' dynamic dims: -1 there, the measured sizes elsewhere;
- several: 0 at each one equal, in every run, to the input's dim at the same index (Reshape's 0 copies
  it: ``[N, L, E] -> [N, L, H, d]`` becomes ``[0, 0, H, d]``, ``[L, N, E] -> [L, N*H, d]`` becomes
  ``[0, -1, d]``; the Reshape's allowzero becomes 0, see ``cut.with_frozen``), -1 at the one left; more
  than one left (``[N*H, L, d] -> [N, H, L, d]``) and the shape cannot be frozen.

A shape that cannot be frozen but is a Concat of pieces stays computed: a constant piece that holds the
heads' entry gets a copy of its own that is edited, a computed one is left to follow the heads (it reads
them from the Shape of a tensor that carries them, as the dynamo exporter writes ``[N, H, L, d]`` back
from ``[N*H, L, d]``). The proof of ``converters.heads`` checks every such graph in onnxruntime.
"""

from __future__ import annotations

import math
from typing import Any

from onnx_admm.converters.channels import ChannelLayout, NotPrunable, ShapeEdit
from onnx_admm.converters.heads_mask import counted_piece

__all__ = ["reshape_step"]


def reshape_step(walk: Any, i: int, name: str, layout: ChannelLayout) -> ChannelLayout:
    """Reshape node ``i`` of the head walk ``walk`` (a ``heads.HeadWalk``), its data ``name`` holding the
    heads in ``layout``: where its output holds them.

    Raises:
        NotPrunable: the heads do not stay in one axis, or the entry that holds them cannot be edited.
    """
    a = walk.a
    node, label = a.nodes[i], a.labels[i]
    if layout.total is not None:
        raise NotPrunable(f"Reshape {label} moves heads joined with other channels by a Concat")
    new = _heads_axis(walk, i, name, layout)
    tensor = a.constant(node.input[1])
    if tensor is not None:
        target = [int(v) for v in a.value(tensor).reshape(-1)]
    else:
        try:
            target = _frozen_values(walk, i, name, layout)
        except NotPrunable as why:
            _computed_entry(walk, i, new, why)
            return new
        walk.own_copy(i, target)
    entry = target[new.axis]
    if entry == -1 or (entry == 0 and new.axis == layout.axis and new == layout):
        return new
    if entry != a.shape(node.output[0])[new.axis] or new.outer == 0:
        raise _across(walk, label, layout)
    # Exporters share one shape constant among Reshapes (Q, K and V's, every layer's): this Reshape gets
    # its own copy, which the edit cuts.
    own = next((f.tensor for f in walk.frozen if f.node == label), None) or walk.own_copy(i, target)
    walk.reshapes.append(ShapeEdit(own, label, new.axis, new.inner * new.outer))
    return new


def _across(walk: Any, label: str, layout: ChannelLayout) -> NotPrunable:
    return NotPrunable(f"Reshape {label} splits the heads ({walk.n} of {layout.inner} features) across axes")


def _heads_axis(walk: Any, i: int, name: str, layout: ChannelLayout) -> ChannelLayout:
    """The layout of the heads in Reshape ``i``'s output: the same axis and block in every probe run; the
    blocks above them (``outer``) 0 where they follow the inputs (``N*H``)."""
    a = walk.a
    node, label = a.nodes[i], a.labels[i]
    runs_in, runs_out = a.measured(name), a.measured(node.output[0])
    if runs_in is None or runs_out is None:
        raise NotPrunable(f"the shapes around Reshape {label} are unknown")
    found = {_digit(dims_in, dims_out, layout, walk.n) for dims_in, dims_out in zip(runs_in, runs_out)}
    if None in found:
        raise _across(walk, label, layout)
    if len({(axis, inner) for axis, inner, _ in found}) > 1:
        raise NotPrunable(f"Reshape {label} puts the heads in other blocks as the inputs' dynamic dims change")
    outers = {outer for *_, outer in found}
    axis, inner, outer = found.pop()
    return ChannelLayout(axis, inner, outer if len(outers) == 1 else 0)


def _digit(dims_in: tuple[int, ...], dims_out: tuple[int, ...], layout: ChannelLayout,
           n: int) -> tuple[int, int, int] | None:
    """(axis, inner, outer) of the output axis that holds the whole digit of the heads in a reshape from
    ``dims_in`` to ``dims_out``; None when the heads are split across axes."""
    after = layout.inner * math.prod(dims_in[layout.axis + 1:])
    seen = 1  # entries of the output axes after b
    for b in range(len(dims_out) - 1, -1, -1):
        d = dims_out[b]
        if d and after % (seen * d) == 0:
            seen *= d  # axis b lies wholly below the heads
            continue
        inner = after // seen
        if not d or d % (inner * n):
            return None
        return b, inner, d // (inner * n)
    return None


def _frozen_values(walk: Any, i: int, name: str, layout: ChannelLayout) -> list[int]:
    """The shape Reshape ``i`` computes at run time, as constant values (the module docstring says how).

    Raises:
        NotPrunable: more than one dim follows the inputs and cannot be copied from the input.
    """
    a = walk.a
    node, label = a.nodes[i], a.labels[i]
    dims_out = a.shape(node.output[0])
    varying = [k for k, d in enumerate(dims_out) if not isinstance(d, int)]
    copied: set[int] = set()
    if len(varying) > 1:
        runs = list(zip(a.measured(name), a.measured(node.output[0])))
        # The heads' axis of the input changes size when heads leave: 0 there would copy the new size.
        copied = {k for k in varying if k != layout.axis and all(k < len(x) and x[k] == y[k] for x, y in runs)}
        varying = [k for k in varying if k not in copied]
    if len(varying) > 1:
        raise NotPrunable(f"Reshape {label} computes a shape with {len(varying)} dims that follow the inputs, "
                          "not copied from its input's dims")
    return [0 if k in copied else -1 if k in varying else int(d) for k, d in enumerate(dims_out)]


def _computed_entry(walk: Any, i: int, new: ChannelLayout, why: NotPrunable) -> None:
    """Keep Reshape ``i``'s computed shape, a Concat of pieces; edit the piece that holds the heads' entry
    where it is a constant (a copy of its own), leave it where it is computed.

    Raises:
        NotPrunable: ``why`` (the shape could not be frozen) when the shape is not such a Concat, or the
            constant entry is not the heads' dim.
    """
    a = walk.a
    node = a.nodes[i]
    k = a.producer_index.get(node.input[1])
    if k is None or a.nodes[k].op_type != "Concat":
        raise why
    concat = a.nodes[k]
    start = 0
    for j, piece in enumerate(concat.input):
        length = (a.shape(piece) or [None])[0]
        if not isinstance(length, int):
            raise why
        if start + length > new.axis:
            break
        start += length
    else:
        raise why
    src = a.constant(piece)
    if src is None:
        counted_piece(walk, piece, new)  # N*H from a Mul by H: edited; read from shapes: follows the heads
        return
    values = [int(v) for v in a.value(src).reshape(-1)]
    entry = values[new.axis - start]
    if entry == -1:
        return
    if entry != a.shape(node.output[0])[new.axis] or new.outer == 0:
        raise why
    # Q, K and V's Reshapes may read one Concat: its piece is copied and edited once.
    own = next((f.tensor for f in walk.frozen if f.node == a.labels[k] and f.input == j), None)
    own = own or walk.own_copy(k, values, j, "piece")
    walk.reshapes.append(ShapeEdit(own, a.labels[k], new.axis - start, new.inner * new.outer))
