"""The corpus sweep (samples/corpus/sweep.py) on its generated models that run in seconds: check passes,
the label-free 50% compress keeps graph I/O and follows the original. The train-step / inference ratio
is measured by the sweep, not asserted here: on the shared 2-core machine the same step measured 2.0x
and 17x minutes apart. The whole corpus runs in the sample, not here."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "samples" / "corpus"))

import cut_probe  # noqa: E402
import seq2seq  # noqa: E402
import sweep  # noqa: E402
import synthetic  # noqa: E402
import vit  # noqa: E402

ENTRIES = {e.name: e for e in sweep.CORPUS}


@pytest.fixture
def one_thread():
    # As the sweep runs: on the shared 2-core machine two torch threads made the training steps 5-10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Agreement floors just under what the sweep measured (128 training / 64 held-out inputs, seeded, after
# the builders' calibration on synthetic labels): lstm 0.938, sklearn 0.984, byte classifier 0.891, CRNN
# 0.838 per time step, segmenter 0.965 per pixel, the Keras byte classifier 0.938, the Keras CNN, the Keras TCN and
# the ColumnTransformer 1.000. The LSTM, the byte classifiers, the CRNN and the segmenter stay under the bar
# (0.95; 0.97 per pixel); samples/corpus/RESULTS.md reports the shortfall. These floors guard against regressions.
@pytest.mark.parametrize("name, min_agreement, per", [
    ("lstm_classifier", 0.9, "per sample"), ("sklearn_mlp", 0.95, "per sample"),
    ("bytes_onehot_layernorm", 0.85, "per sample"), ("crnn_seq_first", 0.8, "per time step"),
    ("segmenter_map", 0.95, "per pixel"), ("keras_bytes", 0.9, "per sample"), ("keras_digits", 0.95, "per sample"),
    ("keras_tcn", 0.95, "per sample"), ("sklearn_columns", 0.95, "per sample")])
def test_corpus_entry_checks_compresses_and_keeps_graph_io(tmp_path, name, min_agreement, per):
    row = sweep.run_entry(ENTRIES[name], tmp_path, samples=128, speed=False)
    assert row["check"] == "pass", row["reason"]
    assert not row["reason"]
    assert row["agreement"] >= min_agreement and row["per"] == per
    assert row["io_same"]  # graph inputs and outputs of the written file, byte for byte


# PaddleOCR-style models exported by paddle2onnx (samples/corpus/paddle_ocr/make.py; committed files): a CTC
# recognizer whose [N, T, C] probabilities are batch first, and a DB text detector's [N, 1, H, W] map. The sweep's
# label-free 50% run measured a sequence match of 1.000 on 64 unseen lines (0.969 on 32 after training on 64, as
# here: 20 s instead of 28) and a positive-set F1 of 0.954 on 32 unseen pages; the floors are the bars
# (0.9 decoded-sequence match, 0.8 F1).
@pytest.mark.parametrize("name, samples, metric, floor, per", [
    ("ppocr_rec", 64, "sequence match", 0.9, "per time step"), ("ppocr_det", 128, "positive-set F1", 0.8, "per pixel")])
def test_paddle2onnx_exports_keep_their_task(tmp_path, one_thread, name, samples, metric, floor, per):
    row = sweep.run_entry(ENTRIES[name], tmp_path, samples=samples, speed=False)
    assert row["check"] == "pass" and not row["reason"], row["reason"]
    assert row["per"] == per and row["io_same"]
    assert row["task"]["metric"] == metric and row["task"]["value"] >= floor, row["task"]


# A Keras CTC reader exported by tf2onnx (samples/corpus/keras_captcha/make.py; committed): channels-last convs,
# a Reshape of [N, W, H, C] features into 25 columns, two bidirectional ONNX LSTMs and [N, T, C] probabilities
# with the blank last. Label-free 50%: 1.000 of 512 unseen captchas read the same as the original. 30% of the
# filters: its largest conv used to keep all of them (the Reshape stopped the group); it now loses them, and the
# file runs at 0.90x of the original's time in onnxruntime (1.08x before: samples/corpus/RESULTS.md).
def test_keras_ctc_reader_keeps_its_reads_and_its_largest_conv_loses_filters(tmp_path, one_thread):
    row = sweep.run_entry(ENTRIES["keras_captcha"], tmp_path, samples=128, speed=False)
    assert row["check"] == "pass" and not row["reason"], row["reason"]
    assert row["per"] == "per time step" and row["io_same"]
    assert row["task"]["metric"] == "sequence match" and row["task"]["value"] >= 0.9, row["task"]

    from onnx_admm.converters.groups import channel_groups
    from onnx_admm.converters.modelio import load_model

    path, data = ENTRIES["keras_captcha"].build(tmp_path)
    model = load_model(path)
    groups = {g.name: g for g in channel_groups(model)}
    conv = groups["functional_1/conv2d_1_2/convolution/ReadVariableOp:0"]
    assert conv.prunable and conv.n_channels == 64, conv.reason
    _shrinks_as_masked(model, conv, np.arange(0, 64, 4), {"image": data["image"][:16]})
    # Both bidirectional LSTMs lose hidden units: Y cut into its directions by Slices and joined again, the
    # zero states tf2onnx computes from the batch left out, the Dense's Tensordot shape computed by ReduceProd.
    for name, r, units, state in (("W__193", "R__194", 64, "Concat__187:0"), ("W__170", "R__171", 32, "Concat__164:0")):
        lstm = groups[name]
        assert lstm.prunable and lstm.n_channels == units and lstm.producers == (name, r), lstm.reason
        assert [model.graph.node[[n.name for n in model.graph.node].index(label)].input[k]
                for label, k in lstm.cleared] == [state, state]
        _shrinks_as_masked(model, lstm, np.arange(0, units, 3), {"image": data["image"][:16]})


def test_check_runs_the_paddle_detector_without_data():
    # Its FPN adds 1/32-scale maps upsampled back, so onnxruntime fails at the synthesized 8 x 8: check moves to
    # 32 x 32 (before, its one line was onnxruntime's broadcast error, with no word of --data).
    from onnx_admm.check import check

    report = check(Path(sweep.__file__).parent / "paddle_ocr" / "ppocr_det.onnx")
    assert report.passed and [s.name for s in report.steps][1] == "torch vs onnxruntime", report.format()


# The trained transformer (samples/corpus/vit.py, 95.3% on its last quarter of the digits): the sweep's label-free
# 50% run, measured in onnxruntime on every digit the ViT did not train on (450, not the sweep's 64), agreed on
# 0.962-0.964 of them over seeds 0-2 (the random-weight transformer_encoder: 0.83). The bar is 0.95.
def test_trained_transformer_follows_the_original_on_unseen_digits(tmp_path, one_thread):
    entry = ENTRIES["digits_vit"]
    row = sweep.run_entry(entry, tmp_path, samples=128, speed=False)
    assert row["check"] == "pass" and not row["reason"], row["reason"]
    assert row["per"] == "per sample" and row["io_same"]
    folder = tmp_path / "digits_vit"
    path, _ = entry.build(folder)  # the file the entry built
    images, _ = vit.shuffled_digits()
    unseen = {"input": images[len(images) * 3 // 4:]}
    original = synthetic.run_onnx(path, unseen)[0].argmax(1)
    compressed = synthetic.run_onnx(folder / "compressed.onnx", unseen)[0].argmax(1)
    assert len(original) == 450 and (original == compressed).mean() >= 0.95


def test_markdown_table_has_one_row_per_model():
    rows = [{"model": "m", "source": "s", "exporter": "e", "params": 10, "check": "pass", "agreement": 1.0,
             "ratio": 2.0, "train_ms": 4.0, "infer_ms": 2.0, "reason": "a | b"}]
    table = sweep.format_rows(rows).splitlines()
    assert len(table) == 3 and table[2].count("|") == table[0].count("|")
    assert "2.0x (4 / 2.0 ms)" in table[2] and "a / b" in table[2]


# The two imbalanced-output entries (issue 22), built small so a test trains them from scratch in seconds
# (nothing is cached between runs): a reader of 250 frame-wise steps, a detector of 150 steps at 16 channels.
# Floors just under what these variants measured with the default balance (0.5): reader 0.985 per time step,
# 0.708 of the greedy reads equal to the original's; detector 0.978 per position, F1 0.853 of the map's
# positives against the original's (with balance 0 it detected nothing, F1 0.0). samples/corpus/RESULTS.md.
QUICK = {
    "captcha_ctc": (synthetic.captcha_ctc(steps=250, samples=1500, feeds=192, aligned=True), synthetic.captcha_agreement,
                    "per time step"),
    "detector_1d": (synthetic.detector_1d(steps=150, samples=600, feeds=192, width=16), synthetic.detector_agreement,
                    "per time step"),
}


@pytest.mark.parametrize("name, min_agreement, min_match", [("captcha_ctc", 0.95, 0.6), ("detector_1d", 0.95, 0.8)])
def test_imbalanced_entry_keeps_its_minority_after_a_label_free_compress(tmp_path, one_thread, name, min_agreement,
                                                                         min_match):
    build, agreement, per = QUICK[name]
    row = sweep.run_entry(sweep.Entry(name, "synthetic", "torch TorchScript", build), tmp_path, samples=128, speed=False)
    assert row["check"] == "pass" and not row["reason"], row["reason"]
    assert row["agreement"] >= min_agreement and row["per"] == per and row["io_same"]
    folder = tmp_path / name
    original, _ = build(folder)  # the file the entry built
    held_out = dict(np.load(folder / "val.npz"))
    feeds = held_out["image"] if name == "captcha_ctc" else held_out
    measured = agreement(original, folder / "compressed.onnx", feeds)
    assert measured["value"] >= min_match, measured


def _shrinks_as_masked(model, group, removed, feeds) -> None:
    """The graph without ``removed`` units of ``group`` computes the original with their reads zeroed."""
    import onnxruntime as ort

    from onnx_admm.converters.cut import zeroed
    from onnx_admm.converters.shrink import shrink

    keep = np.ones(group.n_channels, dtype=bool)
    keep[removed] = False

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    want, got = run(zeroed(model, group, removed)), run(shrink(model, {group.name: keep}).model)
    assert float(np.abs(got - want).max()) < 1e-5, group.name


def test_every_layer_of_a_keras_cnn_but_its_softmax_loses_filters(tmp_path):
    # keras_digits (tf2onnx): the last Conv's channels reach a Shape (the Flatten reads its input's dims) and
    # stopped the group there; the Flatten's shape is now frozen to a constant and the Shape left behind.
    from onnx_admm.converters.groups import channel_groups
    from onnx_admm.converters.modelio import load_model

    path, data = ENTRIES["keras_digits"].build(tmp_path)
    model = load_model(path)
    groups = channel_groups(model)
    assert [g.n_channels for g in groups if g.prunable] == [16, 32, 32, 64]
    assert [g.reason for g in groups if not g.prunable] == [
        "the channels reach Softmax functional_1/probs_1/Softmax, which is not handled"]
    for group in groups[:4]:
        _shrinks_as_masked(model, group, np.arange(0, group.n_channels, 4), {"image": data["image"][:32]})


def test_the_dense_layer_of_a_keras_export_loses_units_through_its_computed_reshape(tmp_path):
    # keras_bytes (tf2onnx): the first Dense runs on [N, 256, 256] one-hot bytes as Reshape, MatMul, Add and a
    # Reshape back to a shape read from the input; filter pruning stopped there ("computed shape"). Its 48
    # units now form a prunable group, and the graph without a third of them computes what the original does
    # with their columns zeroed in the next layer.
    from onnx_admm.converters.groups import channel_groups
    from onnx_admm.converters.modelio import load_model
    from onnx_admm.converters.shrink import shrink

    path, data = ENTRIES["keras_bytes"].build(tmp_path)
    model = load_model(path)
    dense = next(g for g in channel_groups(model) if g.frozen)
    assert dense.prunable and dense.n_channels == 48, dense.reason
    removed = np.arange(0, 48, 3)
    _shrinks_as_masked(model, dense, removed, {"bytes": data["bytes"][:64]})
    keep = np.ones(48, dtype=bool)
    keep[removed] = False
    weights = {t.name: t for t in shrink(model, {dense.name: keep}).model.graph.initializer}
    assert list(weights[dense.name].dims) == [256, 32]


def test_filter_pruning_removes_recurrent_hidden_units_with_the_convs(tmp_path, one_thread):
    # crnn_seq_first (conv trunk, flatten(1, 2) to a shape computed as [Shape(x)[0], -1, Shape(x)[3]],
    # bidirectional GRU, [T, N, C] head): --structure filter left the GRU alone ("GRU filters are not
    # removable") and the last conv too (its Reshape "computes its shape, with 2 dims that follow the inputs").
    # Both lose half their units now: the GRU's hidden_size, W's and R's gate rows, R's and the head's columns.
    from onnx_admm.api import compress
    from onnx_admm.data import Dataset
    from onnx_admm.recipe import CompressConfig

    path, data = ENTRIES["crnn_seq_first"].build(tmp_path)
    feeds = data if data is not None else sweep._inputs(sweep.load_model(path), 64, 0)
    config = CompressConfig.from_dict({"train": {"threads": 1}, "admm": {"epochs": 1, "retrain_epochs": 1},
                                       "prune": {"sparsity": 0.5, "structure": "filter"}})
    result = compress(path, Dataset(feeds, None, set(feeds)), config, metric_floor=0)
    assert list(result.report["left_alone"]) == ["onnx::MatMul_224"]  # the head: its classes reach LogSoftmax
    stored = {layer["name"]: layer["stored_shape"] for layer in result.report["layers"]}
    assert stored == {"conv.0.weight": [8, 1, 3, 3], "conv.3.weight": [16, 8, 3, 3], "onnx::GRU_222": [2, 72, 64],
                      "onnx::GRU_223": [2, 72, 24], "onnx::MatMul_224": [48, 12]}
    written = result.model()
    (gru,) = [n for n in written.graph.node if n.op_type == "GRU"]
    assert onnx.helper.get_attribute_value(next(a for a in gru.attribute if a.name == "hidden_size")) == 24
    # the written file computes what was trained: onnxruntime against the trained weights in torch
    feed = {name: np.asarray(value)[:8] for name, value in feeds.items()}
    got = ort.InferenceSession(written.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    want = result.imported.run(feed)[0]
    assert np.abs(got - want).max() <= 1e-4 * (1 + np.abs(want).max())


def test_seq2seq_transformer_imports_whole_with_its_logits_as_the_score(tmp_path, one_thread):
    # Both exporters write the decoder's causal mask with Trilu, which onnx2torch lacks: the import stopped
    # there and the decoder and head passed through untrained. TorchScript writes the head Add(bias, MatMul).
    from onnx_admm.converters.importer import import_model

    path = seq2seq.build(tmp_path / "seq2seq_ts.onnx", dynamo=False, steps=20)
    model = onnx.load(str(path))
    assert any(n.op_type == "Trilu" for n in model.graph.node)
    imported = import_model(model)
    assert imported.output_names == ["logits"] and not imported.passed_through
    assert (imported.score.name, imported.score.kind) == ("logits", "logits")
    assert len(imported.compressible()) >= 20  # every projection of both stacks and the head
    feeds = seq2seq.feeds(6, 3)
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(imported.run(feeds)[0], reference, atol=1e-4)


def test_cut_probe_compares_every_cut_group_with_the_zeroed_original():
    # samples/corpus/cut_probe.py, the check the eighteenth session ran over 390 local files: the committed Keras
    # reader (convs, a Dense, two bidirectional LSTMs) with half of every group's units removed.
    row = cut_probe.probe(str(Path(sweep.__file__).parent / "keras_captcha" / "keras_captcha.onnx"))
    assert "error" not in row, row
    assert row["prunable"] == 5 and row["ops"] == ["Conv", "LSTM", "MatMul"] and row["rel_diff"] < 1e-5
