"""onnxruntime's fused transformer ops (converters.fused): imported as the standard ops they stand for, equal
to onnxruntime's kernels, and written back into the fused graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_admm.api import compress
from onnx_admm.check import check
from onnx_admm.converters.errors import UserError
from onnx_admm.converters.fused import unfuse
from onnx_admm.converters.importer import import_model
from onnx_admm.inspection import format_inspection, inspect_model
from onnx_admm.recipe import CompressConfig
from onnx_admm.validate import open_session

B, S, D, HEADS, VOCAB = 3, 6, 16, 4, 30
MS = "com.microsoft"
# torch against onnxruntime on the same float32 graph: summation order only.
ATOL = 2e-5


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _init(name: str, shape, seed: int, scale: float = 0.3) -> onnx.TensorProto:
    return numpy_helper.from_array((_rng(seed).standard_normal(shape) * scale).astype(np.float32), name)


def _model(nodes, inputs, outputs, inits, opset: int = 14) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "fused", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)])


def _x(name: str = "x", shape=("N", S, D)) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _y(name: str = "y") -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


def _ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _assert_imports_as_onnxruntime_runs(model: onnx.ModelProto, feeds: dict, tmp_path, trainable: set[str]):
    imported = import_model(model)
    for got, want in zip(imported.run(feeds), _ort(model, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    assert trainable <= {w.onnx_name for w in imported.weights}
    path = tmp_path / "fused.onnx"
    onnx.save(model, str(path))
    report = check(path, feeds)
    assert report.passed, report.format()
    assert {"torch vs onnxruntime", "perturbed write-back"} <= {step.name for step in report.steps}
    return imported


def _linear_in(x: str, out: str, weight: str, seed: int) -> tuple[onnx.NodeProto, onnx.TensorProto]:
    return helper.make_node("MatMul", [x, weight], [out], name=f"{weight}_matmul"), _init(weight, (D, D), seed)


@pytest.mark.parametrize("op, extra", [
    ("Gelu", {}), ("BiasGelu", {"bias": True}), ("FastGelu", {}), ("FastGelu", {"bias": True}),
    ("QuickGelu", {"alpha": 1.5}),
])
def test_activations_import_as_onnxruntime_computes_them(op, extra, tmp_path):
    # A MatMul before the fused activation so a weight trains through it; the activation's bias trains too.
    matmul, weight = _linear_in("x", "h", "w", 1)
    inputs, inits = ["h"], [weight]
    if extra.get("bias"):
        inputs.append("bias")
        inits.append(_init("bias", (D,), 2))
    attrs = {"alpha": extra["alpha"]} if "alpha" in extra else {}
    node = helper.make_node(op, inputs, ["y"], domain=MS, name="act", **attrs)
    model = _model([matmul, node], [_x()], [_y()], inits)
    feeds = {"x": _rng(3).standard_normal((B, S, D)).astype(np.float32) * 2}
    _assert_imports_as_onnxruntime_runs(model, feeds, tmp_path, {"w"} | ({"bias"} if extra.get("bias") else set()))


@pytest.mark.parametrize("op, beta, bias, sum_read", [
    ("SkipLayerNormalization", True, True, False), ("SkipLayerNormalization", False, True, True),
    ("SkipLayerNormalization", True, False, True), ("SkipSimplifiedLayerNormalization", False, True, True),
    ("SkipSimplifiedLayerNormalization", False, False, False),
])
def test_skip_layer_norms_import_as_onnxruntime_computes_them(op, beta, bias, sum_read, tmp_path):
    # The sum (output 3) is read by the next node where GPT-2's optimizer chains them.
    matmul, weight = _linear_in("x", "h", "w", 1)
    inits = [weight, _init("gamma", (D,), 2)]
    inputs = ["h", "x", "gamma"]
    if op == "SkipLayerNormalization":
        inputs.append("beta" if beta else "")
        if beta:
            inits.append(_init("beta", (D,), 3))
    if bias:
        inputs.append("bias")
        inits.append(_init("bias", (D,), 4))
    outputs = ["y", "", "", "sum"] if sum_read else ["y"]
    nodes = [matmul, helper.make_node(op, inputs, outputs, domain=MS, name="sln", epsilon=1e-5)]
    graph_outputs = [_y()]
    if sum_read:
        nodes.append(helper.make_node("Mul", ["sum", "y"], ["z"], name="after"))
        graph_outputs = [_y("z")]
    model = _model(nodes, [_x()], graph_outputs, inits)
    feeds = {"x": _rng(5).standard_normal((B, S, D)).astype(np.float32)}
    _assert_imports_as_onnxruntime_runs(model, feeds, tmp_path, {"w", "gamma"})


def test_default_domain_norms_of_onnxruntime_import_below_opset_17(tmp_path):
    # onnxruntime registers LayerNormalization (before opset 17) and SimplifiedLayerNormalization in the
    # default domain; its optimizer writes both into opset-14 graphs.
    matmul, weight = _linear_in("x", "h", "w", 1)
    nodes = [matmul,
             helper.make_node("LayerNormalization", ["h", "g1", "b1"], ["n"], name="ln", axis=-1, epsilon=1e-5),
             helper.make_node("SimplifiedLayerNormalization", ["n", "g2"], ["y"], name="rms", axis=-1, epsilon=1e-6)]
    model = _model(nodes, [_x()], [_y()], [weight, _init("g1", (D,), 2), _init("b1", (D,), 3), _init("g2", (D,), 4)])
    feeds = {"x": _rng(6).standard_normal((B, S, D)).astype(np.float32)}
    _assert_imports_as_onnxruntime_runs(model, feeds, tmp_path, {"w", "g1", "b1", "g2"})


def _attention(mask: str = "", past: str = "", bias: str = "", **attrs) -> onnx.NodeProto:
    inputs = ["x", "qkv_w", "qkv_b", mask, past, bias]
    while inputs and not inputs[-1]:
        inputs.pop()
    outputs = ["y", "present"] if past else ["y"]
    return helper.make_node("Attention", inputs, outputs, domain=MS, name="attn", num_heads=HEADS, **attrs)


def _attention_inits(sizes=(D, D, D)) -> list[onnx.TensorProto]:
    return [_init("qkv_w", (D, sum(sizes)), 7), _init("qkv_b", (sum(sizes),), 8, 0.1)]


def _mask_feed(kind: str, rng: np.random.Generator) -> np.ndarray:
    lengths = np.array([S, 2, 4][:B], np.int32)
    if kind == "lengths":
        return lengths
    if kind == "ends and starts":
        return np.concatenate([lengths, np.array([0, 1, 2][:B], np.int32)])
    if kind == "raw 2-D":
        raw = rng.integers(0, 2, (B, S)).astype(np.int32)
        raw[:, 0] = 1
        return raw
    raw = rng.integers(0, 2, (B, S, S)).astype(np.int32)
    raw[..., 0] = 1
    return raw


@pytest.mark.parametrize("kind", ["none", "lengths", "ends and starts", "raw 2-D", "raw 3-D"])
def test_attention_with_each_mask_imports_as_onnxruntime_computes_it(kind, tmp_path):
    rng = _rng(9)
    inputs = [_x()]
    feeds = {"x": rng.standard_normal((B, S, D)).astype(np.float32)}
    if kind != "none":
        feeds["mask"] = _mask_feed(kind, rng)
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.INT32, None))
    node = _attention("mask" if kind != "none" else "", mask_filter_value=-1e4 if kind == "lengths" else -3.4e38)
    model = _model([node], inputs, [_y()], _attention_inits())
    imported = _assert_imports_as_onnxruntime_runs(model, feeds, tmp_path, {"qkv_w", "qkv_b"})
    # The packed weight trains as one MatMul weight, compressible, and is read by the fused node in the file.
    weight = next(w for w in imported.weights if w.onnx_name == "qkv_w")
    assert weight.compressible and [(c.node, c.op_type, c.input_index) for c in weight.consumers] == [("attn", "Attention", 1)]


@pytest.mark.parametrize("past_len, sizes", [(2, (8, 8, 8)), (0, (D, D, 8))])
def test_causal_attention_with_past_or_bias_and_sizes_imports_as_onnxruntime_computes_it(past_len, sizes, tmp_path):
    # GPT-2's optimized decoder step: unidirectional, the keys and values after `past`, `present` returned; or a
    # relative-position bias (onnxruntime takes one or the other); qkv_hidden_sizes (q, k and v widths, 4 heads).
    rng = _rng(11)
    inputs, feeds = [_x()], {"x": rng.standard_normal((B, S, D)).astype(np.float32)}
    if past_len:
        head = sizes[1] // HEADS
        inputs.append(helper.make_tensor_value_info("past", TensorProto.FLOAT, [2, "N", HEADS, past_len, head]))
        feeds["past"] = rng.standard_normal((2, B, HEADS, past_len, head)).astype(np.float32)
    else:
        inputs.append(helper.make_tensor_value_info("pos_bias", TensorProto.FLOAT, [1, HEADS, S, S]))
        feeds["pos_bias"] = rng.standard_normal((1, HEADS, S, S)).astype(np.float32)
    node = _attention("", "past" if past_len else "", "" if past_len else "pos_bias", unidirectional=1,
                      qkv_hidden_sizes=list(sizes), scale=0.3)
    outputs = [_y(), _y("present")] if past_len else [_y()]
    model = _model([node], inputs, outputs, _attention_inits(sizes))
    _assert_imports_as_onnxruntime_runs(model, feeds, tmp_path, {"qkv_w", "qkv_b"})


def _embed_inputs() -> list[onnx.ValueInfoProto]:
    return [helper.make_tensor_value_info(n, TensorProto.INT32, ["N", "S"]) for n in ("ids", "segments", "mask")]


def _embed_feeds(rng: np.random.Generator) -> dict[str, np.ndarray]:
    mask = (np.arange(S)[None] < np.array([[S], [3], [5]][:B])).astype(np.int32)
    return {"ids": rng.integers(0, VOCAB, (B, S)).astype(np.int32),
            "segments": rng.integers(0, 2, (B, S)).astype(np.int32), "mask": mask}


def _tiny_bert(classes: int = 4) -> onnx.ModelProto:
    """What onnxruntime's BERT optimizer writes, by hand: EmbedLayerNormalization (its mask_index feeding the
    Attention), Attention, the output projection into SkipLayerNormalization, a BiasGelu feed-forward, a
    second SkipLayerNormalization, and a Gemm classifier on the first token."""
    nodes = [
        helper.make_node("EmbedLayerNormalization", ["ids", "segments", "word", "position", "segment", "eg", "eb", "mask"],
                         ["emb", "mask_index"], domain=MS, name="embed", epsilon=1e-12),
        helper.make_node("Attention", ["emb", "qkv_w", "qkv_b", "mask_index"], ["ctx"], domain=MS, name="attn",
                         num_heads=HEADS),
        helper.make_node("MatMul", ["ctx", "out_w"], ["proj"], name="out_proj"),
        helper.make_node("SkipLayerNormalization", ["proj", "emb", "g1", "b1", "out_b"], ["h1"], domain=MS,
                         name="sln1", epsilon=1e-12),
        helper.make_node("MatMul", ["h1", "up_w"], ["up"], name="up"),
        helper.make_node("BiasGelu", ["up", "up_b"], ["act"], domain=MS, name="gelu"),
        helper.make_node("MatMul", ["act", "down_w"], ["down"], name="down"),
        helper.make_node("SkipLayerNormalization", ["down", "h1", "g2", "b2", "down_b"], ["h2"], domain=MS,
                         name="sln2", epsilon=1e-12),
        helper.make_node("Gather", ["h2", "zero"], ["first"], name="first_token", axis=1),
        helper.make_node("Gemm", ["first", "cls_w", "cls_b"], ["logits"], name="classifier", transB=1),
    ]
    inits = [_init("word", (VOCAB, D), 20), _init("position", (S + 4, D), 21), _init("segment", (2, D), 22),
             _init("eg", (D,), 23, 1.0), _init("eb", (D,), 24), *_attention_inits(),
             _init("out_w", (D, D), 25), _init("out_b", (D,), 26), _init("g1", (D,), 27, 1.0), _init("b1", (D,), 28),
             _init("up_w", (D, 4 * D), 29), _init("up_b", (4 * D,), 30), _init("down_w", (4 * D, D), 31),
             _init("down_b", (D,), 32), _init("g2", (D,), 33, 1.0), _init("b2", (D,), 34),
             numpy_helper.from_array(np.array(0, np.int64), "zero"), _init("cls_w", (classes, D), 35),
             _init("cls_b", (classes,), 36)]
    return _model(nodes, _embed_inputs(), [_y("logits")], inits)


def test_an_optimized_bert_imports_checks_and_lists_its_weights(tmp_path):
    model = _tiny_bert()
    feeds = _embed_feeds(_rng(12))
    imported = _assert_imports_as_onnxruntime_runs(
        model, feeds, tmp_path, {"word", "position", "segment", "eg", "eb", "qkv_w", "out_w", "up_w", "up_b", "g2"})
    unfused = unfuse(model)
    assert [line.split(" ->")[0] for line in unfused.lines] == [
        "EmbedLayerNormalization 'embed'", "Attention 'attn'", "SkipLayerNormalization 'sln1'", "BiasGelu 'gelu'",
        "SkipLayerNormalization 'sln2'"]
    assert unfuse(unfused.model).lines == []  # nothing fused is left in the copy
    compressible = {w.onnx_name for w in imported.weights if w.compressible}
    assert {"qkv_w", "out_w", "up_w", "down_w", "word", "cls_w"} <= compressible
    info = inspect_model(tmp_path / "fused.onnx")
    assert compressible <= {w["name"] for w in info["weights"]} and info["unfused"] == unfused.lines
    assert "Attention 'attn' -> MatMul, Add, AttentionCore" in format_inspection(info)


@pytest.mark.parametrize("bits", [None, 8])
def test_compress_writes_into_the_fused_graph(bits, tmp_path):
    model = _tiny_bert()
    path = tmp_path / "bert_opt.onnx"
    onnx.save(model, str(path))
    rng = _rng(13)
    data = {k: np.concatenate([v] * 22)[:64] for k, v in _embed_feeds(rng).items()}
    data["ids"] = rng.integers(0, VOCAB, (64, S)).astype(np.int32)
    config = CompressConfig.from_dict({"train": {"threads": 1, "batch_size": 16},
                                       "admm": {"epochs": 1, "retrain_epochs": 1},
                                       "prune": {"sparsity": 0.5}, "quantize": {"bits": bits} if bits else {}})
    result = compress(str(path), data, config, metric_floor=0.0)  # a random model: the write-back is the point
    out = tmp_path / "out.onnx"
    result.save(out)
    written = onnx.load(str(out))
    # The fused nodes are all still there, with their names and inputs; only the weights changed.
    fused = [(n.op_type, n.name, list(n.input)) for n in model.graph.node]
    assert [(n.op_type, n.name, list(n.input)) for n in written.graph.node if n.op_type != "DequantizeLinear"] == fused
    assert [line.split(" ->")[0] for line in result.report["unfused"]] == [
        "EmbedLayerNormalization 'embed'", "Attention 'attn'", "SkipLayerNormalization 'sln1'", "BiasGelu 'gelu'",
        "SkipLayerNormalization 'sln2'"]
    decoders = {n.output[0] for n in written.graph.node if n.op_type == "DequantizeLinear"}
    assert decoders == (set() if bits is None else {"qkv_w", "out_w", "up_w", "down_w", "word", "position", "segment",
                                                     "cls_w"})
    # The written graph computes what the trained module computes, in onnxruntime (at float activations:
    # onnxruntime's default fuses DequantizeLinear + MatMul into MatMulNBits with int8 activations).
    feeds = {k: v[:8] for k, v in data.items()}
    got = open_session(out, exact=True).run(None, feeds)[0]
    np.testing.assert_allclose(got, result.imported.run(feeds)[0], rtol=0, atol=ATOL)
    if bits is None:  # (8-bit levels may round a few kept weights to zero)
        params = result.report["params"]
        assert params["nonzero"] == round(0.5 * params["total"]) and params["total"] == 3808


def test_a_fused_op_asking_for_more_is_still_refused_by_name(tmp_path):
    # Rotary embeddings inside the Attention are not spelled: the node stays, and the import names it.
    node = _attention(do_rotary=1)
    model = _model([node], [_x()], [_y()], _attention_inits())
    assert unfuse(model).lines == []
    with pytest.raises(UserError, match=r"node 'attn': com.microsoft.Attention \(opset 1\) has no converter; .*before "
                                        r"onnxruntime's optimizer fused it"):
        import_model(model)


def test_a_session_saved_optimized_cnn_imports_and_checks(tmp_path):
    # What onnxruntime's InferenceSession writes to optimized_model_filepath at the extended level: FusedConv
    # (Conv + Relu) and FusedGemm (Gemm + Relu); the residual Conv + Add + Relu stays as it was.
    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
            self.fc1, self.fc2 = torch.nn.Linear(8 * 16, 32), torch.nn.Linear(32, 10)

        def forward(self, x):
            h = torch.relu(self.a(x))
            h = torch.relu(self.b(h) + h)
            return self.fc2(torch.relu(self.fc1(torch.nn.functional.avg_pool2d(h, 2).flatten(1))))

    torch.manual_seed(0)
    plain, saved = tmp_path / "plain.onnx", tmp_path / "saved.onnx"
    torch.onnx.export(Net().eval(), (torch.randn(2, 1, 8, 8),), str(plain), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(saved)
    ort.InferenceSession(str(plain), options, providers=["CPUExecutionProvider"])
    model = onnx.load(str(saved))
    assert sorted(n.op_type for n in model.graph.node if n.domain == MS) == ["FusedConv", "FusedGemm"]
    feeds = {"x": _rng(14).standard_normal((5, 1, 8, 8)).astype(np.float32)}
    imported = _assert_imports_as_onnxruntime_runs(model, feeds, tmp_path, {"a.weight", "b.weight", "fc1.weight"})
    assert all(w.compressible for w in imported.weights if w.onnx_name.endswith(".weight"))


@pytest.mark.parametrize("activation, params", [("LeakyRelu", [0.2]), ("Clip", [-0.5, 0.7]), ("HardSigmoid", [0.3, 0.4]),
                                                ("Tanh", []), ("Sigmoid", [])])
def test_fused_conv_and_gemm_activations_import_as_onnxruntime_computes_them(activation, params, tmp_path):
    # FusedConv's input Z (a residual) is added before the activation; FusedGemm takes no Clip.
    conv_params = {"activation_params": params} if params else {}
    gemm = "Relu" if activation == "Clip" else activation
    gemm_params = {} if activation == "Clip" else {f"activation_{n}": p for n, p in zip(("alpha", "beta"), params)}
    nodes = [helper.make_node("FusedConv", ["x", "w", "b", "z"], ["c"], domain=MS, name="conv", activation=activation,
                              pads=[1, 1, 1, 1], **conv_params),
             helper.make_node("Flatten", ["c"], ["f"], name="flat"),
             helper.make_node("FusedGemm", ["f", "g", "gb"], ["y"], domain=MS, name="fc", transB=1, activation=gemm,
                              **gemm_params)]
    model = _model(nodes, [_x("x", ("N", 2, 4, 4)), _x("z", ("N", 3, 4, 4))], [_y()],
                   [_init("w", (3, 2, 3, 3), 40), _init("b", (3,), 41), _init("g", (5, 48), 42), _init("gb", (5,), 43)])
    feeds = {"x": _rng(15).standard_normal((B, 2, 4, 4)).astype(np.float32) * 2,
             "z": _rng(16).standard_normal((B, 3, 4, 4)).astype(np.float32)}
    _assert_imports_as_onnxruntime_runs(model, feeds, tmp_path, {"w", "b", "g", "gb"})


def test_fused_matmul_imports_as_onnxruntime_computes_it(tmp_path):
    # Attention scores as onnxruntime fuses them: q @ k^T * alpha, k transposed on its last two axes; then a
    # weight read plainly. A transposed constant is left to the import's refusal.
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"),
             helper.make_node("FusedMatMul", ["q", "x"], ["s"], domain=MS, name="scores", transB=1, alpha=0.25),
             helper.make_node("FusedMatMul", ["s", "x"], ["y"], domain=MS, name="mix", alpha=1.0)]
    model = _model(nodes, [_x()], [_y()], [_init("wq", (D, D), 44)])
    feeds = {"x": _rng(16).standard_normal((B, S, D)).astype(np.float32)}
    _assert_imports_as_onnxruntime_runs(model, feeds, tmp_path, {"wq"})
    constant = _model([helper.make_node("FusedMatMul", ["x", "wq"], ["y"], domain=MS, name="head", transB=1)],
                      [_x()], [_y()], [_init("wq", (D, D), 44)])
    with pytest.raises(UserError, match="node 'head': com.microsoft.FusedMatMul"):
        import_model(constant)


def _mha_case(case: str, rng: np.random.Generator):
    """A MultiHeadAttention node and its feeds: q/k/v projected by MatMuls of weights (so weights train)."""
    L, past = S + 2, 3
    inputs, feeds = [_x(), _x("mem", ("N", L, D))], {"x": rng.standard_normal((B, S, D)).astype(np.float32),
                                                     "mem": rng.standard_normal((B, L, D)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"), helper.make_node("MatMul", ["mem", "wk"], ["k"], name="k"),
             helper.make_node("MatMul", ["mem", "wv"], ["v"], name="v")]
    mha_in, mha_out, attrs = ["q", "k", "v", "qkv_b"], ["y"], {}
    if case == "padding mask":
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.INT32, ["N", L]))
        feeds["mask"] = (np.arange(L)[None] < np.array([[L], [2], [5]][:B])).astype(np.int32)
        mha_in.append("mask")
    elif case == "past, causal":
        # self-attention over x with a cache: key and value from x, the past's keys first.
        nodes[1].input[0], nodes[2].input[0] = "x", "x"
        inputs.append(helper.make_tensor_value_info("pk", TensorProto.FLOAT, ["N", HEADS, past, D // HEADS]))
        inputs.append(helper.make_tensor_value_info("pv", TensorProto.FLOAT, ["N", HEADS, past, D // HEADS]))
        feeds["pk"], feeds["pv"] = (rng.standard_normal((B, HEADS, past, D // HEADS)).astype(np.float32) for _ in "kv")
        mha_in += ["", "", "pk", "pv"]
        mha_out += ["present_k", "present_v"]
        attrs["unidirectional"] = 1
    elif case == "cached cross keys":
        # a decoder's cross-attention reading cached encoder keys and values as heads [B, N, L, h]
        nodes = nodes[:1] + [helper.make_node("Reshape", [t, "heads_shape"], [t + "4"], name=t + "_r") for t in ("k", "v")] + \
            [helper.make_node("Transpose", [t + "4"], [t + "h"], name=t + "_t", perm=[0, 2, 1, 3]) for t in ("k", "v")]
        nodes[1:1] = [helper.make_node("MatMul", ["mem", "wk"], ["k"], name="k"), helper.make_node("MatMul", ["mem", "wv"], ["v"], name="v")]
        mha_in = ["q", "kh", "vh", "qkv_b"]
    nodes.append(helper.make_node("MultiHeadAttention", mha_in, mha_out, domain=MS, name="mha", num_heads=HEADS, **attrs))
    inits = [_init("wq", (D, D), 50), _init("wk", (D, D), 51), _init("wv", (D, D), 52), _init("qkv_b", (3 * D,), 53, 0.1),
             numpy_helper.from_array(np.array([0, 0, HEADS, D // HEADS], np.int64), "heads_shape")]
    return _model(nodes, inputs, [_y(n) for n in mha_out], inits), feeds


@pytest.mark.parametrize("case", ["padding mask", "past, causal", "cached cross keys"])
def test_multi_head_attention_imports_as_onnxruntime_computes_it(case, tmp_path):
    model, feeds = _mha_case(case, _rng(17))
    _assert_imports_as_onnxruntime_runs(model, feeds, tmp_path, {"wq", "wk", "wv"})


def test_an_optimized_bert_quantized_by_onnxruntime_imports_as_its_float_fused_form(tmp_path):
    # optimum's usual path: optimize, then quantize_dynamic, which writes QAttention and QEmbedLayerNormalization
    # (int8 weights, the attention's input through DynamicQuantizeLinear). They import as the float Attention and
    # EmbedLayerNormalization, which then import as above; check compares the float form with the quantized file.
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fused, quantized = tmp_path / "fused.onnx", tmp_path / "quantized.onnx"
    onnx.save(_tiny_bert(), str(fused))
    quantize_dynamic(str(fused), str(quantized), weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": TensorProto.FLOAT})
    ops = {n.op_type for n in onnx.load(str(quantized)).graph.node}
    assert {"QAttention", "QEmbedLayerNormalization"} <= ops
    report = check(quantized, _embed_feeds(_rng(18)))
    assert report.passed, report.format()
    imported = import_model(onnx.load(str(quantized)))
    assert any(line.startswith("QAttention 'attn") and line.endswith("-> Attention") for line in imported.dequantized)
    assert any(line.startswith("QEmbedLayerNormalization") for line in imported.dequantized)
    assert {"Attention 'attn_quant'", "EmbedLayerNormalization 'embed_quant'"} <= {
        line.split(" ->")[0] for line in imported.unfused}


def test_int8_activations_of_an_optimized_bert_report_the_bar_onnxruntime_could_not_build(tmp_path):
    # onnxruntime's quantize_static of the fused original cannot type the tensors after its com.microsoft ops and
    # raised, which failed the whole validation after the model was written. Its row now says why it is missing.
    path = tmp_path / "bert_opt.onnx"
    onnx.save(_tiny_bert(), str(path))
    rng = _rng(19)
    data = {k: np.concatenate([v] * 22)[:64] for k, v in _embed_feeds(rng).items()}
    config = CompressConfig.from_dict({"train": {"threads": 1, "batch_size": 16}, "admm": {"epochs": 1, "retrain_epochs": 0},
                                       "prune": {"sparsity": 0.5}, "output": {"activations": "int8"}})
    result = compress(str(path), data, config, metric_floor=0.0, output=tmp_path / "out.onnx")
    act = result.report["activations"]
    assert act["quantize_static"]["error"].startswith("Unable to get valid quantization scale for input")
    assert act["compressed_int8"]["bytes"] > 0 and set(act["compressed_int8"]["latency_ms"]) == {"1", "64"}
    assert act["quantize_static"]["latency_ms"] == {}


OPTIMIZED_BERT = Path(__file__).resolve().parents[1] / "samples/corpus/bert_optimized/bert_optimized.onnx"


def _bert_feeds(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = _rng(seed)
    lengths = rng.integers(4, 13, n)
    mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int64)
    return {"input_ids": rng.integers(5, 60, (n, 12)) * mask, "attention_mask": mask,
            "token_type_ids": np.zeros((n, 12), np.int64)}


def test_onnxruntimes_optimizer_output_checks_and_compresses_into_its_fused_graph(tmp_path):
    # The real thing (samples/corpus/bert_optimized/make.py): a Hugging Face BERT that onnxruntime's transformer
    # optimizer fused, compressed without labels; the written file keeps every fused node and computes the
    # trained module in onnxruntime.
    model = onnx.load(str(OPTIMIZED_BERT))
    assert {n.op_type for n in model.graph.node if n.domain == MS} == {
        "EmbedLayerNormalization", "Attention", "SkipLayerNormalization", "BiasGelu"}
    report = check(OPTIMIZED_BERT, _bert_feeds(16, 20))
    assert report.passed, report.format()
    config = CompressConfig.from_dict({"train": {"threads": 1, "batch_size": 16},
                                       "admm": {"epochs": 1, "retrain_epochs": 1}, "prune": {"sparsity": 0.5}})
    result = compress(str(OPTIMIZED_BERT), _bert_feeds(96, 21), config, val_data=_bert_feeds(64, 22), metric_floor=0.0)
    out = tmp_path / "out.onnx"
    result.save(out)
    written = onnx.load(str(out))
    assert [(n.op_type, n.name, list(n.input)) for n in written.graph.node] == [
        (n.op_type, n.name, list(n.input)) for n in model.graph.node]
    params = result.report["params"]
    assert params["nonzero"] == round(0.5 * params["total"])
    feeds = _bert_feeds(8, 23)
    np.testing.assert_allclose(_ort(written, feeds)[0], result.imported.run(feeds)[0], rtol=0, atol=ATOL)


def test_a_tensor_a_fused_node_reads_in_two_roles_gets_a_copy_at_the_fused_input(tmp_path):
    # onnxruntime's optimizer shares equal initializers: a random BERT's attention-output LayerNorm beta and its
    # dense bias are both zeros, one tensor read twice by one SkipLayerNormalization (inputs 3 and 4). They train
    # as two (a LayerNorm's bias, an Add's operand); the copy is written where the fused node reads it, at the
    # fused node's own input index (the view's Add and LayerNormalization do not exist in the written file).
    model = _tiny_bert()
    sln = next(n for n in model.graph.node if n.name == "sln1")
    sln.input[4] = "b1"
    path = tmp_path / "shared.onnx"
    onnx.save(model, str(path))
    rng = _rng(24)
    data = {k: np.concatenate([v] * 22)[:64] for k, v in _embed_feeds(rng).items()}
    config = CompressConfig.from_dict({"train": {"threads": 1, "batch_size": 16}, "admm": {"epochs": 1, "retrain_epochs": 1},
                                       "prune": {"sparsity": 0.5}})
    result = compress(str(path), data, config, metric_floor=0.0)
    out = tmp_path / "out.onnx"
    result.save(out)
    written = next(n for n in onnx.load(str(out)).graph.node if n.name == "sln1")
    assert sorted(written.input[3:5]) == ["b1", "b1_untied"]
    feeds = {k: v[:8] for k, v in data.items()}
    np.testing.assert_allclose(_ort(onnx.load(str(out)), feeds)[0], result.imported.run(feeds)[0], rtol=0, atol=ATOL)


def test_filter_pruning_of_an_optimized_model_says_to_prune_the_export(tmp_path):
    # The channel analysis knows the standard ops only: a fused BERT has no group it can cut, and the error
    # says what to do instead of listing unknown shapes alone.
    path = tmp_path / "bert_opt.onnx"
    onnx.save(_tiny_bert(), str(path))
    data = {k: np.concatenate([v] * 22)[:64] for k, v in _embed_feeds(_rng(25)).items()}
    config = CompressConfig.from_dict({"train": {"threads": 1}, "admm": {"epochs": 1, "retrain_epochs": 1},
                                       "prune": {"structure": "filter", "sparsity": 0.3}})
    with pytest.raises(UserError, match=r"^no weight can lose whole filters \(onnxruntime's fused ops \(Attention, "
                                        r"BiasGelu, EmbedLayerNormalization, SkipLayerNormalization\) stop the channel "
                                        r"analysis: filter-prune the model as exported, then let onnxruntime's "
                                        r"optimizer fuse the result\): "):
        compress(str(path), data, config)
