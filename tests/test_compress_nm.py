"""N:M semi-structured sparsity end to end: every run of M weights along the input axis of the written
ONNX weights holds at most N nonzeros, onnxruntime agrees with the trained torch model, the report says
the pattern and which runtimes can use it, and layers that cannot take it are left alone with a reason.

The runs are counted here by hand in the ONNX layout: a Conv weight [out, in, kh, kw] along ``in`` at
each (out, kh, kw); a Gemm weight with transB = 1 ([N, K]) along axis 1; a MatMul weight or a Gemm B
with transB = 0 ([K, N]) along axis 0.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
from click.testing import CliRunner
from onnx import numpy_helper

from onnx_admm.converters.dequantize import decoded_view
from onnx_admm.converters.graphinfo import constant_sources, tensor_value
from onnx_admm.converters.inputs import synthesize_inputs
from onnx_admm.converters.modelio import load_model
from models import _floats
from onnx_admm.api import compress
from onnx_admm.check import within_tolerance
from onnx_admm.cli import main
from onnx_admm.data import Dataset
from onnx_admm.recipe import CompressConfig


def _max_per_run(value: np.ndarray, axis: int, m: int) -> int:
    runs = np.moveaxis(value, axis, -1)
    runs = runs.reshape(*runs.shape[:-1], runs.shape[-1] // m, m)
    return int((runs != 0).sum(axis=-1).max())


def _weights(path) -> dict[str, np.ndarray]:
    """Every constant a runtime sees, decoders evaluated."""
    view, _ = decoded_view(load_model(path))
    return {name: tensor_value(view, source) for name, source in constant_sources(view).items()}


def _ort(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_digits_2_4_pattern_in_the_file_and_onnxruntime_agrees(digits_sample, tmp_path):
    config = CompressConfig.from_dict({"train": {"threads": 1}, "admm": {"epochs": 1, "retrain_epochs": 1},
                                       "prune": {"structure": "2:4"}})
    result = compress(digits_sample.model, str(digits_sample.train), config, val_data=str(digits_sample.test))
    out = tmp_path / "nm.onnx"
    result.save(out)
    weights = _weights(out)
    for name in ("2.weight", "5.weight", "7.weight"):  # Conv [32, 16, 3, 3], Gemm transB=1 [64, 512], [10, 64]
        assert _max_per_run(weights[name], 1, 4) <= 2, name
        assert np.count_nonzero(weights[name]) <= weights[name].size // 2
    # conv 0 has one input channel: no run of 4, so it is left alone (untouched, byte for byte)
    original = load_model(digits_sample.model)
    assert np.array_equal(weights["0.weight"], tensor_value(original, constant_sources(original)["0.weight"]))
    report = result.report
    assert "runs of 4; it holds 1" in report["left_alone"]["0.weight"]
    nm = report["nm"]
    assert [(layer["name"], layer["pattern"], layer["axis"], layer["holds"]) for layer in nm["layers"]] == [
        ("2.weight", "2:4", 1, True), ("5.weight", "2:4", 1, True), ("7.weight", "2:4", 1, True)]
    assert nm["runtimes"]["2:4"][0].startswith("TensorRT 8+ on NVIDIA Ampere or later GPUs")
    assert "onnxruntime" in nm["runtimes"]["2:4"][1] and "no speed-up" in nm["runtimes"]["2:4"][1]
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert all(layers[n]["sparsity"] == 0.5 and layers[n]["encoding"] == "dense" for n in ("2.weight", "5.weight"))
    # onnxruntime on the file computes what the trained torch model computes
    x = np.load(digits_sample.test)["input"][:32]
    ok, diff = within_tolerance(result.imported.run({"input": x}), _ort(out, {"input": x}))
    assert ok, diff
    assert report["metrics"]["compressed_accuracy"] > 0.8


def test_cli_4_8_with_int8_keeps_the_pattern_in_the_integers(digits_sample, tmp_path):
    out, report_path = tmp_path / "nm48.onnx", tmp_path / "nm48.json"
    result = CliRunner().invoke(main, ["compress", str(digits_sample.model), "--data", str(digits_sample.train),
                                       "-o", str(out), "--report", str(report_path), "--threads", "1",
                                       "--admm-epochs", "1", "--retrain-epochs", "1",
                                       "--structure", "4:8", "--bits", "8"])
    assert result.exit_code == 0, result.output
    assert "4:8 sparsity on 3 weight(s); runtimes: none known: 4:8 does not imply 2:4" in result.output
    model = onnx.load(str(out))
    inits = {t.name: t for t in model.graph.initializer}
    for name in ("2.weight", "5.weight", "7.weight"):
        q = inits[f"{name}_quantized"]
        assert q.data_type == onnx.TensorProto.INT8
        assert _max_per_run(numpy_helper.to_array(q), 1, 8) <= 4, name
    assert not model.graph.sparse_initializer  # the pattern stays in the dense integers
    report = json.loads(report_path.read_text())
    assert set(report["nm"]["runtimes"]) == {"4:8"}
    assert {layer["encoding"] for layer in report["layers"] if layer["name"] != "0.weight"} == {"int8"}


def test_matmul_and_gemm_b_run_along_k_without_labels(tmp_path):
    # MatMul weight [K=8, N=16] and Gemm B [K=16, N=4] with transB = 0: the runs go down each column.
    model = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 8] input) => (float[N, 4] logits)
        <float[8, 16] w1 = """ + _floats((8, 16), 1) + ", float[16] b1 = " + _floats((16,), 2)
        + ", float[16, 4] w2 = " + _floats((16, 4), 3) + """>
        { h = MatMul (input, w1)
          a = Add (h, b1)
          r = Relu (a)
          logits = Gemm (r, w2) }""")
    path = tmp_path / "mlp.onnx"
    onnx.save(model, str(path))
    feeds = synthesize_inputs(model, batch=96, seed=0)
    config = CompressConfig.from_dict({"train": {"threads": 1, "batch_size": 32},
                                       "admm": {"epochs": 1, "retrain_epochs": 1}, "prune": {"structure": "2:4"}})
    result = compress(path, Dataset(feeds, None, set(feeds)), config)
    out = tmp_path / "mlp.nm.onnx"
    result.save(out)
    weights = _weights(out)
    for name in ("w1", "w2"):
        assert _max_per_run(weights[name], 0, 4) <= 2, name
        assert np.count_nonzero(weights[name]) == weights[name].size // 2
    assert [(layer["name"], layer["axis"]) for layer in result.report["nm"]["layers"]] == [("w1", 0), ("w2", 0)]
    x = synthesize_inputs(model, batch=5, seed=1)
    ok, diff = within_tolerance(result.imported.run(x), _ort(out, x))
    assert ok, diff


def test_nm_consumer_of_removed_filters_is_left_alone(digits_sample):
    # 0.weight loses filters, so 2.weight loses input channels: its runs of 4 would shift.
    config = CompressConfig.from_dict({"train": {"threads": 1}, "admm": {"epochs": 0, "retrain_epochs": 1},
                                       "prune": {"structure": "2:4"},
                                       "rules": [{"match": "0.weight", "structure": "filter", "sparsity": 0.5}]})
    result = compress(digits_sample.model, str(digits_sample.train), config, val_data=str(digits_sample.test))
    assert "leave the graph with the filters of '0.weight'" in result.report["left_alone"]["2.weight"]
    assert [layer["name"] for layer in result.report["nm"]["layers"]] == ["5.weight", "7.weight"]
    assert result.report["structure"]["kept_channels"] == {"0.weight": 8}
