"""The gate a compressed model must pass before it takes the output's name.

Two checks on the held-out split, both read from the report (``onnx_admm.api``):
- ``max_accuracy_drop`` (opt-in): original minus compressed accuracy with labels, else 1 minus the task
  metric against the original (``onnx_admm.metrics``).
- ``floor`` (on by default): the compressed model keeps at least this share of the original's task
  figure: accuracy with labels, else the task metric against the original, whose own figure is 1. A
  run that destroys its task (a CTC reader that reads nothing, a detector that finds nothing, a
  diverged retraining) fails even when no drop was asked for.

A model that fails is written under its ``.gate-failed`` name (or not at all) and the run exits 3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from onnx_admm.converters.errors import UserError

# The share of the original's task figure below which a run fails unless the caller says otherwise.
DEFAULT_FLOOR = 0.5


@dataclass(frozen=True)
class Gate:
    """What a compressed model must keep; see the module docstring."""

    max_accuracy_drop: float | None = None
    floor: float = DEFAULT_FLOOR

    def __post_init__(self) -> None:
        drop = self.max_accuracy_drop
        if drop is not None and (isinstance(drop, bool) or not isinstance(drop, (int, float))
                                 or not math.isfinite(drop) or drop < 0):
            raise UserError(f"max_accuracy_drop must be a finite fraction >= 0 (0.01 = 1 point), got {drop!r}")
        if isinstance(self.floor, bool) or not isinstance(self.floor, (int, float)) or not 0 <= self.floor <= 1:
            raise UserError(f"the metric floor must be a fraction in [0, 1] of the original's figure (0 turns it "
                            f"off), got {self.floor!r}")

    @property
    def active(self) -> bool:
        """Whether a model can fail: then a failed model has a name of its own."""
        return self.max_accuracy_drop is not None or self.floor > 0

    def judge(self, drop: float | None, retained: tuple[str, float] | None) -> tuple[dict, str | None]:
        """(the report's ``gate`` entry, the reason for failing or None) for a measured ``drop`` and
        ``retained`` = (metric name, compressed share of the original's figure)."""
        reasons = []
        if self.max_accuracy_drop is not None and drop is not None and drop > self.max_accuracy_drop:
            reasons.append(f"accuracy gate failed: drop {drop:.4f} > max accuracy drop {self.max_accuracy_drop}")
        if retained is not None and not retained[1] >= self.floor:  # NaN fails too
            metric, share = retained
            reasons.append(f"task metric under the floor: {metric} is {100 * share:.2f}% of the original's, under "
                           f"the floor of {100 * self.floor:g}% (the compressed model no longer does the original's "
                           "job; train longer, compress less, or lower --metric-floor)")
        entry = {"max_accuracy_drop": self.max_accuracy_drop, "floor": self.floor,
                 "metric": None if retained is None else retained[0],
                 "retained": None if retained is None else retained[1], "passed": not reasons}
        return entry, "; ".join(reasons) or None


def retained(original_accuracy: float | None, compressed_accuracy: float | None,
             task: dict | None) -> tuple[str, float] | None:
    """(metric, the compressed model's share of the original's figure): accuracy with labels, else the
    task metric against the original (``onnx_admm.metrics``; the original's own figure is 1); the
    positive-set F1 of a probability beside the score where that is lower (``_weakest``); None when nothing
    was measured."""
    figure = None
    if original_accuracy is not None and compressed_accuracy is not None:
        if original_accuracy > 0:
            figure = "accuracy", compressed_accuracy / original_accuracy
    elif task is not None and task.get("value") is not None:
        figure = task["metric"], task["value"]
    return _weakest(figure, task)


def _weakest(figure: tuple[str, float] | None, task: dict | None) -> tuple[str, float] | None:
    """``figure`` (``retained``) or, when lower, the positive-set F1 of a probability beside the score
    (``task["others"]``: a second head's) as (its metric, value): the floor holds every head to its share."""
    others = (task or {}).get("others") or {}
    if not others:
        return figure
    name, value = min(others.items(), key=lambda item: item[1])
    if figure is None or value < figure[1]:
        return f"positive-set F1 of {name!r}", value
    return figure
