"""Encoders: how one changed tensor is stored in the graph.

An encoder offers an ``Encoding`` of one tensor; ``converters.writeback`` keeps the smallest valid one in
raw bytes:

- ``DenseEncoder``, ``SparseEncoder``: a float initializer, or a COO sparse initializer;
- ``DequantizeLinearEncoder``: integers + scale (+ zero point) -> DequantizeLinear, in the smallest
  container the integers fit: int2 (opset 25), int4 (opset 21), int8 (opset 13);
- ``SparseDequantizeLinearEncoder``: int8 integers in a sparse initializer -> DequantizeLinear;
- ``CodebookEncoder``: uint2/uint4/uint8 indices -> Cast(INT64) -> Gather(codebook);
- ``SparseCodebookEncoder``: uint8 indices in a sparse initializer -> Cast(INT64) -> Gather(codebook).

``DENSE_ENCODERS`` are those that keep every entry in the weight's own shape (no COO), for a zero
pattern a runtime reads from the dense tensor (N:M sparsity). The quantized encoders apply only to a
tensor that carries a :class:`QuantSpec`, and they are exact: an encoder whose decoded floats would
differ from the values in any bit does not apply.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_admm.converters.graphinfo import fresh_name

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
        # ascontiguousarray gives a scalar one axis: reshape keeps a 0-d constant (a Mul's count) 0-d.
        tensor = numpy_helper.from_array(np.ascontiguousarray(value).reshape(np.shape(value)), name)
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


def dequantize_node(name: str, inputs: list[str], axis: int | None) -> onnx.NodeProto:
    """A DequantizeLinear node producing ``name`` from ``inputs`` (per-axis when ``axis`` is given)."""
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
            node = dequantize_node(name, [t.name for t in tensors], _axis(quant, value))
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
        node = dequantize_node(name, [sparse.values.name, *(t.name for t in tensors)], _axis(quant, value))
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


def rename_parts(encoding: Encoding, name: str, taken: set[str], node_names: set[str]) -> None:
    """Give the encoding's auxiliary tensors and nodes names no other tensor / node of the model has."""
    renamed: dict[str, str] = {}
    tensors = [*encoding.initializers, *(s.values for s in encoding.sparse_initializers)]
    outputs = [o for node in encoding.nodes for o in node.output if o != name]
    for old in [t.name for t in tensors] + outputs:
        if old != name and old not in renamed:
            renamed[old] = fresh_name(old, taken)
            taken.add(renamed[old])
    for tensor in tensors:
        tensor.name = renamed.get(tensor.name, tensor.name)
    for node in encoding.nodes:
        for i, value in enumerate(node.input):
            node.input[i] = renamed.get(value, value)
        for i, value in enumerate(node.output):
            node.output[i] = renamed.get(value, value)
        node.name = fresh_name(node.name, node_names)
        node_names.add(node.name)
    taken.add(name)
