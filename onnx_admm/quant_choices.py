"""What a recipe asks one weight's values to be, as a value: k-bit levels, signs (binary), signs and
zero (ternary), or a codebook of shared values.

A recipe names the choice with flags (``bits``, ``ternary``, ``clusters``, ``per_channel``,
``symmetric``); :func:`choice` reads them once into one of the frozen values below, and the stage
runner asks the value for its quantizer (``onnx_admm.quantizers``), its name in the report and the
axis its levels are kept along, instead of testing flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from onnx_admm.quantizers import Binary, Codebook, Ternary, UniformQuant

__all__ = ["BinaryLevels", "Clusters", "KBit", "QuantChoice", "TernaryLevels", "choice"]


@dataclass(frozen=True)
class QuantChoice:
    """One stage's quantization of one weight; ``per_channel``: one scale per output channel."""

    per_channel: bool = False
    # Codebooks share their values over the whole tensor whatever per_channel says.
    channel_levels: ClassVar[bool] = True
    # Binary and ternary scales are closed forms of the weights: retraining refits them from the latent
    # weights (onnx_admm.levels.RefitLevels) instead of freezing the hard projection's.
    refits: ClassVar[bool] = False

    def quantizer(self, axis: int):
        """The constraint that projects onto these levels; ``axis`` is the weight's output-channel axis."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def level_axis(self, axis: int) -> int | None:
        """Where the retraining keeps one level set per index (per-channel levels), else None (one set)."""
        return axis if self.per_channel and self.channel_levels else None


@dataclass(frozen=True)
class KBit(QuantChoice):
    """``bits``-bit integers times a scale; ``symmetric`` drops the container's most negative level."""

    bits: int = 8
    symmetric: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or self.bits < 2:
            raise ValueError(f"KBit needs bits >= 2 (1 bit is BinaryLevels), got {self.bits!r}")

    def quantizer(self, axis: int):
        return UniformQuant(self.bits, per_channel=self.per_channel, axis=axis, symmetric=self.symmetric)

    def describe(self) -> str:
        return f"{self.bits}-bit"


@dataclass(frozen=True)
class BinaryLevels(QuantChoice):
    """Two levels, -a and +a."""

    refits: ClassVar[bool] = True

    def quantizer(self, axis: int):
        return Binary(per_channel=self.per_channel, axis=axis)

    def describe(self) -> str:
        return "binary"


@dataclass(frozen=True)
class TernaryLevels(QuantChoice):
    """Three levels, -a, 0 and +a."""

    refits: ClassVar[bool] = True

    def quantizer(self, axis: int):
        return Ternary(per_channel=self.per_channel, axis=axis)

    def describe(self) -> str:
        return "ternary"


@dataclass(frozen=True)
class Clusters(QuantChoice):
    """``clusters`` shared values fitted to the weight (k-means), stored as indices."""

    clusters: int = 16
    channel_levels: ClassVar[bool] = False

    def quantizer(self, axis: int):
        return Codebook(self.clusters)

    def describe(self) -> str:
        return f"{self.clusters} clusters"


def choice(bits: int | None = None, ternary: bool = False, clusters: int | None = None,
           per_channel: bool = False, symmetric: bool = False) -> QuantChoice | None:
    """The value a recipe's flags name (None: no quantization); the recipe validated the flags."""
    if ternary:
        return TernaryLevels(per_channel)
    if clusters is not None:
        return Clusters(per_channel, clusters)
    if bits == 1:
        return BinaryLevels(per_channel)
    if bits is not None:
        return KBit(per_channel, bits, symmetric)
    return None
