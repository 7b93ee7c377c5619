"""Load and save ONNX models with one-line errors, external data, and atomic writes."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from onnx_admm.converters.errors import UserError, first_line
from onnx_admm.converters.files import require_file
from onnx_admm.converters.graphinfo import subgraphs

logger = logging.getLogger(__name__)

# Protobuf cannot serialise a message over 2 GB: such models must keep their weights outside.
_PROTOBUF_LIMIT = 2**31 - 1


def require_model_file(path: str | Path, what: str = "model") -> Path:
    """``path`` names a regular file, checked before anything opens it (a FIFO would block the run)."""
    return require_file(path, what, "pass the path of an .onnx model")


def load_model(path: str | Path) -> onnx.ModelProto:
    """Load an ONNX file with its external data, or raise UserError naming the problem and the fix."""
    path = require_model_file(path)
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
        require_file(path.parent / location, f"{path}: external data file",
                     f"keep the model's data files next to it (in {path.parent})")
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError, RuntimeError, onnx.checker.ValidationError) as exc:
        raise UserError(f"{path}: cannot read its external data ({first_line(exc)}); is the .data file truncated?"
                        ) from None
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

    Everything is written under temporary names beside the target and renamed at the end, so an
    interrupted or failed save leaves no half-written output. A model too large for one protobuf
    is always saved with external data.
    """
    try:
        with Staged() as staged:
            return staged.commit(staged.model(model, Path(path), external_data))
    except OSError as exc:
        raise _write_error(path, exc) from None


def save_json(data: dict, path: str | Path) -> Path:
    """Write ``data`` as indented JSON atomically (temporary file beside ``path``, then rename)."""
    return save_text(_json_text(data), path)


def save_text(text: str, path: str | Path) -> Path:
    """Write ``text`` (UTF-8) atomically (temporary file beside ``path``, then rename)."""
    try:
        with Staged() as staged:
            return staged.commit([staged.text(text, Path(path))])[0]
    except OSError as exc:
        raise _write_error(path, exc) from None


# Tensors of at least this many bytes go to a model's external data file (smaller ones stay inline).
_EXTERNAL_MIN_BYTES = 1024


def _initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """The initializers of ``graph`` and of every subgraph (If branches, Loop/Scan bodies) in it."""
    yield from graph.initializer
    for node in graph.node:
        for inner in subgraphs(node):
            yield from _initializers(inner)


def _json_text(data: dict) -> str:
    return json.dumps(json_safe(data), indent=2, default=str, allow_nan=False) + "\n"


def json_safe(value: object) -> object:
    """``value`` with every NaN or infinite float replaced by None (recursively through dicts, lists and
    tuples): Python's json writes them as the tokens NaN/Infinity, which strict JSON parsers (jq, JavaScript,
    Go) refuse, and a report a pipeline cannot read is no report."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _write_error(path: str | Path, exc: OSError) -> UserError:
    return UserError(f"cannot write {path}: {exc.strerror or exc}; nothing was written there, choose a writable location")


# Every temporary file or folder onnx-admm makes starts with this, then ``<host>-<pid>-``: a later run
# can tell which ones belong to a process that is gone (SIGKILL, power cut) and remove them.
TEMP_PREFIX = ".onnx-admm-tmp-"
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def temp_dir(folder: str | Path) -> Path:
    """A new private folder inside ``folder`` (created if missing), named with TEMP_PREFIX, host and pid.

    Stale ones left in ``folder`` by dead onnx-admm processes of this host are removed first.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)
    return Path(tempfile.mkdtemp(prefix=temp_prefix(), dir=folder))


def temp_prefix() -> str:
    """The name every temporary entry of this process starts with (mkdtemp/mkstemp add a random tail)."""
    return f"{TEMP_PREFIX}{_HOST}-{os.getpid()}-"


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temporary entries in ``folder`` whose onnx-admm process (same host) no longer runs."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(TEMP_PREFIX):
            continue
        parts = entry.name[len(TEMP_PREFIX):].rsplit("-", 2)
        if len(parts) != 3 or parts[0] != _HOST or not parts[1].isdigit() or _alive(int(parts[1])):
            continue  # another host's, a live process's, or not named by us
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as exc:
            logger.debug("could not remove stale temporary %s: %s", entry, exc)
            continue
        logger.info("removed %s, left by onnx-admm process %s that no longer runs", entry, parts[1])
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


@contextmanager
def scratch_dir(folder: str | Path | None = None) -> Iterator[Path]:
    """A temporary folder (in ``folder``, default the system's), removed with its contents on exit."""
    path = temp_dir(folder if folder is not None else tempfile.gettempdir())
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Staged:
    """Files written under temporary names beside their targets, renamed into place by ``commit``.

    A context manager: on exit every temporary folder it made is removed, with whatever was not
    committed, and so are the folders it created for targets that received no file.
    """

    def __init__(self) -> None:
        self._temps: dict[Path, Path] = {}  # target folder -> its temporary folder
        self._given: dict[Path, Path] = {}  # temporary folder -> its target folder as the caller wrote it
        self._extra: list[Path] = []
        self._created: list[Path] = []  # target folders that did not exist, outermost first

    def __enter__(self) -> Staged:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def folder(self, target: Path) -> Path:
        """The temporary folder beside ``target`` (same file system, so the rename is atomic)."""
        parent = target.parent.absolute()
        if parent not in self._temps:
            self._temps[parent] = self._temp_in(parent)
            self._given[self._temps[parent]] = target.parent
        return self._temps[parent]

    def scratch(self, folder: Path) -> Path:
        """Another temporary folder in ``folder``, for files that are never committed."""
        path = self._temp_in(Path(folder).absolute())
        self._extra.append(path)
        return path

    def _temp_in(self, folder: Path) -> Path:
        self._created.extend(reversed([p for p in (folder, *folder.parents) if not p.exists()]))
        return temp_dir(folder)

    def model(self, model: onnx.ModelProto, target: Path, external_data: bool = False) -> list[Path]:
        """Stage ``model`` for ``target``; returns the staged files (model, then its data file if any)."""
        if not external_data and model.ByteSize() > _PROTOBUF_LIMIT:
            external_data = True
        tmp = self.folder(target)
        data_name = target.name + ".data"
        staged = tmp / target.name
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        if external_data:
            # onnx.save_model(save_as_external_data=True) refuses a data file name that exists in the *current
            # folder*, not beside the file it writes: `compress -o out.onnx` run again in the folder holding
            # the last run's out.onnx.data failed. Marking the tensors here, the save writes them beside it.
            for tensor in _initializers(copy.graph):
                if tensor.HasField("raw_data") and len(tensor.raw_data) >= _EXTERNAL_MIN_BYTES:
                    external_data_helper.set_external_data(tensor, data_name)
        onnx.save_model(copy, str(staged))
        data = tmp / data_name
        if not (external_data and data.exists()):
            return [staged]
        # onnx creates the data file readable by its owner alone (0600): give it the model file's mode, so
        # whoever may read the model (a serving process of another user) may read its weights too.
        data.chmod(staged.stat().st_mode & 0o777)
        return [staged, data]

    def json(self, data: dict, target: Path) -> Path:
        """Stage ``data`` as indented, strict JSON for ``target`` (``json_safe``)."""
        return self.text(_json_text(data), target)

    def text(self, text: str, target: Path) -> Path:
        """Stage ``text`` (UTF-8) for ``target``."""
        staged = self.folder(target) / target.name
        staged.write_text(text, encoding="utf-8")
        return staged

    def commit(self, staged: list[Path]) -> list[Path]:
        """Rename staged files onto their targets; a model's data file first, so no model points at a
        missing one. Returns the targets, in the order given."""
        targets = [self._given[path.parent] / path.name for path in staged]
        for path, target in reversed(list(zip(staged, targets))):
            os.replace(path, target)
        return targets

    def close(self) -> None:
        for tmp in [*self._extra, *self._temps.values()]:
            shutil.rmtree(tmp, ignore_errors=True)
        self._temps.clear()
        self._extra.clear()
        for folder in reversed(self._created):  # innermost first; rmdir leaves any that received a file
            try:
                folder.rmdir()
            except OSError:
                pass
        self._created.clear()
