"""Representative inputs for compress and validate, in memory: the ``Dataset``, its checks and batches
(the data convention).

An ``.npz`` holds one array per graph input, keyed by the input's name, plus optional ``labels``
(integer class ids, one per sample). The first axis of an array is the sample axis when the input
has one; an input without a sample axis (a fixed state, a lookup table) is passed as is in every
batch. Which inputs are batched is decided once, from the graph's declared shapes and the array
lengths (see ``from_arrays``). Where data comes from (files, loader plugins, the Python API's forms)
is ``onnx_admm.sources``.

All problems with the user's data raise ``UserError`` with a one-line message naming the problem
and the fix.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from onnx_admm.converters.errors import STRING_INPUT_FIX, UserError
from onnx_admm.converters.graphinfo import InputSpec, format_shape

logger = logging.getLogger(__name__)

LABELS = "labels"

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
    # Batched inputs whose sample axis in the graph is not the first (a recurrent state [layers, N, hidden]):
    # held with the sample axis first, fed with it back at this axis.
    axes: dict[str, int] = field(default_factory=dict)

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
        for name, axis in self.axes.items():
            feed[name] = np.moveaxis(np.asarray(feed[name]), 0, axis)
        if self.labels is not None:
            feed[LABELS] = self.labels[index]
        return feed

    def _subset(self, index: slice | np.ndarray) -> Dataset:
        # The samples stay where they are (a memory-mapped file, the caller's arrays): a split holds
        # their numbers, and each batch reads its own rows. Labels are small: they are copied.
        rows = np.arange(len(self))[index]
        inputs = {name: (Rows(array, rows) if name in self.batched else array) for name, array in self.inputs.items()}
        return Dataset(inputs, None if self.labels is None else self.labels[rows], set(self.batched), dict(self.axes))


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
    batched, axes = _batched_inputs(inputs, labels, specs, source)
    for name, axis in axes.items():
        inputs[name] = np.moveaxis(inputs[name], axis, 0)
    data = Dataset(inputs, labels, batched, axes)
    if len(data) == 0:
        raise UserError(f"{source} holds no samples (its sample axis has length 0); pass at least one sample")
    return data


def exc_line(exc: BaseException) -> str:
    """``Type: first line of the message``, for one-line errors about what the user's code raised."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


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
            f"({exc_line(exc)}); pass a numpy array or a tensor of a numpy dtype"
        ) from None


def _check_input(array: np.ndarray, spec: InputSpec, source: str) -> np.ndarray:
    want, have = spec.dtype, array.dtype
    if want.kind == "O":
        raise UserError(f"{source}: input {spec.name!r} is a string tensor of the graph, and torch holds no strings; "
                        f"{STRING_INPUT_FIX}")
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
    if want.kind == "f" and not _all_finite(array, allow_nan=spec.imputes_nan):
        what = "infinite" if spec.imputes_nan else "NaN or infinite"
        bad = sum(int(np.count_nonzero(_invalid(chunk, spec.imputes_nan))) for chunk in _chunks(array))
        raise UserError(
            f"{source}: input {spec.name!r} holds {bad} {what} value(s), on which no loss or metric can be "
            "measured (compress, validate, check and analyze alike): clean or drop those samples"
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


def _invalid(chunk: np.ndarray, allow_nan: bool) -> np.ndarray:
    # NaN is a missing value where the graph imputes it (InputSpec.imputes_nan); infinities never are.
    return np.isinf(chunk) if allow_nan else ~np.isfinite(chunk)


def _all_finite(array: np.ndarray, allow_nan: bool = False) -> bool:
    try:
        return not any(bool(_invalid(chunk, allow_nan).any()) for chunk in _chunks(array))
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
) -> tuple[set[str], dict[str, int]]:
    """The inputs with a sample axis, and the axis of those whose sample axis is not the first."""
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
    axes: dict[str, int] = {}
    for spec in ranked:
        if spec.name in batched:
            continue
        length, fixed = len(inputs[spec.name]), spec.shape[0]
        inner = [axis for axis, dim in enumerate(spec.shape[1:], start=1)
                 if not isinstance(dim, int) and inputs[spec.name].shape[axis] == n]
        if length == fixed and length != n and len(inner) == 1 and dynamic:
            # [2, N, 128]: a fixed leading dim, the samples on the one dynamic axis of length N.
            batched.add(spec.name)
            axes[spec.name] = inner[0]
            logger.info("input %r: its samples are on axis %d (%s)", spec.name, inner[0], format_shape(spec.shape))
        elif length == n:
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
    return batched, axes


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


