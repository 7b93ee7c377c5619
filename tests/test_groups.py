"""converters.groups: which output channels can be removed, what is coupled to them, and why not."""

from __future__ import annotations

import onnx
import onnx.parser
import torch
import torch.nn.functional as F
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
    prunable = [(g.op_type, g.unit, g.n_channels) for g in groups if g.prunable]
    # The FFN's 64 hidden units; the fused QKV projection by heads (tests/test_heads.py), not by its 96 rows.
    assert prunable == [("MatMul", "head", 4), ("MatMul", "channel", 64)]


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
        (  # Concat of two copies of the channels with another layer's channels
            "c = Conv <kernel_shape = [3, 3]> (input, w, b)\n r0 = Relu (c)\n"
            " d = Conv <kernel_shape = [3, 3]> (input, w3, b)\n r = Concat <axis = 1> (r0, d, r0)"
            + _GAP_HEAD.replace("fc, fb", "fc12, fb"),
            _CONV + ", float[4, 2, 3, 3] w3 = " + _floats((4, 2, 3, 3), 9) + ", float[3, 12] fc12 = "
            + _floats((3, 12), 5) + ", float[3] fb = " + _floats((3,), 4),
            "joins copies of the channels with other channels",
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
        "unit": "channel",
        "prunable": True,
        "reason": None,
        "members": ["conv2.weight"],
        "sliced": ["conv2.weight[axis 0]", "conv2.bias[axis 0]"],
        "depthwise": [],
        "consumers": ["fc1.weight[axis 1, block 16]"],
        "reshapes": ["val_7[1] (-16 per channel)"],
        "frozen": [],
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


class _C2fSppf(torch.nn.Module):
    """YOLOv8's C2f block (cv1 split in two halves, a bottleneck on the second, all joined before cv2; with
    ``shortcut`` the bottleneck adds its input back) and an SPPF-style Concat of a tensor and its pools."""

    def __init__(self, shortcut: bool, c: int = 4) -> None:
        super().__init__()
        self.shortcut = shortcut
        self.cv1 = torch.nn.Conv2d(3, 2 * c, 1)
        self.m1 = torch.nn.Conv2d(c, c, 3, padding=1)
        self.m2 = torch.nn.Conv2d(c, c, 3, padding=1)
        self.cv2 = torch.nn.Conv2d(3 * c, 8, 1)
        self.fc = torch.nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = F.silu(self.cv1(x)).split([self.m1.in_channels] * 2, 1)  # a Split with constant sizes
        m = self.m2(F.silu(self.m1(b)))
        z = F.silu(self.cv2(torch.cat([a, b, b + m if self.shortcut else m], 1)))
        p1 = F.max_pool2d(z, 3, 1, 1)
        p2 = F.max_pool2d(p1, 3, 1, 1)
        return self.fc(F.adaptive_avg_pool2d(torch.cat([z, p1, p2], 1), 1).flatten(1))


@pytest.mark.parametrize("shortcut", [True, False])
def test_a_c2f_split_and_an_sppf_concat_keep_their_channels_in_blocks(tmp_path, shortcut):
    # cv1's units are pairs of filters (one per half of its Split); with the shortcut the bottleneck's last
    # conv joins its group (its sum with the second half) and the Concat holds the units in 3 blocks; without
    # it the Concat holds them in 2 blocks beside the bottleneck's own channels (a group of its own). The
    # SPPF's Concat of z and its two pools holds cv2's units in 3 blocks up to the Linear head. Removing units
    # computes the original with those filters zeroed, in onnxruntime.
    import numpy as np
    import onnxruntime as ort

    from exporter_models import export_torch
    from onnx_admm.converters.cut import zeroed
    from onnx_admm.converters.shrink import shrink

    torch.manual_seed(0)
    path = export_torch(_C2fSppf(shortcut).eval(), torch.randn(2, 3, 8, 8), tmp_path / "c2f.onnx", "torchscript")
    model = onnx.load(str(path))
    assert "Split" in [n.op_type for n in model.graph.node]
    groups = {g.name: g for g in channel_groups(model)}
    cv1, cv2 = groups["cv1.weight"], groups["cv2.weight"]
    assert cv2.prunable and cv2.n_channels == 8 and {(s.tensor, s.outer) for s in cv2.consumers} == {("fc.weight", 3)}
    if shortcut:
        assert cv1.prunable and cv1.n_channels == 4 and cv1.members == ("cv1.weight", "m2.weight")
        assert ("cv1.weight", 2) in {(s.tensor, s.outer) for s in cv1.outputs}
        assert ("cv2.weight", 3) in {(s.tensor, s.outer) for s in cv1.consumers}
    else:
        assert cv1.prunable and cv1.n_channels == 4 and cv1.members == ("cv1.weight",)
        assert ("cv2.weight", 2, 0, 12, 4) in {(s.tensor, s.outer, s.offset, s.total, s.stride) for s in cv1.consumers}
        m2 = groups["m2.weight"]  # the bottleneck's own channels: one range of that Concat
        assert m2.prunable and ("cv2.weight", 1, 8, 12) in {(s.tensor, s.outer, s.offset, s.total) for s in m2.consumers}
    x = np.random.default_rng(0).normal(size=(3, 3, 8, 8)).astype(np.float32)

    def run(m: onnx.ModelProto) -> np.ndarray:
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]

    for group in [g for g in groups.values() if g.prunable]:
        removed = np.array([0, group.n_channels - 1])
        keep = np.ones(group.n_channels, dtype=bool)
        keep[removed] = False
        shrunk = shrink(model, {group.name: keep}).model
        onnx.checker.check_model(shrunk, full_check=True)
        np.testing.assert_allclose(run(shrunk), run(zeroed(model, group, removed)), rtol=0, atol=1e-5,
                                   err_msg=group.name)


def test_a_weight_that_is_also_a_graph_input_keeps_its_filters_and_says_how_to_change_that():
    # The TorchScript exporter's keep_initializers_as_inputs=True lists every weight as a graph input too: a cut
    # would change that input's declared shape, so the group stays, with the way round it.
    model = _model("c = Conv <kernel_shape = [3, 3]> (input, w, b)\n r = Relu (c)" + _GAP_HEAD, _CONV + ", " + _HEAD,
                   inputs="float[N, 2, 6, 6] input, float[4, 2, 3, 3] w")
    group = channel_groups(model)[0]
    assert group.name == "w" and not group.prunable
    assert group.reason == ("'w' is also a graph input (it can be fed at run time, as exports with "
                            "keep_initializers_as_inputs=True list every weight; re-export without it to remove filters)")
