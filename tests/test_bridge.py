"""The ONNX <-> torch bridge on every test model: import, weight map, gradients, write-back, check."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from models import MODELS, expected_weight_names

from onnx_admm.converters.graphinfo import constant_sources, tensor_value
from onnx_admm.converters.importer import import_model
from onnx_admm.converters.inputs import synthesize_inputs
from onnx_admm.converters.modelio import external_data_files, load_model, save_model
from onnx_admm.converters.writeback import TensorUpdate, write_back
from onnx_admm.check import ATOL, RTOL, check

# torch vs onnxruntime, same float32 weights: the tolerance `check` uses (ATOL + RTOL * max|ref|).
TOLERANCE = (ATOL, RTOL)


def _ort(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def _close(reference, other):
    for ref, got in zip(reference, other):
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        assert np.all(np.abs(ref - got) <= ATOL + RTOL * scale), float(np.abs(ref - got).max())


def test_check_passes(any_onnx_model):
    report = check(any_onnx_model.path)
    assert report.passed, report.format()
    assert [s.name for s in report.steps] == [
        "import", "torch vs onnxruntime", "backward", "perturbed write-back", "binary write-back", "unchanged write-back"]


def test_weight_map_names_values_and_gradients(any_onnx_model):
    original = load_model(any_onnx_model.path)
    imported = import_model(original)
    expected = expected_weight_names(onnx.load(str(any_onnx_model.path)))
    assert sorted({e.onnx_name for e in imported.compressible()}) == sorted(expected)
    # Every entry maps back to its tensor by value (ONNX layout), and is a trainable Parameter.
    sources = constant_sources(original)
    values = imported.onnx_values()
    for entry in imported.weights:
        if entry.owns_tensor:
            np.testing.assert_array_equal(values[entry.param], tensor_value(original, sources[entry.onnx_name]))
        assert imported.parameter(entry).requires_grad
    # One backward pass reaches every trainable tensor.
    feeds = synthesize_inputs(original, batch=3)
    outputs = imported.module(*[torch.from_numpy(feeds[n]) for n in imported.input_names])
    sum(o.pow(2).mean() for o in outputs if o.is_floating_point()).backward()
    for entry in imported.weights:
        grad = imported.parameter(entry).grad
        assert grad is not None and torch.isfinite(grad).all(), entry.onnx_name
    # Nothing trains that cannot be written back.
    mapped = {e.param for e in imported.weights}
    assert {n for n, p in imported.module.named_parameters() if p.requires_grad} == mapped


def test_torch_matches_onnxruntime_at_other_batch(any_onnx_model):
    original = load_model(any_onnx_model.path)
    imported = import_model(original)
    feeds = synthesize_inputs(original, batch=5, seed=3)
    _close(_ort(any_onnx_model.path, feeds), imported.run(feeds))


def test_batchnorm_scale_and_shift_train(resnet_block_torchscript_onnx):
    original = load_model(resnet_block_torchscript_onnx)
    imported = import_model(original)
    bn_inputs = {n.input[i] for n in original.graph.node if n.op_type == "BatchNormalization" for i in (1, 2)}
    assert len(bn_inputs) == 6
    trainable = {e.onnx_name for e in imported.weights}
    assert bn_inputs <= trainable
    roles = {e.onnx_name: e.role for e in imported.weights}
    assert {roles[n] for n in bn_inputs} == {"scale", "shift"}


def test_transformer_matmul_weights_are_parameters(transformer_torchscript_onnx):
    original = load_model(transformer_torchscript_onnx)
    imported = import_model(original)
    matmul = [e for e in imported.compressible() if e.op_type == "MatMul"]
    assert len(matmul) == 3
    names = {n for n, _ in imported.module.named_parameters()}
    assert all(e.param in names for e in matmul)


def test_shared_gemm_weight_is_tied(shared_gemm_onnx):
    imported = import_model(load_model(shared_gemm_onnx))
    shared = [e for e in imported.compressible()]
    assert len(shared) == 1 and len(shared[0].consumers) == 2
    assert shared[0].owns_tensor


def test_unchanged_write_back_is_byte_identical(any_onnx_model, tmp_path):
    original = load_model(any_onnx_model.path)
    imported = import_model(original)
    result = write_back(original, imported.updates())
    assert result.encodings == {}
    assert result.model.SerializeToString() == original.SerializeToString()


def test_perturbed_write_back_matches_torch_and_keeps_graph(any_onnx_model, tmp_path):
    original = load_model(any_onnx_model.path)
    imported = import_model(original)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for entry in imported.weights:
            p = imported.parameter(entry)
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
            if entry.compressible:
                p.mul_((torch.rand(p.shape, generator=g) < 0.05).float())
    feeds = synthesize_inputs(original, batch=4, seed=1)
    expected = imported.run(feeds)
    result = write_back(original, imported.updates())
    out = tmp_path / "out.onnx"
    save_model(result.model, out, external_data=any_onnx_model.exporter == "dynamo")
    onnx.checker.check_model(str(out))
    _close(expected, _ort(out, feeds))
    written = onnx.load(str(out), load_external_data=False)
    assert [i.name for i in written.graph.input] == [i.name for i in original.graph.input]
    assert [o.SerializeToString() for o in written.graph.output] == [o.SerializeToString() for o in original.graph.output]
    assert [n.name for n in written.graph.node] == [n.name for n in original.graph.node]
    # Written with external data like the original: every dense tensor over 1 KiB lives in out.onnx.data.
    if any_onnx_model.exporter == "dynamo":
        large = [t for t in written.graph.initializer if np.prod(t.dims) * 4 > 1024]
        assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in large)
        assert external_data_files(written) == ({"out.onnx.data"} if large else set())


def test_sparse_encoder_only_where_smaller():
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 3] y) {
            y = Gemm <transB = 1> (x, W)
        }
    """)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((3, 4), np.float32), "W"))
    dense = write_back(model, [TensorUpdate("W", np.full((3, 4), 2.0, np.float32))])
    assert dense.encodings == {"W": "dense"}
    sparse_value = np.zeros((3, 4), np.float32)
    sparse_value[1, 2] = 5.0
    sparse = write_back(model, [TensorUpdate("W", sparse_value)])
    assert sparse.encodings == {"W": "sparse"}
    (s,) = sparse.model.graph.sparse_initializer
    assert onnx.numpy_helper.to_array(s.indices).dtype == np.int64
    assert onnx.numpy_helper.to_array(s.indices).tolist() == [6]
    onnx.checker.check_model(sparse.model)
    x = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
    got = ort.InferenceSession(sparse.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(got[0], x @ sparse_value.T, rtol=1e-6, atol=1e-6)


def test_constant_node_weights_are_written_back_in_place(constant_weights_onnx, tmp_path):
    original = load_model(constant_weights_onnx)
    imported = import_model(original)
    assert {e.location for e in imported.weights} == {"constant"}
    with torch.no_grad():
        for entry in imported.weights:
            imported.parameter(entry).mul_(0.5)
    result = write_back(original, imported.updates())
    assert len(result.model.graph.initializer) == 0
    constants = [n for n in result.model.graph.node if n.op_type == "Constant"]
    assert len(constants) == len([n for n in original.graph.node if n.op_type == "Constant"])
    feeds = synthesize_inputs(original, batch=2)
    path = tmp_path / "c.onnx"
    save_model(result.model, path)
    _close(imported.run(feeds), _ort(path, feeds))


def test_registry_covers_every_model():
    assert {"lenet5", "resnet_block", "mobilenet_block", "transformer"} <= set(MODELS)


@pytest.mark.parametrize("allowzero_shape, kept", [([2, 6], False), ([0, 6], True)])
def test_normalize_drops_allowzero_only_without_zero(allowzero_shape, kept):
    from onnx_admm.converters.normalize import drop_reshape_allowzero

    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3, 4] x) => (float[2, 12] y) {
            y = Reshape <allowzero = 1> (x, s)
        }
    """)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(allowzero_shape, np.int64), "s"))
    changed = drop_reshape_allowzero(model)
    assert changed is (not kept)
    assert any(a.name == "allowzero" for a in model.graph.node[0].attribute) is kept


@pytest.mark.parametrize("piece, kept", [([12], False), ([0], True)])
def test_normalize_drops_allowzero_of_a_computed_shape_whose_constant_pieces_hold_no_zero(piece, kept):
    """The dynamo exporter's shapes with a dynamic sequence length: dims read at run time, Concat with
    constants."""
    from onnx_admm.converters.normalize import drop_reshape_allowzero

    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3, 4] x) => (float[N, 12] y) {
            n = Shape <start = 0, end = 1> (x)
            s = Concat <axis = 0> (n, c)
            y = Reshape <allowzero = 1> (x, s)
        }
    """)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(piece, np.int64), "c"))
    assert drop_reshape_allowzero(model) is (not kept)
    assert any(a.name == "allowzero" for a in model.graph.node[2].attribute) is kept


def test_gather_embedding_table_is_a_compressible_parameter(tmp_path):
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[N, 5] ids) => (float[N, 3] logits) {
            e = Gather (E, ids)
            m = ReduceMean <axes = [1], keepdims = 0> (e)
            logits = Gemm <transB = 1> (m, W, b)
        }
    """)
    rng = np.random.default_rng(0)
    for name, shape in (("E", (20, 8)), ("W", (3, 8)), ("b", (3,))):
        model.graph.initializer.append(onnx.numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name))
    path = tmp_path / "emb.onnx"
    onnx.save(model, str(path))
    imported = import_model(load_model(path))
    assert {(e.onnx_name, e.op_type) for e in imported.compressible()} == {("E", "Gather"), ("W", "Gemm")}
    report = check(path)
    assert report.passed, report.format()


def test_compressed_sparse_model_imports_again(lenet5_torchscript_onnx, tmp_path):
    original = load_model(lenet5_torchscript_onnx)
    imported = import_model(original)
    with torch.no_grad():
        for entry in imported.compressible():
            p = imported.parameter(entry)
            p.mul_((p.abs() > p.abs().quantile(0.95)).float())
    path = tmp_path / "sparse.onnx"
    result = write_back(original, imported.updates())
    assert set(result.encodings.values()) == {"sparse"}
    save_model(result.model, path)
    again = import_model(load_model(path))
    for entry, value in zip(again.compressible(), again.onnx_values(again.compressible()).values()):
        assert (value == 0).mean() >= 0.95
    report = check(path)
    assert report.passed, report.format()


def _ir3_reshaped_weight() -> onnx.ModelProto:
    """Caffe2's layout at IR 3 (onnx's light inception_v1): every initializer is also a graph input, and the
    classifier's weight is read through a Reshape by a shape that is such an input too."""
    rng = np.random.default_rng(0)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Reshape", ["w_flat", "w_shape"], ["w"]),
         onnx.helper.make_node("Reshape", ["x", "x_shape"], ["flat"]),
         onnx.helper.make_node("Gemm", ["flat", "w", "b"], ["y"], transB=1)],
        "ir3", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 4])]
        + [onnx.helper.make_tensor_value_info(n, t, s) for n, t, s in (
            ("w_flat", onnx.TensorProto.FLOAT, [48]), ("w_shape", onnx.TensorProto.INT64, [2]),
            ("x_shape", onnx.TensorProto.INT64, [2]), ("b", onnx.TensorProto.FLOAT, [6]))],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 6])],
        [onnx.numpy_helper.from_array(rng.normal(size=48).astype(np.float32), "w_flat"),
         onnx.numpy_helper.from_array(np.array([6, 8], np.int64), "w_shape"),
         onnx.numpy_helper.from_array(np.array([1, 8], np.int64), "x_shape"),
         onnx.numpy_helper.from_array(rng.normal(size=6).astype(np.float32), "b")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 9)])
    model.ir_version = 3
    onnx.checker.check_model(model)
    return model


def test_inputs_with_initializers_are_their_defaults(tmp_path):
    # The torch side used to take x_shape (read at run time) as an input, and the fold of the reshaped weight
    # left w_flat / w_shape as inputs with no value: check died on a KeyError, the write-back lost them.
    original = _ir3_reshaped_weight()
    imported = import_model(original)
    assert imported.input_names == ["x"]
    (entry,) = [e for e in imported.weights if e.compressible]
    x = np.random.default_rng(1).normal(size=(1, 2, 4)).astype(np.float32)
    with torch.no_grad():
        weight = imported.parameter(entry)
        weight.mul_((torch.arange(weight.numel()).reshape(weight.shape) % 3 == 0).float())
    expected = imported.run({"x": x})
    result = write_back(original, imported.updates())
    path = tmp_path / "out.onnx"
    save_model(result.model, path)
    written = onnx.load(str(path))
    onnx.checker.check_model(written)
    # The graph's inputs and their defaults stay; the written weight is the masked one.
    assert [i.SerializeToString() for i in written.graph.input] == [i.SerializeToString() for i in original.graph.input]
    assert {t.name for t in original.graph.initializer} <= {t.name for t in written.graph.initializer}
    _close(expected, _ort(path, {"x": x}))
    assert written.ir_version == 4  # the written weight is an initializer that is no graph input
    assert np.count_nonzero(tensor_value(written, constant_sources(written)["w"])) == 16
    onnx.save(original, str(tmp_path / "original.onnx"))
    report = check(tmp_path / "original.onnx")
    assert report.passed, report.format()
