"""Where representative inputs come from: ``.npz``/``.npy`` files (memory-mapped where stored
uncompressed), Python loader plugins, and the forms the Python API takes; each checked with the rules
and messages of ``onnx_admm.data.from_arrays``.

A loader plugin ``package.module:function`` is called with no arguments once per epoch and yields
dicts ``{input_name: array, "labels": optional}``; each dict is checked with the same rules and
messages as an ``.npz``. The Python API also takes arrays (a dict of numpy arrays or torch tensors), an
iterable of such dicts and a function returning one (``as_data``), all checked the same way.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import os
import re
import struct
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

from onnx_admm.converters.errors import UserError
from onnx_admm.converters.files import require_file
from onnx_admm.converters.graphinfo import InputSpec
from onnx_admm.data import Dataset, Feed, check_label_range, exc_line, from_arrays

logger = logging.getLogger(__name__)

_PLUGIN_RE = re.compile(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([A-Za-z_]\w*)")
_NPZ_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def load_npz(path: str | Path, specs: list[InputSpec]) -> Dataset:
    """Load an ``.npz`` keyed by graph input name (optional ``labels``) and check it against the graph.

    A ``.npy`` file is accepted too when the graph has a single input. See ``from_arrays`` for the
    rules (sample axis, dtype casts).

    Args:
        path: The file.
        specs: The graph's inputs (``converters.graphinfo.graph_inputs``).

    Returns:
        The checked dataset.

    Raises:
        UserError: The file is missing or unreadable, or its arrays do not fit the graph.
    """
    path = Path(path)
    return from_arrays(_read_arrays(path, specs), specs, source=str(path))


def _read_arrays(path: Path, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    fix = "write it with numpy.savez(path, <input name>=array, ..., labels=class_ids)"
    require_file(path, "data file", f"pass an .npz with one array per graph input ({fix})")
    try:
        with path.open("rb") as handle:
            magic = handle.read(6)
        if not (magic.startswith(_NPZ_MAGIC) or magic == _NPY_MAGIC):
            raise UserError(f"data file {path} is not an .npz archive; {fix}")
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            if len(specs) != 1:
                raise UserError(
                    f"data file {path} holds a single .npy array, but the graph has {len(specs)} inputs "
                    f"{[s.name for s in specs]}; {fix}"
                )
            return {specs[0].name: loaded}
        with loaded:
            mapped = map_npz(path)
            return {key: mapped[key] if key in mapped else loaded[key] for key in loaded.files}
    except UserError:
        raise
    except Exception as exc:  # zipfile, pickle and numpy format errors share no base class
        raise UserError(f"cannot read data file {path} as .npz ({exc_line(exc)}); {fix}") from None


def map_npz(path: str | Path) -> dict[str, np.memmap]:
    """The members of an ``.npz`` stored uncompressed (``numpy.savez``), memory-mapped read-only.

    ``numpy.load`` reads every member into memory, and ``mmap_mode`` only works for ``.npy`` files; but
    a stored member is a plain ``.npy`` inside the zip, at a fixed offset, so it maps like one. The
    samples are then read from the page cache as the batches need them, and two runs on the same file
    share it. Compressed members (``numpy.savez_compressed``), object arrays and members numpy cannot
    map are left out: the caller reads those.
    """
    mapped = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as handle:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                continue
            # The local header repeats the name and has its own extra field: its length decides the offset.
            handle.seek(info.header_offset)
            local = handle.read(30)
            if len(local) < 30 or local[:4] != _NPZ_MAGIC:
                continue
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            handle.seek(info.header_offset + 30 + name_length + extra_length)
            try:
                version = np.lib.format.read_magic(handle)
                read_header = _NPY_HEADERS.get(version)
                if read_header is None:
                    continue
                shape, fortran, dtype = read_header(handle)
            except ValueError:
                continue
            if dtype.hasobject:
                continue
            mapped[info.filename[: -len(".npy")]] = np.memmap(
                path, dtype=dtype, mode="r", offset=handle.tell(), shape=shape, order="F" if fortran else "C")
    return mapped


def load_plugin(spec: str) -> Callable[[], Iterable[Mapping[str, object]]]:
    """Import a loader plugin given as ``"package.module:function"``.

    The current directory is searched before ``sys.path``, as ``python -m`` would, so a plugin file
    next to the data works without setting PYTHONPATH.

    Args:
        spec: ``"package.module:function"``.

    Returns:
        The function.

    Raises:
        UserError: Bad syntax, the module does not import, or it has no such callable.
    """
    match = _PLUGIN_RE.fullmatch(spec)
    if match is None:
        raise UserError(f"loader plugin {spec!r} is not of the form 'package.module:function'")
    module_name, attr = match.groups()
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except SystemExit as exc:  # exiting is never the plugin's call: the run decides its own exit status
        raise _plugin_error(f"module {module_name!r} of loader plugin {spec!r}", exc, "when imported") from None
    except Exception as exc:  # the plugin's own import-time code may raise anything
        raise UserError(
            f"cannot import module {module_name!r} of loader plugin {spec!r} ({exc_line(exc)}); "
            "make it importable (current directory or PYTHONPATH)"
        ) from None
    finally:
        if added:
            sys.path.remove(cwd)
    function = getattr(module, attr, None)
    if function is None:
        raise UserError(f"module {module_name!r} has no attribute {attr!r}; check loader plugin {spec!r}")
    if not callable(function):
        raise UserError(f"{spec!r} names a {type(function).__name__!r} object, not a function; name a loader function")
    return function


def _plugin_error(what: str, exc: BaseException, when: str) -> UserError:
    """The one line for a loader plugin that raised, or called ``sys.exit``: SystemExit is no Exception, so
    without this a plugin's ``sys.exit(0)`` would end the whole run with status 0 and nothing written."""
    if isinstance(exc, SystemExit):
        return UserError(f"{what} called sys.exit({exc.code!r}) {when}; a loader plugin must return or yield its "
                         "batches, never exit the process: fix it")
    return UserError(f"{what} raised {exc_line(exc)} {when}; fix it")


class PluginData:
    """Data yielded by a loader plugin, with the ``batches``/``take`` interface of ``Dataset``.

    The function is called once per ``batches`` call (one epoch) and must return an iterable of dicts
    ``{input_name: array, "labels": optional}``, each a chunk of samples. Every chunk is checked like an
    ``.npz`` (``from_arrays``). Sample order is the plugin's own: ``shuffle`` and ``seed`` are ignored,
    so a plugin that wants shuffling shuffles itself.
    """

    def __init__(
        self, function: Callable[[], Iterable[Mapping[str, object]]], specs: list[InputSpec], name: str = "plugin",
        what: str | None = None,
    ):
        self.function = function
        self.specs = specs
        self.name = name
        # How messages name the source: a loader plugin, or what the Python API was given (``as_data``).
        self.what = what or f"loader plugin {name!r}"
        # Set once the model's class count is known: every chunk's labels are then checked against it.
        self.n_classes: int | None = None

    def chunks(self) -> Iterator[Dataset]:
        """One epoch: call the plugin and yield each dict it gives, checked, as a Dataset.

        Raises:
            UserError: The plugin raised (when called or while yielding), or yielded something else.
        """
        try:
            produced = self.function()
        except (Exception, SystemExit) as exc:  # the user's code may raise anything, or call sys.exit
            raise _plugin_error(self.what, exc, "when called") from None
        if isinstance(produced, Mapping) or not isinstance(produced, Iterable):
            raise UserError(
                f"{self.what} returned {type(produced).__name__}; it must return or yield "
                "dicts {input_name: array, 'labels': optional}"
            )
        iterator = iter(produced)
        number = 0
        while True:
            try:
                chunk = next(iterator)
            except StopIteration:
                return
            except (Exception, SystemExit) as exc:  # the user's generator may raise anything, or call sys.exit
                raise _plugin_error(self.what, exc, f"after yielding {number} item(s)") from None
            number += 1
            if not isinstance(chunk, Mapping):
                raise UserError(
                    f"{self.what} yielded a {type(chunk).__name__} as item {number}; "
                    "it must yield dicts {input_name: array, 'labels': optional}"
                )
            source = f"{self.what} (item {number})"
            data = from_arrays(chunk, self.specs, source=source)
            if self.n_classes is not None and data.labels is not None:
                check_label_range(data.labels, self.n_classes, source)
            yield data

    def batches(
        self, batch_size: int | None, shuffle: bool = False, seed: int | None = None, *, drop_last: bool = False,
        chunks: Iterable[Dataset] | None = None, shard: tuple[int, int] | None = None,
    ) -> Iterator[Feed]:
        """Feeds of ``batch_size`` samples re-batched across the plugin's dicts, or its dicts as they come.

        Args:
            batch_size: Samples per feed; None passes each dict through (checked and cast).
            shuffle: Ignored (the plugin decides the order).
            seed: Ignored.
            drop_last: Skip a final feed smaller than ``batch_size``.
            chunks: The epoch's checked dicts when the caller has started reading them (``chunks()``), to
                look at the first one before batching; default: a fresh epoch.
            shard: ``(rank, size)``: only this process's share, the batches dealt round-robin (the k-th
                feed of the stream to rank ``k % size``). Every process reads the whole stream, since a
                plugin's length is unknown in advance; the shares may then differ by a batch, which the
                caller evens out (``onnx_admm.pipeline.batch.even_steps``).

        Yields:
            One feed per batch.
        """
        if shard is not None:
            rank, size = shard
            yield from itertools.islice(self.batches(batch_size, drop_last=drop_last, chunks=chunks), rank, None, size)
            return
        if shuffle:
            logger.debug("loader plugin %r: shuffle is left to the plugin", self.name)
        chunks = self.chunks() if chunks is None else chunks
        if batch_size is None:
            for chunk in chunks:
                yield chunk.as_feed()
            return
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        pending: list[Dataset] = []
        count = 0
        for chunk in chunks:
            pending.append(chunk)
            count += len(chunk)
            if count < batch_size:
                continue
            merged = _concat(pending, self.what)
            full = count - count % batch_size
            yield from merged._subset(slice(0, full)).batches(batch_size)
            rest = merged._subset(slice(full, count))
            pending, count = ([rest] if len(rest) else []), len(rest)
        if count and not (drop_last and count < batch_size):
            yield _concat(pending, self.what).as_feed()

    def take(self, n: int | None = None) -> Dataset:
        """The first ``n`` samples the plugin yields (None: one whole epoch), in memory."""
        pending: list[Dataset] = []
        count = 0
        for chunk in self.chunks():
            pending.append(chunk)
            count += len(chunk)
            if n is not None and count >= n:
                break
        if not pending:
            raise UserError(f"{self.what} yielded no data")
        merged = _concat(pending, self.what)
        return merged if n is None else merged.take(n)


def _concat(parts: list[Dataset], what: str) -> Dataset:
    first = parts[0]
    if len(parts) == 1:
        return first
    for part in parts[1:]:
        if part.batched != first.batched or part.axes != first.axes or (part.labels is None) != (first.labels is None):
            raise UserError(
                f"{what}: its dicts disagree on which inputs have a sample axis or on 'labels'; "
                "yield the same keys and layout every time"
            )
    inputs = {
        key: (np.concatenate([p.inputs[key] for p in parts]) if key in first.batched else array)
        for key, array in first.inputs.items()
    }
    labels = None if first.labels is None else np.concatenate([p.labels for p in parts])
    return Dataset(inputs, labels, set(first.batched), dict(first.axes))


def resolve_data(arg: str, specs: list[InputSpec]) -> Dataset | PluginData:
    """Turn a ``--data`` argument into data: an ``.npz``/``.npy`` path or an existing file, else a plugin.

    Args:
        arg: A file path, or ``"package.module:function"``.
        specs: The graph's inputs.

    Returns:
        A Dataset for a file, a PluginData for a plugin.

    Raises:
        UserError: The argument is neither, or loading fails.
    """
    path = Path(arg)
    if arg.endswith((".npz", ".npy")) or os.path.exists(path):  # False for a name too long to look up
        return load_npz(path, specs)
    if _PLUGIN_RE.fullmatch(arg):
        return PluginData(load_plugin(arg), specs, name=arg)
    raise UserError(f"data {arg!r} is neither an existing .npz file nor a loader plugin 'package.module:function'")


def as_data(data: object, specs: list[InputSpec], name: str = "data") -> Dataset | PluginData:
    """What the Python API takes as data, checked with the rules and messages of an ``.npz`` (``from_arrays``).

    Args:
        data: an ``.npz`` path or a ``module:function`` plugin (``resolve_data``); a dict
            ``{input_name: array, "labels": optional}`` of numpy arrays, torch tensors or lists; a
            Dataset (checked again: one built by hand may hold float64 arrays); a function returning an
            iterable of such dicts, called once per epoch like a loader plugin (for data that does not
            fit in memory); any other iterable of such dicts, read once into memory; or a PluginData.
        specs: The graph's inputs.
        name: What the caller called it (``data``, ``val_data``), for messages.

    Returns:
        A Dataset (in memory), or a PluginData for plugins and functions.

    Raises:
        UserError: ``data`` is none of those, or its arrays break a rule of ``from_arrays``.
    """
    if isinstance(data, (str, os.PathLike)):
        return resolve_data(str(data), specs)
    if isinstance(data, PluginData):
        return data
    if isinstance(data, Dataset):
        return from_arrays(data.as_feed(), specs, source=f"{name} (Dataset)")
    if isinstance(data, Mapping):
        return from_arrays(data, specs, source=f"{name} (dict)")
    if callable(data):
        label = getattr(data, "__qualname__", type(data).__name__)
        return PluginData(data, specs, name=label, what=f"{name} function {label!r}")
    if isinstance(data, Iterable):
        # Read once: a generator could not be replayed each epoch, and a list is in memory already.
        return PluginData(lambda: data, specs, name=name, what=f"{name} iterable").take()
    raise UserError(
        f"{name} is of type {type(data).__name__}; pass an .npz path, a dict {{input_name: array, 'labels': class ids}}, "
        "an iterable of such dicts, or a function returning one"
    )
