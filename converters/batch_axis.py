"""Free a batch size baked into a model exported with fixed shapes, in the normalized copy.

The dynamo exporter without dynamic shapes (and many other exporters) fixes the graph inputs' first
dim to the export batch and writes that batch into Reshape shape constants (``[1, 800]``), so the
model only runs at that batch. ``unbake_batch`` makes the batch symbolic again when it can *prove*
where the batch axis goes, and rewrites only the constants that hold it:

1. Hypothesis: every graph input has the same fixed first dim b, and that axis is the batch.
2. The batch axis is followed through the graph node by node, with a rule per op (elementwise ops
   keep it; Transpose moves it; Conv/pools need it at 0; reductions, Softmax, Concat, Split, Gather,
   Slice, Pad must not act on it; Gemm/MatMul keep it on the row side; LSTM/GRU/RNN read it at axis 1
   (layout 0) ...). Static shapes come from ONNX shape inference on the still-fixed graph.
3. Reshape: the batch axis survives when exactly the dims before it map onto a prefix of the new
   shape (equal products) and the next new dim equals b; that new dim becomes -1 (other -1 / 0
   entries are resolved to their static values). With b = 1 several dims can qualify; the first is
   taken — the convention of every exporter we know. Expand: a b at the batch position becomes 1.
4. Any op without a rule, a rule that finds the batch axis used as something else (reduced over,
   concatenated on, a constant broadcast against it with b entries ...), or an unknown shape stops
   the proof. The graph then keeps its fixed batch, and the copy's metadata records b and the node
   that stopped the proof (``FIXED_BATCH_KEY``): the importer runs the module in chunks of b (a
   training step accumulates the gradients of its chunks) and onnxruntime runs at b. A first dim of b
   > 1 beside dynamic dims need not be a batch (a time-major ``[seq, N, features]`` input): then the
   model is left as it is.

When the proof succeeds the inputs' first dim and every tagged graph output's batch dim become the
symbol ``batch``, stale ``value_info`` is dropped, and the baked size and each tensor's batch axis
are recorded in the copy's metadata (``BAKED_BATCH_KEY``, ``BATCH_AXES_KEY``) for the importer and
``check``. Models whose inputs have a symbolic first dim, or fixed first dims that differ, are left alone.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_admm.converters.graphinfo import dim_value, node_attr, node_label
from onnx_admm.converters.optable import BROADCAST, CHANNEL_FIRST, RECURRENT, REDUCE, UNARY
from onnx_admm.converters.shapes import inferred_shapes

logger = logging.getLogger(__name__)

BATCH_DIM = "batch"
BAKED_BATCH_KEY = "onnx_admm.baked_batch"
BATCH_AXES_KEY = "onnx_admm.batch_axes"
FIXED_BATCH_KEY = "onnx_admm.fixed_batch"

class _NotBatch(Exception):
    """The batch hypothesis fails at a node (the message says why)."""


@dataclass
class _Context:
    b: int
    opset: int
    inits: dict[str, np.ndarray]
    shapes: dict[str, tuple[int | None, ...]]
    # Tensors computed from the run-time shape of a batch-carrying tensor (Shape -> Gather -> Concat ...):
    # values that follow the batch by themselves, such as the zero initial states torch exports.
    dynamic: set[str] = field(default_factory=set)
    new_inits: list[onnx.TensorProto] = field(default_factory=list)
    rewrites: list[tuple[onnx.NodeProto, int, str]] = field(default_factory=list)

    def shape(self, name: str) -> tuple[int | None, ...]:
        if name in self.inits:
            return tuple(self.inits[name].shape)
        shape = self.shapes.get(name)
        if shape is None:
            raise _NotBatch(f"the shape of {name!r} is unknown")
        return shape

    def static_shape(self, name: str) -> tuple[int, ...]:
        shape = self.shape(name)
        if any(d is None for d in shape):
            raise _NotBatch(f"the shape of {name!r} is not static")
        return tuple(int(d) for d in shape)  # type: ignore[arg-type]

    def ints(self, node: onnx.NodeProto, attr: str, index: int) -> list[int] | None:
        """An int list given as attribute ``attr`` or as constant input ``index``; None when absent."""
        for a in node.attribute:
            if a.name == attr:
                return [int(v) for v in helper.get_attribute_value(a)]
        if index < len(node.input) and node.input[index]:
            name = node.input[index]
            if name not in self.inits:
                raise _NotBatch(f"its input {name!r} is computed at run time")
            return [int(v) for v in np.asarray(self.inits[name]).reshape(-1).tolist()]
        return None

    def replace_input(self, node: onnx.NodeProto, index: int, value: np.ndarray) -> None:
        name = f"{node.input[index]}__{node.name}__batch"
        self.new_inits.append(numpy_helper.from_array(value, name))
        self.rewrites.append((node, index, name))


def _only(axes_in: list[int | None], allowed: int = 0) -> int:
    """The batch axis of input ``allowed``, refusing a batch-carrying tensor at any other input."""
    for i, a in enumerate(axes_in):
        if a is not None and i != allowed:
            raise _NotBatch(f"input {i} carries the batch")
    return axes_in[allowed]  # type: ignore[return-value]


def _broadcast(node: onnx.NodeProto, axes_in: list[int | None], ctx: _Context) -> int:
    ranks = [len(ctx.shape(n)) if n else 0 for n in node.input]
    rank = max(ranks)
    out = {a + rank - r for a, r in zip(axes_in, ranks) if a is not None}
    if len(out) != 1:
        raise _NotBatch("its inputs carry the batch on different axes")
    axis = out.pop()
    for name, a, r in zip(node.input, axes_in, ranks):
        position = axis - (rank - r)
        if name and a is None and position >= 0 and ctx.shape(name)[position] != 1:
            raise _NotBatch(f"it broadcasts {name!r}, whose dim {position} is not 1, against the batch axis")
    return axis


def _normalize_axes(axes: list[int], rank: int) -> list[int]:
    return sorted(a % rank for a in axes)


def _reshape(node: onnx.NodeProto, axis: int, ctx: _Context) -> int:
    if node.input[1] not in ctx.inits:
        raise _NotBatch("its target shape is computed at run time")
    src = ctx.static_shape(node.input[0])
    target = [int(v) for v in ctx.inits[node.input[1]].reshape(-1).tolist()]
    allowzero = node_attr(node, "allowzero", 0)
    resolved = [src[i] if d == 0 and not allowzero else d for i, d in enumerate(target)]
    if resolved.count(-1) == 1:
        known = math.prod(d for d in resolved if d != -1)
        resolved[resolved.index(-1)] = math.prod(src) // known if known else 0
    before = math.prod(src[:axis])
    for j, d in enumerate(resolved):
        if d == ctx.b and math.prod(resolved[:j]) == before:
            new = list(resolved)
            new[j] = -1
            if new != target:
                ctx.replace_input(node, 1, np.asarray(new, dtype=np.int64))
            return j
    raise _NotBatch(f"it reshapes {list(src)} to {target}, merging the batch axis {axis} with other dims")


def _expand(node: onnx.NodeProto, axes_in: list[int | None], ctx: _Context) -> int:
    axis = _only(axes_in)
    shape = ctx.ints(node, "", 1) or []
    rank_in = len(ctx.shape(node.input[0]))
    rank = max(rank_in, len(shape))
    out = axis + rank - rank_in
    position = out - (rank - len(shape))
    if position >= 0:
        if shape[position] == ctx.b and ctx.b != 1:
            new = list(shape)
            new[position] = 1
            ctx.replace_input(node, 1, np.asarray(new, dtype=np.int64))
        elif shape[position] != 1 and shape[position] != ctx.b:
            raise _NotBatch(f"it expands the batch axis to {shape[position]}")
    return out


def _matmul(node: onnx.NodeProto, axes_in: list[int | None], ctx: _Context) -> int:
    ra, rb = len(ctx.shape(node.input[0])), len(ctx.shape(node.input[1]))
    if ra < 2 or rb < 2:
        raise _NotBatch("a 1-D operand contracts the batch axis")
    rank = max(ra, rb)
    outs = set()
    a, b = axes_in
    if a is not None:
        if a == ra - 1:
            raise _NotBatch("it contracts over the batch axis")
        outs.add(a + rank - ra)
    if b is not None:
        if b == rb - 2:
            raise _NotBatch("it contracts over the batch axis")
        outs.add(b + rank - rb)
    if len(outs) != 1:
        raise _NotBatch("its operands carry the batch on different axes")
    out = outs.pop()
    if out < rank - 2:  # a stacked (broadcast) axis: the other operand must not hold b entries there
        for name, axis, r in ((node.input[0], a, ra), (node.input[1], b, rb)):
            position = out - (rank - r)
            if axis is None and 0 <= position < r - 2 and ctx.shape(name)[position] != 1:
                raise _NotBatch(f"it broadcasts {name!r} against the batch axis")
    return out


def _recurrent(node: onnx.NodeProto, axes_in: list[int | None], ctx: _Context) -> list[int | None]:
    layout = node_attr(node, "layout", 0)
    want_x, want_state = (1, 1) if layout == 0 else (0, 0)
    for i, a in enumerate(axes_in):
        if i in (1, 2, 3, 7) and a is not None:
            raise _NotBatch(f"its weight input {i} carries the batch")
    if axes_in[0] != want_x:
        raise _NotBatch(f"it reads axis {want_x} of X as the batch (layout {layout}), not axis {axes_in[0]}")
    for i in (4, 5, 6):
        if i < len(node.input) and node.input[i]:
            want = 0 if i == 4 else want_state
            if axes_in[i] is None:
                # A state sized from the run-time batch follows it; one computed from constants (exporters
                # write zeros) with batch dim 1 broadcasts over any batch in the converted module.
                if node.input[i] in ctx.dynamic or (i != 4 and ctx.shape(node.input[i])[want_state] == 1):
                    continue
                raise _NotBatch(f"its input {node.input[i]!r} is a constant holding the batch size")
            if axes_in[i] != want:
                raise _NotBatch(f"its input {i} carries the batch on axis {axes_in[i]}, not {want}")
    y = 2 if layout == 0 else 0
    return [y, want_state, want_state][: len(node.output)]


def _propagate(node: onnx.NodeProto, axes_in: list[int | None], ctx: _Context) -> list[int | None]:
    """The batch axis of each output of ``node`` (None: carries no batch), or raise _NotBatch."""
    op = node.op_type
    n_out = len(node.output)
    if node.domain not in ("", "ai.onnx"):
        raise _NotBatch(f"onnx-admm has no batch rule for domain {node.domain!r}")
    if op in ("Shape", "Size"):
        return [None] * n_out  # a run-time value: follows the batch by itself
    if op in UNARY:
        return [_only(axes_in)] * n_out
    if op in BROADCAST:
        return [_broadcast(node, axes_in, ctx)] * n_out
    if op in CHANNEL_FIRST:
        if _only(axes_in) != 0:
            raise _NotBatch(f"{op} needs the batch at axis 0")
        return [0] * n_out
    if op in ("Resize", "Upsample"):
        if _only(axes_in) != 0:
            raise _NotBatch(f"{op} needs the batch at axis 0")
        sizes = ctx.ints(node, "", 3) if op == "Resize" else None
        if sizes:
            raise _NotBatch("its constant output sizes fix the batch")
        return [0]
    if op in RECURRENT:
        return _recurrent(node, axes_in, ctx)
    if op == "Reshape":
        return [_reshape(node, _only(axes_in), ctx)]
    if op == "Expand":
        return [_expand(node, axes_in, ctx)]
    if op == "MatMul":
        return [_matmul(node, axes_in, ctx)]
    axis = _only(axes_in)
    rank = len(ctx.shape(node.input[0]))
    if op == "Gemm":
        want = 1 if node_attr(node, "transA", 0) else 0
        if axis != want:
            raise _NotBatch("the batch is not on the rows of A")
        return [0]
    if op == "Transpose":
        perm = list(node_attr(node, "perm", list(range(rank))[::-1]))
        return [perm.index(axis)]
    if op == "Flatten":
        k = node_attr(node, "axis", 1) % rank if rank else 0
        shape = ctx.shape(node.input[0])
        if axis >= k or any(shape[i] != 1 for i in range(k) if i != axis):
            raise _NotBatch("it merges the batch axis with other dims")
        return [0]
    if op in ("Softmax", "LogSoftmax", "Hardmax"):
        default = -1 if ctx.opset >= 13 else 1
        k = node_attr(node, "axis", default) % rank
        if axis == k or (ctx.opset < 13 and axis >= k):
            raise _NotBatch(f"{op} normalizes over the batch axis")
        return [axis]
    if op in ("LayerNormalization",):
        k = node_attr(node, "axis", -1) % rank
        if axis >= k:
            raise _NotBatch("it normalizes over the batch axis")
        return [axis] * n_out
    if op in REDUCE or op in ("ArgMax", "ArgMin"):
        if op in ("ArgMax", "ArgMin"):
            axes = [node_attr(node, "axis", 0)]
        else:
            axes = ctx.ints(node, "axes", 1)
        if not axes:
            raise _NotBatch("it reduces over every axis, the batch included")
        axes = _normalize_axes(axes, rank)
        if axis in axes:
            raise _NotBatch("it reduces over the batch axis")
        keep = node_attr(node, "keepdims", 1)
        return [axis if keep else axis - sum(a < axis for a in axes)]
    if op == "Squeeze":
        axes = ctx.ints(node, "axes", 1)
        if axes is None:
            shape = ctx.shape(node.input[0])
            if shape[axis] == 1:
                raise _NotBatch("it squeezes every size-1 dim, the batch of 1 included")
            return [axis - sum(1 for d in shape[:axis] if d == 1)]
        axes = _normalize_axes(axes, rank)
        if axis in axes:
            raise _NotBatch("it squeezes the batch axis")
        return [axis - sum(a < axis for a in axes)]
    if op == "Unsqueeze":
        added = ctx.ints(node, "axes", 1) or []
        axes = _normalize_axes(added, rank + len(added))
        kept = [i for i in range(rank + len(axes)) if i not in axes]
        return [kept[axis]]
    if op == "Concat":
        if node_attr(node, "axis", 0) % rank == axis:
            raise _NotBatch("it concatenates along the batch axis")
        return [axis]
    if op == "Split":
        if node_attr(node, "axis", 0) % rank == axis:
            raise _NotBatch("it splits the batch axis")
        return [axis] * n_out
    if op == "Slice":
        return [_slice(node, axis, rank, ctx)]
    if op == "Gather":
        k = node_attr(node, "axis", 0) % rank
        if axis == k:
            raise _NotBatch("it gathers along the batch axis")
        return [axis if axis < k else axis + len(ctx.shape(node.input[1])) - 1]
    if op in ("Pad", "Tile"):
        return [_pad_or_tile(node, axis, rank, ctx)]
    if op in ("TopK", "CumSum"):
        k = (node_attr(node, "axis", -1) if op == "TopK" else (ctx.ints(node, "", 1) or [0])[0]) % rank
        if axis == k:
            raise _NotBatch(f"{op} runs along the batch axis")
        return [axis] * n_out
    raise _NotBatch(f"onnx-admm has no batch rule for {op}")


def _slice(node: onnx.NodeProto, axis: int, rank: int, ctx: _Context) -> int:
    starts, ends = ctx.ints(node, "starts", 1), ctx.ints(node, "ends", 2)
    axes = ctx.ints(node, "axes", 3) or list(range(len(starts or [])))
    steps = ctx.ints(node, "", 4) or [1] * len(axes)
    for k, a in enumerate(axes):
        if a % rank == axis and not (starts[k] == 0 and ends[k] >= ctx.b and steps[k] == 1):
            raise _NotBatch("it slices the batch axis")
    return axis


def _pad_or_tile(node: onnx.NodeProto, axis: int, rank: int, ctx: _Context) -> int:
    if node.op_type == "Tile":
        repeats = ctx.ints(node, "", 1) or []
        if repeats and repeats[axis] != 1:
            raise _NotBatch("it tiles the batch axis")
        return axis
    pads = ctx.ints(node, "pads", 1) or []
    axes = list(range(rank))
    if len(node.input) > 3 and node.input[3]:  # Pad 18+: pads for these axes only
        axes = _normalize_axes(ctx.ints(node, "", 3) or axes, rank)
    n = len(axes)
    for k, a in enumerate(axes):
        if a == axis and pads and (pads[k] or pads[k + n]):
            raise _NotBatch("it pads the batch axis")
    return axis


def _fixed_batch(model: onnx.ModelProto) -> tuple[int, list[onnx.ValueInfoProto], bool] | None:
    """(b, the inputs fixing it, whether every input dim is fixed), or None when no batch is baked."""
    inits = {t.name for t in model.graph.initializer}
    batched, sizes, static = [], set(), True
    for value in model.graph.input:
        if value.name in inits:
            continue
        dims = value.type.tensor_type.shape.dim
        if not value.type.tensor_type.HasField("shape") or len(dims) == 0:
            continue
        if not isinstance(dim_value(dims[0]), int):
            return None  # a symbolic or unknown leading dim: the batch is dynamic already
        static &= all(isinstance(dim_value(d), int) for d in dims)
        batched.append(value)
        sizes.add(dims[0].dim_value)
    if len(sizes) != 1:
        return None
    return sizes.pop(), batched, static


def unbake_batch(model: onnx.ModelProto) -> bool:
    """Make a baked (fixed) batch size symbolic where the batch axis is provable; see the module doc.

    When the proof fails on a graph whose inputs are all static (or whose fixed first dim is 1), the
    graph keeps its batch and ``FIXED_BATCH_KEY`` records it with the reason (see ``fixed_batch``).
    """
    found = _fixed_batch(model)
    if found is None:
        return False
    b, inputs, static = found
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    ctx = _Context(b, opset, {t.name: numpy_helper.to_array(t) for t in graph.initializer}, inferred_shapes(model))
    axes: dict[str, int] = {value.name: 0 for value in inputs}
    for index, node in enumerate(graph.node):
        axes_in = [axes.get(name) if name else None for name in node.input]
        if all(a is None for a in axes_in):
            if any(name in ctx.dynamic for name in node.input):
                ctx.dynamic.update(node.output)
            continue
        if node.op_type in ("Shape", "Size"):
            ctx.dynamic.update(node.output)
        try:
            out = _propagate(node, axes_in, ctx)
        except _NotBatch as exc:
            if not static and b != 1:
                # Other dims are dynamic (e.g. a time-major [seq, N, features] input): a fixed first dim
                # above 1 need not be a batch at all, so a failed proof only means "leave it as it is".
                logger.debug("fixed first dim %d left as is: node %s: %s", b, node_label(node, index), exc)
                return False
            # A fixed first dim of 1 beside dynamic dims ([1, 3, 32, W]) is a batch of one in every export
            # we know. The graph keeps it: the module runs in chunks of b (FIXED_BATCH_KEY).
            reason = f"the batch axis cannot be followed through node {node_label(node, index)!r} ({node.op_type}): {exc}"
            logger.info("fixed batch %d kept: %s", b, reason)
            model.metadata_props.add(key=FIXED_BATCH_KEY, value=json.dumps({"batch": b, "reason": reason}))
            return True
        for name, axis in zip(node.output, out):
            if name and axis is not None:
                axes[name] = axis
    for node, index, name in ctx.rewrites:
        node.input[index] = name
    graph.initializer.extend(ctx.new_inits)
    for value in list(graph.input) + list(graph.output):
        if value.name in axes and value.type.tensor_type.HasField("shape"):
            dims = value.type.tensor_type.shape.dim
            if axes[value.name] < len(dims):
                dims[axes[value.name]].Clear()
                dims[axes[value.name]].dim_param = BATCH_DIM
    del graph.value_info[:]  # inferred for the fixed batch: stale now
    model.metadata_props.add(key=BAKED_BATCH_KEY, value=str(b))
    model.metadata_props.add(key=BATCH_AXES_KEY, value=json.dumps(axes, sort_keys=True))
    logger.info("baked batch size %d made symbolic (%d shape constants rewritten)", b, len(ctx.rewrites))
    return True


def fixed_batch(model: onnx.ModelProto) -> tuple[int | None, str | None]:
    """What ``unbake_batch`` recorded when the proof failed: (the batch the graph runs at, why), or (None, None)."""
    props = {p.key: p.value for p in model.metadata_props}
    if FIXED_BATCH_KEY not in props:
        return None, None
    record = json.loads(props[FIXED_BATCH_KEY])
    return int(record["batch"]), record["reason"]


def baked_batch(model: onnx.ModelProto) -> tuple[int | None, dict[str, int]]:
    """What ``unbake_batch`` recorded in a normalized copy: (baked batch or None, batch axis per tensor)."""
    props = {p.key: p.value for p in model.metadata_props}
    if BAKED_BATCH_KEY not in props:
        return None, {}
    return int(props[BAKED_BATCH_KEY]), json.loads(props.get(BATCH_AXES_KEY, "{}"))
