"""An If that chooses a whole network by an input (silero-VAD's ``if sr == 16000``): folded to the branch the
data takes for training, put back on write-back, the other branch untouched (converters.branches); the
recurrent state with its samples on axis 1; LSTM weights computed from constants."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_admm.api import compress
from onnx_admm.recipe import CompressConfig
from onnx_admm.storage import count_weights
from onnx_admm.converters.branches import fold_branches, weighted_ifs
from onnx_admm.converters.errors import UserError
from onnx_admm.converters.graphinfo import graph_inputs, if_branch
from onnx_admm.converters.scores import find_score_output
from onnx_admm.converters.normalize import fold_recurrent_weights
from onnx_admm.data import from_arrays

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "samples" / "corpus"))

import vad  # noqa: E402


@pytest.fixture(scope="module")
def vad_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return vad.build(tmp_path_factory.mktemp("vad") / "vad_if.onnx", steps=150)


def _run(path_or_model, feeds: dict) -> list[np.ndarray]:
    source = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_the_model_has_silero_layout(vad_model: Path) -> None:
    model = onnx.load(str(vad_model))
    assert [n.op_type for n in model.graph.node][-1] == "If" and len(model.graph.initializer) == 0
    assert [n.name for n in weighted_ifs(model)] == [model.graph.node[-1].name]
    score = find_score_output(model)  # through the If to the branch's Sigmoid
    assert (score.name, score.kind) == ("output", "binary_probabilities")


@pytest.mark.parametrize("rate, taken", [(16000, True), (8000, False)])
def test_fold_takes_the_branch_of_the_data_and_restores_the_if(vad_model: Path, rate: int, taken: bool) -> None:
    model = onnx.load(str(vad_model))
    feeds = vad.feeds(16, 1, rate)
    folded, folding = fold_branches(model, [feeds])
    assert [f.taken for f in folding.folded] == [taken]
    assert not any(n.op_type == "If" for n in folded.graph.node)
    assert [i.name for i in folded.graph.input] == ["input", "state", "sr"]
    for a, b in zip(_run(model, feeds), _run(folded, feeds)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    restored = folding.restore(folded)
    onnx.checker.check_model(restored, full_check=True)
    assert [n.op_type for n in restored.graph.node] == [n.op_type for n in model.graph.node]
    for other in (16000, 8000):  # both branches compute what they did
        feeds = vad.feeds(8, 2, other)
        for a, b in zip(_run(model, feeds), _run(restored, feeds)):
            np.testing.assert_array_equal(a, b)


def test_data_taking_both_branches_is_refused(vad_model: Path) -> None:
    model = onnx.load(str(vad_model))
    with pytest.raises(UserError, match=r"the samples take both branches of If .* only one branch can train"):
        fold_branches(model, [vad.feeds(4, 1, 16000), vad.feeds(4, 1, 8000)])


def _compressed(vad_model: Path, tmp_path: Path, tables: dict, samples: int):
    """A label-free 1 + 1 epoch run on 16 kHz frames: its result, the written model and the original."""
    config = CompressConfig.from_dict({**tables, "admm": {"epochs": 1, "retrain_epochs": 1}, "train": {"threads": 1}})
    result = compress(vad_model, vad.feeds(samples, 3), config, val_data=vad.feeds(samples, 4), progress="off")
    out = tmp_path / "vad.admm.onnx"
    result.save(out)
    return result, onnx.load(str(out)), onnx.load(str(vad_model))


def test_compress_trains_the_branch_the_data_takes(vad_model: Path, tmp_path: Path) -> None:
    result, written, original = _compressed(vad_model, tmp_path, {"prune": {"sparsity": 0.5}}, 256)
    assert [(i.name, i.type) for i in written.graph.input] == [(i.name, i.type) for i in original.graph.input]
    assert [(o.name, o.type) for o in written.graph.output] == [(o.name, o.type) for o in original.graph.output]
    assert [n.op_type for n in written.graph.node] == [n.op_type for n in original.graph.node]
    # The 8 kHz network is the original's, bit for bit.
    feeds = vad.feeds(32, 5, 8000)
    for a, b in zip(_run(original, feeds), _run(written, feeds)):
        np.testing.assert_array_equal(a, b)
    # The 16 kHz network's compressible weights (lifted to the top graph by the write-back) hold half zeros,
    # among them the LSTM's W and R, which the branch computed from its constants (Slice / Concat / Unsqueeze
    # reordering the gates): they are stored as trained in place of that computation, which leaves the branch.
    layers = {layer["name"] for layer in result.report["layers"]}
    lstm = {n.input[1]: n.input[2] for n in if_branch(original.graph.node[-1]).node if n.op_type == "LSTM"}
    (w, r), = lstm.items()
    assert layers - {w, r} and all(name.startswith("If_0_then_branch__Inline_0__") for name in layers - {w, r})
    assert {w, r} <= layers
    values = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer if t.name in layers}
    assert len(values) == len(layers) and values[w].shape == (1, 4 * vad.HIDDEN, vad.HIDDEN)
    total = sum(v.size for v in values.values())
    assert sum(int(np.count_nonzero(v)) for v in values.values()) == total // 2
    assert 0 < np.count_nonzero(values[w]) < values[w].size and 0 < np.count_nonzero(values[r]) < values[r].size
    branch = if_branch(written.graph.node[-1])
    produced = {out for n in branch.node for out in n.output}
    assert not produced & {w, r} and {"Slice", "Concat"} & {n.op_type for n in if_branch(original.graph.node[-1]).node}
    assert len(branch.node) < len(if_branch(original.graph.node[-1]).node)
    onnx.checker.check_model(written, full_check=True)
    # It still does its task: the report's task metric, and the taken branch on fresh 16 kHz frames.
    assert result.report["metrics"]["task"]["value"] >= 0.9
    # Validated on every held-out sample at the run's batch (the state's leading 2 is not a fixed batch); no
    # recurrent weight is left as a constant.
    validation = result.report["validation"]
    assert validation["samples"] == 256 and validation["batch_size"] > 2
    assert not any("recurrent weight(s) the graph computes" in w for w in result.report["warnings"])
    feeds = vad.feeds(256, 6, 16000)
    a, b = _run(original, feeds)[0], _run(written, feeds)[0]
    assert np.mean((a > 0.5) == (b > 0.5)) >= 0.9


def test_filter_pruning_through_a_folded_if_is_refused(vad_model: Path) -> None:
    config = CompressConfig.from_dict({"prune": {"sparsity": 0.5, "structure": "filter"},
                                       "admm": {"epochs": 1, "retrain_epochs": 1}})
    with pytest.raises(UserError, match=r"removing filters or channels .* is not supported through a folded If"):
        compress(vad_model, vad.feeds(64, 3), config, progress="off")


def test_a_state_with_its_samples_on_axis_1_is_batched_there(vad_model: Path) -> None:
    specs = graph_inputs(onnx.load(str(vad_model)))
    feeds = vad.feeds(10, 1)
    feeds["state"] = np.arange(2 * 10 * vad.HIDDEN, dtype=np.float32).reshape(2, 10, vad.HIDDEN)
    data = from_arrays(feeds, specs)
    assert len(data) == 10 and data.axes == {"state": 1} and "sr" not in data.batched
    batch = next(data.take(7).batches(4))
    assert batch["state"].shape == (2, 4, vad.HIDDEN)
    np.testing.assert_array_equal(batch["state"], feeds["state"][:, :4])
    assert batch["input"].shape[0] == 4 and batch["sr"].shape == ()


def test_lstm_weights_computed_from_constants_become_constants() -> None:
    hidden, size = 3, 2
    w = np.random.default_rng(0).normal(size=(4 * hidden, size)).astype(np.float32)
    r = np.random.default_rng(1).normal(size=(4 * hidden, hidden)).astype(np.float32)
    nodes = [helper.make_node("Unsqueeze", ["w", "zero"], ["W"]), helper.make_node("Unsqueeze", ["r", "zero"], ["R"]),
             helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=hidden)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(r, "r"),
                               numpy_helper.from_array(np.array([0], np.int64), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    before = _run(model, {"x": np.ones((5, 1, size), np.float32)})
    assert fold_recurrent_weights(model)
    assert [n.op_type for n in model.graph.node] == ["LSTM"]
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(values["W"], w[None])
    np.testing.assert_array_equal(values["R"], r[None])
    np.testing.assert_array_equal(_run(model, {"x": np.ones((5, 1, size), np.float32)})[0], before[0])
    assert not fold_recurrent_weights(model)


def test_check_takes_the_branch_of_its_data_and_asks_for_data_without(vad_model: Path) -> None:
    from onnx_admm.check import check

    report = check(vad_model)
    assert [s.name for s in report.steps] == ["import"] and not report.steps[0].passed
    assert "chooses the network that runs from the inputs: pass --data" in report.steps[0].detail
    report = check(vad_model, vad.feeds(32, 1))
    assert all(s.passed for s in report.steps), [(s.name, s.detail) for s in report.steps]
    assert "If folded" in [s.name for s in report.steps]


def test_analyze_measures_the_branch_of_its_data(vad_model: Path) -> None:
    from onnx_admm.analyze import analyze

    result = analyze(vad_model, vad.feeds(64, 1), levels=(0.5,), samples=64)
    names = [layer["name"] for layer in result["layers"]]
    # The branch's five constant weights and the LSTM's W and R it computes from two of its constants.
    lstm = [n for n in if_branch(onnx.load(str(vad_model)).graph.node[-1]).node if n.op_type == "LSTM"][0]
    assert sorted(names) == sorted([n for n in names if n.startswith("If_0_then_branch__Inline_0__")]
                                   + list(lstm.input[1:3]))
    assert len(names) == 7


def _nested_if_model() -> onnx.ModelProto:
    """flag ? (shape check If without weights, then x @ w) : x @ v; w and v read from the outer graph."""
    f32 = TensorProto.FLOAT
    inner_then = helper.make_graph([helper.make_node("Identity", ["x"], ["inner_t"])], "inner_then", [],
                                   [helper.make_tensor_value_info("inner_t", f32, None)])
    inner_else = helper.make_graph([helper.make_node("Neg", ["x"], ["inner_e"])], "inner_else", [],
                                   [helper.make_tensor_value_info("inner_e", f32, None)])
    then = helper.make_graph([
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Gather", ["x_shape", "one"], ["width"], axis=0),
        helper.make_node("Equal", ["width", "four"], ["is_four"]),
        helper.make_node("If", ["is_four"], ["checked"], then_branch=inner_then, else_branch=inner_else, name="check"),
        helper.make_node("MatMul", ["checked", "w"], ["then_out"])], "then", [],
        [helper.make_tensor_value_info("then_out", f32, None)])
    other = helper.make_graph([helper.make_node("MatMul", ["x", "v"], ["else_out"])], "else", [],
                              [helper.make_tensor_value_info("else_out", f32, None)])
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["y"], then_branch=then, else_branch=other, name="choose")], "g",
        [helper.make_tensor_value_info("x", f32, ["N", 4]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", f32, ["N", 3])],
        [numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "v"),
         numpy_helper.from_array(np.array(1, np.int64), "one"), numpy_helper.from_array(np.array(4, np.int64), "four")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])


def test_an_if_without_weights_inside_the_taken_branch_is_folded_too() -> None:
    model = _nested_if_model()
    feeds = {"x": np.ones((5, 4), np.float32), "flag": np.array(True)}
    folded, folding = fold_branches(model, [feeds])
    assert [f.node.name for f in folding.folded] == ["choose", "check"]
    assert not any(n.op_type == "If" for n in folded.graph.node)
    np.testing.assert_array_equal(_run(folded, feeds)[0], _run(model, feeds)[0])
    restored = folding.restore(folded)
    assert [n.name for n in restored.graph.node] == ["choose"]
    for flag in (True, False):
        feeds["flag"] = np.array(flag)
        np.testing.assert_array_equal(_run(restored, feeds)[0], _run(model, feeds)[0])


def test_quantized_weights_through_a_folded_if_keep_the_opset_and_the_other_branch(vad_model: Path,
                                                                                   tmp_path: Path) -> None:
    # A raised opset would be verified on the folded graph only: the If put back keeps the original's.
    _, written, original = _compressed(vad_model, tmp_path, {"quantize": {"bits": 4}}, 128)
    assert list(written.opset_import) == list(original.opset_import)
    assert [n.op_type for n in written.graph.node if n.op_type != "DequantizeLinear"] == \
        [n.op_type for n in original.graph.node]
    feeds = vad.feeds(16, 5, 8000)
    for a, b in zip(_run(original, feeds), _run(written, feeds)):
        np.testing.assert_array_equal(a, b)
    levels = [numpy_helper.to_array(t) for t in written.graph.initializer if t.data_type == TensorProto.INT8]
    assert levels and all(v.min() >= -8 and v.max() <= 7 for v in levels)


def test_data_the_graph_refuses_fails_before_training(vad_model: Path, tmp_path: Path) -> None:
    # One state for all samples: the torch module broadcasts it, onnxruntime refuses it. Found before training,
    # in one line, and nothing is written (it was found in validation, after training, with the model saved).
    feeds = vad.feeds(64, 3)
    feeds["state"] = np.zeros((2, 1, vad.HIDDEN), np.float32)
    config = CompressConfig.from_dict({"prune": {"sparsity": 0.5}, "admm": {"epochs": 1, "retrain_epochs": 1}})
    out = tmp_path / "out.onnx"
    with pytest.raises(UserError, match=r"onnxruntime failed to run .* the data does not fit the graph's inputs"):
        compress(vad_model, feeds, config, output=out, progress="off")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def _lstm_with_reordered_gates(shared: bool = False) -> onnx.ModelProto:
    """An LSTM whose W is computed from a constant as an exported LSTMCell's is (its four gate blocks split
    and concatenated in ONNX's order, then unsqueezed) and whose R is an Unsqueeze of a constant; ``shared``
    also makes one of W's gate blocks a graph output (the computation then feeds something else)."""
    hidden, size = 4, 3
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4 * hidden, size)).astype(np.float32)
    r = rng.normal(size=(4 * hidden, hidden)).astype(np.float32)
    f32 = TensorProto.FLOAT
    nodes = [helper.make_node("Split", ["w"], ["gi", "gf", "gg", "go"], axis=0, num_outputs=4),
             helper.make_node("Concat", ["gi", "go", "gf", "gg"], ["w_onnx"], axis=0),
             helper.make_node("Unsqueeze", ["w_onnx", "zero"], ["W"]),
             helper.make_node("Unsqueeze", ["r", "zero"], ["R"]),
             helper.make_node("Transpose", ["x"], ["steps"], perm=[1, 0, 2]),
             helper.make_node("LSTM", ["steps", "W", "R"], ["y"], hidden_size=hidden)]
    outputs = [helper.make_tensor_value_info("y", f32, [5, 1, "N", hidden])]
    if shared:
        outputs.append(helper.make_tensor_value_info("gi", f32, [hidden, size]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f32, ["N", 5, size])], outputs,
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(r, "r"),
                               numpy_helper.from_array(np.array([0], np.int64), "zero")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_recurrent_weights_computed_from_constants_train_and_replace_their_computation(tmp_path: Path) -> None:
    from onnx_admm.converters.dequantize import decode, weight_decoders

    model = _lstm_with_reordered_gates()
    onnx.checker.check_model(model, full_check=True)
    decoders = weight_decoders(model)
    assert sorted(decoders) == ["R", "W"] and decoders["W"].inputs == ("w", "zero")
    w = numpy_helper.to_array(model.graph.initializer[0])
    np.testing.assert_array_equal(decode(model, decoders["W"])[0], np.concatenate([w[0:4], w[12:16], w[4:12]]))
    x = np.random.default_rng(1).normal(size=(64, 5, 3)).astype(np.float32)
    config = CompressConfig.from_dict({"prune": {"sparsity": 0.5}, "admm": {"epochs": 0, "retrain_epochs": 0},
                                       "train": {"threads": 1}})
    # Untrained, half the weights of a random LSTM gone: its outputs keep R^2 0.22 of the original's (the floor
    # would stop it; this is about the write-back).
    result = compress(model, {"x": x}, config, progress="off", metric_floor=0)
    assert sorted(layer["name"] for layer in result.report["layers"]) == ["R", "W"]
    assert result.report["params"] == {"total": 4 * 4 * 3 + 4 * 4 * 4, "nonzero": (4 * 4 * 3 + 4 * 4 * 4) // 2}
    out = tmp_path / "lstm.onnx"
    result.save(out)
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    # W and R are stored as trained, under their names; the split, concat and unsqueezes and the constants
    # only they read are gone; the LSTM runs on them.
    assert [n.op_type for n in written.graph.node] == ["Transpose", "LSTM"]
    values = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    assert sorted(values) == ["R", "W"] and values["W"].shape == (1, 16, 3)
    assert sum(np.count_nonzero(v) for v in values.values()) == (48 + 64) // 2
    assert [(o.name, o.type) for o in written.graph.output] == [(o.name, o.type) for o in model.graph.output]


def test_a_computation_that_feeds_something_else_stays_and_runs_as_a_constant() -> None:
    from onnx_admm.converters.dequantize import weight_decoders
    from onnx_admm.converters.importer import import_model

    model = _lstm_with_reordered_gates(shared=True)
    assert sorted(weight_decoders(model)) == ["R"]  # W's split also feeds a graph output
    imported = import_model(model)
    assert imported.computed_recurrent == ["W"]
    assert [e.onnx_name for e in imported.compressible()] == ["R"]


def test_a_recurrent_weight_computed_by_more_than_moving_entries_stays_a_constant() -> None:
    # W = A @ B (two factors): stored as trained it would take more bytes than its factors, so it runs as a
    # constant; R, an Unsqueeze of a constant, trains.
    from onnx_admm.converters.dequantize import weight_decoders

    model = _lstm_with_reordered_gates()
    graph = model.graph
    rng = np.random.default_rng(2)
    graph.initializer.extend([numpy_helper.from_array(rng.normal(size=(16, 2)).astype(np.float32), "fa"),
                              numpy_helper.from_array(rng.normal(size=(2, 3)).astype(np.float32), "fb")])
    split = next(n for n in graph.node if n.op_type == "Split")
    factor = helper.make_node("MatMul", ["fa", "fb"], ["w_product"])
    split.input[0] = "w_product"
    graph.node.insert(0, factor)
    onnx.checker.check_model(model, full_check=True)
    assert sorted(weight_decoders(model)) == ["R"]


def test_the_else_branch_trains_its_lstm_and_the_then_branch_stays_bit_for_bit(vad_model: Path) -> None:
    # 8 kHz frames take the else branch: its LSTM's computed W and R are pruned and stored in place of their
    # computation there; the 16 kHz network is the original's, node for node.
    config = CompressConfig.from_dict({"prune": {"sparsity": 0.5}, "admm": {"epochs": 0, "retrain_epochs": 0},
                                       "train": {"threads": 1}})
    result = compress(vad_model, vad.feeds(64, 3, 8000), config, progress="off", metric_floor=0)
    written, original = result.model(), onnx.load(str(vad_model))
    onnx.checker.check_model(written, full_check=True)
    assert if_branch(written.graph.node[-1]).SerializeToString() == if_branch(original.graph.node[-1]).SerializeToString()
    lstm = next(n for n in if_branch(original.graph.node[-1], False).node if n.op_type == "LSTM")
    assert set(lstm.input[1:3]) <= {layer["name"] for layer in result.report["layers"]}
    values = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    assert all(0 < np.count_nonzero(values[w]) < values[w].size for w in lstm.input[1:3])
    feeds = vad.feeds(16, 5, 16000)
    for a, b in zip(_run(original, feeds), _run(written, feeds)):
        np.testing.assert_array_equal(a, b)


def _merged_decoder() -> onnx.ModelProto:
    """optimum's merged-decoder layout: one If on ``use_cache_branch`` whose two branches read the same outer
    weights and name their outputs as the If's (``logits``). x [N, 8] -> MatMul W1 -> (then: Tanh, else: Relu)
    -> MatMul W2 -> logits [N, 4]."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(0, 0.5, (8, 16)).astype(np.float32), rng.normal(0, 0.5, (16, 4)).astype(np.float32)
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])

    def branch(name: str, act: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node("MatMul", ["x", "W1"], [f"{name}/h"], name=f"{name}/mm1"),
                                  helper.make_node(act, [f"{name}/h"], [f"{name}/a"], name=f"{name}/act"),
                                  helper.make_node("MatMul", [f"{name}/a", "W2"], ["logits"], name=f"{name}/mm2")],
                                 name, [], [out])

    node = helper.make_node("If", ["use_cache_branch"], ["logits"], name="optimum::if",
                            then_branch=branch("with_past", "Tanh"), else_branch=branch("no_past", "Relu"))
    graph = helper.make_graph([node], "merged", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
                                                 helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL,
                                                                               [1])],
                              [out], [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_merged_decoder_trains_its_shared_weights_and_both_branches_read_them(tmp_path: Path) -> None:
    # Folding inlined the branch with an Identity logits -> logits (a cycle the import failed on), and the write-
    # back dropped both branches' nodes that make 'logits' as if the outer graph defined it (an invalid model).
    path = tmp_path / "merged.onnx"
    onnx.save(_merged_decoder(), str(path))
    rng = np.random.default_rng(1)
    data = {"x": rng.normal(size=(96, 8)).astype(np.float32), "use_cache_branch": np.ones(1, bool)}
    config = CompressConfig.from_dict({"prune": {"sparsity": 0.5}, "admm": {"epochs": 1, "retrain_epochs": 1},
                                       "train": {"threads": 1}})
    result = compress(path, data, config, progress="off")
    out = tmp_path / "merged.admm.onnx"
    result.save(out)
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    assert [n.op_type for n in written.graph.node] == ["If"]
    w1, w2 = (numpy_helper.to_array(t) for t in written.graph.initializer)
    assert int((w1 == 0).sum() + (w2 == 0).sum()) == (w1.size + w2.size) // 2  # 50% over both layers
    # validate's counts see the weights the branches read (it counted 0 of 0: no weight op in the top graph).
    assert count_weights(_merged_decoder()) == (192, 192) and count_weights(written) == (192, 96)
    x = rng.normal(size=(5, 8)).astype(np.float32)
    for flag, act in ((True, np.tanh), (False, lambda h: np.maximum(h, 0))):  # each branch with the new weights
        got = _run(written, {"x": x, "use_cache_branch": np.array([flag])})[0]
        np.testing.assert_allclose(got, act(x @ w1) @ w2, rtol=1e-5, atol=1e-5)
