"""Binary {-a, +a} and ternary {-a, 0, +a} levels with one scale a per tensor or per output channel
(pure torch). They follow the quantizing constraints' rules (:mod:`onnx_admm.quantizers`): they never
prune, exact zeros and entries outside ``allowed`` stay 0 and are left out of the fit, a tensor already in
the set projects to itself bitwise, and ``quantize`` returns the integers -1/0/+1 and the scales that
DequantizeLinear reproduces exactly.

Their scale is a closed form of the weights (a mean of magnitudes), cheap enough to refit at every
training step: retraining keeps latent float weights and projects them with the scales refit each time
(``onnx_admm.levels.RefitLevels``), as XNOR-Net and TWN do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from onnx_admm.quant_base import QuantizedTensor, Quantizer, channel_axis, check_channels, fit_inputs, from_channel_rows

__all__ = ["Binary", "Ternary"]


def _sign_levels(x: Tensor, chosen: Tensor) -> Tensor:
    """Per-row scale = mean |x| over ``chosen``; exactly the common value when those are all equal (so a
    tensor already on {-a, 0, a} keeps its a bitwise, whatever the float rounding of a mean)."""
    mag = x.abs()
    total = torch.where(chosen, mag, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=1, dtype=torch.float64)
    count = chosen.sum(dim=1)
    scale = (total / count.clamp(min=1)).to(x.dtype)
    high = torch.where(chosen, mag, torch.full((), -math.inf, dtype=x.dtype, device=x.device)).amax(dim=1)
    low = torch.where(chosen, mag, torch.full((), math.inf, dtype=x.dtype, device=x.device)).amin(dim=1)
    scale = torch.where(high == low, high, scale)
    return torch.where(count > 0, scale, torch.ones_like(scale))


def _sign_quantized(w: Tensor, x: Tensor, chosen: Tensor, axis: int | None) -> QuantizedTensor:
    q = torch.where(chosen, torch.sign(x), torch.zeros((), dtype=x.dtype, device=x.device)).to(torch.int8)
    scale = _sign_levels(x, chosen)
    return QuantizedTensor(from_channel_rows(q, w, axis), scale.reshape(() if axis is None else (-1,)), axis, 2)


@dataclass(frozen=True)
class _ScaledSigns(Quantizer):
    """Shared fields of the quantizers with one scale a per tensor or per channel (binary, ternary)."""

    per_channel: bool = False
    axis: int = 0

    def __post_init__(self) -> None:
        check_channels(type(self).__name__, self.per_channel, self.axis)


@dataclass(frozen=True)
class Binary(_ScaledSigns):
    """Levels {-a, +a} with a = mean |w| (the L2-optimal scale for the signs), per tensor or per channel.

    Entries outside ``allowed`` (and exact zeros) stay 0 and a is the mean over the rest: with pruning the
    levels are {-a, 0, +a}, stored in 2 bits.

    Attributes:
        per_channel: One a per index of ``axis``.
        axis: The channel axis for ``per_channel``.
    """

    def quantize(self, w: Tensor, allowed: Tensor | None = None) -> QuantizedTensor:
        """Signs (int8, 0 where pruned) and the per-tensor / per-channel a."""
        axis = channel_axis(w, self.per_channel, self.axis, "Binary")
        x, keep = fit_inputs(w, allowed, axis)
        return _sign_quantized(w, x, keep, axis)


@dataclass(frozen=True)
class Ternary(_ScaledSigns):
    """Levels {-a, 0, +a} with the exact L2-optimal threshold and a, per tensor or per channel.

    For a kept set of the k largest |w| the best a is their mean and the error is
    ||w||^2 - (sum of top k)^2 / k, so k maximises (sum of top k)^2 / k. Only k at the end of a run of equal
    magnitudes is considered (the objective cannot peak inside a run), so tied entries always share a level.

    Attributes:
        per_channel: One a (and threshold) per index of ``axis``.
        axis: The channel axis for ``per_channel``.
    """

    def quantize(self, w: Tensor, allowed: Tensor | None = None) -> QuantizedTensor:
        """Levels -1/0/+1 (int8) and the per-tensor / per-channel a."""
        axis = channel_axis(w, self.per_channel, self.axis, "Ternary")
        x, _ = fit_inputs(w, allowed, axis)
        mag = torch.sort(x.abs(), dim=1, descending=True).values
        sums = mag.cumsum(dim=1, dtype=torch.float64)
        k = torch.arange(1, mag.shape[1] + 1, dtype=torch.float64, device=x.device)
        objective = sums.square() / k
        run_end = torch.ones_like(mag, dtype=torch.bool)
        run_end[:, :-1] = mag[:, :-1] > mag[:, 1:]
        objective = torch.where(run_end & (mag > 0), objective, torch.full_like(objective, -1.0))
        best = objective.argmax(dim=1, keepdim=True)  # the smallest k among equal objectives
        threshold = mag.gather(1, best)
        chosen = (x.abs() >= threshold) & (objective.gather(1, best) > 0)
        return _sign_quantized(w, x, chosen, axis)
