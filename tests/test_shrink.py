"""converters.shrink: removing channels from the graph computes what the masked dense model computes.

Oracle: removing channel c is exactly zeroing every consumer weight that reads c (whatever the
producer's filter, bias and BatchNorm shift make of it). Each case below says by hand, independently of
``converters.groups``, which consumer entries that zeroes and which shapes the shrunk tensors get.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnx_admm.converters.cut import zeroed
from onnx_admm.converters.graphinfo import node_label
from onnx_admm.converters.groups import channel_groups
from onnx_admm.converters.importer import import_model
from onnx_admm.converters.modelio import load_model
from onnx_admm.converters.shrink import count_macs, cut_update, kept_channels, shrink
from onnx_admm.converters.encoders import QuantSpec
from onnx_admm.converters.writeback import TensorUpdate, write_back
from exporter_models import export_torch
from models import ConcatBranches, ResidualStages, _floats, _randomise_batchnorm


def _mask(n: int, removed: list[int]) -> np.ndarray:
    keep = np.ones(n, dtype=bool)
    keep[removed] = False
    return keep


def _with_values(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in values:
            t.CopyFrom(numpy_helper.from_array(values[t.name], t.name))
    return out


def _value(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(n.attribute[0].t)
    raise KeyError(name)


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


@dataclass
class Case:
    """keep: group -> removed channels; zero: tensor -> (axis, positions) the dense reference zeroes;
    shapes: tensor -> shape after shrinking."""

    keep: dict[str, list[int]]
    zero: dict[str, tuple[int, list[int]]]
    shapes: dict[str, tuple[int, ...]]
    input_shape: tuple[int, ...]
    attrs: dict[str, int] = field(default_factory=dict)  # node label -> group attribute after shrinking


def _block(channels: list[int], size: int) -> list[int]:
    return [c * size + i for c in channels for i in range(size)]


CASES = {
    "lenet5_torchscript": Case(
        keep={"conv1.weight": [0, 3, 4, 9, 17], "conv2.weight": list(range(0, 50, 2)), "fc1.weight": list(range(100))},
        zero={
            "conv2.weight": (1, [0, 3, 4, 9, 17]),
            "fc1.weight": (1, _block(list(range(0, 50, 2)), 16)),
            "fc2.weight": (1, list(range(100))),
        },
        shapes={
            "conv1.weight": (15, 1, 5, 5),
            "conv1.bias": (15,),
            "conv2.weight": (25, 15, 5, 5),
            "conv2.bias": (25,),
            "fc1.weight": (400, 400),
            "fc1.bias": (400,),
            "fc2.weight": (10, 400),
            "fc2.bias": (10,),
        },
        input_shape=(1, 28, 28),
    ),
    "lenet5_dynamo": Case(  # the flatten is a Reshape with the constant [-1, 800]
        keep={"conv2.weight": list(range(10, 50))},
        zero={"fc1.weight": (1, _block(list(range(10, 50)), 16))},
        shapes={"conv2.weight": (10, 20, 5, 5), "fc1.weight": (500, 160), "val_7": (2,)},
        input_shape=(1, 28, 28),
    ),
    "resnet_block_torchscript": Case(  # BatchNorm kept; only conv1 is free of the residual Add
        keep={"conv1.weight": [1, 2, 6]},
        zero={"conv2.weight": (1, [1, 2, 6])},
        shapes={
            "conv1.weight": (5, 8, 3, 3),
            **{f"bn1.{p}": (5,) for p in ("weight", "bias", "running_mean", "running_var")},
            "conv2.weight": (8, 5, 3, 3),
            "stem.weight": (8, 3, 3, 3),
            "bn2.weight": (8,),
        },
        input_shape=(3, 16, 16),
    ),
    "mobilenet_block_torchscript": Case(  # the stem's channels run through the depthwise conv
        keep={"onnx::Conv_40": [0, 5, 7], "onnx::Conv_46": [2, 3, 11, 12, 13]},
        zero={"onnx::Conv_46": (1, [0, 5, 7]), "fc.weight": (1, [2, 3, 11, 12, 13])},
        shapes={
            "onnx::Conv_40": (5, 3, 3, 3),
            "onnx::Conv_41": (5,),
            "onnx::Conv_43": (5, 1, 3, 3),
            "onnx::Conv_44": (5,),
            "onnx::Conv_46": (11, 5, 1, 1),
            "onnx::Conv_47": (11,),
            "fc.weight": (10, 11),
        },
        input_shape=(3, 16, 16),
        attrs={"/depthwise/depthwise.0/Conv": 5},
    ),
    "mobilenet_block_dynamo": Case(  # ReduceMean + Reshape [-1, 16] head
        keep={"pointwise.0.weight": [0, 1, 2, 3, 4, 5, 6, 7]},
        zero={"fc.weight": (1, [0, 1, 2, 3, 4, 5, 6, 7])},
        shapes={"pointwise.0.weight": (8, 8, 1, 1), "fc.weight": (10, 8), "val_44": (2,)},
        input_shape=(3, 16, 16),
    ),
}


def _check_equivalent(model: onnx.ModelProto, case: Case) -> onnx.ModelProto:
    groups = {g.name: g for g in channel_groups(model)}
    keep = {name: _mask(groups[name].n_channels, removed) for name, removed in case.keep.items()}
    result = shrink(model, keep)
    shrunk = result.model
    onnx.checker.check_model(shrunk, full_check=True)

    for name, shape in case.shapes.items():
        assert _value(shrunk, name).shape == shape, name
    for label, group in case.attrs.items():
        node = next(n for i, n in enumerate(shrunk.graph.node) if node_label(n, i) == label)
        assert helper.get_attribute_value(next(a for a in node.attribute if a.name == "group")) == group
    # graph I/O and node names unchanged; the input model untouched
    assert [i.SerializeToString() for i in shrunk.graph.input] == [i.SerializeToString() for i in model.graph.input]
    assert [o.SerializeToString() for o in shrunk.graph.output] == [o.SerializeToString() for o in model.graph.output]
    assert [(n.name, n.op_type) for n in shrunk.graph.node] == [(n.name, n.op_type) for n in model.graph.node]
    # tensors outside every group's cut stay byte-identical
    cut = {s.tensor for name in case.keep for s in groups[name].slices} | {
        e.tensor for name in case.keep for e in groups[name].reshapes
    } | {f.tensor for name in case.keep for f in groups[name].frozen}
    originals = {t.name: t.SerializeToString() for t in model.graph.initializer}
    for t in shrunk.graph.initializer:
        if t.name not in cut:
            assert t.SerializeToString() == originals[t.name], t.name

    dense = {}
    for name, (axis, positions) in case.zero.items():
        value = _value(model, name).copy()
        index = [slice(None)] * value.ndim
        index[axis] = positions
        value[tuple(index)] = 0.0
        dense[name] = value
    reference = _with_values(model, dense)
    rng = np.random.default_rng(0)
    for batch in (1, 5):
        x = rng.standard_normal((batch, *case.input_shape)).astype(np.float32)
        (want,), (got,) = _run(reference, x), _run(shrunk, x)
        assert got.shape == want.shape
        tolerance = 1e-4 + 1e-4 * float(np.abs(want).max())
        assert float(np.abs(got - want).max()) <= tolerance
    return shrunk


@pytest.mark.parametrize("key", list(CASES))
def test_shrunk_model_matches_masked_dense_model(key, onnx_model_file):
    model = onnx.load(str(onnx_model_file(key)))
    _check_equivalent(model, CASES[key])


def test_lenet5_macs_fall_as_expected(onnx_model_file):
    model = onnx.load(str(onnx_model_file("lenet5_torchscript")))
    before = count_macs(model)
    conv1, conv2, fc1, fc2 = "/conv1/Conv", "/conv2/Conv", "/fc1/Gemm", "/fc2/Gemm"
    assert {k: v["macs"] for k, v in before["nodes"].items()} == {
        conv1: 24 * 24 * 20 * 25,
        conv2: 8 * 8 * 50 * 20 * 25,
        fc1: 500 * 800,
        fc2: 10 * 500,
    }
    assert before["params"] == 431_080 and before["unknown"] == []
    k1, k2, k3 = 10, 12, 250
    keep = {"conv1.weight": list(range(k1)), "conv2.weight": list(range(k2)), "fc1.weight": list(range(k3))}
    after = count_macs(shrink(model, keep).model)
    assert {k: v["macs"] for k, v in after["nodes"].items()} == {
        conv1: 24 * 24 * k1 * 25,
        conv2: 8 * 8 * k2 * k1 * 25,
        fc1: k3 * k2 * 16,
        fc2: 10 * k3,
    }
    assert after["macs"] == sum(v["macs"] for v in after["nodes"].values())
    assert after["nodes"][conv2]["params"] == k2 * k1 * 25 + k2
    assert count_macs(model, batch=4)["macs"] == 4 * before["macs"]


def test_macs_of_a_graph_with_dynamic_height_and_width_need_the_input_shape():
    # x [N, 3, H, W] -> 3x3 Conv (4 filters, pads 1): without H and W the Conv has no shape to count at.
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="conv")], "dyn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "H", "W"])],
        [numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    blind = count_macs(model)
    assert blind["macs"] == 0 and blind["unknown"] == ["conv"]
    sized = count_macs(model, inputs={"x": (2, 3, 10, 12)})
    assert sized["macs"] == 2 * 4 * 10 * 12 * 27 and sized["unknown"] == []


def test_macs_where_inference_loses_the_shapes_are_read_from_a_run():
    # x [N, 16, 8] cut to the longest of the lengths (data-dependent: inference cannot know it) -> MatMul W [8, 4],
    # W stored as a sparse initializer (as compress writes pruned weights) that the run must read too.
    w = np.zeros((8, 4), np.float32)
    w[::2] = 1.0
    nodes = [helper.make_node("ReduceMax", ["lengths"], ["n"], keepdims=1, name="longest"),
             helper.make_node("Slice", ["x", "zero", "n", "one"], ["xs"], name="cut"),
             helper.make_node("MatMul", ["xs", "W"], ["y"], name="mm")]
    graph = helper.make_graph(
        nodes, "cut", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 8]),
                       helper.make_tensor_value_info("lengths", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "L", 4])],
        [numpy_helper.from_array(np.array([0], np.int64), "zero"), numpy_helper.from_array(np.array([1], np.int64), "one")],
        sparse_initializer=[helper.make_sparse_tensor(numpy_helper.from_array(w[w != 0], "W"),
                                                      numpy_helper.from_array(np.flatnonzero(w).astype(np.int64)),
                                                      [8, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    feeds = {"x": np.ones((2, 16, 8), np.float32), "lengths": np.array([5, 11], np.int64)}
    shapes = {name: value.shape for name, value in feeds.items()}
    assert count_macs(model, inputs=shapes)["unknown"] == ["mm"]
    counted = count_macs(model, inputs=shapes, feeds=feeds)
    assert counted["unknown"] == [] and counted["macs"] == 2 * 11 * 4 * 8


def _text_model(body: str, inits: str, inputs: str, outputs: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g ({inputs}) => ({outputs}) <{inits}> {{ {body} }}"""
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def test_channels_last_flatten_after_transpose():
    # tf2onnx-style: Conv, Transpose to NHWC, per-channel Mul on the last axis, Reshape [-1, 48], MatMul.
    # In the flattened features channel c sits at h*4*3 + w*3 + c: strided, not a block.
    model = _text_model(
        """
        c = Conv <kernel_shape = [3, 3]> (input, w, b)
        t = Transpose <perm = [0, 2, 3, 1]> (c)
        s = Mul (t, scale)
        f = Reshape (s, shape)
        logits = MatMul (f, fc)
        """,
        "float[3, 2, 3, 3] w = " + _floats((3, 2, 3, 3), 1) + ", float[3] b = " + _floats((3,), 2)
        + ", float[1, 1, 1, 3] scale = {0.5, -2.0, 1.5}, int64[2] shape = {-1, 48}, float[48, 5] fc = "
        + _floats((48, 5), 3),
        "float[N, 2, 6, 6] input",
        "float[N, 5] logits",
    )
    (group, _) = channel_groups(model)
    assert group.prunable and [(s.tensor, s.axis, s.outer) for s in group.consumers] == [("fc", 0, 16)]
    removed = [1]
    rows = [hw * 3 + c for hw in range(16) for c in removed]
    shrunk = _check_equivalent(
        model,
        Case(
            keep={"w": removed},
            zero={"fc": (0, rows)},
            shapes={"w": (2, 2, 3, 3), "b": (2,), "scale": (1, 1, 1, 2), "fc": (32, 5)},
            input_shape=(2, 6, 6),
        ),
    )
    assert _value(shrunk, "shape").tolist() == [-1, 32]


def test_keras_dense_on_a_sequence_reshapes_with_a_computed_shape():
    # tf2onnx writes a Keras Dense on [N, L, C] as Reshape [-1, C], MatMul, Add and a Reshape back to a shape
    # read from the input (Shape, Slice, Concat); the next Dense reshapes to [-1, C] again. The computed shape
    # becomes a constant of the Reshape's own, [-1, 4, units], and both shapes lose the removed units.
    model = _text_model(
        """
        sh = Shape (x)
        lead = Slice (sh, zero, two)
        flat = Reshape (x, flat_shape)
        h = MatMul (flat, w1)
        hb = Add (h, b1)
        back = Concat <axis = 0> (lead, units)
        r = Reshape (hb, back)
        a = Relu (r)
        f2 = Reshape (a, shape2)
        y2 = MatMul (f2, w2)
        back2 = Concat <axis = 0> (lead, three)
        y = Reshape (y2, back2)
        """,
        "int64[1] zero = {0}, int64[1] two = {2}, int64[2] flat_shape = {-1, 6}, float[6, 5] w1 = "
        + _floats((6, 5), 1) + ", float[5] b1 = " + _floats((5,), 2) + ", int64[1] units = {5}, "
        "int64[2] shape2 = {-1, 5}, float[5, 3] w2 = " + _floats((5, 3), 3) + ", int64[1] three = {3}",
        "float[N, 4, 6] x",
        "float[N, 4, 3] y",
    )
    group = next(g for g in channel_groups(model) if g.name == "w1")
    assert group.prunable, group.reason
    assert [(f.node, f.values) for f in group.frozen] == [("Reshape_6_unnamed", (-1, 4, 5))]  # node 6, r
    shrunk = _check_equivalent(model, Case(keep={"w1": [1, 3]}, zero={"w2": (0, [1, 3])},
                                           shapes={"w1": (6, 3), "b1": (3,), "w2": (3, 3), "shape2": (2,)},
                                           input_shape=(4, 6)))
    assert _value(shrunk, "shape2").tolist() == [-1, 3]
    reshape = next(n for n in shrunk.graph.node if list(n.output) == ["r"])
    assert _value(shrunk, reshape.input[1]).tolist() == [-1, 4, 3]


def test_keras_reshape_of_channels_last_features_into_a_sequence_then_dense():
    # A Keras CTC reader (tf2onnx): conv features [N, C, W, H] -> Transpose to [N, W, H, C] -> Reshape to
    # [N, W, H*C] (a shape read from the input) -> the next Dense's Reshape [-1, H*C], MatMul. The conv's
    # filters sit in the merged axis as H outer blocks; the second Reshape only regroups the dims before it.
    # It stopped the group ("splits or reorders the channel axis"), so the reader's largest conv kept its filters.
    model = _text_model(
        """
        c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (input, w, b)
        t = Transpose <perm = [0, 2, 3, 1]> (c)
        sh = Shape (input)
        n = Slice (sh, zero, one)
        seq_shape = Concat <axis = 0> (n, steps, features)
        s = Reshape (t, seq_shape)
        flat = Reshape (s, dense_shape)
        h = MatMul (flat, fc)
        """,
        "float[3, 2, 3, 3] w = " + _floats((3, 2, 3, 3), 1) + ", float[3] b = " + _floats((3,), 2)
        + ", int64[1] zero = {0}, int64[1] one = {1}, int64[1] steps = {5}, int64[1] features = {12}"
        + ", int64[2] dense_shape = {-1, 12}, float[12, 4] fc = " + _floats((12, 4), 3),
        "float[N, 2, 5, 4] input",
        "float[M, 4] h",
    )
    (group, _) = channel_groups(model)
    assert group.prunable, group.reason
    assert [f.values for f in group.frozen] == [(-1, 5, 12)]
    rows = [hh * 3 + 1 for hh in range(4)]  # channel 1 at each of the 4 positions along H
    shrunk = _check_equivalent(model, Case(keep={"w": [1]}, zero={"fc": (0, rows)},
                                           shapes={"w": (2, 2, 3, 3), "b": (2,), "fc": (8, 4)},
                                           input_shape=(2, 5, 4)))
    assert _value(shrunk, "dense_shape").tolist() == [-1, 8]
    reshape = next(n for n in shrunk.graph.node if list(n.output) == ["s"])
    assert _value(shrunk, reshape.input[1]).tolist() == [-1, 5, 8]


def _keras_flatten(shape_use: str) -> onnx.ModelProto:
    # tf2onnx's Keras Flatten after a Conv: Transpose to NHWC, Reshape to Concat(Shape(t)[:1], [48]), MatMul.
    return _text_model(
        f"""
        c = Conv <kernel_shape = [3, 3]> (input, w, b)
        t = Transpose <perm = [0, 2, 3, 1]> (c)
        sh = Shape (t)
        n = Slice (sh, zero, one)
        {shape_use}
        f = Reshape (t, flat)
        logits = MatMul (f, fc)
        """,
        "float[3, 2, 3, 3] w = " + _floats((3, 2, 3, 3), 1) + ", float[3] b = " + _floats((3,), 2)
        + ", int64[1] zero = {0}, int64[1] one = {1}, int64[1] features = {48}, float[48, 5] fc = "
        + _floats((48, 5), 3),
        "float[N, 2, 6, 6] input",
        "float[N, 5] logits",
    )


def test_a_flatten_whose_shape_reads_the_channels_dims_is_frozen_and_cut():
    model = _keras_flatten("flat = Concat <axis = 0> (n, features)")
    (group, _) = channel_groups(model)
    assert group.prunable, group.reason
    assert [f.values for f in group.frozen] == [(-1, 48)]
    rows = [hw * 3 + 1 for hw in range(16)]
    shrunk = _check_equivalent(model, Case(keep={"w": [1]}, zero={"fc": (0, rows)},
                                           shapes={"w": (2, 2, 3, 3), "b": (2,), "fc": (32, 5)},
                                           input_shape=(2, 6, 6)))
    reshape = next(n for n in shrunk.graph.node if list(n.output) == ["f"])
    assert _value(shrunk, reshape.input[1]).tolist() == [-1, 32]


def test_a_shape_of_the_channels_used_elsewhere_stops_the_group():
    # The channels' dims feed a ConstantOfShape as well as the flatten: freezing the Reshape would not take
    # them out of the graph, and their count changes with the cut.
    model = _keras_flatten("flat = Concat <axis = 0> (n, features)\n        z = ConstantOfShape (sh)")
    (group, _) = channel_groups(model)
    assert not group.prunable
    assert group.reason == "the channels' shape read by Shape Shape_2_unnamed reaches ConstantOfShape ConstantOfShape_5_unnamed"


def test_swish_prelu_reduce_squeeze_and_depthwise_multiplier():
    # stem -> x * sigmoid(x) -> PRelu (per-channel slope) -> depthwise with multiplier 2 -> pointwise
    # -> ReduceMean over H, W -> Squeeze -> Gemm.
    model = _text_model(
        """
        c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (input, w, b)
        sg = Sigmoid (c)
        sw = Mul (c, sg)
        p = PRelu (sw, slope)
        d = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 4> (p, dw, db)
        r = Relu (d)
        pw = Conv <kernel_shape = [1, 1]> (r, pw_w, pw_b)
        m = ReduceMean <axes = [2, 3], keepdims = 1> (pw)
        q = Squeeze (m, sq_axes)
        logits = Gemm <transB = 1> (q, fc, fb)
        """,
        "float[4, 3, 3, 3] w = " + _floats((4, 3, 3, 3), 1) + ", float[4] b = " + _floats((4,), 2)
        + ", float[4, 1, 1] slope = {0.1, 0.2, 0.3, 0.4}"
        + ", float[8, 1, 3, 3] dw = " + _floats((8, 1, 3, 3), 3) + ", float[8] db = " + _floats((8,), 4)
        + ", float[6, 8, 1, 1] pw_w = " + _floats((6, 8, 1, 1), 5) + ", float[6] pw_b = " + _floats((6,), 6)
        + ", int64[2] sq_axes = {2, 3}, float[3, 6] fc = " + _floats((3, 6), 7) + ", float[3] fb = " + _floats((3,), 8),
        "float[N, 3, 8, 8] input",
        "float[N, 3] logits",
    )
    groups = {g.name: g for g in channel_groups(model)}
    assert groups["w"].prunable and groups["pw_w"].prunable and not groups["dw"].prunable
    _check_equivalent(
        model,
        Case(
            keep={"w": [0, 2], "pw_w": [5]},
            # depthwise multiplier 2: stem channel c feeds depthwise outputs 2c, 2c + 1
            zero={"pw_w": (1, [0, 1, 4, 5]), "fc": (1, [5])},
            shapes={
                "w": (2, 3, 3, 3),
                "slope": (2, 1, 1),
                "dw": (4, 1, 3, 3),
                "db": (4,),
                "pw_w": (5, 4, 1, 1),
                "fc": (3, 5),
            },
            input_shape=(3, 8, 8),
            attrs={"Conv_4_unnamed": 2},  # nameless nodes stay nameless; group 4 -> 2
        ),
    )


def test_matmul_producer_and_constant_node_weights(onnx_model_file):
    mlp = _text_model(
        """
        h = MatMul (input, w1)
        a = Add (h, b1)
        r = Relu (a)
        logits = MatMul (r, w2)
        """,
        "float[4, 6] w1 = " + _floats((4, 6), 1) + ", float[6] b1 = " + _floats((6,), 2)
        + ", float[6, 3] w2 = " + _floats((6, 3), 3),
        "float[N, 4] input",
        "float[N, 3] logits",
    )
    _check_equivalent(
        mlp,
        Case(
            keep={"w1": [0, 4]},
            zero={"w2": (0, [0, 4])},
            shapes={"w1": (4, 4), "b1": (4,), "w2": (4, 3)},
            input_shape=(4,),
        ),
    )
    # Weights held by Constant nodes (paddle2onnx): shrunk in place, Conv -> Relu -> Flatten -> Gemm.
    model = onnx.load(str(onnx_model_file("constant_weights")))
    shrunk = shrink(model, {"conv_w": [True, False, True, False]}).model
    assert _value(shrunk, "conv_w").shape == (2, 1, 3, 3) and _value(shrunk, "fc_w").shape == (10, 72)
    onnx.checker.check_model(shrunk, full_check=True)
    x = np.random.default_rng(1).standard_normal((3, 1, 8, 8)).astype(np.float32)
    fc_w = _value(model, "fc_w").copy()
    fc_w[:, _block([1, 3], 36)] = 0.0
    masked = onnx.ModelProto()  # the same graph with the consumer columns zeroed in the Constant node
    masked.CopyFrom(model)
    constant = next(n for n in masked.graph.node if n.output[0] == "fc_w")
    constant.attribute[0].t.CopyFrom(numpy_helper.from_array(fc_w, "fc_w_value"))
    np.testing.assert_allclose(_run(shrunk, x)[0], _run(masked, x)[0], rtol=1e-5, atol=1e-5)


def test_sparse_initializer_consumer_is_reencoded(onnx_model_file):
    model = onnx.load(str(onnx_model_file("lenet5_torchscript")))
    fc1 = _value(model, "fc1.weight").copy()
    fc1[np.abs(fc1) < 0.03] = 0.0
    sparse = onnx.ModelProto()
    sparse.CopyFrom(model)
    index = next(i for i, t in enumerate(sparse.graph.initializer) if t.name == "fc1.weight")
    del sparse.graph.initializer[index]
    flat = fc1.reshape(-1)
    nz = np.flatnonzero(flat).astype(np.int64)
    sparse.graph.sparse_initializer.append(
        helper.make_sparse_tensor(
            numpy_helper.from_array(flat[nz], "fc1.weight"),
            numpy_helper.from_array(nz, "fc1.weight_indices"),
            [500, 800],
        )
    )
    shrunk = shrink(sparse, {"conv2.weight": list(range(25))}).model
    onnx.checker.check_model(shrunk)
    (tensor,) = shrunk.graph.sparse_initializer
    assert list(tensor.dims) == [500, 400] and tensor.indices.data_type == onnx.TensorProto.INT64
    x = np.random.default_rng(2).standard_normal((2, 1, 28, 28)).astype(np.float32)
    fc1[:, 400:] = 0.0
    reference = _with_values(model, {"fc1.weight": fc1})
    np.testing.assert_allclose(_run(shrunk, x)[0], _run(reference, x)[0], rtol=1e-4, atol=1e-4)


def test_errors_and_no_op(onnx_model_file):
    model = onnx.load(str(onnx_model_file("resnet_block_torchscript")))
    with pytest.raises(ValueError, match=r"'fc.weight' cannot be shrunk: the channels reach the graph output"):
        shrink(model, {"fc.weight": [0, 1]})
    with pytest.raises(ValueError, match=r"'conv2.weight' is a member of the coupled group 'stem.weight'"):
        shrink(model, {"conv2.weight": [0, 1]})
    with pytest.raises(ValueError, match="not a channel group"):
        shrink(model, {"bn1.weight": [0]})
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        shrink(model, {"conv1.weight": np.ones(7, dtype=bool)})
    with pytest.raises(ValueError, match="removes every channel"):
        shrink(model, {"conv1.weight": np.zeros(8, dtype=bool)})
    with pytest.raises(ValueError, match="distinct and in"):
        shrink(model, {"conv1.weight": [0, 8]})
    group = next(g for g in channel_groups(model) if g.name == "conv1.weight")
    assert kept_channels(group, [5, 1]).tolist() == [1, 5]
    result = shrink(model, {"conv1.weight": np.ones(8, dtype=bool)})
    assert result.changes == [] and result.model.SerializeToString() == model.SerializeToString()


def test_quantized_updates_are_cut_with_their_scales(onnx_model_file):
    # conv1 loses 5 of its 20 filters: its int8 integers and its per-filter scales lose them, conv2's int4
    # integers lose the input channels that read them while its per-filter scales stay whole.
    model = onnx.load(str(onnx_model_file("lenet5_torchscript")))
    rng = np.random.default_rng(3)
    removed = [0, 3, 4, 9, 17]
    s1 = rng.uniform(0.01, 0.05, 20).astype(np.float32)
    s2 = rng.uniform(0.01, 0.05, 50).astype(np.float32)
    w1 = rng.integers(-127, 128, (20, 1, 5, 5)).astype(np.float32) * s1[:, None, None, None]
    q2 = rng.integers(-7, 8, (50, 20, 5, 5))
    q2[:, removed] = 0  # the masked model: the consumers' input channels of removed filters are zero
    w2 = q2.astype(np.float32) * s2[:, None, None, None]
    shrunk = shrink(model, {"conv1.weight": _mask(20, removed)})
    assert shrunk.cuts["conv2.weight"].shape == (50, 20, 5, 5)
    updates = [TensorUpdate("conv1.weight", w1, quant=QuantSpec(8, s1, 0)),
               TensorUpdate("conv2.weight", w2, quant=QuantSpec(4, s2, 0))]
    cut = [cut_update(u, shrunk.cuts) for u in updates]
    assert cut[0].quant.scale.shape == (15,) and cut[1].quant.scale.shape == (50,)
    assert cut[1].value.shape == (50, 15, 5, 5)
    result = write_back(shrunk.model, cut)
    assert result.encodings == {"conv1.weight": "int8", "conv2.weight": "int4"}
    inits = {t.name: t for t in result.model.graph.initializer}
    assert list(inits["conv1.weight_quantized"].dims) == [15, 1, 5, 5]
    assert list(inits["conv2.weight_quantized"].dims) == [50, 15, 5, 5]
    assert inits["conv2.weight_quantized"].data_type == onnx.TensorProto.INT4
    np.testing.assert_array_equal(numpy_helper.to_array(inits["conv1.weight_scale"]), np.delete(s1, removed))
    x = rng.standard_normal((2, 1, 28, 28)).astype(np.float32)
    reference = _with_values(model, {"conv1.weight": w1, "conv2.weight": w2})
    np.testing.assert_allclose(_run(result.model, x)[0], _run(reference, x)[0], rtol=1e-4, atol=1e-4)
    # an update of a tensor the shrink pass did not cut is returned as it is
    fc2 = TensorUpdate("fc2.weight", _value(model, "fc2.weight"))
    assert cut_update(fc2, shrunk.cuts) is fc2


# ----------------------------------------------------------------------------------------------
# Coupled groups (residual sums) and Concat ranges, against the masked torch model
# ----------------------------------------------------------------------------------------------


def _module_path(group_weight: str, node: str) -> str:
    """The torch module of a member: from its weight name (dynamo keeps ``layer1.0.conv2.weight``) or, for
    a weight the TorchScript exporter renamed when it folded BatchNorm in, from its node label
    (``/layer1/layer1.0/conv2/Conv``)."""
    if group_weight.endswith(".weight"):
        return group_weight[: -len(".weight")]
    parts: list[str] = []
    for segment in node.strip("/").split("/")[:-1]:
        if parts and segment.startswith(parts[-1] + "."):
            parts[-1] = segment
        else:
            parts.append(segment)
    return ".".join(parts)


def _members(group) -> set[str]:
    return {_module_path(w, n) for w, n in zip(group.producers, group.member_nodes or (group.node,))}


def _shrunk_matches_masked_torch(path, input_shape: tuple[int, ...]):
    """Keep a seeded half of every prunable group's channels; the shrunk graph in onnxruntime must compute
    what the imported torch model computes with every member's removed filters and every consumer's
    removed input channels zeroed, at batch 1 and 5, within 1e-4 + 1e-4 * max|output| (torch and
    onnxruntime sum in different orders). Returns the groups and the shrunk model."""
    model = load_model(path)
    groups = [g for g in channel_groups(model) if g.prunable]
    rng = np.random.default_rng(0)
    keep = {g.name: np.sort(rng.permutation(g.n_channels)[: g.n_channels // 2]) for g in groups}
    shrunk = shrink(model, keep, groups).model
    onnx.checker.check_model(shrunk, full_check=True)
    assert [i.SerializeToString() for i in shrunk.graph.input] == [i.SerializeToString() for i in model.graph.input]
    assert [o.SerializeToString() for o in shrunk.graph.output] == [o.SerializeToString() for o in model.graph.output]
    imported = import_model(model)
    entries = {e.onnx_name: e for e in imported.weights if e.owns_tensor}
    cut: dict[tuple[str, int], int] = {}  # after a Concat several groups cut one axis
    for g in groups:
        removed = np.setdiff1d(np.arange(g.n_channels), keep[g.name])
        for s in g.slices:
            if s.role not in ("weight", "consumer"):
                continue
            cut[(s.tensor, s.axis)] = cut.get((s.tensor, s.axis), 0) + len(s.positions(g.n_channels, removed))
            entry = entries[s.tensor]
            mask = np.ones(entry.onnx_shape, dtype=bool)
            index = [slice(None)] * mask.ndim
            index[s.axis] = s.positions(g.n_channels, removed)
            mask[tuple(index)] = False
            mask_t = torch.from_numpy(mask.T if entry.layout.transpose else mask)
            with torch.no_grad():
                imported.module.get_parameter(entry.param).mul_(mask_t)
    # exact kept counts: every member loses its removed filters, every consumer their input channels
    for (tensor, axis), n in cut.items():
        assert _value(shrunk, tensor).shape[axis] == _value(model, tensor).shape[axis] - n, tensor
    for batch in (1, 5):
        x = rng.standard_normal((batch, *input_shape)).astype(np.float32)
        want, got = imported.run({"input": x})[0], _run(shrunk, x)[0]
        assert got.shape == want.shape
        assert float(np.abs(got - want).max()) <= 1e-4 + 1e-4 * float(np.abs(want).max())
    return {g.name: g for g in groups}, shrunk


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_resnet18_stages_are_coupled_groups(exporter, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    module = torchvision.models.resnet18(weights=None, num_classes=10)
    _randomise_batchnorm(module)
    path = export_torch(module.eval(), torch.zeros(1, 3, 16, 16), tmp_path / "resnet18.onnx", exporter)
    groups, _ = _shrunk_matches_masked_torch(path, (3, 16, 16))
    members = sorted(sorted(_members(g)) for g in groups.values())
    stages = [sorted([f"layer{k}.0.conv2", f"layer{k}.0.downsample.0", f"layer{k}.1.conv2"]) for k in (2, 3, 4)]
    singles = [[f"layer{k}.{b}.conv1"] for k in (1, 2, 3, 4) for b in (0, 1)]
    assert members == sorted([["conv1", "layer1.0.conv2", "layer1.1.conv2"], *stages, *singles])
    last = next(g for g in groups.values() if "layer4.1.conv2" in _members(g))
    assert last.n_channels == 512 and "fc.weight" in {s.tensor for s in last.consumers}


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_residual_stages_shrink_as_one_group_each(exporter, tmp_path):
    module = ResidualStages()
    _randomise_batchnorm(module)
    torch.manual_seed(0)
    path = export_torch(module.eval(), torch.zeros(1, 3, 16, 16), tmp_path / "stages.onnx", exporter)
    groups, shrunk = _shrunk_matches_masked_torch(path, (3, 16, 16))
    assert sorted(sorted(_members(g)) for g in groups.values()) == [
        ["a1.0"], ["a2.0", "stem.0"], ["b1.0"], ["b2.0", "down.0"]]
    # 8 and 16 channels, half kept: the head reads 8 of 16
    assert _value(shrunk, "fc.weight").shape == (10, 8)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_concat_inputs_cut_their_own_ranges(exporter, tmp_path):
    module = ConcatBranches()
    _randomise_batchnorm(module)
    path = export_torch(module.eval(), torch.zeros(1, 3, 8, 8), tmp_path / "concat.onnx", exporter)
    groups, shrunk = _shrunk_matches_masked_torch(path, (3, 8, 8))
    left, right = groups["left.weight"], groups["right.weight"]
    assert [(s.tensor, s.axis, s.offset, s.total) for s in left.consumers] == [("mix.weight", 1, 0, 16)]
    assert [(s.tensor, s.axis, s.offset, s.total) for s in right.consumers] == [("mix.weight", 1, 6, 16)]
    assert _value(shrunk, "mix.weight").shape == (6, 3 + 5, 3, 3)  # its own group halves it too


def test_conv_transpose_consumes_and_produces_channels():
    # A decoder step: Conv -> ConvTranspose (stride 2, pads that differ between the ends, a bias) -> Conv.
    # The ConvTranspose weight [C_in, C_out, k, k] is cut along axis 0 by the Conv's group and along
    # axis 1 (with its bias) as a producer of its own.
    model = _text_model(
        """
        c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (input, w1, b1)
        r = Relu (c)
        u = ConvTranspose <strides = [2, 2], pads = [0, 0, 1, 1]> (r, wt, bt)
        v = Relu (u)
        out = Conv <kernel_shape = [1, 1]> (v, w2)
        """,
        "float[6, 2, 3, 3] w1 = " + _floats((6, 2, 3, 3), 1) + ", float[6] b1 = " + _floats((6,), 2)
        + ", float[6, 4, 2, 2] wt = " + _floats((6, 4, 2, 2), 3) + ", float[4] bt = " + _floats((4,), 4)
        + ", float[3, 4, 1, 1] w2 = " + _floats((3, 4, 1, 1), 5),
        "float[N, 2, 5, 5] input",
        "float[N, 3, 9, 9] out",
    )
    groups = {g.name: g for g in channel_groups(model)}
    assert groups["w1"].prunable and groups["wt"].prunable, (groups["w1"].reason, groups["wt"].reason)
    assert [(s.tensor, s.axis) for s in groups["w1"].consumers] == [("wt", 0)]
    assert [(s.tensor, s.axis, s.role) for s in groups["wt"].outputs] == [("wt", 1, "weight"), ("bt", 0, "bias")]
    assert [(s.tensor, s.axis) for s in groups["wt"].consumers] == [("w2", 1)]
    _check_equivalent(
        model,
        Case(
            keep={"w1": [1, 4], "wt": [0, 3]},
            zero={"wt": (0, [1, 4]), "w2": (1, [0, 3])},
            shapes={"w1": (4, 2, 3, 3), "b1": (4,), "wt": (4, 2, 2, 2), "bt": (2,), "w2": (3, 2, 1, 1)},
            input_shape=(2, 5, 5),
        ),
    )


@pytest.mark.parametrize("op", ["Resize-scales", "Resize-scales-opset10", "Upsample"])
def test_channels_pass_an_upsampling_that_keeps_the_channel_axis(op):
    # An FPN / U-Net step: Conv -> Resize (nearest, x2 on H and W) -> Conv.
    opset = {"Resize-scales": 17, "Resize-scales-opset10": 10, "Upsample": 9}[op]
    up = {"Resize-scales": "u = Resize <mode = \"nearest\"> (r, roi, scales)",
          "Resize-scales-opset10": "u = Resize <mode = \"nearest\"> (r, scales)",
          "Upsample": "u = Upsample <mode = \"nearest\"> (r, scales)"}[op]
    model = onnx.parser.parse_model(
        f"""<ir_version: 8, opset_import: ["" : {opset}]>
        g (float[N, 2, 4, 4] input) => (float[N, 3, 8, 8] out)
        <float[5, 2, 3, 3] w1 = {_floats((5, 2, 3, 3), 1)}, float[0] roi = {{}}, float[4] scales = {{1.0, 1.0, 2.0, 2.0}},
         float[3, 5, 1, 1] w2 = {_floats((3, 5, 1, 1), 2)}> {{
            c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (input, w1)
            r = Relu (c)
            {up}
            out = Conv <kernel_shape = [1, 1]> (u, w2)
        }}""")
    onnx.checker.check_model(model, full_check=True)
    (group, _) = channel_groups(model)
    assert group.prunable, group.reason
    _check_equivalent(model, Case(keep={"w1": [0, 3]}, zero={"w2": (1, [0, 3])},
                                  shapes={"w1": (3, 2, 3, 3), "w2": (3, 3, 1, 1)}, input_shape=(2, 4, 4)))


def test_an_upsampling_of_the_channel_axis_or_to_given_sizes_stops_the_group():
    model = _text_model(
        """
        c = Conv <kernel_shape = [1, 1]> (input, w1)
        u = Resize <mode = "nearest"> (c, , , sizes)
        out = Conv <kernel_shape = [1, 1]> (u, w2)
        """,
        "float[5, 2, 1, 1] w1 = " + _floats((5, 2, 1, 1), 1) + ", int64[4] sizes = {1, 5, 8, 8}, float[3, 5, 1, 1] w2 = "
        + _floats((3, 5, 1, 1), 2),
        "float[1, 2, 4, 4] input",
        "float[1, 3, 8, 8] out",
    )
    group = next(g for g in channel_groups(model) if g.name == "w1")
    assert not group.prunable and "sizes" in group.reason


# Sizes computed at run time, as torch writes F.interpolate(c, size=skip.shape[2:]) and paddle2onnx its
# nearest upsampling: Concat(Shape(c)[0:2], Shape(input)[2:4] * 2). The channel entry is the channels' own
# count, so it follows the cut; a constant one, or another entry computed from the count, would not.
_SIZES = {
    "follows": "head = Slice (sc, zero, two)\n",
    "constant channel entry": "n = Slice (sc, zero, one)\n head = Concat <axis = 0> (n, five)\n",
    "height from the count": "n = Slice (sc, zero, two)\n cnt = Slice (sc, one, two)\n"
                             " head = Concat <axis = 0> (n, cnt)\n",
}


@pytest.mark.parametrize("case", list(_SIZES))
def test_an_upsampling_to_sizes_computed_from_the_channels_own_shape(case):
    tail = "hw = Slice (si, three, four)\n" if case == "height from the count" else "hw = Slice (si, two, four)\n"
    model = _text_model(
        f"""
        c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (input, w1)
        sc = Shape (c)
        si = Shape (input)
        {_SIZES[case]}
        {tail}
        hw2 = Mul (hw, two)
        sizes = Concat <axis = 0> (head, hw2)
        u = Resize <mode = "nearest"> (c, , , sizes)
        out = Conv <kernel_shape = [1, 1]> (u, w2)
        """,
        "float[5, 2, 3, 3] w1 = " + _floats((5, 2, 3, 3), 1) + ", float[3, 5, 1, 1] w2 = " + _floats((3, 5, 1, 1), 2)
        + ", int64[1] zero = {0}, int64[1] one = {1}, int64[1] two = {2}, int64[1] three = {3}, int64[1] four = {4}"
        ", int64[1] five = {5}",
        "float[N, 2, H, W] input",
        "float[N, 3, A, B] out",
    )
    group = next(g for g in channel_groups(model) if g.name == "w1")
    if case != "follows":
        reason = {"constant channel entry": "takes the channel axis's entry of its sizes from a value the cut does "
                                            "not change",
                  "height from the count": "computes entry 2 of its sizes from the count of the channels"}[case]
        assert not group.prunable and reason in group.reason, group.reason
        return
    assert group.prunable, group.reason
    shrunk = shrink(model, {"w1": _mask(5, [1, 4])}).model
    assert _value(shrunk, "w2").shape == (3, 3, 1, 1)
    w1 = _value(model, "w1").copy()
    w1[[1, 4]] = 0
    for shape in ((2, 2, 4, 4), (1, 2, 6, 10)):  # the sizes follow the input's height and width too
        x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
        got, want = _run(shrunk, x)[0], _run(_with_values(model, {"w1": w1}), x)[0]
        assert got.shape == (shape[0], 3, 2 * shape[2], 2 * shape[3])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


class _SizedFPN(torch.nn.Module):
    """Two scales added after upsampling to the finer one's size, then upsampled to the input's size (torch's
    FPN / segmentation idiom: F.interpolate(size=t.shape[-2:]))."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.Conv2d(8, 16, 3, 2, 1)
        self.l1, self.l2, self.head = torch.nn.Conv2d(8, 6, 1), torch.nn.Conv2d(16, 6, 1), torch.nn.Conv2d(6, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.c1(x))
        b = torch.relu(self.c2(a))
        p = self.l1(a) + torch.nn.functional.interpolate(self.l2(b), size=a.shape[-2:], mode="nearest")
        return self.head(torch.nn.functional.interpolate(p, size=x.shape[-2:], mode="bilinear"))


def test_a_torchscript_fpn_with_sizes_from_shapes_loses_filters_in_every_group(tmp_path):
    # c1's channels lend the first upsampling its height and width (Shape(a)[2:]), l1 + l2's sum is upsampled
    # to sizes whose channel entry is its own count: each group shrinks to what the masked model computes.
    path = tmp_path / "fpn.onnx"
    torch.manual_seed(0)
    with torch.no_grad():
        torch.onnx.export(_SizedFPN().eval(), (torch.randn(1, 3, 32, 32),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}})
    model = onnx.load(str(path))
    groups = {g.name: g for g in channel_groups(model)}
    assert {name: g.prunable for name, g in groups.items()} == {
        "c1.weight": True, "c2.weight": True, "l1.weight": True, "head.weight": False}
    assert groups["l1.weight"].members == ("l1.weight", "l2.weight")
    x = np.random.default_rng(1).normal(size=(2, 3, 40, 24)).astype(np.float32)
    for name, group in groups.items():
        if group.prunable:
            removed = [0, group.n_channels - 1]
            masked = zeroed(model, group, removed)
            shrunk = shrink(model, {name: _mask(group.n_channels, removed)}).model
            np.testing.assert_allclose(_run(shrunk, x)[0], _run(masked, x)[0], rtol=0, atol=1e-5, err_msg=name)


def test_channels_that_reach_a_concat_three_times_are_cut_in_each_copy():
    # YOLOv8's SPPF: cv1 -> x, MaxPool(x), MaxPool(MaxPool(x)) -> Concat -> cv2. The Concat holds cv1's
    # channels three times, one block each; cutting one copy alone once left cv2 reading 3C - 2k channels
    # against a weight cut for 3C - k (the group used to be left alone). Each removed channel now leaves every
    # block of cv2's input axis, and the shrunk graph computes the original with those filters zeroed.
    model = _text_model(
        """
        x = Conv <kernel_shape = [1, 1]> (input, w1)
        p1 = MaxPool <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x)
        p2 = MaxPool <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (p1)
        j = Concat <axis = 1> (x, p1, p2)
        out = Conv <kernel_shape = [1, 1]> (j, w2)
        """,
        "float[4, 2, 1, 1] w1 = " + _floats((4, 2, 1, 1), 1) + ", float[3, 12, 1, 1] w2 = " + _floats((3, 12, 1, 1), 2),
        "float[N, 2, 5, 5] input",
        "float[N, 3, 5, 5] out",
    )
    group = next(g for g in channel_groups(model) if g.name == "w1")
    assert group.prunable and [(s.tensor, s.axis, s.outer) for s in group.consumers] == [("w2", 1, 3)]
    shrunk = shrink(model, {"w1": _mask(4, [1, 2])}).model
    assert _value(shrunk, "w2").shape == (3, 6, 1, 1)
    w1 = _value(model, "w1").copy()
    w1[[1, 2]] = 0
    x = np.random.default_rng(0).normal(size=(2, 2, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(_run(shrunk, x)[0], _run(_with_values(model, {"w1": w1}), x)[0], rtol=0, atol=1e-5)


class _ConvRecurrent(torch.nn.Module):
    """A CRNN's tail as captcha and OCR readers build it: convs over a line image, the height squeezed away, the
    columns read by a bidirectional LSTM (sequence first) or a GRU (batch first), a per-column classifier."""

    def __init__(self, kind: str):
        super().__init__()
        nn = torch.nn
        self.kind = kind
        self.conv = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 24, (4, 1)), nn.BatchNorm2d(24), nn.ReLU())
        self.rnn = nn.LSTM(24, 12, bidirectional=True) if kind == "lstm" else nn.GRU(24, 12, batch_first=True)
        self.fc = nn.Linear(24 if kind == "lstm" else 12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv(x).squeeze(2)  # [N, 24, W]
        y, _ = self.rnn(f.permute(2, 0, 1) if self.kind == "lstm" else f.transpose(1, 2))
        return self.fc(y)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_the_conv_before_a_recurrent_layer_loses_filters_and_its_input_weight_columns(kind, tmp_path):
    # The last conv's channels reach the LSTM's / GRU's input weight W [directions, gates * hidden, input] along
    # axis 2; its zero initial state is sized from Shape(x)[batch], which reads no channel count. The group used
    # to stop there ("an op this analysis does not know", then "the channels' shape ... reaches ConstantOfShape").
    module = _ConvRecurrent(kind)
    _randomise_batchnorm(module)
    torch.manual_seed(0)
    path = export_torch(module.eval(), torch.zeros(1, 1, 4, 10), tmp_path / f"{kind}.onnx", "torchscript")
    groups, shrunk = _shrunk_matches_masked_torch(path, (1, 4, 10))
    (last,) = [g for g in groups.values() if g.op_type == "Conv" and any(s.axis == 2 for s in g.consumers)]
    (weight,) = [s.tensor for s in last.consumers]
    model = load_model(path)
    assert [n.op_type for n in model.graph.node if weight in n.input] == [kind.upper()]
    assert last.n_channels == 24 and _value(shrunk, weight).shape[2] == 12
    # the recurrent layer's own hidden units are the third group
    assert sorted(g.op_type for g in groups.values()) == ["Conv", "Conv", kind.upper()]


class _Recurrent(torch.nn.Module):
    """A recurrent classifier over [N, 7, 10] inputs: its per-step outputs (or the last layer's final state)
    read by a Linear."""

    def __init__(self, kind: str, bidirectional: bool, layers: int, batch_first: bool, last_state: bool) -> None:
        super().__init__()
        self.rnn = getattr(torch.nn, kind)(10, 16, num_layers=layers, bidirectional=bidirectional,
                                           batch_first=batch_first)
        self.fc = torch.nn.Linear(16 * (2 if bidirectional else 1), 5)
        self.batch_first, self.last_state = batch_first, last_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, state = self.rnn(x if self.batch_first else x.transpose(0, 1))
        if self.last_state:
            return self.fc((state[0] if isinstance(state, tuple) else state)[-1])
        return self.fc(y)


@pytest.mark.parametrize("kind, exporter, bidirectional, layers, batch_first, last_state", [
    ("LSTM", "torchscript", True, 2, False, False),   # Y -> Transpose -> Reshape [T, N, 2H] -> the next LSTM
    ("GRU", "dynamo", False, 2, True, False),         # Y -> Transpose -> Reshape to a shape computed from its dims
    ("LSTM", "dynamo", True, 1, True, False),
    ("LSTM", "torchscript", False, 1, False, True),   # Y_h -> Gather(-1) -> Gemm
    ("GRU", "torchscript", False, 2, True, True),     # Concat(Y_h of each layer, axis 0) -> Gather(-1): coupled
])
def test_recurrent_hidden_units_leave_the_graph(kind, exporter, bidirectional, layers, batch_first, last_state,
                                                tmp_path):
    # Unit j of a recurrent layer owns a row of each gate block of W and R, its entries of B, R's column j and
    # the next layers' inputs; hidden_size shrinks and the zero initial states (computed from the batch size,
    # with the hidden size in their shape) are left out, as zeros by the op's definition. torch stacks the
    # layers' final states along axis 0 before h[-1]: that Concat couples the layers (the same units leave both).
    torch.manual_seed(0)
    module = _Recurrent(kind, bidirectional, layers, batch_first, last_state).eval()
    path = export_torch(module, torch.zeros(2, 7, 10), tmp_path / "rnn.onnx", exporter)
    groups, shrunk = _shrunk_matches_masked_torch(path, (7, 10))
    recurrent = [g for g in groups.values() if g.op_type == kind]
    coupled = last_state and layers > 1
    assert len(recurrent) == (1 if coupled else layers) and all(g.n_channels == 16 for g in recurrent)
    assert sorted(len(g.producers) for g in recurrent) == ([2 * layers] if coupled else [2] * layers)  # W and R
    nodes = [n for n in shrunk.graph.node if n.op_type == kind]
    labels = {node_label(n, i): n for i, n in enumerate(shrunk.graph.node)}
    states = {(label, k) for g in recurrent for label, k in g.cleared}
    assert len(nodes) == layers and len(states) == layers * (2 if kind == "LSTM" else 1)
    assert all(not labels[label].input[k] for label, k in states)
    gates = {"LSTM": 4, "GRU": 3}[kind]
    for node in nodes:
        assert helper.get_attribute_value(next(a for a in node.attribute if a.name == "hidden_size")) == 8
        w, r = (_value(shrunk, name) for name in node.input[1:3])
        assert w.shape[1] == r.shape[1] == gates * 8 and r.shape[2] == 8


def test_recurrent_units_stay_where_the_state_is_fed_or_leaves_the_graph():
    # A streaming model's state is a graph input (or output): its hidden size is part of the graph's I/O.
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("W", (1, 4, 3)), ("R", (1, 4, 4)), ("fc", (4, 2)))]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, "N", 3])
    h0 = helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, "N", 4])

    def reason(inputs: list, state: str, output: str) -> str:
        nodes = [helper.make_node("RNN", ["x", "W", "R", "", "", state], ["", "h"], hidden_size=4),
                 helper.make_node("ReduceMean", ["h"], ["s"], axes=[0], keepdims=0),
                 helper.make_node("MatMul", ["s", "fc"], ["logits"])]
        out = helper.make_tensor_value_info(output, TensorProto.FLOAT, None)
        model = helper.make_model(helper.make_graph(nodes, "g", inputs, [out], inits),
                                  opset_imports=[helper.make_opsetid("", 17)])
        (group,) = [g for g in channel_groups(model) if g.op_type == "RNN"]
        assert not group.prunable
        return group.reason

    assert "initial state 'h0'" in reason([x, h0], "h0", "logits")
    assert "graph output 'h'" in reason([x], "", "h")


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_recurrent_units_cut_peepholes_and_constant_states(op):
    # Hand-built: a bidirectional layer with every optional input given as a constant (B, initial_h, LSTM's
    # initial_c and peepholes P), its Y read by a MatMul and its Y_h by another. Removing units must equal
    # zeroing their readers' rows in onnxruntime (1e-5), with every constant cut. (onnxruntime runs layout 0
    # only: "Batchwise recurrent operations (layout == 1) are not supported".)
    rng, layout = np.random.default_rng(0), 0
    gates, hidden, inputs, batch, steps = {"LSTM": 4, "GRU": 3, "RNN": 1}[op], 6, 5, 2, 4
    values = {"W": (2, gates * hidden, inputs), "R": (2, gates * hidden, hidden), "B": (2, 2 * gates * hidden),
              "h0": (batch, 2, hidden) if layout else (2, batch, hidden), "fc": (2 * hidden, 3), "fh": (hidden, 3)}
    if op == "LSTM":
        values.update({"c0": values["h0"], "P": (2, 3 * hidden)})
    inits = {name: rng.standard_normal(shape).astype(np.float32) * 0.5 for name, shape in values.items()}
    x_shape = [batch, steps, inputs] if layout else [steps, batch, inputs]
    names = ["x", "W", "R", "B", "", "h0"] + (["c0", "P"] if op == "LSTM" else [])
    y_merge = [batch, steps, 2 * hidden] if layout else [steps, batch, 2 * hidden]
    nodes = [helper.make_node(op, names, ["y", "yh"], hidden_size=hidden, direction="bidirectional", layout=layout),
             # Y [.., 2, H] -> its directions side by side -> a MatMul; Y_h's mean over the directions -> another
             helper.make_node("Transpose", ["y"], ["yt"], perm=[0, 1, 2, 3] if layout else [0, 2, 1, 3]),
             helper.make_node("Reshape", ["yt", "shape"], ["ym"]),
             helper.make_node("MatMul", ["ym", "fc"], ["out"]),
             helper.make_node("ReduceMean", ["yh"], ["hm"], axes=[1 if layout else 0], keepdims=0),
             helper.make_node("MatMul", ["hm", "fh"], ["out_h"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, y_merge[:2] + [3]),
         helper.make_tensor_value_info("out_h", TensorProto.FLOAT, [batch, 3])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()]
        + [numpy_helper.from_array(np.array(y_merge, np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (group,) = [g for g in channel_groups(model) if g.op_type == op]
    assert group.prunable, group.reason
    removed = np.array([1, 4])
    shrunk = shrink(model, {group.name: np.setdiff1d(np.arange(hidden), removed)}, [group]).model
    onnx.checker.check_model(shrunk, full_check=True)
    x = rng.standard_normal(x_shape).astype(np.float32)
    want, got = _run(zeroed(model, group, removed), x), _run(shrunk, x)
    for a, b in zip(want, got):
        np.testing.assert_allclose(b, a, atol=1e-5)
    kept = hidden - len(removed)
    cut = {name: _value(shrunk, name).shape for name in inits}
    assert cut["W"] == (2, gates * kept, inputs) and cut["R"] == (2, gates * kept, kept)
    assert cut["B"] == (2, 2 * gates * kept) and cut["h0"][2] == kept and cut["fc"] == (2 * kept, 3)
    assert cut["fh"] == (kept, 3) and (op != "LSTM" or (cut["P"] == (2, 3 * kept) and cut["c0"][2] == kept))


def test_a_slice_of_channels_whose_rank_inference_lost_stops_the_group_with_the_reason(monkeypatch):
    # Where ONNX shape inference loses the shapes past an LSTM (a 40x-pruned Keras reader stored with sparse
    # initializers), the Slice that cuts Y into its directions read rank 0 and raised ZeroDivisionError out of
    # the analysis. Here inference is made to lose Y's shape alone.
    from onnx_admm.converters import groups as groups_module

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("W", (1, 16, 3)), ("R", (1, 16, 4)), ("fc", (4, 2)))]
    inits += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (("zero", [0]), ("one", [1]))]
    nodes = [helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=4),
             helper.make_node("Slice", ["y", "zero", "one", "one"], ["y0"]),
             helper.make_node("Squeeze", ["y0", "one"], ["s"]),
             helper.make_node("MatMul", ["s", "fc"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, "N", 3])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [5, "N", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert [g.prunable for g in channel_groups(model) if g.op_type == "LSTM"] == [True]
    inferred = groups_module._Analysis.shape
    monkeypatch.setattr(groups_module._Analysis, "shape",
                        lambda self, name: None if name == "y" else inferred(self, name))
    (group,) = [g for g in channel_groups(model) if g.op_type == "LSTM"]
    assert not group.prunable and group.reason.startswith("the rank of the input of Slice")


class _ResidualRecurrent(torch.nn.Module):
    """y = LSTM(Linear(x)) + Linear(x): the LSTM's units and the projection's outputs meet in a sum."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.fc = torch.nn.Linear(10, 16), torch.nn.Linear(16, 5)
        self.rnn = torch.nn.LSTM(16, 16, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.inp(x)
        return self.fc(torch.relu(self.rnn(a)[0] + a))


def test_recurrent_units_summed_with_a_projection_are_one_coupled_group(tmp_path):
    # The sum couples the projection's outputs with the LSTM's hidden units: one group of three members (the
    # projection, W and R), and W loses both its units' rows and, as the projection's reader, its input columns.
    torch.manual_seed(0)
    path = export_torch(_ResidualRecurrent().eval(), torch.zeros(2, 7, 10), tmp_path / "res.onnx", "torchscript")
    groups, shrunk = _shrunk_matches_masked_torch(path, (7, 10))
    (group,) = [g for g in groups.values() if len(g.producers) > 1]
    assert group.op_type == "MatMul" and len(group.producers) == 3 and group.n_channels == 16
    (lstm,) = [n for n in shrunk.graph.node if n.op_type == "LSTM"]
    assert _value(shrunk, lstm.input[1]).shape == (1, 32, 8) and _value(shrunk, lstm.input[2]).shape == (1, 32, 8)


@pytest.mark.parametrize("channel_entry", [-1, 6])
def test_a_bias_reshaped_from_a_constant_is_cut_with_the_filters(channel_entry):
    # quantize_dynamic's float form adds a conv's bias after it as Reshape(bias, [1, -1, 1, 1]): that computed
    # operand stopped the group ("coupled ... with a branch whose channels do not come from the same layers").
    # The bias is cut with the filters; a size in the shape (6 here) is edited, a -1 takes the cut length.
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("w1", (6, 2, 3, 3)), ("bias", (6,)), ("w2", (4, 6, 3, 3)))]
    inits.append(numpy_helper.from_array(np.array([1, channel_entry, 1, 1], np.int64), "shape"))
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["bias", "shape"], ["b"]),
             helper.make_node("Add", ["c", "b"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 5, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    group = next(g for g in channel_groups(model) if g.name == "w1")
    assert group.prunable, group.reason
    removed = np.array([0, 3])
    shrunk = shrink(model, {"w1": np.setdiff1d(np.arange(6), removed)}, [group]).model
    onnx.checker.check_model(shrunk, full_check=True)
    x = rng.standard_normal((2, 2, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(_run(shrunk, x)[0], _run(zeroed(model, group, removed), x)[0], atol=1e-5)
    assert _value(shrunk, "bias").shape == (4,)
    assert _value(shrunk, "shape").tolist() == [1, -1 if channel_entry == -1 else 4, 1, 1]
