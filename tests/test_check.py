"""Tests for onnx_admm.check's perturbed write-back step: telling float32 amplification (the module's own
rounding at the perturbed weights, measured as torch float32 against float64) from a write-back fault.

The tolerance is set to zero here so that every nonzero torch-vs-onnxruntime difference must be explained
by rounding: kernels that sum in another order differ by rounding only, a corrupted tensor by far more.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_admm.check as check_module
from onnx_admm.converters.writeback import write_back
from onnx_admm.check import check


def _layernorm_model(path, shift: float = 300.0):
    """x[N, 8] -> MatMul -> + 300 -> LayerNorm as tf2onnx writes it (ReduceMean/Sub/Pow/Sqrt/Div, eps
    1e-12) -> MatMul: the mean subtraction cancels most digits, so float32 rounding is amplified."""
    rng = np.random.default_rng(0)
    arrays = {"W1": rng.normal(0, 0.3, (8, 64)), "c": np.full(64, shift), "two": np.array(2.0),
              "eps": np.array(1e-12), "W2": rng.normal(0, 1.0, (64, 10))}
    n = helper.make_node
    nodes = [n("MatMul", ["x", "W1"], ["h0"], name="mm1"), n("Add", ["h0", "c"], ["h"], name="shift"),
             n("ReduceMean", ["h"], ["mu"], axes=[-1], name="ln/mean"), n("Sub", ["h", "mu"], ["dev"], name="ln/sub"),
             n("Pow", ["dev", "two"], ["sq"], name="ln/pow"), n("ReduceMean", ["sq"], ["var"], axes=[-1], name="ln/var"),
             n("Add", ["var", "eps"], ["ve"], name="ln/eps"), n("Sqrt", ["ve"], ["sd"], name="ln/sqrt"),
             n("Div", ["dev", "sd"], ["normed"], name="ln/div"), n("MatMul", ["normed", "W2"], ["logits"], name="mm2")]
    graph = helper.make_graph(nodes, "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


@pytest.fixture
def zero_tolerance(monkeypatch):
    monkeypatch.setattr(check_module, "ATOL", 0.0)
    monkeypatch.setattr(check_module, "RTOL", 0.0)


def _perturbed(report):
    return next(s for s in report.steps if s.name == "perturbed write-back")


def test_rounding_differences_are_called_float_amplification(tmp_path, zero_tolerance):
    step = _perturbed(check(_layernorm_model(tmp_path / "m.onnx")))
    assert step.value > 0  # onnxruntime and torch do differ in float32 here (measured 2e-4)
    assert step.passed, step.detail
    assert "float amplification, not a write-back fault" in step.detail


def test_a_corrupted_write_back_still_fails(tmp_path, zero_tolerance, monkeypatch):
    def corrupting(model, updates, *args, **kwargs):
        result = write_back(model, updates, *args, **kwargs)
        for tensor in result.model.graph.initializer:
            if tensor.name == "W2":  # one weight off by 0.5 (a misplaced value): far above any rounding
                value = numpy_helper.to_array(tensor).copy()
                value.flat[0] += 0.5
                tensor.CopyFrom(numpy_helper.from_array(value, "W2"))
        for sparse in result.model.graph.sparse_initializer:
            if sparse.values.name == "W2":
                values = numpy_helper.to_array(sparse.values).copy()
                values[0] += 0.5
                sparse.values.CopyFrom(numpy_helper.from_array(values, "W2"))
        return result

    monkeypatch.setattr(check_module, "write_back", corrupting)
    step = _perturbed(check(_layernorm_model(tmp_path / "m.onnx")))
    assert not step.passed
    assert "a write-back fault" in step.detail and "float amplification" not in step.detail
