"""Load and save ONNX models with one-line errors, external data, and atomic writes."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from converters.errors import UserError

logger = logging.getLogger(__name__)

# Protobuf cannot serialise a message over 2 GB: such models must keep their weights outside.
_PROTOBUF_LIMIT = 2**31 - 1


def load_model(path: str | Path) -> onnx.ModelProto:
    """Load an ONNX file with its external data, or raise UserError naming the problem and the fix."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; pass the path of an .onnx model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise UserError(f"{path}: not a readable ONNX model ({type(exc).__name__}); is the file truncated or not ONNX?") from None
    if not model.graph.node and not model.graph.output:
        raise UserError(f"{path}: not an ONNX model (no graph found); pass a .onnx file exported by a framework")
    folder = path.parent.resolve()
    for location in sorted(external_data_files(model)):
        target = (path.parent / location).resolve()
        if not target.is_relative_to(folder):
            # A location leaving the model's folder (../../etc/passwd) is a path-traversal attempt: refuse it.
            raise UserError(
                f"{path}: external data location {location!r} points outside the model's folder {path.parent}; "
                "keep the data files next to the model and refer to them by file name"
            )
        if not (path.parent / location).is_file():
            raise UserError(
                f"{path}: external data file {location!r} is missing; keep it next to the model (in {path.parent})"
            )
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError, RuntimeError, onnx.checker.ValidationError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: cannot read its external data ({first}); is the .data file truncated?") from None
    return model


def external_data_files(model: onnx.ModelProto) -> set[str]:
    """Locations (relative paths) of external data referenced by the model's tensors."""
    locations = set()
    for tensor in _all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
    return locations


def uses_external_data(path: str | Path) -> bool:
    """Whether the model file at ``path`` keeps tensors in external data files."""
    return bool(external_data_files(onnx.load(str(path), load_external_data=False)))


def _all_tensors(model: onnx.ModelProto):
    graph = model.graph
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t


def save_model(model: onnx.ModelProto, path: str | Path, external_data: bool = False) -> list[Path]:
    """Write ``model`` atomically; returns the files written (model, then its data file if any).

    Everything is written under temporary names in the target directory and renamed at the end, so
    an interrupted or failed save leaves no half-written output. A model too large for one protobuf
    is always saved with external data.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not external_data and model.ByteSize() > _PROTOBUF_LIMIT:
        external_data = True
    data_name = path.name + ".data"
    tmp_dir = Path(tempfile.mkdtemp(prefix=".onnx-admm-", dir=path.parent))
    try:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        tmp_model = tmp_dir / path.name
        if external_data:
            onnx.save_model(copy, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(copy, str(tmp_model))
        written = [path]
        if external_data and (tmp_dir / data_name).exists():
            os.replace(tmp_dir / data_name, path.parent / data_name)
            written.append(path.parent / data_name)
        os.replace(tmp_model, path)
        return written
    finally:
        for leftover in tmp_dir.iterdir():
            leftover.unlink()
        tmp_dir.rmdir()
