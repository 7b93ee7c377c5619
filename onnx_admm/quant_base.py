"""What the quantizing constraints share (pure torch): the integer-level value :class:`QuantizedTensor`,
the per-channel row view of a weight, the entries a scale is fitted to, and the :class:`Quantizer` base
whose ``project`` is its own ``quantize`` dequantized.

The constraints live in :mod:`onnx_admm.quantizers` (k-bit, codebook, joint) and :mod:`onnx_admm.signs`
(binary, ternary).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from onnx_admm.projections import check_allowed, keep_support

__all__ = ["QuantizedTensor", "Quantizer", "channel_rows", "from_channel_rows"]


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A tensor on integer levels: ``value = q * scale`` (scale broadcast along ``axis``).

    Attributes:
        q: int8 tensor shaped like the weight, ``-2**(bits-1) <= q <= 2**(bits-1) - 1``.
        scale: Positive float tensor in the weight's dtype: shape ``()`` per tensor, or ``(C,)`` with
            ``C = q.shape[axis]`` per channel.
        axis: The channel axis of ``scale``, or None for one scale.
        bits: k, the container: levels ``q`` in [-2^(k-1), 2^(k-1) - 1]; binary and ternary
            are stored as k = 2 (levels -1, 0, 1).
    """

    q: Tensor
    scale: Tensor
    axis: int | None
    bits: int

    def dequantize(self) -> Tensor:
        """``q * scale`` in the scale's dtype: one rounding per entry, as DequantizeLinear computes it."""
        return self.q.to(self.scale.dtype) * along(self.scale, self.axis, self.q.dim())


def along(scale: Tensor, axis: int | None, ndim: int) -> Tensor:
    if axis is None:
        return scale
    return scale.reshape([-1 if i == axis else 1 for i in range(ndim)])


def check_channels(owner: str, per_channel: object, axis: object) -> None:
    if not isinstance(per_channel, bool):
        raise ValueError(f"{owner}(per_channel=...) takes True or False, got {per_channel!r}")
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise ValueError(f"{owner}(axis=...) takes an int, got {axis!r}")


def channel_axis(w: Tensor, per_channel: bool, axis: int, owner: str) -> int | None:
    if not per_channel:
        return None
    if not -w.dim() <= axis < w.dim() or w.dim() == 0:
        raise ValueError(
            f"{owner}(per_channel=True, axis={axis}) needs a tensor with that axis, got shape {tuple(w.shape)}; "
            "use per_channel=False for it"
        )
    return axis % w.dim()


def channel_rows(w: Tensor, axis: int | None) -> Tensor:
    """``w`` as [C, n]: one row per channel along ``axis`` (one row for the whole tensor when None)."""
    if axis is None:
        return w.reshape(1, -1)
    return w.movedim(axis, 0).reshape(w.shape[axis], -1)


def from_channel_rows(rows: Tensor, like: Tensor, axis: int | None) -> Tensor:
    """The inverse of ``channel_rows``: [C, n] rows back into ``like``'s shape."""
    if axis is None:
        return rows.reshape(like.shape)
    moved = list(like.movedim(axis, 0).shape)
    return rows.reshape(moved).movedim(0, axis)


def fit_inputs(w: Tensor, allowed: Tensor | None, axis: int | None) -> tuple[Tensor, Tensor]:
    """Rows of ``w`` with entries outside ``allowed`` set to 0, and rows of the mask of entries to fit."""
    w = w.detach()
    keep = w != 0
    if allowed is not None:
        keep &= check_allowed(w, allowed)
    x = keep_support(w, keep)
    return channel_rows(x, axis), channel_rows(keep, axis)


class Quantizer:
    """What the quantizing constraints share: they never prune, and (k-bit, binary, ternary) project by
    dequantizing their own integer levels, so ``project`` and the export see the very same floats."""

    def project(self, w: Tensor, allowed: Tensor | None = None) -> Tensor:
        """The projection of ``w`` (zero outside ``allowed``): exactly ``quantize(w, allowed).dequantize()``."""
        return self.quantize(w, allowed).dequantize()  # type: ignore[attr-defined]

    def support(self, w: Tensor, allowed: Tensor | None = None) -> Tensor:
        """``allowed`` (all True when None): quantizing never prunes; zero is a level, not a pruned weight."""
        if allowed is None:
            return torch.ones(w.shape, dtype=torch.bool, device=w.device)
        return check_allowed(w, allowed).clone()
