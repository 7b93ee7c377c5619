"""Tests for integer activations (onnx_admm.activations, converters.qdq): ``output.activations = "int8"``.

One digits run (int8 weights, 2 epochs, int8 activations) is shared by the module: the QDQ file loads,
keeps the graph's inputs, outputs and node names, fuses into integer kernels in onnxruntime, keeps the
compressed model's int8 levels bit for bit, stays within the error the activation scales allow of the
float-activation compressed model, and calibrates on training samples only. Bad combinations are
one-line errors.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from onnx_admm.converters.dequantize import decode, weight_decoders
from onnx_admm.converters.errors import UserError
from onnx_admm.converters.graphinfo import constant_sources, tensor_value
from onnx_admm.converters.qdq import calibrate, insert_qdq, plan_qdq
from onnx_admm.activations import calibration_data, int8_model
from onnx_admm.api import compress
from onnx_admm.cli import _summary, main
from onnx_admm.data import Dataset
from onnx_admm.recipe import CompressConfig, OutputConfig

_INTEGER_OPS = {"QLinearConv", "ConvInteger", "QGemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat"}


@pytest.fixture(scope="module")
def run(digits_sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("activations")
    config = CompressConfig().replace(train={"epochs": 2, "threads": 1}, prune={"sparsity": 0.5},
                                      quantize={"bits": 8, "per_channel": True}, output={"activations": "int8"})
    result = compress(digits_sample.model, digits_sample.train, config, val_data=digits_sample.test,
                      output=out / "digits.onnx", report_path=out / "report.json")
    fp32 = _float_export(result)
    return {"result": result, "qdq": onnx.load(str(out / "digits.onnx")), "path": out / "digits.onnx",
            "fp32": fp32, "original": onnx.load(str(digits_sample.model)),
            "report": json.loads((out / "report.json").read_text()), "dir": out}


def _float_export(result):
    import dataclasses

    return dataclasses.replace(result, config=result.config.replace(output={"activations": "float"})).export(-1).model


def _session(model: onnx.ModelProto, optimized: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if optimized:
        options.optimized_model_filepath = optimized
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_qdq_file_loads_with_the_original_io_and_node_names(run):
    qdq, original = run["qdq"], run["original"]
    _session(qdq)
    onnx.checker.check_model(qdq)
    for field in ("input", "output"):
        assert [v.SerializeToString() for v in getattr(qdq.graph, field)] == \
            [v.SerializeToString() for v in getattr(original.graph, field)]
    ops = {n.name: n.op_type for n in qdq.graph.node}
    for node in original.graph.node:
        assert ops[node.name] == node.op_type
    added = {ops[name] for name in set(ops) - {n.name for n in original.graph.node}}
    assert added <= {"QuantizeLinear", "DequantizeLinear"}
    assert "QuantizeLinear" in added


def test_onnxruntime_fuses_into_integer_kernels(run):
    optimized = str(run["dir"] / "optimized.onnx")
    _session(run["qdq"], optimized)
    ops = [n.op_type for n in onnx.load(optimized).graph.node]
    assert ops.count("QLinearConv") == 2 and ops.count("QGemm") == 2, ops
    assert not {"Conv", "Gemm", "MatMul"} & set(ops), ops  # no float kernel left for a weight layer


def _weights(model: onnx.ModelProto, suffix: str = "weight") -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """weight name -> (stored integers, scale, decoded floats) for every DequantizeLinear weight whose
    name ends with ``suffix`` (the digits weights: not the biases)."""
    sources = constant_sources(model)
    out = {}
    for name, decoder in weight_decoders(model).items():
        node = model.graph.node[decoder.nodes[-1]]
        if node.op_type == "DequantizeLinear" and name.endswith(suffix):
            out[name] = (tensor_value(model, sources[node.input[0]]), tensor_value(model, sources[node.input[1]]),
                         decode(model, decoder))
    return out


def test_8bit_levels_are_kept_exactly(run):
    kept, qdq = _weights(run["fp32"]), _weights(run["qdq"])
    assert set(kept) == set(qdq) == {"0.weight", "2.weight", "5.weight", "7.weight"}
    for name, (q, scale, value) in kept.items():
        assert q.dtype == np.int8
        assert np.array_equal(qdq[name][0], q), name
        assert np.array_equal(qdq[name][1], scale), name
        assert np.array_equal(qdq[name][2], value), name
    assert all(layer["encoding"] == "int8" for layer in run["report"]["layers"])


def _scale(model: onnx.ModelProto, tensor: str) -> float:
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor)
    return float(numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == q.input[1])))


def test_outputs_stay_within_the_error_the_activation_scales_allow(run, digits_sample):
    """Bound, layer by layer along the digits chain (Conv, Conv, Gemm, Gemm; Relu and Flatten are
    1-Lipschitz): the error e entering a layer grows to max_c sum|W_c| * e (the weights are exact), plus
    half a step of the int32 bias (x_scale * w_scale_c / 2), plus half a step of the activation scale
    where the output is quantized. The input enters with half its own step. On calibration samples no
    value falls outside its range, so rounding is the only error."""
    fp32, qdq = run["fp32"], run["qdq"]
    plan = plan_qdq(fp32)
    weights = _weights(fp32)
    by_output = {n.output[0]: n for n in fp32.graph.node}
    consumers = {i: n for n in fp32.graph.node for i in n.input}
    error = 0.0
    for output in plan.nodes:
        node = by_output[output]
        x_scale = _scale(qdq, node.input[0])
        error = error or x_scale / 2
        q, w_scale, value = weights[node.input[1]]
        rows = np.abs(value.reshape(value.shape[0], -1)).sum(axis=1)
        error = float(rows.max()) * error + float(x_scale * w_scale.max()) / 2
        after = consumers.get(node.output[0])
        point = after.output[0] if after is not None and after.op_type == "Relu" else node.output[0]
        if point in plan.activations:
            error += _scale(qdq, point) / 2
    x = np.load(digits_sample.train)["input"][:64]
    a = _session(fp32).run(None, {"input": x})[0]
    b = _session(qdq).run(None, {"input": x})[0]
    diff = float(np.abs(a - b).max())
    assert diff <= error, (diff, error)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.95


def test_calibration_reads_the_training_samples_only(run, digits_sample):
    # The run split --data as compress does (seeded), and calibrated on the first samples of the training part.
    result, qdq = run["result"], run["qdq"]
    train = np.load(digits_sample.train)
    data = Dataset({"input": train["input"]}, train["labels"], {"input"})
    cfg = result.config.train
    train_part = data.split(cfg.val_fraction, cfg.seed + 1)[0]
    assert len(result.calibration) == result.config.output.calibration
    assert np.array_equal(result.calibration.inputs["input"], train_part.take(256).inputs["input"])
    fp32 = run["fp32"]
    plan = plan_qdq(fp32)
    ranges = calibrate(fp32, plan, [{"input": np.asarray(result.calibration.inputs["input"])}])
    held_out = calibrate(fp32, plan, [{"input": np.load(digits_sample.test)["input"]}])
    differs = False
    for tensor in plan.calibrated:
        assert _scale(qdq, tensor) == pytest.approx(float(ranges[tensor].scale), rel=1e-6)
        differs |= ranges[tensor].scale != held_out[tensor].scale
    assert differs  # the check would see the held-out data's ranges


def test_report_compares_fp32_int8_and_quantize_static(run):
    field = run["report"]["activations"]
    assert field["calibration_samples"] == 256
    for key in ("compressed_fp32", "compressed_int8", "quantize_static"):
        assert 0.5 < field[key]["accuracy"] <= 1.0
        assert set(field[key]["latency_ms"]) == {"1", "64"}
    assert field["compressed_int8"]["accuracy"] == run["report"]["metrics"]["compressed_accuracy"]
    assert "int8 activations" in _summary(run["report"]).splitlines()[-1]


def test_maxpool_and_flatten_share_their_input_scale_and_run_on_int8(lenet5_torchscript_onnx, tmp_path):
    # conv1 -> MaxPool -> conv2 -> MaxPool -> Flatten -> Gemm: one range from each Conv output runs through.
    model = onnx.load(str(lenet5_torchscript_onnx))
    plan = plan_qdq(model)
    assert plan.ranges_of["/MaxPool_output_0"] == "/conv1/Conv_output_0"
    assert plan.ranges_of["/Flatten_output_0"] == plan.ranges_of["/MaxPool_1_output_0"] == "/conv2/Conv_output_0"
    x = np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)
    qdq = insert_qdq(model, plan, calibrate(model, plan, [{"input": x}])).model
    _session(qdq, str(tmp_path / "optimized.onnx"))
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert "MaxPool" not in ops and not {"Conv", "Gemm", "DequantizeLinear"} & set(ops), ops


def test_a_residual_add_reads_the_float_tensor_and_every_conv_fuses(resnet_block_torchscript_onnx, tmp_path):
    model = onnx.load(str(resnet_block_torchscript_onnx))
    plan = plan_qdq(model)
    x = np.random.default_rng(0).standard_normal((4, *[d.dim_value for d in
                                                       model.graph.input[0].type.tensor_type.shape.dim[1:]]))
    qdq = insert_qdq(model, plan, calibrate(model, plan, [{"input": x.astype(np.float32)}])).model
    add = next(n for n in qdq.graph.node if n.op_type == "Add")
    assert "/Relu_output_0" in add.input  # the skip connection: float, as in the original
    _session(qdq, str(tmp_path / "optimized.onnx"))
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("QLinearConv") == 3 and "Conv" not in ops, ops


def test_calibration_data_takes_the_first_samples():
    x = np.arange(10, dtype=np.float32).reshape(10, 1)
    data = Dataset({"input": x}, None, {"input"})
    model = _model("Y = MatMul(X, W)", "float[2, 1] W = {1.0, 2.0}", "float[N, 2] X", "float[N, 1] Y")
    assert calibration_data(model, data, OutputConfig()) is None
    assert np.array_equal(calibration_data(model, data, OutputConfig("int8", 3)).inputs["input"], x[:3])


def _model(body: str, initializers: str, inputs: str, outputs: str, opset: int = 17) -> onnx.ModelProto:
    return onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        g ({inputs}) => ({outputs}) <{initializers}> {{ {body} }}""")


def test_a_model_without_integer_ops_is_a_one_line_error():
    model = _model("Y = Add(X, B)", "float[2] B = {1.0, 2.0}", "float[N, 2] X", "float[N, 2] Y")
    with pytest.raises(UserError, match="need a Conv, Gemm or MatMul") as info:
        plan_qdq(model)
    assert "\n" not in str(info.value)


def test_an_activation_times_activation_matmul_is_left_float():
    model = _model("Y = MatMul(X, Z)", "", "float[2, 2] X, float[2, 2] Z", "float[2, 2] Y")
    with pytest.raises(UserError):
        plan_qdq(model)


def test_a_weight_listed_as_a_graph_input_stays_float():
    model = _model("Y = MatMul(X, W)\n Z = MatMul(X, V)", "float[2, 1] W = {1.0, 2.0}, float[2, 1] V = {1.0, 3.0}",
                   "float[N, 2] X, float[2, 1] W", "float[N, 1] Y, float[N, 1] Z")
    plan = plan_qdq(model)
    assert plan.nodes == ("Z",)
    result = insert_qdq(model, plan, calibrate(model, plan, [{"X": np.ones((2, 2), np.float32)}]))
    assert [i.SerializeToString() for i in result.model.graph.input] == \
        [i.SerializeToString() for i in model.graph.input]
    assert result.weights == {"V": "quantized"}


def test_an_old_opset_is_a_one_line_error():
    model = _model("Y = MatMul(X, W)", "float[2, 1] W = {1.0, 2.0}", "float[N, 2] X", "float[N, 1] Y", opset=11)
    with pytest.raises(UserError, match="opset 13"):
        plan_qdq(model)


def test_float_weights_are_quantized_per_channel_symmetric():
    model = _model("H = MatMul(X, W)\n Y = Relu(H)", "float[2, 3] W = {1.0, -2.0, 0.5, 0.25, 4.0, 0.0}",
                   "float[N, 2] X", "float[N, 3] Y")
    plan = plan_qdq(model)
    x = np.array([[0.5, -1.0], [1.0, 0.25]], np.float32)
    result = insert_qdq(model, plan, calibrate(model, plan, [{"X": x}]))
    assert result.weights == {"W": "quantized"}
    q, scale, value = _weights(result.model, "W")["W"]
    # 7 bits (WEIGHT_PEAK): with +-127 a CPU without VNNI saturates the uint8 x int8 pair sums of this very
    # product (onnxruntime read 0.78 for the 1.06 below on an AVX2 AMD EPYC).
    assert q.dtype == np.int8 and np.abs(q).max(axis=0).tolist() == [63, 63, 63]
    np.testing.assert_allclose(scale, np.array([1.0, 4.0, 0.5], np.float32) / 63)
    y = _session(result.model).run(None, {"X": x})[0]
    np.testing.assert_allclose(y, np.maximum(x @ value, 0), atol=0.05)


def test_4bit_levels_become_the_same_integers_in_int8():
    from onnx_admm.converters.encoders import DequantizeLinearEncoder, QuantSpec

    scale = np.array([0.5, 0.25, 0.125], np.float32)
    q = np.array([[7, -8, 3], [-2, 5, 0]])
    encoding = DequantizeLinearEncoder().encode("W", (q * scale).astype(np.float32), QuantSpec(4, scale, 1))
    assert encoding.kind == "int4"
    model = _model("Y = MatMul(X, W)", "", "float[N, 2] X", "float[N, 3] Y", opset=21)
    model.graph.initializer.extend(encoding.initializers)
    model.graph.node.insert(0, encoding.nodes[0])
    plan = plan_qdq(model)
    result = insert_qdq(model, plan, calibrate(model, plan, [{"X": np.ones((2, 2), np.float32)}]))
    assert result.weights == {"W": "kept"}
    stored, stored_scale, value = _weights(result.model, "W")["W"]
    assert stored.dtype == np.int8 and np.array_equal(stored, q) and np.array_equal(stored_scale, scale)
    assert np.array_equal(value, (q * scale).astype(np.float32))


@pytest.mark.parametrize("levels, bits, warned", [(-64, 7, False), (65, 8, True), (127, 8, True), (7, 4, False)])
def test_kept_levels_beyond_seven_bits_are_named_as_saturating_without_vnni(caplog, levels, bits, warned):
    from onnx_admm.converters.encoders import DequantizeLinearEncoder, QuantSpec

    scale = np.array([0.5, 0.25, 0.125], np.float32)
    q = np.array([[levels, -2, 3], [-2, 5, 0]])
    encoding = DequantizeLinearEncoder().encode("W", (q * scale).astype(np.float32), QuantSpec(bits, scale, 1))
    model = _model("Y = MatMul(X, W)", "", "float[N, 2] X", "float[N, 3] Y", opset=21)
    model.graph.initializer.extend(encoding.initializers)
    model.graph.node.insert(0, encoding.nodes[0])
    plan = plan_qdq(model)
    result = insert_qdq(model, plan, calibrate(model, plan, [{"X": np.ones((2, 2), np.float32)}]))
    assert result.weights == {"W": "kept"} and result.wide == (("W",) if warned else ())
    with caplog.at_level(logging.WARNING, logger="onnx_admm.activations"):
        int8_model(model, Dataset({"X": np.ones((4, 2), np.float32)}, None, {"X"}))
    said = [r.getMessage() for r in caplog.records if "beyond +-64" in r.getMessage()]
    assert said == (["int8 activations: 1 weight(s) keep 8-bit levels beyond +-64 (W): on x86 CPUs without VNNI "
                     "onnxruntime's int8 kernels saturate their products, and the file computes less exactly there; "
                     "compress with --bits 7 for a file exact on every CPU"] if warned else [])


def test_unknown_values_are_refused():
    with pytest.raises(UserError, match="output.activations must be one of float, int8"):
        CompressConfig.from_dict({"output": {"activations": "int4"}})
    with pytest.raises(UserError, match="unknown key"):
        CompressConfig.from_dict({"output": {"activation": "int8"}})
    result = CliRunner().invoke(main, ["compress", "m.onnx", "--data", "d.npz", "-o", "o.onnx", "--activations", "int4"])
    assert result.exit_code == 2 and "'int4' is not one of 'float', 'int8'" in result.output


def test_the_cli_refuses_a_model_without_integer_ops_before_training(tmp_path):
    # A ConvTranspose weight is compressible, but onnxruntime has no integer kernel for it.
    model = _model("Y = ConvTranspose(X, W)", "float[1, 1, 2, 2] W = {1.0, 2.0, 3.0, 4.0}", "float[N, 1, 3, 3] X",
                   "float[N, 1, 4, 4] Y")
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", X=np.ones((8, 1, 3, 3), np.float32))
    result = CliRunner().invoke(main, ["compress", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"),
                                       "-o", str(tmp_path / "o.onnx"), "--sparsity", "0.5", "--activations", "int8"])
    assert result.exit_code == 1, result.output
    assert result.output.strip().count("\n") == 0 and "Conv, Gemm or MatMul" in result.output, result.output
    assert not (tmp_path / "o.onnx").exists()
