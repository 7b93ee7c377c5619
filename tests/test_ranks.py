"""converters.ranks: rank-dependent converters (BatchNormalization, pools) when shape inference gives no rank."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_admm.converters.errors import UserError
from onnx_admm.converters.importer import import_model
from onnx_admm.check import check

RNG = np.random.default_rng(0)


def _constant(name: str, value: np.ndarray) -> onnx.NodeProto:
    # paddle2onnx keeps every weight in a Constant node.
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value.astype(np.float32), name))


def _model(after_bn: list[onnx.NodeProto], output: str, out_shape) -> onnx.ModelProto:
    """x [?, ?, ?, ?] -> Conv -> Unsqueeze(computed axes) -> Squeeze() -> BatchNormalization -> ...

    The Squeeze without axes on unknown dims leaves the BatchNormalization input without a rank.
    """
    nodes = [
        _constant("w1", RNG.normal(size=(8, 3, 3, 3))), _constant("scale", RNG.random(8) + 0.5),
        _constant("shift", RNG.normal(size=8)), _constant("mean", RNG.normal(size=8) * 0.1),
        _constant("var", RNG.random(8) + 0.5), _constant("axf", np.array([2.0])),
        helper.make_node("Cast", ["axf"], ["axes"], to=TensorProto.INT64),
        helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Unsqueeze", ["h", "axes"], ["hu"], name="unsqueeze"),
        helper.make_node("Squeeze", ["hu"], ["hs"], name="squeeze"),
        helper.make_node("BatchNormalization", ["hs", "scale", "shift", "mean", "var"], ["hb"], name="bn"),
        *after_bn,
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["a", "b", "c", "d"])],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, out_shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    inferred = onnx.shape_inference.infer_shapes(model)
    assert not any(v.name == "hs" and v.type.tensor_type.HasField("shape") for v in inferred.graph.value_info)
    return model


def test_batchnorm_rank_comes_from_the_pool_after_it(tmp_path):
    model = _model([
        helper.make_node("Relu", ["hb"], ["hr"]),
        helper.make_node("MaxPool", ["hr"], ["hp"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        helper.make_node("Flatten", ["hp"], ["f"]),
        _constant("w2", RNG.normal(size=(5, 8 * 4 * 4))),
        helper.make_node("Gemm", ["f", "w2"], ["y"], transB=1, name="fc"),
    ], "y", ["n", 5])
    imported = import_model(model)
    assert {e.onnx_name for e in imported.compressible()} == {"w1", "w2"}
    assert {e.onnx_name for e in imported.weights} >= {"scale", "shift"}  # the BatchNorm trains
    path = tmp_path / "svtr_like.onnx"
    onnx.save(model, str(path))
    report = check(path, {"x": RNG.normal(size=(3, 3, 8, 8)).astype(np.float32)})
    assert report.passed, report.format()


def test_underivable_rank_names_the_node():
    # Nothing after the BatchNormalization has a rank either: the rank cannot be told without data.
    model = _model([helper.make_node("Squeeze", ["hb"], ["y"])], "y", ["n"])
    model.graph.output[0].type.tensor_type.ClearField("shape")  # a declared output rank would give it away
    with pytest.raises(UserError, match=r"cannot tell the rank of 'hs', the input of node 'bn' \(BatchNormalization\)"):
        import_model(model)


def test_a_dilated_causal_conv1d_as_tf2onnx_writes_it_imports_past_its_stashed_pad(tmp_path):
    # Keras Conv1D(dilation_rate=2, padding="causal") through tf2onnx: Pad (opset 11+, moved to the private domain
    # for import), Unsqueeze, Transpose, a dilated Conv2D, Squeeze, then GlobalAveragePool. Shape inference cannot
    # see through the stashed Pad: the pool's rank was unknown and the import stopped ("cannot tell the rank").
    # The stash now records the types it found, so inference carries on past it.
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array([0, 4, 0, 0, 0, 0], np.int64), "pads"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([2], np.int64), "two"),
             numpy_helper.from_array(rng.normal(size=(8, 8, 1, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), "dense")]
    n = helper.make_node
    nodes = [n("Pad", ["x", "pads"], ["padded"], name="pad"),
             n("Unsqueeze", ["padded", "one"], ["expanded"], name="expand"),
             n("Transpose", ["expanded"], ["nchw"], perm=[0, 3, 1, 2], name="nchw"),
             n("Conv", ["nchw", "w"], ["conv"], dilations=[1, 2], kernel_shape=[1, 3], name="conv"),
             n("Squeeze", ["conv", "two"], ["squeezed"], name="squeeze"),
             n("GlobalAveragePool", ["squeezed"], ["pooled"], name="pool"),
             n("Squeeze", ["pooled", "two"], ["features"], name="flat"),
             n("MatMul", ["features", "dense"], ["y"], name="dense")]
    graph = helper.make_graph(nodes, "tcn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 20, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    path = tmp_path / "tcn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    report = check(path)
    assert report.passed, report.format()
    assert [w.onnx_name for w in import_model(onnx.load(str(path))).weights] == ["w", "dense"]
