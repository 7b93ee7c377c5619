"""The training loop: losses (labels or distillation), one epoch with hooks, evaluation. Pure torch.

A model here is any ``nn.Module`` called with positional input tensors that returns a tuple of output
tensors (``converters.importer.OnnxModule`` does). Hooks let the ADMM engine add its penalty gradient
after ``backward()`` and re-apply masks after ``step()`` without the loop knowing about ADMM.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Batch:
    inputs: tuple[Tensor, ...]
    labels: Tensor | None = None


@dataclass(frozen=True)
class ScoreSpec:
    """Which output carries class scores and in what form (DESIGN §6); None index = no score output."""

    index: int | None
    kind: str = "logits"  # logits | probabilities | log_probabilities


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the caller rolls back to its last good state."""


class EmptyEpoch(ValueError):
    """An epoch's batches were empty: the data (e.g. a loader plugin on a later epoch) yielded nothing."""


def log_probs(score: Tensor, kind: str) -> Tensor:
    """Log-probabilities from a score output of the given kind."""
    if kind == "probabilities":
        # Exported classifiers often end in Softmax: the log of a probability can be -inf, so clamp.
        return torch.log(score.clamp_min(1e-12))
    if kind == "log_probabilities":
        return score
    return F.log_softmax(score, dim=-1)


class Loss:
    """Cross-entropy on labels, else KL to the teacher on the score output, else MSE on float outputs.

    With labels and ``distill`` > 0 the loss mixes both: ``(1 - distill) * CE + distill * KL(teacher)``
    (knowledge distillation from the original model, which compressed models recover faster with).
    """

    def __init__(self, score: ScoreSpec, temperature: float = 1.0, distill: float = 0.0) -> None:
        self.score = score
        self.temperature = temperature
        self.distill = distill

    def uses_teacher(self, labels: Tensor | None) -> bool:
        """Whether a batch with these labels needs the teacher's outputs."""
        return labels is None or self.score.index is None or self.distill > 0

    def __call__(self, outputs: Sequence[Tensor], labels: Tensor | None, teacher: Sequence[Tensor] | None) -> Tensor:
        index = self.score.index
        if labels is not None and index is not None:
            ce = F.nll_loss(log_probs(outputs[index], self.score.kind), labels)
            if self.distill > 0 and teacher is not None:
                return (1 - self.distill) * ce + self.distill * self._kl(outputs, teacher)
            return ce
        if teacher is None:
            raise ValueError("without labels, training needs the teacher's outputs (distillation)")
        if index is not None:
            return self._kl(outputs, teacher)
        terms = [F.mse_loss(o, t) for o, t in zip(outputs, teacher) if o.is_floating_point()]
        if not terms:
            raise ValueError("the model has no float output to train on")
        return torch.stack(terms).sum()

    def _kl(self, outputs: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
        index, kind = self.score.index, self.score.kind
        student = log_probs(outputs[index], kind)
        target = log_probs(teacher[index], kind)
        if kind == "logits" and self.temperature != 1.0:
            student = F.log_softmax(outputs[index] / self.temperature, dim=-1)
            target = F.log_softmax(teacher[index] / self.temperature, dim=-1)
        return F.kl_div(student, target, log_target=True, reduction="batchmean") * self.temperature**2


@dataclass
class EpochStats:
    loss: float
    accuracy: float | None  # with labels: top-1 accuracy; without: agreement with the teacher
    samples: int


def _top1_hits(outputs: Sequence[Tensor], batch: Batch, teacher: Sequence[Tensor] | None, index: int | None) -> int | None:
    if index is None:
        return None
    predicted = outputs[index].argmax(dim=-1)
    if batch.labels is not None:
        return int((predicted == batch.labels).sum())
    if teacher is not None:
        return int((predicted == teacher[index].argmax(dim=-1)).sum())
    return None


def train_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    loss_fn: Loss,
    optimizer: torch.optim.Optimizer,
    teacher: nn.Module | None = None,
    after_backward: Sequence[Callable[[], None]] = (),
    after_step: Sequence[Callable[[], None]] = (),
    on_batch: Callable[[int, float, float | None], None] | None = None,
    before_forward: Sequence[Callable[[], None]] = (),
) -> EpochStats:
    """One pass over ``batches``; hooks run before the forward pass, after ``backward()`` and after
    ``optimizer.step()``.

    Raises:
        NonFiniteLoss: as soon as a loss is NaN or infinite (before any step is taken with it).
        EmptyEpoch: ``batches`` yielded nothing.
    """
    total_loss, hits, seen, counted = 0.0, 0, 0, False
    for i, batch in enumerate(batches):
        # With labels and a score output the loss ignores the teacher unless it distils: skip its pass.
        needs_teacher = teacher is not None and loss_fn.uses_teacher(batch.labels)
        with torch.no_grad():
            teacher_out = teacher(*batch.inputs) if needs_teacher else None
        for hook in before_forward:
            hook()
        outputs = model(*batch.inputs)
        loss = loss_fn(outputs, batch.labels, teacher_out)
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteLoss(f"loss is {value} at batch {i}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for hook in after_backward:
            hook()
        optimizer.step()
        for hook in after_step:
            hook()
        n = batch.inputs[0].shape[0] if batch.inputs and batch.inputs[0].dim() else 1
        total_loss += value * n
        seen += n
        batch_hits = _top1_hits(outputs, batch, teacher_out, loss_fn.score.index)
        if batch_hits is not None:
            hits += batch_hits
            counted = True
        if on_batch is not None:
            on_batch(i, value, batch_hits / n if batch_hits is not None else None)
    if seen == 0:
        raise EmptyEpoch("no training batches: the data set is empty")
    return EpochStats(total_loss / seen, hits / seen if counted else None, seen)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], score: ScoreSpec, teacher: nn.Module | None = None) -> float | None:
    """Top-1 accuracy (labels) or agreement with ``teacher`` on the score output; None without one."""
    if score.index is None:
        return None
    hits, seen = 0, 0
    for batch in batches:
        outputs = model(*batch.inputs)
        teacher_out = teacher(*batch.inputs) if teacher is not None and batch.labels is None else None
        batch_hits = _top1_hits(outputs, batch, teacher_out, score.index)
        if batch_hits is None:
            return None
        hits += batch_hits
        seen += outputs[score.index].shape[0]
    return hits / seen if seen else None


def make_optimizer(params: Iterable[nn.Parameter], name: str, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
