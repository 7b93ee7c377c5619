"""Task metrics (onnx_admm.metrics): CTC sequence match and error rate, positive-set F1 for maps, top-1
agreement for classifiers; and the failure modes they exist for: a CTC reader that predicts the blank
everywhere and a map that marks nothing both score high on per-position agreement and ~0 here, in
``validate`` (onnxruntime) and in the training loop's ``evaluate`` alike."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnx_admm.api import AccuracyGateFailed, compress
from onnx_admm.cli import _summary, main
from onnx_admm.data import Dataset
from onnx_admm.metrics import OutputFit, PositiveSet, SequenceMatch, Top1, edit_distance, for_score
from onnx_admm.recipe import CompressConfig
from onnx_admm.train import Batch, ScoreSpec, evaluate
from onnx_admm.tables import format_table
from onnx_admm.validate import validate


def _levenshtein(a: list[int], b: list[int]) -> int:
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return d[-1][-1]


def test_edit_distance_equals_the_textbook_recurrence():
    rng = np.random.default_rng(0)
    for _ in range(500):
        a, b = (rng.integers(0, 3, size=rng.integers(0, 8)) for _ in range(2))
        assert edit_distance(a, b) == _levenshtein(list(a), list(b))


@pytest.mark.parametrize("kind, shape, expected", [
    ("logits", (8, 10), Top1), ("binary_probabilities", (8, 1), Top1), ("binary_probabilities", (8,), Top1),
    ("log_probabilities", (25, 8, 11), SequenceMatch), ("logits", (8, 25, 11), SequenceMatch),
    ("binary_probabilities", (8, 1, 16, 16), PositiveSet), ("binary_logits", (8, 30, 3), PositiveSet),
    ("binary_probabilities", (8, 5), PositiveSet), ("logits", (8, 4, 16, 16), PositiveSet)])
def test_the_metric_follows_the_score_kind_and_shape(kind, shape, expected):
    assert type(for_score(kind, shape)) is expected


def _captchas(n: int = 40, steps: int = 20, seed: int = 0) -> np.ndarray:
    """[N, T] CTC-style greedy paths: mostly blank (0), 3-5 characters (1..9) of 1-2 steps each."""
    rng = np.random.default_rng(seed)
    paths = np.zeros((n, steps), np.int64)
    for path in paths:
        for start in rng.choice(np.arange(0, steps - 2, 4), size=rng.integers(3, 6), replace=False):
            path[start:start + rng.integers(1, 3)] = rng.integers(1, 10)
    return paths


def test_an_all_blank_reader_agrees_per_step_and_reads_nothing():
    reference = _captchas()
    metric = for_score("log_probabilities", (reference.shape[1], reference.shape[0], 10))
    metric.add(reference.T, np.zeros_like(reference.T), batch=reference.shape[0])  # seq-first [T, N]
    summary = metric.summary()
    assert summary["agreement"] > 0.6  # what per-step agreement used to report
    assert summary["metric"] == "sequence match" and summary["value"] == 0.0
    assert summary["error_rate"] == 1.0 and summary["blank"] == 0 and summary["batch_axis"] == 1


def test_sequence_match_counts_decoded_sequences_not_steps():
    reference = np.array([[0, 3, 0, 0, 5, 0, 0, 0],   # "35"
                          [0, 3, 3, 0, 5, 0, 0, 0],   # "35"
                          [2, 0, 4, 0, 0, 0, 0, 0],   # "24"
                          [0, 0, 0, 7, 0, 0, 0, 0]])  # "7"
    candidate = np.array([[0, 3, 3, 0, 0, 5, 0, 0],   # "35": doubled and shifted, the same reading
                          [0, 3, 0, 3, 5, 0, 0, 0],   # "335": one insertion
                          [2, 0, 6, 0, 0, 0, 0, 0],   # "26": one substitution
                          [0, 0, 0, 7, 0, 0, 0, 0]])
    metric = SequenceMatch()
    metric.add(reference, candidate, batch=4)
    assert metric.blank == 0 and metric.batch_axis == 0
    assert metric.value == 0.5 and metric.summary()["error_rate"] == pytest.approx(2 / 7)
    assert metric.agreement == pytest.approx(26 / 32)


def test_a_given_blank_overrides_the_majority_and_a_tagger_keeps_per_step_agreement():
    reference = np.tile(np.arange(6), (4, 2))  # [4, 12]: no class covers half the steps
    candidate = reference.copy()
    candidate[0, 0] = 5
    tagger = SequenceMatch()
    tagger.add(reference, candidate, batch=4)
    assert tagger.blank is None and tagger.name == "top-1 agreement"
    assert tagger.value == pytest.approx(47 / 48) and tagger.sequence_match == pytest.approx(0.75)
    ctc = SequenceMatch(blank=5)
    ctc.add(reference, candidate, batch=4)
    # Decoded without the 5s, the first row gains nothing: its first step became the blank.
    assert ctc.name == "sequence match" and ctc.sequence_match == pytest.approx(0.75)
    assert ctc.summary()["blank_from"] == "given"


def test_an_empty_map_agrees_per_pixel_and_scores_f1_zero():
    rng = np.random.default_rng(1)
    reference = rng.random((8, 1, 32, 32)) < 0.09  # 9% positives, as the reported detector
    metric = for_score("binary_probabilities", reference.shape)
    metric.add(reference, np.zeros_like(reference), batch=8)
    summary = metric.summary()
    assert summary["agreement"] > 0.89 and summary["value"] == 0.0 and summary["recall"] == 0.0
    assert summary["positive_fraction"] == pytest.approx(reference.mean())


def test_positive_set_f1_precision_recall_and_iou_are_exact():
    reference = np.array([[1, 1, 1, 1, 0, 0, 0, 0, 0, 0]], bool)
    candidate = np.array([[1, 1, 1, 0, 1, 1, 0, 0, 0, 0]], bool)  # tp 3, fp 2, fn 1
    metric = PositiveSet(binary=True)
    metric.add(reference, candidate, batch=1)
    s = metric.summary()
    assert (s["value"], s["precision"], s["recall"], s["iou"]) == pytest.approx((6 / 9, 3 / 5, 3 / 4, 3 / 6))
    nothing = PositiveSet(binary=True)
    nothing.add(np.zeros((2, 5), bool), np.zeros((2, 5), bool), batch=2)
    assert nothing.value == 1.0  # nothing to find and nothing found


def test_a_categorical_map_needs_the_right_class_and_ignores_the_background():
    reference = np.zeros((1, 4, 4), np.int64)
    reference[0, 0, :2] = 2
    reference[0, 1, :2] = 3
    candidate = reference.copy()
    candidate[0, 1, 0] = 2  # wrong class: a false positive and a miss
    candidate[0, 3, 3] = 1  # a positive where the original sees background
    metric = PositiveSet(binary=False)
    metric.add(reference, candidate, batch=1)
    assert metric.background == 0 and (metric.tp, metric.fp, metric.fn) == (3, 2, 1)


def _ctc_model(scale: float) -> onnx.ModelProto:
    """x [N, T, 4] -> MatMul -> + bias -> Transpose -> LogSoftmax: [T, N, 5] log-probabilities with class 0
    (the blank) favoured by its bias; ``scale`` 0 leaves only the bias: the blank at every step."""
    rng = np.random.default_rng(3)
    w = (rng.normal(size=(4, 5)) * 0.5 * scale).astype(np.float32)
    bias = np.array([2.5, 0, 0, 0, 0], np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["z"]),
         helper.make_node("Transpose", ["z"], ["t"], perm=[1, 0, 2]),
         helper.make_node("LogSoftmax", ["t"], ["logp"], axis=2)],
        "ctc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12, 4])],
        [helper.make_tensor_value_info("logp", TensorProto.FLOAT, [12, "N", 5])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(bias, "B")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_validate_reports_sequence_match_first_for_a_destroyed_ctc_reader(tmp_path):
    onnx.save(_ctc_model(1.0), str(tmp_path / "a.onnx"))
    onnx.save(_ctc_model(0.0), str(tmp_path / "b.onnx"))
    x = np.random.default_rng(4).normal(size=(96, 12, 4)).astype(np.float32)
    report = validate(tmp_path / "a.onnx", tmp_path / "b.onnx", Dataset({"x": x}, None, {"x"}), batch_size=32,
                      latency_batches=0)
    task = report.task
    assert report.agreement > 0.6  # the blank is the original's choice at most steps
    assert task["metric"] == "sequence match" and task["blank"] == 0 and task["batch_axis"] == 1
    # Only the samples the original reads as empty still match.
    session = ort.InferenceSession(str(tmp_path / "a.onnx"), providers=["CPUExecutionProvider"])
    empty = np.mean((session.run(None, {"x": x})[0].argmax(-1) == 0).all(axis=0))
    assert 0 < empty < 0.1 and task["value"] == pytest.approx(empty) and task["error_rate"] == 1.0
    assert format_table(report).splitlines()[1].startswith(
        f"task metric: sequence match with the original on 'logp': {100 * empty:.2f}% (character error rate "
        "100.00%, blank 0;")
    itself = validate(tmp_path / "a.onnx", tmp_path / "a.onnx", Dataset({"x": x}, None, {"x"}), batch_size=32,
                      latency_batches=0)
    assert itself.task["value"] == 1.0 and itself.task["error_rate"] == 0.0


def test_an_original_that_reads_nothing_is_named(tmp_path):
    # A reader that gives every step the blank matches any other reader of nothing: sequence match 1.0 says
    # nothing then (a paddle2onnx CRNN exported before it had learnt to read scored 1.000 at 30% filters).
    onnx.save(_ctc_model(0.0), str(tmp_path / "blank.onnx"))
    onnx.save(_ctc_model(1.0), str(tmp_path / "reads.onnx"))
    x = np.random.default_rng(4).normal(size=(96, 12, 4)).astype(np.float32)
    data = Dataset({"x": x}, None, {"x"})
    report = validate(tmp_path / "blank.onnx", tmp_path / "blank.onnx", data, batch_size=32, latency_batches=0)
    assert report.task["value"] == 1.0 and report.task["reference_symbols"] == 0
    assert report.empty_reads() == (
        "the original reads nothing on the 96 held-out samples (every time step is the blank, class 0), so sequence "
        "match says nothing about the compressed model; give data the original reads (layout, scaling, channel "
        "order), or name the blank with [train] blank if it is another class")
    reads = validate(tmp_path / "reads.onnx", tmp_path / "reads.onnx", data, batch_size=32, latency_batches=0)
    assert reads.task["reference_symbols"] > 0 and reads.empty_reads() is None
    # `validate` says it too, and writes it in its JSON report.
    np.savez(tmp_path / "x.npz", x=x)
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "blank.onnx"), str(tmp_path / "blank.onnx"),
                                       "--data", str(tmp_path / "x.npz"), "--report", str(tmp_path / "v.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "v.json").read_text())["warnings"] == [report.empty_reads()]


def test_evaluate_without_labels_returns_the_task_metric():
    reference = torch.from_numpy(_captchas(n=16)).T  # [T, N] class ids
    scores = torch.nn.functional.one_hot(reference, 10).float() * 5  # [T, N, C]
    blank = torch.zeros_like(scores)
    blank[..., 0] = 5
    batch = Batch((torch.zeros(16, 3),))
    spec = ScoreSpec(0, "logits")
    assert evaluate(lambda *_: (blank,), [batch], spec, teacher=lambda *_: (scores,)) == 0.0
    assert evaluate(lambda *_: (scores,), [batch], spec, teacher=lambda *_: (scores,)) == 1.0


def test_a_label_free_run_that_destroys_a_ctc_reader_fails_the_floor(tmp_path):
    # 95% of a 4x5 head pruned without training: the reader predicts the blank almost everywhere.
    x = np.random.default_rng(5).normal(size=(320, 12, 4)).astype(np.float32)
    config = CompressConfig.from_dict({"train": {"threads": 1, "batch_size": 32},
                                       "admm": {"epochs": 0, "retrain_epochs": 0}, "prune": {"sparsity": 0.95}})
    with pytest.raises(AccuracyGateFailed) as info:
        compress(_ctc_model(1.0), Dataset({"x": x}, None, {"x"}), config, output=tmp_path / "out.onnx")
    report = info.value.result.report
    task = report["metrics"]["task"]
    assert task["metric"] == "sequence match" and task["value"] < 0.5
    assert report["gate"]["metric"] == "sequence match" and report["gate"]["retained"] == task["value"]
    assert str(info.value).startswith(f"task metric under the floor: sequence match is {100 * task['value']:.2f}% "
                                      "of the original's, under the floor of 50%")
    assert report["accuracy_drop"] == pytest.approx(1 - task["value"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gate-failed.onnx"]
    # The summary's held-out line gives the task's figure, not the per-step agreement the blanks keep high.
    held = [line for line in _summary(report).splitlines() if line.startswith("held-out")]
    assert held == [f"held-out (no labels): sequence match {100 * task['value']:.2f}%"]
    assert report["metrics"]["agreement"] > 0.5


def test_validate_command_exits_3_when_the_task_metric_is_under_the_floor(tmp_path):
    onnx.save(_ctc_model(1.0), str(tmp_path / "a.onnx"))
    onnx.save(_ctc_model(0.0), str(tmp_path / "b.onnx"))
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(4).normal(size=(96, 12, 4)).astype(np.float32))
    args = ["validate", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "--data", str(tmp_path / "x.npz")]
    result = CliRunner().invoke(main, [*args, "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 3, result.output
    gate = json.loads((tmp_path / "r.json").read_text())["gate"]
    assert gate["metric"] == "sequence match" and gate["retained"] < 0.1 and gate["passed"] is False
    assert result.stderr.strip().startswith("task metric under the floor: sequence match is ")
    assert result.stdout.splitlines()[1].startswith("task metric: sequence match with the original on 'logp'")
    assert CliRunner().invoke(main, [*args, "--metric-floor", "0"]).exit_code == 0
    assert CliRunner().invoke(main, [*args[:2], args[1], *args[3:]]).exit_code == 0  # the original against itself


def test_output_fit_is_r2_about_each_positions_mean_and_the_lowest_output():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(40, 3)) + np.array([100.0, -5.0, 0.0])  # offsets: R^2 is about each position's mean
    noisy = ref + 0.1 * rng.normal(size=ref.shape)
    fit = OutputFit()
    for part in (slice(0, 25), slice(25, 40)):  # two batches
        fit.add("same", ref[part], ref[part], batch=ref[part].shape[0])
        fit.add("mean", ref[part], np.broadcast_to(ref.mean(0), ref[part].shape), batch=ref[part].shape[0])
        fit.add("noisy", ref[part].T, noisy[part].T, batch=ref[part].shape[0])  # samples on axis 1
    expected = 1 - np.square(noisy - ref).sum() / np.square(ref - ref.mean(0)).sum()
    assert fit.per_output() == pytest.approx({"same": 1.0, "mean": 0.0, "noisy": expected}, abs=1e-12)
    assert fit.value == pytest.approx(0.0, abs=1e-12)
    summary = fit.summary()
    assert summary["metric"] == "output R^2" and summary["agreement"] is None


def test_output_fit_leaves_out_constant_and_uneven_outputs():
    fit = OutputFit()
    fit.add("constant", np.full((8, 2), 3.0), np.zeros((8, 2)), batch=8)
    fit.add("uneven", np.arange(8.0).reshape(8, 1), np.arange(8.0).reshape(8, 1), batch=8)
    fit.add("uneven", np.arange(10.0).reshape(5, 2), np.arange(10.0).reshape(5, 2), batch=5)
    assert fit.per_output() == {} and fit.value is None


def test_output_fit_of_a_non_finite_candidate_fails_any_floor():
    from onnx_admm.gate import Gate

    fit = OutputFit()
    ref = np.arange(12.0).reshape(6, 2)
    fit.add("y", ref, np.where(ref > 4, np.nan, ref), batch=6)
    assert fit.value == -np.inf
    entry, reason = Gate(floor=0.5).judge(None, (fit.name, fit.value))
    assert entry["passed"] is False and reason.startswith("task metric under the floor: output R^2 is -inf%")
    _, reason = Gate(floor=0.5).judge(None, ("output R^2", float("nan")))
    assert reason is not None
