"""Write trained values back into the ORIGINAL ModelProto, by tensor name.

Re-exporting the torch module would change the graph (names, folded BatchNorm, new Identity nodes);
instead the original graph is kept and only the changed tensors are replaced where they lived:
initializer, sparse initializer or Constant node, in their original layout and dtype. Graph inputs,
outputs, node names and every untouched tensor stay byte-identical.

How a changed tensor is stored is the job of *encoders*: small objects that offer an encoding of one
tensor. The smallest valid encoding in raw bytes wins:

- ``DenseEncoder``, ``SparseEncoder``: a float initializer, or a COO sparse initializer;
- ``DequantizeLinearEncoder``: integers + scale (+ zero point) -> DequantizeLinear, in the smallest
  container the integers fit: int2 (opset 25), int4 (opset 21), int8 (opset 13);
- ``SparseDequantizeLinearEncoder``: int8 integers in a sparse initializer -> DequantizeLinear;
- ``CodebookEncoder``: uint2/uint4/uint8 indices -> Cast(INT64) -> Gather(codebook);
- ``SparseCodebookEncoder``: uint8 indices in a sparse initializer -> Cast(INT64) -> Gather(codebook).

``DENSE_ENCODERS`` are those that keep every entry in the weight's own shape (no COO), for a zero
pattern a runtime reads from the dense tensor (N:M sparsity).

The quantized encoders apply only to a tensor whose ``TensorUpdate`` carries a :class:`QuantSpec`, so
plain (pruned) tensors are stored exactly as before. They are exact: an encoder whose decoded floats
would differ from the update's values in any bit does not apply.

Opset. An encoding may need a newer default-domain opset than the model has. ``write_back`` then raises
the model's opset once, for all tensors, and keeps the raise only if it is verified: the raised model
passes onnx.checker and gives the same outputs as the original in onnxruntime on synthesized inputs.
The raise takes the node rewrites ``onnx.version_converter`` makes (e.g. ReduceMean ``axes`` from
attribute to input at opset 18) but keeps every other byte of the original (node metadata, graph I/O,
initializers: the converter drops metadata and adds value_info). Measured on the 13 test models and
the digits sample: a plain opset-number bump to 21 and to 25 fails onnx.checker on the TorchScript
transformer (ReduceMean axes), the converter path passes on all 14 with identical onnxruntime outputs
(max diff 6e-8). Neither is a semantic oracle on its own: on GroupNormalization 18 -> 21 the converter
changes nothing, onnx.checker passes, and onnxruntime fails at run time -- hence the onnxruntime
comparison. When the raise cannot be made or verified, each tensor falls back to the next container
(int2 -> int4 -> int8, uint4 -> uint8) and ``WriteBackResult.notes`` says why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import math

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper, version_converter

from converters.dequantize import decode, remove_decoders, weight_decoders
from converters.graphinfo import constant_sources, node_label, tensor_value
from converters.inputs import synthesize_inputs
from converters.normalize import densify_sparse_initializers

logger = logging.getLogger(__name__)


@dataclass
class Encoding:
    """One way to store tensor ``name``: what to add to the graph so that ``name`` holds the value.

    Auxiliary tensors and nodes are named after ``name`` (``W_quantized``, ``W_DequantizeLinear`` ...);
    ``write_back`` renames any that would collide with a name the model already uses.
    """

    kind: str
    nbytes: int
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    sparse_initializers: list[onnx.SparseTensorProto] = field(default_factory=list)
    nodes: list[onnx.NodeProto] = field(default_factory=list)  # nodes whose output is ``name``
    min_opset: int = 0  # default-domain opset the nodes and tensor types need
    # The same value in the next larger container needing a lower opset (int2 -> int4 -> int8), used when
    # the model's opset cannot be raised to ``min_opset``.
    fallback: Encoding | None = None
    note: str = ""  # set by write_back when a fallback was taken: why


@dataclass(frozen=True, eq=False)
class QuantSpec:
    """How a quantized tensor's values were made: what the quantized encoders need to store integers.

    Attributes:
        bits: k, 2..8: the values are ``q * scale`` with integer ``|q| <= 2**(k-1) - 1``
            (binary and ternary weights are k = 2). For codebook levels, the index bits.
        scale: Positive float32 scale, shape ``()`` per tensor or ``(C,)`` along ``axis``; None for
            non-uniform levels (a codebook), which only :class:`CodebookEncoder` stores.
        axis: Channel axis of ``scale`` in the tensor's ONNX layout, or None for one scale.
    """

    bits: int
    scale: np.ndarray | None = None
    axis: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 1 <= self.bits <= 8:
            raise ValueError(f"QuantSpec(bits=...) takes an int from 1 to 8, got {self.bits!r}")
        if self.scale is None:
            if self.axis is not None:
                raise ValueError("QuantSpec(axis=...) needs a per-axis scale; a codebook has none")
            return
        scale = np.asarray(self.scale)
        if scale.ndim != (0 if self.axis is None else 1) or not np.all(np.isfinite(scale)) or not np.all(scale > 0):
            raise ValueError(
                "QuantSpec(scale=...) takes positive finite scales: a scalar with axis=None, or one per channel "
                f"(shape (C,)) with axis=int; got shape {scale.shape} with axis={self.axis}"
            )
        if self.bits < 2:
            raise ValueError("QuantSpec with a scale needs bits >= 2 (binary levels -1, +1 are stored as k = 2)")

    @property
    def qmax(self) -> int:
        """Largest integer level, 2^(k-1) - 1."""
        return 2 ** (self.bits - 1) - 1

    @property
    def qmin(self) -> int:
        """Most negative integer level, -2^(k-1) (the container's two's-complement range)."""
        return -(2 ** (self.bits - 1))


class Encoder(Protocol):
    kind: str

    def encode(self, name: str, value: np.ndarray, quant: QuantSpec | None = None) -> Encoding | None:
        """An encoding of ``value`` under ``name``, or None when this encoder does not apply.

        ``quant`` describes how ``value`` was quantized (None: a plain float tensor).
        """


class DenseEncoder:
    """A plain initializer (raw bytes)."""

    kind = "dense"

    def encode(self, name: str, value: np.ndarray, quant: QuantSpec | None = None) -> Encoding:
        tensor = numpy_helper.from_array(np.ascontiguousarray(value), name)
        return Encoding(self.kind, len(tensor.raw_data), initializers=[tensor])


class SparseEncoder:
    """``graph.sparse_initializer`` in COO form with INT64 linear indices (the only index type
    onnx.checker accepts). onnxruntime densifies it at load: it saves disk, not time."""

    kind = "sparse"

    def encode(self, name: str, value: np.ndarray, quant: QuantSpec | None = None) -> Encoding | None:
        if value.ndim == 0:
            return None
        sparse, nbytes = _coo(value, name)
        return Encoding(self.kind, nbytes, sparse_initializers=[sparse])


def _coo(value: np.ndarray, name: str, elem_type: int | None = None) -> tuple[onnx.SparseTensorProto, int]:
    """The nonzeros of ``value`` (as ``elem_type``, default: its own dtype) with INT64 linear indices."""
    flat = value.reshape(-1)
    indices = np.flatnonzero(flat).astype(np.int64)
    kept = np.ascontiguousarray(flat[indices])
    values = numpy_helper.from_array(kept, name) if elem_type is None else _tensor(kept, elem_type, name)
    index_tensor = numpy_helper.from_array(indices, name + "_indices")
    sparse = helper.make_sparse_tensor(values, index_tensor, list(value.shape))
    return sparse, len(values.raw_data) + len(index_tensor.raw_data)


# (bits, element type, first default-domain opset where DequantizeLinear takes it), smallest first.
_SIGNED = ((2, onnx.TensorProto.INT2, 25), (4, onnx.TensorProto.INT4, 21), (8, onnx.TensorProto.INT8, 13))
# Codebook indices: Cast reads uint4 from opset 21 and uint2 from 25; uint8 always.
_UNSIGNED = ((2, onnx.TensorProto.UINT2, 25), (4, onnx.TensorProto.UINT4, 21), (8, onnx.TensorProto.UINT8, 0))


def _tensor(array: np.ndarray, elem_type: int, name: str) -> onnx.TensorProto:
    # numpy_helper.from_array packs 4- and 2-bit types into raw_data (2 and 4 per byte); make_tensor would not.
    return numpy_helper.from_array(np.ascontiguousarray(array).astype(helper.tensor_dtype_to_np_dtype(elem_type)), name)


def _nbytes(encoding_parts: Sequence[onnx.TensorProto]) -> int:
    return sum(len(t.raw_data) for t in encoding_parts)


def _containers(
    table: Sequence[tuple[int, int, int]], needed_bits: int, build: Callable[[int, int, int], Encoding]
) -> Encoding | None:
    """The encoding in the smallest container of ``table`` holding ``needed_bits``, chained to the larger ones."""
    encoding = None
    for bits, elem_type, opset in reversed(table):
        if bits < needed_bits:
            break
        candidate = build(bits, elem_type, opset)
        candidate.fallback = encoding
        encoding = candidate
    return encoding


def integer_levels(value: np.ndarray, quant: QuantSpec) -> np.ndarray | None:
    """The integers q with ``value == float32(q) * scale`` exactly, or None when there are none.

    The product is the float32 one DequantizeLinear computes, so an encoding built from q decodes to
    ``value`` bit for bit (a -0.0 in ``value`` decodes as 0.0, the only difference allowed).
    """
    if quant.scale is None or value.dtype != np.float32:
        return None
    scale = np.asarray(quant.scale, dtype=np.float32)
    if quant.axis is not None:
        if not -value.ndim <= quant.axis < value.ndim or scale.shape != (value.shape[quant.axis],):
            return None
        scale = scale.reshape([-1 if i == quant.axis % value.ndim else 1 for i in range(value.ndim)])
    with np.errstate(all="ignore"):
        q = np.rint(value / scale)
    if not np.all(np.isfinite(q)) or (q.size and (q.max() > quant.qmax or q.min() < quant.qmin)):
        return None
    if not np.array_equal(q.astype(np.float32) * scale, value):
        return None
    return q.astype(np.int64)


def _signed_bits(q: np.ndarray) -> int:
    """Bits of the smallest two's-complement container for q: [-2, 1] -> 2, [-8, 7] -> 4, else 8."""
    low, high = (int(q.min()), int(q.max())) if q.size else (0, 0)
    return 2 if -2 <= low and high <= 1 else 4 if -8 <= low and high <= 7 else 8


def _axis(quant: QuantSpec, value: np.ndarray) -> int | None:
    return None if quant.axis is None else quant.axis % value.ndim


def _dequantize_node(name: str, inputs: list[str], axis: int | None) -> onnx.NodeProto:
    attrs = {} if axis is None else {"axis": axis}
    return helper.make_node("DequantizeLinear", inputs, [name], name=f"{name}_DequantizeLinear", **attrs)


def _scale_tensors(name: str, quant: QuantSpec, elem_type: int) -> list[onnx.TensorProto]:
    scale = np.asarray(quant.scale, dtype=np.float32)
    return [
        numpy_helper.from_array(scale, f"{name}_scale"),
        _tensor(np.zeros(scale.shape, dtype=np.int64), elem_type, f"{name}_zero_point"),
    ]


class DequantizeLinearEncoder:
    """Integers + float32 scale + zero point 0 -> DequantizeLinear (per tensor, or per axis).

    The container is the smallest holding the integers actually present: [-2, 1] -> int2 (opset 25),
    [-8, 7] -> int4 (opset 21), else int8 (opset 13), each chained to the larger ones as fallbacks.
    Applies only with a ``QuantSpec`` that has a scale and reproduces the float32 values exactly.
    """

    kind = "dequantize"

    def encode(self, name: str, value: np.ndarray, quant: QuantSpec | None = None) -> Encoding | None:
        q = None if quant is None else integer_levels(value, quant)
        if q is None:
            return None

        def build(bits: int, elem_type: int, opset: int) -> Encoding:
            tensors = [_tensor(q, elem_type, f"{name}_quantized"), *_scale_tensors(name, quant, elem_type)]
            node = _dequantize_node(name, [t.name for t in tensors], _axis(quant, value))
            return Encoding(f"int{bits}", _nbytes(tensors), initializers=tensors, nodes=[node], min_opset=opset)

        return _containers(_SIGNED, _signed_bits(q), build)


class SparseDequantizeLinearEncoder:
    """int8 integers in a COO sparse initializer (int64 linear indices) -> DequantizeLinear.

    A nonzero costs 1 + 8 bytes, so it beats dense int4 below 1/18 density and int2 below 1/36 (e.g. 40x
    pruning + 4 bits). Sparse int4 is not offered: onnxruntime 1.32 fails to load an int4 sparse
    initializer (int8 loads and runs, measured).
    """

    kind = "sparse-int8"

    def encode(self, name: str, value: np.ndarray, quant: QuantSpec | None = None) -> Encoding | None:
        q = None if quant is None else integer_levels(value, quant)
        if q is None or value.ndim == 0:
            return None
        sparse, nbytes = _coo(q, f"{name}_quantized", onnx.TensorProto.INT8)
        tensors = _scale_tensors(name, quant, onnx.TensorProto.INT8)
        node = _dequantize_node(name, [sparse.values.name, *(t.name for t in tensors)], _axis(quant, value))
        return Encoding(
            self.kind,
            nbytes + _nbytes(tensors),
            initializers=tensors,
            sparse_initializers=[sparse],
            nodes=[node],
            min_opset=13,
        )


def _codebook_values(value: np.ndarray, quant: QuantSpec | None) -> bool:
    return quant is not None and value.ndim > 0 and value.dtype.kind == "f" and bool(np.all(np.isfinite(value)))


def _gather_nodes(name: str, indices: str, codebook: str) -> list[onnx.NodeProto]:
    cast = helper.make_node("Cast", [indices], [f"{name}_indices_int64"], name=f"{name}_Cast", to=onnx.TensorProto.INT64)
    return [cast, helper.make_node("Gather", [codebook, cast.output[0]], [name], name=f"{name}_Gather")]


class CodebookEncoder:
    """Indices into the sorted distinct values -> Cast(to INT64) -> Gather(codebook, indices).

    Gather takes only int32/int64 indices (onnxruntime rejects uint8), hence the Cast. Indices are uint2
    (<= 4 levels, opset 25), uint4 (<= 16, opset 21) or uint8 (<= 256), shaped like the weight, so the
    Gather output (indices shape + codebook's trailing dims, none) is the weight's shape. Applies only with
    a ``QuantSpec`` (any: k-bit levels have few distinct values too) and at most 256 distinct finite values.
    """

    kind = "codebook"

    def encode(self, name: str, value: np.ndarray, quant: QuantSpec | None = None) -> Encoding | None:
        if not _codebook_values(value, quant):
            return None
        codebook = np.unique(value)  # sorted; -0.0 and 0.0 are one level
        if codebook.size > 256:
            return None
        indices = np.searchsorted(codebook, value)
        needed = 2 if codebook.size <= 4 else 4 if codebook.size <= 16 else 8

        def build(bits: int, elem_type: int, opset: int) -> Encoding:
            tensors = [
                _tensor(indices, elem_type, f"{name}_indices"),
                numpy_helper.from_array(codebook, f"{name}_codebook"),
            ]
            nodes = _gather_nodes(name, tensors[0].name, tensors[1].name)
            return Encoding(f"codebook-uint{bits}", _nbytes(tensors), initializers=tensors, nodes=nodes, min_opset=opset)

        return _containers(_UNSIGNED, needed, build)


class SparseCodebookEncoder:
    """Pruned + clustered: uint8 indices in a COO sparse initializer -> Cast(to INT64) -> Gather(codebook).

    The codebook starts with 0.0, so the implicit zeros of the sparse indices decode to the pruned zeros; a
    nonzero costs 1 + 8 bytes, as in :class:`SparseDequantizeLinearEncoder`. Applies with a ``QuantSpec``
    and at most 255 distinct nonzero values.
    """

    kind = "sparse-codebook"

    def encode(self, name: str, value: np.ndarray, quant: QuantSpec | None = None) -> Encoding | None:
        if not _codebook_values(value, quant):
            return None
        levels = np.unique(value[value != 0])
        if levels.size > 255:
            return None
        codebook = numpy_helper.from_array(np.concatenate([np.zeros(1, value.dtype), levels]), f"{name}_codebook")
        indices = np.where(value != 0, np.searchsorted(levels, value) + 1, 0)
        sparse, nbytes = _coo(indices, f"{name}_indices", onnx.TensorProto.UINT8)
        return Encoding(
            self.kind,
            nbytes + len(codebook.raw_data),
            initializers=[codebook],
            sparse_initializers=[sparse],
            nodes=_gather_nodes(name, sparse.values.name, codebook.name),
        )


DEFAULT_ENCODERS: tuple[Encoder, ...] = (
    DenseEncoder(),
    SparseEncoder(),
    DequantizeLinearEncoder(),
    SparseDequantizeLinearEncoder(),
    CodebookEncoder(),
    SparseCodebookEncoder(),
)

# The encoders that store every entry, zeros included, in the weight's own shape (no COO): for a weight
# whose zero pattern a runtime reads from the dense tensor (N:M sparsity).
DENSE_ENCODERS: tuple[Encoder, ...] = tuple(e for e in DEFAULT_ENCODERS if not e.kind.startswith("sparse"))


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


class _OpsetError(Exception):
    """The model's opset cannot be raised (or the raise cannot be verified); the message says why."""


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
    taken = _tensor_names(model)
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
            name = _fresh_name(f"{update.onnx_name}_untied", taken | untied)
            untied.add(name)
            location = "initializer"
        # A Constant node or a name listed as a graph input can only hold a dense tensor in place.
        if location == "constant" or name in graph_input_names:
            candidates = [DenseEncoder().encode(name, value)]
        else:
            offered = update.encoders or encoders
            candidates = [e for e in (enc.encode(name, value, update.quant) for enc in offered) if e]
        plans.append(_Plan(name, update, location, candidates))

    model, failures = _raise_for(model, plans, max_opset, {n.name for n in model.graph.node}, changes)
    opset = _default_opset(model)

    replaced = {p.name for p in plans if p.location == "decoded"}
    remove_decoders(model, [d for name, d in weight_decoders(model).items() if name in replaced])
    # The replaced decoders' names are free again; the reserved untied names are not.
    taken = _tensor_names(model) | untied
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
        _rename_parts(best, name, taken, node_names)
        _place(model, name, location, best)
        encodings[name] = best.kind
        sizes[name] = best.nbytes
        if best.nodes:
            changes.append(f"{name}: stored as {best.kind} through {' -> '.join(n.op_type for n in best.nodes)}")
    _unname_nodes(model, temporary)
    if metadata:
        _set_metadata(model, metadata)
    return WriteBackResult(model, encodings, changes, notes, sizes)


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
    current = _default_opset(model)
    cap: float = math.inf if max_opset is None else max(current, max_opset)
    failures: list[str] = []
    while True:
        needed = max((_choose(p.candidates, cap).min_opset for p in plans), default=0)
        if needed <= current:
            return model, failures
        try:
            raised, how = _raise_opset(model, needed, node_names)
        except _OpsetError as exc:
            logger.info("cannot raise the opset to %d: %s", needed, exc)
            failures.append(f"opset {needed}: {exc}")
            cap = needed - 1
            continue
        changes.append(how)
        return raised, failures


def _tensor_names(model: onnx.ModelProto) -> set[str]:
    graph = model.graph
    return (
        {t.name for t in graph.initializer}
        | {s.values.name for s in graph.sparse_initializer}
        | {o for n in graph.node for o in n.output}
        | {v.name for v in (*graph.input, *graph.output, *graph.value_info)}
    )


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


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


def _without_metadata(node: onnx.NodeProto) -> bytes:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    del copy.metadata_props[:]
    return copy.SerializeToString()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _raise_opset(model: onnx.ModelProto, target: int, node_names: set[str]) -> tuple[onnx.ModelProto, str]:
    """``model`` at default-domain opset ``target``, verified; raises _OpsetError when it cannot be.

    Every node ``onnx.version_converter`` leaves unchanged (metadata aside) stays byte-identical; the nodes it
    rewrites keep their name and metadata; nodes it adds get fresh names. Graph I/O, initializers, value_info
    and model metadata are the original's (the converter drops metadata and adds inferred value_info).
    """
    current = _default_opset(model)
    # The converter does not know sparse initializers ("input ... is undefined"): show it dense copies.
    dense = onnx.ModelProto()
    dense.CopyFrom(model)
    densify_sparse_initializers(dense)
    try:
        converted = version_converter.convert_version(dense, target)
    except Exception as exc:  # the converter raises bare RuntimeErrors / C++ errors
        raise _OpsetError(
            f"onnx.version_converter cannot convert opset {current} to {target}: {_first_line(exc)}"
        ) from None
    raised = onnx.ModelProto()
    raised.CopyFrom(model)
    by_name = {n.name: n for n in model.graph.node}
    nodes, rewritten, added = [], [], []
    for node in converted.graph.node:
        original = by_name.get(node.name) if node.name else None
        if original is not None and _without_metadata(original) == _without_metadata(node):
            nodes.append(original)
            continue
        new = onnx.NodeProto()
        new.CopyFrom(node)
        if original is not None:
            del new.metadata_props[:]
            new.metadata_props.extend(original.metadata_props)
            rewritten.append(node.name)
        else:
            new.name = _fresh_name(f"opset{target}_{node.op_type}", node_names)
            node_names.add(new.name)
            added.append(new.name)
        nodes.append(new)
    del raised.graph.node[:]
    raised.graph.node.extend(nodes)
    existing = {t.name for t in dense.graph.initializer}
    raised.graph.initializer.extend(t for t in converted.graph.initializer if t.name not in existing)
    for opset in raised.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = target
    # int4 tensors need IR version 10, int2 13: the IR version that goes with the new opset.
    needed_ir = helper.find_min_ir_version_for(list(raised.opset_import), ignore_unknown=True)
    raised.ir_version = max(raised.ir_version, needed_ir)
    try:
        onnx.checker.check_model(raised)
    except Exception as exc:
        raise _OpsetError(f"the model at opset {target} fails onnx.checker: {_first_line(exc)}") from None
    _check_same_outputs(model, raised, target)
    if rewritten or added:
        how = f"rewrote {rewritten} and added {added} as onnx.version_converter does"
    else:
        how = "only the opset number changed (onnx.version_converter rewrites no node)"
    return raised, f"opset {current} -> {target}: {how}; outputs checked identical in onnxruntime"


# How close the raised model's outputs must be to the original's: same kernels give identical outputs; a
# rewritten node (e.g. ReduceMean's axes moved to an input) may differ by rounding.
_RTOL, _ATOL = 1e-5, 1e-6


def _check_same_outputs(model: onnx.ModelProto, raised: onnx.ModelProto, target: int) -> None:
    try:
        feeds = synthesize_inputs(model, batch=2, seed=0)
        expected = _run(model, feeds)
    except Exception as exc:
        raise _OpsetError(f"cannot verify a raise to opset {target} in onnxruntime: {_first_line(exc)}") from None
    try:
        got = _run(raised, feeds)
    except Exception as exc:
        raise _OpsetError(f"onnxruntime fails on the model at opset {target}: {_first_line(exc)}") from None
    for output, a, b in zip(model.graph.output, expected, got):
        a, b = np.asarray(a), np.asarray(b)
        same = a.shape == b.shape and (
            np.allclose(a, b, rtol=_RTOL, atol=_ATOL, equal_nan=True) if a.dtype.kind in "fc" else np.array_equal(a, b)
        )
        if not same:
            raise _OpsetError(f"output {output.name!r} differs in onnxruntime at opset {target}")


def _run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[object]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 4  # a failing candidate model is expected here, not an error to print
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, dict(feeds))


def _rename_parts(encoding: Encoding, name: str, taken: set[str], node_names: set[str]) -> None:
    """Give the encoding's auxiliary tensors and nodes names no other tensor / node of the model has."""
    renamed: dict[str, str] = {}
    tensors = [*encoding.initializers, *(s.values for s in encoding.sparse_initializers)]
    outputs = [o for node in encoding.nodes for o in node.output if o != name]
    for old in [t.name for t in tensors] + outputs:
        if old != name and old not in renamed:
            renamed[old] = _fresh_name(old, taken)
            taken.add(renamed[old])
    for tensor in tensors:
        tensor.name = renamed.get(tensor.name, tensor.name)
    for node in encoding.nodes:
        for i, value in enumerate(node.input):
            node.input[i] = renamed.get(value, value)
        for i, value in enumerate(node.output):
            node.output[i] = renamed.get(value, value)
        node.name = _fresh_name(node.name, node_names)
        node_names.add(node.name)
    taken.add(name)


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


def _set_metadata(model: onnx.ModelProto, metadata: Mapping[str, str]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for key, value in metadata.items():
        if key in existing:
            existing[key].value = value
        else:
            model.metadata_props.add(key=key, value=value)
