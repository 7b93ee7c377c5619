"""Score outputs other than [N, C] (issue 11): [N, T, C] and seq-first [T, N, C] sequences, integer
argmax ids whose float scores are an inner tensor, [N, 1, H, W] Sigmoid maps, an inner tensor named by
``[train] output``. Detection (``scores.find_score_output``), the loss and per-position metric
(``onnx_admm.train``), ``validate``'s agreement against numpy on onnxruntime's outputs, and label-free
compress runs of a few hundred milliseconds each.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from onnx_admm.converters.errors import UserError
from onnx_admm.converters.scores import find_score_output
from onnx_admm.converters.importer import import_model
from exporter_models import segmenter, sequence_tagger
from onnx_admm.api import compress
from onnx_admm.data import Dataset
from onnx_admm.recipe import CompressConfig
from onnx_admm.train import Batch, Loss, ScoreSpec, evaluate, predictions
from onnx_admm.tables import format_table
from onnx_admm.validate import validate

RNG = np.random.default_rng(0)
X_SEQ = RNG.normal(size=(1024, 6, 8)).astype(np.float32)
X_IMG = RNG.normal(size=(1024, 3, 8, 8)).astype(np.float32)

MODELS = {
    "NTC": (lambda: sequence_tagger("NTC"), X_SEQ),
    "TNC": (lambda: sequence_tagger("TNC"), X_SEQ),
    "NTC ids": (lambda: sequence_tagger("NTC", ids=True), X_SEQ),
    "TNC ids": (lambda: sequence_tagger("TNC", ids=True), X_SEQ),
    "map": (segmenter, X_IMG),
}


def _ort(model: onnx.ModelProto, x: np.ndarray, extra: str | None = None) -> dict[str, np.ndarray]:
    if extra:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        model.graph.output.append(onnx.ValueInfoProto(name=extra))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"x": x})))


@pytest.mark.parametrize("key, name, kind, feeds", [
    ("NTC", "logits", "logits", None), ("TNC", "logits", "logits", None),
    ("NTC ids", "logits", "logits", "ids"), ("TNC ids", "logits", "logits", "ids"),
    ("map", "mask", "binary_probabilities", None)])
def test_detection_and_what_the_module_returns(key, name, kind, feeds):
    model = MODELS[key][0]()
    score = find_score_output(model)
    assert (score.name, score.kind, score.feeds, score.internal) == (name, kind, feeds, feeds is not None)
    imported = import_model(model)
    # An inner tensor is returned after the graph outputs, and matches onnxruntime's value of it.
    assert imported.output_names == ([feeds, name] if feeds else [name])
    assert imported.output_names[imported.score.index] == name
    x = MODELS[key][1][:4]
    expected = _ort(model, x, extra=name if feeds else None)
    for got, out in zip(imported.run({"x": x}), imported.output_names):
        np.testing.assert_allclose(got, expected[out], rtol=1e-5, atol=1e-5)


def test_override_names_an_inner_tensor_and_rejects_unknown_or_integer_ones():
    model = sequence_tagger("NTC")
    score = find_score_output(model, "r")  # the hidden Relu: any float tensor a node computes
    assert (score.name, score.internal, score.kind) == ("r", True, "logits")
    imported = import_model(model, output="r")
    assert imported.output_names == ["logits", "r"] and imported.score.index == 1
    with pytest.raises(UserError, match="'nope' is neither a graph output nor a tensor a node computes"):
        find_score_output(model, "nope")
    with pytest.raises(UserError, match="'ids' is not a float tensor"):
        find_score_output(sequence_tagger("NTC", ids=True), "ids")


def test_softmax_over_another_axis_is_not_a_class_distribution():
    # A rank-4 Softmax over the last axis (attention weights, a channel-last map) is no class map.
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3, 4, 4] x) => (float[N, 2, 4, 4] y) {
            c = Conv (x, w)
            y = Softmax <axis = -1> (c)
        }""")
    model.graph.initializer.append(numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w"))
    assert find_score_output(model) is None
    model.graph.node[1].attribute[0].i = 1
    assert find_score_output(model).kind == "probabilities"


@pytest.mark.parametrize("add", ["b, m", "m, b"])
def test_per_position_logits_of_a_head_whose_bias_comes_first(add):
    # TorchScript writes a Linear on a sequence as Add(bias, MatMul), dynamo as Add(MatMul, bias): either is
    # a head's per-position logits (a seq2seq decoder's), not a tensor without a score.
    model = onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[N, 6] x) => (float[N, 6, 5] logits) {{
            h = Gather (e, x)
            m = MatMul (h, w)
            logits = Add ({add})
        }}""")
    rng = np.random.default_rng(0)
    for name, shape in (("e", (10, 8)), ("w", (8, 5)), ("b", (5,))):
        model.graph.initializer.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    score = find_score_output(model)
    assert score is not None and (score.name, score.kind) == ("logits", "logits")


def test_per_position_kl_and_agreement_values():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    value = Loss(ScoreSpec(0))((student,), None, (teacher,)).item()
    # KL per position: summed over classes, averaged over the 12 (sample, time step) positions.
    kl = (F.softmax(teacher, -1) * (F.log_softmax(teacher, -1) - F.log_softmax(student, -1))).sum(-1).mean()
    assert value == pytest.approx(kl.item(), rel=1e-5)
    # Seq-first [T, N, C] is the same sum over the same positions.
    assert Loss(ScoreSpec(0))((student.transpose(0, 1),), None, (teacher.transpose(0, 1),)).item() == pytest.approx(value, rel=1e-5)
    # A map [N, C, H, W] has its classes on axis 1.
    smap, tmap = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    kl_map = (F.softmax(tmap, 1) * (F.log_softmax(tmap, 1) - F.log_softmax(smap, 1))).sum(1).mean()
    assert Loss(ScoreSpec(0))((smap,), None, (tmap,)).item() == pytest.approx(kl_map.item(), rel=1e-5)
    hits = (student.argmax(-1) == teacher.argmax(-1)).float().mean().item()
    batch = Batch((torch.zeros(3),))
    assert evaluate(lambda *_: (student,), [batch], ScoreSpec(0), teacher=lambda *_: (teacher,)) == pytest.approx(hits)


def test_binary_map_loss_is_zero_at_the_teacher_and_bce_minus_entropy_otherwise():
    g = torch.Generator().manual_seed(1)
    teacher = torch.sigmoid(torch.randn(2, 1, 4, 4, generator=g) * 3)
    student = torch.sigmoid(torch.randn(2, 1, 4, 4, generator=g) * 3)
    loss = Loss(ScoreSpec(0, "binary_probabilities"))
    assert loss((teacher.clone(),), None, (teacher,)).item() == pytest.approx(0.0, abs=1e-6)
    s, t = student.clamp(1e-7, 1 - 1e-7), teacher.clamp(1e-7, 1 - 1e-7)
    expected = (F.binary_cross_entropy(s, t) - F.binary_cross_entropy(t, t)).item()
    assert loss((student,), None, (teacher,)).item() == pytest.approx(expected, rel=1e-4)
    # Agreement: the probability thresholded at 0.5 per pixel (at 0 for logits).
    assert torch.equal(predictions(student, "binary_probabilities"), student > 0.5)
    assert torch.equal(predictions(torch.logit(student), "binary_logits"), student > 0.5)


def test_other_float_outputs_add_their_variance_scaled_mse():
    g = torch.Generator().manual_seed(2)
    logits, t_logits = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    state, t_state = torch.randn(2, 4, 3, generator=g) * 100, torch.randn(2, 4, 3, generator=g) * 100
    value = Loss(ScoreSpec(0))((logits, state), None, (t_logits, t_state)).item()
    kl = Loss(ScoreSpec(0))((logits,), None, (t_logits,)).item()
    assert value == pytest.approx(kl + (F.mse_loss(state, t_state) / (t_state.var(unbiased=False) + 1e-6)).item(), rel=1e-5)


@pytest.mark.parametrize("key, per", [("NTC", "per time step"), ("TNC ids", "per time step"), ("map", "per pixel")])
def test_validate_agreement_matches_numpy_on_onnxruntime_outputs(tmp_path, key, per):
    build, x = MODELS[key]
    original, changed = build(), build()
    w = changed.graph.initializer[0]
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 0.7 + 0.05, w.name))
    onnx.save(original, str(tmp_path / "a.onnx"))
    onnx.save(changed, str(tmp_path / "b.onnx"))
    report = validate(tmp_path / "a.onnx", tmp_path / "b.onnx", Dataset({"x": x[:100]}, None, {"x"}), batch_size=32,
                      latency_batches=0)
    score = find_score_output(original)
    a, b = (_ort(m, x[:100], extra=score.name if score.internal else None)[score.name] for m in (original, changed))
    if key == "map":
        expected = np.mean((a > 0.5) == (b > 0.5))
    else:
        expected = np.mean(a.argmax(-1) == b.argmax(-1))
    assert 0.5 < report.agreement < 1.0
    assert report.agreement == pytest.approx(expected, abs=1e-12)
    assert report.score["tensor"] == score.name and report.score["per"] == per
    assert report.score["feeds"] == score.feeds
    # The inner tensor is read, not reported as a graph output.
    assert [d.name for d in report.outputs] == [o.name for o in original.graph.output]
    assert f"on {score.name!r}" in format_table(report) and per in format_table(report)


@pytest.mark.parametrize("key", list(MODELS))
def test_compress_without_labels_follows_the_original(tmp_path, key):
    build, x = MODELS[key]
    config = CompressConfig.from_dict({"train": {"threads": 1, "batch_size": 32, "seed": 0, "lr": 0.1},
                                       "admm": {"epochs": 2, "retrain_epochs": 1}, "prune": {"sparsity": 0.5}})
    model = build()
    result = compress(model, Dataset({"x": x}, None, {"x"}), config)
    report = result.report
    assert report["params"]["nonzero"] == report["params"]["total"] // 2
    # Measured (1024 sequences or images, 50% pruned): 0.91-0.97 per time step, 0.956 per pixel (the
    # sequence models lose ~0.03 to the retraining's per-step annealing and the carved selection split).
    assert report["metrics"]["agreement"] >= 0.90
    assert report["score"]["tensor"] == find_score_output(model).name
    result.save(tmp_path / "out.onnx")
    written = onnx.load(str(tmp_path / "out.onnx"))
    for a, b in ((written.graph.input, model.graph.input), (written.graph.output, model.graph.output)):
        assert [v.SerializeToString() for v in a] == [v.SerializeToString() for v in b]


def test_labels_are_refused_for_a_sequence_score_output():
    config = CompressConfig.from_dict({"train": {"threads": 1}, "admm": {"epochs": 1, "retrain_epochs": 0},
                                       "prune": {"sparsity": 0.5}})
    data = Dataset({"x": X_SEQ[:64]}, np.zeros(64, np.int64), {"x"})
    with pytest.raises(UserError, match=r"score output 'logits' is shaped \[1, 6, 5\].*drop 'labels'"):
        compress(sequence_tagger("NTC"), data, config)


def _detector_graph(layout: str) -> onnx.ModelProto:
    """A detector head as exporters leave it: ``v8`` joins decoded boxes [N, 4, A] to Sigmoid(classes)
    [N, 3, A] in one Concat (YOLOv8); ``x`` concatenates per level (boxes, Sigmoid(objectness),
    Sigmoid(classes)) on the channels, flattens each level and joins the levels (YOLOX), then transposes to
    [N, A, 8]."""
    h = onnx.helper
    x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4, 4, 4])
    nodes, inits = [], []

    def conv(name: str, source: str, out: int, stride: int = 1) -> str:
        w = RNG.normal(size=(out, 4, 1, 1)).astype(np.float32)
        inits.append(onnx.numpy_helper.from_array(w, name + "_w"))
        nodes.append(h.make_node("Conv", [source, name + "_w"], [name], strides=[stride, stride]))
        return name

    def node(op: str, inputs: list[str], name: str, **attrs) -> str:
        nodes.append(h.make_node(op, inputs, [name], **attrs))
        return name

    shape = onnx.numpy_helper.from_array(np.array([0, 0, -1], np.int64), "flat")
    inits.append(shape)
    if layout == "v8":
        boxes = node("Mul", [node("Reshape", [conv("box", "x", 4), "flat"], "box_f"), "box_f"], "boxes")
        classes = node("Reshape", [conv("cls", "x", 3), "flat"], "cls_f")
        node("Concat", [boxes, node("Sigmoid", [classes], "probs")], "out", axis=1)
        out_shape = ["N", 7, 16]
    else:
        levels = []
        for level, stride in enumerate((1, 2)):
            parts = [conv(f"box{level}", "x", 4, stride),
                     node("Sigmoid", [conv(f"obj{level}", "x", 1, stride)], f"obj_p{level}"),
                     node("Sigmoid", [conv(f"cls{level}", "x", 3, stride)], f"cls_p{level}")]
            levels.append(node("Reshape", [node("Concat", parts, f"cat{level}", axis=1), "flat"], f"flat{level}"))
        node("Transpose", [node("Concat", levels, "levels", axis=2)], "out", perm=[0, 2, 1])
        out_shape = ["N", 20, 8]
    y = h.make_tensor_value_info("out", onnx.TensorProto.FLOAT, out_shape)
    return h.make_model(h.make_graph(nodes, "det", [x], [y], inits), opset_imports=[h.make_opsetid("", 17)])


@pytest.mark.parametrize("layout, name", [("v8", "probs"), ("x", "cls_p0")])
def test_a_detectors_probabilities_beside_its_boxes_are_its_score(layout, name):
    # No output is a score itself (boxes and probabilities in one tensor): the widest Sigmoid the output's
    # Concats join is, read from the model as an extra output; YOLOX's classes (3 channels) over objectness (1),
    # the first level (4x4) over the second (2x2).
    model = _detector_graph(layout)
    onnx.checker.check_model(model, full_check=True)
    score = find_score_output(model)
    assert (score.name, score.kind, score.feeds, score.internal) == (name, "binary_probabilities", "out", True)
    imported = import_model(model)
    x = RNG.normal(size=(2, 4, 4, 4)).astype(np.float32)
    with torch.no_grad():
        got = imported.module(torch.from_numpy(x))
    np.testing.assert_allclose(got[imported.score.index].numpy(), _ort(model, x, name)[name], rtol=0, atol=1e-5)


class _Embedder(torch.nn.Module):
    """Two linear layers and an L2 normalization: a face or sentence embedding's head."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.net(x), dim=1)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_an_l2_normalized_output_is_an_embedding_not_class_scores(tmp_path, exporter):
    # Its largest entry names no class: top-1 agreement would measure noise. It has no score, so the loss
    # is the outputs' MSE and the task metric their R^2.
    from exporter_models import export_torch

    torch.manual_seed(0)
    path = export_torch(_Embedder().eval(), torch.randn(2, 12), tmp_path / "e.onnx", exporter)
    model = onnx.load(str(path), load_external_data=True) if exporter == "dynamo" else onnx.load(str(path))
    assert find_score_output(model) is None
    # The same head without the normalization is read as class scores.
    plain = export_torch(_Embedder().net.eval(), torch.randn(2, 12), tmp_path / "p.onnx", exporter)
    assert find_score_output(onnx.load(str(plain))).name == "logits"
    x = RNG.normal(size=(256, 12)).astype(np.float32)
    config = CompressConfig.from_dict({"prune": {"sparsity": 0.5}, "admm": {"epochs": 1, "retrain_epochs": 1},
                                       "train": {"threads": 1}})
    report = compress(path, Dataset({"input": x}, None, {"input"}), config, progress="off").report
    task = report["metrics"]["task"]
    assert task["metric"] == "output R^2" and task["value"] > 0.5 and report["score"] is None


def test_a_probability_map_behind_a_quantize_dequantize_pair_is_the_score():
    # onnxruntime's QDQ format rounds the Sigmoid map before the graph output: the walk stopped at the
    # DequantizeLinear and a quantized text detector was measured by R^2 instead of its positive set.
    from onnx import TensorProto, helper

    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(1, 3, 1, 1)).astype(np.float32), "w")
    scale, zero = numpy_helper.from_array(np.array(1 / 255, np.float32), "s"), numpy_helper.from_array(
        np.array(0, np.uint8), "z")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Sigmoid", ["c"], ["p"]),
         helper.make_node("QuantizeLinear", ["p", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["map"])], "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("map", TensorProto.FLOAT, ["N", 1, 8, 8])], [w, scale, zero])
    score = find_score_output(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    assert (score.name, score.kind) == ("map", "binary_probabilities")
