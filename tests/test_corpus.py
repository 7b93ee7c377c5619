"""The corpus sweep (samples/corpus/sweep.py) on its generated models that run in seconds: check passes,
the label-free 50% compress keeps graph I/O and follows the original. The train-step / inference ratio
is measured by the sweep, not asserted here: on the shared 2-core machine the same step measured 2.0x
and 17x minutes apart. The whole corpus runs in the sample, not here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "samples" / "corpus"))

import sweep  # noqa: E402

ENTRIES = {e.name: e for e in sweep.CORPUS}


# Agreement floors just under what the sweep measured (128 training / 64 held-out inputs, seeded, after
# the builders' calibration on synthetic labels): lstm 0.938, sklearn 0.984, byte classifier 0.891, CRNN
# 0.838 per time step, segmenter 0.965 per pixel. Only sklearn meets the bar (0.95; 0.97 per
# pixel); samples/corpus/RESULTS.md reports the shortfall. These floors guard against regressions.
@pytest.mark.parametrize("name, min_agreement, per", [
    ("lstm_classifier", 0.9, "per sample"), ("sklearn_mlp", 0.95, "per sample"),
    ("bytes_onehot_layernorm", 0.85, "per sample"), ("crnn_seq_first", 0.8, "per time step"),
    ("segmenter_map", 0.95, "per pixel")])
def test_corpus_entry_checks_compresses_and_keeps_graph_io(tmp_path, name, min_agreement, per):
    row = sweep.run_entry(ENTRIES[name], tmp_path, samples=128)
    assert row["check"] == "pass", row["reason"]
    assert not row["reason"]
    assert row["agreement"] >= min_agreement and row["per"] == per
    assert row["io_same"]  # graph inputs and outputs of the written file, byte for byte


def test_markdown_table_has_one_row_per_model():
    rows = [{"model": "m", "source": "s", "exporter": "e", "params": 10, "check": "pass", "agreement": 1.0,
             "ratio": 2.0, "train_ms": 4.0, "infer_ms": 2.0, "reason": "a | b"}]
    table = sweep.format_rows(rows).splitlines()
    assert len(table) == 3 and table[2].count("|") == table[0].count("|")
    assert "2.0x (4 / 2.0 ms)" in table[2] and "a / b" in table[2]
