"""Retraining on fixed levels: a frozen level set and the straight-through estimator (pure torch).

After the hard projection a quantized weight sits on its levels (k-bit grid, ±a, codebook). Masked
retraining must keep it there. We chose the straight-through estimator with re-projection: the
optimizer updates latent float weights, the forward and backward passes see their projection onto
the *frozen* levels of the hard projection, and the phase ends with one more projection, so the final
weights are exactly on levels. (The authors instead fix a growing fraction of weights and retrain the
rest; STE needs no schedule and lets every weight change level.)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from onnx_admm.quantized import channel_rows, from_channel_rows


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
    """

    def __init__(self, params: Mapping[str, torch.nn.Parameter], levels: Mapping[str, object],
                 supports: Mapping[str, Tensor] | None = None, start: Mapping[str, Tensor] | None = None) -> None:
        self.params = dict(params)
        self.levels = dict(levels)
        self.supports = dict(supports or {})
        start = dict(start or {})
        self.latent = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for name, value in start.items():
                latent = value.to(self.latent[name])
                support = self.supports.get(name)
                self.latent[name] = latent if support is None else torch.where(support, latent, 0.0)
                self.params[name].copy_(self.latent[name])

    def _project(self, name: str, w: Tensor) -> Tensor:
        return self.levels[name].project(w, self.supports.get(name))

    @torch.no_grad()
    def before_forward(self) -> None:
        for name, p in self.params.items():
            self.latent[name].copy_(p)
            p.copy_(self._project(name, p))

    @torch.no_grad()
    def before_step(self) -> None:
        for name, p in self.params.items():
            p.copy_(self.latent[name])

    @torch.no_grad()
    def finish(self) -> None:
        for name, p in self.params.items():
            p.copy_(self._project(name, p))

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
