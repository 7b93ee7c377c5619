"""Write trained values back into the ORIGINAL ModelProto, by tensor name.

Re-exporting the torch module would change the graph (names, folded BatchNorm, new Identity nodes);
instead the original graph is kept and only the changed tensors are replaced where they lived:
initializer, sparse initializer or Constant node, in their original layout and dtype. Graph inputs,
outputs, node names and every untouched tensor stay byte-identical.

How a changed tensor is stored is the job of *encoders*: small objects that offer an encoding of one
tensor (dense, sparse COO, later quantized ones that add DequantizeLinear nodes). The smallest valid
encoding in raw bytes wins (DESIGN §6).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnx
from onnx import numpy_helper

from converters.graphinfo import constant_sources, node_label, tensor_value

logger = logging.getLogger(__name__)


@dataclass
class Encoding:
    """One way to store tensor ``name``: what to add to the graph so that ``name`` holds the value."""

    kind: str
    nbytes: int
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    sparse_initializers: list[onnx.SparseTensorProto] = field(default_factory=list)
    nodes: list[onnx.NodeProto] = field(default_factory=list)  # nodes whose output is ``name``
    min_opset: int = 0


class Encoder(Protocol):
    kind: str

    def encode(self, name: str, value: np.ndarray) -> Encoding | None:
        """An encoding of ``value`` under ``name``, or None when this encoder does not apply."""


class DenseEncoder:
    """A plain initializer (raw bytes)."""

    kind = "dense"

    def encode(self, name: str, value: np.ndarray) -> Encoding:
        tensor = numpy_helper.from_array(np.ascontiguousarray(value), name)
        return Encoding(self.kind, len(tensor.raw_data), initializers=[tensor])


class SparseEncoder:
    """``graph.sparse_initializer`` in COO form with INT64 linear indices (the only index type
    onnx.checker accepts). onnxruntime densifies it at load: it saves disk, not time."""

    kind = "sparse"

    def encode(self, name: str, value: np.ndarray) -> Encoding | None:
        if value.ndim == 0:
            return None
        flat = value.reshape(-1)
        indices = np.flatnonzero(flat).astype(np.int64)
        values = numpy_helper.from_array(np.ascontiguousarray(flat[indices]), name)
        index_tensor = numpy_helper.from_array(indices, name + "_indices")
        sparse = onnx.helper.make_sparse_tensor(values, index_tensor, list(value.shape))
        return Encoding(self.kind, len(values.raw_data) + len(index_tensor.raw_data), sparse_initializers=[sparse])


DEFAULT_ENCODERS: tuple[Encoder, ...] = (DenseEncoder(), SparseEncoder())


@dataclass(frozen=True)
class TensorUpdate:
    """A new value for the tensor ``onnx_name`` of the original model.

    ``consumers`` (node label, input index) is set when the value must NOT replace the shared tensor but
    go to a copy of its own read by those consumers only (a tensor used in two roles, untied on import).
    """

    onnx_name: str
    value: np.ndarray
    consumers: tuple[tuple[str, int], ...] = ()
    encoders: tuple[Encoder, ...] | None = None  # None: the write-back default


@dataclass
class WriteBackResult:
    model: onnx.ModelProto
    encodings: dict[str, str]  # tensor name -> encoding kind, for changed tensors
    changes: list[str]  # human-readable list of what changed in the graph


def write_back(
    original: onnx.ModelProto,
    updates: Sequence[TensorUpdate],
    encoders: Sequence[Encoder] = DEFAULT_ENCODERS,
    metadata: Mapping[str, str] | None = None,
) -> WriteBackResult:
    """Return a copy of ``original`` with the updated tensors stored by the smallest valid encoding.

    A value equal (bitwise, same dtype) to the stored one leaves that tensor untouched.
    """
    model = onnx.ModelProto()
    model.CopyFrom(original)
    sources = constant_sources(original)
    graph_input_names = {i.name for i in model.graph.input}
    encodings: dict[str, str] = {}
    changes: list[str] = []
    taken = set(sources) | {o for n in model.graph.node for o in n.output} | graph_input_names
    for update in updates:
        source = sources.get(update.onnx_name)
        if source is None:
            raise ValueError(f"{update.onnx_name!r} is not a constant tensor of the original model")
        old = tensor_value(original, source)
        value = np.asarray(update.value).astype(old.dtype, copy=False).reshape(old.shape)
        if old.tobytes() == value.tobytes():
            continue  # unchanged (bitwise): the tensor, and any sharing of it, stays as it was
        name = update.onnx_name
        if update.consumers:
            name = _fresh_name(f"{update.onnx_name}_untied", taken)
            taken.add(name)
            _rewire(model, update.consumers, name)
            changes.append(f"{name}: own copy of {update.onnx_name} for {', '.join(n for n, _ in update.consumers)}")
            location = "initializer"
        else:
            location = source.location
            _remove(model, name, location)
        # A Constant node or a name listed as a graph input can only hold a dense tensor in place.
        if location == "constant" or name in graph_input_names:
            candidates = [DenseEncoder().encode(name, value)]
        else:
            candidates = [e for e in (enc.encode(name, value) for enc in (update.encoders or encoders)) if e]
        best = min(candidates, key=lambda e: e.nbytes)
        _place(model, name, location, best)
        encodings[name] = best.kind
    if metadata:
        _set_metadata(model, metadata)
    return WriteBackResult(model, encodings, changes)


def _fresh_name(base: str, taken: set[str]) -> str:
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}{k}"
    return name


def _rewire(model: onnx.ModelProto, consumers: Sequence[tuple[str, int]], new_name: str) -> None:
    labels = {node_label(node, i): node for i, node in enumerate(model.graph.node)}
    for label, index in consumers:
        labels[label].input[index] = new_name


def _remove(model: onnx.ModelProto, name: str, location: str) -> None:
    graph = model.graph
    if location == "initializer":
        for i, t in enumerate(graph.initializer):
            if t.name == name:
                del graph.initializer[i]
                return
    elif location == "sparse_initializer":
        for i, s in enumerate(graph.sparse_initializer):
            if s.values.name == name:
                del graph.sparse_initializer[i]
                return
    # Constant nodes are rewritten in place by _place.


def _place(model: onnx.ModelProto, name: str, location: str, encoding: Encoding) -> None:
    graph = model.graph
    if location == "constant":
        node = next(n for n in graph.node if n.op_type == "Constant" and n.output and n.output[0] == name)
        del node.attribute[:]
        node.attribute.append(onnx.helper.make_attribute("value", encoding.initializers[0]))
        return
    graph.initializer.extend(encoding.initializers)
    graph.sparse_initializer.extend(encoding.sparse_initializers)
    if encoding.nodes:
        # Producers of a weight must precede its consumers: put them at the front of the graph.
        existing = list(graph.node)
        del graph.node[:]
        graph.node.extend(list(encoding.nodes) + existing)
    if encoding.min_opset:
        for opset in model.opset_import:
            if opset.domain in ("", "ai.onnx") and opset.version < encoding.min_opset:
                opset.version = encoding.min_opset


def _set_metadata(model: onnx.ModelProto, metadata: Mapping[str, str]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for key, value in metadata.items():
        if key in existing:
            existing[key].value = value
        else:
            model.metadata_props.add(key=key, value=value)
