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
