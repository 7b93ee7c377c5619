"""Op coverage (issue 3, item 4): each op onnx2torch lacks, or cannot reach through the opset down-conversion,
at every opset exporters write it, imported and compared with onnxruntime (the ``check`` tolerance);
the LSTM/GRU/RNN converters' options against onnxruntime; the normalize passes behind them.

``python tests/test_ops.py`` prints the largest torch-vs-onnxruntime difference per case.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from exporter_models import export_torch, op_model, recurrent_node
from torch import nn

from onnx_admm.converters.errors import UserError
from onnx_admm.converters.importer import import_model
from onnx_admm.converters.normalize import STASH_DOMAIN, STASHED_OPS, normalize
from onnx_admm.check import within_tolerance

RNG = np.random.default_rng(0)
_G6, _B6 = RNG.normal(size=6).astype(np.float32), RNG.normal(size=6).astype(np.float32)
_G36, _B36 = RNG.normal(size=(3, 6)).astype(np.float32), RNG.normal(size=(3, 6)).astype(np.float32)

X2 = "(float[N, 6] x) => (float[N, 6] y)"
X3 = "(float[N, 3, 4] x) => (float[?, ?, ?] y)"
R3 = "(float[N, 3, 4] x) => (float[?, ?] y)"  # one axis reduced away
X4 = "(float[N, 3, 4, 4] x) => (float[?, ?, ?, ?] y)"
X5 = "(float[N, 3, 5, 5] x) => (float[?, ?, ?, ?] y)"
_W4 = RNG.normal(size=(4, 3, 3, 3)).astype(np.float32)
_WT = RNG.normal(size=(3, 4, 3, 3)).astype(np.float32)  # ConvTranspose: [C_in, C_out / group, k, k]
_BT = RNG.normal(size=4).astype(np.float32)

# (case, signature, body, opsets, initializers). Opsets: those where the op's definition changes or an
# exporter writes it (torch's TorchScript exporter 11-17, dynamo 18-20+); 18+ goes through the stash or
# the version converter.
CASES = [
    ("GlobalMaxPool", X4, "y = GlobalMaxPool (x)", [1, 11, 17, 22], None),
    ("HardSigmoid", X2, "y = HardSigmoid <alpha = 0.3, beta = 0.4> (x)", [6, 11, 17, 22], None),
    ("HardSwish", X2, "y = HardSwish (x)", [14, 17, 22], None),
    ("ReduceMean-axes-attr", R3, "y = ReduceMean <axes = [1], keepdims = 0> (x)", [11, 13, 17], None),
    ("ReduceMean-axes-input", R3,
     "a = Constant <value = int64[1] {1}> ()\n y = ReduceMean <keepdims = 0> (x, a)", [18, 20], None),
    ("ReduceSum-axes-input", X3,
     "a = Constant <value = int64[1] {-1}> ()\n y = ReduceSum <keepdims = 1> (x, a)", [13, 17, 18, 20], None),
    ("ReduceSum-axes-attr", R3, "y = ReduceSum <axes = [2], keepdims = 0> (x)", [11], None),
    ("ReduceSum-all", "(float[N, 3, 4] x) => (float y)", "y = ReduceSum <keepdims = 0> (x)", [13, 18], None),
    ("Split-split-input", "(float[N, 6] x) => (float[?, ?] a, float[?, ?] b)",
     "s = Constant <value = int64[2] {2, 4}> ()\n a, b = Split <axis = 1> (x, s)", [13, 17, 18, 20], None),
    ("Split-num_outputs", "(float[N, 7] x) => (float[?, ?] a, float[?, ?] b)",
     "a, b = Split <axis = 1, num_outputs = 2> (x)", [18, 20], None),
    ("Pad-constant", X4, "p = Constant <value = int64[8] {0, 0, 0, 1, 0, 0, 1, 2}> ()\n"
     " v = Constant <value = float {0.5}> ()\n y = Pad (x, p, v)", [11, 13, 18, 19, 21], None),
    ("Pad-reflect-axes", X4, "p = Constant <value = int64[4] {0, 1, 1, 2}> ()\n"
     " a = Constant <value = int64[2] {2, 3}> ()\n y = Pad <mode = \"reflect\"> (x, p, , a)", [18, 19, 21], None),
    ("Pad-edge", X4, "p = Constant <value = int64[8] {0, 1, 0, 1, 0, 0, 1, 2}> ()\n y = Pad <mode = \"edge\"> (x, p)",
     [11, 13, 18, 21], None),
    ("Pad-wrap", X4, "p = Constant <value = int64[8] {0, 0, 1, 1, 0, 0, 1, 2}> ()\n y = Pad <mode = \"wrap\"> (x, p)",
     [19, 21], None),
    ("Pad-crop", X4, "p = Constant <value = int64[8] {0, 0, -1, 1, 0, 0, 1, -2}> ()\n y = Pad (x, p)", [13, 18], None),
    ("Resize-linear", X4, "s = Constant <value = float[4] {1, 1, 2, 2}> ()\n y = Resize <mode = \"linear\"> (x, , s)",
     [13, 18, 19], None),
    ("Resize-nearest", X4, "s = Constant <value = float[4] {1, 1, 2, 2}> ()\n"
     " y = Resize <mode = \"nearest\", nearest_mode = \"floor\", coordinate_transformation_mode = \"asymmetric\"> "
     "(x, , s)", [13, 18, 19], None),
    ("Resize-axes", X4, "s = Constant <value = float[2] {2, 2}> ()\n"
     " y = Resize <mode = \"linear\", axes = [2, 3]> (x, , s)", [18, 19], None),
    ("Expand", "(float[N, 1] x) => (float[?, ?] y)", "s = Constant <value = int64[2] {1, 5}> ()\n y = Expand (x, s)",
     [13, 17, 20], None),
    ("Clip-no-bounds", X2, "y = Clip (x)", [11, 13, 17], None),
    ("Clip-min-only", X2, "m = Constant <value = float {-0.5}> ()\n y = Clip (x, m)", [11, 13, 17], None),
    ("Clip-max-only", X2, "m = Constant <value = float {0.5}> ()\n y = Clip (x, , m)", [11, 13, 17], None),
    ("Clip-runtime-bound", X2, "m = ReduceMean <keepdims = 0> (x)\n y = Clip (x, , m)", [13, 17], None),
    # Inference Dropout is an Identity (opset 9: onnx-caffe2's AlexNet; 12+: a ratio input; a mask output).
    ("Dropout", X2, "y = Dropout <ratio = 0.5> (x)", [7, 9, 10], None),
    ("Dropout-ratio-input", X2, "r = Constant <value = float {0.3}> ()\n y = Dropout (x, r)", [12, 13, 17], None),
    ("Dropout-unread-mask", X2, "y, m = Dropout (x)", [9, 13], None),
    ("Gelu", X2, "y = Gelu (x)", [20, 21], None),
    ("Gelu-tanh", X2, "y = Gelu <approximate = \"tanh\"> (x)", [20], None),
    ("Mish", X2, "y = Mish (x)", [18, 20], None),
    ("LayerNormalization", "(float[N, 3, 6] x) => (float[?, ?, ?] y)",
     "y = LayerNormalization <axis = -1, epsilon = 0.001> (x, g, b)", [17, 18, 20], {"g": _G6, "b": _B6}),
    # Pads that differ between the ends of an axis (onnx-caffe2's Inception, tf2onnx's SAME) and auto_pad.
    ("AveragePool-asymmetric", X5, "y = AveragePool <kernel_shape = [3, 3], pads = [0, 1, 1, 2]> (x)",
     [7, 11, 17, 19, 22], None),
    ("AveragePool-asymmetric-count-pad", X5,
     "y = AveragePool <kernel_shape = [3, 2], pads = [2, 0, 0, 1], count_include_pad = 1> (x)", [7, 11, 19], None),
    ("AveragePool-asymmetric-ceil", X5, "y = AveragePool <kernel_shape = [2, 3], strides = [2, 2], "
     "pads = [1, 0, 0, 2], ceil_mode = 1> (x)", [11, 19, 22], None),
    ("AveragePool-asymmetric-ceil-count-pad", X5, "y = AveragePool <kernel_shape = [3, 3], strides = [2, 3], "
     "pads = [0, 1, 2, 1], ceil_mode = 1, count_include_pad = 1> (x)", [11, 19], None),
    ("AveragePool-1d-asymmetric", "(float[N, 3, 9] x) => (float[?, ?, ?] y)",
     "y = AveragePool <kernel_shape = [4], strides = [2], pads = [0, 3]> (x)", [11, 19], None),
    ("AveragePool-same-upper", X5, "y = AveragePool <kernel_shape = [2, 2], strides = [2, 2], "
     "auto_pad = \"SAME_UPPER\"> (x)", [7, 11, 19], None),
    ("AveragePool-same-lower-count-pad", X5, "y = AveragePool <kernel_shape = [3, 2], strides = [2, 1], "
     "auto_pad = \"SAME_LOWER\", count_include_pad = 1> (x)", [11, 19], None),
    ("AveragePool-valid", X5, "y = AveragePool <kernel_shape = [2, 2], strides = [2, 2], auto_pad = \"VALID\"> (x)",
     [11], None),
    ("MaxPool-same-lower", X5, "y = MaxPool <kernel_shape = [2, 2], strides = [2, 2], auto_pad = \"SAME_LOWER\"> (x)",
     [8, 11, 12, 22], None),
    ("Conv-same-upper", X5, "y = Conv <auto_pad = \"SAME_UPPER\", strides = [2, 2]> (x, w)", [1, 11, 22], {"w": _W4}),
    # Spatial sizes unknown: with stride 1 the padding does not depend on them.
    ("Conv-same-lower-any-size", "(float[N, 3, H, W] x) => (float[?, ?, ?, ?] y)",
     "y = Conv <auto_pad = \"SAME_LOWER\", kernel_shape = [3, 2]> (x, w)", [11, 17], {"w": _W4[:, :, :, :2].copy()}),
    # ConvTranspose: uneven pads, SAME and output_shape (which onnx2torch ignores) become cropped outputs.
    ("ConvTranspose-uneven-pads", X5, "y = ConvTranspose <strides = [2, 2], pads = [1, 0, 0, 2], "
     "output_padding = [1, 1]> (x, w, b)", [1, 11, 22], {"w": _WT, "b": _BT}),
    ("ConvTranspose-same-upper", X5, "y = ConvTranspose <strides = [2, 2], auto_pad = \"SAME_UPPER\"> (x, w)",
     [11, 22], {"w": _WT}),
    ("ConvTranspose-same-lower-grouped", X5, "y = ConvTranspose <strides = [2, 1], group = 3, "
     "auto_pad = \"SAME_LOWER\"> (x, w)", [11], {"w": _WT[:, :2].copy()}),
    ("ConvTranspose-output-shape", X5, "y = ConvTranspose <strides = [2, 2], output_shape = [10, 9]> (x, w, b)",
     [11, 17], {"w": _WT, "b": _BT}),
    ("ConvTranspose-1d-uneven", "(float[N, 3, 7] x) => (float[?, ?, ?] y)",
     "y = ConvTranspose <strides = [3], pads = [2, 0]> (x, w)", [11], {"w": _WT[:, :, 0].copy()}),
    ("LayerNormalization-2-axes", "(float[N, 3, 6] x) => (float[?, ?, ?] y)",
     "y = LayerNormalization <axis = 1> (x, g, b)", [17], {"g": _G36, "b": _B36}),
    # A decoder's causal mask (nn.Transformer with tgt_is_causal, both exporters): onnx2torch has no Trilu.
    ("Trilu-lower", "(float[N, 4, 5] x) => (float[?, ?, ?] y)", "y = Trilu <upper = 0> (x)", [14, 17], {}),
    ("Trilu-upper-k", "(float[N, 5, 4] x) => (float[?, ?, ?] y)", "y = Trilu (x, k)", [14, 17],
     {"k": np.array(-1, np.int64)}),
    # Opsets 7-10 are raised to 13 for import: onnx2torch converts Slice's attribute form, Dropout 7 and ArgMax 1
    # only at later versions, and the import stopped at the first of them (a Conv after it did not train).
    ("Slice-attributes-Conv", X5, "s = Slice <starts = [1], ends = [5], axes = [3]> (x)\n"
     " d = Dropout (s)\n y = Conv (d, w)", [7, 9], {"w": _W4}),
    # dynamo's GPT-2 causal mask: onnx2torch converts these at version 12 only, not 16 (bfloat16 added).
    ("LessOrEqual", X2, "m = LessOrEqual (x, t)\n y = Where (m, x, z)", [12, 16, 17],
     {"t": np.array(0.2, np.float32), "z": np.array(-9.0, np.float32)}),
    ("GreaterOrEqual", X2, "m = GreaterOrEqual (x, t)\n y = Where (m, x, z)", [12, 16, 17],
     {"t": np.array(0.2, np.float32), "z": np.array(-9.0, np.float32)}),
]

OP_PARAMS = [pytest.param(case, opset, id=f"{case[0]}-opset{opset}") for case in CASES for opset in case[3]]


def _input_shape(model: onnx.ModelProto, batch: int = 3) -> tuple[int, ...]:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return tuple(batch if d.dim_param else d.dim_value for d in dims)


def torch_vs_onnxruntime(model: onnx.ModelProto, feeds: dict[str, np.ndarray], reference=None) -> float:
    """Import ``model``, assert its outputs match onnxruntime's (or ``reference``) within the check
    tolerance, return the largest absolute difference."""
    if reference is None:
        reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = import_model(model).run(feeds)
    ok, diff = within_tolerance(reference, got)
    assert ok, diff
    return diff


def op_case(case, opset: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    _name, signature, body, _opsets, initializers = case
    model = op_model(signature, body, opset, initializers)
    x = np.random.default_rng(opset).standard_normal(_input_shape(model)).astype(np.float32)
    return model, {"x": x}


@pytest.mark.parametrize("case, opset", OP_PARAMS)
def test_op_matches_onnxruntime(case, opset):
    torch_vs_onnxruntime(*op_case(case, opset))


def test_stashed_ops_leave_the_default_domain_before_down_conversion():
    model = op_model(X2, "g = Gelu (x)\n y = Mish (g)", 20)
    normalized = normalize(model)
    assert {(n.domain, n.op_type) for n in normalized.graph.node} == {(STASH_DOMAIN, "Gelu"), (STASH_DOMAIN, "Mish")}
    assert {o.domain: o.version for o in normalized.opset_import} == {"": 17, STASH_DOMAIN: 1}
    assert model.graph.node[0].domain == ""  # the caller's model is untouched


def test_auto_pad_becomes_pads_and_uneven_average_pools_are_stashed():
    model = op_model(X5, "a = Conv <auto_pad = \"SAME_UPPER\", strides = [2, 2]> (x, w)\n"
                     " b = MaxPool <kernel_shape = [2, 2], strides = [2, 2], auto_pad = \"SAME_LOWER\"> (a)\n"
                     " c = AveragePool <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (b)\n"
                     " y = AveragePool <kernel_shape = [2, 2], strides = [2, 2], auto_pad = \"VALID\"> (c)",
                     17, {"w": _W4})
    nodes = normalize(model).graph.node
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    # 5 -> 3 with stride 2 and kernel 3: 2 pads, one each side; 3 -> 2 with kernel 2: the 1 pad goes first (LOWER)
    assert [a.get("pads") for a in attrs] == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    assert not any("auto_pad" in a for a in attrs)
    assert [n.domain for n in nodes] == ["", "", "", ""]  # even pads: onnx2torch's own AveragePool
    uneven = op_model(X5, "y = AveragePool <kernel_shape = [3, 3], pads = [0, 1, 1, 2]> (x)", 17)
    assert [(n.domain, n.op_type) for n in normalize(uneven).graph.node] == [(STASH_DOMAIN, "AveragePool")]


@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER"])
@pytest.mark.parametrize("count_include_pad", [0, 1])
def test_same_average_pool_of_unknown_size_pads_at_run_time(mode, count_include_pad):
    model = op_model("(float[N, 2, H, W] x) => (float[?, ?, ?, ?] y)",
                     f"y = AveragePool <kernel_shape = [3, 2], strides = [2, 2], auto_pad = \"{mode}\", "
                     f"count_include_pad = {count_include_pad}> (x)", 17)
    assert normalize(model).graph.node[0].domain == STASH_DOMAIN  # the sizes are unknown: padded in forward
    imported = import_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for h, w in [(5, 7), (6, 6), (4, 8)]:
        feeds = {"x": np.random.default_rng(h * w).standard_normal((2, 2, h, w)).astype(np.float32)}
        ok, diff = within_tolerance(session.run(None, feeds), imported.run(feeds))
        assert ok, (h, w, diff)


def test_same_conv_transpose_of_unknown_size_imports_and_an_unknown_output_shape_is_refused():
    # SAME makes the output size x stride: its padding does not depend on the size.
    model = op_model("(float[N, 3, H, W] x) => (float[?, ?, ?, ?] y)",
                     "y = ConvTranspose <strides = [2, 2], auto_pad = \"SAME_LOWER\"> (x, w)", 17, {"w": _WT})
    imported = import_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for h, w in [(5, 7), (4, 4)]:
        feeds = {"x": np.random.default_rng(h * w).standard_normal((2, 3, h, w)).astype(np.float32)}
        ok, diff = within_tolerance(session.run(None, feeds), imported.run(feeds))
        assert ok, (h, w, diff)
    # output_shape needs the input's sizes: without them, a named refusal (onnx2torch would ignore it).
    model = op_model("(float[N, 3, H, W] x) => (float[?, ?, ?, ?] y)",
                     "y = ConvTranspose <strides = [2, 2], output_shape = [10, 10]> (x, w)", 17, {"w": _WT})
    with pytest.raises(UserError, match=r"^cannot import the model through onnx2torch: NotImplementedError: "
                                        r"ConvTranspose 'ConvTranspose_0_unnamed' sets its output size \(output_shape "
                                        r"or SAME\) from input sizes shape inference could not find; give the graph "
                                        r"input fixed sizes$"):
        import_model(model)


def test_every_stashed_op_has_a_converter():
    from onnx2torch.node_converters import get_converter

    for op in STASHED_OPS:
        get_converter(domain=STASH_DOMAIN, operation_type=op, version=1)


# ----------------------------------------------------------------------------------------------
# torch exports of the same ops
# ----------------------------------------------------------------------------------------------


class OpZoo(nn.Module):
    """One module using the ops above the way torch code does; each exporter writes its own ops for them."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, 3, 8, 8]
        a, b = torch.split(x, [1, 2], dim=1)
        y = torch.cat([F.hardswish(a), F.hardsigmoid(b)], 1)
        y = F.pad(y, (1, 2, 0, 1), mode="reflect") + F.pad(y, (1, 2, 0, 1))
        y = F.interpolate(y, scale_factor=2, mode="nearest")[..., :8, :8]
        y = self.norm(F.gelu(y) + F.mish(y) + F.gelu(y, approximate="tanh") + F.relu6(y))
        pooled = F.adaptive_max_pool2d(y, 1).flatten(1) + y.mean(dim=(2, 3)) + y.sum(dim=(2, 3))
        return pooled + pooled[:, :1].expand(-1, 3)


@pytest.mark.parametrize("exporter, opset", [("torchscript", 11), ("torchscript", 13), ("torchscript", 17),
                                             ("dynamo", None)], ids=["ts11", "ts13", "ts17", "dynamo"])
def test_torch_exports_of_the_ops_import(exporter, opset, tmp_path, monkeypatch):
    torch.manual_seed(0)
    module = OpZoo().eval()
    example = torch.randn(2, 3, 8, 8)
    path = tmp_path / "zoo.onnx"
    if opset is not None:  # export_torch writes TorchScript at 17; older opsets through its own call
        original = torch.onnx.export

        def export_at(*args, **kwargs):
            kwargs["opset_version"] = opset
            return original(*args, **kwargs)

        monkeypatch.setattr(torch.onnx, "export", export_at)
    export_torch(module, example, path, exporter)
    model = onnx.load(str(path))
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    torch_vs_onnxruntime(model, {"input": x}, reference)
    with torch.no_grad():
        np.testing.assert_allclose(reference[0], module(torch.from_numpy(x)).numpy(), atol=1e-4)


# ----------------------------------------------------------------------------------------------
# LSTM / GRU / RNN
# ----------------------------------------------------------------------------------------------

RECURRENT_CASES = [
    pytest.param(dict(op=op, direction=direction, initial_state=state), id=f"{op}-{direction}-state{int(state)}")
    for op in ("LSTM", "GRU", "RNN")
    for direction in ("forward", "reverse", "bidirectional")
    for state in (False, True)
] + [
    pytest.param(dict(op="GRU", linear_before_reset=1, direction="bidirectional", initial_state=True), id="GRU-lbr1"),
    pytest.param(dict(op="GRU", linear_before_reset=0, sequence_lens=[6, 2, 5]), id="GRU-lbr0-seqlens"),
    pytest.param(dict(op="LSTM", direction="bidirectional", sequence_lens=[6, 3, 1], initial_state=True),
                 id="LSTM-seqlens"),
    pytest.param(dict(op="RNN", direction="reverse", sequence_lens=[2, 6, 4]), id="RNN-reverse-seqlens"),
    pytest.param(dict(op="LSTM", peepholes=True, direction="bidirectional", initial_state=True), id="LSTM-peepholes"),
    pytest.param(dict(op="LSTM", input_forget=1), id="LSTM-input_forget"),
    pytest.param(dict(op="LSTM", direction="bidirectional", clip=0.3), id="LSTM-clip"),
    pytest.param(dict(op="GRU", clip=0.3), id="GRU-clip"),
    pytest.param(dict(op="LSTM", opset=7, bias=False), id="LSTM-opset7-nobias"),
    pytest.param(dict(op="GRU", opset=7, linear_before_reset=1), id="GRU-opset7"),
    pytest.param(dict(op="LSTM", opset=22, direction="bidirectional"), id="LSTM-opset22"),
    pytest.param(dict(op="GRU", opset=22, linear_before_reset=1), id="GRU-opset22"),
    pytest.param(dict(op="LSTM", outputs=1), id="LSTM-Y-only"),
    pytest.param(dict(op="LSTM", activations=["HardSigmoid", "LeakyRelu", "ScaledTanh"],
                      activation_alpha=[0.3, 0.05, 1.5], activation_beta=[0.4, 0.7]), id="LSTM-activations"),
    pytest.param(dict(op="GRU", direction="bidirectional", activations=["Sigmoid", "Softsign", "HardSigmoid", "Elu"],
                      activation_alpha=[0.25, 0.9]), id="GRU-activations"),
    pytest.param(dict(op="RNN", activations=["Relu"]), id="RNN-relu"),
    pytest.param(dict(op="RNN", activations=["Affine"], activation_alpha=[0.5], activation_beta=[0.1]), id="RNN-affine"),
]


@pytest.mark.parametrize("options", RECURRENT_CASES)
def test_recurrent_matches_onnxruntime(options):
    torch_vs_onnxruntime(*recurrent_node(**options))


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("seqlens", [False, True], ids=["full", "seqlens"])
def test_recurrent_layout_1_matches_layout_0(op, seqlens):
    # onnxruntime's CPU kernels refuse layout=1 ("Batchwise recurrent operations"): compare with its
    # layout-0 run of the same weights on transposed inputs.
    options = dict(op=op, direction="bidirectional", initial_state=True, opset=14,
                   sequence_lens=[2, 6, 4] if seqlens else None)
    model, feeds = recurrent_node(layout=1, **options)
    twin, _ = recurrent_node(layout=0, **options)
    twin_feeds = {k: (v.transpose(1, 0, 2) if v.ndim == 3 else v) for k, v in feeds.items()}
    y, *states = ort.InferenceSession(twin.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, twin_feeds)
    reference = [y.transpose(2, 0, 1, 3)] + [s.transpose(1, 0, 2) for s in states]
    torch_vs_onnxruntime(model, feeds, reference)


def test_recurrent_weights_are_parameters_in_onnx_layout():
    model, feeds = recurrent_node("LSTM", direction="bidirectional", peepholes=True)
    imported = import_model(model)
    entries = {e.onnx_name: e for e in imported.weights}
    assert {n: (e.role, e.compressible) for n, e in entries.items()} == {
        "W": ("weight", True), "R": ("weight", True), "B": ("bias", False), "P": ("param", False)}
    for name, entry in entries.items():
        tensor = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))
        np.testing.assert_array_equal(imported.onnx_values([entry])[entry.param], tensor)
    outputs = imported.module(*[torch.from_numpy(feeds[n]) for n in imported.input_names])
    sum(o.pow(2).mean() for o in outputs).backward()
    assert all(imported.parameter(e).grad is not None for e in imported.weights)


if __name__ == "__main__":
    for case in CASES:
        for opset in case[3]:
            diff = torch_vs_onnxruntime(*op_case(case, opset))
            print(f"{case[0]:<28} opset {opset:<3} max |torch - onnxruntime| {diff:.2g}")
    for param in RECURRENT_CASES:
        print(f"{param.id:<28} max |torch - onnxruntime| {torch_vs_onnxruntime(*recurrent_node(**param.values[0])):.2g}")


@pytest.mark.parametrize("axis", [-1, 1, 0])
@pytest.mark.parametrize("opset", [11, 17])
def test_onehot_matches_onnxruntime_and_trains_what_follows(axis, opset):
    """tf2onnx's byte/token models start OneHot(int32 x) -> MatMul: without a converter the MatMul and
    everything after it were passed through untrained."""
    w = RNG.normal(size=(5, 3)).astype(np.float32) if axis == -1 else None
    body = ("d = Constant <value = int32 {5}> ()\n v = Constant <value = float[2] {-0.5, 2}> ()\n"
            f" h = OneHot <axis = {axis}> (x, d, v)\n" + (" y = MatMul (h, w)" if w is not None else " y = Identity (h)"))
    model = op_model("(int32[N, 4] x) => (float[?, ?, ?] y)", body, opset, {"w": w} if w is not None else None)
    x = np.array([[0, 4, -1, 7], [2, -5, 3, -6]], np.int32)  # -1 -> 4, -5 -> 0; 7 and -6 out of range
    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    imported = import_model(model)
    ok, diff = within_tolerance(reference, imported.run({"x": x}))
    assert ok, diff
    assert not imported.passed_through
    assert [e.onnx_name for e in imported.compressible()] == (["w"] if w is not None else [])


def _branching_model() -> onnx.ModelProto:
    """h = x @ W, then an If whose branches read h from the outer scope (no input of the If node names it)."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32), "W")
    cond = numpy_helper.from_array(np.array(True), "cond")
    then = helper.make_graph([helper.make_node("Relu", ["h"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", ["h"], ["e"])], "other", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]),
         helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [w, cond])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def test_a_tensor_a_subgraph_reads_from_the_outer_scope_is_trained_and_the_rest_passed_through():
    # tf2onnx writes a Keras GRU as a Loop whose body reads the previous layer's sequence by name: that
    # tensor feeds the unconverted part as much as an input of the Loop node would. It used to be missed,
    # leaving no trainable output (an If here: onnx2torch has no converter for either).
    imported = import_model(_branching_model())
    assert imported.output_names == ["h"] and imported.passed_through == ["y"]
    x = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    (h,) = imported.run({"x": x})
    np.testing.assert_allclose(h, x @ onnx.numpy_helper.to_array(imported.original.graph.initializer[0]), rtol=1e-5,
                               atol=1e-6)


def test_constant_of_shape_from_opset_20_imports():
    # The dynamo exporter writes ConstantOfShape at opset 20 (torchvision's swin_t: its attention masks); onnx's
    # version converter has no adapter down from 20 ("No Adapter To Version $19 for ConstantOfShape") and the
    # whole import failed.
    w = np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32)
    model = op_model("(float[N, 4] x) => (float[N, 4] y)",
                     "h = MatMul (x, W)\n s = Shape (h)\n z = ConstantOfShape <value = float[1] {0.5}> (s)\n"
                     " y = Add (h, z)", 20, {"W": w})
    imported = import_model(model)
    x = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    (got,) = imported.run({"x": x})
    (want,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_model_fused_by_onnxruntimes_optimizer_is_refused_with_the_way_round_it():
    # onnxruntime's fused ops import as the ops they stand for (tests/test_fused.py), except what is not spelled:
    # here a FusedMatMul transposing a constant. The export before the fusion imports.
    from onnx import TensorProto, helper

    w = np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("FusedMatMul", ["x", "W"], ["h"], domain="com.microsoft", name="fused", transB=1),
         helper.make_node("Relu", ["h"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [onnx.numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(UserError) as error:
        import_model(model)
    assert str(error.value) == (
        "cannot import the model: node 'fused': com.microsoft.FusedMatMul (opset 1) has no converter; run "
        "`onnx-admm inspect` for the full list, or compress the model as exported, before onnxruntime's optimizer "
        "fused it (then optimize the result)")


def _attention23(case: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """ONNX's Attention (opset 23) as the dynamo exporter writes it for scaled_dot_product_attention, with the
    variants onnxruntime runs: 8 query heads over 4 or 8 key heads, [B, N, S, h] or [B, S, N * h] tensors."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(3)
    b, s, past, heads, kv, h = 2, 5, 3, 8, 4, 4
    feeds = {"q": rng.standard_normal((b, heads, s, h)), "k": rng.standard_normal((b, kv, s, h)),
             "v": rng.standard_normal((b, kv, s, h))}
    inputs, outputs, attrs = ["q", "k", "v"], ["y"], {}
    if case == "causal past":
        feeds["pk"], feeds["pv"] = rng.standard_normal((b, kv, past, h)), rng.standard_normal((b, kv, past, h))
        inputs += ["", "pk", "pv"]
        outputs += ["present_k", "present_v"]
        attrs["is_causal"] = 1
    elif case == "causal":
        attrs = {"is_causal": 1, "scale": 0.3}
    elif case == "boolean mask":
        feeds["mask"] = rng.random((b, 1, s, s)) > 0.4
        feeds["mask"][..., 0] = True
        inputs.append("mask")
    elif case == "additive mask":
        feeds["mask"] = rng.standard_normal((s, s))
        inputs.append("mask")
    elif case == "flat heads":
        feeds = {k: t.transpose(0, 2, 1, 3).reshape(b, s, -1) for k, t in feeds.items()}
        attrs = {"q_num_heads": heads, "kv_num_heads": kv}
    feeds = {k: t if t.dtype == bool else t.astype(np.float32) for k, t in feeds.items()}
    infos = [helper.make_tensor_value_info(n, TensorProto.BOOL if feeds[n].dtype == bool else TensorProto.FLOAT,
                                           list(feeds[n].shape)) for n in inputs if n]
    graph = helper.make_graph([helper.make_node("Attention", inputs, outputs, name="attention", **attrs),
                               helper.make_node("RMSNormalization", ["y", "scale"], ["z"], name="rms", epsilon=1e-5)],
                              "sdpa", infos, [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                              for n in ["z", *outputs[1:]]],
                              [onnx.numpy_helper.from_array(rng.standard_normal(h if case != "flat heads" else heads * h)
                                                            .astype(np.float32), "scale")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]), feeds


@pytest.mark.parametrize("case", ["plain", "causal", "causal past", "boolean mask", "additive mask", "flat heads"])
def test_onnx_attention_and_rms_normalization_of_opset_23_match_onnxruntime(case):
    # torch's dynamo exporter at opset 23 writes scaled_dot_product_attention as Attention and RMSNorm as
    # RMSNormalization, which onnx's version converter cannot bring down to 17 ("No Previous Version"): both are
    # stashed and converted at their own semantics. With a past, onnxruntime aligns the causal mask to the lower
    # right (a query sees the past and the keys up to its own position). The scale trains like a LayerNorm's.
    model, feeds = _attention23(case)
    torch_vs_onnxruntime(model, feeds)
    assert "scale" in {w.onnx_name for w in import_model(model).weights}


def test_a_dynamo_export_at_opset_23_checks(tmp_path):
    # A transformer layer and an RMSNorm exported by dynamo at opset 23: Attention and RMSNormalization in the graph.
    from onnx_admm.check import check

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer, self.norm = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), nn.RMSNorm(32)

        def forward(self, x):
            return self.norm(self.layer(x))

    torch.manual_seed(0)
    path = tmp_path / "block23.onnx"
    x = torch.randn(2, 5, 32)
    torch.onnx.export(Block().eval(), (x,), str(path), dynamo=True, opset_version=23,
                      dynamic_shapes={"x": {0: torch.export.Dim("N")}})
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Attention", "RMSNormalization"} <= ops
    report = check(path, {"x": np.random.default_rng(0).standard_normal((4, 5, 32)).astype(np.float32)})
    assert report.passed, report.format()


def test_a_weight_quantized_by_an_onnxruntime_op_onnx_admm_does_not_decode_is_refused_with_the_way_round_it():
    # A prepacked or computed MatMulNBits weight is left for onnx2torch, which has no converter: the fix is the
    # float model before the quantizer, not the optimizer's unfused export.
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", name="q", K=4, N=4, bits=4,
                          block_size=16)],
        "g", [helper.make_tensor_value_info(n, t, s) for n, t, s in (
            ("x", TensorProto.FLOAT, ["N", 4]), ("B", TensorProto.UINT8, [4, 1, 8]), ("S", TensorProto.FLOAT, [4]))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(UserError) as error:
        import_model(model)
    assert str(error.value) == (
        "cannot import the model: node 'q': com.microsoft.MatMulNBits (opset 1) has no converter; run "
        "`onnx-admm inspect` for the full list, or compress the float model before onnxruntime's quantizer ran "
        "(--bits then stores integer weights)")
