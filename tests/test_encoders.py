"""Quantized write-back encoders (DequantizeLinear int8/int4/int2, sparse int8, codebook Gather), the
opset raise and its fallback, and re-import through converters.dequantize.fold_weight_decoders.

References always come from the projected float weights (numpy on the floats, or the torch module holding
them), never from the exported integers.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from onnx_admm.converters.dequantize import fold_weight_decoders, weight_decoders
from onnx_admm.converters.importer import import_model
from onnx_admm.converters.inputs import synthesize_inputs
from onnx_admm.converters.modelio import load_model, save_model
from onnx_admm.converters.normalize import PASSES, normalize
from onnx_admm.converters.encoders import (
    CodebookEncoder,
    DenseEncoder,
    DequantizeLinearEncoder,
    QuantSpec,
    SparseDequantizeLinearEncoder,
    integer_levels,
)
from onnx_admm.converters.writeback import TensorUpdate, write_back
from onnx_admm.projections import Unstructured
from onnx_admm.quantizers import Binary, Codebook, Joint, Ternary, UniformQuant, quantize

RTOL = 1e-5


def _gemm_model(shape=(6, 8), opset=17, seed=0, trans_b=1):
    """y = Gemm(x, W, b); w = Identity(W), so a test reads the decoded weight itself."""
    out, inp = shape if trans_b else shape[::-1]
    model = onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        g (float[N, {inp}] x) => (float[N, {out}] y, float[{shape[0]}, {shape[1]}] w) {{
            y = Gemm <transB = {trans_b}> (x, W, b)
            w = Identity (W)
        }}
    """)
    rng = np.random.default_rng(seed)
    model.graph.initializer.extend([
        numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), "W"),
        numpy_helper.from_array(rng.normal(size=(out,)).astype(np.float32), "b"),
    ])
    return model


def _weight(model, name="W"):
    return torch.from_numpy(numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name)).copy())


def _update(constraint, w, name="W", allowed=None):
    """The projected float value and its QuantSpec, as the engine hands them to write-back."""
    qt = quantize(constraint, w, allowed)
    if qt is not None:
        return TensorUpdate(name, qt.dequantize().numpy(), quant=QuantSpec(qt.bits, qt.scale.numpy(), qt.axis))
    return TensorUpdate(name, constraint.project(w, allowed).numpy(), quant=QuantSpec(8))


def _run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _check_gemm(result, update, trans_b=1):
    """Checker + onnxruntime: decoded W equals the projected floats bitwise; y matches numpy on them."""
    model = result.model
    onnx.checker.check_model(model)
    w = update.value
    x = np.random.default_rng(1).normal(size=(3, w.shape[1] if trans_b else w.shape[0])).astype(np.float32)
    bias = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "b"))
    y, decoded = _run(model, {"x": x})
    assert decoded.dtype == np.float32 and np.array_equal(decoded, w)
    reference = x.astype(np.float64) @ (w.T if trans_b else w).astype(np.float64) + bias
    np.testing.assert_allclose(y, reference, rtol=RTOL, atol=RTOL * np.abs(reference).max())
    return model


def _opset(model):
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _quantized_tensor(model, name="W_quantized"):
    return next(t for t in model.graph.initializer if t.name == name)


@pytest.mark.parametrize(
    "bits, kind, opset", [(8, "int8", 17), (5, "int8", 17), (4, "int4", 21), (3, "int4", 21), (2, "int2", 25)]
)
@pytest.mark.parametrize("per_channel, axis", [(False, 0), (True, 0), (True, 1)])
def test_dequantize_linear_per_tensor_and_per_axis(bits, kind, opset, per_channel, axis):
    model = _gemm_model()
    update = _update(UniformQuant(bits, per_channel=per_channel, axis=axis), _weight(model))
    result = write_back(model, [update])
    assert result.encodings == {"W": kind} and _opset(result.model) == opset
    (node,) = [n for n in result.model.graph.node if n.op_type == "DequantizeLinear"]
    assert node.output == ["W"] and list(node.input) == ["W_quantized", "W_scale", "W_zero_point"]
    assert [a.i for a in node.attribute if a.name == "axis"] == ([axis] if per_channel else [])
    scale = numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == "W_scale"))
    assert scale.shape == ((update.value.shape[axis],) if per_channel else ())
    zero_point = next(t for t in result.model.graph.initializer if t.name == "W_zero_point")
    assert zero_point.data_type == _quantized_tensor(result.model).data_type
    assert not numpy_helper.to_array(zero_point).astype(np.int64).any()
    stored = numpy_helper.to_array(_quantized_tensor(result.model)).astype(np.int64)
    assert -(2 ** (bits - 1)) <= stored.min() and stored.max() <= 2 ** (bits - 1) - 1
    if bits == 2:  # the level only the full two's-complement range has is used and stored as is
        assert stored.min() == -2
    model = _check_gemm(result, update)
    # onnx's numpy-only reference runtime agrees with onnxruntime on the decoded weight (it has no
    # DequantizeLinear before opset 19, so not on the int8 models)
    if opset >= 19:
        decoded = ReferenceEvaluator(model).run(["w"], {"x": np.zeros((1, 8), np.float32)})[0]
        assert np.array_equal(decoded, update.value)


def test_int4_and_int2_are_packed_and_sizes_on_a_500x800_weight():
    """Measured file sizes (fp32 1.60 MB): int8 0.40 MB, int4 0.20 MB, int2 0.10 MB."""
    model = _gemm_model((500, 800))
    w = _weight(model)
    n = w.numel()
    dense = len(model.SerializeToString())
    sizes = {}
    for bits, kind, per_byte in ((8, "int8", 1), (4, "int4", 2), (2, "int2", 4)):
        update = _update(UniformQuant(bits), w)
        result = write_back(model, [update])
        assert result.encodings == {"W": kind}
        raw = _quantized_tensor(result.model).raw_data
        assert len(raw) == n // per_byte, "packed: 8 / bits values per byte"
        sizes[kind] = len(result.model.SerializeToString())
        other = dense - 4 * n  # bias, graph, protobuf framing
        assert sizes[kind] - other == pytest.approx(n / per_byte, abs=200)
        _check_gemm(result, update)
    assert sizes["int8"] > sizes["int4"] > sizes["int2"]
    print(f"\n500x800 weight, file bytes: fp32 {dense}, " + ", ".join(f"{k} {v}" for k, v in sizes.items()))


def test_pruned_and_quantized_takes_the_smallest_encoding():
    model = _gemm_model((500, 800))
    w = _weight(model)
    cases = [
        (10_000, UniformQuant(4), "sparse-int8"),  # 40x: 2.5% density
        (200_000, UniformQuant(4), "int4"),  # 50%
        (10_000, Codebook(15), "sparse-codebook"),
        (200_000, Codebook(15), "codebook-uint4"),
    ]
    for keep, quant, expected in cases:
        update = _update(Joint(Unstructured(keep), quant), w)
        result = write_back(model, [update])
        assert result.encodings == {"W": expected}
        decoded = _check_gemm(result, update)
        assert int(np.count_nonzero(update.value)) <= keep
        if expected == "sparse-int8":
            (sparse,) = decoded.graph.sparse_initializer
            assert sparse.values.data_type == onnx.TensorProto.INT8 and sparse.values.name == "W_quantized"
            encoders = (DequantizeLinearEncoder(), SparseDequantizeLinearEncoder())
            candidates = [e.encode("W", update.value, update.quant) for e in encoders]
            assert candidates[1].nbytes < candidates[0].nbytes
            assert candidates[1].nbytes == pytest.approx(9 * np.count_nonzero(update.value), rel=0.01)


@pytest.mark.parametrize("constraint, levels", [(Binary(), 2), (Ternary(), 3), (Binary(per_channel=True), None)])
def test_binary_and_ternary_export_as_int2(constraint, levels):
    model = _gemm_model((10, 12))
    update = _update(constraint, _weight(model))
    result = write_back(model, [update])
    assert result.encodings == {"W": "int2"}
    decoded = _run(_check_gemm(result, update), {"x": np.zeros((1, 12), np.float32)})[1]
    if levels is not None:
        assert np.unique(decoded).size == levels
    else:
        assert all(np.unique(row).size == 2 for row in decoded)


@pytest.mark.parametrize("op, columns, kind, identity", [
    ("MatMul", 11, "int4", False), ("MatMul", 12, "int2", False), ("Gemm", 11, "int4", False),
    ("MatMul", 11, "int4", True)])  # read through an Identity, which onnxruntime drops before it fuses
def test_binary_matmul_weight_with_columns_not_in_whole_bytes_is_stored_as_int4(op, columns, kind, identity):
    # onnxruntime fuses DequantizeLinear + MatMul (or Gemm without transB) into MatMulNBits at its default
    # optimization level and reads an int2 [K, N] weight wrongly when N % 4 != 0 (a binary Keras CTC reader's
    # 64 x 11 head: outputs off by their own size). Such a weight goes to int4; N = 12 keeps int2. The default
    # session must match numpy.
    model = onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 64] x) => (float[N, {columns}] y) {{
            w = Identity (W)
            y = {op} (x, {"w" if identity else "W"})
        }}
    """)
    rng = np.random.default_rng(0)
    model.graph.initializer.append(numpy_helper.from_array(rng.normal(size=(64, columns)).astype(np.float32), "W"))
    update = _update(Binary(per_channel=True, axis=1), _weight(model))
    result = write_back(model, [update])
    assert result.encodings == {"W": kind}
    x = rng.normal(size=(8, 64)).astype(np.float32)
    (y,) = _run(result.model, {"x": x})
    reference = x.astype(np.float64) @ update.value.astype(np.float64)
    # MatMulNBits quantizes the activations to int8 (accuracy level 4): about 0.5% of max |y|; the int2 misread
    # was about 100%.
    np.testing.assert_allclose(y, reference, atol=0.03 * np.abs(reference).max())


def test_codebook_through_cast_and_gather():
    model = _gemm_model((20, 30))
    w = _weight(model)
    for clusters, kind, opset in ((4, "codebook-uint2", 25), (16, "codebook-uint4", 21), (100, "codebook-uint8", 17)):
        update = _update(Codebook(clusters), w)
        result = write_back(model, [update])
        assert result.encodings == {"W": kind} and _opset(result.model) == opset
        cast, gather = [n for n in result.model.graph.node if n.op_type in ("Cast", "Gather")]
        assert [a.i for a in cast.attribute if a.name == "to"] == [onnx.TensorProto.INT64]
        assert gather.input[1] == cast.output[0] and gather.output == ["W"]
        indices = next(t for t in result.model.graph.initializer if t.name == "W_indices")
        codebook = numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == "W_codebook"))
        assert list(indices.dims) == [20, 30] and codebook.ndim == 1 and codebook.size <= clusters
        _check_gemm(result, update)


def test_quantized_encoders_need_an_exact_spec():
    model = _gemm_model()
    w = _weight(model)
    qt = UniformQuant(4).quantize(w)
    value = qt.dequantize().numpy()
    exact = QuantSpec(4, qt.scale.numpy())
    assert integer_levels(value, exact) is not None
    # no spec: dense / sparse only, as before this encoder existed
    assert write_back(model, [TensorUpdate("W", value)]).encodings == {"W": "dense"}
    # a scale that does not reproduce the values bit for bit: not applied
    off = QuantSpec(4, qt.scale.numpy() * np.float32(1.0000001))
    assert integer_levels(value, off) is None
    assert DequantizeLinearEncoder().encode("W", value, off) is None
    only_dequantize = (DenseEncoder(), DequantizeLinearEncoder())
    assert write_back(model, [TensorUpdate("W", value, quant=off)], only_dequantize).encodings == {"W": "dense"}
    # ... while the codebook encoder, exact by construction, still stores its 15 levels
    assert write_back(model, [TensorUpdate("W", value, quant=off)]).encodings == {"W": "codebook-uint4"}
    # values outside the bits' range, float64 weights, per-axis scales of the wrong length
    assert integer_levels(value, QuantSpec(2, qt.scale.numpy())) is None
    assert DequantizeLinearEncoder().encode("W", value.astype(np.float64), exact) is None
    assert integer_levels(value, QuantSpec(4, np.ones(5, np.float32), axis=0)) is None
    # a codebook spec has no scale: only the codebook encoder applies
    assert DequantizeLinearEncoder().encode("W", value, QuantSpec(4)) is None
    assert CodebookEncoder().encode("W", value, None) is None
    assert DenseEncoder().encode("W", value, exact).kind == "dense"
    with pytest.raises(ValueError, match="positive finite"):
        QuantSpec(4, np.array([0.0, 1.0], np.float32), axis=0)
    with pytest.raises(ValueError, match="from 1 to 8"):
        QuantSpec(9)


def test_new_names_never_collide():
    model = _gemm_model()
    # an existing tensor and node already use the names the encoder would pick
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), "W_quantized"))
    model.graph.node.append(onnx.helper.make_node("Identity", ["W_quantized"], ["W_scale"], name="W_DequantizeLinear"))
    model.graph.output.append(onnx.helper.make_tensor_value_info("W_scale", onnx.TensorProto.FLOAT, [3]))
    update = _update(UniformQuant(4), _weight(model))
    result = write_back(model, [update])
    names = [n.name for n in result.model.graph.node if n.name]
    assert len(names) == len(set(names)) and "W_DequantizeLinear2" in names
    outputs = [o for n in result.model.graph.node for o in n.output]
    tensors = [t.name for t in result.model.graph.initializer]
    assert len(set(outputs + tensors)) == len(outputs) + len(tensors)
    old_nodes = [n.SerializeToString() for n in model.graph.node]
    assert [n.SerializeToString() for n in result.model.graph.node][-len(old_nodes) :] == old_nodes
    assert {"W_quantized2", "W_scale2"} <= set(tensors)
    x = np.ones((1, 8), np.float32)
    assert np.array_equal(_run(result.model, {"x": x})[1], update.value)


def _quantize_lenet(imported, spec_of):
    """Project every compressible weight of the torch module in place; return updates with their specs."""
    specs = {}
    with torch.no_grad():
        for i, entry in enumerate(imported.compressible()):
            p = imported.parameter(entry)
            constraint = spec_of(i)
            update = _update(constraint, p.detach().clone(), entry.onnx_name)
            p.copy_(torch.from_numpy(update.value))
            specs[entry.onnx_name] = update.quant
    return [dataclasses.replace(u, quant=specs.get(u.onnx_name)) for u in imported.updates()]


def test_lenet_export_matches_torch_keeps_graph_and_reimports(lenet5_torchscript_onnx, tmp_path):
    original = load_model(lenet5_torchscript_onnx)
    imported = import_model(original)
    constraints = [
        UniformQuant(8, per_channel=True),
        Codebook(15),
        Joint(Unstructured(8000), Codebook(15)),
        Ternary(),
    ]
    updates = _quantize_lenet(imported, lambda i: constraints[i])
    feeds = synthesize_inputs(original, batch=3, seed=2)
    expected = imported.run(feeds)  # torch, on the projected float weights
    result = write_back(original, updates)
    assert result.encodings == {
        "conv1.weight": "int8",
        "conv2.weight": "codebook-uint4",
        "fc1.weight": "sparse-codebook",
        "fc2.weight": "int2",
    }
    assert _opset(result.model) == 25 and result.model.ir_version >= 13 and not result.notes
    assert any(c.startswith("opset 17 -> 25: only the opset number changed") for c in result.changes)
    path = tmp_path / "q.onnx"
    save_model(result.model, path)
    onnx.checker.check_model(str(path))
    got = _run(load_model(path), feeds)
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=RTOL * np.abs(a).max())
    # graph I/O and every original node name and order unchanged; new nodes only in front
    written = result.model
    for field in ("input", "output"):
        new, old = getattr(written.graph, field), getattr(original.graph, field)
        assert [v.SerializeToString() for v in new] == [v.SerializeToString() for v in old]
    old_nodes = [n.SerializeToString() for n in original.graph.node]
    assert [n.SerializeToString() for n in written.graph.node][-len(old_nodes):] == old_nodes
    assert path.stat().st_size < 0.2 * original.ByteSize()

    # re-import: the decoders fold back into exactly the projected floats
    folded = normalize(load_model(path), passes=[fold_weight_decoders, *PASSES])
    assert not weight_decoders(folded)
    again = import_model(folded)
    values = {e.onnx_name: v for e, v in zip(again.compressible(), again.onnx_values(again.compressible()).values())}
    for update in updates:
        if update.quant is not None:
            assert np.array_equal(values[update.onnx_name], update.value), update.onnx_name
    for a, b in zip(expected, again.run(feeds)):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=RTOL * np.abs(a).max())


def test_compressed_model_compresses_again(lenet5_torchscript_onnx):
    original = load_model(lenet5_torchscript_onnx)
    pruned = Joint(Unstructured(2000), UniformQuant(4))
    first = write_back(original, _quantize_lenet(import_model(original), lambda i: pruned if i == 2 else UniformQuant(4)))
    assert first.encodings["fc1.weight"] == "sparse-int8"
    compressed = first.model
    # the compressed model imports (after folding), its weights change again, write-back replaces decoders
    imported = import_model(normalize(compressed, passes=[fold_weight_decoders, *PASSES]))
    updates = _quantize_lenet(imported, lambda i: Ternary(per_channel=True))
    feeds = synthesize_inputs(original, batch=2, seed=3)
    expected = imported.run(feeds)
    second = write_back(compressed, updates)
    # fc1 (2000 weights on the 4-bit grid) is already ternary: unchanged, its sparse decoder stays
    assert second.encodings == {"conv1.weight": "int2", "conv2.weight": "int2", "fc2.weight": "int2"}
    assert not second.notes and _opset(second.model) == 25
    assert sum(n.op_type == "DequantizeLinear" for n in second.model.graph.node) == 4
    assert len({n.name for n in second.model.graph.node}) == len(second.model.graph.node)
    assert not [t for t in second.model.graph.initializer if t.name.endswith("2")], "old parts removed, names reused"
    onnx.checker.check_model(second.model)
    for a, b in zip(expected, _run(second.model, feeds)):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=RTOL * np.abs(a).max())


def test_opset_raise_takes_the_converter_rewrites(transformer_torchscript_onnx):
    """A plain opset bump 17 -> 21 breaks this model (ReduceMean axes became an input at 18)."""
    original = load_model(transformer_torchscript_onnx)
    imported = import_model(original)
    updates = _quantize_lenet(imported, lambda i: UniformQuant(4, per_channel=True))
    feeds = synthesize_inputs(original, batch=2, seed=0)
    expected = imported.run(feeds)
    result = write_back(original, updates)
    assert set(result.encodings.values()) == {"int4"} and _opset(result.model) == 21
    (how,) = [c for c in result.changes if c.startswith("opset")]
    assert "/ReduceMean" in how and "opset21_Constant" in how
    onnx.checker.check_model(result.model)
    names = [n.name for n in result.model.graph.node]
    old_names = [n.name for n in original.graph.node if n.name]
    assert [n for n in names if n in set(old_names)] == old_names
    for a, b in zip(expected, _run(result.model, feeds)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def _groupnorm_model():
    # GroupNormalization changed meaning at opset 21 (scale per channel, not per group): version_converter
    # leaves the node as is, onnx.checker passes, onnxruntime fails at run time.
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[N, 8] x) => (float[N, 4, 3] y, float[12, 8] w) {
            h = Gemm <transB = 1> (x, W)
            r = Reshape (h, shape)
            y = GroupNormalization <num_groups = 2> (r, gamma, beta)
            w = Identity (W)
        }
    """)
    rng = np.random.default_rng(0)
    model.graph.initializer.extend([
        numpy_helper.from_array(rng.normal(size=(12, 8)).astype(np.float32), "W"),
        numpy_helper.from_array(np.array([-1, 4, 3], np.int64), "shape"),
        numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "gamma"),
        numpy_helper.from_array(np.array([0.0, 0.5], np.float32), "beta"),
    ])
    return model


def test_unverifiable_opset_raise_falls_back_to_int8():
    model = _groupnorm_model()
    update = _update(UniformQuant(4), _weight(model))
    result = write_back(model, [update])
    assert result.encodings == {"W": "int8"} and _opset(result.model) == 18
    assert "int4 needs opset 21" in result.notes["W"] and "onnxruntime fails" in result.notes["W"]
    x = np.random.default_rng(0).normal(size=(2, 8)).astype(np.float32)
    assert np.array_equal(_run(result.model, {"x": x})[1], update.value)
    capped = write_back(_gemm_model(), [_update(UniformQuant(2), _weight(_gemm_model()))], max_opset=17)
    assert capped.encodings == {"W": "int8"} and "max_opset=17" in capped.notes["W"]
    assert _opset(capped.model) == 17


def test_fold_weight_decoders_folds_only_constant_weight_decoders():
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 3] y, float[3, 4] raw) {
            xq = QuantizeLinear (x, xs, xz)
            xd = DequantizeLinear (xq, xs, xz)
            W = DequantizeLinear <axis = 0> (Wq, Ws, Wz)
            idx64 = Cast <to = 7> (idx)
            E = Gather (codebook, idx64)
            h = Gemm <transB = 1> (xd, W)
            y = Add (h, E)
            raw = DequantizeLinear (Wq, one)
        }
    """)
    q = np.array([[1, -2, 3, 0], [0, 0, 1, 1], [-127, 5, 2, 1]], np.int8)
    scale = np.array([0.5, 0.25, 0.01], np.float32)
    codebook = np.array([-1.5, 0.0, 2.0], np.float32)
    indices = np.array([2, 0, 1], np.uint8)
    model.graph.initializer.extend([
        numpy_helper.from_array(np.float32(0.1), "xs"), numpy_helper.from_array(np.int8(0), "xz"),
        numpy_helper.from_array(q, "Wq"), numpy_helper.from_array(scale, "Ws"),
        numpy_helper.from_array(np.zeros(3, np.int8), "Wz"), numpy_helper.from_array(np.float32(1.0), "one"),
        numpy_helper.from_array(codebook, "codebook"), numpy_helper.from_array(indices, "idx"),
    ])
    onnx.checker.check_model(model)
    x = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
    expected = _run(model, {"x": x})
    assert set(weight_decoders(model)) == {"W", "E"}  # not the activation's, not a graph output's
    assert fold_weight_decoders(model) is True
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["QuantizeLinear", "DequantizeLinear", "Gemm", "Add", "DequantizeLinear"]
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert np.array_equal(values["W"], q.astype(np.float32) * scale[:, None])
    assert np.array_equal(values["E"], codebook[indices])
    assert "Ws" not in values and "codebook" not in values and "idx" not in values and "Wq" in values  # raw reads Wq
    for a, b in zip(expected, _run(model, {"x": x})):  # a constant weight may take another GEMM kernel
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    assert fold_weight_decoders(model) is False
