"""The structure of a sparsity target, as a value: what one pruned group is, and the constraint that
keeps a number of them.

A recipe names a structure with a word (``unstructured``, ``filter``, ``channel``, ``column``,
``block``) or an N:M pattern (``"2:4"``); :func:`parse` turns that word into one of the frozen values
below once, and the code asks the value instead of comparing strings:

- :class:`Filters` prunes output channels and :class:`Channels` input channels, whatever the op's
  layout: the weight's own axes (``out_axis``, ``in_axis``: 1 and 0 for ConvTranspose and a MatMul
  weight ``[K, N]``) say which tensor axis that is.
- ``grouped`` structures need those axes (a Gather table has none); ``removes_channels`` says the
  graph itself loses the pruned groups (only filters: their consumers' inputs go with them).
- :class:`NMPattern` is no count of groups but a pattern every run obeys; its target is fixed.

Pure torch: the plan (``onnx_admm.plan``) and the product both read these values.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from onnx_admm.projections import Channel, Filter, Unstructured as _Unstructured, keep_count
from onnx_admm.structured import NM, Block, Column, Heads, group_keep_count, rounded_keep

__all__ = ["Blocks", "Channels", "Columns", "Filters", "NAMES", "NMPattern", "Structure", "Unstructured",
           "nm_pattern", "parse"]


@dataclass(frozen=True)
class Structure:
    """What one pruned group is; subclasses say how many a target keeps and how."""

    name: ClassVar[str]
    grouped: ClassVar[bool] = True  # needs the weight's channel axes
    removes_channels: ClassVar[bool] = False  # the written graph loses the pruned groups

    def constraint(self, shape: Sequence[int], sparsity: float, axes: tuple[int | None, int | None],
                   keep: int | None = None) -> Any:
        """The constraint keeping ``1 - sparsity`` of the groups of a weight of ``shape``; ``axes`` are its
        (output, input) channel axes, ``keep`` an exact count (unstructured members of a global pool)."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Unstructured(Structure):
    """Any single weight."""

    name: ClassVar[str] = "unstructured"
    grouped: ClassVar[bool] = False

    def constraint(self, shape, sparsity, axes, keep=None):
        return _Unstructured(keep if keep is not None else keep_count(int(torch.Size(shape).numel()), sparsity))


@dataclass(frozen=True)
class _AxisStructure(Structure):
    """One index along a channel axis, the other axes whole."""

    which: ClassVar[int]  # 0: the output-channel axis, 1: the input-channel axis

    def constraint(self, shape, sparsity, axes, keep=None):
        axis = axes[self.which]
        keep = self.keep_groups(shape[axis], sparsity)
        # projections' Filter and Channel group along tensor dims 0 and 1: the one this weight's axis is. A
        # recurrent weight's input axis is its third: one index of it per unit.
        return (Filter, Channel)[axis](keep) if axis < 2 else Heads(keep, axis)

    def keep_groups(self, n: int, sparsity: float) -> int:
        """How many of the axis's ``n`` indices stay at ``sparsity``."""
        return group_keep_count(n, sparsity)


@dataclass(frozen=True)
class Filters(_AxisStructure):
    """Output channels (filters, neurons): removed from the graph with what reads them.

    A unit may own several blocks of the output axis (an attention head: ``inner`` = head_dim rows of each
    of the ``outer`` = 3 thirds of a fused Q/K/V projection; a recurrent layer's hidden unit: a row of each
    of the ``outer`` gate blocks; the graph analysis finds them, a recipe's ``filter`` starts as one row per
    unit). Heads are counted exactly (``round_to`` 1).
    """

    name: ClassVar[str] = "filter"
    removes_channels: ClassVar[bool] = True
    which: ClassVar[int] = 0
    outer: int = 1
    inner: int = 1
    # Each layer keeps a multiple of this many filters (the nearest to its target; prune.round_to).
    round_to: int = 1

    def constraint(self, shape, sparsity, axes, keep=None):
        if (self.outer, self.inner) == (1, 1):
            return super().constraint(shape, sparsity, axes, keep)
        axis = axes[self.which]
        units = shape[axis] // (self.outer * self.inner)
        return Heads(self.keep_groups(units, sparsity), axis, self.outer, self.inner)

    def keep_groups(self, n: int, sparsity: float) -> int:
        return rounded_keep(group_keep_count(n, sparsity), n, self.round_to)


@dataclass(frozen=True)
class Channels(_AxisStructure):
    """Input channels, across every filter (zeros in the written weight)."""

    name: ClassVar[str] = "channel"
    which: ClassVar[int] = 1


@dataclass(frozen=True)
class Columns(Structure):
    """Columns of the ``[out, in*kh*kw]`` view (shape-wise pruning)."""

    name: ClassVar[str] = "column"

    def constraint(self, shape, sparsity, axes, keep=None):
        return Column(group_keep_count(Column.n_groups(shape), sparsity))


@dataclass(frozen=True)
class Blocks(Structure):
    """``rows x cols`` tiles of the ``[out, in*kh*kw]`` view (crossbar tiles)."""

    name: ClassVar[str] = "block"
    rows: int = 64
    cols: int = 64

    def constraint(self, shape, sparsity, axes, keep=None):
        return Block(self.rows, self.cols, group_keep_count(Block(self.rows, self.cols, 0).n_groups(shape), sparsity))


@dataclass(frozen=True)
class NMPattern(Structure):
    """At most ``n`` of every ``m`` consecutive weights along the input axis; the target is ``1 - n/m``."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not 1 <= self.n < self.m:
            raise ValueError("an N:M pattern keeps N of every M weights, 1 <= N < M (2:4, 4:8)")

    @property
    def sparsity(self) -> float:
        return 1 - self.n / self.m

    def constraint(self, shape, sparsity, axes, keep=None):
        return NM(self.n, self.m, axis=axes[1] if axes[1] is not None else 1)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


# Each named structure, by the word a recipe uses for it.
_NAMED: dict[str, type[Structure]] = {cls.name: cls for cls in (Unstructured, Filters, Channels, Columns, Blocks)}
NAMES = tuple(_NAMED)
_NM = re.compile(r"(\d+):(\d+)")


def nm_pattern(text: str | None) -> tuple[int, int] | None:
    """``(n, m)`` of an N:M structure such as ``"2:4"``; None for the named structures."""
    match = _NM.fullmatch(text) if isinstance(text, str) else None
    return (int(match[1]), int(match[2])) if match else None


def parse(text: str, block: tuple[int, int] = (64, 64)) -> Structure:
    """The structure a recipe's word names (``block`` gives a ``"block"`` its tile); ValueError otherwise."""
    if text in _NAMED:
        return Blocks(*block) if text == Blocks.name else _NAMED[text]()
    pattern = nm_pattern(text)
    if pattern is None:
        raise ValueError(f"must be one of {', '.join(NAMES)} or an N:M pattern such as \"2:4\", got {text!r}")
    return NMPattern(*pattern)
