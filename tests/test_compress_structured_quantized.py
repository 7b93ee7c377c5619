"""Filter pruning + quantization end to end: the shrunk graph keeps each weight's integer encoding.

The written file is read back by hand here (no report code): every compressed weight is fed by a
DequantizeLinear of int8/int4/int2 integers or by a codebook Gather of uint4 indices, in the shrunk
shape (removed filters gone from the integers and the per-channel scales alike); the decoded values are
the trained torch values with the removed channels taken out, bit for bit; onnxruntime on the file
computes what the masked, quantized torch model computes; and the report's bits are the bits counted
from the file's tensor types and shapes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from onnx_admm.converters.modelio import load_model
from onnx_admm.api import compress
from onnx_admm.check import ATOL, RTOL, within_tolerance
from onnx_admm.recipe import CompressConfig

WEIGHTS = ("0.weight", "2.weight", "5.weight", "7.weight")
# Filters kept at 50% filter pruning: 7.weight feeds the graph output and keeps its 10 filters, losing
# only the input columns of 5.weight's removed units.
SHRUNK = {"0.weight": (8, 1, 3, 3), "2.weight": (16, 8, 3, 3), "5.weight": (32, 256), "7.weight": (10, 32)}
BITS = {onnx.TensorProto.INT8: 8, onnx.TensorProto.INT4: 4, onnx.TensorProto.INT2: 2,
        onnx.TensorProto.UINT4: 4, onnx.TensorProto.UINT2: 2, onnx.TensorProto.UINT8: 8,
        onnx.TensorProto.FLOAT: 32}


def _config(quantize):
    return CompressConfig.from_dict({"train": {"threads": 1}, "admm": {"epochs": 1, "retrain_epochs": 1},
                                     "prune": {"sparsity": 0.5, "structure": "filter"}, "quantize": quantize})


def _bits_of(tensor: onnx.TensorProto) -> int:
    """Bits of a tensor's values from its type and shape alone (sub-byte types packed, rounded up to bytes)."""
    n = int(np.prod(tensor.dims)) if tensor.dims else 1
    return 8 * -(-n * BITS[tensor.data_type] // 8)


@pytest.mark.parametrize("quantize, elem_type", [
    ({"bits": 8, "per_channel": True}, onnx.TensorProto.INT8),
    ({"bits": 4, "per_channel": False}, onnx.TensorProto.INT4),
    ({"bits": 2, "per_channel": True}, onnx.TensorProto.INT2),
    ({"clusters": 16}, onnx.TensorProto.UINT4),
], ids=["int8-per-channel", "int4-per-tensor", "int2-per-channel", "codebook16"])
def test_filter_pruned_weights_keep_their_integer_encoding(digits_sample, tmp_path, quantize, elem_type):
    result = compress(digits_sample.model, str(digits_sample.train), _config(quantize),
                      val_data=str(digits_sample.test))
    out = tmp_path / "fq.onnx"
    result.save(out)
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    original = load_model(digits_sample.model)
    assert [i.SerializeToString() for i in model.graph.input] == [i.SerializeToString() for i in original.graph.input]
    assert [o.SerializeToString() for o in model.graph.output] == [o.SerializeToString() for o in original.graph.output]

    inits = {t.name: t for t in model.graph.initializer}
    producers = {n.output[0]: n for n in model.graph.node}
    assert not set(WEIGHTS) & set(inits) and not model.graph.sparse_initializer  # no float copy left
    # The trained torch values in ONNX layout with the removed filters and the input channels that read
    # them taken out (exact zeros in the masked model); 2.weight's 32 channels reach 5.weight as blocks of
    # 4 x 4 features through the Flatten.
    entries = {e.onnx_name: e for e in result.imported.compressible()}
    trained = {n: entries[n].layout.to_onnx(result.stages[-1].values[entries[n].param].numpy()) for n in WEIGHTS}
    kept = result.stages[-1].kept_channels
    k0, k2, k5 = kept["0.weight"], kept["2.weight"], kept["5.weight"]
    expected_values = {
        "0.weight": trained["0.weight"][k0],
        "2.weight": trained["2.weight"][k2][:, k0],
        "5.weight": trained["5.weight"][k5][:, np.repeat(k2, 16)],
        "7.weight": trained["7.weight"][:, k5],
    }
    layers = {layer["name"]: layer for layer in result.report["layers"]}
    for name in WEIGHTS:
        expected = expected_values[name]
        node = producers[name]
        if "clusters" in quantize:
            assert node.op_type == "Gather"
            codebook = numpy_helper.to_array(inits[node.input[0]])
            cast = producers[node.input[1]]
            assert cast.op_type == "Cast"
            indices = inits[cast.input[0]]
            assert indices.data_type == elem_type and tuple(indices.dims) == SHRUNK[name]
            index_values = numpy_helper.to_array(indices).astype(np.int64)
            assert codebook.size <= 16 and index_values.max() < codebook.size
            decoded = codebook[index_values]
            parts = [indices, inits[node.input[0]]]
        else:
            assert node.op_type == "DequantizeLinear"
            q, scale, zero = (inits[i] for i in node.input)
            assert q.data_type == elem_type == zero.data_type and tuple(q.dims) == SHRUNK[name]
            q_values = numpy_helper.to_array(q).astype(np.int64)
            qmax = 2 ** (quantize["bits"] - 1) - 1
            assert -qmax - 1 <= q_values.min() and q_values.max() <= qmax  # the k-bit container's levels
            assert not numpy_helper.to_array(zero).any()
            scale_values = numpy_helper.to_array(scale)
            if quantize.get("per_channel"):
                # one scale per kept filter: the removed filters' scales are gone too
                axis = helper.get_attribute_value(next(a for a in node.attribute if a.name == "axis"))
                assert axis == 0 and scale_values.shape == (SHRUNK[name][0],) == tuple(zero.dims)
                scale_values = scale_values.reshape(-1, *[1] * (len(SHRUNK[name]) - 1))
            else:
                assert scale_values.shape == ()
            decoded = q_values.astype(np.float32) * scale_values
            parts = [q, scale, zero]
        assert decoded.shape == expected.shape
        assert np.array_equal(decoded, expected), name  # bit for bit what was trained
        layer = layers[name]
        counted = sum(_bits_of(t) for t in parts)
        assert layer["stored_bits"] == counted, name
        assert layer["stored_bits_per_weight"] == pytest.approx(counted / decoded.size)
        assert layer["stored_shape"] == list(SHRUNK[name]) and layer["shape"] == list(trained[name].shape)
        assert layer["encoding"] == ("codebook-uint4" if "clusters" in quantize else f"int{quantize['bits']}")
    report = result.report
    assert report["storage_bits"]["in_file"] == sum(layers[n]["stored_bits"] for n in WEIGHTS)
    assert report["warnings"] == []
    # The masked, quantized torch model (what was trained) computes what the shrunk file computes, within
    # ATOL + RTOL * max|output| (1e-4 + 1e-4 * max).
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.load(digits_sample.test)["input"][:32]
    ok, diff = within_tolerance(result.imported.run({"input": x}), session.run(None, {"input": x}))
    assert ok, (diff, ATOL, RTOL)
    assert report["structure"]["params"]["compressed"] < report["structure"]["params"]["original"] / 3
