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
and :class:`Channel` (top groups by L2 norm / sqrt(group size)). Column and block
pruning are meant to be added beside them as further dataclasses with the same two methods.

Quantizing constraints (k-bit, binary, ternary, codebook, and Joint: prune then quantize) live in
:mod:`onnx_admm.quantizers`; they follow the same protocol.

Counting conventions live here too: :func:`keep_count` for one tensor (round half up); how a global
target is split over layers is :mod:`onnx_admm.allocation`.
"""

from __future__ import annotations

import logging
import math
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
        w = w.detach()
        if allowed is not None:
            allowed = check_allowed(w, allowed)
            w = keep_support(w, allowed)
        rows = w.movedim(self.dim, 0).reshape(w.shape[self.dim], -1)
        scores = torch.linalg.vector_norm(rows, dim=1) / math.sqrt(max(rows.shape[1], 1))
        group_allowed = None
        if allowed is not None:
            group_allowed = allowed.movedim(self.dim, 0).reshape(w.shape[self.dim], -1).any(dim=1)
        groups = topk_mask(scores, self.keep_groups, group_allowed)
        view = [-1 if i == self.dim else 1 for i in range(w.dim())]
        mask = groups.reshape(view).expand(w.shape)
        return mask & allowed if allowed is not None else mask.contiguous()

    def project(self, w: Tensor, allowed: Tensor | None = None) -> Tensor:
        """``w`` with every group outside :meth:`support` set to zero."""
        return keep_support(w, self.support(w, allowed))


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
