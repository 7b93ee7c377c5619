"""Tests for onnx_admm.validate: onnxruntime A/B, sizes with external data, weight counts, latency."""

import gzip
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_admm.converters.errors import UserError
from onnx_admm.converters.graphinfo import graph_inputs
from onnx_admm.data import Dataset
from onnx_admm.sources import PluginData
from onnx_admm.storage import count_weights, model_files
from onnx_admm.tables import format_table
from onnx_admm.validate import open_session, validate

RNG = np.random.default_rng(0)
W = RNG.standard_normal((5, 6)).astype(np.float32)  # Gemm transB=1: [classes, features]
B = RNG.standard_normal(5).astype(np.float32)
X = RNG.standard_normal((50, 6)).astype(np.float32)


def _classifier(weight=W, batch="N", sparse=False) -> onnx.ModelProto:
    """x[N, 6] -> Gemm -> logits[N, 5] -> Softmax -> probs."""
    nodes = [
        helper.make_node("Gemm", ["x", "W", "B"], ["logits"], name="fc", transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=1),
    ]
    inits = [numpy_helper.from_array(B, "B")]
    sparse_inits = []
    if sparse:
        flat = weight.ravel()
        nz = np.flatnonzero(flat).astype(np.int64)
        sparse_inits.append(
            helper.make_sparse_tensor(numpy_helper.from_array(flat[nz], "W"), numpy_helper.from_array(nz, "W_idx"), weight.shape)
        )
    else:
        inits.append(numpy_helper.from_array(weight, "W"))
    graph = helper.make_graph(
        nodes,
        "clf",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 6])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 5]),
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, [batch, 5]),
        ],
        inits,
        sparse_initializer=sparse_inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _save(model, path, **kwargs):
    onnx.save(model, str(path), **kwargs)
    return path


def _data(labels=None):
    return Dataset({"x": X}, labels, {"x"})


def _logits(weight):
    return X @ weight.T + B


def test_model_against_itself(tmp_path):
    path = _save(_classifier(), tmp_path / "m.onnx")
    labels = np.argmax(_logits(W), 1)
    labels[:10] = (labels[:10] + 1) % 5  # 40 of 50 right
    report = validate(path, path, _data(labels), batch_size=16, latency_batches=4)
    assert [d.name for d in report.outputs] == ["logits", "probs"]
    assert all(d.max_abs == 0 and d.mean_abs == 0 for d in report.outputs)
    assert report.score_output == "logits"
    assert report.agreement == 1.0
    assert report.original.accuracy == report.compressed.accuracy == pytest.approx(0.8)
    assert report.samples == 50 and report.batch_size == 16 and report.latency_batch_size == 16
    assert report.original.latency_ms > 0 and report.compressed.latency_ms > 0
    assert report.original.parameters == W.size and report.original.nonzeros == W.size
    assert report.original.bytes == path.stat().st_size
    assert report.original.gzip_bytes == len(gzip.compress(path.read_bytes(), compresslevel=9))
    assert report.accuracy_drop == 0
    json.dumps(report.to_dict())
    table = format_table(report)
    assert "accuracy" in table and "80.00%" in table and "task metric: top-1 agreement with the original on 'logits': 100.00% (per sample)" in table.splitlines()[1]


def test_perturbed_weight_agreement_and_diffs(tmp_path):
    perturbed = W.copy()
    perturbed[2] += 1.5  # favours class 2
    original = _save(_classifier(), tmp_path / "a.onnx")
    compressed = _save(_classifier(perturbed), tmp_path / "b.onnx")
    labels = np.argmax(_logits(W), 1)
    report = validate(original, compressed, _data(labels), batch_size=7, latency_batches=0)
    expected = np.mean(np.argmax(_logits(W), 1) == np.argmax(_logits(perturbed), 1))
    assert 0 < expected < 1
    assert report.agreement == pytest.approx(expected)
    assert report.original.accuracy == 1.0
    assert report.compressed.accuracy == pytest.approx(expected)
    diff = np.abs(_logits(W).astype(np.float64) - _logits(perturbed))
    logits = report.outputs[0]
    assert logits.max_abs == pytest.approx(diff.max(), rel=1e-5)
    assert logits.mean_abs == pytest.approx(diff.mean(), rel=1e-5)
    assert report.original.latency_ms is None and report.latency_batch_size is None


def test_sizes_include_external_data(tmp_path):
    path = _save(_classifier(), tmp_path / "ext.onnx", save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    data_file = tmp_path / "ext.onnx.data"
    assert data_file.exists()
    assert model_files(path) == [path, data_file]
    report = validate(path, path, _data(), latency_batches=1)
    files = (path, data_file)
    assert report.original.files == tuple(map(str, files))
    assert report.original.bytes == sum(f.stat().st_size for f in files)
    assert report.original.gzip_bytes == sum(len(gzip.compress(f.read_bytes(), compresslevel=9)) for f in files)
    assert report.original.parameters == W.size


def test_sparse_initializer_counts_nonzeros(tmp_path):
    pruned = W.copy()
    pruned[np.abs(pruned) < 0.8] = 0
    nonzeros = int(np.count_nonzero(pruned))
    assert 0 < nonzeros < W.size
    assert count_weights(_classifier(pruned, sparse=True)) == (W.size, nonzeros)
    dense = _save(_classifier(pruned), tmp_path / "dense.onnx")
    sparse = _save(_classifier(pruned, sparse=True), tmp_path / "sparse.onnx")
    report = validate(dense, sparse, _data(), latency_batches=2)
    assert report.outputs[0].max_abs == 0 and report.agreement == 1.0
    assert report.compressed.nonzeros == nonzeros
    assert report.compression_ratio == pytest.approx(W.size / nonzeros)


def test_dequantized_weight_counted_as_decoded_tensor():
    model = _classifier()
    q = np.round(W / 0.1).astype(np.int8)
    q[0] = 0
    del model.graph.initializer[1:]  # drop W, keep B
    model.graph.initializer.extend(
        [numpy_helper.from_array(q, "W_q"), numpy_helper.from_array(np.array(0.1, np.float32), "W_scale")]
    )
    model.graph.node.insert(0, helper.make_node("DequantizeLinear", ["W_q", "W_scale"], ["W"], name="W_dq"))
    assert count_weights(model) == (W.size, int(np.count_nonzero(q)))


def test_fixed_batch_model_runs_at_its_batch_size(tmp_path):
    path = _save(_classifier(batch=4), tmp_path / "fixed.onnx")
    report = validate(path, path, _data(), batch_size=64, latency_batches=2)
    assert report.batch_size == 4 and report.samples == 48 and report.latency_batch_size == 4
    assert report.agreement == 1.0


def test_different_outputs_rejected(tmp_path):
    original = _save(_classifier(), tmp_path / "a.onnx")
    other = _classifier()
    other.graph.output[1].name = "renamed"
    other.graph.node[1].output[0] = "renamed"
    with pytest.raises(UserError, match=r"compressed model's graph outputs \['logits', 'renamed'\] differ"):
        validate(original, _save(other, tmp_path / "b.onnx"), _data(), latency_batches=0)


def test_score_output_override(tmp_path):
    path = _save(_classifier(), tmp_path / "m.onnx")
    assert validate(path, path, _data(), score_output="probs", latency_batches=0).score_output == "probs"
    with pytest.raises(UserError, match="output 'nope' is neither a graph output nor a tensor a node computes"):
        validate(path, path, _data(), score_output="nope", latency_batches=0)


def test_open_session_errors(tmp_path):
    with pytest.raises(UserError, match="missing.onnx does not exist"):
        open_session(tmp_path / "missing.onnx")
    broken = _classifier()
    broken.graph.node[0].input[1] = "undefined_tensor"
    path = _save(broken, tmp_path / "broken.onnx")
    with pytest.raises(UserError, match=r"cannot load .*broken.onnx in onnxruntime: .*; check it with onnx.checker") as info:
        open_session(path)
    assert "\n" not in str(info.value)
    session = open_session(_save(_classifier(), tmp_path / "ok.onnx"), threads=1)
    assert session.get_session_options().intra_op_num_threads == 1


def test_plugin_data_is_read_in_full(tmp_path):
    model = _classifier()
    path = _save(model, tmp_path / "m.onnx")
    labels = np.argmax(_logits(W), 1)

    def chunks():
        for start in range(0, len(X), 20):
            yield {"x": X[start:start + 20], "labels": labels[start:start + 20]}

    report = validate(path, path, PluginData(chunks, graph_inputs(model)), batch_size=8, latency_batches=0)
    assert report.samples == len(X) and report.original.accuracy == 1.0


def test_nan_outputs_are_not_hidden_in_the_difference(tmp_path):
    from onnx_admm.comparison import Comparison

    comparison = Comparison(["y"], None)
    good = np.ones((2, 3), np.float32)
    bad = good.copy()
    bad[0, 0] = np.nan
    comparison.add([{"y": good}, {"y": bad}], None)
    comparison.add([{"y": good}, {"y": good}], None)
    (diff,) = comparison.diffs()
    assert np.isnan(diff.max_abs)


def test_tensor_storage_bits_paper_style():
    from onnx_admm.storage import tensor_storage_bits

    dense = np.arange(1, 1001, dtype=np.float32)  # 1000 distinct values: fp32, no index
    assert tensor_storage_bits(dense) == 1000 * 32
    pruned = np.zeros(100, np.float32)
    pruned[[3, 50, 99]] = [0.5, -0.25, 0.125]  # 3 distinct -> 2 bits + codebook; largest gap 49 -> 6 bits
    assert tensor_storage_bits(pruned) == 3 * 2 + 3 * 32 + 3 * 6
    binary = np.where(np.arange(64) % 2 == 0, 0.3, -0.3).astype(np.float32)
    assert tensor_storage_bits(binary) == 64 * 1 + 2 * 32
    assert tensor_storage_bits(np.zeros(10, np.float32)) == 0


def test_an_original_that_predicts_one_class_for_every_sample_is_named(tmp_path):
    constant = _save(_classifier(W * 1e-3), tmp_path / "constant.onnx")  # B decides every sample's class
    report = validate(constant, constant, _data(), batch_size=16, latency_batches=0)
    assert report.task["reference_classes"] == 1
    assert report.constant_reference() == (
        "the original model predicts the same class for all 50 held-out samples, so top-1 agreement says little "
        "about the compressed one; check that the data is what the model expects (layout, scaling, channel "
        "order) or give labels")
    varied = _save(_classifier(), tmp_path / "varied.onnx")
    report = validate(varied, varied, _data(), batch_size=16, latency_batches=0)
    assert report.task["reference_classes"] == len(np.unique(np.argmax(_logits(W), 1))) > 1
    assert report.constant_reference() is None


def test_compress_report_warns_of_an_original_that_predicts_one_class(tmp_path):
    from onnx_admm.api import compress
    from onnx_admm.recipe import CompressConfig

    path = _save(_classifier(W * 1e-3), tmp_path / "constant.onnx")
    np.savez(tmp_path / "d.npz", x=np.repeat(X, 4, axis=0))
    config = CompressConfig.from_dict({"prune": {"sparsity": 0.5}, "train": {"epochs": 1, "threads": 1}})
    report = compress(path, str(tmp_path / "d.npz"), config, metric_floor=0).report
    assert report["metrics"]["task"]["reference_classes"] == 1
    assert [w for w in report["warnings"] if "predicts the same class for all" in w]


def test_compress_report_says_when_onnxruntime_does_not_compute_what_was_trained(tmp_path, monkeypatch):
    # The written file is run in onnxruntime against the trained weights in torch on a few held-out samples
    # (pipeline.fidelity): a runtime that reads the stored weights otherwise (onnxruntime 1.32 misread int2
    # MatMul weights with N % 4 != 0) must not pass for a model the compression destroyed.
    import onnx_admm.pipeline.results as results
    from onnx_admm.api import compress
    from onnx_admm.recipe import CompressConfig

    path = _save(_classifier(), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=np.repeat(X, 4, axis=0))
    config = CompressConfig.from_dict({"prune": {"sparsity": 0.5}, "train": {"epochs": 1, "threads": 1}})
    check = compress(path, str(tmp_path / "d.npz"), config, metric_floor=0).report["written_vs_trained"]
    assert check["agrees"] and check["samples"] == 16 and set(check["outputs"]) == {"logits", "probs"}
    assert check["worst"] < 1e-5

    real = results.write_back

    def shifted_bias(*args, **kwargs):  # a runtime that reads the file otherwise: the bias comes out shifted
        written = real(*args, **kwargs)
        bias = next(t for t in written.model.graph.initializer if t.name == "B")
        bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 3.0, "B"))
        return written

    monkeypatch.setattr(results, "write_back", shifted_bias)
    report = compress(path, str(tmp_path / "d.npz"), config, metric_floor=0).report
    check = report["written_vs_trained"]
    assert not check["agrees"] and check["worst"] > 0.5
    (warning,) = [w for w in report["warnings"] if w.startswith("onnxruntime does not compute what was trained")]
    assert "on 16 held-out samples its output 'logits' differs" in warning
