"""Nodes without a torch converter that need no gradient run in onnxruntime inside the imported module
(converters/ort_nodes.py): a torch audio model's STFT, a scikit-learn ColumnTransformer's ArrayFeatureExtractor
and OneHotEncoder, a Size after a weight. Before, each of these models failed to import.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from onnx_admm.check import check
from onnx_admm.cli import main
from onnx_admm.converters.importer import import_model
from onnx_admm.converters.normalize import normalize
from onnx_admm.converters.ort_nodes import ORT_DOMAIN, OrtNode
from onnx_admm.inspection import inspect_model
from onnx_admm.projections import keep_count


class _Spectrogram(nn.Module):
    """torch.stft's log power (33 bins) -> Conv1d -> mean over time -> Linear: 1,648 compressible weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv1d(33, 16, 3), nn.Linear(16, 4)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(wave, n_fft=64, hop_length=32, window=torch.hann_window(64), return_complex=False)
        power = (spec ** 2).sum(-1).add(1e-6).log()
        return self.fc(torch.relu(self.conv(power)).mean(-1))


def _export_spectrogram(path: Path, dynamo: bool) -> None:
    torch.manual_seed(0)
    model, wave = _Spectrogram().eval(), torch.randn(2, 1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (wave,), str(path), dynamo=True, input_names=["wave"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("N")},), verbose=False)
        else:
            torch.onnx.export(model, (wave,), str(path), dynamo=False, opset_version=17, input_names=["wave"],
                              output_names=["logits"], dynamic_axes={"wave": {0: "N"}})


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_a_spectrogram_front_end_imports_checks_and_prunes_to_the_exact_count(tmp_path, dynamo):
    path = tmp_path / "audio.onnx"
    _export_spectrogram(path, dynamo)
    original = onnx.load(str(path))
    assert "STFT" in {n.op_type for n in original.graph.node}
    rng = np.random.default_rng(0)
    report = check(path, {"wave": rng.standard_normal((8, 1024)).astype(np.float32)})
    assert report.passed, report.format()
    imported = import_model(original)
    assert [type(m) for m in imported.module.modules() if isinstance(m, OrtNode)] == [OrtNode]
    stft = next(n for n in original.graph.node if n.op_type == "STFT")
    opset = next(o.version for o in original.opset_import if o.domain in ("", "ai.onnx"))  # the node runs at it
    assert inspect_model(path)["onnxruntime_nodes"] == [f"node {stft.name!r}: STFT (opset {opset})"]
    data, out = tmp_path / "wave.npz", tmp_path / "out.onnx"
    np.savez(data, wave=rng.standard_normal((96, 1024)).astype(np.float32))
    result = CliRunner().invoke(main, ["compress", str(path), "-o", str(out), "--data", str(data), "--sparsity", "0.5",
                                       "--epochs", "1", "--threads", "1", "--quiet",
                                       "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["onnxruntime_nodes"] == [
        f"node {stft.name!r}: STFT (opset {opset})"]
    written = onnx.load(str(out))
    assert written.graph.input == original.graph.input and written.graph.output == original.graph.output
    assert [n.op_type for n in written.graph.node] == [n.op_type for n in original.graph.node]
    weights = [w.onnx_name for w in imported.weights if w.compressible]
    values = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    total = sum(values[name].size for name in weights)
    assert total == 16 * 33 * 3 + 4 * 16
    assert sum(int(np.count_nonzero(values[name])) for name in weights) == keep_count(total, 0.5)
    logits = ort.InferenceSession(str(out)).run(None, {"wave": rng.standard_normal((3, 1024)).astype(np.float32)})[0]
    assert logits.shape == (3, 4) and np.isfinite(logits).all()


def _column_transformer(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Four numeric columns scaled and two integer-coded categories one-hot encoded, then an MLP (skl2onnx:
    ArrayFeatureExtractor, Scaler, OneHotEncoder, Concat ahead of the network)."""
    pytest.importorskip("skl2onnx")
    from sklearn.compose import ColumnTransformer
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler
    from skl2onnx import to_onnx

    rng = np.random.default_rng(0)
    numeric, categories = rng.normal(size=(1000, 4)), rng.integers(0, 5, size=(1000, 2))
    x = np.concatenate([numeric, categories], 1).astype(np.float32)
    y = (numeric[:, 0] + 1.5 * (categories[:, 0] == 2) - (categories[:, 1] == 4) > 0.3).astype(np.int64)
    columns = ColumnTransformer([("num", StandardScaler(), [0, 1, 2, 3]),
                                 ("cat", OneHotEncoder(handle_unknown="ignore"), [4, 5])])
    pipe = make_pipeline(columns, MLPClassifier(hidden_layer_sizes=(32,), max_iter=100, random_state=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipe.fit(x[:800], y[:800])
    model = to_onnx(pipe, x[:1], options={"zipmap": False}, target_opset={"": 17, "ai.onnx.ml": 3})
    path, train, test = tmp_path / "tabular.onnx", tmp_path / "train.npz", tmp_path / "test.npz"
    path.write_bytes(model.SerializeToString())
    np.savez(train, X=x[:800], labels=y[:800])
    np.savez(test, X=x[800:], labels=y[800:])
    return path, train, test


def test_a_column_transformer_pipeline_imports_checks_and_prunes_to_the_exact_count(tmp_path):
    path, train, test = _column_transformer(tmp_path)
    original = onnx.load(str(path))
    assert {"ArrayFeatureExtractor", "OneHotEncoder"} <= {n.op_type for n in original.graph.node}
    held_out = dict(np.load(test))["X"]
    report = check(path, {"X": held_out[:64]})
    assert report.passed, report.format()
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["compress", str(path), "-o", str(out), "--data", str(train), "--val-data",
                                       str(test), "--sparsity", "0.5", "--epochs", "2", "--threads", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    written = onnx.load(str(out))
    assert written.graph.input == original.graph.input and written.graph.output == original.graph.output
    coefficients = [numpy_helper.to_array(t) for t in written.graph.initializer if t.name.startswith("coefficient")]
    total = 14 * 32 + 32 * 1  # 4 scaled + 2 x 5 one-hot columns -> 32 -> one logit (two classes)
    assert sum(c.size for c in coefficients) == total
    assert sum(int(np.count_nonzero(c)) for c in coefficients) == keep_count(total, 0.5)
    probabilities = ort.InferenceSession(str(out)).run(["probabilities"], {"X": held_out})[0]
    assert np.allclose(probabilities.sum(1), 1, atol=1e-5)


def _matmul_model(after: list[onnx.NodeProto], output: str) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.linspace(-1, 1, 12).astype(np.float32).reshape(4, 3), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), *after], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_size_after_a_weight_runs_in_onnxruntime_and_the_weight_trains(tmp_path):
    # Size depends on the shape only: no gradient passes through it, wherever it is.
    model = _matmul_model([helper.make_node("Size", ["h"], ["n"], name="size"),
                           helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT, name="cast"),
                           helper.make_node("Div", ["h", "nf"], ["y"], name="div")], "y")
    assert [n.domain for n in normalize(model).graph.node if n.name == "size"] == [ORT_DOMAIN]
    path = tmp_path / "size.onnx"
    onnx.save(model, str(path))
    report = check(path, {"x": np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)})
    assert report.passed, report.format()
    imported = import_model(model)
    x = torch.randn(5, 4)
    (y,) = imported.module(x)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x.numpy()})[0]
    assert torch.allclose(y, torch.from_numpy(expected), atol=1e-6)
    y.sum().backward()
    assert [w.onnx_name for w in imported.weights] == ["W"]
    assert imported.module.get_parameter(imported.weights[0].param).grad.abs().sum() > 0


def test_a_node_a_gradient_must_cross_stays_in_the_graph_for_the_import_to_name():
    # Shrink (no converter) between two weights: training the first weight needs its gradient, so it does not
    # run in onnxruntime; the import treats it as before (an unconverted node).
    model = _matmul_model([helper.make_node("Shrink", ["h"], ["s"], name="shrink", lambd=0.1)], "s")
    assert [(n.op_type, n.domain) for n in normalize(model).graph.node if n.name == "shrink"] == [("Shrink", "")]


def test_the_module_copies_and_runs_again_after_its_session_was_built(tmp_path):
    path = tmp_path / "audio.onnx"
    _export_spectrogram(path, dynamo=False)
    module = import_model(onnx.load(str(path))).module
    wave = torch.randn(2, 1024)
    (first,) = module(wave)
    twin = copy.deepcopy(module)  # the teacher of a label-free run is such a copy
    [node] = [m for m in twin.modules() if isinstance(m, OrtNode)]
    assert node._sessions == {}  # an onnxruntime session does not copy: the twin builds its own
    (again,) = twin(wave)
    assert torch.equal(again, first) and len(node._sessions) == 1


def test_a_string_input_is_refused_with_the_same_fix_by_the_import_and_by_the_data(tmp_path):
    # torch holds no strings: a OneHotEncoder of string categories cannot run inside the module, and string data
    # cannot be fed to it. Both say how to export the model instead (integer codes).
    pytest.importorskip("skl2onnx")
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder
    from skl2onnx import to_onnx

    rng = np.random.default_rng(0)
    x = rng.choice(["x", "y", "z"], (200, 2))
    y = ((x[:, 0] == "y") | (x[:, 1] == "z")).astype(np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = make_pipeline(OneHotEncoder(), MLPClassifier(hidden_layer_sizes=(8,), max_iter=20, random_state=0))
        pipe.fit(x, y)
    path, data, out = tmp_path / "strings.onnx", tmp_path / "train.npz", tmp_path / "out.onnx"
    path.write_bytes(to_onnx(pipe, x[:1], options={"zipmap": False}).SerializeToString())
    np.savez(data, X=x, labels=y)
    fix = ("torch holds no strings; encode the strings as integer codes before the model and export it with integer "
           "inputs (scikit-learn: an OrdinalEncoder fitted outside the pipeline, and Int64TensorType inputs for "
           "skl2onnx)")
    report = check(path)
    assert not report.passed
    assert report.steps[0].detail == f"cannot import the model: input 'X' is a string tensor, and {fix}"
    result = CliRunner().invoke(main, ["compress", str(path), "-o", str(out), "--data", str(data), "--sparsity", "0.5",
                                       "--epochs", "1", "--quiet"])
    assert result.exit_code == 1 and not out.exists()
    last = result.output.strip().splitlines()[-1]
    assert last == f"Error: {data}: input 'X' is a string tensor of the graph, and {fix}"


def test_filter_pruning_reaches_a_layer_after_a_scaler_whose_shape_inference_stops(tmp_path):
    # onnx has no shape function for ai.onnx.ml Scaler: the hidden layer's output rank was unknown and filter
    # pruning refused it. The walk now measures the dims it lacks in onnxruntime (converters/groups.py).
    path, train, test = _column_transformer(tmp_path)
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["compress", str(path), "-o", str(out), "--data", str(train), "--val-data",
                                       str(test), "--structure", "filter", "--sparsity", "0.5", "--epochs", "1",
                                       "--threads", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    written = onnx.load(str(out))
    dims = {t.name: list(t.dims) for t in written.graph.initializer if t.name.startswith(("coefficient", "intercepts"))}
    assert dims == {"coefficient": [14, 16], "intercepts": [1, 16], "coefficient1": [16, 1], "intercepts1": [1, 1]}
    x = dict(np.load(test))["X"]
    probabilities = ort.InferenceSession(str(out)).run(["probabilities"], {"X": x})[0]
    assert probabilities.shape == (len(x), 2) and np.allclose(probabilities.sum(1), 1, atol=1e-5)


def test_a_value_the_node_refuses_in_onnxruntime_is_the_users_error_named_by_node(tmp_path):
    # A OneHotEncoder that refuses unknown categories (zeros = 0), fed a category it does not know while training:
    # one line naming the node and the fix, exit 1, nothing written.
    from onnx.parser import parse_model

    model = parse_model("""
        <ir_version: 8, opset_import: ["" : 17, "ai.onnx.ml" : 1]>
        g (int64[N, 1] x) => (float[N, 2] y) <float[3, 2] W = {1, 0, 0, 1, 1, 1}> {
            h = ai.onnx.ml.OneHotEncoder <cats_int64s = [0, 1, 2], zeros = 0> (x)
            f = Reshape (h, shape)
            y = MatMul (f, W)
        }
    """)
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1, 3], np.int64), "shape"))
    path, data, out = tmp_path / "onehot.onnx", tmp_path / "x.npz", tmp_path / "out.onnx"
    onnx.save(model, str(path))
    x = np.random.default_rng(0).integers(0, 3, (32, 1))
    x[5, 0] = 7
    np.savez(data, x=x)
    result = CliRunner().invoke(main, ["compress", str(path), "-o", str(out), "--data", str(data), "--sparsity", "0.5",
                                       "--epochs", "1", "--quiet"])
    assert result.exit_code == 1 and not out.exists()
    assert result.output.strip().splitlines()[-1] == (
        "Error: node 'OneHotEncoder_0_unnamed' (OneHotEncoder, run in onnxruntime) failed on the data: FAIL : Non-zero "
        "status code returned while running OneHotEncoder node. Name:'OneHotEncoder_0_unnamed' Status Message: Unknown "
        "Category and "
        "zeros = 0.; give inputs the model accepts (a category it knows, a token id in range)")
