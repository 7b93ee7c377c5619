"""Flatten and Reshape in a channel group's walk (``converters.groups`` describes the whole analysis): where
the channels land when dims merge with them, and the shape constants the cut edits.

A merge of the channel axis with the dims after it gives each channel a block of ``inner`` entries (an NCHW
flatten), with the dims before it ``outer`` blocks (channels last); a Reshape that only regroups the dims
before the channels keeps them as they are. A shape the graph computes at run time either follows the cut
(computed from the channels' own dims, ``shape_entries.computed_reshape``) or gets a constant of its own
first (``ChannelWalk.own_copy``) that the cut edits.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from onnx_admm.converters.channels import ChannelLayout, NotPrunable, ShapeEdit
from onnx_admm.converters.shape_entries import computed_reshape

__all__ = ["flatten_layout", "reshape_layout"]


def flatten_layout(walk: Any, dims: list | None, layout: ChannelLayout, start: int, label: str) -> ChannelLayout:
    """Flatten(axis=start) of dims ``dims``: dims ``start..`` become output axis 1."""
    if start > layout.axis:
        raise NotPrunable(f"Flatten {label} merges the channel axis into the first output axis")
    if dims is None or any(not isinstance(d, int) for d in dims[start:]):
        raise NotPrunable(f"Flatten {label} flattens dims of unknown size")
    outer = layout.outer * math.prod(dims[start : layout.axis])
    return dataclasses.replace(layout, axis=1, inner=layout.inner * math.prod(dims[layout.axis + 1 :]), outer=outer)


def reshape_layout(walk: Any, i: int, name: str, layout: ChannelLayout) -> ChannelLayout:
    """Reshape node ``i`` of ``walk`` with data ``name`` holding the channels in ``layout``: where its output
    holds them."""
    a = walk.a
    node, label = a.nodes[i], a.labels[i]
    dims_in, dims_out = a.shape(name), a.shape(node.output[0])
    if dims_in is None or dims_out is None:
        raise NotPrunable(f"the shapes around Reshape {label} are unknown")
    shape_src = a.constant(node.input[1])
    followed = computed_reshape(walk, i, name, list(dims_out)) if shape_src is None else None
    if followed is not None:  # the shape is computed from the channels' own dims: it follows the cut
        dims_out, p = followed
        target = [-1 if k == p or not isinstance(d, int) else int(d) for k, d in enumerate(dims_out)]
        new = _regroup(walk, i, dims_in, dims_out, target, None, layout)
        if new.axis != p:
            raise NotPrunable(f"Reshape {label} computes the channels' entry {p} of its shape, not {new.axis}")
        return new
    if shape_src is None:
        # tf2onnx writes a Keras Dense on [N, L, C] as Reshape to [N*L, C], MatMul, and a Reshape back to
        # a shape read from the input's Shape. With one dim that follows the inputs (the batch), the shape
        # is those dims with -1 there: a constant of the Reshape's own, which the cut edits.
        varying = [k for k, d in enumerate(dims_out) if not isinstance(d, int)]
        if len(varying) > 1:
            raise NotPrunable(f"Reshape {label} computes its shape, with {len(varying)} dims that follow the inputs")
        target = [-1 if k in varying else int(d) for k, d in enumerate(dims_out)]
        shape_src = walk.own_copy(i, target)
    else:
        target = [int(v) for v in a.value(shape_src).reshape(-1)]
    return _regroup(walk, i, dims_in, dims_out, target, shape_src, layout)

def _regroup(walk: Any, i: int, dims_in: list, dims_out: list, target: list[int], shape_src: str | None,
             layout: ChannelLayout) -> ChannelLayout:
    """Where Reshape ``i`` (to ``target``, held by the constant ``shape_src``) puts the channels; the shape
    edits it needs."""
    label = walk.a.labels[i]
    r_in, r_out = len(dims_in), len(dims_out)
    tail = dims_in[layout.axis:]
    if (0 < len(tail) <= r_out and all(isinstance(d, int) for d in tail)
            and dims_out[r_out - len(tail):] == tail):
        # Only the dims before the channels are regrouped (tf2onnx's [N, L, C] -> [N*L, C] around a
        # MatMul, and back): the channels keep their axis, counted from the end, and their blocks (outer
        # ones too: a Keras Reshape of NHWC features [N, W, H, C] -> [N, W, H*C] before such a Dense).
        p = r_out - len(tail)
        entry = target[p]
        if entry == -1 or (entry == 0 and p == layout.axis):
            return layout.along(p)
        if entry != dims_out[p]:
            raise NotPrunable(f"Reshape {label}: shape entry {p} is {entry}, not the size {dims_out[p]}")
        walk.reshapes.append(ShapeEdit(shape_src, label, p, layout.inner * layout.outer))
        return layout.along(p)
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
        new = dataclasses.replace(
            layout,
            axis=p,
            inner=layout.inner * math.prod(dims_in[layout.axis + 1 : q]),
            outer=layout.outer * math.prod(dims_in[p : layout.axis]),
        )
        entry = target[p]
        if entry == 0 and q == p + 1:
            return new  # 0 copies the (single) channel dim, whatever its new size
        if entry == -1:
            return new
        if entry != dims_out[p]:
            raise NotPrunable(f"Reshape {label}: shape entry {p} is {entry}, not the size {dims_out[p]}")
        walk.reshapes.append(ShapeEdit(shape_src, label, p, new.inner * new.outer))
        return new
    raise NotPrunable(f"Reshape {label} splits or reorders the channel axis")
