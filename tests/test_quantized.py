"""Models quantized by onnxruntime's quantizer (converters.quantized): they import as their float form,
which stays within a stated tolerance of the quantized file in onnxruntime, and compress writes a
float model with the quantized file's graph inputs and outputs, saying what it replaced."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from onnx_admm.converters.importer import import_model
from onnx_admm.converters.modelio import load_model
from onnx_admm.converters.quantized import dequantize_model, is_quantized
from exporter_models import QUANT_FORMATS, export_torch, ort_quantized, recurrent_classifier
from onnx_admm.api import compress
from onnx_admm.check import QUANTIZED_RTOL, check
from onnx_admm.cli import main
from onnx_admm.inspection import inspect_model
from onnx_admm.recipe import CompressConfig

# Ops onnx2torch has no converter for: none may be left in the float form.
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
                 "QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QLinearSoftmax",
                 "QLinearGlobalAveragePool", "DynamicQuantizeLSTM"}


def _ort(path_or_model, feeds, fused: bool = True):
    """``fused=False``: the graph as written (no fusions into onnxruntime's int8 kernels, which saturate on x86
    CPUs without VNNI: the QDQ digits CNN 0.146 x max|output| off its own graph on an AVX2 AMD EPYC)."""
    source = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    options = ort.SessionOptions()
    if not fused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _io(model: onnx.ModelProto) -> tuple[list[bytes], list[bytes]]:
    return ([v.SerializeToString() for v in model.graph.input], [v.SerializeToString() for v in model.graph.output])


@pytest.fixture(scope="module")
def digits_data(digits_sample):
    train, test = np.load(digits_sample.train), np.load(digits_sample.test)
    return train["input"], test["input"]


@pytest.fixture(scope="module")
def quantized_digits(digits_sample, digits_data, tmp_path_factory):
    """The trained digits CNN in every form onnxruntime's quantizer writes, calibrated on 256 images."""
    folder = tmp_path_factory.mktemp("quantized")
    calibration = [{"input": digits_data[0][i:i + 16]} for i in range(0, 256, 16)]
    return {form: ort_quantized(digits_sample.model, folder / f"digits.{form}.onnx", form, calibration)
            for form in QUANT_FORMATS}


@pytest.mark.parametrize("form", QUANT_FORMATS)
def test_float_form_imports_and_follows_the_quantized_model(quantized_digits, digits_data, form):
    path = quantized_digits[form]
    quantized = load_model(path)
    assert is_quantized(quantized)
    imported = import_model(quantized)
    assert imported.dequantized
    float_ops = {n.op_type for n in imported.original.graph.node}
    assert not float_ops & QUANTIZED_OPS, float_ops
    assert _io(imported.original) == _io(quantized)
    # Nodes the quantizer kept (Relu, Flatten ...) keep their names; replaced ones take the quantized node's.
    kept = {n.name for n in quantized.graph.node if n.op_type in float_ops}
    assert kept <= {n.name for n in imported.original.graph.node}
    x = digits_data[1]
    reference = _ort(path, {"input": x}, fused=False)[0]
    got = imported.run({"input": x})[0]
    # Stated tolerance: the float form drops the int8 activation rounding and the saturation at the top
    # of the calibrated ranges. Measured on the 360 test images: at most 6% of max|logit| on the worst
    # image (one beyond the calibrated range), under 1% for 99% of them, <= 1.2% of predictions changed.
    per_image = np.max(np.abs(got - reference), axis=1) / np.max(np.abs(reference))
    assert per_image.max() <= QUANTIZED_RTOL
    assert np.percentile(per_image, 99) <= 0.02
    assert np.mean(got.argmax(1) == reference.argmax(1)) >= 0.98
    # torch computes what onnxruntime computes on the float form, to float32 summation order.
    assert np.allclose(got, _ort(imported.original, {"input": x})[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("form", ["dynamic", "qoperator"])
def test_compress_writes_a_float_model_with_the_quantized_graph_io(quantized_digits, digits_data, tmp_path, form):
    path = quantized_digits[form]
    config = CompressConfig.from_dict({"train": {"threads": 1, "batch_size": 64},
                                       "admm": {"epochs": 2, "retrain_epochs": 1}, "prune": {"sparsity": 0.5}})
    train = tmp_path / "train.npz"
    np.savez(train, input=digits_data[0])
    result = compress(path, str(train), config)
    out = tmp_path / "out.onnx"
    result.save(out)
    written, quantized = load_model(out), load_model(path)
    assert _io(written) == _io(quantized)
    report = result.report
    assert report["dequantized"] == result.imported.dequantized
    replaced = " ".join(report["dequantized"])
    assert ("ConvInteger" in replaced) if form == "dynamic" else ("QLinearConv" in replaced and "QGemm" in replaced)
    # Exactly half of the weights pruned, and the predictions follow the quantized original.
    assert report["params"]["nonzero"] == round(0.5 * report["params"]["total"]) and report["params"]["total"] > 30000
    x = digits_data[1]
    agreement = np.mean(_ort(out, {"input": x})[0].argmax(1) == _ort(path, {"input": x})[0].argmax(1))
    assert agreement >= 0.95
    assert report["metrics"]["agreement"] >= 0.9
    # Written as float, the half-pruned weights take more room than the int8 ones did: the run says so and how.
    before, after = report["original"]["bytes_gzip"], report["compressed"]["bytes_gzip"]
    assert after > before and (f"the compressed file is larger than the original ({after:,} against {before:,} "
                               "bytes gzip'd); the original's weights were 8-bit integers and are written as float: "
                               "add --bits 8 (quantize.bits = 8) to store them as integers again"
                               ) in report["warnings"]


@pytest.mark.parametrize("form", ["dynamic", "qdq", "qoperator"])
def test_filter_pruning_of_a_quantized_file_removes_filters_from_its_float_form(quantized_digits, digits_data,
                                                                                  tmp_path, form):
    # The channel analysis read the quantized file, whose ConvInteger / QLinearConv / DequantizeLinear weights it
    # does not follow: every run stopped with "no weight can lose whole filters". It reads the float form the
    # write-back writes into (and cuts) now.
    config = CompressConfig.from_dict({"train": {"threads": 1, "batch_size": 64},
                                       "admm": {"epochs": 1, "retrain_epochs": 1},
                                       "prune": {"sparsity": 0.5, "structure": "filter"}})
    train = tmp_path / "train.npz"
    np.savez(train, input=digits_data[0][:256])
    result = compress(quantized_digits[form], str(train), config)
    alone = result.report["left_alone"]
    head = [name for name, reason in alone.items() if "reach the graph output 'logits'" in reason]
    assert len(head) == 1 and head[0].startswith("7.weight")  # the head's classes are the graph output
    written = result.model()
    assert _io(written) == _io(load_model(quantized_digits[form]))
    # Both convs keep half their filters: quantize_dynamic's float form adds each conv's bias after it, reshaped
    # to [1, -1, 1, 1] at run time, and that bias is cut with the filters.
    shapes = sorted(tuple(i.dims) for i in written.graph.initializer if len(i.dims) == 4)
    assert len(alone) == 1 and shapes == [(8, 1, 3, 3), (16, 8, 3, 3)]
    x = digits_data[1][:64]
    np.testing.assert_allclose(_ort(written, {"input": x})[0], result.imported.run({"input": x})[0], atol=1e-4)
    # The report's MACs count the quantized original as its float form (its integer ops counted 0 before).
    from onnx_admm.data import Dataset
    from onnx_admm.pipeline.report import _structure_report

    out = tmp_path / "out.onnx"
    result.save(out)
    macs = _structure_report(quantized_digits[form], out, {}, Dataset({"input": x}, None, {"input"}), 1)["macs"]
    assert macs["original"] == 112320 and 0 < macs["compressed"] < macs["original"] / 2


def test_check_and_inspect_on_quantized_files(quantized_digits, digits_data):
    def step(feeds):
        report = check(quantized_digits["qdq"], feeds)
        return report, next(s for s in report.steps if s.name == "dequantized")

    # On the user's images the float form is gated at QUANTIZED_RTOL ...
    report, found = step({"input": digits_data[1]})
    assert report.passed and found.value <= QUANTIZED_RTOL, report.format()
    # ... and fails where the quantized model saturates (images 20x brighter than calibrated for).
    report, found = step({"input": digits_data[1] * 20})
    assert not report.passed and not found.passed and found.value > QUANTIZED_RTOL
    # Synthesized N(0, 1) inputs lie outside the calibrated ranges: the figure is shown, not gated.
    report, found = step(None)
    assert report.passed and "not gated" in found.detail, report.format()
    # ... and shown as skipped, not as a pass.
    assert found.skipped and found.status == "SKIP"
    assert "  SKIP  dequantized " in report.format() and "PASS  dequantized" not in report.format()
    assert report.to_dict()["steps"][1]["skipped"] is True
    info = inspect_model(quantized_digits["qoperator"])
    assert info["importable"] and info["total_params"] > 30000
    assert any("QLinearConv" in line for line in info["dequantized"])
    runner = CliRunner()
    shown = runner.invoke(main, ["inspect", str(quantized_digits["dynamic"])])
    assert shown.exit_code == 0 and "ConvInteger '" in shown.output
    as_json = json.loads(runner.invoke(main, ["inspect", "--json", str(quantized_digits["dynamic"])]).output)
    assert as_json["dequantized"]


@pytest.mark.parametrize("kind", ["lstm_dynamic", "transformer_qoperator", "resnet_block_qoperator"])
def test_check_passes_on_other_quantized_operators(onnx_model_file, tmp_path, kind):
    """DynamicQuantizeLSTM; QLinearMatMul, QLinearAdd/Mul/Softmax; QLinearAdd on a residual, QLinearGlobalAveragePool."""
    if kind == "lstm_dynamic":
        source = export_torch(recurrent_classifier("lstm"), torch.randn(2, 7, 10), tmp_path / "lstm.onnx", "torchscript")
        path = ort_quantized(source, tmp_path / "lstm.q.onnx", "dynamic", [])
        expected = {"DynamicQuantizeLSTM", "MatMulInteger"}
    else:
        source = onnx_model_file(kind.rsplit("_", 1)[0] + "_torchscript")
        dims = [d.dim_value or 4 for d in onnx.load(str(source)).graph.input[0].type.tensor_type.shape.dim]
        rng = np.random.default_rng(0)
        calibration = [{"input": rng.standard_normal(dims).astype(np.float32)} for _ in range(4)]
        path = ort_quantized(source, tmp_path / "q.onnx", "qoperator", calibration)
        expected = {"QLinearMatMul", "QLinearSoftmax"} if kind.startswith("transformer") else {
            "QLinearAdd", "QLinearGlobalAveragePool"}
    assert expected <= {n.op_type for n in onnx.load(str(path)).graph.node}
    report = check(path)
    assert report.passed, report.format()
    assert all(any(op in line for line in import_model(load_model(path)).dequantized) for op in expected
               if op != "DynamicQuantizeLinear")


def _qdq_model(zero_point_type: str) -> onnx.ModelProto:
    return onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 3] y) <float[4, 3] w = {{{", ".join(str(v) for v in np.linspace(-1, 1, 12))}}},
                                            float s = {{0.05}}, {zero_point_type} zp = {{0}}> {{
            h = MatMul(x, w)
            q = QuantizeLinear(h, s, zp)
            r = Reshape(q, shape)
            y = DequantizeLinear(r, s, zp)
        }}
    """.replace("<float[4, 3] w", "<int64[2] shape = {-1, 3}, float[4, 3] w"))


@pytest.mark.parametrize("zero_point_type, relu", [("uint8", True), ("int8", False)])
def test_a_range_starting_at_zero_becomes_the_relu_the_quantizer_dropped(zero_point_type, relu):
    model = _qdq_model(zero_point_type)
    onnx.checker.check_model(model)
    floats, notes = dequantize_model(model)
    # The DequantizeLinear that wrote the graph output stays as an Identity, so the output keeps its name.
    expected = ["MatMul", "Relu", "Reshape", "Identity"] if relu else ["MatMul", "Reshape", "Identity"]
    assert [n.op_type for n in floats.graph.node] == expected
    assert any("activation QuantizeLinear" in line for line in notes)
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    x = np.concatenate([x, -x])  # MatMul is linear: half of the rows give negative values
    quantized, ours = _ort(model, {"x": x})[0], _ort(floats, {"x": x})[0]
    # One rounding step of the scale 0.05 apart, inside the int8 range; uint8 clamps negatives to 0 in both.
    assert np.max(np.abs(quantized - ours)) <= 0.025 + 1e-6
    assert (np.min(ours) >= 0) == relu


def test_models_without_onnxruntime_quantization_are_left_alone(digits_sample, tmp_path):
    model = load_model(digits_sample.model)
    assert dequantize_model(model) == (model, [])
    # A model compressed by this tool holds only DequantizeLinear weight decoders: it keeps them.
    config = CompressConfig.from_dict({"train": {"threads": 1}, "admm": {"epochs": 0, "retrain_epochs": 1},
                                       "quantize": {"bits": 4}})
    result = compress(digits_sample.model, str(digits_sample.train), config, val_data=str(digits_sample.test))
    compressed = result.model()
    assert "DequantizeLinear" in {n.op_type for n in compressed.graph.node}
    assert not is_quantized(compressed) and dequantize_model(compressed)[0] is compressed


def _nbits_quantizer():
    """onnxruntime's weight-only quantizer (its module and its bits / format arguments came with 1.20-1.21)."""
    return pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer").MatMulNBitsQuantizer


def _mlp(k: int = 72, hidden: int = 40, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w1 = (rng.normal(size=(k, hidden)) * 0.1).astype(np.float32)
    w2 = (rng.normal(size=(hidden, 10)) * 0.1).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "W1"], ["h"]), onnx.helper.make_node("Relu", ["h"], ["r"]),
         onnx.helper.make_node("MatMul", ["r", "W2"], ["y"])], "mlp",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", k])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 10])],
        [onnx.numpy_helper.from_array(w1, "W1"), onnx.numpy_helper.from_array(w2, "W2")])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])


@pytest.mark.parametrize("bits, symmetric, block", [(4, True, 16), (4, False, 32), (8, False, 16), (2, True, 16)])
def test_matmul_nbits_imports_as_the_float_weights_onnxruntime_decodes(bits, symmetric, block, tmp_path):
    # onnxruntime's weight-only quantizer (MatMulNBitsQuantizer, QOperator format) writes com.microsoft.MatMulNBits:
    # codes packed low-first in [N, k_blocks, blob] bytes, per-block scales and (asymmetric) packed zero points.
    # K = 72 is no multiple of the block: the last block is padded. The float form is exactly what onnxruntime
    # computes (its MatMulNBits without an accuracy level keeps float activations).
    MatMulNBitsQuantizer = _nbits_quantizer()

    quantizer = MatMulNBitsQuantizer(_mlp(), bits=bits, block_size=block, is_symmetric=symmetric)
    quantizer.process()
    model = quantizer.model.model
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits", "Relu", "MatMulNBits"]
    floats, notes = dequantize_model(model)
    assert [n.op_type for n in floats.graph.node] == ["MatMul", "Relu", "MatMul"] and len(notes) == 2
    x = np.random.default_rng(1).normal(size=(16, 72)).astype(np.float32)
    np.testing.assert_allclose(_ort(floats, {"x": x})[0], _ort(model, {"x": x})[0], rtol=0, atol=1e-6)
    # The first layer's decoded weight against onnxruntime's own: the identity through it gives W's rows.
    first = onnx.helper.make_model(onnx.helper.make_graph(
        [model.graph.node[0]], "first", [model.graph.input[0]],
        [onnx.helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, ["N", 40])], list(model.graph.initializer)),
        opset_imports=list(model.opset_import))
    decoded = onnx.numpy_helper.to_array(next(t for t in floats.graph.initializer if t.name == floats.graph.node[0].input[1]))
    np.testing.assert_array_equal(_ort(first, {"x": np.eye(72, dtype=np.float32)})[0], decoded)
    onnx.save(model, str(tmp_path / "nbits.onnx"))
    np.savez(tmp_path / "x.npz", x=x)
    report = check(tmp_path / "nbits.onnx", {"x": x})
    assert report.passed, report.format()
    assert import_model(model).integer_bits == bits


def test_blockwise_int4_dequantize_linear_checks_at_float_activations(tmp_path):
    # The same quantizer's QDQ format: int4 DequantizeLinear with block_size (opset 21) before each MatMul.
    # onnxruntime fuses them into MatMulNBits at accuracy level 4 (int8 activations: 0.5% of max|y| off the float
    # graph), so check's reference runs at level 0; it failed "torch vs onnxruntime" at 4.6e-3 before.
    from onnxruntime.quantization import QuantFormat
    MatMulNBitsQuantizer = _nbits_quantizer()

    quantizer = MatMulNBitsQuantizer(_mlp(), bits=4, block_size=16, is_symmetric=True, quant_format=QuantFormat.QDQ)
    quantizer.process()
    model = quantizer.model.model
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "MatMul", "Relu", "DequantizeLinear", "MatMul"]
    onnx.save(model, str(tmp_path / "qdq4.onnx"))
    x = np.random.default_rng(1).normal(size=(16, 72)).astype(np.float32)
    report = check(tmp_path / "qdq4.onnx", {"x": x})
    assert report.passed, report.format()
    assert import_model(model).integer_bits == 4


def test_an_embedding_table_quantized_in_blocks_imports_as_its_float_table(tmp_path):
    # The same quantizer asked for Gather too writes com.microsoft.GatherBlockQuantized: an int4 table with one
    # scale per block of 16 along the embedding axis (32 wide: two blocks), gathered along axis 0.
    MatMulNBitsQuantizer = _nbits_quantizer()

    rng = np.random.default_rng(0)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Gather", ["E", "ids"], ["e"]), onnx.helper.make_node("MatMul", ["e", "W"], ["y"])],
        "embed", [onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["N", 6])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 6, 8])],
        [onnx.numpy_helper.from_array(rng.normal(size=(50, 32)).astype(np.float32), "E"),
         onnx.numpy_helper.from_array((rng.normal(size=(32, 8)) * 0.1).astype(np.float32), "W")])
    quantizer = MatMulNBitsQuantizer(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)]),
                                     bits=4, block_size=16, is_symmetric=True, op_types_to_quantize=("MatMul", "Gather"))
    quantizer.process()
    model = quantizer.model.model
    assert [n.op_type for n in model.graph.node] == ["GatherBlockQuantized", "MatMulNBits"]
    floats, _ = dequantize_model(model)
    assert [n.op_type for n in floats.graph.node] == ["Gather", "MatMul"]
    ids = rng.integers(0, 50, (16, 6))
    np.testing.assert_array_equal(_ort(floats, {"ids": ids})[0], _ort(model, {"ids": ids})[0])
    onnx.save(model, str(tmp_path / "embed.onnx"))
    report = check(tmp_path / "embed.onnx", {"ids": ids})
    assert report.passed, report.format()
    assert sorted(e.onnx_shape for e in import_model(model).weights if e.compressible) == [(32, 8), (50, 32)]


def test_the_session_saved_forms_of_a_dynamically_quantized_model_import(tmp_path):
    # What an InferenceSession saves at the extended level for a quantize_dynamic BERT: MatMulIntegerToFloat
    # (one DynamicQuantizeLinear's integers times int8 weights, back to float, + bias) where the quantized input
    # feeds several MatMuls, and an embedding's DequantizeLinear moved after its Gather of the int8 table.
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)
    table = rng.integers(-127, 128, (30, 16)).astype(np.int8)
    # Within +-63, as a file quantized with reduce_range: full-range int8 weights times uint8 activations saturate
    # onnxruntime's MatMulIntegerToFloat on x86 CPUs without VNNI, which no float form can follow.
    weight = rng.integers(-63, 64, (16, 8)).astype(np.int8)
    inits = [numpy_helper.from_array(a, n) for a, n in (
        (table, "table_quantized"), (np.array(0.02, np.float32), "table_scale"), (np.array(3, np.int8), "table_zp"),
        (weight, "w_quantized"), (np.array(0.01, np.float32), "w_scale"), (np.array(0, np.int8), "w_zp"),
        (rng.standard_normal(8).astype(np.float32), "bias"))]
    nodes = [helper.make_node("Gather", ["table_quantized", "ids"], ["rows_quantized"], name="embed"),
             helper.make_node("DequantizeLinear", ["rows_quantized", "table_scale", "table_zp"], ["rows"], name="embed_dq"),
             helper.make_node("DynamicQuantizeLinear", ["rows"], ["xq", "xs", "xzp"], name="dql"),
             helper.make_node("MatMulIntegerToFloat", ["xq", "w_quantized", "xs", "w_scale", "xzp", "w_zp", "bias"], ["y"],
                              domain="com.microsoft", name="proj")]
    graph = helper.make_graph(nodes, "saved", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14), helper.make_opsetid("com.microsoft", 1)])
    path = tmp_path / "saved.onnx"
    onnx.save(model, str(path))
    report = check(path, {"ids": rng.integers(0, 30, (16, 5)).astype(np.int64)})
    assert report.passed, report.format()
    imported = import_model(model)
    assert imported.dequantized == ["DequantizeLinear 'embed_dq' -> Gather", "MatMulIntegerToFloat 'proj' -> MatMul + Add"]
    assert imported.integer_bits == 8
    # The float table and weight are what onnxruntime decodes: (q - zero point) * scale.
    weights = {w.onnx_name: imported.onnx_values([w])[w.param] for w in imported.weights}
    np.testing.assert_array_equal(weights["table"], ((table.astype(np.int64) - 3) * np.float32(0.02)).astype(np.float32))
    np.testing.assert_array_equal(weights["w"], weight.astype(np.float32) * np.float32(0.01))
