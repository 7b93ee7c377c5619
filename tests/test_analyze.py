"""``onnx-admm analyze`` on the digits sample: the table, the curves, onnxruntime's check, the suggested recipe,
``allocation = "sensitivity"`` inside compress, and the one-line errors."""

from __future__ import annotations

import json

import onnx
import pytest
from click.testing import CliRunner

from onnx_admm.converters.importer import import_model
from onnx_admm.analyze import analyze, format_table, parse_ratio, recipe_text, suggest
from onnx_admm.api import compress, weight_specs
from onnx_admm.cli import main
from onnx_admm.pipeline.planning import make_plan
from onnx_admm.projections import keep_count
from onnx_admm.recipe import CompressConfig
from onnx_admm.sensitivity import ANALYZE_LEVELS, Curve, split

LAYERS = ["0.weight", "2.weight", "5.weight", "7.weight"]
# Accuracy on the 360 test images moves by 1/360 per sample; pruning deeper may win back a few samples
# by chance, never more than this.
NOISE = 0.01


@pytest.fixture(scope="module")
def digits_analysis(digits_sample):
    return analyze(digits_sample.model, digits_sample.train, val_data=digits_sample.test, bits=(4,))


def test_table_has_a_row_per_layer_and_a_column_per_level(digits_analysis):
    report = digits_analysis
    assert report["schema_version"] == 1 and report["kind"] == "onnx-admm sensitivity"
    assert report["metric"] == "accuracy" and report["samples"] == 360
    assert report["dense_metric"] == pytest.approx(350 / 360)  # the README's 97.22%
    assert [layer["name"] for layer in report["layers"]] == LAYERS
    for layer in report["layers"]:
        keeps = [p["keep"] for p in layer["prune"]]
        # one point per level, then the layer's minimum (1 weight), none repeated
        assert keeps == sorted({max(1, keep_count(layer["params"], s)) for s in ANALYZE_LEVELS} | {1}, reverse=True)
        assert [q["bits"] for q in layer["quantize"]] == [4]
    table = format_table(report).splitlines()
    assert len(table) == 2 + len(LAYERS) + 2  # title, header, rows, footnote, onnxruntime check
    assert table[1].split() == ["layer", "params", "50%", "75%", "90%", "95%", "98%", "deepest", "4-bit"]
    assert table[2].split()[:2] == ["0.weight", "144"] and len(table[2].split()) == 2 + 5 + 2 + 1
    json.loads(json.dumps(report, allow_nan=False))  # strict JSON


def test_drops_grow_with_sparsity_within_noise(digits_analysis):
    for layer in digits_analysis["layers"]:
        drops = [p["drop"] for p in layer["prune"]]
        assert all(later >= earlier - NOISE for earlier, later in zip(drops, drops[1:])), (layer["name"], drops)
        assert drops[-1] > 0.5  # one weight left: the model is broken, whichever layer it is


def test_onnxruntime_agrees_with_torch_on_the_worst_probe(digits_analysis):
    check = digits_analysis["onnxruntime_check"]
    worst = max((p["drop"], layer["name"], p["keep"]) for layer in digits_analysis["layers"] for p in layer["prune"])
    assert (check["layer"], check["keep"]) == worst[1:]
    assert check["agrees"] and check["tolerance"] == pytest.approx(2 / 360)
    assert abs(check["onnxruntime"] - check["torch"]) <= check["tolerance"]
    assert check["dense_onnxruntime"] == pytest.approx(350 / 360)


@pytest.mark.parametrize("ratio", [40.0, 123.4])
def test_the_suggested_recipe_loads_and_meets_its_ratio_exactly(digits_analysis, digits_sample, tmp_path, ratio):
    suggestion = suggest(digits_analysis, ratio)
    path = tmp_path / "suggested.toml"
    path.write_text(recipe_text(suggestion, "model.onnx"))
    config = CompressConfig.from_toml(path)
    specs = weight_specs(import_model(onnx.load(str(digits_sample.model))))
    plan = make_plan(specs, config)
    total = sum(layer["params"] for layer in digits_analysis["layers"])
    sizes = {layer["name"]: layer["params"] for layer in digits_analysis["layers"]}
    kept = {w.spec.label: keep_count(sizes[w.spec.label], w.sparsity[-1]) for w in plan.weights}
    assert sum(kept.values()) == keep_count(total, 1 - 1 / ratio) == suggestion["keep"]
    assert kept == {name: layer["keep"] for name, layer in suggestion["layers"].items()}


def test_allocation_sensitivity_runs_end_to_end_and_splits_from_its_curves(digits_sample):
    config = CompressConfig.from_dict({"prune": {"sparsity": 0.95, "allocation": "sensitivity"},
                                       "train": {"epochs": 2, "threads": 1}})
    report = compress(digits_sample.model, digits_sample.train, config, val_data=digits_sample.test).report
    total = report["params"]["total"]
    assert report["params"]["nonzero"] == keep_count(total, 0.95)
    measured = report["sensitivity"]
    dense = measured["dense_metric"]
    curves = {name: Curve(c["params"], dense, tuple((p["keep"], p["metric"]) for p in c["points"]))
              for name, c in measured["layers"].items()}
    expected = split(curves, keep_count(total, 0.95), {name: 1 for name in curves})
    assert {layer["name"]: layer["nonzero"] for layer in report["layers"]} == expected
    assert report["config"]["prune"]["allocation"] == "sensitivity"


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_writes_the_table_json_and_recipe(digits_sample, tmp_path):
    out, recipe = tmp_path / "sens.json", tmp_path / "40x.toml"
    result = _cli("analyze", digits_sample.model, "--data", digits_sample.test, "--layer", "5.weight", "--layer",
                  "2.weight", "--levels", "0.5,0.9", "-q", "-o", out, "--suggest", "40x", "--recipe-out", recipe)
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert [layer["name"] for layer in written["layers"]] == ["5.weight", "2.weight"]
    assert written["levels"] == [0.5, 0.9] and written["suggestion"]["keep"] == keep_count(32768 + 4608, 0.975)
    assert recipe.read_text() in result.output
    assert CompressConfig.from_toml(recipe).rules[0].match == "5.weight"


@pytest.mark.parametrize("args, fragment", [
    (["--layer", "9.weight"], "'9.weight' is not a layer analyze measures; the layers are 0.weight (Conv)"),
    (["--suggest", "0.5x"], "a compression ratio is weights / nonzero weights and at least 1"),
    (["--suggest", "forty"], "expected a compression ratio such as 40x"),
    (["--levels", "0.5,1.2"], "a sparsity level is a fraction of zeros in (0, 1)"),
    (["--recipe-out", "x.toml"], "--recipe-out writes the --suggest recipe"),
])
def test_bad_input_is_one_error_line_and_exit_2(digits_sample, args, fragment):
    result = _cli("analyze", digits_sample.model, "--data", digits_sample.test, "-q", *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and fragment in errors[0], result.output


def test_parse_ratio():
    assert parse_ratio("40x") == parse_ratio("40") == parse_ratio(" 40X ") == 40.0
    assert parse_ratio("1x") == 1.0 and parse_ratio("2.5e2x") == 250.0
    for bad in ("", "x", "40xx", "-3x", "0.9", "nan"):
        with pytest.raises(ValueError):
            parse_ratio(bad)


def test_a_ctc_readers_table_names_the_sequence_match_it_measures(tmp_path):
    # A [T, N, C] reader whose steps are mostly its blank: the curves measure greedy-decoded sequences, and the
    # table named them "top-1 agreement" (the blank is found on the first batch, which the name was not given).
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = np.eye(6, dtype=np.float32) * 4 + rng.normal(0, 0.3, (6, 6)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Transpose", ["h"], ["t"], perm=[1, 0, 2]),
         helper.make_node("LogSoftmax", ["t"], ["y"], axis=2)], "reader",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [12, "N", 6])], [numpy_helper.from_array(w, "W")])
    path = tmp_path / "reader.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    ids = np.where(rng.random((64, 12)) < 0.7, 0, rng.integers(1, 6, (64, 12)))  # 70% of the steps blank
    x = np.eye(6, dtype=np.float32)[ids] + rng.normal(0, 0.1, (64, 12, 6)).astype(np.float32)
    report = analyze(path, {"x": x}, levels=(0.5,))
    assert report["metric"] == "sequence match with the original"
