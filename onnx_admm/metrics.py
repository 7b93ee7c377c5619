"""Task metrics: how much of its original's job a compressed model still does, measured so that a
majority class (blank time steps, background pixels) cannot hide a destroyed model.

Per-position agreement is a poor proof for outputs dominated by one class: a CTC reader that predicts
the blank at every step agrees with its original on three steps out of four and reads nothing, and a
detector that marks nothing agrees on 91% of pixels. The metric is therefore chosen from the score
output's kind and shape (``for_score``):

- ``Top1``: one prediction per sample ([N, C] class scores, [N] / [N, 1] probabilities): top-1
  agreement with the reference.
- ``Sequence``: class scores per time step ([N, T, C] or seq-first [T, N, C]). When one class covers at
  least half of the reference's steps it is the CTC blank (or ``blank`` names it): each sample is
  decoded greedily (argmax per step, repeats collapsed, blanks removed) and the metric is the share of
  samples whose decoded sequence equals the reference's exactly ("sequence match"), with the character
  error rate (edit distance over the reference's length) beside it. Without a blank (a per-step tagger)
  the headline stays per-step agreement, the exact sequence match beside it.
- ``PositiveSet``: maps and multi-element detections ([N, C, H, W] class scores, Sigmoid outputs with more
  than one element per sample): the reference's positive set (probability above 0.5, or any class but
  the reference's most frequent one, the background) against the candidate's: F1 (headline),
  precision, recall and IoU, plain agreement beside them.

- ``OutputFit``: a model with no score output: R^2 of each float output against the original's (the lowest).

The reference is the original model, so its own metric is 1 by definition. Every metric takes
*predictions* (``onnx_admm.train.predictions``: class ids, or booleans for probabilities), accumulates
over batches and needs no labels. Pure numpy.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

# A class covering at least this share of the reference's time steps is taken as the CTC blank.
BLANK_SHARE = 0.5


class TaskMetric(ABC):
    """Accumulates a comparison of candidate predictions with reference predictions over batches."""

    name: str

    def __init__(self) -> None:
        self.agree = self.positions = 0

    def add(self, reference: np.ndarray, candidate: np.ndarray, batch: int | None = None) -> None:
        """One batch of predictions of the same shape; ``batch`` is its sample count (finds the batch axis)."""
        reference, candidate = np.asarray(reference), np.asarray(candidate)
        if reference.shape != candidate.shape:
            raise ValueError(f"predictions differ in shape: {reference.shape} vs {candidate.shape}")
        self.agree += int(np.count_nonzero(reference == candidate))
        self.positions += reference.size
        self._add(reference, candidate, batch)

    @abstractmethod
    def _add(self, reference: np.ndarray, candidate: np.ndarray, batch: int | None) -> None: ...

    @property
    @abstractmethod
    def value(self) -> float | None:
        """The headline figure in [0, 1] (1: the candidate does the reference's job exactly); None before any batch."""

    @property
    def agreement(self) -> float | None:
        """Share of positions whose prediction agrees, whatever the metric."""
        return self.agree / self.positions if self.positions else None

    def details(self) -> dict:
        return {}

    def summary(self) -> dict:
        """JSON-ready: ``metric`` (its name), ``value`` and the figures behind it."""
        return {"metric": self.name, "value": self.value, "agreement": self.agreement, **self.details()}


class Top1(TaskMetric):
    """Top-1 agreement per sample (or per element of a [N] / [N, 1] probability)."""

    name = "top-1 agreement"

    def __init__(self) -> None:
        super().__init__()
        self.classes: set[int] = set()

    def _add(self, reference, candidate, batch) -> None:
        # The classes the reference predicts: one class for every sample makes agreement a coin on near ties.
        self.classes.update(int(c) for c in np.unique(reference))

    @property
    def value(self) -> float | None:
        return self.agreement

    def details(self) -> dict:
        return {"reference_classes": len(self.classes)}


class SequenceMatch(TaskMetric):
    """Greedy-decoded sequences per sample; see the module docstring. Predictions are [N, T] or [T, N]."""

    def __init__(self, blank: int | None = None) -> None:
        super().__init__()
        self.blank = blank
        self.blank_given = blank is not None
        self.decided = blank is not None
        self.batch_axis = 0
        self.samples = self.exact = self.edits = self.reference_length = 0

    @property
    def name(self) -> str:  # type: ignore[override]
        return "sequence match" if self.blank is not None else "top-1 agreement"

    def _add(self, reference, candidate, batch) -> None:
        if reference.ndim != 2:
            raise ValueError(f"sequence predictions are [N, T] or [T, N], got shape {reference.shape}")
        if batch is not None and reference.shape[0] != batch and reference.shape[1] == batch:
            self.batch_axis = 1  # seq-first: [T, N]
        elif batch is not None and reference.shape[0] == batch and reference.shape[1] != batch:
            self.batch_axis = 0
        if self.batch_axis == 1:
            reference, candidate = reference.T, candidate.T
        if not self.decided:
            classes, counts = np.unique(reference, return_counts=True)
            if counts.size and counts.max() >= BLANK_SHARE * reference.size:
                self.blank = int(classes[counts.argmax()])
            self.decided = True
        for ref, cand in zip(reference, candidate):
            ref, cand = self._decode(ref), self._decode(cand)
            self.samples += 1
            self.exact += int(ref.size == cand.size and bool(np.all(ref == cand)))
            self.edits += edit_distance(ref, cand)
            self.reference_length += ref.size

    def _decode(self, steps: np.ndarray) -> np.ndarray:
        if self.blank is None:
            return steps
        keep = np.ones(steps.size, dtype=bool)
        keep[1:] = steps[1:] != steps[:-1]  # collapse repeats, then drop blanks (CTC's greedy decode)
        steps = steps[keep]
        return steps[steps != self.blank]

    @property
    def sequence_match(self) -> float | None:
        return self.exact / self.samples if self.samples else None

    @property
    def value(self) -> float | None:
        return self.sequence_match if self.blank is not None else self.agreement

    def details(self) -> dict:
        return {"sequence_match": self.sequence_match,
                "error_rate": self.edits / max(self.reference_length, 1) if self.samples else None,
                # Symbols the original's decoded sequences hold in all: 0 when it reads nothing (all blank).
                "reference_symbols": self.reference_length if self.blank is not None else None,
                "decode": "greedy CTC (repeats collapsed, blank removed)" if self.blank is not None else "per step",
                "blank": self.blank, "blank_from": ("given" if self.blank_given else "the original's most frequent class")
                if self.blank is not None else None,
                "batch_axis": self.batch_axis}


class PositiveSet(TaskMetric):
    """The reference's positive set against the candidate's (F1, precision, recall, IoU).

    ``binary``: predictions are booleans (probability above 0.5), positives are True. Else they are class
    ids and every class but the background (the reference's most frequent class in the first batch) is
    positive; a candidate positive counts as found only with the reference's class.
    """

    name = "positive-set F1"

    def __init__(self, binary: bool) -> None:
        super().__init__()
        self.binary = binary
        self.background: int | None = None
        self.tp = self.fp = self.fn = self.reference_positives = 0

    def _add(self, reference, candidate, batch) -> None:
        if self.binary:
            ref_pos, cand_pos = reference.astype(bool), candidate.astype(bool)
        else:
            if self.background is None:
                classes, counts = np.unique(reference, return_counts=True)
                self.background = int(classes[counts.argmax()])
            ref_pos, cand_pos = reference != self.background, candidate != self.background
        tp = int(np.count_nonzero(ref_pos & cand_pos & (reference == candidate)))
        self.tp += tp
        self.fp += int(np.count_nonzero(cand_pos)) - tp
        self.fn += int(np.count_nonzero(ref_pos)) - tp
        self.reference_positives += int(np.count_nonzero(ref_pos))

    @staticmethod
    def _ratio(num: int, den: int) -> float:
        return num / den if den else 1.0  # nothing to find and nothing found: perfect

    @property
    def value(self) -> float | None:
        return self._ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn) if self.positions else None

    def details(self) -> dict:
        if not self.positions:
            return {}
        return {"precision": self._ratio(self.tp, self.tp + self.fp), "recall": self._ratio(self.tp, self.tp + self.fn),
                "iou": self._ratio(self.tp, self.tp + self.fp + self.fn),
                "positive_fraction": self.reference_positives / self.positions,
                "positives": "probability above 0.5" if self.binary else f"any class but the background {self.background}"}


class OutputFit:
    """For a model with no score output (a regressor, an embedding, a head the tool cannot read): the share
    of the original's output variation over the samples that the candidate reproduces, R^2 = 1 - SSE / SST
    per float output, SST about each position's mean over the samples; the headline is the lowest over the
    outputs. The original scores 1; an output frozen at its mean scores 0 and a destroyed one below it, so the
    gate's floor has a figure where otherwise nothing measured the model. Outputs the reference holds
    constant over the samples (nothing to explain) and outputs whose shape changes between batches (a
    per-position mean needs fixed positions) are left out; with none left the value is None.
    """

    name = "output R^2"
    # SST under this share of the output's sum of squares: constant in the reference, left out.
    CONSTANT = 1e-9

    def __init__(self) -> None:
        self.sums: dict[str, list] = {}  # output -> [samples, sum, sum of squares, SSE] (per position)
        self.uneven: set[str] = set()

    def add(self, name: str, reference: np.ndarray, candidate: np.ndarray, batch: int | None = None) -> None:
        """One batch of output ``name`` from both models; ``batch`` is its sample count (finds the batch axis)."""
        if name in self.uneven:
            return
        reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
        if reference.ndim == 0:
            reference, candidate = reference.reshape(1), candidate.reshape(1)
        axis = reference.shape.index(batch) if batch is not None and batch in reference.shape else 0
        reference, candidate = np.moveaxis(reference, axis, 0), np.moveaxis(candidate, axis, 0)
        acc = self.sums.get(name)
        if acc is not None and acc[1].shape != reference.shape[1:]:
            self.uneven.add(name)
            del self.sums[name]
            return
        if acc is None:
            acc = self.sums[name] = [0, np.zeros(reference.shape[1:]), np.zeros(reference.shape[1:]), 0.0]
        acc[0] += reference.shape[0]
        acc[1] += reference.sum(0)
        acc[2] += np.square(reference).sum(0)
        acc[3] += float(np.square(candidate - reference).sum())

    def per_output(self) -> dict[str, float]:
        out = {}
        for name, (n, total, squares, sse) in self.sums.items():
            if n < 2:
                continue
            sst = float((squares - np.square(total) / n).sum())
            if not math.isfinite(sst) or sst <= self.CONSTANT * float(squares.sum()) or sst <= 0:
                continue  # constant in the reference (or not finite there: nothing to measure against)
            # A non-finite candidate output explains nothing: -inf, which any floor fails.
            out[name] = 1.0 - sse / sst if math.isfinite(sse) else -math.inf
        return out

    @property
    def value(self) -> float | None:
        fits = self.per_output()
        return min(fits.values()) if fits else None

    def summary(self) -> dict:
        return {"metric": self.name, "value": self.value, "agreement": None, "outputs": self.per_output(),
                "measures": "the original's output variation over the samples that the compressed model "
                            "reproduces (no output reads as scores)"}


def for_score(kind: str, shape: Sequence[int], blank: int | None = None) -> TaskMetric:
    """The task metric for a score output of ``kind`` (``onnx_admm.train.ScoreSpec.kind``) and one batch's ``shape``."""
    rank = len(shape)
    if kind.startswith("binary"):
        per_sample = math.prod(shape[1:]) if rank > 1 else 1
        return PositiveSet(binary=True) if per_sample > 1 else Top1()
    if rank <= 2:
        return Top1()
    if rank == 3:
        return SequenceMatch(blank)
    return PositiveSet(binary=False)


def edit_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Levenshtein distance between two 1-D integer sequences (one numpy row per element of ``a``)."""
    if a.size == 0 or b.size == 0:
        return int(max(a.size, b.size))
    previous = np.arange(b.size + 1)
    for i, x in enumerate(a, start=1):
        current = np.empty_like(previous)
        current[0] = i
        # substitution / deletion from the previous row; insertion needs a running minimum along the row
        current[1:] = np.minimum(previous[:-1] + (b != x), previous[1:] + 1)
        current = np.minimum.accumulate(current - np.arange(b.size + 1)) + np.arange(b.size + 1)
        previous = current
    return int(previous[-1])
