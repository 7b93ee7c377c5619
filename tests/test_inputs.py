"""Tests for converters.inputs: synthesized feeds follow the graph's declared inputs."""

import numpy as np
import onnx
import onnx.parser
import pytest

from onnx_admm.converters.errors import UserError
from onnx_admm.converters.inputs import synthesize_inputs


def _model(inputs: str, body: str = "") -> onnx.ModelProto:
    return onnx.parser.parse_model(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        agraph ({inputs}) => (float y) {{
            {body or "y = Constant <value = float {1.0}> ()"}
        }}
        """
    )


def test_shapes_dtypes_and_dynamic_dims():
    model = _model("float[N, 3, H, 4] x, int64[B, T] ids, bool[5] flag, double[2, 2] d")
    feeds = synthesize_inputs(model, batch=6, seed=0)
    assert feeds["x"].shape == (6, 3, 8, 4) and feeds["x"].dtype == np.float32
    assert feeds["ids"].shape == (6, 8) and feeds["ids"].dtype == np.int64
    assert feeds["ids"].min() >= 0 and feeds["ids"].max() < 10
    assert feeds["flag"].shape == (5,) and feeds["flag"].dtype == np.bool_
    assert feeds["d"].shape == (2, 2) and feeds["d"].dtype == np.float64


def test_unknown_leading_dim_is_batch():
    model = _model("float[N, 4] x")
    model.graph.input[0].type.tensor_type.shape.dim[0].Clear()  # neither value nor name
    model.graph.input[0].type.tensor_type.shape.dim[1].Clear()
    assert synthesize_inputs(model, batch=3)["x"].shape == (3, 8)


def test_seeded_and_initializers_skipped():
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        agraph (float[N, 2] x, float[2, 2] w) => (float[N, 2] y) <float[2, 2] w = {1, 0, 0, 1}> {
            y = MatMul(x, w)
        }
        """
    )
    first, again, other = (synthesize_inputs(model, seed=s) for s in (1, 1, 2))
    assert list(first) == ["x"]
    np.testing.assert_array_equal(first["x"], again["x"])
    assert not np.array_equal(first["x"], other["x"])


def test_no_shape_asks_for_data():
    model = _model("float[N] x")
    model.graph.input[0].type.tensor_type.ClearField("shape")
    with pytest.raises(UserError, match=r"graph input 'x' declares no shape.*pass real inputs with --data"):
        synthesize_inputs(model)


def test_string_input_asks_for_data():
    model = _model("string[N] s")
    with pytest.raises(UserError, match=r"'s' \[N\] has dtype object.*--data"):
        synthesize_inputs(model)
