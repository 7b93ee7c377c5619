"""Euclidean projections onto compression constraint sets (pure torch, device-agnostic).

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
and :class:`Channel` (top groups by L2 norm / sqrt(group size), DESIGN section 6). Column, block and the
quantizing projections (k-bit levels, binary, ternary, codebook) are meant to be added beside them as
further dataclasses with the same two methods.

Counting conventions (DESIGN section 6) live here too: :func:`keep_count` for one tensor and
:func:`allocate_global` for a global target split over layers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
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
    "allocate_global",
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
    beats a large entry outside ``allowed``). Stable sorts give these rules on every device; ``torch.topk``
    does not promise an order among ties. NaN ranks as the largest magnitude: catch non-finite weights
    before projecting.

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
        allowed_flat = _check_allowed(w, allowed).reshape(-1)
        n_allowed = int(allowed_flat.sum())
        if keep > n_allowed:
            raise ValueError(
                f"keep={keep} exceeds the {n_allowed} allowed entries of a tensor of shape {tuple(w.shape)}; "
                "a nested stage cannot keep more than the previous stage did (raise the stage's sparsity)"
            )
    mask = torch.zeros(numel, dtype=torch.bool, device=w.device)
    if keep == 0:
        return mask.reshape(w.shape)
    order = torch.sort(flat, descending=True, stable=True).indices
    if allowed is not None:
        # A second stable sort on the primary key keeps the |w| order within each class: lexicographic
        # (allowed first, then |w| descending, then flat index).
        order = order[torch.sort(allowed_flat[order].to(torch.uint8), descending=True, stable=True).indices]
    mask[order[:keep]] = True
    return mask.reshape(w.shape)


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(
            f"sparsity is the fraction of zeros and must be in [0, 1), got {sparsity}; "
            "for a compression ratio r use sparsity = 1 - 1/r (40x -> 0.975)"
        )


def _check_allowed(w: Tensor, allowed: Tensor) -> Tensor:
    if allowed.dtype != torch.bool or allowed.shape != w.shape:
        raise ValueError(
            f"allowed must be a bool tensor of shape {tuple(w.shape)}, "
            f"got {allowed.dtype} of shape {tuple(allowed.shape)}"
        )
    return allowed.to(w.device)


def _check_count(value: object, what: str, unit: str, total: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(
            f"{what} takes a count of {unit} to keep >= 0 (a Python int), got {value!r}; "
            f"use keep_count({total}, sparsity) to convert a sparsity"
        )


def _keep_support(w: Tensor, support: Tensor) -> Tensor:
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
        _check_count(self.keep, "Unstructured(keep=...)", "weights", "w.numel()")

    def support(self, w: Tensor, allowed: Tensor | None = None) -> Tensor:
        """Mask of the ``keep`` largest ``|w|`` (ties: lower flat index; ``allowed`` entries first)."""
        return topk_mask(w, self.keep, allowed)

    def project(self, w: Tensor, allowed: Tensor | None = None) -> Tensor:
        """``w`` with everything outside :meth:`support` set to zero."""
        return _keep_support(w, self.support(w, allowed))


@dataclass(frozen=True)
class _AxisGroups:
    """Shared code of shape-wise pruning where a group is one index along ``dim`` (all other entries)."""

    keep_groups: int
    dim: ClassVar[int]

    def __post_init__(self) -> None:
        _check_count(self.keep_groups, f"{type(self).__name__}(keep_groups=...)", "groups", "n_groups")

    def support(self, w: Tensor, allowed: Tensor | None = None) -> Tensor:
        """Mask of the ``keep_groups`` groups with the largest L2 norm / sqrt(group size)."""
        if w.dim() <= self.dim:
            raise ValueError(
                f"{type(self).__name__} groups along dim {self.dim}, which a tensor of shape "
                f"{tuple(w.shape)} lacks; use Unstructured for it"
            )
        w = w.detach()
        if allowed is not None:
            allowed = _check_allowed(w, allowed)
            w = _keep_support(w, allowed)
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
        return _keep_support(w, self.support(w, allowed))


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


def allocate_global(
    weights: Mapping[str, Tensor],
    sparsity: float,
    floor: float = 0.01,
    allowed: Mapping[str, Tensor] | None = None,
) -> dict[str, int]:
    """Split a global keep target over layers by global ``|W|`` ranking, with a per-layer floor.

    Keeps ``K = keep_count(N, sparsity)`` weights in total (N = all entries). Each layer first gets its
    floor ``max(1, ceil(floor * n_layer))`` (never more than the layer has), taken from its own largest
    entries; the rest of K goes to the largest remaining entries over all layers. That is the top-K
    selection with the largest total |W| that respects the floors. Ties rank by layer order in
    ``weights``, then by flat index, so ``Unstructured(keep)`` per layer selects the same entries.

    Args:
        weights: Layer name -> weight tensor (any shapes, any devices).
        sparsity: Global fraction of zeros, in [0, 1).
        floor: Fraction of each layer that is always kept, in [0, 1] (0 still keeps one entry).
        allowed: Optional layer name -> bool mask (the previous stage's support): only allowed entries
            are ranked, as :func:`topk_mask` does for one layer.

    Returns:
        Layer name -> number of entries to keep; the values sum to K exactly.
    """
    _check_sparsity(sparsity)
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor is a fraction of each layer in [0, 1], got {floor}")
    if allowed is not None and set(allowed) != set(weights):
        raise ValueError("allowed must have exactly the same layer names as weights")
    total = sum(w.numel() for w in weights.values())
    target = keep_count(total, sparsity)

    floors: dict[str, int] = {}
    tails: list[Tensor] = []
    owners: list[Tensor] = []
    for i, (name, w) in enumerate(weights.items()):
        n = w.numel()
        n_allowed = n if allowed is None else int(_check_allowed(w, allowed[name]).sum())
        floors[name] = min(n, max(1, math.ceil(round(floor * n, _COUNT_DECIMALS))))
        if floors[name] > n_allowed:
            raise ValueError(
                f"layer {name!r} must keep at least {floors[name]} weights (floor={floor}) but only "
                f"{n_allowed} are allowed by the previous stage; lower floor"
            )
        magnitude = w.detach().reshape(-1).abs().cpu()
        order = torch.sort(magnitude, descending=True, stable=True).indices
        if allowed is not None:
            order = order[allowed[name].reshape(-1).cpu()[order]]  # boolean indexing keeps the order
        tail = magnitude[order[floors[name] :]]
        tails.append(tail)
        owners.append(torch.full((tail.numel(),), i, dtype=torch.long))

    floor_sum = sum(floors.values())
    if floor_sum > target:
        raise ValueError(
            f"the per-layer floors alone keep {floor_sum} weights but sparsity={sparsity} keeps only "
            f"{target} of {total}; lower floor (now {floor}) or lower the sparsity"
        )
    rest = target - floor_sum
    n_rankable = sum(t.numel() for t in tails)
    if rest > n_rankable:
        raise ValueError(
            f"sparsity={sparsity} keeps {target} weights but only {floor_sum + n_rankable} are allowed by the "
            "previous stage; a nested stage must have a higher sparsity than the one before"
        )
    keeps = dict(floors)
    if rest > 0:
        # Concatenated in layer order and sorted stably, so ties go to the earlier layer, then lower index.
        values = torch.cat(tails)
        winners = torch.cat(owners)[torch.sort(values, descending=True, stable=True).indices[:rest]]
        counts = torch.bincount(winners, minlength=len(weights)).tolist()
        for name, extra in zip(weights, counts):
            keeps[name] += extra
    logger.debug("global allocation at sparsity %s: %s", sparsity, keeps)
    return keeps
