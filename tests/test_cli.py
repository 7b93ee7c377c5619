"""The `inspect`, `check` and `validate` commands, and the one-line errors every command gives."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnx_admm import __version__
from onnx_admm.cli import main


def _run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_version_and_help():
    assert __version__ in _run("--version").output
    for command in ("inspect", "check", "validate", "compress", "analyze"):
        result = _run(command, "--help")
        assert result.exit_code == 0 and "Usage" in result.output


def test_inspect_json_lists_weights(digits_sample):
    result = _run("inspect", digits_sample.model, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert [(w["name"], w["op_type"], w["shape"]) for w in info["weights"]] == [
        ("0.weight", "Conv", [16, 1, 3, 3]), ("2.weight", "Conv", [32, 16, 3, 3]),
        ("5.weight", "Gemm", [64, 512]), ("7.weight", "Gemm", [10, 64])]
    assert info["score_output"] == {"name": "logits", "kind": "logits"}
    assert info["importable"] and info["total_params"] == 38160


def test_inspect_table_says_what_rules_match(digits_sample):
    result = _run("inspect", digits_sample.model)
    assert result.exit_code == 0, result.output
    assert 'recipe rules match these weight names: [[rules]] match = "0.weight"' in result.output


def test_inspect_filters_lists_what_filter_pruning_would_cut_and_why_not(digits_sample):
    # Before a long --structure filter run: each layer's units, or why it keeps them (here the head's classes
    # are the graph output).
    result = _run("inspect", digits_sample.model, "--filters")
    assert result.exit_code == 0, result.output
    assert "filter pruning (--structure filter): 3 of 4 groups can lose units" in result.output
    assert "keeps them: the channels reach the graph output 'logits'" in result.output
    groups = json.loads(_run("inspect", digits_sample.model, "--json", "--filters").output)["filter_groups"]
    assert [(g["name"], g["op_type"], g["channels"], g["prunable"]) for g in groups] == [
        ("0.weight", "Conv", 16, True), ("2.weight", "Conv", 32, True), ("5.weight", "Gemm", 64, True),
        ("7.weight", "Gemm", 10, False)]
    assert "filter_groups" not in json.loads(_run("inspect", digits_sample.model, "--json").output)


def test_inspect_names_probabilities_output(two_outputs_torchscript_onnx):
    info = json.loads(_run("inspect", two_outputs_torchscript_onnx, "--json").output)
    assert info["score_output"]["name"] == "logits"
    assert info["outputs"] == ["logits", "probs"]


def test_check_passes_with_data_and_json(digits_sample):
    result = _run("check", digits_sample.model, "--data", digits_sample.test, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["passed"] and len(report["steps"]) == 6
    torch_vs_ort = report["steps"][1]
    assert torch_vs_ort["value"] < 1e-4


def test_check_dynamo_external_data(lenet5_dynamo_onnx):
    result = _run("check", lenet5_dynamo_onnx)
    assert result.exit_code == 0, result.output
    assert result.output.count("PASS") == 6


def test_validate_table_and_report(digits_sample, tmp_path):
    report_path = tmp_path / "v.json"
    result = _run("validate", digits_sample.model, digits_sample.model, "--data", digits_sample.test,
                  "--report", report_path)
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["agreement"] == 1.0
    assert report["original"]["accuracy"] == report["compressed"]["accuracy"] > 0.95


# ---- bad input: one line naming the problem and the fix, exit 1, no traceback, no output file ----


def test_not_an_onnx_file(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_text("this is not a model\n" * 10)
    _assert_one_line_error(_run("inspect", bad), "model.onnx")


def test_truncated_file(tmp_path, digits_sample):
    data = digits_sample.model.read_bytes()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: len(data) // 3])
    _assert_one_line_error(_run("check", bad), "truncated")


def test_missing_file(tmp_path):
    _assert_one_line_error(_run("inspect", tmp_path / "nope.onnx"), "nope.onnx does not exist; pass the path of an .onnx model")


def test_missing_external_data(tmp_path, lenet5_dynamo_onnx):
    lonely = tmp_path / "lonely.onnx"
    shutil.copy(lenet5_dynamo_onnx, lonely)
    _assert_one_line_error(_run("check", lonely), "external data", lenet5_dynamo_onnx.name + ".data")


def _unsupported_model(path):
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
        g (float[N, 4] x) => (float[N, 3] y) {
            h = Gemm <transB = 1> (x, W)
            y = com.example.Frobnicate (h)
        }
    """)
    model.graph.node[1].name = "frob_node"
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((3, 4), np.float32), "W"))
    onnx.save(model, str(path))
    return path


def test_unsupported_op_names_node_op_and_opset(tmp_path):
    model = _unsupported_model(tmp_path / "custom.onnx")
    result = _run("check", model)
    assert result.exit_code == 1
    assert "FAIL  import" in result.output and "frob_node" in result.output and "Frobnicate (opset 1)" in result.output
    info = json.loads(_run("inspect", model, "--json").output)
    assert not info["importable"] and "frob_node" in info["problems"][0]
    out = tmp_path / "out.onnx"
    result = _run("compress", model, "-o", out, "--data", tmp_path / "x.npz", "--sparsity", "0.5")
    _assert_one_line_error(result)
    assert not out.exists()


@pytest.mark.parametrize("arrays, fragments", [
    ({"image": np.zeros((4, 1, 8, 8), np.float32)}, ["input", "image"]),
    ({"input": np.zeros((4, 1, 7, 8), np.float32)}, ["input", "8", "7"]),
    ({"input": np.zeros((4, 8, 8), np.float32)}, ["input", "rank"]),
    ({"input": np.zeros((4, 1, 8, 8), np.int64)}, ["input", "int64"]),
    ({"input": np.zeros((0, 1, 8, 8), np.float32)}, ["no samples"]),
])
def test_bad_npz_is_one_line_error(tmp_path, digits_sample, arrays, fragments):
    data = tmp_path / "bad.npz"
    np.savez(data, **arrays)
    for args in (("validate", digits_sample.model, digits_sample.model, "--data", data),
                 ("compress", digits_sample.model, "-o", tmp_path / "out.onnx", "--data", data, "--sparsity", "0.5")):
        _assert_one_line_error(_run(*args), *fragments)
    assert not (tmp_path / "out.onnx").exists()


def test_validate_different_io_is_error(tmp_path, digits_sample, lenet5_torchscript_onnx):
    _assert_one_line_error(
        _run("validate", digits_sample.model, lenet5_torchscript_onnx, "--data", digits_sample.test))


def test_structure_help_says_only_filter_pruning_shrinks_the_graph():
    shown = " ".join(CliRunner().invoke(main, ["compress", "--help"]).output.split())
    assert "filter pruning also removes the filters from the graph; the others store zeros" in shown
    assert "channels also shrink" not in shown


def test_compress_again_to_the_same_external_data_output(tmp_path, lenet5_dynamo_onnx, monkeypatch):
    # A dynamo export keeps its weights in a .data file, and so does the compressed model. Run again with the
    # same -o from the folder that holds the first output: onnx's own save refused a data file name that exists
    # in the current folder ("External data file exists in out.onnx.data"), so the second run saved nothing.
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "train.npz"
    np.savez(data, input=np.random.default_rng(0).random((32, 1, 28, 28), dtype=np.float32))
    args = ("compress", lenet5_dynamo_onnx, "-o", "out.onnx", "--data", data, "--sparsity", "0.5",
            "--admm-epochs", "1", "--retrain-epochs", "1", "--threads", "1", "--metric-floor", "0", "-q")
    for _ in range(2):
        result = _run(*args)
        assert result.exit_code == 0, result.output
    model = onnx.load("out.onnx")  # its external data, loaded from beside it
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.load("out.onnx", load_external_data=False)
               .graph.initializer)
    assert sum(int(np.count_nonzero(onnx.numpy_helper.to_array(t))) for t in model.graph.initializer) > 0
    # The data file is as readable as the model file (onnx creates it 0600).
    assert (tmp_path / "out.onnx.data").stat().st_mode & 0o777 == (tmp_path / "out.onnx").stat().st_mode & 0o777
