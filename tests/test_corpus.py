"""The corpus sweep (samples/corpus/sweep.py) on its generated models that run in seconds: check passes,
the label-free 50% compress keeps graph I/O and follows the original. The train-step / inference ratio
is measured by the sweep, not asserted here: on the shared 2-core machine the same step measured 2.0x
and 17x minutes apart. The whole corpus runs in the sample, not here."""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "samples" / "corpus"))

import sweep  # noqa: E402

ENTRIES = {e.name: e for e in sweep.CORPUS}


def _io(path: Path) -> tuple[list[bytes], list[bytes]]:
    model = onnx.load(str(path), load_external_data=False)
    return [v.SerializeToString() for v in model.graph.input], [v.SerializeToString() for v in model.graph.output]


@pytest.mark.parametrize("name, min_agreement", [("lstm_classifier", 0.95), ("sklearn_mlp", 0.95),
                                                 ("bytes_onehot_layernorm", 0.75)])
def test_corpus_entry_checks_compresses_and_keeps_graph_io(tmp_path, name, min_agreement):
    row = sweep.run_entry(ENTRIES[name], tmp_path, samples=128)
    assert row["check"] == "pass", row["reason"]
    assert not row["reason"]
    # Random-weight models have near-uniform scores, so their top-1 is fragile: the byte classifier
    # measured 0.83 (64 held-out samples), the trained sklearn MLP 0.98, the LSTM 1.0.
    assert row["agreement"] >= min_agreement
    path, _ = ENTRIES[name].build(tmp_path / name)
    assert _io(tmp_path / name / "compressed.onnx") == _io(path)


def test_markdown_table_has_one_row_per_model():
    rows = [{"model": "m", "source": "s", "exporter": "e", "params": 10, "check": "pass", "agreement": 1.0,
             "ratio": 2.0, "train_ms": 4.0, "infer_ms": 2.0, "reason": "a | b"}]
    table = sweep.format_rows(rows).splitlines()
    assert len(table) == 3 and table[2].count("|") == table[0].count("|")
    assert "2.0x (4 / 2.0 ms)" in table[2] and "a / b" in table[2]
