"""What a model costs to store: its files, their gzip'd size, its weights and nonzeros, and the
weight-storage bits the ADMM papers quote."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from onnx_admm.converters.fused import weights_view
from onnx_admm.converters.graphinfo import (TensorSource, compressible_weights, constant_sources, subgraph_reads,
                                            subgraphs, tensor_shape_and_type, tensor_value)
from onnx_admm.converters.modelio import external_data_files, load_model

_GZIP_CHUNK = 1 << 24


def model_files(path: str | Path) -> list[Path]:
    """The model file followed by the external data files its tensors point to (sorted)."""
    path = Path(path)
    # The loaded model has its external data pulled in (and the references cleared): re-read the
    # bare protobuf to see where the data lives.
    bare = onnx.load(str(path), load_external_data=False)
    return [path] + [path.parent / location for location in sorted(external_data_files(bare))]


class _ByteCounter:
    def __init__(self) -> None:
        self.size = 0

    def write(self, chunk: bytes) -> int:
        self.size += len(chunk)
        return len(chunk)

    def flush(self) -> None:
        pass


def gzip_size(path: Path) -> int:
    """Size of ``gzip.compress(data, compresslevel=9)``, streamed so a large data file is not read at once."""
    counter = _ByteCounter()
    with path.open("rb") as source, gzip.GzipFile(fileobj=counter, mode="wb", compresslevel=9, mtime=0) as sink:
        while chunk := source.read(_GZIP_CHUNK):
            sink.write(chunk)
    return counter.size


def count_weights(model: onnx.ModelProto) -> tuple[int, int]:
    """(parameters, nonzeros) over the compressible weights, external data loaded.

    Dense initializers, Constant nodes and sparse initializers are counted as the dense tensors they
    hold; weights stored through a decoder (DequantizeLinear, codebook Cast+Gather) as the tensor they decode to.
    """
    parameters = nonzeros = 0
    for value in _weight_values(model):
        parameters += value.size
        nonzeros += int(np.count_nonzero(value))
    return parameters, nonzeros


def _weight_values(model: onnx.ModelProto) -> Iterator[np.ndarray]:
    """Each compressible weight of ``model`` once, as the tensor a runtime sees (decoders evaluated), the If
    branches' and Loop bodies' included (``_scopes``)."""
    model = weights_view(model)[0]
    counted: set[str] = set()
    for scope, owners in _scopes(model):
        sources = constant_sources(scope)
        for weight in compressible_weights(scope):
            if weight.name not in counted:  # an outer weight both branches of an If read counts once
                counted.add(weight.name)
                yield tensor_value(*owners[weight.name]) if weight.name in owners else \
                    tensor_value(scope, sources[weight.name])


Owners = dict[str, tuple[onnx.ModelProto, TensorSource]]  # an outer constant: the model and source holding it


def _scopes(model: onnx.ModelProto) -> Iterator[tuple[onnx.ModelProto, Owners]]:
    """``model``, then one model per subgraph (If branches, Loop bodies, at any depth): that subgraph's nodes and
    own constants, and a dims-only stand-in for each outer constant it reads, with where that one's values are
    (``owners``): the weights a silero-VAD's branches hold, or that an optimum merged decoder's branches read
    from the top graph, are found as the top graph's are, without copying the outer ones."""
    yield model, {}
    stack = [(model.graph, {name: (model, source) for name, source in constant_sources(model).items()})]
    while stack:
        graph, outer = stack.pop()
        for node in graph.node:
            reads = subgraph_reads(node)
            for sub in subgraphs(node):
                scope = onnx.helper.make_model(
                    onnx.helper.make_graph(list(sub.node), sub.name, [], [], list(sub.initializer),
                                           sparse_initializer=list(sub.sparse_initializer)),
                    opset_imports=list(model.opset_import), ir_version=model.ir_version)
                owners = {name: outer[name] for name in sorted(reads & outer.keys())}
                for name, owner in owners.items():  # a stand-in without values: the shape and type only
                    dims, elem = tensor_shape_and_type(*owner)
                    shell = scope.graph.initializer.add()
                    shell.name, shell.data_type = name, elem
                    shell.dims.extend(dims)
                yield scope, owners
                own = {name: (scope, source) for name, source in constant_sources(scope).items()
                       if name not in owners}
                stack.append((sub, {**outer, **own}))


# Above this many distinct nonzero values a weight counts as full-precision float.
_MAX_CODEBOOK = 256


def tensor_storage_bits(value: np.ndarray) -> int:
    """The weight-storage figure the ADMM papers quote, for one weight tensor.

    values: nonzeros x value bits, where value bits = ceil(log2(distinct nonzero values)) when the
    tensor (or, if smaller, each output channel) holds at most 256 distinct nonzero values (quantized or
    clustered: plus 32 bits per codebook entry), else 32; indices: for a tensor with zeros, nonzeros x ceil(log2(largest gap between
    consecutive nonzeros in flat order + 1)) (relative indexing, as in CSR with relative offsets).
    """
    flat = value.reshape(-1)
    nonzero = np.flatnonzero(flat)
    nnz = nonzero.size
    if nnz == 0:
        return 0
    # Per tensor (one codebook) or per output channel (per-channel scales): whichever is smaller.
    rows = value.reshape(value.shape[0], -1) if value.ndim > 1 else flat[None]
    options = []
    for distinct, tables in ((np.unique(flat[nonzero]).size, None),
                             (max(np.unique(r[r != 0]).size for r in rows), sum(np.unique(r[r != 0]).size for r in rows))):
        if distinct > _MAX_CODEBOOK:
            options.append(nnz * 32)
        else:
            options.append(nnz * max(1, int(np.ceil(np.log2(distinct)))) + 32 * (tables if tables is not None else distinct))
    total = min(options)
    if nnz < flat.size:
        gaps = np.diff(np.concatenate([[-1], nonzero]))
        total += nnz * max(1, int(np.ceil(np.log2(gaps.max() + 1))))
    return int(total)


def weight_storage_bits(path: str | Path) -> int:
    """``tensor_storage_bits`` summed over the compressible weights of the model at ``path``."""
    return sum(tensor_storage_bits(value) for value in _weight_values(load_model(path)))
