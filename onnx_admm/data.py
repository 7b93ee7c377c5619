"""Representative inputs for compress and validate: ``.npz`` files and Python loader plugins (the data convention).

An ``.npz`` holds one array per graph input, keyed by the input's name, plus optional ``labels``
(integer class ids, one per sample). The first axis of an array is the sample axis when the input
has one; an input without a sample axis (a fixed state, a lookup table) is passed as is in every
batch. Which inputs are batched is decided once, from the graph's declared shapes and the array
lengths (see ``from_arrays``).

A loader plugin ``package.module:function`` is called with no arguments once per epoch and yields
dicts ``{input_name: array, "labels": optional}``; each dict is checked with the same rules and
messages as an ``.npz``. The Python API also takes arrays (a dict of numpy arrays or torch tensors), an
iterable of such dicts and a function returning one (``as_data``), all checked the same way.

All problems with the user's data raise ``UserError`` with a one-line message naming the problem
and the fix.
"""

from __future__ import annotations

import importlib
import logging
import mmap
import os
import re
import struct
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from converters.errors import UserError
from converters.files import require_file
from converters.graphinfo import InputSpec, format_shape

logger = logging.getLogger(__name__)

LABELS = "labels"

_PLUGIN_RE = re.compile(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([A-Za-z_]\w*)")
_NPZ_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}

Feed = dict[str, np.ndarray]


@dataclass
class Dataset:
    """Arrays in memory, keyed by graph input name, with optional integer labels.

    Attributes:
        inputs: One array per graph input.
        labels: Integer class ids, shape [N], or None.
        batched: Names of the inputs whose first axis is the sample axis; the others are passed as is.
    """

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    batched: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        unknown = self.batched - set(self.inputs)
        if unknown:
            raise ValueError(f"batched names {sorted(unknown)} are not inputs {sorted(self.inputs)}")
        counts = _sample_counts(self)
        if not counts:
            raise ValueError("a Dataset needs labels or at least one batched input")
        if len(set(counts.values())) > 1:
            raise ValueError(f"inconsistent sample counts {counts}")

    def __len__(self) -> int:
        return next(iter(_sample_counts(self).values()))

    def split(self, val_fraction: float = 0.1, seed: int = 0) -> tuple[Dataset, Dataset]:
        """Split into (train, val) by a seeded permutation; labels follow their samples.

        The same ``seed`` always gives the same split. Each part keeps the original sample order.
        With ``val_fraction > 0`` the validation part holds at least one sample.

        Args:
            val_fraction: Fraction of samples held out, in [0, 1).
            seed: Seed of the permutation.

        Returns:
            The training and validation datasets.
        """
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        n = len(self)
        n_val = int(round(n * val_fraction))
        if val_fraction > 0:
            if n < 2:
                raise UserError(
                    f"cannot hold out a validation split from {n} sample(s); pass more data or set val_fraction = 0"
                )
            n_val = min(max(n_val, 1), n - 1)
        order = np.random.default_rng(seed).permutation(n)
        return self._subset(np.sort(order[n_val:])), self._subset(np.sort(order[:n_val]))

    def take(self, n: int) -> Dataset:
        """The first ``n`` samples (all of them when there are fewer)."""
        return self._subset(np.arange(min(n, len(self))))

    def batches(
        self, batch_size: int, shuffle: bool = False, seed: int | None = None, *, drop_last: bool = False,
        shard: tuple[int, int] | None = None,
    ) -> Iterator[Feed]:
        """Feeds of ``batch_size`` samples: ``{input_name: array}`` plus ``"labels"`` when present.

        Unbatched inputs appear unchanged in every feed. The last feed may be smaller unless
        ``drop_last``.

        Args:
            batch_size: Samples per feed.
            shuffle: Visit the samples in a permuted order.
            seed: Seed of that permutation (None: a fresh one each call).
            drop_last: Skip a final feed smaller than ``batch_size``.
            shard: ``(rank, size)``: only this process's share of the order (``shard_order``).

        Yields:
            One feed per batch.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self)
        order = np.random.default_rng(seed).permutation(n) if shuffle else None
        if shard is not None:
            order = shard_order(order if order is not None else np.arange(n), *shard)
            n = len(order)
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            if drop_last and stop - start < batch_size:
                break
            # Slices are views: the unshuffled pass (validation) copies nothing.
            yield self._feed(slice(start, stop) if order is None else order[start:stop])
            for name in self.batched:
                release(self.inputs[name])

    def as_feed(self) -> Feed:
        """All samples as one feed (``"labels"`` included when present)."""
        return self._feed(slice(None))

    def _feed(self, index: slice | np.ndarray) -> Feed:
        feed = {name: (array[index] if name in self.batched else array) for name, array in self.inputs.items()}
        if self.labels is not None:
            feed[LABELS] = self.labels[index]
        return feed

    def _subset(self, index: slice | np.ndarray) -> Dataset:
        # The samples stay where they are (a memory-mapped file, the caller's arrays): a split holds
        # their numbers, and each batch reads its own rows. Labels are small: they are copied.
        rows = np.arange(len(self))[index]
        inputs = {name: (Rows(array, rows) if name in self.batched else array) for name, array in self.inputs.items()}
        return Dataset(inputs, None if self.labels is None else self.labels[rows], set(self.batched))


class Rows:
    """Some samples (first-axis rows) of an array, read from it only when indexed.

    What ``Dataset.split`` and ``take`` hold for each batched input instead of a copy of the samples:
    indexing gives a numpy array of just the rows asked for, so a batch costs its own size and the
    parts of a split never copy the data. It reads like an array (``len``, ``shape``, ``dtype``,
    ``numpy.asarray``); any other array attribute reads the selected rows into memory first.
    """

    def __init__(self, array: np.ndarray | Rows, index: np.ndarray) -> None:
        if isinstance(array, Rows):  # a split of a split: index the original array directly
            array, index = array.array, array.index[index]
        self.array = array
        self.index = np.asarray(index, dtype=np.intp)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.array.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    @property
    def ndim(self) -> int:
        return self.array.ndim

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key):
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) and key else (key, ())
        if first is Ellipsis or any(k is Ellipsis or k is None for k in rest):
            return np.asarray(self)[key]
        where = self.index[first]
        picked = self.array[where]
        if not rest:
            return picked
        return picked[rest] if np.ndim(where) == 0 else picked[(slice(None), *rest)]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        picked = self.array[self.index]
        return picked if dtype is None else picked.astype(dtype, copy=False)

    def __getattr__(self, name: str):
        # numpy probes __array_interface__ and friends, and copy/pickle ask before array and index are set:
        # answering those through np.asarray would recurse.
        if name.startswith("__") or name in ("array", "index"):
            raise AttributeError(name)
        return getattr(np.asarray(self), name)

    def __repr__(self) -> str:
        return f"Rows({len(self)} of {len(self.array)} samples, shape {self.shape}, {self.dtype})"


def shard_order(order: np.ndarray, rank: int, size: int) -> np.ndarray:
    """Process ``rank``'s share of ``order`` among ``size`` processes, as torch's DistributedSampler splits it:
    every ``size``-th sample from position ``rank``, the order first padded with its own first samples to a
    multiple of ``size``, so every process gets the same number of batches (a collective step waits for all).

    Batch i of every process together then holds the samples of the single-process batch i at ``size``
    times the batch size."""
    padded = np.resize(order, -(-len(order) // size) * size) if len(order) else order
    return padded[rank::size]


def _sample_counts(data: Dataset) -> dict[str, int]:
    counts = {name: len(data.inputs[name]) for name in sorted(data.batched)}
    if data.labels is not None:
        counts[LABELS] = len(data.labels)
    return counts


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
        raise UserError(f"cannot read data file {path} as .npz ({_exc_line(exc)}); {fix}") from None


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


def from_arrays(arrays: Mapping[str, object], specs: list[InputSpec], source: str = "data") -> Dataset:
    """Check arrays keyed by graph input name (plus optional ``labels``) against the graph inputs.

    Rules:

    - Every graph input needs an array; any other key except ``labels`` is an error. (A graph input
      that is itself named ``labels`` takes that key.)
    - dtypes: an array of the wrong kind is an error (an integer array for a float input: convert
      and scale it yourself). Within a kind the array is cast to the graph's dtype silently — float64
      to float32 in particular, because numpy creates float64 by default.
    - Ranks must equal the graph's; every fixed dim after the first must match.
    - ``labels``: integer class ids, 1-D, cast to int64.
    - The sample count N is the length of ``labels``; else the common first-axis length of the
      inputs whose first dim is symbolic or unknown; else the first-axis length of the first input.
      An input is *batched* (its first axis is the sample axis) when its first dim is symbolic or
      unknown — its length must then be N — or when its length equals N (a model exported with a
      fixed batch size). An input whose first dim is fixed and whose length is that fixed size but
      not N has no sample axis and is passed as is. Scalars are never batched.

    Args:
        arrays: Array-likes (numpy arrays, CPU torch tensors, lists) by name.
        specs: The graph's inputs.
        source: What the arrays came from, used in messages (a path, a plugin batch).

    Returns:
        The checked dataset.

    Raises:
        UserError: A rule above is broken, or there are no samples.
    """
    wanted = [spec.name for spec in specs]
    missing = [name for name in wanted if name not in arrays]
    if missing:
        raise UserError(
            f"{source} has no array for graph input(s) {', '.join(map(repr, missing))}: it has {sorted(arrays)}, "
            f"the graph wants {wanted} (and optionally 'labels'); name each array after its graph input"
        )
    extra = sorted(key for key in arrays if key not in wanted and key != LABELS)
    if extra:
        raise UserError(
            f"{source} has key(s) {', '.join(map(repr, extra))}, neither a graph input nor 'labels'; "
            f"the graph inputs are {wanted}: rename or drop them"
        )
    inputs = {spec.name: _check_input(_as_array(arrays[spec.name], spec.name, source), spec, source) for spec in specs}
    labels = (_check_labels(_as_array(arrays[LABELS], LABELS, source), source)
              if LABELS in arrays and LABELS not in wanted else None)
    batched = _batched_inputs(inputs, labels, specs, source)
    data = Dataset(inputs, labels, batched)
    if len(data) == 0:
        raise UserError(f"{source} holds no samples (its sample axis has length 0); pass at least one sample")
    return data


def _as_array(value: object, key: str, source: str) -> np.ndarray:
    """A numpy array from an array-like: numpy arrays, lists, and torch tensors on any device, with or
    without grad (duck-typed, so this module needs no torch)."""
    if isinstance(value, np.memmap):  # np.asarray would drop the class that says the file backs it
        return value
    detach = getattr(value, "detach", None)
    try:
        if callable(detach):
            value = detach().cpu()
        return np.asarray(value)
    except Exception as exc:  # ragged lists, dtypes numpy lacks (bfloat16): anything
        raise UserError(
            f"{source}: {key!r} is a {type(value).__name__} that does not convert to a numpy array "
            f"({_exc_line(exc)}); pass a numpy array or a tensor of a numpy dtype"
        ) from None


def _check_input(array: np.ndarray, spec: InputSpec, source: str) -> np.ndarray:
    want, have = spec.dtype, array.dtype
    if want.kind != have.kind and not (want.kind in "iu" and have.kind in "iu"):
        hint = " and scale it as the model expects" if want.kind == "f" else ""
        raise UserError(
            f"{source}: input {spec.name!r} holds {have} values, but the graph wants {want}; "
            f"convert it with .astype(numpy.{want}){hint}"
        )
    if want.kind in "iu" and have != want and array.size:
        info = np.iinfo(want)
        if array.min() < info.min or array.max() > info.max:
            raise UserError(
                f"{source}: input {spec.name!r} has values outside the range of {want} "
                f"[{info.min}, {info.max}]; fix the data"
            )
    if spec.shape is not None:
        if array.ndim != len(spec.shape):
            raise UserError(
                f"{source}: input {spec.name!r} has shape {array.shape} (rank {array.ndim}), but the graph wants "
                f"rank {len(spec.shape)} {format_shape(spec.shape)}; reshape it (the first axis holds the samples)"
            )
        for axis, dim in enumerate(spec.shape[1:], start=1):
            if isinstance(dim, int) and array.shape[axis] != dim:
                raise UserError(
                    f"{source}: input {spec.name!r} dim {axis} is {array.shape[axis]}, but the graph fixes it to "
                    f"{dim} {format_shape(spec.shape)}; reshape or resize the data"
                )
    if want.kind == "f" and not _all_finite(array):
        bad = sum(int(np.count_nonzero(~np.isfinite(chunk))) for chunk in _chunks(array))
        raise UserError(
            f"{source}: input {spec.name!r} holds {bad} NaN or infinite value(s); every loss would be NaN: "
            "clean or drop those samples"
        )
    # float64 -> float32 (numpy's default float) and int32 -> int64 are the common, harmless casts.
    return array.astype(want, copy=False)


# Whole-array checks run over chunks of about this many bytes, so a memory-mapped input is not copied
# into a temporary of its own size (np.isfinite makes one boolean per value).
_CHUNK_BYTES = 1 << 24


def _chunks(array: np.ndarray) -> Iterator[np.ndarray]:
    if array.ndim == 0:
        yield array
        return
    rows = max(1, _CHUNK_BYTES // max(1, array[:1].nbytes))
    for start in range(0, len(array), rows):
        yield array[start:start + rows]


def _all_finite(array: np.ndarray) -> bool:
    try:
        return all(bool(np.isfinite(chunk).all()) for chunk in _chunks(array))
    finally:
        release(array)


def release(array: np.ndarray | Rows) -> None:
    """Drop the pages of a memory-mapped array from this process's resident set.

    They stay in the page cache and the next read maps them again (a minor fault), but a pass over the
    whole file, batch by batch, no longer counts the whole file in the process's memory. Anything else
    is left alone.
    """
    mapping = getattr(array.array if isinstance(array, Rows) else array, "_mmap", None)
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def _check_labels(labels: np.ndarray, source: str) -> np.ndarray:
    if labels.dtype.kind not in "iu":
        raise UserError(
            f"{source}: 'labels' must be integer class ids, got {labels.dtype}; convert with "
            "labels.astype(numpy.int64), or drop 'labels' to distil from the original model"
        )
    if labels.ndim != 1:
        hint = " (one-hot labels: use labels.argmax(1))" if labels.ndim == 2 else ""
        raise UserError(f"{source}: 'labels' must be 1-D class ids [N], got shape {labels.shape}{hint}")
    if labels.size and labels.dtype.kind == "u" and labels.max() > np.iinfo(np.int64).max:
        # Checked before the cast below, which would wrap such a label to a negative one.
        raise UserError(
            f"{source}: 'labels' holds {labels.max()}, too large for any class id; fix the labels, or drop "
            "'labels' to distil from the original model"
        )
    if labels.size and labels.min() < 0:
        raise UserError(
            f"{source}: 'labels' holds {labels.min()}, but class ids start at 0; fix the labels, or drop "
            "'labels' to distil from the original model"
        )
    return labels.astype(np.int64, copy=False)


def check_label_range(labels: np.ndarray, classes: int, source: str) -> None:
    """Class ids must be below the number of classes the model's score output has.

    Raises:
        UserError: A label is ``classes`` or more.
    """
    if labels.size and labels.max() >= classes:
        raise UserError(
            f"{source}: 'labels' holds {labels.max()}, but the model's score output has {classes} classes "
            f"(ids 0 to {classes - 1}); fix the labels, or drop 'labels' to distil from the original model"
        )


def _batched_inputs(
    inputs: dict[str, np.ndarray], labels: np.ndarray | None, specs: list[InputSpec], source: str
) -> set[str]:
    ranked = [spec for spec in specs if inputs[spec.name].ndim >= 1]
    dynamic = [spec for spec in ranked if spec.shape is None or not isinstance(spec.shape[0], int)]
    counts = {spec.name: len(inputs[spec.name]) for spec in dynamic}
    if labels is not None:
        counts[LABELS] = len(labels)
    if len(set(counts.values())) > 1:
        raise UserError(
            f"{source}: inconsistent sample counts (first-axis lengths) {counts}; "
            "every input with a sample axis and 'labels' need the same length"
        )
    if counts:
        n, origin = next(iter(counts.values())), ("'labels'" if labels is not None else "the dynamic inputs")
    elif ranked:
        n, origin = len(inputs[ranked[0].name]), repr(ranked[0].name)
    else:
        raise UserError(f"{source}: every graph input is a scalar and there are no 'labels', so there are no samples")
    batched = {spec.name for spec in dynamic}
    for spec in ranked:
        if spec.name in batched:
            continue
        length, fixed = len(inputs[spec.name]), spec.shape[0]
        if length == n:
            batched.add(spec.name)
            if length != fixed:
                logger.info(
                    "input %r: the graph fixes dim 0 to %d; its first axis is taken as the sample axis (%d samples)",
                    spec.name, fixed, n,
                )
        elif length != fixed:
            raise UserError(
                f"{source}: input {spec.name!r} dim 0 is {length}, neither the graph's fixed size {fixed} "
                f"{format_shape(spec.shape)} nor the sample count {n} (from {origin}); fix the data"
            )
    return batched


def required_batch_size(specs: list[InputSpec], batched: set[str]) -> int | None:
    """The batch size a model with a fixed leading dim on a batched input runs at, or None if any size runs.

    Raises:
        UserError: Two batched inputs fix different batch sizes.
    """
    fixed = {
        spec.name: spec.shape[0]
        for spec in specs
        if spec.name in batched and spec.shape and isinstance(spec.shape[0], int)
    }
    if len(set(fixed.values())) > 1:
        raise UserError(f"the graph fixes different batch sizes on its batched inputs {fixed}; it cannot be batched")
    return next(iter(fixed.values()), None)


def _exc_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


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
            f"cannot import module {module_name!r} of loader plugin {spec!r} ({_exc_line(exc)}); "
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
    return UserError(f"{what} raised {_exc_line(exc)} {when}; fix it")


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
        chunks: Iterable[Dataset] | None = None,
    ) -> Iterator[Feed]:
        """Feeds of ``batch_size`` samples re-batched across the plugin's dicts, or its dicts as they come.

        Args:
            batch_size: Samples per feed; None passes each dict through (checked and cast).
            shuffle: Ignored (the plugin decides the order).
            seed: Ignored.
            drop_last: Skip a final feed smaller than ``batch_size``.
            chunks: The epoch's checked dicts when the caller has started reading them (``chunks()``), to
                look at the first one before batching; default: a fresh epoch.

        Yields:
            One feed per batch.
        """
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
        if part.batched != first.batched or (part.labels is None) != (first.labels is None):
            raise UserError(
                f"{what}: its dicts disagree on which inputs have a sample axis or on 'labels'; "
                "yield the same keys and layout every time"
            )
    inputs = {
        key: (np.concatenate([p.inputs[key] for p in parts]) if key in first.batched else array)
        for key, array in first.inputs.items()
    }
    labels = None if first.labels is None else np.concatenate([p.labels for p in parts])
    return Dataset(inputs, labels, set(first.batched))


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
