"""Tests for onnx_admm.train: the loss (labels, distillation, MSE), the epoch loop and its hooks, evaluation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onnx_admm.train import (Batch, EmptyEpoch, Loss, NonFiniteLoss, Precision, ScoreSpec, Standing, balance_weights,
                              evaluate, log_probs, make_optimizer, standing, train_epoch)


def _logits(seed=0, n=8, c=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g), torch.randint(0, c, (n,), generator=g)


def test_labels_give_cross_entropy_on_logits():
    logits, labels = _logits()
    extra = torch.randn(8, 3)  # a second output before the score output is ignored
    loss = Loss(ScoreSpec(1, "logits"))((extra, logits), labels, None)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)


def test_labels_on_probabilities_give_nll_of_log_p():
    logits, labels = _logits(1)
    probs = torch.softmax(logits, dim=-1)
    loss = Loss(ScoreSpec(0, "probabilities"))((probs,), labels, None)
    expected = -torch.log(probs[torch.arange(8), labels]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # Not cross-entropy applied to the probabilities as if they were logits.
    assert loss.item() != pytest.approx(F.cross_entropy(probs, labels).item(), rel=1e-3)


def test_labels_on_log_probabilities():
    logits, labels = _logits(2)
    logp = F.log_softmax(logits, dim=-1)
    loss = Loss(ScoreSpec(0, "log_probabilities"))((logp,), labels, None)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)


def test_probability_of_zero_stays_finite():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = Loss(ScoreSpec(0, "probabilities"))((probs,), torch.tensor([1, 1]), None)
    assert math.isfinite(loss.item()) and loss.item() > 10  # log clamped at 1e-12, not -inf
    assert torch.isfinite(log_probs(probs, "probabilities")).all()


@pytest.mark.parametrize("kind", ["logits", "probabilities", "log_probabilities"])
def test_distillation_kl_is_zero_for_identical_student_and_positive_otherwise(kind):
    logits, _ = _logits(3)
    as_kind = {"logits": logits, "probabilities": torch.softmax(logits, -1),
               "log_probabilities": F.log_softmax(logits, -1)}[kind]
    loss = Loss(ScoreSpec(0, kind))
    assert loss((as_kind,), None, (as_kind.clone(),)).item() == pytest.approx(0.0, abs=1e-6)
    other, _ = _logits(4)
    other_kind = {"logits": other, "probabilities": torch.softmax(other, -1),
                  "log_probabilities": F.log_softmax(other, -1)}[kind]
    value = loss((other_kind,), None, (as_kind,)).item()
    expected = F.kl_div(F.log_softmax(other, -1), F.log_softmax(logits, -1), log_target=True,
                        reduction="batchmean").item()
    assert value == pytest.approx(expected, rel=1e-4) and value > 0.1


def test_distillation_temperature_on_logits():
    logits, _ = _logits(5)
    student, _ = _logits(6)
    t = 4.0
    value = Loss(ScoreSpec(0, "logits"), temperature=t)((student,), None, (logits,)).item()
    expected = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(logits / t, -1), log_target=True,
                        reduction="batchmean").item() * t**2
    assert value == pytest.approx(expected, rel=1e-5)


def test_labels_win_over_teacher():
    logits, labels = _logits(7)
    loss = Loss(ScoreSpec(0))((logits,), labels, (logits,))
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)


def test_no_score_output_gives_mse_over_float_outputs():
    # Each float output's MSE over the teacher's variance: an output's scale does not set the step size.
    a, b = torch.randn(4, 3), torch.randn(4, 7)
    ta, tb = torch.randn(4, 3), 300 * torch.randn(4, 7)
    ints = torch.arange(4)
    loss = Loss(ScoreSpec(None))((a, ints, b), None, (ta, ints + 1, tb))
    expected = (F.mse_loss(a, ta) / (ta.var(unbiased=False) + 1e-6) + F.mse_loss(b, tb) / (tb.var(unbiased=False) + 1e-6))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    scaled = Loss(ScoreSpec(None))((a, ints, 300 * b), None, (ta, ints + 1, 300 * tb))
    assert scaled.item() == pytest.approx(loss.item(), rel=1e-5)  # the same in any unit
    assert Loss(ScoreSpec(None))((a, b), torch.zeros(4, dtype=torch.long), (a, b)).item() == 0.0  # labels unused


def test_errors_without_teacher_or_float_outputs():
    logits, _ = _logits()
    with pytest.raises(ValueError, match="teacher"):
        Loss(ScoreSpec(0))((logits,), None, None)
    with pytest.raises(ValueError, match="float output"):
        Loss(ScoreSpec(None))((torch.arange(3),), None, (torch.arange(3),))


class _Linear(nn.Module):
    """Returns a tuple, as OnnxModule does."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return (self.fc(x),)


def _batches(n_batches=3, seed=0, labels=True):
    g = torch.Generator().manual_seed(seed)
    return [Batch((torch.randn(5, 4, generator=g),), torch.randint(0, 3, (5,), generator=g) if labels else None)
            for _ in range(n_batches)]


def test_train_epoch_runs_hooks_in_order_and_reports_stats():
    torch.manual_seed(0)
    model = _Linear()
    optimizer = make_optimizer(model.parameters(), "sgd", 0.1, 0.9, 0.0)
    calls = []
    stats = train_epoch(model, _batches(), Loss(ScoreSpec(0)), optimizer,
                        after_backward=[lambda: calls.append(("backward", model.fc.weight.grad is not None))],
                        after_step=[lambda: calls.append(("step", None))],
                        on_batch=lambda i, loss, acc: calls.append(("batch", i)))
    assert calls == [event for i in range(3) for event in (("backward", True), ("step", None), ("batch", i))]
    assert stats.samples == 15 and 0.0 <= stats.accuracy <= 1.0 and stats.loss > 0


def test_train_epoch_without_labels_reports_agreement_with_teacher():
    torch.manual_seed(0)
    model = _Linear()
    teacher = _Linear()
    teacher.load_state_dict(model.state_dict())
    optimizer = make_optimizer(model.parameters(), "adam", 1e-9, 0.0, 0.0)
    stats = train_epoch(model, _batches(labels=False), Loss(ScoreSpec(0)), optimizer, teacher=teacher)
    assert stats.accuracy == 1.0 and stats.loss == pytest.approx(0.0, abs=1e-6)


class _Counting(_Linear):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


@pytest.mark.parametrize("labels,index,teacher_runs", [(True, 0, False), (False, 0, True), (True, None, True)])
def test_teacher_runs_only_when_the_loss_uses_it(labels, index, teacher_runs):
    model, teacher = _Linear(), _Counting()
    optimizer = make_optimizer(model.parameters(), "sgd", 0.1, 0.0, 0.0)
    train_epoch(model, _batches(3, labels=labels), Loss(ScoreSpec(index)), optimizer, teacher=teacher)
    assert teacher.calls == (3 if teacher_runs else 0)


class _NaNAt:
    """A loss that is NaN on call ``k`` (0-based) and cross-entropy otherwise."""

    def __init__(self, k):
        self.k, self.calls, self.score = k, 0, ScoreSpec(0)

    def __call__(self, outputs, labels, teacher):
        loss = F.cross_entropy(outputs[0], labels)
        self.calls += 1
        return loss * float("nan") if self.calls - 1 == self.k else loss


@pytest.mark.parametrize("k", [0, 2])
def test_train_epoch_raises_on_nan_before_stepping(k):
    torch.manual_seed(0)
    model = _Linear()
    optimizer = make_optimizer(model.parameters(), "sgd", 0.1, 0.9, 0.0)
    steps, seen = [], []
    batches = _batches(4)
    # Weights right before the NaN batch: what the parameters must still hold when it raises.
    reference = _Linear()
    reference.load_state_dict(model.state_dict())
    ref_opt = make_optimizer(reference.parameters(), "sgd", 0.1, 0.9, 0.0)
    if k:
        train_epoch(reference, batches[:k], Loss(ScoreSpec(0)), ref_opt)
    with pytest.raises(NonFiniteLoss, match=f"nan at batch {k}"):
        train_epoch(model, batches, _NaNAt(k), optimizer,
                    after_step=[lambda: steps.append(1)], on_batch=lambda i, loss, acc: seen.append(i))
    assert len(steps) == k and seen == list(range(k))
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q) and torch.isfinite(p).all()


def test_train_epoch_raises_on_infinite_loss():
    model = _Linear()
    optimizer = make_optimizer(model.parameters(), "sgd", 0.1, 0.0, 0.0)

    def inf_loss(outputs, labels, teacher):
        return outputs[0].sum() * float("inf")

    inf_loss.score = ScoreSpec(0)
    with pytest.raises(NonFiniteLoss, match="inf"):
        train_epoch(model, _batches(), inf_loss, optimizer)


def test_train_epoch_on_no_batches_raises():
    model = _Linear()
    with pytest.raises(EmptyEpoch, match="empty"):
        train_epoch(model, [], Loss(ScoreSpec(0)), make_optimizer(model.parameters(), "sgd", 0.1, 0.0, 0.0))


def test_evaluate_accuracy_agreement_and_no_score():
    torch.manual_seed(0)
    model = _Linear()
    batches = _batches(3)
    predicted = torch.cat([model(b.inputs[0])[0].argmax(-1) for b in batches])
    labels = torch.cat([b.labels for b in batches])
    assert evaluate(model, batches, ScoreSpec(0)) == pytest.approx(float((predicted == labels).float().mean()))
    unlabeled = _batches(3, labels=False)
    assert evaluate(model, unlabeled, ScoreSpec(0), teacher=model) == 1.0
    assert evaluate(model, batches, ScoreSpec(None)) is None


def test_standing_is_the_metric_and_the_mean_training_loss_and_the_loss_settles_ties():
    torch.manual_seed(0)
    model, teacher = _Linear(), _Linear()
    spec, loss = ScoreSpec(0), Loss(ScoreSpec(0))
    labelled, unlabelled = _batches(3), _batches(3, labels=False)
    with torch.no_grad():
        for batches, reference in ((labelled, None), (unlabelled, teacher)):
            result = standing(model, batches, spec, reference, loss)
            expected = sum(float(loss(model(*b.inputs), b.labels, reference(*b.inputs) if reference else None))
                           * b.inputs[0].shape[0] for b in batches) / sum(b.inputs[0].shape[0] for b in batches)
            assert result.metric == evaluate(model, batches, spec, reference)
            assert result.loss == pytest.approx(expected, rel=1e-6)
    assert standing(model, labelled, spec) == Standing(evaluate(model, labelled, spec), None)
    # The metric first; on a tie the lower loss; without a metric, or a loss on a tie, level.
    assert Standing(0.9, 5.0).compare(Standing(0.8, 0.1)) == 1
    assert Standing(0.8, 0.2).compare(Standing(0.8, 0.1)) == -1
    assert Standing(0.8, 0.1).compare(Standing(0.8, 0.2)) == 1
    assert Standing(None, 0.1).compare(Standing(None, 0.2)) == 0
    assert Standing(0.8, None).compare(Standing(0.8, 0.2)) == 0
    assert Standing(0.8, 0.2).compare(Standing(0.8, 0.2)) == 0


def test_make_optimizer_skips_frozen_params():
    model = _Linear()
    model.fc.bias.requires_grad_(False)
    sgd = make_optimizer(model.parameters(), "sgd", 0.1, 0.9, 1e-4)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["params"] == [model.fc.weight]
    assert sgd.param_groups[0]["momentum"] == 0.9 and sgd.param_groups[0]["weight_decay"] == 1e-4
    assert isinstance(make_optimizer(model.parameters(), "adam", 0.1, 0.9, 0.0), torch.optim.Adam)


def test_distillation_with_labels_mixes_cross_entropy_and_kl():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 4), torch.randn(6, 4)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    spec = ScoreSpec(0, "logits")
    ce = F.cross_entropy(student, labels)
    kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
    mixed = Loss(spec, distill=0.25)((student,), labels, (teacher,))
    assert torch.allclose(mixed, 0.75 * ce + 0.25 * kl)
    assert torch.allclose(Loss(spec)((student,), labels, (teacher,)), ce)  # distill 0: the teacher is ignored


# -- balance: per-position distillation weighted against the teacher's majority class


def _ctc_like(blank_share=0.9, t=20, n=10, c=6, seed=0):
    """[T, N, C] teacher and student log-probabilities; the teacher predicts blank (0) at ``blank_share``
    of the positions and class 1 + (position % (c - 1)) elsewhere."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, n, c, generator=g)
    rare = torch.randperm(t * n, generator=g)[: round((1 - blank_share) * t * n)]
    top = torch.zeros(t * n, dtype=torch.long)
    top[rare] = 1 + torch.arange(len(rare)) % (c - 1)
    logits.view(-1, c)[torch.arange(t * n), top] += 8.0
    student = F.log_softmax(logits + torch.randn(t, n, c, generator=g), -1)
    return F.log_softmax(logits, -1), student, top.view(t, n)


@pytest.mark.parametrize("balance", [0.25, 0.5, 1.0])
def test_balance_gives_the_minority_classes_their_stated_share(balance):
    teacher, _, top = _ctc_like()
    weights = balance_weights(top, balance)
    assert weights.mean().item() == pytest.approx(1.0, rel=1e-6)
    k = len(top.unique())
    share = (weights[top != 0].sum() / weights.sum()).item()
    # Every predicted class gets balance / K of the weight on top of (1 - balance) x its own share.
    assert share == pytest.approx(balance * (k - 1) / k + (1 - balance) * 0.1, rel=1e-5)
    assert share >= balance * (k - 1) / k


def test_balance_zero_is_the_plain_mean_exactly():
    teacher, student, _ = _ctc_like()
    plain = F.kl_div(student, teacher, log_target=True, reduction="sum") / (teacher.numel() // teacher.shape[-1])
    assert torch.equal(Loss(ScoreSpec(0, "log_probabilities"), balance=0.0)((student,), None, (teacher,)), plain)
    maps = torch.sigmoid(torch.randn(4, 50, 1) * 3)
    other = torch.sigmoid(torch.randn(4, 50, 1) * 3)
    t_logit, s_logit = torch.logit(maps.clamp(1e-7, 1 - 1e-7)), torch.logit(other.clamp(1e-7, 1 - 1e-7))
    target = torch.sigmoid(t_logit)
    old = (F.binary_cross_entropy_with_logits(s_logit, target)
           - F.binary_cross_entropy_with_logits(t_logit, target))
    assert torch.equal(Loss(ScoreSpec(0, "binary_probabilities"), balance=0.0)((other,), None, (maps,)), old)


def test_balance_weights_the_kl_per_position_and_leaves_per_sample_scores_alone():
    teacher, student, top = _ctc_like()
    spec = ScoreSpec(0, "log_probabilities")
    per_position = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)
    expected = (per_position * balance_weights(top, 0.5)).mean()
    assert Loss(spec, balance=0.5)((student,), None, (teacher,)).item() == pytest.approx(expected.item(), rel=1e-6)
    # A student wrong only where the teacher predicts a rare class costs more with balance.
    wrong = teacher.clone()
    wrong[top != 0] = teacher[top == 0][: int((top != 0).sum())]
    assert Loss(spec, balance=0.5)((wrong,), None, (teacher,)) > 2 * Loss(spec, balance=0.0)((wrong,), None, (teacher,))
    logits, _ = _logits(8)
    other, _ = _logits(9)
    per_sample = ScoreSpec(0, "logits")
    assert torch.equal(Loss(per_sample, balance=1.0)((other,), None, (logits,)),
                       Loss(per_sample, balance=0.0)((other,), None, (logits,)))


def test_balance_on_a_binary_map_weighs_the_teachers_sides_of_one_half():
    g = torch.Generator().manual_seed(1)
    positive = torch.rand(8, 100, 1, generator=g) < 0.1
    teacher = torch.where(positive, 0.9, 0.05)
    student = torch.full_like(teacher, 0.05)  # predicts background everywhere
    spec = ScoreSpec(0, "binary_probabilities")
    weights = balance_weights(positive, 0.5)
    share = (weights[positive].sum() / weights.sum()).item()
    assert share == pytest.approx(0.5 / 2 + 0.5 * positive.float().mean().item(), rel=1e-5)
    assert Loss(spec, balance=0.5)((student,), None, (teacher,)) > 2 * Loss(spec, balance=0.0)((student,), None, (teacher,))
    assert Loss(spec, balance=0.5)((teacher.clone(),), None, (teacher,)).item() == pytest.approx(0.0, abs=1e-6)


def test_balance_takes_the_other_outputs_mse_ratio_through_log1p():
    g = torch.Generator().manual_seed(2)
    maps = torch.sigmoid(torch.randn(4, 64, 1, generator=g) * 3)
    boxes = torch.randn(4, 8, 3, generator=g)
    off = boxes + 2 * torch.randn(4, 8, 3, generator=g)  # a second head far from the teacher
    spec = ScoreSpec(0, "binary_probabilities")
    ratio = F.mse_loss(off, boxes) / boxes.var(unbiased=False)
    assert Loss(spec, balance=0.0)((maps, off), None, (maps, boxes)).item() == pytest.approx(ratio.item(), rel=1e-4)
    assert Loss(spec, balance=0.5)((maps, off), None, (maps, boxes)).item() == pytest.approx(
        math.log1p(ratio.item()), rel=1e-4)
    per_sample = torch.randn(4, 5, generator=g)  # an [N, C] score keeps the plain ratio
    assert Loss(ScoreSpec(0), balance=0.5)((per_sample, off), None, (per_sample, boxes)).item() == pytest.approx(
        ratio.item(), rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lower_precision_runs_the_forward_in_that_dtype_and_keeps_float32_state(dtype):
    torch.manual_seed(0)
    model, teacher = _Linear(), _Linear()
    seen = []
    model.fc.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    teacher.fc.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    optimizer = make_optimizer(model.parameters(), "sgd", 0.1, 0.9, 0.0)
    before = model.fc.weight.detach().clone()
    stats = train_epoch(model, _batches(labels=False), Loss(ScoreSpec(0)), optimizer, teacher=teacher,
                        precision=Precision(dtype, "cpu"))
    assert seen == [dtype] * 6  # the student's and the teacher's pass of each of the 3 batches
    assert model.fc.weight.dtype == torch.float32 and not torch.equal(model.fc.weight.detach(), before)
    assert math.isfinite(stats.loss) and stats.loss > 0


def test_float16_hooks_see_unscaled_gradients():
    # The loss scaler multiplies the loss by 65536: the ADMM penalty and the masks must act on the true
    # gradient, so it is unscaled before the hooks. Same batch, same weights: the gradients agree.
    grads = {}
    for name, precision in (("fp32", Precision()), ("fp16", Precision(torch.float16, "cpu"))):
        torch.manual_seed(0)
        model = _Linear()
        optimizer = make_optimizer(model.parameters(), "sgd", 0.1, 0.0, 0.0)
        train_epoch(model, _batches(1), Loss(ScoreSpec(0)), optimizer, precision=precision,
                    after_backward=[lambda m=model, n=name: grads.setdefault(n, m.fc.weight.grad.clone())])
    assert torch.allclose(grads["fp16"], grads["fp32"], rtol=0.02, atol=1e-3)
