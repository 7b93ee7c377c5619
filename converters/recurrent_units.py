"""The hidden units of a recurrent layer (LSTM, GRU, RNN) as a channel group (``converters.groups``).

Unit ``j`` of a layer with ``hidden_size`` H owns, in every direction, row ``g * H + j`` of each of the
``gates`` blocks of W ``[directions, gates * H, input]`` and R ``[directions, gates * H, H]``, the same
rows of both halves of B ``[directions, 2 * gates * H]``, LSTM's peepholes P ``[directions, 3 * H]``,
entry ``j`` of the initial states (H is their last axis in either ``layout``), and column ``j`` of R: the
recurrence reads every unit's previous output. W and R are the group's two members (their units are
ranked and kept together, ``plan.coupled``); R's columns are cut as a consumer's input channels. The
outputs Y ``[.., directions, .., H]`` and Y_h / Y_c carry the units on to the layers that read them.

Removing unit j computes what the layer computes once every weight that reads the unit's output is zero
(R's column j and the next layers' inputs): the other units never see it, whatever its own rows hold. A
zero initial state that the graph computes from the batch size (an ``Expand`` of 0, a ``ConstantOfShape``,
sliced per layer) holds the hidden size in its shape: the cut drops that input instead, since a missing
initial state is zero by the operator's definition (``ChannelGroup.cleared``). A state computed any other
way, or fed as a graph input (a streaming model's state), keeps the layer whole.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from onnx_admm.converters.channels import ChannelLayout, NotPrunable, fed_at_run_time
from onnx_admm.converters.graphinfo import node_attr
from onnx_admm.converters.optable import RECURRENT_GATES, WEIGHT_INPUTS

__all__ = ["hidden_units", "recurrent_starts", "zero_valued"]

# LSTM / GRU / RNN inputs: 5 initial_h, 6 initial_c (LSTM), 7 P (LSTM).
_STATES = {"LSTM": (5, 6), "GRU": (5,), "RNN": (5,)}

# Ops whose output is zero wherever their first input is (they move, repeat or pick its entries).
_MOVERS = frozenset({"Cast", "Expand", "Flatten", "Gather", "Identity", "Reshape", "Slice", "Squeeze", "Tile",
                     "Transpose", "Unsqueeze"})


def hidden_units(node: onnx.NodeProto, w_shape: tuple[int, ...]) -> int:
    """The layer's hidden size: W's rows per gate."""
    return int(node_attr(node, "hidden_size", w_shape[1] // RECURRENT_GATES[node.op_type]))


def recurrent_starts(a: Any, walk: Any, index: int) -> list[tuple[str, ChannelLayout]]:
    """Record the slices of recurrent node ``index`` (of ``a``, a ``groups._Analysis``) that hold its hidden
    units in ``walk``; returns its outputs with where they hold the units."""
    node, label = a.nodes[index], a.labels[index]
    op, gates = node.op_type, RECURRENT_GATES[node.op_type]
    w_in, r_in = WEIGHT_INPUTS[op]
    w, r = (a.constant(node.input[k]) if len(node.input) > k else None for k in (w_in, r_in))
    if w is None or r is None:
        raise NotPrunable(f"{op} {label} computes its W or R at run time")
    for tensor in (w, r):
        if tensor in a.constant_inputs:
            raise fed_at_run_time(tensor)
    n = hidden_units(node, a.value(w).shape)
    if a.value(r).shape[-1] != n or a.value(w).shape[1] != gates * n:
        raise NotPrunable(f"{op} {label}: W / R of shapes {list(a.value(w).shape)} / {list(a.value(r).shape)} "
                          f"do not hold {gates} gates of hidden_size {n}")
    walk.slice(w, 1, "weight", ChannelLayout(0, outer=gates), (label, w_in))
    walk.slice(r, 1, "weight", ChannelLayout(0, outer=gates), (label, r_in))
    walk.slice(r, 2, "consumer", ChannelLayout(0), (label, r_in))
    if len(node.input) > 3 and node.input[3]:
        walk.slice_input(node.input[3], 1, "bias", ChannelLayout(0, outer=2 * gates), (label, 3))
    if op == "LSTM" and len(node.input) > 7 and node.input[7]:
        walk.slice_input(node.input[7], 1, "constant", ChannelLayout(0, outer=3), (label, 7))
    for k in _STATES[op]:
        state = node.input[k] if len(node.input) > k else ""
        if not state:
            continue
        if a.constant(state) is not None:
            walk.slice_input(state, 2, "constant", ChannelLayout(0), (label, k))
        elif zero_valued(a, state):
            walk.cleared.append((label, k))
        else:
            raise NotPrunable(f"the initial state {state!r} of {op} {label} is computed (or fed) at run time and "
                              "not zero: its hidden size cannot change")
    # Y [seq, directions, batch, H] (layout 1: [batch, seq, directions, H]); Y_h, Y_c [directions, batch, H].
    return [(out, ChannelLayout(3 if j == 0 else 2)) for j, out in enumerate(node.output) if out]


def zero_valued(a: Any, name: str, depth: int = 0) -> bool:
    """Whether ``name`` is zero everywhere, whatever the inputs: a zero constant, a ``ConstantOfShape`` of 0,
    or one moved, repeated or joined by ops that keep it so."""
    src = a.constant(name)
    if src is not None:
        value = a.value(src)
        return value.dtype != object and not np.any(value)
    i = a.producer_index.get(name)
    if i is None or depth > 32:
        return False
    node = a.nodes[i]
    if node.op_type == "ConstantOfShape":
        fill = node_attr(node, "value")
        return fill is None or not np.any(onnx.numpy_helper.to_array(fill))
    if node.op_type in _MOVERS:
        return zero_valued(a, node.input[0], depth + 1)
    if node.op_type == "Concat":
        return all(zero_valued(a, x, depth + 1) for x in node.input if x)
    return False
