"""The benchmark's onnxsim peer rows (samples/lenet5_fashion_mnist/peers.py): skipped with one line when
onnxsim cannot be imported, and, when it can, one tiny row gives a model onnxruntime runs at the sparsity
asked for, with the zeros kept through onnxsim's block fine-tuning."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest

from test_bench_quick import _bench  # the benchmark module, loaded once by path


def test_onnxsim_rows_are_skipped_with_a_note_when_it_cannot_be_imported(monkeypatch, caplog):
    bench = _bench()
    monkeypatch.setitem(sys.modules, "onnxsim", None)  # `import onnxsim` now raises ImportError
    table = bench.rows(1)
    assert any(row.kind == "onnxsim" for row in table)
    with caplog.at_level(logging.WARNING, logger="bench"):
        todo = bench.select_rows(table, "*", set())
        assert bench.select_rows(table, "onnxsim-*", set()) == []
    assert [row.id for row in todo] == [row.id for row in table if row.kind != "onnxsim"]
    notes = [record.getMessage() for record in caplog.records]
    assert len(notes) == 2 and all(note.startswith(bench.peers.NOTE) for note in notes)  # one line per call


def test_onnxsim_rows_run_when_it_imports(monkeypatch, caplog):
    bench = _bench()
    monkeypatch.setattr(bench.peers, "available", lambda: True)
    with caplog.at_level(logging.WARNING, logger="bench"):
        todo = bench.select_rows(bench.rows(1), "onnxsim-*", {"onnxsim-int8"})
    assert [row.id for row in todo] == [row.id for row in bench.onnxsim_rows()][1:]  # done rows stay done
    assert not caplog.records


def _tiny_model(path):
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)).eval()
    torch.onnx.export(model, (torch.zeros(2, 1, 8, 8),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "N"}})
    return path


def test_a_tiny_onnxsim_row_runs_in_onnxruntime_at_its_sparsity(tmp_path):
    peers = _bench().peers
    if not peers.available():
        pytest.skip("onnxsim 0.8 is not installed (pip install 'onnx-admm[samples]')")
    import onnx
    import onnxruntime as ort

    dense = _tiny_model(tmp_path / "dense.onnx")
    images = np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32)
    out = tmp_path / "pruned.onnx"
    # magnitude: its pass renames the weights, which its fine-tuning trips over unless peers.py names them back
    info = peers.run({"prune": "magnitude", "finetune": True}, 0.9, dense, out, images, steps=2)

    assert set(info["density"]) == {"0.weight", "3.weight"}  # named by the dense model's weights
    assert all(block["trained"] for block in info["blocks"]) and info["finetune_steps"] == 2
    model = onnx.load(str(out))
    assert peers.drop_unused_initializers(model) == 0  # the originals onnxsim leaves behind are gone
    values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    weights = [values[node.input[1]] for node in model.graph.node if node.op_type in ("Conv", "Gemm")]
    assert sum(v.size for v in values.values()) == 4 * 9 + 4 + 144 * 10 + 10  # weights and biases, once each
    kept = sum(np.count_nonzero(w) for w in weights) / sum(w.size for w in weights)
    assert kept == pytest.approx(0.1, abs=0.01)  # global 90%: fine-tuning kept the zeros
    logits = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": images})[0]
    assert logits.shape == (64, 10) and np.isfinite(logits).all()
