"""The shrink pass: physically remove pruned output channels from an ONNX graph, and count MACs.

``shrink(model, keep)`` takes, per channel group of ``converters.groups`` (named by the producer's
weight), the channels to keep, and cuts every tensor of the group: the producer's weight and bias
(every member's, for producers coupled through a residual sum), BatchNormalization parameters,
per-channel constants, depthwise Conv weights (and their ``group`` attribute), the consumers' input
channels (Conv axis 1; Gemm B columns for transB=1, rows for transB=0; MatMul rows; a block of ``H*W``
features per channel after a flatten) and the Reshape shape constants holding a flattened size; after a
Concat each group cuts its own range of the joined channels. Graph inputs, outputs and node names stay
as they were (the shrink pass changes shapes, never graph I/O); the ``value_info`` of every tensor whose
shape changes is dropped, so no stale shape survives (onnxruntime re-infers).

Removing channel ``c`` computes exactly what the dense model computes once the consumers' weights that
read ``c`` are zero; whatever the producer's filter and bias hold. A filter that was zeroed but whose
consumers still read it (a bias or a BatchNorm shift makes the channel a nonzero constant) is *not*
equivalent to removing it: prune the consumers' input channels with the filters.

Tensors may live in initializers, sparse initializers (re-encoded as COO) or Constant nodes; external
data must be loaded. ``ShrinkResult.cuts`` records what was taken out of each tensor, so that
:func:`cut_update` can cut a trained value and its quantization (a per-channel scale along a cut axis)
the same way: compress shrinks the original graph first and then writes the cut, still quantized values
into it, so the encoders of ``converters.writeback`` (int8/int4/int2 + DequantizeLinear, codebook) see
the shrunk tensors. ``count_macs`` gives multiply-accumulates per Conv/ConvTranspose/Gemm/MatMul node
from shapes inferred at a fixed batch size, and parameter counts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_admm.converters.graphinfo import constant_sources, dim_value, graph_inputs, node_label, tensor_value
from onnx_admm.converters.groups import ChannelGroup, channel_groups
from onnx_admm.converters.encoders import DenseEncoder, SparseEncoder
from onnx_admm.converters.writeback import TensorUpdate

logger = logging.getLogger(__name__)

__all__ = ["ShrinkResult", "TensorCut", "count_macs", "cut_update", "kept_channels", "shrink"]


@dataclass(frozen=True)
class TensorCut:
    """What the shrink pass took out of one constant: its shape before, then each cut in the order made,
    as (axis, the indices kept along it)."""

    shape: tuple[int, ...]
    steps: tuple[tuple[int, np.ndarray], ...]

    def apply(self, value: np.ndarray) -> np.ndarray:
        """``value`` (shaped like the tensor before the cut, in any layout that reshapes to it) cut."""
        value = np.asarray(value).reshape(self.shape)
        for axis, kept in self.steps:
            value = np.take(value, kept, axis=axis)
        return value


@dataclass
class ShrinkResult:
    """The shrunk model (a new ModelProto), one line per change for the report, and the cuts by tensor."""

    model: onnx.ModelProto
    changes: list[str]
    cuts: dict[str, TensorCut] = field(default_factory=dict)


def cut_update(update: TensorUpdate, cuts: Mapping[str, TensorCut]) -> TensorUpdate:
    """``update`` for the shrunk graph: the removed channels taken out of its value, and out of its
    per-channel scale where the scale runs along a cut axis (the zero point is made from the scale).

    A codebook keeps its levels: the encoder builds the codebook from the cut value itself.
    """
    cut = cuts.get(update.onnx_name)
    if cut is None:
        return update
    quant = update.quant
    if quant is not None and quant.axis is not None:
        scale = np.asarray(quant.scale)
        for axis, kept in cut.steps:
            if axis == quant.axis % len(cut.shape):
                scale = np.take(scale, kept)
        quant = dataclasses.replace(quant, scale=scale)
    return dataclasses.replace(update, value=cut.apply(update.value), quant=quant)


def kept_channels(group: ChannelGroup, keep: np.ndarray | Sequence[int] | Sequence[bool]) -> np.ndarray:
    """Sorted indices of the channels kept, from a bool mask of ``n_channels`` or a list of indices.

    Raises:
        ValueError: the group is not prunable, or the mask/indices do not fit it, or keep nothing.
    """
    if not group.prunable:
        raise ValueError(f"channel group {group.name!r} cannot be shrunk: {group.reason}")
    keep = np.asarray(keep)
    if keep.dtype == np.bool_:
        if keep.shape != (group.n_channels,):
            raise ValueError(
                f"the keep mask of {group.name!r} must be a bool array of shape ({group.n_channels},), "
                f"got shape {keep.shape}"
            )
        indices = np.flatnonzero(keep)
    else:
        if keep.ndim != 1 or (keep.size and not np.issubdtype(keep.dtype, np.integer)):
            raise ValueError(f"keep for {group.name!r} takes a bool mask or a 1-D list of channel indices")
        indices = np.unique(keep.astype(np.int64))
        if indices.size != keep.size or (indices.size and (indices[0] < 0 or indices[-1] >= group.n_channels)):
            raise ValueError(
                f"channel indices for {group.name!r} must be distinct and in [0, {group.n_channels}), "
                f"got {keep.tolist()}"
            )
    if indices.size == 0:
        raise ValueError(f"keep for {group.name!r} removes every channel; keep at least one")
    return indices.astype(np.int64)


def shrink(
    model: onnx.ModelProto,
    keep: Mapping[str, np.ndarray | Sequence[int] | Sequence[bool]],
    groups: Sequence[ChannelGroup] | None = None,
) -> ShrinkResult:
    """Remove the channels not kept from the graph; a new model, ``model`` is not modified.

    Args:
        model: The ONNX model, external data loaded.
        keep: Group name (the producer's weight tensor, see ``channel_groups``) -> bool mask of the
            channels kept, or their indices. Groups not named keep every channel.
        groups: ``channel_groups(model)`` when already computed.

    Returns:
        The shrunk model, the list of changes and what was cut out of each constant.

    Raises:
        ValueError: a name is not a group, a group is not prunable, or a mask does not fit.
    """
    groups = channel_groups(model) if groups is None else groups
    by_name = {g.name: g for g in groups}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    sources = constant_sources(out)
    values: dict[str, np.ndarray] = {}
    shapes: dict[str, tuple[int, ...]] = {}  # before any cut
    steps: dict[str, list[tuple[int, np.ndarray]]] = {}
    summary: list[str] = []
    changes: list[str] = []
    changed_tensors: set[str] = set()
    nodes = {node_label(n, i): n for i, n in enumerate(out.graph.node)}

    def current(name: str) -> np.ndarray:
        if name not in values:
            values[name] = tensor_value(out, sources[name])
            shapes[name] = values[name].shape
        return values[name]

    # Positions removed per (tensor, axis), in the tensor's original coordinates: after a Concat, several
    # groups cut their own ranges of one axis, so each axis is cut once, after every group has named its part.
    removed_at: dict[tuple[str, int], np.ndarray] = {}
    depthwise: dict[str, str] = {}  # depthwise node label -> its weight
    for name, mask in keep.items():
        if name not in by_name:
            coupled = next((g.name for g in groups if name in g.producers), None)
            if coupled is not None:
                raise ValueError(f"{name!r} is a member of the coupled group {coupled!r}: name the group by "
                                 f"{coupled!r}")
            raise ValueError(f"{name!r} is not a channel group; groups are named by weight: {sorted(by_name)}")
        group = by_name[name]
        kept = kept_channels(group, mask)
        if kept.size == group.n_channels:
            continue
        removed = np.setdiff1d(np.arange(group.n_channels), kept)
        for s in group.slices:
            positions = s.positions(group.n_channels, removed)
            before = removed_at.get((s.tensor, s.axis), np.zeros(0, dtype=np.int64))
            if np.intersect1d(before, positions).size:
                raise ValueError(f"{s.tensor!r} would be cut twice along axis {s.axis} (by group {name!r})")
            removed_at[(s.tensor, s.axis)] = np.union1d(before, positions)
            depthwise.update({label: s.tensor for label, k in s.nodes if s.role == "depthwise" and k == 1})
        for edit in group.reshapes:
            shape = current(edit.tensor).copy()
            shape.reshape(-1)[edit.index] -= removed.size * edit.per_channel
            values[edit.tensor] = shape
        changed_tensors.update(group.activations)
        members = f" (members {', '.join(group.producers)})" if len(group.producers) > 1 else ""
        summary.append(f"{name}: kept {kept.size} of {group.n_channels} channels ({removed.size} removed){members}")
    for (tensor, axis), removed in removed_at.items():
        positions = np.setdiff1d(np.arange(current(tensor).shape[axis]), removed)
        values[tensor] = np.take(current(tensor), positions, axis=axis)
        steps.setdefault(tensor, []).append((axis, positions))
    for label, weight in depthwise.items():
        # The multiplier (filters per group) stays; the group count follows the filters kept.
        attr = next(a for a in nodes[label].attribute if a.name == "group")
        new_group = current(weight).shape[0] // (shapes[weight][0] // attr.i)
        changes.append(f"{label}: group {attr.i} -> {new_group}")
        attr.i = new_group

    replaced: dict[str, np.ndarray] = {}
    for name, value in values.items():
        before = tensor_value(model, sources[name])
        if before.shape == value.shape and np.array_equal(before, value):
            continue
        if before.shape == value.shape:  # a Reshape shape constant
            changes.append(f"{name}: {before.tolist()} -> {value.tolist()}")
        else:
            changes.append(f"{name}: {list(before.shape)} -> {list(value.shape)}")
        replaced[name] = value
        changed_tensors.add(name)
    _set_tensors(out, {name: sources[name].location for name in replaced}, replaced)

    # Stale shapes would contradict the new ones: drop them (onnxruntime infers what it needs).
    kept_info = [v for v in out.graph.value_info if v.name not in changed_tensors]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept_info)
    changes = summary + changes
    logger.info("shrink: %s", "; ".join(changes) or "nothing to remove")
    cuts = {name: TensorCut(shapes[name], tuple(cut)) for name, cut in steps.items()}
    return ShrinkResult(out, changes, cuts)


def _set_tensors(model: onnx.ModelProto, locations: Mapping[str, str], values: Mapping[str, np.ndarray]) -> None:
    """Replace each constant of ``values`` with its cut value (external data becomes inline).

    An initializer or sparse initializer is stored again by the smaller of the dense and sparse encodings:
    a pruned weight stored sparse before the cut is mostly dense after it. A Constant node keeps its place.
    The initializer lists are rebuilt once: rebuilding them per tensor copied a ResNet's weights 40 times.
    """
    graph = model.graph
    inputs = {i.name for i in graph.input}
    stored: dict[str, object] = {}
    for name, value in values.items():
        if locations[name] in ("initializer", "sparse_initializer"):
            candidates = [DenseEncoder().encode(name, value)]
            if name not in inputs:
                candidates.append(SparseEncoder().encode(name, value))
            stored[name] = min((c for c in candidates if c is not None), key=lambda c: c.nbytes)
        else:
            node = next(n for n in graph.node if n.op_type == "Constant" and n.output and n.output[0] == name)
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.ascontiguousarray(value), name)))
    if not stored:
        return
    kept = [t for t in graph.initializer if t.name not in stored]
    kept_sparse = [t for t in graph.sparse_initializer if t.values.name not in stored]
    del graph.initializer[:]
    del graph.sparse_initializer[:]
    graph.initializer.extend(kept + [t for best in stored.values() for t in best.initializers])
    graph.sparse_initializer.extend(kept_sparse + [t for best in stored.values() for t in best.sparse_initializers])


def count_macs(model: onnx.ModelProto, batch: int = 1) -> dict:
    """Multiply-accumulates per Conv/ConvTranspose/Gemm/MatMul node at ``batch``, and parameter counts.

    The batch size replaces the first dim of every graph input that is symbolic or unknown; shapes
    come from ONNX shape inference on a copy (stored ``value_info`` is ignored).

    Args:
        model: The ONNX model, external data loaded.
        batch: Batch size the MACs are counted at.

    Returns:
        ``{"batch", "macs", "params", "nodes": {label: {"op_type", "macs", "params"}}, "unknown": [labels]}``:
        ``macs`` sums the nodes whose shapes are known (the others are listed in ``unknown`` with
        ``macs`` None); ``params`` counts every float constant of the graph; a node's ``params`` its
        constant inputs.
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
    real_inputs = {spec.name for spec in graph_inputs(probe)}
    for value in probe.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name in real_inputs and dims and not isinstance(dim_value(dims[0]), int):
            dims[0].Clear()
            dims[0].dim_value = batch
    inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    shapes: dict[str, list[int | None]] = {}
    for value in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        ttype = value.type.tensor_type
        if ttype.HasField("shape"):
            shapes[value.name] = [d if isinstance(d, int) else None for d in map(dim_value, ttype.shape.dim)]
    sources = constant_sources(model)
    constant_shapes: dict[str, tuple[int, ...]] = {}
    params = 0
    for name, source in sources.items():
        value = tensor_value(model, source)
        constant_shapes[name] = value.shape
        if np.issubdtype(value.dtype, np.floating) or value.dtype.name == "bfloat16":
            params += value.size
    for name, shape in constant_shapes.items():
        shapes[name] = list(shape)

    nodes: dict[str, dict] = {}
    unknown: list[str] = []
    total = 0
    for i, node in enumerate(model.graph.node):
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or node.domain not in ("", "ai.onnx"):
            continue
        label = node_label(node, i)
        macs = _node_macs(node, shapes)
        node_params = sum(math.prod(constant_shapes[n]) for n in node.input if n in constant_shapes)
        nodes[label] = {"op_type": node.op_type, "macs": macs, "params": node_params}
        if macs is None:
            unknown.append(label)
        else:
            total += macs
    return {"batch": batch, "macs": total, "params": params, "nodes": nodes, "unknown": unknown}


def _node_macs(node: onnx.NodeProto, shapes: Mapping[str, list[int | None]]) -> int | None:
    def known(name: str) -> list[int] | None:
        dims = shapes.get(name)
        return dims if dims is not None and all(isinstance(d, int) and d > 0 for d in dims) else None

    out = known(node.output[0])
    weight = known(node.input[1]) if len(node.input) > 1 else None
    if node.op_type == "Conv":
        return None if out is None or weight is None else math.prod(out) * math.prod(weight[1:])
    if node.op_type == "ConvTranspose":
        x = known(node.input[0])
        return None if x is None or weight is None else math.prod(x) * math.prod(weight[1:])
    a = known(node.input[0])
    if out is None or a is None or not a:
        return None
    if node.op_type == "Gemm":
        trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
        return math.prod(out) * (a[0] if trans_a else a[-1])
    return math.prod(out) * a[-1]  # MatMul
