"""scikit-learn pipelines with preprocessing, exported by skl2onnx: ai.onnx.ml Scaler (StandardScaler) and
Imputer (SimpleImputer) ahead of an MLP (converters/ml_ops.py).

Before, every trainable tensor depended on the Scaler or Imputer node, and the whole model failed to import.
Now both convert, check's torch-vs-onnxruntime step passes (NaN inputs included), compress prunes the MLP to the exact count,
and data whose NaN marks the values the graph imputes is accepted as such (infinities are still refused).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from onnx_admm.check import check
from onnx_admm.cli import main
from onnx_admm.projections import keep_count

pytest.importorskip("skl2onnx")

WEIGHTS = 64 * 32 + 32 * 10  # the MLP's two coefficient matrices (the pruned weights)


def _pipeline(tmp_path: Path, imputer: bool) -> tuple[Path, Path, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.impute import SimpleImputer
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from skl2onnx import to_onnx

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    if imputer:  # a tenth of the values missing
        x[np.random.default_rng(0).random(x.shape) < 0.1] = np.nan
    steps = [SimpleImputer()] if imputer else [StandardScaler()]
    pipe = make_pipeline(*steps, MLPClassifier(hidden_layer_sizes=(32,), max_iter=60, random_state=0))
    with warnings.catch_warnings():  # sklearn's ConvergenceWarning at 60 iterations
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipe.fit(x[:1200], y[:1200])
    model = to_onnx(pipe, x[:1], options={"zipmap": False}, target_opset={"": 17, "ai.onnx.ml": 3})
    path = tmp_path / "pipe.onnx"
    path.write_bytes(model.SerializeToString())
    data = tmp_path / "train.npz"
    np.savez(data, X=x[:1200], labels=y[:1200].astype(np.int64))
    return path, data, x[1200:]


@pytest.mark.parametrize("imputer", [False, True], ids=["scaler", "imputer"])
def test_a_preprocessing_pipeline_imports_checks_and_prunes_to_the_exact_count(tmp_path, imputer):
    path, data, held_out = _pipeline(tmp_path, imputer)
    assert [n.op_type for n in onnx.load(str(path)).graph.node][0] == ("Imputer" if imputer else "Scaler")
    # Held-out inputs (NaN among them for the imputer): torch and onnxruntime agree within check's tolerance.
    report = check(path, {"X": held_out[:64]})
    assert report.passed and report.steps[1].name == "torch vs onnxruntime", report.format()
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["compress", str(path), "-o", str(out), "--data", str(data), "--sparsity", "0.5",
                                       "--epochs", "1", "--threads", "1", "--quiet", "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    written = onnx.load(str(out))
    coefficients = [onnx.numpy_helper.to_array(t) for t in written.graph.initializer if t.name.startswith("coefficient")]
    assert sum(c.size for c in coefficients) == WEIGHTS
    assert sum(int(np.count_nonzero(c)) for c in coefficients) == keep_count(WEIGHTS, 0.5)
    original = onnx.load(str(path))
    assert written.graph.input == original.graph.input and written.graph.output == original.graph.output
    # The written file runs in onnxruntime on held-out inputs, NaN included for the imputer, to finite scores.
    probabilities = ort.InferenceSession(str(out)).run(["probabilities"], {"X": held_out})[0]
    assert np.isfinite(probabilities).all() and np.allclose(probabilities.sum(1), 1, atol=1e-5)
    if imputer:
        assert np.isnan(held_out).any()


def test_infinite_values_are_refused_even_where_nan_is_imputed(tmp_path):
    path, data, _ = _pipeline(tmp_path, imputer=True)
    arrays = dict(np.load(data))
    arrays["X"][0, 0] = np.inf
    bad = tmp_path / "inf.npz"
    np.savez(bad, **arrays)
    result = CliRunner().invoke(main, ["compress", str(path), "-o", str(tmp_path / "out.onnx"), "--data", str(bad),
                                       "--sparsity", "0.5", "--epochs", "1", "--quiet"])
    assert result.exit_code == 1 and not (tmp_path / "out.onnx").exists()
    assert result.output.strip().splitlines()[-1] == (
        f"Error: {bad}: input 'X' holds 1 infinite value(s), on which no loss or metric can be measured (compress, "
        "validate, check and analyze alike): clean or drop those samples")


def test_nan_is_still_refused_where_the_graph_does_not_impute_it(tmp_path):
    path, data, _ = _pipeline(tmp_path, imputer=False)
    arrays = dict(np.load(data))
    arrays["X"][:2, 3] = np.nan
    bad = tmp_path / "nan.npz"
    np.savez(bad, **arrays)
    result = CliRunner().invoke(main, ["compress", str(path), "-o", str(tmp_path / "out.onnx"), "--data", str(bad),
                                       "--sparsity", "0.5", "--epochs", "1", "--quiet"])
    assert result.exit_code == 1
    assert f"{bad}: input 'X' holds 2 NaN or infinite value(s)" in result.output


@pytest.mark.parametrize("front", ["scaler_one_value", "imputer_int64", "normalizer_MAX", "normalizer_L1",
                                   "normalizer_L2", "binarizer"])
def test_the_other_attribute_forms_match_onnxruntime(tmp_path, front):
    # A Scaler with one offset and one scale for every feature, an Imputer of int64 inputs (its -1 entries take
    # the value 7), the Normalizer's three norms and a Binarizer: torch and onnxruntime agree, and onnxruntime
    # computes what the formulas say.
    from onnx import TensorProto, helper

    w = helper.make_tensor("W", TensorProto.FLOAT, [4, 3], np.linspace(-1, 1, 12).astype(np.float32))
    if front == "scaler_one_value":
        first = helper.make_node("Scaler", ["x"], ["f"], domain="ai.onnx.ml", offset=[0.5], scale=[2.0])
        dtype, x = TensorProto.FLOAT, np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
        nodes = [first, helper.make_node("MatMul", ["f", "W"], ["y"])]
    elif front != "imputer_int64":  # rows with negative entries, as onnxruntime computes them (MAX: the signed max)
        kind, _, norm = front.partition("_")
        attrs = {"norm": norm} if norm else {"threshold": 0.25}
        first = helper.make_node(kind.capitalize(), ["x"], ["f"], domain="ai.onnx.ml", **attrs)
        dtype, x = TensorProto.FLOAT, np.array([[-3, 1, 2, 0.5], [0.5, -0.25, 0.25, 1]], dtype=np.float32)
        nodes = [first, helper.make_node("MatMul", ["f", "W"], ["y"])]
    else:
        first = helper.make_node("Imputer", ["x"], ["i"], domain="ai.onnx.ml", imputed_value_int64s=[7],
                                 replaced_value_int64=-1)
        dtype, x = TensorProto.INT64, np.array([[1, -1, 3, 4], [-1, -1, 0, 2]], dtype=np.int64)
        nodes = [first, helper.make_node("Cast", ["i"], ["f"], to=TensorProto.FLOAT),
                 helper.make_node("MatMul", ["f", "W"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", dtype, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    report = check(path, {"x": x})
    assert report.passed and report.steps[1].name == "torch vs onnxruntime", report.format()
    got = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    features = {"scaler_one_value": lambda: (x - 0.5) * 2.0,
                "imputer_int64": lambda: np.where(x == -1, 7, x).astype(np.float32),
                "normalizer_MAX": lambda: x / x.max(1, keepdims=True),
                "normalizer_L1": lambda: x / np.abs(x).sum(1, keepdims=True),
                "normalizer_L2": lambda: x / np.sqrt((x * x).sum(1, keepdims=True)),
                "binarizer": lambda: (x > 0.25).astype(np.float32)}[front]()
    np.testing.assert_allclose(got, features @ onnx.numpy_helper.to_array(w), rtol=1e-5, atol=1e-5)
