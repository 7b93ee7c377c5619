"""Write trained values back into the ORIGINAL ModelProto, by tensor name.

Re-exporting the torch module would change the graph (names, folded BatchNorm, new Identity nodes);
instead the original graph is kept and only the changed tensors are replaced where they lived:
initializer, sparse initializer or Constant node, in their original layout and dtype. Graph inputs,
outputs, node names and every untouched tensor stay byte-identical.

How a changed tensor is stored is the job of the encoders (``converters.encoders``): the smallest valid
encoding in raw bytes wins. An encoding may need a newer default-domain opset than the model has:
``write_back`` then raises the model's opset once, for all tensors, and keeps the raise only if
``converters.opset`` verifies it. When the raise cannot be made or verified, each tensor falls back to
the next container (int2 -> int4 -> int8, uint4 -> uint8) and ``WriteBackResult.notes`` says why.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnx_admm.converters.dequantize import decode, remove_decoders, weight_decoders
from onnx_admm.converters.encoders import DEFAULT_ENCODERS, DenseEncoder, Encoder, Encoding, QuantSpec, rename_parts
from onnx_admm.converters.graphinfo import (GraphView, constant_sources, fresh_name, node_attr, node_label, tensor_names,
                                            tensor_value)
from onnx_admm.converters.opset import OpsetError, default_opset, raise_opset

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorUpdate:
    """A new value for the tensor ``onnx_name`` of the original model.

    ``consumers`` (node label, input index) is set when the value must NOT replace the shared tensor but
    go to a copy of its own read by those consumers only (a tensor used in two roles, untied on import).
    ``quant`` says how the value was quantized; without it only the dense and sparse encoders apply.
    ``onnx_name`` may also be the output of a weight decoder (DequantizeLinear, codebook Gather) of an
    already-compressed model: the decoder is then replaced.
    """

    onnx_name: str
    value: np.ndarray
    consumers: tuple[tuple[str, int], ...] = ()
    encoders: tuple[Encoder, ...] | None = None  # None: the write-back default
    quant: QuantSpec | None = None


@dataclass
class WriteBackResult:
    model: onnx.ModelProto
    encodings: dict[str, str]  # tensor name -> encoding kind, for changed tensors
    changes: list[str]  # human-readable list of what changed in the graph
    # tensor name -> why it is stored in a larger container than its values need (opset not raised)
    notes: dict[str, str] = field(default_factory=dict)
    # tensor name -> raw bytes of its encoding (integers + scales / codebook / indices): 8 * nbytes / size is
    # the bits per weight actually stored
    nbytes: dict[str, int] = field(default_factory=dict)


@dataclass
class _Plan:
    name: str  # where the value goes: the update's tensor, or its untied copy
    update: TensorUpdate
    location: str  # "initializer" | "sparse_initializer" | "constant" | "decoded"
    candidates: list[Encoding]


def write_back(
    original: onnx.ModelProto,
    updates: Sequence[TensorUpdate],
    encoders: Sequence[Encoder] = DEFAULT_ENCODERS,
    metadata: Mapping[str, str] | None = None,
    max_opset: int | None = None,
) -> WriteBackResult:
    """Return a copy of ``original`` with the updated tensors stored by the smallest valid encoding.

    A value equal (bitwise, same dtype) to the stored one leaves that tensor untouched. When the chosen
    encodings need a newer default-domain opset, the model's opset is raised once, verified in
    onnxruntime, or the encodings fall back to containers the model's opset allows (module docstring).

    Args:
        original: The model as loaded (external data included); it is not modified.
        updates: The new values.
        encoders: Encoders offered for every update without its own ``encoders``.
        metadata: Entries to set in ``metadata_props``.
        max_opset: Never raise the default-domain opset above this (None: as far as verified).

    Returns:
        The new model, the encoding kind per written tensor, the list of graph changes, and notes on
        fallbacks.
    """
    model = onnx.ModelProto()
    model.CopyFrom(original)
    # Nameless nodes get their label as a temporary name, so consumers stay addressable while nodes are
    # added and removed; the names are cleared again at the end.
    temporary = _name_nodes(model)
    sources = constant_sources(original)
    decoders = weight_decoders(original)
    graph_input_names = {i.name for i in model.graph.input}
    taken = tensor_names(model)
    view = GraphView(original)
    untied: set[str] = set()
    changes: list[str] = []
    plans: list[_Plan] = []
    for update in updates:
        source = sources.get(update.onnx_name)
        if source is not None:
            old, location = tensor_value(original, source), source.location
        elif update.onnx_name in decoders:
            old, location = decode(original, decoders[update.onnx_name]), "decoded"
        else:
            raise ValueError(f"{update.onnx_name!r} is not a constant tensor (or decoded weight) of the original model")
        value = np.asarray(update.value).astype(old.dtype, copy=False).reshape(old.shape)
        if old.tobytes() == value.tobytes():
            continue  # unchanged (bitwise): the tensor, and any sharing of it, stays as it was
        name = update.onnx_name
        if update.consumers:
            name = fresh_name(f"{update.onnx_name}_untied", taken | untied)
            untied.add(name)
            location = "initializer"
        # A Constant node or a name listed as a graph input can only hold a dense tensor in place.
        if location == "constant" or name in graph_input_names:
            candidates = [DenseEncoder().encode(name, value)]
        else:
            offered = update.encoders or encoders
            candidates = [e for e in (enc.encode(name, value, update.quant) for enc in offered) if e]
            if value.ndim >= 2 and value.shape[-1] % 4 and _read_as_matmul_b(view, update):
                candidates = _without_int2(candidates)
        plans.append(_Plan(name, update, location, candidates))

    model, failures = _raise_for(model, plans, max_opset, {n.name for n in model.graph.node}, changes)
    opset = default_opset(model)

    replaced = {p.name for p in plans if p.location == "decoded"}
    remove_decoders(model, [d for name, d in weight_decoders(model).items() if name in replaced])
    # The replaced decoders' names are free again; the reserved untied names are not.
    taken = tensor_names(model) | untied
    node_names = {n.name for n in model.graph.node}
    encodings: dict[str, str] = {}
    notes: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for plan in plans:
        name, location = plan.name, plan.location
        if plan.update.consumers:
            _rewire(model, plan.update.consumers, name)
            readers = ", ".join(n for n, _ in plan.update.consumers)
            changes.append(f"{name}: own copy of {plan.update.onnx_name} for {readers}")
        elif location == "decoded":
            location = "initializer"
            changes.append(f"{name}: its previous decoder is replaced")
        else:
            _remove(model, name, location)
        best = _choose(plan.candidates, opset)
        wanted = _choose(plan.candidates, math.inf)
        if wanted.kind != best.kind and wanted.min_opset > opset:
            reasons = list(failures)
            if max_opset is not None and max_opset < wanted.min_opset:
                reasons.append(f"max_opset={max_opset}")
            best.note = (
                f"{wanted.kind} needs opset {wanted.min_opset}, the model stays at opset {opset} "
                f"({'; '.join(reasons)}); stored as {best.kind}"
            )
            notes[name] = best.note
            logger.info("%s: %s", name, best.note)
        rename_parts(best, name, taken, node_names)
        _place(model, name, location, best)
        encodings[name] = best.kind
        sizes[name] = best.nbytes
        if best.nodes:
            changes.append(f"{name}: stored as {best.kind} through {' -> '.join(n.op_type for n in best.nodes)}")
    _unname_nodes(model, temporary)
    _allow_initializers_without_inputs(model, changes)
    if metadata:
        _set_metadata(model, metadata)
    return WriteBackResult(model, encodings, changes, notes, sizes)


def _read_as_matmul_b(view: GraphView, update: TensorUpdate) -> bool:
    """Whether a MatMul, or a Gemm without transB, reads the tensor as its [K, N] right operand (its own
    readers, or the untied copy's): the two onnxruntime fuses with a DequantizeLinear into MatMulNBits."""
    def fused(node: onnx.NodeProto, k: int) -> bool:
        return k == 1 and (node.op_type == "MatMul" or node.op_type == "Gemm" and not node_attr(node, "transB", 0))

    if update.consumers:
        return any(label in view.by_label and fused(view.by_label[label], k) for label, k in update.consumers)
    # onnxruntime drops Identity nodes before it fuses: read through them.
    names = {update.onnx_name} | {alias for alias, source in view.aliases.items() if source == update.onnx_name}
    return any(fused(view.nodes[i], k) for name in names for i, k in view.readers.get(name, ()))


def _without_int2(candidates: Sequence[Encoding]) -> list[Encoding]:
    """The candidates with an int2 container replaced by its fallback (int4).

    onnxruntime (1.32) fuses DequantizeLinear and a MatMul (or a Gemm without transB) into MatMulNBits at its
    default optimization level, and computes an int2 weight wrongly there when its N columns do not fill whole
    bytes (N % 4 != 0): a binary 64 x 11 classifier head gave outputs off by their own size (N = 5, 6, 7, 9,
    10, 11, 13, 17 all wrong; 4, 8, 12, 16, 20, 24 right; int4 right for every N; a Gemm with transB, a Conv
    or a batched [B, K, N] weight is not fused). Such a weight is stored in int4.
    """
    kept = []
    for candidate in candidates:
        while candidate is not None and candidate.kind == "int2":
            candidate = candidate.fallback
        if candidate is not None:
            kept.append(candidate)
    return kept


def _choose(candidates: Sequence[Encoding], opset: float) -> Encoding:
    """The smallest candidate (first on ties) once each is replaced by its first fallback within ``opset``."""
    allowed = []
    for candidate in candidates:
        while candidate is not None and candidate.min_opset > opset:
            candidate = candidate.fallback
        if candidate is not None:
            allowed.append(candidate)
    return min(allowed, key=lambda e: e.nbytes)


def _raise_for(
    model: onnx.ModelProto, plans: Sequence[_Plan], max_opset: int | None, node_names: set[str], changes: list[str]
) -> tuple[onnx.ModelProto, list[str]]:
    """Raise the opset as far as the best encodings want and a verified raise allows.

    Returns the (possibly raised) model and the reasons of failed attempts.
    """
    current = default_opset(model)
    cap: float = math.inf if max_opset is None else max(current, max_opset)
    failures: list[str] = []
    while True:
        needed = max((_choose(p.candidates, cap).min_opset for p in plans), default=0)
        if needed <= current:
            return model, failures
        try:
            raised, how = raise_opset(model, needed, node_names)
        except OpsetError as exc:
            logger.info("cannot raise the opset to %d: %s", needed, exc)
            failures.append(f"opset {needed}: {exc}")
            cap = needed - 1
            continue
        changes.append(how)
        return raised, failures


def _name_nodes(model: onnx.ModelProto) -> dict[str, bool]:
    """Name every nameless node by its label (``graphinfo.node_label``).

    Returns:
        Each given name -> whether the node had an explicit empty ``name`` field (to restore it byte for byte).
    """
    named = {}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            explicit = node.HasField("name")
            node.name = node_label(node, index)
            named[node.name] = explicit
    return named


def _unname_nodes(model: onnx.ModelProto, named: Mapping[str, bool]) -> None:
    for node in model.graph.node:
        if node.name in named:
            if named[node.name]:
                node.name = ""
            else:
                node.ClearField("name")


def _rewire(model: onnx.ModelProto, consumers: Sequence[tuple[str, int]], new_name: str) -> None:
    nodes = GraphView(model).by_label
    for label, index in consumers:
        nodes[label].input[index] = new_name


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


def _allow_initializers_without_inputs(model: onnx.ModelProto, changes: list[str]) -> None:
    """Before IR 4 every initializer must be a graph input; a written tensor that is not one (a replaced
    decoder's weight, an encoding's scales) takes the model to IR 4, which differs from 3 in that rule alone
    and keeps the graph's I/O."""
    if model.ir_version >= 4:
        return
    inputs = {value.name for value in model.graph.input}
    if any(t.name not in inputs for t in model.graph.initializer):
        changes.append(f"IR version {model.ir_version} -> 4: initializers that are not graph inputs")
        model.ir_version = 4


def _set_metadata(model: onnx.ModelProto, metadata: Mapping[str, str]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for key, value in metadata.items():
        if key in existing:
            existing[key].value = value
        else:
            model.metadata_props.add(key=key, value=value)
