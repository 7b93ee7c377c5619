"""converters.groups: which output channels can be removed, what is coupled to them, and why not."""

from __future__ import annotations

import onnx
import onnx.parser
import pytest

from onnx_admm.converters.groups import ChannelGroup, TensorSlice, channel_groups, channel_groups_summary
from models import _floats


def _groups(path) -> dict[str, ChannelGroup]:
    return {g.name: g for g in channel_groups(onnx.load(str(path)))}


def _cuts(slices: tuple[TensorSlice, ...]) -> set[tuple[str, int, int]]:
    return {(s.tensor, s.axis, s.inner) for s in slices}


def test_lenet5_chain_conv_conv_flatten_gemm(onnx_model_file):
    groups = _groups(onnx_model_file("lenet5_torchscript"))
    assert list(groups) == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
    conv1, conv2, fc1, fc2 = groups.values()
    assert conv1.prunable and conv1.n_channels == 20
    assert _cuts(conv1.outputs) == {("conv1.weight", 0, 1), ("conv1.bias", 0, 1)}
    assert _cuts(conv1.consumers) == {("conv2.weight", 1, 1)}
    # conv2 -> MaxPool -> Flatten: each channel owns a block of 4*4 columns of fc1
    assert conv2.prunable and _cuts(conv2.consumers) == {("fc1.weight", 1, 16)}
    assert fc1.prunable and _cuts(fc1.consumers) == {("fc2.weight", 1, 1)}
    assert not fc2.prunable and "graph output 'logits'" in fc2.reason


def test_lenet5_dynamo_reshape_constant_is_rewritten(onnx_model_file):
    conv2 = _groups(onnx_model_file("lenet5_dynamo"))["conv2.weight"]
    assert conv2.prunable
    assert [(e.tensor, e.index, e.per_channel) for e in conv2.reshapes] == [("val_7", 1, 16)]


def test_resnet_block_batchnorm_and_residual_coupling(onnx_model_file):
    groups = _groups(onnx_model_file("resnet_block_torchscript"))
    conv1 = groups["conv1.weight"]
    assert conv1.prunable
    assert _cuts(conv1.outputs) == {
        ("conv1.weight", 0, 1),
        *(("bn1." + p, 0, 1) for p in ("weight", "bias", "running_mean", "running_var")),
    }
    assert _cuts(conv1.consumers) == {("conv2.weight", 1, 1)}
    # The stem's and conv2's channels meet in the residual Add: one group, named by the stem, that cuts both.
    stem = groups["stem.weight"]
    assert stem.prunable and stem.members == ("stem.weight", "conv2.weight")
    assert stem.member_nodes == ("/stem/Conv", "/conv2/Conv")
    assert "conv2.weight" not in groups
    assert _cuts(stem.outputs) == {
        ("stem.weight", 0, 1),
        ("conv2.weight", 0, 1),
        *((f"bn{k}.{p}", 0, 1) for k in (0, 2) for p in ("weight", "bias", "running_mean", "running_var")),
    }
    assert _cuts(stem.consumers) == {("conv1.weight", 1, 1), ("fc.weight", 1, 1)}
    assert not groups["fc.weight"].prunable


def test_mobilenet_block_depthwise_follows_the_stem(onnx_model_file):
    groups = list(_groups(onnx_model_file("mobilenet_block_torchscript")).values())
    stem, depthwise, pointwise, fc = groups
    assert stem.prunable and stem.depthwise_nodes == ("/depthwise/depthwise.0/Conv",)
    assert {s.tensor for s in stem.depthwise} == {"onnx::Conv_43", "onnx::Conv_44"}
    assert _cuts(stem.consumers) == {("onnx::Conv_46", 1, 1)}  # pointwise input channels
    assert not depthwise.prunable and "follow group 'onnx::Conv_40'" in depthwise.reason
    assert pointwise.prunable and _cuts(pointwise.consumers) == {("fc.weight", 1, 1)}
    assert not fc.prunable


def test_transformer_feed_forward_hidden_units_are_prunable(onnx_model_file):
    groups = channel_groups(onnx.load(str(onnx_model_file("transformer_torchscript"))))
    prunable = [g for g in groups if g.prunable]
    assert len(prunable) == 1 and prunable[0].op_type == "MatMul" and prunable[0].n_channels == 64
    assert not any(g.prunable for g in groups if g.n_channels == 96)  # QKV: reshaped into heads


def test_weight_shared_in_two_roles_is_not_prunable(onnx_model_file):
    (group,) = _groups(onnx_model_file("shared_gemm")).values()
    assert not group.prunable and "cut differently" in group.reason


def _model(body: str, inits: str, inputs="float[N, 2, 6, 6] input", outputs="float[N, 3] logits") -> onnx.ModelProto:
    return onnx.parser.parse_model(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g ({inputs}) => ({outputs}) <{inits}> {{ {body} }}"""
    )


_CONV = "float[4, 2, 3, 3] w = " + _floats((4, 2, 3, 3), 1) + ", float[4] b = " + _floats((4,), 2)
_HEAD = "float[3, 4] fc = " + _floats((3, 4), 3) + ", float[3] fb = " + _floats((3,), 4)
_GAP_HEAD = """
    p = GlobalAveragePool (r)
    f = Flatten (p)
    logits = Gemm <transB = 1> (f, fc, fb)
"""


@pytest.mark.parametrize(
    "body, inits, reason",
    [
        (  # Concat of the channels with something else
            "c = Conv <kernel_shape = [3, 3]> (input, w, b)\n r0 = Relu (c)\n r = Concat <axis = 1> (r0, r0)"
            + _GAP_HEAD.replace("fc, fb", "fc8, fb"),
            _CONV + ", float[3, 8] fc8 = " + _floats((3, 8), 5) + ", float[3] fb = " + _floats((3,), 4),
            "Concat",
        ),
        (  # Softmax over the channel axis mixes them
            "c = Conv <kernel_shape = [3, 3]> (input, w, b)\n r = Softmax <axis = 1> (c)" + _GAP_HEAD,
            _CONV + ", " + _HEAD,
            "Softmax",
        ),
        (  # a grouped (not depthwise) consumer
            "c = Conv <kernel_shape = [3, 3]> (input, w, b)\n"
            " r = Conv <kernel_shape = [1, 1], group = 2> (c, gw)" + _GAP_HEAD,
            _CONV + ", float[4, 2, 1, 1] gw = " + _floats((4, 2, 1, 1), 6) + ", " + _HEAD,
            "grouped Conv",
        ),
        (  # one initializer read by two BatchNorm nodes (exporters merge equal tensors)
            "c = Conv <kernel_shape = [3, 3]> (input, w, b)\n"
            " n = BatchNormalization (c, ones, zeros, zeros, ones)\n"
            " c2 = Conv <kernel_shape = [1, 1]> (n, w2, b)\n"
            " n2 = BatchNormalization (c2, ones, zeros, zeros, ones)\n"
            " r = Relu (n2)" + _GAP_HEAD,
            _CONV + ", float[4, 4, 1, 1] w2 = " + _floats((4, 4, 1, 1), 7)
            + ", float[4] ones = {1.0, 1.0, 1.0, 1.0}, float[4] zeros = {0.0, 0.0, 0.0, 0.0}, " + _HEAD,
            "also read by",
        ),
        (  # a Reshape that splits the channels
            "c = Conv <kernel_shape = [3, 3]> (input, w, b)\n"
            " s = Reshape (c, split)\n r = Relu (s)\n f = Flatten (r)\n logits = Gemm <transB = 1> (f, fc64, fb)",
            _CONV + ", int64[5] split = {0, 2, 2, 4, 4}, float[3, 64] fc64 = " + _floats((3, 64), 8)
            + ", float[3] fb = " + _floats((3,), 4),
            "splits or reorders",
        ),
    ],
    ids=["concat", "softmax", "grouped_conv", "merged_initializer", "reshape_split"],
)
def test_stops_with_a_reason(body, inits, reason):
    model = _model(body, inits)
    onnx.checker.check_model(model, full_check=True)
    group = channel_groups(model)[0]
    assert group.name == "w" and not group.prunable
    assert reason in group.reason


def test_a_residual_sum_with_a_graph_input_stops_the_group():
    model = _model(
        "c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (input, w4, b)\n s = Add (c, input)\n r = Relu (s)"
        + _GAP_HEAD,
        "float[4, 4, 3, 3] w4 = " + _floats((4, 4, 3, 3), 1) + ", float[4] b = " + _floats((4,), 2) + ", " + _HEAD,
        inputs="float[N, 4, 6, 6] input",
    )
    group = channel_groups(model)[0]
    assert not group.prunable and "coupled through Add" in group.reason and "graph input 'input'" in group.reason


def test_summary_for_inspect(onnx_model_file):
    groups = channel_groups(onnx.load(str(onnx_model_file("lenet5_dynamo"))))
    summary = channel_groups_summary(groups)
    assert [row["name"] for row in summary] == [g.name for g in groups]
    conv2 = summary[1]
    assert conv2 == {
        "name": "conv2.weight",
        "node": "node_conv2d_1",
        "op_type": "Conv",
        "channels": 50,
        "prunable": True,
        "reason": None,
        "members": ["conv2.weight"],
        "sliced": ["conv2.weight[axis 0]", "conv2.bias[axis 0]"],
        "depthwise": [],
        "consumers": ["fc1.weight[axis 1, block 16]"],
        "reshapes": ["val_7[1] (-16 per channel)"],
    }
    assert summary[-1]["prunable"] is False and "graph output" in summary[-1]["reason"]


@pytest.mark.parametrize("op", ["Sinh", "Cosh", "Asinh", "Atanh", "Relu"])
def test_every_unary_op_of_the_op_table_passes_the_channels_through(op):
    # The walk asks converters.optable like the batch-axis proof: Sinh & co. once stopped the group here.
    from onnx_admm.converters.optable import UNARY

    assert op in UNARY
    model = _model(f"c = Conv <kernel_shape = [3, 3]> (input, w, b)\n r0 = {op} (c)\n r = Relu (r0)" + _GAP_HEAD,
                   _CONV + ", " + _HEAD)
    onnx.checker.check_model(model, full_check=True)
    group = channel_groups(model)[0]
    assert group.name == "w" and group.prunable, group.reason


def test_the_onnx_side_has_no_import_cycle():
    """Each converters module imports only modules below it: a walk of the import graph finds no cycle."""
    import ast
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "converters"
    deps = {}
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        imports = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
        assert not [m for m in imports if m.startswith("onnx_admm") and not m.startswith("onnx_admm.converters")], path
        deps[path.stem] = {m.split(".")[2] for m in imports if m.startswith("onnx_admm.converters.")}
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        assert state.get(name) != 1, f"import cycle: {' -> '.join(trail + [name])}"
        if state.get(name) == 2:
            return
        state[name] = 1
        for dep in sorted(deps.get(name, ())):
            visit(dep, trail + [name])
        state[name] = 2

    for name in sorted(deps):
        visit(name, [])


def test_graph_view_indexes_producers_readers_and_subgraph_reads():
    from onnx_admm.converters.graphinfo import GraphView

    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x, bool c) => (float[2] y) <float[2] k = {1.0, 2.0}> {
            a = Add (x, k)
            i = Identity (k)
            y = If (c) <then_branch = t () => (float[2] o) { o = Mul (a, i) },
                        else_branch = e () => (float[2] o2) { o2 = Sub (a, x) }>
        }""")
    view = GraphView(model)
    assert view.producers["a"].op_type == "Add" and "x" not in view.producers
    assert view.readers["k"] == [(0, 1), (1, 0)]
    assert view.readers["a"] == [(2, -1)]  # read inside the If's branches: the If node, input -1
    assert view.readers["x"] == [(0, 0), (2, -1)] and view.readers["c"] == [(2, 0)]
    assert view.aliases == {"i": "k"} and view.by_label[view.labels[2]].op_type == "If"
