"""The Fashion-MNIST benchmark suite's plumbing (`bench.py --quick`): every row produced and well-formed.

Accuracy is not asserted: --quick trains on 128 images. Skipped when Debian's dataset-fashion-mnist
is not installed (`.ci/run` installs it).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "samples" / "lenet5_fashion_mnist" / "bench.py"
KEYS = {"id", "method", "target", "top1", "drop_pt", "ratio", "bytes", "bytes_gzip", "storage_bits", "epochs",
        "wall_s", "peak_rss_mb"}


def _bench():
    if "bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench", BENCH)
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["bench"]


@pytest.mark.skipif(not (_bench().DEFAULT_DATA / "train-images-idx3-ubyte.gz").is_file(),
                    reason="apt-get install dataset-fashion-mnist")
def test_quick_run_produces_every_row(tmp_path, monkeypatch):
    bench = _bench()
    # Every kind of row at one of the four ratios: the others run the same code (the suite's longest test).
    monkeypatch.setattr(bench, "TARGETS", (40,))
    assert bench.main(["--quick", "--out", str(tmp_path), "--threads", "1"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    # onnxsim's peer rows too when it is installed (tests/test_bench_peers.py has the skip)
    assert [r["id"] for r in results] == [r.id for r in bench.select_rows(bench.rows(1), "*", set())]
    for row in results:
        assert KEYS <= set(row), row
        assert 0.0 <= row["top1"] <= 1.0 and row["bytes"] > 0 and row["bytes_gzip"] > 0
    pruned = {r["id"]: r for r in results if r.get("density") and r["target"].endswith("x")
              and not r["id"].startswith("onnxsim-")}
    assert len(pruned) == 12 * len(bench.TARGETS)  # 12 pruning methods per ratio (the last: sensitivity allocation)
    for rid, row in pruned.items():
        target = float(row["target"][:-1])
        assert row["ratio"] == pytest.approx(target, rel=0.01), rid
        assert row["epochs"] == pytest.approx(1.0), rid  # every row the same budget
        assert set(row["density"]) == {"0.weight", "2.weight", "5.weight", "7.weight"}
    main_table = (tmp_path / "RESULTS.md").read_text().split("\n\n")[1]
    assert main_table.count("\n| ") == len(results) + 1  # separator row and one row per result (one seed)
    # Resumable: a second run skips every row already in results.json.
    before = (tmp_path / "results.json").read_text()
    assert bench.main(["--quick", "--out", str(tmp_path), "--threads", "1"]) == 0
    assert (tmp_path / "results.json").read_text() == before


def test_a_row_that_sets_a_learning_rate_keeps_it_beside_its_seed():
    # The -lr01 rows add train.lr to the row's recipe; the seed of each row used to replace the whole train table.
    from onnx_admm.recipe import CompressConfig

    rows = {row.id: row for row in _bench().rows(10, (0, 1))}
    for rid in ("default-lr01-200x-s1", "agp-lamp-lr01-40x-s0"):
        config = CompressConfig.from_dict(rows[rid].recipe)
        assert config.lr == 0.01 and config.train.seed == int(rid[-1])
    # the other rows train at the product's defaults: pruning 0.02, levels alone 0.01, binary 0.03
    assert CompressConfig.from_dict(rows["default-200x-s1"].recipe).lr == 0.02
    assert CompressConfig.from_dict(rows["joint-40x-4bit-s0"].recipe).lr == 0.02
    assert CompressConfig.from_dict(rows["quant-4bit-s1"].recipe).lr == 0.01
    assert CompressConfig.from_dict(rows["quant-binary-s0"].recipe).lr == 0.03
