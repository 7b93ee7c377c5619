"""Column-wise, block-wise and N:M structured sparsity, beside ``projections.Filter``/``Channel``.

Both view a weight as the matrix ``[out, in*kh*kw]`` (a Linear weight already is one):

- :class:`Column` (StructADMM's shape-wise pruning): a group is one column of that matrix, i.e. one
  (input channel, kh, kw) position across all filters -- a column of the im2col product.
- :class:`Block` (memristor-crossbar pruning): a group is one ``rows x cols`` tile of that matrix, tiled
  from the top-left corner; the tiles on the bottom and right edges are partial when the sizes do not
  divide.

Groups are ranked by L2 norm / sqrt(group size), exactly ``keep_groups`` are kept, ties go to the lower
group index (row-major tile order for blocks), and ``allowed`` behaves as in ``projections``: a group is
eligible when any of its entries is allowed, entries outside ``allowed`` count as zero when ranking, and
eligible groups always rank above the others. The constraints follow the same protocol as
``projections.Unstructured`` (``project`` / ``support``), so ADMM and :class:`projections.Within` take
them unchanged.

For equal-sized groups (every column; blocks when the tile divides the matrix) the ranking is the
Euclidean projection onto "at most ``keep_groups`` nonzero groups". With partial edge tiles the
normalised ranking (L2 / sqrt(group size), the project's convention) is used instead: it does not favour the larger full tiles, which
the plain Euclidean projection would.

Column- and block-pruned weights stay dense with zeros in ONNX; only whole filters/channels can be
removed from the graph (``converters.shrink``).

:class:`NM` (N:M semi-structured sparsity, e.g. 2:4) is of another kind: not a number of groups to
keep but a pattern every group obeys -- at most ``n`` nonzeros in each run of ``m`` consecutive weights
along the reduction (input) axis. That is the layout NVIDIA's sparse tensor cores read (cuSPARSELt,
TensorRT, PyTorch's ASP): for a Linear/Gemm weight ``[out, in]`` the runs go along ``in`` within each
row; for a Conv weight ``[out, in, kh, kw]`` they go along ``in`` at each fixed ``(out, kh, kw)``, i.e.
along the convolution's GEMM reduction axis ``kh*kw*in`` in the ``(kh, kw, in)`` order of the NHWC
kernels, where the input channel runs fastest -- not along the flattened ``in*kh*kw`` of the ONNX
``OIHW`` layout, whose consecutive entries are kernel positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from onnx_admm.projections import (
    Channel,
    check_allowed,
    check_count,
    keep_support,
    keep_count,
    topk_mask,
)

__all__ = ["Block", "Column", "Heads", "NM", "group_keep_count", "nm_runtimes", "rounded_keep"]


def group_keep_count(n_groups: int, sparsity: float, min_keep: int = 1) -> int:
    """Number of groups to keep when a fraction ``sparsity`` of ``n_groups`` groups is removed.

    :func:`projections.keep_count` on the group count (round half up), raised to ``min_keep``: a
    structured layer that loses every filter or every column is no longer a layer, so by default at
    least one group survives (the exact count then is ``max(min_keep, keep_count(n_groups, sparsity))``).

    Args:
        n_groups: Number of groups of the weight, >= 0 (see ``Column.n_groups`` / ``Block.n_groups``).
        sparsity: Fraction of groups removed, in [0, 1).
        min_keep: Groups kept whatever the sparsity (capped at ``n_groups``); 0 allows emptying.

    Returns:
        The number of groups to keep, in [0, n_groups].
    """
    if not isinstance(min_keep, int) or min_keep < 0:
        raise ValueError(f"min_keep is a number of groups >= 0, got {min_keep!r}")
    return max(min(min_keep, n_groups), keep_count(n_groups, sparsity))


# A layer's rounded filter count stays within this share of its filters of the exact share (``rounded_keep``).
ROUND_SLACK = 1 / 8


def rounded_keep(keep: int, n_groups: int, multiple: int) -> int:
    """``keep`` moved to the nearest multiple of ``multiple`` (half up, at least that multiple and at most
    ``n_groups``) where that moves it by at most ``ROUND_SLACK`` of the layer's groups; else to the nearest
    multiple of half as many, and so on down to the exact count. Unchanged for ``multiple`` 1, an emptied
    or untouched layer, or a layer of no more than ``multiple`` groups.

    onnxruntime's blocked convolution kernels run channel counts that are multiples of 8 or 16 faster than
    smaller odd ones (four 3x3 convs on a 40x40 map: 48 channels 0.97 ms, 45 channels 1.49 ms). The slack
    keeps a small layer from paying for that: 16 filters asked to keep 11 went to 8 by the nearest multiple
    of 8, and a captcha CTC reader at 30% filters kept 0.609 of its decoded sequences (label-free); with
    12 kept, 0.953. nudenet's YOLOv8n at 30% filters (its 16-filter layers at 12) ran at 0.72x / 0.69x of
    the original's time, level with every layer at a multiple of 8 and faster than exact shares (0.75x /
    0.73x; samples/corpus/RESULTS.md).
    """
    if multiple <= 1 or keep in (0, n_groups) or n_groups <= multiple:
        return keep
    while multiple > 1:
        rounded = min(n_groups, max(multiple, (keep + multiple // 2) // multiple * multiple))
        if abs(rounded - keep) <= ROUND_SLACK * n_groups:
            return rounded
        multiple //= 2
    return keep


def _as_matrix(w: Tensor, what: str) -> Tensor:
    if w.dim() < 2:
        raise ValueError(
            f"{what} groups the weight viewed as [out, in*kh*kw]; a tensor of shape {tuple(w.shape)} has no "
            "such view (use Unstructured for it)"
        )
    return w.reshape(w.shape[0], -1)


@dataclass(frozen=True)
class Column:
    """Keep ``keep_groups`` columns of the weight viewed as ``[out, in*kh*kw]`` (shape-wise pruning).

    Attributes:
        keep_groups: Number of columns to keep (``in*kh*kw`` in all); see :func:`group_keep_count`.
    """

    keep_groups: int

    def __post_init__(self) -> None:
        check_count(self.keep_groups, "Column(keep_groups=...)", "columns", "Column.n_groups(w.shape)")

    @staticmethod
    def n_groups(shape: tuple[int, ...] | torch.Size) -> int:
        """Number of columns of a weight of this shape: the product of all dims but the first."""
        return math.prod(shape[1:])

    def support(self, w: Tensor, allowed: Tensor | None = None) -> Tensor:
        """Mask of the ``keep_groups`` columns with the largest L2 norm / sqrt(out)."""
        matrix = _as_matrix(w, "Column")
        if allowed is not None:
            allowed = check_allowed(w, allowed).reshape(matrix.shape)
        # A column of the [out, rest] view is an input channel of that matrix: Channel ranks exactly that.
        return Channel(self.keep_groups).support(matrix, allowed).reshape(w.shape)

    def project(self, w: Tensor, allowed: Tensor | None = None) -> Tensor:
        """``w`` with every column outside :meth:`support` set to zero."""
        return keep_support(w, self.support(w, allowed))


@dataclass(frozen=True)
class Heads:
    """Keep ``keep_groups`` units that each own several blocks of ``dim`` (attention heads).

    Along ``dim`` (length ``outer * n * inner``) unit ``h`` owns the indices ``o * n * inner + h * inner + i``
    for ``o < outer``, ``i < inner``: a head of a fused Q/K/V projection owns ``head_dim = inner`` rows
    of each of the ``outer = 3`` thirds. Units are ranked by L2 norm / sqrt(size), as filters are.

    Attributes:
        keep_groups: Number of units to keep.
        dim: The output axis of the weight.
        outer: Blocks per unit (3 for a fused Q/K/V projection).
        inner: Indices per block (the head dim).
    """

    keep_groups: int
    dim: int
    outer: int = 1
    inner: int = 1

    def __post_init__(self) -> None:
        check_count(self.keep_groups, "Heads(keep_groups=...)", "units", "the number of heads")
        for field_name in ("outer", "inner"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Heads({field_name}=...) is a block count >= 1 (a Python int), got {value!r}")

    def units(self, t: Tensor) -> Tensor:
        """``t`` (shaped like the weight) as one row per unit: ``[n, everything the unit owns]``."""
        length = t.shape[self.dim]
        if length % (self.outer * self.inner):
            raise ValueError(f"Heads(outer={self.outer}, inner={self.inner}) does not divide dim {self.dim} of "
                             f"a tensor of shape {tuple(t.shape)}")
        n = length // (self.outer * self.inner)
        t = t.movedim(self.dim, 0).reshape(self.outer, n, self.inner, -1)
        return t.transpose(0, 1).reshape(n, -1)

    def spread(self, kept: Tensor, w: Tensor) -> Tensor:
        """The bool mask of ``w``'s entries owned by the units ``kept`` (one bool per unit)."""
        view = [1] * w.dim()
        view[self.dim] = -1
        return kept.to(w.device)[None, :, None].expand(self.outer, kept.numel(), self.inner).reshape(view).expand(
            w.shape).contiguous()

    def support(self, w: Tensor, allowed: Tensor | None = None) -> Tensor:
        """Mask of the ``keep_groups`` units with the largest L2 norm / sqrt(size)."""
        values = w.detach()
        unit_allowed = None
        if allowed is not None:
            allowed = check_allowed(w, allowed)
            values = keep_support(values, allowed)
            unit_allowed = self.units(allowed).any(dim=1)
        rows = self.units(values)
        scores = torch.linalg.vector_norm(rows.float(), dim=1) / math.sqrt(max(rows.shape[1], 1))
        mask = self.spread(topk_mask(scores, self.keep_groups, unit_allowed), w)
        return mask & allowed if allowed is not None else mask

    def project(self, w: Tensor, allowed: Tensor | None = None) -> Tensor:
        """``w`` with every unit outside :meth:`support` set to zero."""
        return keep_support(w, self.support(w, allowed))


@dataclass(frozen=True)
class Block:
    """Keep ``keep_groups`` tiles of ``rows x cols`` entries of the weight viewed as ``[out, in*kh*kw]``.

    Tiles are numbered row-major from the top-left corner (that order breaks ties); edge tiles are
    partial and are ranked by their own size.

    Attributes:
        rows: Tile height (output channels per tile), >= 1.
        cols: Tile width (columns of the ``[out, in*kh*kw]`` view per tile), >= 1.
        keep_groups: Number of tiles to keep; see :meth:`n_groups` and :func:`group_keep_count`.
    """

    rows: int
    cols: int
    keep_groups: int

    def __post_init__(self) -> None:
        for field_name in ("rows", "cols"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Block({field_name}=...) is a tile size >= 1 (a Python int), got {value!r}")
        check_count(self.keep_groups, "Block(keep_groups=...)", "tiles", "Block(...).n_groups(w.shape)")

    def grid(self, shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
        """(tile rows, tile columns) covering a weight of this shape, edge tiles included."""
        return -(-shape[0] // self.rows), -(-math.prod(shape[1:]) // self.cols)

    def n_groups(self, shape: tuple[int, ...] | torch.Size) -> int:
        """Number of tiles of a weight of this shape (edge tiles included)."""
        grid_rows, grid_cols = self.grid(shape)
        return grid_rows * grid_cols

    def support(self, w: Tensor, allowed: Tensor | None = None) -> Tensor:
        """Mask of the ``keep_groups`` tiles with the largest L2 norm / sqrt(tile size)."""
        matrix = _as_matrix(w.detach(), "Block")
        if allowed is not None:
            allowed = check_allowed(w, allowed).reshape(matrix.shape)
            matrix = keep_support(matrix, allowed)
        grid_rows, grid_cols = self.grid(w.shape)
        norms = torch.linalg.vector_norm(self._tiles(matrix, grid_rows, grid_cols), dim=-1)
        row_sizes = torch.full((grid_rows,), self.rows, device=w.device)
        row_sizes[-1] = matrix.shape[0] - self.rows * (grid_rows - 1)
        col_sizes = torch.full((grid_cols,), self.cols, device=w.device)
        col_sizes[-1] = matrix.shape[1] - self.cols * (grid_cols - 1)
        scores = norms / torch.outer(row_sizes, col_sizes).to(norms.dtype).sqrt()
        tile_allowed = None if allowed is None else self._tiles(allowed, grid_rows, grid_cols).any(dim=-1)
        tiles = topk_mask(scores, self.keep_groups, tile_allowed)
        mask = tiles.repeat_interleave(self.rows, dim=0).repeat_interleave(self.cols, dim=1)
        mask = mask[: matrix.shape[0], : matrix.shape[1]]
        if allowed is not None:
            mask = mask & allowed
        return mask.reshape(w.shape).contiguous()

    def project(self, w: Tensor, allowed: Tensor | None = None) -> Tensor:
        """``w`` with every tile outside :meth:`support` set to zero."""
        return keep_support(w, self.support(w, allowed))

    def _tiles(self, matrix: Tensor, grid_rows: int, grid_cols: int) -> Tensor:
        # Zero padding to whole tiles: padded entries add nothing to a norm or to an any().
        padded = torch.zeros((grid_rows * self.rows, grid_cols * self.cols), dtype=matrix.dtype, device=matrix.device)
        padded[: matrix.shape[0], : matrix.shape[1]] = matrix
        tiles = padded.reshape(grid_rows, self.rows, grid_cols, self.cols).transpose(1, 2)
        return tiles.reshape(grid_rows, grid_cols, self.rows * self.cols)


@dataclass(frozen=True)
class NM:
    """At most ``n`` nonzeros in every run of ``m`` consecutive entries along ``axis`` (N:M sparsity).

    The projection keeps, in each run, the ``n`` entries of largest ``|w|`` (ties: the lower index) and
    zeroes the rest. The set is a product of one set per run, so this is its exact Euclidean projection,
    and after it every run holds exactly ``n`` free entries (some may be 0). With ``allowed``, entries
    outside it are 0 and rank below every allowed entry: a run keeps its ``n`` largest allowed entries,
    or all of them when it has fewer (a nested stage cannot add entries back).

    Attributes:
        n: Nonzeros kept per run, 1 <= n < m.
        m: Run length; ``w.shape[axis]`` must be a multiple of it.
        axis: The reduction axis of the torch weight: 1 for Conv ``[out, in, kh, kw]`` and Linear
            ``[out, in]`` (see the module docstring for the conv layout), 0 for a MatMul weight ``[in, out]``.
    """

    n: int
    m: int
    axis: int = 1

    def __post_init__(self) -> None:
        for field_name in ("n", "m", "axis"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"NM({field_name}=...) takes a Python int, got {value!r}")
        if not 1 <= self.n < self.m:
            raise ValueError(f"NM(n, m) needs 1 <= n < m (e.g. 2:4), got {self.n}:{self.m}")

    @property
    def pattern(self) -> str:
        """``"n:m"``."""
        return f"{self.n}:{self.m}"

    def runs(self, w: Tensor) -> Tensor:
        """``w`` viewed as ``[..., runs, m]``: the runs along ``axis``, the other axes in front.

        Raises:
            ValueError: ``w`` lacks ``axis`` or its length there is not a multiple of ``m``.
        """
        if not -w.dim() <= self.axis < w.dim():
            raise ValueError(f"N:M {self.pattern} runs along axis {self.axis}, which a tensor of shape "
                             f"{tuple(w.shape)} lacks")
        length = w.shape[self.axis]
        if length % self.m:
            raise ValueError(f"N:M {self.pattern} needs the reduction axis in multiples of {self.m}; axis "
                             f"{self.axis} of shape {tuple(w.shape)} holds {length}")
        moved = w.movedim(self.axis, -1)
        return moved.reshape(*moved.shape[:-1], length // self.m, self.m)

    def max_nonzeros(self, w: Tensor) -> int:
        """The most nonzeros any run of ``w`` holds (``w`` obeys the pattern when this is <= n)."""
        runs = self.runs(w)
        return int((runs != 0).sum(dim=-1).max()) if runs.numel() else 0

    def support(self, w: Tensor, allowed: Tensor | None = None) -> Tensor:
        """Mask of the ``n`` largest ``|w|`` of every run (allowed entries first; ties: lower index)."""
        runs = self.runs(w.detach()).abs()
        order = torch.sort(runs, dim=-1, descending=True, stable=True).indices
        allowed_runs = None
        if allowed is not None:
            allowed_runs = self.runs(check_allowed(w, allowed))
            # A second stable sort on the primary key keeps the |w| order within each class.
            primary = torch.gather(allowed_runs, -1, order).to(torch.uint8)
            order = torch.gather(order, -1, torch.sort(primary, dim=-1, descending=True, stable=True).indices)
        first = torch.zeros(runs.shape, dtype=torch.bool, device=w.device)
        first[..., : self.n] = True
        mask = torch.zeros_like(first).scatter(-1, order, first)
        if allowed_runs is not None:
            mask &= allowed_runs
        moved = w.movedim(self.axis, -1).shape
        return mask.reshape(moved).movedim(-1, self.axis).contiguous()

    def project(self, w: Tensor, allowed: Tensor | None = None) -> Tensor:
        """``w`` with everything outside :meth:`support` set to zero."""
        return keep_support(w, self.support(w, allowed))


def nm_runtimes(n: int, m: int) -> list[str]:
    """Which runtimes can turn an ``n:m`` pattern into speed, one line each, for the report.

    The sparse tensor cores of NVIDIA Ampere and later GPUs read 2:4 runs along the reduction axis. An
    ``n:m`` pattern with ``4 | m`` and ``n <= 2`` implies 2:4 (every aligned run of 4 lies in one run of
    ``m``); others, 4:8 among them, do not, and no runtime this tool knows of reads them faster.
    """
    if m % 4 == 0 and n <= 2:
        gpu = ("TensorRT 8+ on NVIDIA Ampere or later GPUs: sparse tensor cores, 2:4 along the reduction "
               "axis, for Conv and fully connected (Gemm/MatMul) layers with fp16 or int8 weights; build with "
               "the SPARSE_WEIGHTS flag (trtexec --sparsity=enable)")
    else:
        gpu = (f"none known: {n}:{m} does not imply 2:4, the pattern the sparse tensor cores of NVIDIA Ampere "
               "and later GPUs read (TensorRT, cuSPARSELt); it saves no time there")
    return [gpu, "onnxruntime (CPU execution provider): no speed-up; the zeros are stored and multiplied like "
                 "any other weight"]
