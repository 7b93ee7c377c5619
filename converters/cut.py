"""Cutting channel groups out of an ONNX graph: the pass ``converters.shrink`` runs, given the groups.

``cut(model, keep, groups)`` removes the units (filters, neurons, attention heads) not kept from every
tensor of their groups and edits the shapes that hold them; ``zeroed`` builds the dense graph the cut
one must equal (the consumers' weights that read the removed units set to zero); ``with_frozen`` gives
Reshapes their own constant shapes first (and Splits their sizes, Slices their bounds). Head groups are
cut from the graph with its shared mask chains copied per layer, as the analysis saw it
(``converters.heads_chains``). Kept apart from ``converters.shrink`` so that the analysis of attention
heads (``converters.heads``), which proves a head split by cutting one head, does not depend on the
groups analysis that calls it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_admm.converters.channels import ChannelGroup, FrozenShape
from onnx_admm.converters.encoders import DenseEncoder, SparseEncoder
from onnx_admm.converters.graphinfo import constant_sources, node_label, tensor_names, tensor_value
from onnx_admm.converters.heads_chains import split_shared_repeats
from onnx_admm.converters.optable import RECURRENT
from onnx_admm.converters.writeback import TensorUpdate

logger = logging.getLogger(__name__)

__all__ = ["ShrinkResult", "TensorCut", "cut", "cut_update", "kept_channels", "with_frozen", "zeroed"]


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
    taken = cuts.get(update.onnx_name)
    if taken is None:
        return update
    quant = update.quant
    if quant is not None and quant.axis is not None:
        scale = np.asarray(quant.scale)
        for axis, kept in taken.steps:
            if axis == quant.axis % len(taken.shape):
                scale = np.take(scale, kept)
        quant = dataclasses.replace(quant, scale=scale)
    return dataclasses.replace(update, value=taken.apply(update.value), quant=quant)


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


def cut(
    model: onnx.ModelProto,
    keep: Mapping[str, np.ndarray | Sequence[int] | Sequence[bool]],
    groups: Sequence[ChannelGroup],
) -> ShrinkResult:
    """Remove the channels not kept from the graph; a new model, ``model`` is not modified.

    Args:
        model: The ONNX model, external data loaded.
        keep: Group name (the producer's weight tensor, see ``channel_groups``) -> bool mask of the
            channels kept, or their indices. Groups not named keep every channel.
        groups: The channel groups of ``model`` (``converters.groups.channel_groups``).

    Returns:
        The shrunk model, the list of changes and what was cut out of each constant.

    Raises:
        ValueError: a name is not a group, a group is not prunable, or a mask does not fit.
    """
    by_name = {g.name: g for g in groups}
    # Head groups name the mask chains the analysis copied per layer: the cut copies them alike.
    if any(by_name[name].unit == "head" for name in keep if name in by_name):
        model = split_shared_repeats(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    # Computed Reshape shapes that hold removed heads become constants first (the edits below cut them).
    frozen_shapes = tuple(f for name, mask in keep.items() if name in by_name and by_name[name].frozen
                          and kept_channels(by_name[name], mask).size < by_name[name].n_channels
                          for f in by_name[name].frozen)
    frozen = with_frozen(out, frozen_shapes)
    frozen_tensors = {f.tensor for f in frozen_shapes}
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
        # One shape constant read by several Reshapes (Q, K and V's) is edited once per entry.
        for edit in {(e.tensor, e.index): e for e in group.reshapes}.values():
            shape = current(edit.tensor).copy()
            shape.reshape(-1)[edit.index] -= removed.size * edit.per_channel
            values[edit.tensor] = shape
        changed_tensors.update(group.activations)
        for label in group.member_nodes:
            node = nodes[label]
            if node.op_type in RECURRENT:  # the units are its hidden size
                _set_int(node, "hidden_size", kept.size)
                changes.append(f"{label}: hidden_size {group.n_channels} -> {kept.size}")
        for label, k in group.cleared:
            changes.append(f"{label}: input {k} ({nodes[label].input[k]}, zeros sized by the hidden units) left out: "
                           "a missing initial state is zero")
            nodes[label].input[k] = ""
        members = f" (members {', '.join(group.producers)})" if len(group.producers) > 1 else ""
        summary.append(f"{name}: kept {kept.size} of {group.n_channels} {group.unit}s ({removed.size} removed)"
                       f"{members}")
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
        before = tensor_value(out if name in frozen_tensors else model, sources[name])
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
    changes = summary + frozen + changes
    logger.info("shrink: %s", "; ".join(changes) or "nothing to remove")
    cuts = {name: TensorCut(shapes[name], tuple(cut)) for name, cut in steps.items()}
    return ShrinkResult(out, changes, cuts)


def zeroed(model: onnx.ModelProto, group: ChannelGroup, removed: np.ndarray) -> onnx.ModelProto:
    """A copy of ``model`` whose consumer weights read nothing from the ``removed`` units of ``group``:
    what the graph without them must compute."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    sources = constant_sources(out)
    values = {}
    for piece in group.consumers:
        value = values.get(piece.tensor, tensor_value(out, sources[piece.tensor])).copy()
        index = [slice(None)] * value.ndim
        index[piece.axis] = piece.positions(group.n_channels, removed)
        value[tuple(index)] = 0
        values[piece.tensor] = value
    _set_tensors(out, {name: sources[name].location for name in values}, values)
    return out


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
            value = np.ascontiguousarray(value).reshape(np.shape(value))  # a 0-d constant stays 0-d
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(value, name)))
    if not stored:
        return
    kept = [t for t in graph.initializer if t.name not in stored]
    kept_sparse = [t for t in graph.sparse_initializer if t.values.name not in stored]
    del graph.initializer[:]
    del graph.sparse_initializer[:]
    graph.initializer.extend(kept + [t for best in stored.values() for t in best.initializers])
    graph.sparse_initializer.extend(kept_sparse + [t for best in stored.values() for t in best.sparse_initializers])


def with_frozen(model: onnx.ModelProto, frozen: tuple[FrozenShape, ...]) -> list[str]:
    """Feed each frozen input (a Reshape's shape, a Split's sizes, a Slice's bounds) its constant (in
    place); one line per change."""
    if not frozen:
        return []
    by_label: dict[str, list[FrozenShape]] = {}
    for f in frozen:
        by_label.setdefault(f.node, []).append(f)
    taken = tensor_names(model)
    changes = []
    replaced: set[str] = set()  # the tensors the nodes read before
    for k, node in enumerate(model.graph.node):
        for f in by_label.get(node_label(node, k), ()):
            if f.tensor in taken:
                continue
            value = np.array(f.values, dtype=np.int64)
            value = value if f.dims is None else value.reshape(f.dims)
            model.graph.initializer.append(numpy_helper.from_array(value, f.tensor))
            replaced.add(node.input[f.input])
            node.input[f.input] = f.tensor
            if node.op_type == "Reshape" and 0 in f.values:
                _copy_zeros(node)
            taken.add(f.tensor)
            what = "shape" if f.input == 1 and node.op_type == "Reshape" else f"input {f.input}"
            changes.append(f"{f.node}: {what} {list(f.values)} of its own ({f.tensor})")
    read = {x for n in model.graph.node for x in n.input} | {o.name for o in model.graph.output}
    unread = [t for t in model.graph.initializer if t.name in replaced and t.name not in read]
    for t in unread:
        model.graph.initializer.remove(t)
    return changes


def _set_int(node: onnx.NodeProto, name: str, value: int) -> None:
    """Set (or add) the int attribute ``name`` of ``node``."""
    for attr in node.attribute:
        if attr.name == name:
            attr.i = value
            return
    node.attribute.append(helper.make_attribute(name, value))


def _copy_zeros(node: onnx.NodeProto) -> None:
    """A frozen shape's 0 copies the input's dim (the walk writes 0 only where the output dim equals it):
    Reshape reads it so with allowzero 0, the default (the dynamo exporter writes allowzero 1)."""
    for attr in node.attribute:
        if attr.name == "allowzero":
            attr.i = 0
