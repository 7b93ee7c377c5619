"""Standard ops onnx2torch lacks that a gradient must cross (converters/extra_ops.py): between two weights each
imports, matches onnxruntime, and passes the gradient to the weight before it (before, the graph was split there
and the weight after it passed through untrained, or, for GridSample 20, the model did not import)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_admm.check import check
from onnx_admm.converters.importer import import_model

_INTO_DOMAIN = {  # nodes that bring h into the op's domain (Acosh: >= 1, Atanh: inside (-1, 1)), as b
    "Acosh": [helper.make_node("Abs", ["h"], ["a"]), helper.make_node("Add", ["a", "one_and_a_half"], ["b"])],
    "Atanh": [helper.make_node("Tanh", ["h"], ["b"])],
}


def _between_two_weights(op: str, opset: int, **attrs) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 4)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "W2"),
             numpy_helper.from_array(np.array(1.5, np.float32), "one_and_a_half")]
    before = _INTO_DOMAIN.get(op, [])
    inputs = ["b" if before else "h"]
    if op == "CastLike":
        inputs.append("one_and_a_half")
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="first"), *before,
             helper.make_node(op, inputs, ["g"], name="op", **attrs),
             helper.make_node("MatMul", ["g", "W2"], ["y"], name="second")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _assert_trains_through(model: onnx.ModelProto, tmp_path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    report = check(path)
    assert report.passed, report.format()
    assert report.steps[2].detail.startswith("gradients reach all")
    imported = import_model(model)
    assert [w.onnx_name for w in imported.weights if w.compressible] == ["W1", "W2"]
    assert imported.passed_through == [] and imported.not_converted == []


@pytest.mark.parametrize(("op", "attrs"), [
    ("LpNormalization", {}), ("LpNormalization", {"p": 1, "axis": 0}), ("Sinh", {}), ("Cosh", {}), ("Asinh", {}),
    ("Acosh", {}), ("Atanh", {}), ("Shrink", {"bias": 0.2, "lambd": 0.3}),
    ("Shrink", {}), ("ThresholdedRelu", {"alpha": 0.4}), ("ThresholdedRelu", {}), ("CastLike", {}),
])
def test_an_elementwise_op_between_two_weights_trains_both(tmp_path, op, attrs):
    _assert_trains_through(_between_two_weights(op, 17, **attrs), tmp_path)


def _grid_model(opset: int, **attrs) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(2, 1, 3, 3)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.normal(size=(18, 3)).astype(np.float32), "W2")]
    nodes = [helper.make_node("Conv", ["x", "W1"], ["h"], pads=[1, 1, 1, 1], name="first"),
             helper.make_node("GridSample", ["h", "grid"], ["s"], name="sample", **attrs),
             helper.make_node("Flatten", ["s"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "W2"], ["y"], name="second")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 5, 5]),
                                           helper.make_tensor_value_info("grid", TensorProto.FLOAT, ["N", 3, 3, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize(("opset", "attrs"), [
    (16, {}), (16, {"mode": "nearest", "padding_mode": "border"}),
    (16, {"mode": "bicubic", "padding_mode": "reflection", "align_corners": 1}),
    (20, {}), (20, {"mode": "cubic", "padding_mode": "border"}), (20, {"mode": "nearest", "align_corners": 1}),
])
def test_grid_sample_of_opsets_16_and_20_trains_the_weights_on_both_sides(tmp_path, opset, attrs):
    _assert_trains_through(_grid_model(opset, **attrs), tmp_path)


def _conv_model(op: str, features: int, inputs: list[str] | None = None, **attrs) -> onnx.ModelProto:
    """Conv (4 filters, 6 x 6) -> op -> Flatten -> MatMul to 3 outputs."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.normal(size=(features, 3)).astype(np.float32), "W2"),
             numpy_helper.from_array(np.array([[[[0]], [[2]]]] * 2, np.int64).reshape(2, 2, 1, 1), "idx")]
    nodes = [helper.make_node("Conv", ["x", "W1"], ["h"], pads=[1, 1, 1, 1], name="first"),
             helper.make_node(op, inputs or ["h"], ["s"], name="op", **attrs),
             helper.make_node("Flatten", ["s"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "W2"], ["y"], name="second")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 1, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("op", "features", "inputs", "attrs"), [
    ("SpaceToDepth", 144, None, {"blocksize": 2}), ("SpaceToDepth", 144, None, {"blocksize": 3}),
    ("MeanVarianceNormalization", 144, None, {}), ("MeanVarianceNormalization", 144, None, {"axes": [1, 2, 3]}),
    ("GlobalLpPool", 4, None, {}), ("GlobalLpPool", 4, None, {"p": 1}),
    # h [2, 4, 6, 6]: idx [2, 2, 1, 1] picks channels 0 and 2 of row 0 / col 0 to take the values of updates h[:2].
    ("ScatterElements", 144, ["h", "idx", "u"], {"axis": 1}),
    ("ScatterElements", 144, ["h", "idx", "u"], {"axis": 1, "reduction": "add"}),
    ("ScatterElements", 144, ["h", "idx", "u"], {"axis": 1, "reduction": "max"}),
])
def test_a_four_d_op_between_a_conv_and_a_matmul_trains_both(tmp_path, op, features, inputs, attrs):
    model = _conv_model(op, features, inputs, **attrs)
    if op == "ScatterElements":  # updates: a slice of the conv's output, so the gradient reaches W1 both ways
        model.graph.node.insert(1, helper.make_node("Slice", ["h", "s0", "s1", "s2"], ["u"], name="slice"))
        model.graph.initializer.extend([numpy_helper.from_array(np.array([0, 0, 0, 0], np.int64), "s0"),
                                        numpy_helper.from_array(np.array([2, 2, 1, 1], np.int64), "s1"),
                                        numpy_helper.from_array(np.array([0, 1, 2, 3], np.int64), "s2")])
        model.opset_import[0].version = 18 if attrs.get("reduction") == "max" else 17
    _assert_trains_through(model, tmp_path)
