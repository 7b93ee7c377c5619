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


def _pooled_model(path, pool: int, fixed: int | None = None):
    """x [N, 1, H, W] -> 1x1 Conv -> MaxPool by ``pool`` -> nearest Resize by ``pool`` -> + the Conv's output:
    onnxruntime runs it only where H and W are multiples of ``pool``, as a detector's FPN. ``fixed``: a
    Reshape to [N, fixed] after it, so only H * W == fixed runs."""
    n = helper.make_node
    scales = numpy_helper.from_array(np.array([1, 1, pool, pool], np.float32), "scales")
    nodes = [n("Conv", ["x", "w"], ["c"], name="conv"),
             n("MaxPool", ["c"], ["p"], kernel_shape=[pool, pool], strides=[pool, pool], name="pool"),
             n("Resize", ["p", "", "scales"], ["u"], mode="nearest", name="up"),
             n("Add", ["c", "u"], ["y"], name="add")]
    inits = [numpy_helper.from_array(np.full((1, 1, 1, 1), 0.5, np.float32), "w"), scales]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, "H", "W"])
    if fixed is not None:
        nodes.append(n("Reshape", ["y", "shape"], ["flat"], name="flat"))
        inits.append(numpy_helper.from_array(np.array([-1, fixed], np.int64), "shape"))
        out = helper.make_tensor_value_info("flat", TensorProto.FLOAT, ["N", fixed])
    graph = helper.make_graph(nodes, "pooled", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                              ["N", 1, "H", "W"])], [out], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_synthesized_inputs_grow_to_a_size_the_model_runs_at(tmp_path, caplog):
    # At 8 x 8 a pool by 16 leaves nothing (onnxruntime fails); at 32 x 32 the model runs and is checked there.
    caplog.set_level("INFO", logger="onnx_admm")
    report = check(_pooled_model(tmp_path / "m.onnx", pool=16))
    assert report.passed and len(report.steps) == 6, report.format()
    assert "synthesized inputs: the dynamic dims at 32 (onnxruntime failed at 8)" in caplog.text


def test_no_synthesized_size_that_runs_asks_for_data(tmp_path):
    # A Reshape to 100 values a sample: no square of 8, 32, 64 or 128 gives it, so check asks for --data.
    with pytest.raises(check_module.UserError) as error:
        check(_pooled_model(tmp_path / "m.onnx", pool=2, fixed=100))
    message = str(error.value)
    assert message.startswith("onnxruntime failed to run ")
    assert message.endswith("synthesized inputs with dynamic dims at 8, 32, 64, 128 do not fit this model: pass "
                            "inputs it runs on with --data (an .npz keyed by input name)")
    assert "\n" not in message
    # A graph without dynamic dims besides the batch: one size is all there is; onnxruntime's line is the error, and
    # --data is the way out where the synthesized values are what failed.
    fixed = onnx.load(str(_pooled_model(tmp_path / "fixed.onnx", pool=2, fixed=100)))
    for dim, size in zip(fixed.graph.input[0].type.tensor_type.shape.dim[2:], (8, 8)):
        dim.Clear()
        dim.dim_value = size
    onnx.save(fixed, str(tmp_path / "fixed.onnx"))
    with pytest.raises(check_module.UserError) as error:
        check(tmp_path / "fixed.onnx")
    assert str(error.value).startswith("onnxruntime failed to run ") and "\n" not in str(error.value)
    assert str(error.value).endswith("; if the values matter (categories, token ids), pass inputs the model runs on "
                                     "with --data (an .npz keyed by input name)")


def test_a_float16_model_is_checked_in_float16_steps(tmp_path):
    # Conv, GELU, LayerNorm and Linear in float16: torch and onnxruntime sum in other orders and differ by a few
    # float16 steps (6e-4 here), which the float32 tolerance (1e-4 + 1e-4 max|y|) called a failed check.
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4),
                              torch.nn.Flatten(), torch.nn.Linear(128, 32), torch.nn.GELU(), torch.nn.LayerNorm(32),
                              torch.nn.Linear(32, 10)).eval().half()
    path = tmp_path / "fp16.onnx"
    torch.onnx.export(net, (torch.randn(2, 1, 8, 8).half(),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}})
    feeds = {"x": np.random.default_rng(0).standard_normal((64, 1, 8, 8)).astype(np.float16)}
    report = check(path, feeds)
    step = next(s for s in report.steps if s.name == "torch vs onnxruntime")
    import onnxruntime as ort

    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert report.passed, report.format()
    assert step.value > check_module.ATOL + check_module.RTOL * float(np.abs(y).max())  # over float32's tolerance


def test_a_float16_model_with_float32_inputs_and_outputs_is_checked_in_float16_steps(tmp_path):
    # onnxconverter-common's float16 conversion with keep_io_types: float32 in and out, Casts around a float16
    # graph. The float32 outputs carry float16 rounding, which the float32 tolerance called a failed check.
    import onnxruntime as ort
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(512, 32), torch.nn.GELU(), torch.nn.Linear(32, 10)).eval().half()
    half = tmp_path / "half.onnx"
    torch.onnx.export(net, (torch.randn(2, 1, 8, 8).half(),), str(half), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}})
    model = onnx.load(str(half))
    for node in model.graph.node:
        node.input[:] = ["x16" if name == "x" else name for name in node.input]
        node.output[:] = ["y16" if name == "y" else name for name in node.output]
    model.graph.node.insert(0, helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16, name="to_half"))
    model.graph.node.append(helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT, name="to_float"))
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.elem_type = TensorProto.FLOAT
    path = tmp_path / "keep_io.onnx"
    onnx.save(model, str(path))
    feeds = {"x": np.random.default_rng(0).standard_normal((64, 1, 8, 8)).astype(np.float32)}
    report = check(path, feeds)
    assert report.passed, report.format()
    step = next(s for s in report.steps if s.name == "torch vs onnxruntime")
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert y.dtype == np.float32
    assert step.value > check_module.ATOL + check_module.RTOL * float(np.abs(y).max())  # over float32's tolerance


def test_what_onnx_checker_refuses_in_the_original_does_not_fail_the_write_back(tmp_path, monkeypatch):
    # A graph output declared without a shape: onnxruntime runs the file, onnx's checker refuses it ("Field 'shape'
    # of 'type' is required but missing"). That ended check with an internal error. The written model is judged
    # by the checker only where it says something new.
    path = _layernorm_model(tmp_path / "ln.onnx", shift=0.0)
    model = onnx.load(str(path))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, None))
    onnx.save(model, str(path))
    feeds = {"x": np.random.default_rng(1).standard_normal((16, 8)).astype(np.float32)}
    report = check(path, feeds)
    assert report.passed, report.format()
    # A complaint about the written model alone fails the step, in one line.
    real = onnx.checker.check_model

    def picky(model_or_path, *args, **kwargs):
        if isinstance(model_or_path, str) and model_or_path.endswith("perturbed.onnx"):
            raise onnx.checker.ValidationError("Nodes in a graph must be topologically sorted")
        return real(model_or_path, *args, **kwargs)

    monkeypatch.setattr(onnx.checker, "check_model", picky)
    step = _perturbed(check(path, feeds))
    assert not step.passed and step.detail == ("onnx's checker refuses the written model: Nodes in a graph must be "
                                               "topologically sorted")


def test_binary_write_back_is_run_as_onnxruntime_reads_it(tmp_path, monkeypatch):
    # Every compressible weight on binary levels per output channel, written as integers: the head W2 is a
    # MatMul [64, 10], which onnxruntime 1.32 fuses with its DequantizeLinear into MatMulNBits and misreads in
    # int2 (10 columns do not fill whole bytes). Write-back stores it as int4 and the step passes; with int2 it
    # would not, and the step says so.
    import onnx_admm.converters.writeback as writeback

    path = _layernorm_model(tmp_path / "m.onnx")
    step = next(s for s in check(path).steps if s.name == "binary write-back")
    assert step.passed and "int2" in step.detail and "int4" in step.detail, step.detail
    monkeypatch.setattr(writeback, "_without_int2", lambda candidates: list(candidates))
    step = next(s for s in check(path).steps if s.name == "binary write-back")
    assert not step.passed and step.value > 0.1, step.detail
    assert "a write-back fault or onnxruntime reading the stored weights otherwise" in step.detail


def test_a_nan_both_runtimes_compute_at_the_same_place_is_agreement():
    # onnxruntime's MeanVarianceNormalization of a constant slice is 0 / 0: torch computes the same NaN there.
    nan, inf = float("nan"), float("inf")
    same = [np.array([nan, 1.0, inf], np.float32)]
    assert check_module.within_tolerance(same, [np.array([nan, 1.0, inf], np.float32)]) == (True, 0.0)
    assert not check_module.within_tolerance(same, [np.array([0.0, 1.0, inf], np.float32)])[0]
    assert not check_module.within_tolerance(same, [np.array([nan, 1.0, -inf], np.float32)])[0]
    assert not check_module.within_tolerance(same, [np.array([nan, 1.5, inf], np.float32)])[0]
