"""Euclidean projections onto sparsity constraint sets (pure torch, device-agnostic).

A *constraint* is a small frozen dataclass -- a value, like a config -- with two methods:

- ``project(w, allowed=None) -> Tensor``: the Euclidean projection of ``w`` onto the set (same shape,
  dtype and device; ``w`` itself is never modified);
- ``support(w, allowed=None) -> BoolTensor``: the entries that projection leaves free (nonzero). Masked
  retraining keeps everything outside the support at exactly zero.

``allowed`` (optional, bool, shaped like ``w``) restricts the set further to tensors that are zero
outside ``allowed``. Progressive compression passes the previous stage's support here, which is what makes
stage masks nested (:class:`Within` binds it to a constraint so the ADMM engine need not know).
Entries outside ``allowed`` never win a tie against entries inside it, even when those are exactly 0.

Sparsity constraints here: :class:`Unstructured` (top-k magnitudes) and the shape-wise :class:`Filter`
and :class:`Channel` (top groups by L2 norm / sqrt(group size)); :func:`shared_groups` chooses the filters
that several coupled weights keep together. Column and block
pruning are meant to be added beside them as further dataclasses with the same two methods.

Quantizing constraints (k-bit, binary, ternary, codebook, and Joint: prune then quantize) live in
:mod:`onnx_admm.quantizers`; they follow the same protocol.

Counting conventions live here too: :func:`keep_count` for one tensor (round half up); how a global
target is split over layers is :mod:`onnx_admm.allocation`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "Channel",
    "Constraint",
    "Filter",
    "Unstructured",
    "Within",
    "keep_count",
    "shared_groups",
    "spread",
    "topk_mask",
]

# Decimal places that products like (1 - s) * n are rounded to before counting, so that binary float noise
# (1 - 0.9 == 0.09999999999999998) cannot move a count across an integer or a .5 boundary.
_COUNT_DECIMALS = 9


@runtime_checkable
class Constraint(Protocol):
    """What the ADMM engine needs from a constraint set S."""

    def project(self, w: Tensor, allowed: Tensor | None = None) -> Tensor:
        """Return the Euclidean projection of ``w`` onto S (zero outside ``allowed``)."""
        ...

    def support(self, w: Tensor, allowed: Tensor | None = None) -> Tensor:
        """Return the bool mask of entries ``project(w, allowed)`` leaves free."""
        ...


def keep_count(numel: int, sparsity: float) -> int:
    """Number of entries a tensor of ``numel`` entries keeps at ``sparsity``.

    ``floor((1 - sparsity) * numel + 0.5)``: round half up, not Python's round-half-even, so the count
    is predictable (2.5 -> 3, 3.5 -> 4). The product is first rounded to 9 decimals so float noise in
    ``1 - sparsity`` cannot flip a count.

    Args:
        numel: Number of entries, >= 0.
        sparsity: Fraction of zeros, in [0, 1).

    Returns:
        The number of entries to keep, in [0, numel].
    """
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    _check_sparsity(sparsity)
    return int(math.floor(round((1.0 - sparsity) * numel, _COUNT_DECIMALS) + 0.5))


def topk_mask(w: Tensor, keep: int, allowed: Tensor | None = None) -> Tensor:
    """Mask of exactly ``keep`` True entries at the largest ``|w|``, with deterministic ties.

    Ranking is by ``|w|`` descending; among equal magnitudes the lower flat index wins. With ``allowed``
    every allowed entry ranks above every other entry, whatever the magnitudes (so an allowed exact zero
    beats a large entry outside ``allowed``). One O(n) selection of the keep-th largest magnitude
    (``torch.kthvalue``) and the lowest-index ties give exactly a stable descending sort's first
    ``keep`` entries, at a fraction of a sort's cost (this runs at every ADMM Z/U update); ``torch.topk``
    alone does not promise an order among ties. NaN ranks as the largest magnitude (with +inf): catch
    non-finite weights before projecting.

    Args:
        w: Any-shaped tensor.
        keep: Number of entries to keep, in [0, w.numel()] (and at most the number of allowed entries).
        allowed: Optional bool tensor shaped like ``w``.

    Returns:
        A bool tensor shaped like ``w`` with exactly ``keep`` True entries.
    """
    numel = w.numel()
    if not 0 <= keep <= numel:
        raise ValueError(f"keep must be in [0, {numel}] for a tensor of shape {tuple(w.shape)}, got {keep}")
    flat = w.detach().reshape(-1).abs()
    if allowed is not None:
        allowed_flat = check_allowed(w, allowed).reshape(-1)
        n_allowed = int(allowed_flat.sum())
        if keep > n_allowed:
            raise ValueError(
                f"keep={keep} exceeds the {n_allowed} allowed entries of a tensor of shape {tuple(w.shape)}; "
                "a nested stage cannot keep more than the previous stage did (raise the stage's sparsity)"
            )
    if keep == 0:
        return torch.zeros(w.shape, dtype=torch.bool, device=w.device)
    if keep == numel:
        return torch.ones(w.shape, dtype=torch.bool, device=w.device)
    key = torch.nan_to_num(flat, nan=math.inf)
    if allowed is not None:
        # keep <= the allowed count, so ranking every other entry below any magnitude (-1 < 0) puts all
        # allowed entries first, exact zeros included.
        key = torch.where(allowed_flat, key, torch.full_like(key, -1.0))
    threshold = torch.kthvalue(key, numel - keep + 1).values
    mask = key > threshold
    ties = (key == threshold).nonzero().squeeze(1)
    mask[ties[: keep - int(mask.sum())]] = True
    return mask.reshape(w.shape)


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(
            f"sparsity is the fraction of zeros and must be in [0, 1), got {sparsity}; "
            "for a compression ratio r use sparsity = 1 - 1/r (40x -> 0.975)"
        )


def check_allowed(w: Tensor, allowed: Tensor) -> Tensor:
    """``allowed`` checked as a bool mask of ``w``'s shape (the weights a nested projection may keep)."""
    if allowed.dtype != torch.bool or allowed.shape != w.shape:
        raise ValueError(
            f"allowed must be a bool tensor of shape {tuple(w.shape)}, "
            f"got {allowed.dtype} of shape {tuple(allowed.shape)}"
        )
    return allowed.to(w.device)


def check_count(value: object, what: str, unit: str, total: str) -> None:
    """A keep count must be a Python int >= 0 (the message names ``what`` keeps ``unit`` out of ``total``)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(
            f"{what} takes a count of {unit} to keep >= 0 (a Python int), got {value!r}; "
            f"use keep_count({total}, sparsity) to convert a sparsity"
        )


def keep_support(w: Tensor, support: Tensor) -> Tensor:
    # torch.where rather than w * mask: inf * 0 would give NaN where the projection must give 0.
    return torch.where(support, w, torch.zeros((), dtype=w.dtype, device=w.device))


@dataclass(frozen=True)
class Unstructured:
    """At most ``keep`` nonzero entries (exactly ``keep`` after projection): keep the largest ``|w|``.

    Attributes:
        keep: Number of entries to keep; see :func:`keep_count` to derive it from a sparsity.
    """

    keep: int

    def __post_init__(self) -> None:
        check_count(self.keep, "Unstructured(keep=...)", "weights", "w.numel()")

    def support(self, w: Tensor, allowed: Tensor | None = None) -> Tensor:
        """Mask of the ``keep`` largest ``|w|`` (ties: lower flat index; ``allowed`` entries first)."""
        return topk_mask(w, self.keep, allowed)

    def project(self, w: Tensor, allowed: Tensor | None = None) -> Tensor:
        """``w`` with everything outside :meth:`support` set to zero."""
        return keep_support(w, self.support(w, allowed))


@dataclass(frozen=True)
class _AxisGroups:
    """Shared code of shape-wise pruning where a group is one index along ``dim`` (all other entries)."""

    keep_groups: int
    dim: ClassVar[int]

    def __post_init__(self) -> None:
        check_count(self.keep_groups, f"{type(self).__name__}(keep_groups=...)", "groups", "n_groups")

    def support(self, w: Tensor, allowed: Tensor | None = None) -> Tensor:
        """Mask of the ``keep_groups`` groups with the largest L2 norm / sqrt(group size)."""
        if w.dim() <= self.dim:
            raise ValueError(
                f"{type(self).__name__} groups along dim {self.dim}, which a tensor of shape "
                f"{tuple(w.shape)} lacks; use Unstructured for it"
            )
        rows, group_allowed = _rows(w, self.dim, allowed)
        scores = torch.linalg.vector_norm(rows, dim=1) / math.sqrt(max(rows.shape[1], 1))
        groups = topk_mask(scores, self.keep_groups, group_allowed)
        return spread(groups, w, self.dim, allowed)

    def project(self, w: Tensor, allowed: Tensor | None = None) -> Tensor:
        """``w`` with every group outside :meth:`support` set to zero."""
        return keep_support(w, self.support(w, allowed))


def _rows(w: Tensor, dim: int, allowed: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``w`` (zero outside ``allowed``) as one row per index along ``dim``, and which rows ``allowed`` leaves."""
    w = w.detach()
    if allowed is None:
        return w.movedim(dim, 0).reshape(w.shape[dim], -1), None
    allowed = check_allowed(w, allowed)
    rows = keep_support(w, allowed).movedim(dim, 0).reshape(w.shape[dim], -1)
    return rows, allowed.movedim(dim, 0).reshape(w.shape[dim], -1).any(dim=1)


def spread(groups: Tensor, w: Tensor, dim: int, allowed: Tensor | None = None) -> Tensor:
    """The bool mask of ``w``'s entries whose index along ``dim`` is kept by ``groups`` (and ``allowed``)."""
    view = [-1 if i == dim else 1 for i in range(w.dim())]
    mask = groups.to(w.device).reshape(view).expand(w.shape)
    return mask & allowed.to(w.device) if allowed is not None else mask.contiguous()


def shared_groups(weights: Sequence[Tensor], dims: Sequence[int], keep: int,
                  allowed: Sequence[Tensor | None] | None = None) -> Tensor:
    """The ``keep`` indices that several weights keep together along their ``dims`` (a bool mask).

    Filters coupled through the graph (the convolutions whose outputs meet in one residual sum) must
    lose the same channels. Ranking each index by the sum over the weights of its squared L2 norm makes
    zeroing the others the Euclidean projection of all the weights at once onto "the same ``keep``
    groups nonzero in each". An index ``allowed`` leaves out in any weight (the previous stage removed
    it) ranks last; ties go to the lower index.

    Args:
        weights: Tensors with the same length along their ``dims``.
        dims: The grouped axis of each weight (its output channels).
        keep: Number of indices to keep.
        allowed: Optional bool masks shaped like the weights (None entries allow everything).

    Returns:
        A bool tensor of that length with exactly ``keep`` True entries.
    """
    allowed = list(allowed) if allowed is not None else [None] * len(weights)
    scores, common = None, None
    for w, dim, ok in zip(weights, dims, allowed):
        rows, rows_allowed = _rows(w, dim, ok)
        energy = rows.float().pow(2).sum(dim=1)
        if scores is not None and energy.shape != scores.shape:
            raise ValueError(f"coupled weights differ in their number of groups: {scores.numel()} and {energy.numel()}")
        scores = energy if scores is None else scores + energy.to(scores.device)
        if rows_allowed is not None:
            common = rows_allowed if common is None else common & rows_allowed.to(common.device)
    return topk_mask(scores, keep, common)


@dataclass(frozen=True)
class Filter(_AxisGroups):
    """Keep ``keep_groups`` filters (output channels, dim 0 of a Conv/Linear weight)."""

    dim: ClassVar[int] = 0


@dataclass(frozen=True)
class Channel(_AxisGroups):
    """Keep ``keep_groups`` input channels (dim 1 of a Conv/Linear weight, across all filters)."""

    dim: ClassVar[int] = 1


@dataclass(frozen=True, eq=False)
class Within:
    """``constraint`` restricted to tensors that are zero outside ``allowed`` (nested progressive masks).

    Binding the previous stage's support here keeps the engine unaware of stages: ADMM and the hard
    projection just call ``project``/``support``.

    Attributes:
        constraint: The stage's own constraint.
        allowed: Bool tensor shaped like the weight: the previous stage's support.
    """

    constraint: Constraint
    allowed: Tensor = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.allowed, Tensor) or self.allowed.dtype != torch.bool:
            raise ValueError("Within(allowed=...) takes a bool tensor: the previous stage's support mask")

    def support(self, w: Tensor, allowed: Tensor | None = None) -> Tensor:
        """Support of the inner constraint within ``self.allowed`` (and ``allowed``, if given)."""
        return self.constraint.support(w, self._both(allowed))

    def project(self, w: Tensor, allowed: Tensor | None = None) -> Tensor:
        """Projection of the inner constraint within ``self.allowed`` (and ``allowed``, if given)."""
        return self.constraint.project(w, self._both(allowed))

    def _both(self, allowed: Tensor | None) -> Tensor:
        return self.allowed if allowed is None else self.allowed & allowed
