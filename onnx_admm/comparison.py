"""The running comparison of an original model and its compressed version over the validation batches:
per-output differences and fit, the task metric on the score output (agreement included) and the positive
sets of the probabilities beside it (a detector's second head), accuracy with labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from onnx_admm.converters.errors import UserError
from onnx_admm.data import check_label_range
from onnx_admm.metrics import OutputFit, PositiveSet, TaskMetric, for_score
from onnx_admm.train import predictions

__all__ = ["Comparison", "OutputDiff"]


@dataclass(frozen=True)
class OutputDiff:
    """Absolute difference between the two models on one output (None when it is not a tensor), and the
    share of the original's variation over the samples the compressed one reproduces (``metrics.OutputFit``;
    None for an integer output, one the original holds constant, or one whose shape changes)."""

    name: str
    max_abs: float | None
    mean_abs: float | None
    r2: float | None = None


class Comparison:
    """Running sums over batches: per-output differences, the task metric (agreement included), accuracy."""

    def __init__(self, names: list[str], score: str | None, kind: str = "logits", blank: int | None = None,
                 others: tuple[str, ...] = ()):
        self.names = names
        # Probabilities beside the score (a second head's, ``scores.other_probabilities``): each positive set.
        self.others = {name: PositiveSet(binary=True) for name in others}
        self.score = score
        self.kind = kind
        self.blank = blank
        self.task: TaskMetric | None = None
        # How well each float output follows the original's (outputs[].r2; the gate's figure without a score).
        self.fit = OutputFit()
        self.score_shape: list[int] | None = None
        self.max_abs = {name: 0.0 for name in names}
        self.sum_abs = {name: 0.0 for name in names}
        self.count = {name: 0 for name in names}
        self.skipped: set[str] = set()
        self.correct = [0, 0]
        self.labelled = 0

    def add(self, results: list[dict], labels: np.ndarray | None, samples: int | None = None) -> None:
        for name in self.names:
            a, b = results[0][name], results[1][name]
            if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)) or a.dtype.kind not in "biuf":
                self.skipped.add(name)  # sequences, maps (skl2onnx ZipMap), strings
                continue
            if a.shape != b.shape:
                raise UserError(
                    f"output {name!r} has shape {a.shape} in the original model but {b.shape} in the compressed one"
                )
            a64, b64 = a.astype(np.float64), b.astype(np.float64)  # once, for the differences and the fit
            diff = np.abs(a64 - b64)
            if diff.size:
                # np.max propagates NaN; Python's max() would silently drop it and report 0.
                self.max_abs[name] = float(np.max([self.max_abs[name], diff.max()]))
            self.sum_abs[name] += float(diff.sum())
            self.count[name] += diff.size
            if a.dtype.kind == "f":
                self.fit.add(name, a64, b64, samples)
        for name, metric in self.others.items():
            pair = [result.get(name) for result in results]
            if all(isinstance(p, np.ndarray) and p.dtype.kind == "f" for p in pair):
                metric.add(*(predictions(torch.from_numpy(p), "binary_probabilities").numpy() for p in pair), samples)
        if self.score is None or self.score in self.skipped:
            return
        if self.score_shape is None:
            self.score_shape = list(np.shape(results[0][self.score]))
            self.task = for_score(self.kind, self.score_shape, self.blank)
        top = [predictions(torch.from_numpy(np.asarray(result[self.score])), self.kind).numpy() for result in results]
        self.task.add(top[0], top[1], samples)
        if labels is not None and top[0].ndim == 1 and not self.kind.startswith("binary"):
            check_label_range(labels, results[0][self.score].shape[-1], "validation data")
            for i in range(2):
                self.correct[i] += int(np.count_nonzero(top[i] == labels))
            self.labelled += len(labels)

    def diffs(self) -> tuple[OutputDiff, ...]:
        fits = self.fit.per_output()
        return tuple(
            OutputDiff(name, None, None)
            if name in self.skipped or not self.count[name]
            else OutputDiff(name, self.max_abs[name], self.sum_abs[name] / self.count[name], fits.get(name))
            for name in self.names
        )

    def agreement(self) -> float | None:
        return self.task.agreement if self.task is not None else None

    def summary(self) -> dict | None:
        """The report's ``task``: the score output's metric, else the outputs' fit (when it has a figure)."""
        if self.task is not None:
            others = {name: m.value for name, m in self.others.items() if m.value is not None}
            return {**self.task.summary(), **({"others": others} if others else {})}
        if self.score is None and self.fit.value is not None:
            return self.fit.summary()
        return None

    def accuracies(self) -> tuple[float | None, float | None]:
        if not self.labelled:
            return None, None
        return self.correct[0] / self.labelled, self.correct[1] / self.labelled
