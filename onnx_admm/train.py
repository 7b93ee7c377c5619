"""The training loop: losses (labels or distillation), one epoch with hooks, evaluation. Pure torch.

A model here is any ``nn.Module`` called with positional input tensors that returns a tuple of output
tensors (``converters.importer.OnnxModule`` does). Hooks let the ADMM engine add its penalty gradient
after ``backward()`` and re-apply masks after ``step()`` without the loop knowing about ADMM.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onnx_admm.metrics import for_score

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Batch:
    inputs: tuple[Tensor, ...]
    labels: Tensor | None = None


@dataclass(frozen=True)
class ScoreSpec:
    """Which output carries the scores and in what form; None index = no score output (MSE on every
    float output).

    Kinds: ``logits``, ``probabilities``, ``log_probabilities`` are class scores over the class axis
    (``class_axis``): one prediction per sample ([N, C]), per time step ([N, T, C] or seq-first
    [T, N, C]) or per pixel ([N, C, H, W]). ``binary_probabilities`` (a Sigmoid's output) and
    ``binary_logits`` make every element a probability of its own (a [N, 1, H, W] map: one per pixel).
    """

    index: int | None
    kind: str = "logits"  # logits | probabilities | log_probabilities | binary_probabilities | binary_logits
    # The CTC blank class of a per-time-step output for the task metric (None: found from the teacher).
    blank: int | None = None

    @property
    def binary(self) -> bool:
        return self.kind.startswith("binary")


def class_axis(rank: int) -> int:
    """The class axis of a categorical score: the last one up to rank 3, axis 1 (channels) from rank 4.

    The same rule as ``converters.scores.class_axis``, restated because the engine imports no ONNX code.
    """
    return 1 if rank >= 4 else rank - 1


def describe_score(kind: str, shape: Sequence[int | str | None] | None) -> dict:
    """What the loss and the agreement metric do with a score output of this kind and shape (report text):
    ``loss``, ``metric`` and ``per`` (sample, time step, pixel or element)."""
    rank = len(shape) if shape is not None else 2
    if kind.startswith("binary"):
        per = "per element" if rank <= 2 else "per pixel" if rank >= 4 else "per time step"
        return {"kind": kind, "loss": "binary cross-entropy to the original's probability", "metric": "agreement at 0.5",
                "per": per}
    per = "per sample" if rank <= 2 else "per time step" if rank == 3 else "per pixel"
    return {"kind": kind, "loss": "KL divergence to the original's class distribution", "metric": "top-1 agreement",
            "per": per}


def balance_weights(classes: Tensor, balance: float) -> Tensor:
    """Per-position weights of mean 1 that keep the teacher's majority class from drowning the rest.

    ``classes`` holds the teacher's prediction at each position (its top-1 class, or its side of 0.5 for
    a binary map). Each position gets ``(1 - balance) + balance * P / (K * n_c)``: P positions, K classes
    the teacher predicts in the batch, n_c positions of this one's class. The second term gives every
    predicted class the same total weight, so with ``balance`` = b the classes other than a majority
    that covers most positions share about b (K - 1) / K of the loss instead of their own small fraction
    (label-free runs of a CTC reader or a sparse-event detector otherwise learn to predict blank or
    background everywhere). 0 gives weight 1 everywhere (the plain mean), 1 pure class balance.
    """
    _, inverse, counts = torch.unique(classes.detach().reshape(-1), return_inverse=True, return_counts=True)
    per_class = classes.numel() / (len(counts) * counts.to(torch.float32))
    return ((1 - balance) + balance * per_class[inverse]).reshape(classes.shape)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the caller rolls back to its last good state."""


class NoGradient(ValueError):
    """The loss does not depend on any trainable weight: no output the model trains on is computed from one."""


class EmptyEpoch(ValueError):
    """An epoch's batches were empty: the data (e.g. a loader plugin on a later epoch) yielded nothing."""


def log_probs(score: Tensor, kind: str, dim: int = -1) -> Tensor:
    """Log-probabilities from a score output of the given kind, classes on ``dim``."""
    if kind == "probabilities":
        # Exported classifiers often end in Softmax: the log of a probability can be -inf, so clamp.
        return torch.log(score.clamp_min(1e-12))
    if kind == "log_probabilities":
        return score
    return F.log_softmax(score, dim=dim)


def _binary_logits(score: Tensor, kind: str) -> Tensor:
    """Logits of per-element probabilities (clamped so a saturated Sigmoid stays finite)."""
    if kind == "binary_logits":
        return score
    p = score.clamp(1e-7, 1 - 1e-7)
    return torch.log(p) - torch.log1p(-p)


def predictions(score: Tensor, kind: str) -> Tensor:
    """One prediction per position: the top-1 class over the class axis, or the probability above 0.5."""
    if kind == "binary_logits":
        return score > 0
    if kind == "binary_probabilities":
        return score > 0.5
    return score.argmax(dim=class_axis(score.dim()))


class Loss:
    """Cross-entropy on labels, else distillation to the teacher on the score output, else the float outputs' MSE
    over the teacher's variance.

    Distillation is KL per position over the class axis (mean over samples and positions; over samples
    only it is torch's ``batchmean``), or, for binary kinds, cross-entropy minus the teacher's entropy
    per element (zero when they agree). The teacher's other float outputs (a recurrent state, a second
    head) add their MSE divided by the teacher's variance, so their scale does not outweigh the scores.

    With labels and ``distill`` > 0 the loss mixes both: ``(1 - distill) * CE + distill * KL(teacher)``
    (knowledge distillation from the original model on the labelled batches).

    ``balance`` > 0 re-weights the positions of a per-position score (sequences, maps; not [N, C]
    per-sample scores) by ``balance_weights``, and with such a score takes the other outputs' term as
    ``log1p(MSE / var)``, so a head far from the teacher does not swamp the score's gradient. 0 is the
    plain mean over positions and the plain MSE ratio.
    """

    def __init__(self, score: ScoreSpec, temperature: float = 1.0, distill: float = 0.0,
                 balance: float = 0.0) -> None:
        self.score = score
        self.temperature = temperature
        self.distill = distill
        self.balance = balance

    def needs_teacher(self, outputs: Sequence[Tensor], labels: Tensor | None) -> bool:
        """Whether the loss reads the teacher's outputs: labels of an [N, C] score output make it unused
        (unless it distils), so its pass can be skipped."""
        index = self.score.index
        labelled = labels is not None and index is not None and outputs[index].dim() == 2 and not self.score.binary
        return not labelled or self.distill > 0

    def __call__(self, outputs: Sequence[Tensor], labels: Tensor | None, teacher: Sequence[Tensor] | None) -> Tensor:
        index, kind = self.score.index, self.score.kind
        if labels is not None and index is not None and outputs[index].dim() == 2 and not self.score.binary:
            ce = F.nll_loss(log_probs(outputs[index], kind), labels)
            if self.distill > 0 and teacher is not None:
                return (1 - self.distill) * ce + self.distill * self._distil(outputs[index], teacher[index])
            return ce
        if teacher is None:
            if labels is not None and index is not None:
                raise ValueError(f"labels are class ids of an [N, C] score output, but the score output is shaped "
                                 f"{list(outputs[index].shape)} ({kind}); train without labels to distil on it")
            raise ValueError("without labels, training needs the teacher's outputs (distillation)")
        if index is None:
            # Each output's MSE over the teacher's variance (1 - R^2, near enough): a regressor's targets in the
            # hundreds made the plain MSE's steps diverge at the pruning learning rate (loss 3e-3 -> 5e5).
            terms = [_scaled_mse(o, t) for o, t in zip(outputs, teacher) if o.is_floating_point() and o.numel()]
            if not terms:
                raise ValueError("the model has no float output to train on")
            return torch.stack(terms).sum()
        loss = self._distil(outputs[index], teacher[index])
        others = [_scaled_mse(o, t)
                  for i, (o, t) in enumerate(zip(outputs, teacher)) if i != index and o.is_floating_point() and o.numel()]
        if not others:
            return loss
        others = torch.stack(others)
        if self._balance(outputs[index]) > 0:
            # A second head that pruning threw off (a detector's boxes: MSE several times the teacher's
            # variance) otherwise owns the step and wrecks the score output; log1p keeps the MSE where the
            # student follows and divides its gradient by 1 + MSE / var where it does not.
            others = torch.log1p(others)
        return loss + others.mean()

    def _balance(self, score: Tensor) -> float:
        # Per-sample scores ([N, C], [N, 1]) keep the plain mean: balancing the batch's classes would
        # re-weight whole samples, not the majority positions of a sequence or a map.
        return self.balance if score.dim() >= 3 else 0.0

    def _distil(self, student: Tensor, teacher: Tensor) -> Tensor:
        kind = self.score.kind
        balance = self._balance(student)
        if self.score.binary:
            s, t = _binary_logits(student, kind), _binary_logits(teacher, kind)
            target = torch.sigmoid(t)
            if balance == 0:
                entropy = F.binary_cross_entropy_with_logits(t, target)
                return F.binary_cross_entropy_with_logits(s, target) - entropy
            per_element = (F.binary_cross_entropy_with_logits(s, target, reduction="none")
                           - F.binary_cross_entropy_with_logits(t, target, reduction="none"))
            return (per_element * balance_weights(t > 0, balance)).mean()
        dim = class_axis(student.dim())
        if kind == "logits" and self.temperature != 1.0:
            s = F.log_softmax(student / self.temperature, dim=dim)
            t = F.log_softmax(teacher / self.temperature, dim=dim)
        else:
            s, t = log_probs(student, kind, dim), log_probs(teacher, kind, dim)
        if balance == 0:
            positions = student.numel() // max(student.shape[dim], 1)
            return F.kl_div(s, t, log_target=True, reduction="sum") / max(positions, 1) * self.temperature**2
        per_position = F.kl_div(s, t, log_target=True, reduction="none").sum(dim)
        return (per_position * balance_weights(t.argmax(dim), balance)).mean() * self.temperature**2


def _scaled_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """The MSE to the teacher's output divided by its variance, so that an output's scale does not set the
    size of the steps."""
    return F.mse_loss(student, teacher) / (teacher.detach().float().var(unbiased=False) + 1e-6)


@dataclass
class EpochStats:
    loss: float
    accuracy: float | None  # with labels: top-1 accuracy; without: agreement with the teacher (per position)
    samples: int


def _top1_hits(outputs: Sequence[Tensor], batch: Batch, teacher: Sequence[Tensor] | None,
               score: ScoreSpec) -> tuple[int, int] | None:
    """(positions that agree, positions): with labels, per sample of an [N, C] output; else with the teacher."""
    if score.index is None:
        return None
    predicted = predictions(outputs[score.index], score.kind)
    if batch.labels is not None and predicted.dim() == 1:
        return int((predicted == batch.labels).sum()), predicted.numel()
    if teacher is not None:
        return int((predicted == predictions(teacher[score.index], score.kind)).sum()), predicted.numel()
    return None


@dataclass(frozen=True)
class Precision:
    """The dtype the forward passes (student and teacher) run in under autocast; None: float32 throughout.

    Weights, their gradients, the optimizer, the loss and every projection stay float32: autocast lowers
    only the ops that gain from it. float16's narrow range needs the loss scaled so that small gradients
    do not vanish (``scaler``); bfloat16 has float32's range and needs none.
    """

    dtype: torch.dtype | None = None
    device_type: str = "cpu"

    def autocast(self):
        return nullcontext() if self.dtype is None else torch.autocast(self.device_type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device_type) if self.dtype == torch.float16 else None


def _float(outputs):
    """Lowered-precision outputs back to float32, so the loss is computed (and compared) in float32."""
    return [o.float() if torch.is_tensor(o) and o.is_floating_point() else o for o in outputs]


def train_epoch(
    model: nn.Module,
    batches: Iterable[Batch | Sequence[Batch]],
    loss_fn: Loss,
    optimizer: torch.optim.Optimizer,
    teacher: nn.Module | None = None,
    after_backward: Sequence[Callable[[], None]] = (),
    after_step: Sequence[Callable[[], None]] = (),
    on_batch: Callable[[int, float, float | None], None] | None = None,
    before_forward: Sequence[Callable[[], None]] = (),
    agree: Callable[[float], float] | None = None,
    precision: Precision = Precision(),
) -> EpochStats:
    """One pass over ``batches``; hooks run before the forward pass, after ``backward()`` and after
    ``optimizer.step()``. With a lower ``precision`` the student's and the teacher's forward passes run
    under autocast; float16 scales the loss, and the gradients are unscaled before the hooks see them.

    An item may be a sequence of batches: the chunks of one step, whose gradients are accumulated (each
    chunk's loss weighted by its share of the samples) before the one optimizer step, so a batch too large
    for memory trains as if whole.

    ``agree`` turns each batch's loss into the one every process of a data-parallel run acts on (their
    mean, ``onnx_admm.distributed.World.mean``): a non-finite loss on any process then stops them all
    at the same step, where stopping one alone would leave the others waiting in the gradient all-reduce.

    Raises:
        NonFiniteLoss: as soon as a loss is NaN or infinite (before any step is taken with it).
        EmptyEpoch: ``batches`` yielded nothing.
    """
    total_loss, hits, positions, seen, counted = 0.0, 0, 0, 0, False
    scaler = precision.scaler()
    for i, step in enumerate(batches):
        chunks = [step] if isinstance(step, Batch) else list(step)
        size = sum(_samples(chunk) for chunk in chunks)
        for hook in before_forward:
            hook()
        optimizer.zero_grad(set_to_none=True)
        value, step_hits = 0.0, None
        for chunk in chunks:
            with precision.autocast():
                outputs = model(*chunk.inputs)
            if precision.dtype is not None:
                outputs = _float(outputs)
            with torch.no_grad(), precision.autocast():
                teacher_out = (teacher(*chunk.inputs) if teacher is not None
                               and loss_fn.needs_teacher(outputs, chunk.labels) else None)
            if teacher_out is not None and precision.dtype is not None:
                teacher_out = _float(teacher_out)
            loss = loss_fn(outputs, chunk.labels, teacher_out)
            share = _samples(chunk) / size
            chunk_value = loss.item() if agree is None else agree(loss.item())
            if not math.isfinite(chunk_value):
                raise NonFiniteLoss(f"loss is {chunk_value} at batch {i}")
            if not loss.requires_grad:
                raise NoGradient("the loss does not depend on any trainable weight")
            scaled = loss * share if len(chunks) > 1 else loss
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            value += chunk_value * share
            chunk_hits = _top1_hits(outputs, chunk, teacher_out, loss_fn.score)
            if chunk_hits is not None:
                step_hits = chunk_hits if step_hits is None else (step_hits[0] + chunk_hits[0],
                                                                  step_hits[1] + chunk_hits[1])
            del outputs, teacher_out, loss, scaled  # the next chunk's activations replace these
        if scaler is not None:
            scaler.unscale_(optimizer)  # the hooks (ADMM penalty, masks) act on the true gradients
        for hook in after_backward:
            hook()
        if scaler is not None:
            scaler.step(optimizer)  # skipped when a gradient overflowed float16; the scale is lowered
            scaler.update()
        else:
            optimizer.step()
        for hook in after_step:
            hook()
        total_loss += value * size
        seen += size
        if step_hits is not None:
            hits += step_hits[0]
            positions += step_hits[1]
            counted = True
        if on_batch is not None:
            on_batch(i, value, step_hits[0] / max(step_hits[1], 1) if step_hits is not None else None)
    if seen == 0:
        raise EmptyEpoch("no training batches: the data set is empty")
    return EpochStats(total_loss / seen, hits / max(positions, 1) if counted else None, seen)


def _samples(batch: Batch) -> int:
    return batch.inputs[0].shape[0] if batch.inputs and batch.inputs[0].dim() else 1


@dataclass(frozen=True)
class Standing:
    """A state's result on the selection split: the task metric (None without a score output) and the
    training loss there (None when not measured), which settles the metric's ties.

    A selection split of a few samples ties often (13 of 128 label-free inputs: agreement moves in steps
    of 1/13), and the later state used to win a tie; the loss tells how close each state is to the teacher
    on the same samples (the pipeline measures it without labels only). Label-free at 50% (128 inputs),
    mobilenet_v3_small's refit stage start tied the ADMM projection's agreement at a third of its loss:
    retrained from it, the model agrees with the original on 0.969 / 0.961 of held-out images (seeds 0 / 1)
    instead of 0.922 / 0.906.
    """

    metric: float | None
    loss: float | None = None

    def compare(self, other: Standing) -> int:
        """1 if this state stands better than ``other``, -1 if worse, 0 if level: the metric first, the
        lower loss on a tie. Without a metric on both (no score output) they are level: the MSE on the
        selection split did not tell which start retrains better (a two-layer regressor chose its refit
        stage start by it and ended at twice the held-out MSE, 0.0245 against 0.0129)."""
        if self.metric is None or other.metric is None:
            return 0
        if self.metric != other.metric:
            return 1 if self.metric > other.metric else -1
        if self.loss is not None and other.loss is not None and self.loss != other.loss:
            return 1 if self.loss < other.loss else -1
        return 0


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], score: ScoreSpec, teacher: nn.Module | None = None) -> float | None:
    """Top-1 accuracy (labels, [N, C] scores), or without labels the task metric against ``teacher`` on the
    score output (``onnx_admm.metrics.for_score``: top-1 agreement, greedy-decoded sequence match of a CTC
    output, F1 of the teacher's positive set on a map); None without a score output."""
    return standing(model, batches, score, teacher).metric


@torch.no_grad()
def standing(model: nn.Module, batches: Iterable[Batch], score: ScoreSpec, teacher: nn.Module | None = None,
             loss: Loss | None = None) -> Standing:
    """:func:`evaluate`'s metric and, with ``loss``, the mean of that training loss over the samples."""
    if score.index is None and loss is None:
        return Standing(None)
    hits, seen, task, total, samples_seen = 0, 0, None, 0.0, 0
    for batch in batches:
        outputs = model(*batch.inputs)
        predicted = predictions(outputs[score.index], score.kind) if score.index is not None else None
        counted = batch.labels is not None and predicted is not None and predicted.dim() == 1  # top-1 on labels
        loss_reads_teacher = loss is not None and loss.needs_teacher(outputs, batch.labels)
        # The teacher runs once per batch, where the metric or the loss reads it.
        taught = (teacher(*batch.inputs) if teacher is not None
                  and (loss_reads_teacher or (predicted is not None and not counted)) else None)
        if loss is not None and (taught is not None or not loss_reads_teacher):
            n = _samples(batch)
            total += float(loss(outputs, batch.labels, taught)) * n
            samples_seen += n
        if predicted is None:
            continue
        if counted:
            hits += int((predicted == batch.labels).sum())
            seen += predicted.numel()
            continue
        if taught is None:
            return Standing(None, None)
        reference = predictions(taught[score.index], score.kind)
        if task is None:
            task = for_score(score.kind, tuple(outputs[score.index].shape), score.blank)
        samples = batch.inputs[0].shape[0] if batch.inputs and batch.inputs[0].dim() else None
        task.add(reference.cpu().numpy(), predicted.cpu().numpy(), samples)
    mean_loss = total / samples_seen if samples_seen else None
    if task is not None:
        return Standing(task.value, mean_loss)
    return Standing(hits / seen if seen else None, mean_loss)


def make_optimizer(params: Iterable[nn.Parameter], name: str, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
