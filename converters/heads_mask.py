"""The head walk meets an attention mask: a mask repeated once per head, and a head count computed from
the batch (``converters.heads`` describes the walk).

A mask that broadcasts over the heads' axis (``[N, 1, 1, L]`` added to ``[N, H, L, L]`` scores, as a
hand-written block or ``F.scaled_dot_product_attention`` with ``attn_mask`` writes it) is the same for
every head: the walk lets it through (``heads.HeadWalk._head_free``). The dynamo exporter writes
``nn.MultiheadAttention``'s ``key_padding_mask`` otherwise: the mask ``[N, 1, 1, L]`` is repeated to
``[N, H, 1, L]`` by an Expand whose constant shape holds H (``[1, H, 1, 1]``), reshaped to ``[N*H, 1, L]``
and back before it meets the scores. Such an Expand (or a Tile with constant repeats) makes copies of a
tensor that carries no heads: each copy stands for one head, so the walk starts a branch of the group
at its output (``copies_start``), the count in its constant edited per removed head like any shape
entry, and follows the copies through the reshapes to the scores, where they meet the heads in the same
layout. The reshape to ``[N*H, 1, L]`` reads ``N*H`` from a Mul of the batch by the constant H
(``counted_piece``): that constant gets a copy of its own, edited too. A repeat whose count is computed
at run time is not edited: the heads then keep the reason (the mask's branch comes from a graph input).
The dynamo exporter computes the repeated mask once for a whole ``nn.TransformerEncoder``: every layer
adds the same copies. ``converters.heads_chains`` gives each layer its own copy of that chain (and of the
shapes the layers' reshapes share) before the analysis, so each layer's heads form their own group.
The proof of ``converters.heads`` checks every such graph in onnxruntime, with random masks fed.
"""

from __future__ import annotations

from typing import Any

from onnx_admm.converters.channels import ChannelLayout, ShapeEdit
from onnx_admm.converters.optable import LINEAR

__all__ = ["copies_start", "counted_piece", "head_copies"]

# Ops that repeat their input along axes of size 1 by a count in input 1 (Expand's shape, Tile's repeats).
REPEATS = ("Expand", "Tile")
# Ops a head count computed from shapes passes through unchanged on its way to a Concat piece.
COUNT_PASSES = ("Reshape", "Unsqueeze", "Squeeze", "Cast", "Identity")


def head_copies(walk: Any, name: str) -> list[int]:
    """The Expand/Tile nodes behind tensor ``name`` (walking back through computed inputs, not past
    tensors the walk reached nor layers with a constant weight) that repeat a tensor ``walk.n`` times
    along one axis of size 1 with a constant count: the makers of a mask repeated once per head."""
    a = walk.a
    found, stack, seen = [], [name], set()
    while stack:
        tensor = stack.pop()
        if tensor in seen or tensor in walk.reached:
            continue
        seen.add(tensor)
        k = a.producer_index.get(tensor)
        if k is None:
            continue
        node = a.nodes[k]
        if node.op_type in REPEATS and _repeated_axis(walk, k) is not None:
            found.append(k)
            continue
        # A layer with a constant weight starts other units (another layer's heads): not a mask's maker.
        layer = node.op_type in LINEAR and any(a.constant(x) is not None for x in node.input[1:])
        if node.op_type != "Shape" and not layer:
            stack.extend(x for x in node.input if x and a.constant(x) is None)
    return sorted(found)


def copies_start(walk: Any, k: int) -> tuple[str, ChannelLayout]:
    """Start the walk at the output of the repeat ``k`` (``head_copies``): one copy per head along the
    repeated axis; its count gets a constant of its own, edited per removed head."""
    a = walk.a
    node = a.nodes[k]
    axis = _repeated_axis(walk, k)
    values = [int(v) for v in a.value(a.constant(node.input[1])).reshape(-1)]
    own = walk.own_copy(k, values, 1, "repeats" if node.op_type == "Tile" else "shape")
    walk.reshapes.append(ShapeEdit(own, a.labels[k], axis - (len(a.shape(node.output[0])) - len(values)), 1))
    return node.output[0], ChannelLayout(axis)


def _repeated_axis(walk: Any, k: int) -> int | None:
    """The output axis along which node ``k`` (Expand/Tile) repeats its input ``walk.n`` times: size 1 in
    the input and ``walk.n`` in the output in every probe run, the constant count there ``walk.n``; None
    where there is no such axis (or more than one)."""
    a = walk.a
    node = a.nodes[k]
    src = a.constant(node.input[1]) if len(node.input) > 1 else None
    runs_in, runs_out = a.measured(node.input[0]), a.measured(node.output[0])
    if src is None or runs_in is None or runs_out is None:
        return None
    counts = [int(v) for v in a.value(src).reshape(-1)]
    rank = len(runs_out[0])
    axes = []
    for axis in range(rank):
        at_in, at_count = axis - (rank - len(runs_in[0])), axis - (rank - len(counts))
        if at_count < 0 or counts[at_count] != walk.n:
            continue
        if all(out[axis] == walk.n and (at_in < 0 or dims[at_in] == 1) for dims, out in zip(runs_in, runs_out)):
            axes.append(axis)
    return axes[0] if len(axes) == 1 else None


def counted_piece(walk: Any, piece: str, new: ChannelLayout) -> None:
    """A computed Concat piece of a shape that holds ``batch * H * inner`` entries on the heads' axis
    (``new.outer`` follows the inputs): where it is a Mul of a computed count by the constant
    ``walk.n * new.inner`` (through reshapes and casts), that constant gets a copy of its own, edited per
    removed head. Any other computed piece is left alone: it reads the shapes of tensors and follows the
    heads where those carry them (the proof checks).
    """
    a = walk.a
    tensor = piece
    while True:
        k = a.producer_index.get(tensor)
        if k is None:
            return
        node = a.nodes[k]
        if node.op_type in COUNT_PASSES:
            tensor = node.input[0]
            continue
        break
    if node.op_type != "Mul" or new.outer != 0:
        return
    for j, name in enumerate(node.input):
        src = a.constant(name)
        if src is None:
            continue
        value = a.value(src)
        if value.size != 1 or value.dtype.kind not in "iu" or int(value.reshape(-1)[0]) != walk.n * new.inner:
            return
        # The constant may be shared with other nodes: this Mul gets its own, of the same dims.
        own = next((f.tensor for f in walk.frozen if f.node == a.labels[k] and f.input == j), None)
        own = own or walk.own_copy(k, [int(value.reshape(-1)[0])], j, "count", dims=value.shape)
        walk.reshapes.append(ShapeEdit(own, a.labels[k], 0, new.inner))
        return
