"""Retraining on fixed levels: a frozen level set and the straight-through estimator (pure torch).

After the hard projection a quantized weight sits on its levels (k-bit grid, ±a, codebook). Masked
retraining must keep it there. We chose the straight-through estimator with re-projection: the
optimizer updates latent float weights, the forward and backward passes see their projection onto
the *frozen* levels of the hard projection, and the phase ends with one more projection, so the final
weights are exactly on levels. (The authors instead fix a growing fraction of weights and retrain the
rest; STE needs no schedule and lets every weight change level.)

Binary and ternary weights go further, as the binarization literature does (BinaryConnect, XNOR-Net,
TWN): their levels are not frozen but refit from the latent weights at every projection
(:class:`RefitLevels`: per-channel a = mean |w|, ternary threshold and a re-solved), and the latent
weights are clipped to a few times their channel's scale, so a latent weight never wanders so far past
its level that the gradient can no longer flip it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from onnx_admm.quant_base import along, channel_rows, from_channel_rows
from onnx_admm.signs import Binary, Ternary


@dataclass(frozen=True, eq=False)
class FixedLevels:
    """Projection onto a frozen set of levels: per tensor, or per index of ``axis`` (one set per channel).

    ``levels`` is ``[rows, L]``, each row sorted ascending (short rows padded by repeating their last
    level). Entries outside ``allowed`` project to 0.
    """

    levels: Tensor = field(repr=False)
    axis: int | None = None

    @classmethod
    def of(cls, projected: Tensor, support: Tensor | None = None, axis: int | None = None) -> FixedLevels:
        """The levels used by ``projected`` on ``support`` (all entries when None), per ``axis`` or per tensor.

        Zero is a level only where some supported entry is 0 (a uniform grid's q = 0): a pruned-away 0
        does not become a level kept weights could fall to, so retraining keeps the sparsity exact.
        """
        support = torch.ones_like(projected, dtype=torch.bool) if support is None else support
        rows = channel_rows(projected, axis)
        keep = channel_rows(support, axis)
        sets = [torch.unique(r[k]) for r, k in zip(rows, keep)]
        sets = [s if s.numel() else torch.zeros(1, dtype=projected.dtype, device=projected.device) for s in sets]
        width = max(s.numel() for s in sets)
        padded = torch.stack([torch.cat([s, s[-1:].expand(width - s.numel())]) for s in sets])
        return cls(padded, axis)

    def project(self, w: Tensor, allowed: Tensor | None = None) -> Tensor:
        rows = channel_rows(w, self.axis)
        levels = self.levels if self.levels.shape[0] == rows.shape[0] else self.levels.expand(rows.shape[0], -1)
        hi = torch.searchsorted(levels, rows.contiguous()).clamp(max=levels.shape[1] - 1)
        lo = (hi - 1).clamp(min=0)
        upper, lower = levels.gather(1, hi), levels.gather(1, lo)
        nearest = torch.where((rows - lower).abs() <= (upper - rows).abs(), lower, upper)
        out = from_channel_rows(nearest, w, self.axis)
        return out if allowed is None else torch.where(allowed, out, torch.zeros_like(out))

    def support(self, w: Tensor, allowed: Tensor | None = None) -> Tensor:
        return torch.ones_like(w, dtype=torch.bool) if allowed is None else allowed.clone()


class RefitLevels:
    """Binary or ternary levels {-a_c, (0,) +a_c} refit from the latent weights every ``every`` training steps.

    A refit is the quantizer's own projection (per-channel a = mean |w|; ternary: the exact L2-optimal
    threshold and a); between refits each entry goes to the nearest of the last fitted levels (ternary:
    0 below a_c / 2, which is where the L2-optimal threshold sits for a fixed a). The full ternary fit sorts
    every channel, too slow to run at each step of a large layer; the nearest-level step is a sign and a
    compare.

    Args:
        quantizer: A :class:`~onnx_admm.signs.Binary` or :class:`~onnx_admm.signs.Ternary` constraint.
        every: Training steps between refits, >= 1.
    """

    def __init__(self, quantizer: Binary | Ternary, every: int = 1) -> None:
        if not isinstance(quantizer, (Binary, Ternary)):
            raise ValueError(f"RefitLevels takes a Binary or Ternary quantizer, got {quantizer!r}")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"RefitLevels(every=...) takes an int >= 1 (steps between refits), got {every!r}")
        self.quantizer, self.every = quantizer, every
        self.scale: Tensor | None = None  # the last fit's a per channel (shape () per tensor)
        self.axis: int | None = None
        self.steps = 0

    def fit(self, w: Tensor, allowed: Tensor | None = None) -> Tensor:
        """Refit the levels to ``w`` and return its projection (the quantizer's own)."""
        quantized = self.quantizer.quantize(w, allowed)
        self.scale, self.axis = quantized.scale, quantized.axis
        return quantized.dequantize()

    def step(self, w: Tensor, allowed: Tensor | None = None) -> Tensor:
        """The projection for one training step: a refit every ``every`` steps, the last levels otherwise."""
        out = self.fit(w, allowed) if self.scale is None or self.steps % self.every == 0 else self.project(w, allowed)
        self.steps += 1
        return out

    def project(self, w: Tensor, allowed: Tensor | None = None) -> Tensor:
        """Each entry on the nearest of the last fitted levels (fitted to ``w`` first when there are none)."""
        if self.scale is None:
            return self.fit(w, allowed)
        a = self.bound(w)
        out = torch.sign(w) * a
        if isinstance(self.quantizer, Ternary):
            out = torch.where(w.abs() * 2 > a, out, torch.zeros((), dtype=w.dtype, device=w.device))
        return out if allowed is None else torch.where(allowed, out, torch.zeros((), dtype=w.dtype, device=w.device))

    def bound(self, w: Tensor, allowed: Tensor | None = None) -> Tensor:
        """The last fitted a, shaped to broadcast against ``w`` (fitted to ``w`` first when there is none)."""
        if self.scale is None:
            self.fit(w, allowed)
        return along(self.scale, self.axis, w.dim())

    def support(self, w: Tensor, allowed: Tensor | None = None) -> Tensor:
        return self.quantizer.support(w, allowed)


class StraightThrough:
    """Latent float weights trained through their projection (straight-through estimator).

    Hooks for a training loop: :meth:`before_forward` swaps the projection in; :meth:`before_step` (after
    backward, before ``optimizer.step()``) swaps the latent weights back, so the gradient computed at the
    projection updates them; :meth:`finish` leaves the projection in place for good.

    Args:
        params: Name -> Parameter.
        levels: Name -> constraint whose ``project`` gives the weight's levels (e.g. :class:`FixedLevels`).
        supports: Optional name -> bool mask; entries outside it project to 0.
        start: Optional name -> the latent weights to start from (default: the parameters as they are).
            After a hard projection the parameters sit exactly on their levels, so a latent started there
            must travel a whole level spacing before its level changes (for binary weights: from +a to
            below 0); started from the weights before the projection (same levels, same forward pass),
            the entries near a threshold can change level at the first steps.
        clip: Optional name -> factor c > 1 for weights on :class:`RefitLevels`: before each projection the
            latent weights are clipped to c times their channel's last fitted a, as BinaryConnect clips its
            latent weights to [-1, 1]. Without it an entry pushed far past its level stays there.
    """

    def __init__(self, params: Mapping[str, torch.nn.Parameter], levels: Mapping[str, object],
                 supports: Mapping[str, Tensor] | None = None, start: Mapping[str, Tensor] | None = None,
                 clip: Mapping[str, float] | None = None) -> None:
        self.params = dict(params)
        self.levels = dict(levels)
        self.supports = dict(supports or {})
        self.clip = dict(clip or {})
        for name, factor in self.clip.items():
            if not factor > 1:
                raise ValueError(f"clip factor of {name!r} must be > 1 (at 1 or below a refit scale shrinks to "
                                 f"the smallest magnitude), got {factor!r}")
            if not isinstance(self.levels[name], RefitLevels):
                raise ValueError(f"clip of {name!r} needs RefitLevels (binary or ternary levels)")
        start = dict(start or {})
        self.latent = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for name, value in start.items():
                latent = value.to(self.latent[name])
                support = self.supports.get(name)
                self.latent[name] = latent if support is None else torch.where(support, latent, 0.0)
                self.params[name].copy_(self.latent[name])

    def _clip(self, name: str, p: Tensor) -> None:
        """Clip the latent ``p`` in place to its factor times its channel's last fitted a."""
        factor = self.clip.get(name)
        if factor is not None:
            bound = self.levels[name].bound(p, self.supports.get(name)) * factor
            torch.minimum(torch.maximum(p, -bound), bound, out=p)

    @torch.no_grad()
    def before_forward(self) -> None:
        for name, p in self.params.items():
            self._clip(name, p)
            self.latent[name].copy_(p)
            level = self.levels[name]
            support = self.supports.get(name)
            p.copy_(level.step(p, support) if isinstance(level, RefitLevels) else level.project(p, support))

    @torch.no_grad()
    def before_step(self) -> None:
        for name, p in self.params.items():
            p.copy_(self.latent[name])

    @torch.no_grad()
    def finish(self) -> None:
        """Put the projection in place: refit levels are refit to the (clipped) latent weights first, so the
        result is exactly the quantizer's projection of them."""
        for name, p in self.params.items():
            self._clip(name, p)
            level = self.levels[name]
            support = self.supports.get(name)
            p.copy_(level.fit(p, support) if isinstance(level, RefitLevels) else level.project(p, support))

    @contextmanager
    def projected(self) -> Iterator[None]:
        """Temporarily put the projection in place (to evaluate or snapshot), then restore the latent."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        self.finish()
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(saved[name])
