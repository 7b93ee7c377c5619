"""A detector whose one output joins decoded boxes and Sigmoid class probabilities (YOLOv8's export): the
probabilities inside are its score, so a label-free run is measured by their positive set and a run that
destroys the detector fails the metric floor instead of passing unmeasured (samples/corpus/yolo.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from onnx_admm.cli import main
from onnx_admm.converters.graphinfo import constant_sources, tensor_value
from onnx_admm.metrics import PositiveSet

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "samples" / "corpus"))

import yolo  # noqa: E402


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("yolo")
    np.savez(folder / "train.npz", **yolo.feeds(256, 1))
    return yolo.build(folder / "yolo_like.onnx", steps=150), folder / "train.npz"


def _compress(detector, out: Path, *args: str):
    model, data = detector
    return CliRunner().invoke(main, ["compress", str(model), "--data", str(data), "-o", str(out), "--threads", "1",
                                     "--report", str(out.with_suffix(".json")), "-q", *args])


def _probabilities(path: Path, images: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": images})[0][:, 4:]


def test_a_label_free_run_keeps_the_detections_and_reports_their_f1(detector, tmp_path):
    out = tmp_path / "c.onnx"
    result = _compress(detector, out, "--sparsity", "0.5", "--admm-epochs", "1", "--retrain-epochs", "1")
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".json").read_text())
    task = report["validation"]["task"]
    assert task["metric"] == "positive-set F1" and task["value"] >= 0.9, task
    assert 0.01 < task["positive_fraction"] < 0.1  # the minority the metric is about
    assert report["validation"]["score"]["feeds"] == "output0"
    # The boxes beside the probabilities: the whole output's R^2 against the original's (reported, not gated).
    (output,) = report["validation"]["outputs"]
    assert output["name"] == "output0" and output["r2"] >= 0.95, output
    original = onnx.load(str(detector[0]))
    written = onnx.load(str(out))
    assert [o.SerializeToString() for o in written.graph.output] == [o.SerializeToString() for o in original.graph.output]
    # Measured again in onnxruntime on 300 images the run never saw.
    images = yolo.feeds(300, 9)["images"]
    metric = PositiveSet(binary=True)
    metric.add(_probabilities(detector[0], images) > 0.5, _probabilities(out, images) > 0.5)
    assert metric.value >= 0.9, metric.details()


def test_a_destroyed_detector_fails_the_metric_floor(detector, tmp_path):
    # 98% of the weights gone, no training, no refit: it finds nothing. Before its probabilities were its
    # score the run exited 0 with a warning that nothing measured the task.
    out = tmp_path / "d.onnx"
    result = _compress(detector, out, "--sparsity", "0.98", "--admm-epochs", "0", "--retrain-epochs", "0",
                       "--no-reconstruct")
    assert result.exit_code == 3, result.output
    assert result.stderr.startswith("task metric under the floor: positive-set F1 is ")
    assert not out.exists() and (tmp_path / "d.gate-failed.onnx").is_file()
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["gate"]["retained"] < 0.5 and report["gate"]["passed"] is False


def test_data_on_which_the_original_finds_nothing_is_reported(detector, tmp_path):
    # Noise without objects: the original marks no positive, so F1 is 1 by definition; the report says so.
    noise = np.random.default_rng(3).normal(0, 0.1, (64, 1, yolo.SIDE, yolo.SIDE)).astype(np.float32)
    np.savez(tmp_path / "noise.npz", images=noise)
    out = tmp_path / "n.onnx"
    result = _compress((detector[0], tmp_path / "noise.npz"), out, "--sparsity", "0.5", "--admm-epochs", "0",
                       "--retrain-epochs", "0")
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["validation"]["task"]["positive_fraction"] == 0
    assert [w for w in report["warnings"] if w.startswith("the original marks no positive")] == [
        f"the original marks no positive on the {report['validation']['samples']} held-out samples (no probability "
        "above 0.5), so positive-set F1 says nothing about the compressed model; give data on which the original "
        "detects something, or labels"]


def _two_heads(path: Path, w2_scale: float) -> Path:
    """x [N, 5, 4] -> a Sigmoid map [N, 5, 6] (the score) and a detection head [N, 5, 3] that joins
    Sigmoid(x @ w2) to raw boxes (x @ w3); ``w2_scale`` 0 destroys the head's probabilities (all 0.5)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {"w1": rng.normal(size=(4, 6)), "w2": w2_scale * rng.normal(size=(4, 1)), "w3": rng.normal(size=(4, 2))}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m"]), helper.make_node("Sigmoid", ["m"], ["map"]),
             helper.make_node("MatMul", ["x", "w2"], ["d"]), helper.make_node("Sigmoid", ["d"], ["det_prob"]),
             helper.make_node("MatMul", ["x", "w3"], ["boxes"]),
             helper.make_node("Concat", ["det_prob", "boxes"], ["detections"], axis=2)]
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(nodes, "heads", [helper.make_tensor_value_info("x", f32, ["N", 5, 4])],
                              [helper.make_tensor_value_info("map", f32, ["N", 5, 6]),
                               helper.make_tensor_value_info("detections", f32, ["N", 5, 3])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_a_destroyed_second_head_fails_the_floor_though_the_score_is_intact(tmp_path):
    # The map is the score and stays as it was; the detection head's probabilities (a Sigmoid joined to its
    # boxes) are measured beside it, and the floor reads the lower of the two.
    from onnx_admm.converters.scores import find_score_output, other_probabilities
    from onnx_admm.gate import Gate
    from onnx_admm.validate import validate

    original, destroyed = _two_heads(tmp_path / "a.onnx", 1.0), _two_heads(tmp_path / "b.onnx", 0.0)
    model = onnx.load(str(original))
    score = find_score_output(model)
    assert score.name == "map"
    assert [(o.name, o.feeds) for o in other_probabilities(model, score)] == [("det_prob", "detections")]
    x = np.random.default_rng(1).normal(size=(64, 5, 4)).astype(np.float32)
    report = validate(original, destroyed, {"x": x}, latency_batches=0)
    assert report.task["value"] == 1.0 and report.task["others"] == {"det_prob": 0.0}
    assert report.retained == ("positive-set F1 of 'det_prob'", 0.0)
    _, reason = Gate().judge(report.drop, report.retained)
    assert reason.startswith("task metric under the floor: positive-set F1 of 'det_prob' is 0.00% of the original's")
    same = validate(original, original, {"x": x}, latency_batches=0)
    assert same.task["others"] == {"det_prob": 1.0} and same.retained == ("positive-set F1", 1.0)


def test_filter_pruning_through_c2f_blocks_shrinks_the_detector(tmp_path):
    # The detector with YOLOv8's C2f blocks (backbone with shortcuts, last level without): each C2f's cv1
    # loses whole pairs of filters (one per half of its Split), its Split pieces shrink alike, and the written
    # graph still runs at any batch with the original's outputs' shapes.
    # What is cut, not how well the cut model detects (yolo_c2f's sweep row measures that): little training.
    model = yolo.build(tmp_path / "yolo_c2f.onnx", steps=40, c2f=True)
    np.savez(tmp_path / "train.npz", **yolo.feeds(64, 1))
    out = tmp_path / "f.onnx"
    result = _compress((model, tmp_path / "train.npz"), out, "--sparsity", "0.5", "--structure", "filter",
                       "--admm-epochs", "1", "--retrain-epochs", "0")
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["validation"]["task"]["metric"] == "positive-set F1"
    original, written = onnx.load(str(model)), onnx.load(str(out))
    splits = [n for n in written.graph.node if n.op_type == "Split"]
    def constants(m: onnx.ModelProto) -> dict:
        return {name: tensor_value(m, source).tolist() for name, source in constant_sources(m).items()}

    sizes, before = constants(written), constants(original)
    pieces = [sizes[n.input[1]] for n in splits]
    assert len(pieces) == 3 and all(len(p) == 2 and p[0] == p[1] for p in pieces)
    assert sum(p[0] for p in pieces) < sum(before[n.input[1]][0] for n in original.graph.node if n.op_type == "Split")
    assert not {n for n in report.get("left_alone", {}) if "cls" not in n and "box" not in n}
    images = yolo.feeds(5, 9)["images"]
    assert _probabilities(out, images).shape == _probabilities(model, images).shape == (5, 2, 80)
