"""The HTML report (`onnx-admm report`, `compress --html`) and the report's schema version."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from onnx_admm.converters.errors import UserError
from onnx_admm.converters.modelio import TEMP_PREFIX
from onnx_admm.cli import main
from onnx_admm.html_report import render
from onnx_admm.html_sections import SECTIONS, recipe_toml
from onnx_admm.recipe import CompressConfig
from onnx_admm.report_schema import SCHEMA_VERSION

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

# A filter-pruned run's `structure` (measured on the digits sample): latency at batch 1 and 64, MACs, filters kept.
STRUCTURE = {
    "kept_channels": {"0.weight": 8, "2.weight": 16, "5.weight": 32},
    "channels": {"0.weight": 16, "2.weight": 32, "5.weight": 64},
    "macs": {"original": 112320, "compressed": 29536},
    "params": {"original": 38282, "compressed": 9802},
    "latency": {"batch_1": {"original_ms": 0.0146, "compressed_ms": 0.0131},
                "batch_64": {"original_ms": 0.1668, "compressed_ms": 0.0878}},
    "note": "column- and block-pruned weights stay dense with zeros; removed filters are gone from the graph",
}
HOSTILE = "<script>alert('x')</script>"


def _run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def run(digits_sample, tmp_path_factory):
    """One fast compress (2 stages of 1 + 1 epochs, 4-bit) with --report and --html; about 3 s."""
    folder = tmp_path_factory.mktemp("html")
    paths = {"model": folder / "out" / "digits.onnx", "report": folder / "out" / "digits.json",
             "html": folder / "out" / "digits.html"}
    result = _run("compress", digits_sample.model, "-o", paths["model"], "--data", digits_sample.train,
                  "--val-data", digits_sample.test, "--sparsity", "0.9", "--stages", "2", "--admm-epochs", "1",
                  "--retrain-epochs", "1", "--bits", "4", "--threads", "1", "--report", paths["report"],
                  "--html", paths["html"], "-q")
    assert result.exit_code == 0, result.output
    return paths


@pytest.fixture
def report(run) -> dict:
    return json.loads(run["report"].read_text())


def _section(page: str, key: str) -> str:
    match = re.search(f'<section id="{key}">(.*?)</section>', page, re.S)
    assert match, f"no section {key}"
    return match.group(1)


def _svgs(fragment: str) -> list[ET.Element]:
    """Every inline SVG of ``fragment``, parsed as XML: it must be well-formed, with its text escaped."""
    return [ET.fromstring(svg) for svg in re.findall(r"<svg\b.*?</svg>", fragment, re.S)]


def test_report_has_schema_version(report):
    assert report["schema_version"] == SCHEMA_VERSION == 1


def test_compress_html_is_written_beside_the_other_outputs(run):
    folder = run["model"].parent
    assert sorted(p.name for p in folder.iterdir()) == ["digits.html", "digits.json", "digits.onnx"]
    page = run["html"].read_text()
    assert page.startswith("<!DOCTYPE html>") and page == render(json.loads(run["report"].read_text()))


def test_every_section_is_present_with_its_figures(report):
    report["structure"] = STRUCTURE
    report["left_alone"] = {"7.weight": "the channels reach the graph output 'logits'"}
    report["warnings"] = ["a warning to show"]
    page = render(report)
    for key, heading, _ in SECTIONS:
        assert heading in _section(page, key)
    summary = _section(page, "summary")
    for figure in (f"{report['original']['bytes']:,}", f"{report['compressed']['bytes_gzip']:,}",
                   "top-1 agreement", "latency, batch 1", "latency, batch 64", "MACs"):
        assert figure in summary
    assert f"{100 * report['metrics']['compressed_accuracy']:.2f}%" in summary
    gate = _section(page, "gate")
    assert "passed" in gate and "50%" in gate and f"{100 * report['gate']['retained']:.2f}%" in gate
    assert "the channels reach the graph output &#x27;logits&#x27;" in _section(page, "left-alone")
    assert "a warning to show" in _section(page, "warnings")
    assert "Filters kept" in _section(page, "details")
    assert "[train]" in _section(page, "config") and "bits = 4" in _section(page, "config")
    # every weight is quantized at every stage here: reconstruction is on and finds nothing to refit
    assert "0 of 0 layers" in _section(page, "stages")


def test_stages_say_what_reconstruction_did(report):
    report["stages"][0]["reconstruction"] = {"layers": 3, "pruned_layers": 4, "tapped_layers": 4,
                                             "error_ratio": 0.36, "start": "stage start"}
    report["stages"][1]["reconstruction"] = None
    stages = _section(render(report), "stages")
    assert "3 of 4 layers, error x0.36, from stage start" in stages and "<td>off</td>" in stages
    report["stages"][1]["reconstruction"] = {"layers": 0, "pruned_layers": 0, "tapped_layers": 0, "error_ratio": None,
                                             "rounding": {"layers": 3, "quantized_layers": 4, "tapped_layers": 3,
                                                          "error_ratio": 0.21}}
    assert "0 of 0 layers; GPTQ 3 of 4 k-bit layers, error x0.21" in _section(render(report), "stages")


def test_int8_activations_are_compared(report):
    row = {"accuracy": 0.95, "agreement": 0.97, "bytes": 12345, "latency_ms": {"1": 0.02, "64": 0.3}}
    report["activations"] = {"calibration_samples": 128, "threads": 1, "runs": 200, "original_accuracy": 0.97,
                             "compressed_fp32": row, "compressed_int8": {**row, "bytes": 9999},
                             "quantize_static": {**row, "accuracy": None}}
    summary = _section(render(report), "summary")
    assert "Integer activations" in summary and "latency, batch 64" in summary and "9,999" in summary
    activations = summary[summary.index("Integer activations"):]  # the run's own latencies sit before it
    assert "128 calibration samples" in activations and activations.count("0.300 ms") == 3


def test_no_external_reference(run, report):
    report["structure"] = STRUCTURE
    for page in (run["html"].read_text(), render(report)):
        lowered = page.lower()
        for needle in ("http://", "https://", "@import", "url(", "src=", "href=", "<script", "<link", "<img"):
            assert needle not in lowered, needle
        assert not re.search(r"""(src|href)\s*=\s*["']?//""", lowered)
        assert "content-security-policy" in lowered  # and nothing could load if something slipped in


def test_layer_bars_one_row_per_layer_two_bars_each(report):
    svg = _svgs(_section(render(report), "layers"))[0]
    rows = svg.findall("g[@class='row']")
    assert len(rows) == len(report["layers"])
    for row, layer in zip(rows, report["layers"]):
        classes = [rect.get("class") for rect in row.iter("rect")]
        assert classes == ["bar density", "bar bits"], classes
        assert row.find("text").text == layer["name"]
        assert f"{layer['stored_bits_per_weight']:.2f}" in "".join(row.itertext())


def test_residual_and_selection_curves(report):
    page = render(report)
    residual = _svgs(_section(page, "residuals"))
    with_residuals = [s for s in report["stages"] if s["mean_residual"]]
    assert len(residual) == 2  # every stage's mean residual; each layer's in the last stage
    assert len(residual[0].findall("polyline")) == len(with_residuals)
    assert len(residual[1].findall("polyline")) == sum(bool(layer["residual_history"]) for layer in report["layers"])
    selection = _svgs(_section(page, "selection"))[0]
    epochs = sum(len(s["history"]) for s in report["stages"])
    # a marker per selection-split epoch (ADMM or retraining series) and a line for the training metric
    assert len(selection.findall("circle")) == epochs
    assert selection.findall("polyline")


def test_no_admm_phase_is_said_not_drawn(report):
    for stage in report["stages"]:
        stage["mean_residual"] = []
    for layer in report["layers"]:
        layer["residual_history"] = []
    assert "no ADMM phase ran" in _section(render(report), "residuals")


def test_text_is_escaped(report):
    report["layers"][0]["name"] = HOSTILE
    report["layers"][0]["note"] = "<b>bold</b> & more"
    report["warnings"] = [HOSTILE]
    report["left_alone"] = {HOSTILE: "a reason with <i>markup</i>"}
    report["output"] = f"/tmp/{HOSTILE}.onnx"
    page = render(report)
    assert "<script" not in page and "<b>bold" not in page and "<i>markup" not in page
    escaped = "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;"
    for key in ("layers", "warnings", "left-alone"):
        assert escaped in _section(page, key)
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; more" in _section(page, "layers")
    for svg in _svgs(page):  # the layer name inside the figures too, still well-formed XML
        assert "<script" not in ET.tostring(svg, encoding="unicode").replace("&lt;script", "")


def test_any_field_missing_renders_or_fails_in_one_line(report):
    """A report edited by hand: each top-level field removed, and each emptied, either still renders (the
    page says what is missing) or is one UserError, never a traceback."""
    for key in [k for k in report if k != "schema_version"]:
        for broken in ({k: v for k, v in report.items() if k != key}, {**report, key: None}):
            try:
                render(broken)
            except UserError as exc:
                assert "lacks or mangles a field of schema_version 1" in str(exc)


def test_recipe_round_trips(report):
    config = report["config"]
    assert CompressConfig.from_dict(tomllib.loads(recipe_toml(config))) == CompressConfig.from_dict(config)


@pytest.mark.parametrize("version, found", [(2, "has schema_version 2"), ("1", 'has schema_version "1"'),
                                            (True, "has schema_version true"), (None, "has schema_version null")])
def test_report_command_refuses_unknown_version(run, tmp_path, version, found):
    report = json.loads(run["report"].read_text())
    report["schema_version"] = version
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    result = _run("report", path, "-o", tmp_path / "r.html")
    assert result.exit_code == 1
    assert result.output == (f"Error: {path} {found}, which this onnx-admm does not read (reads schema_version 1); "
                             "use the onnx-admm that wrote it\n")
    assert not (tmp_path / "r.html").exists()


def test_report_command_refuses_a_report_without_version(run, tmp_path):
    report = json.loads(run["report"].read_text())
    del report["schema_version"]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    result = _run("report", path)
    assert result.exit_code == 1
    assert result.output == (f"Error: {path} has no schema_version: it is not a compress report of this onnx-admm "
                             "(reads schema_version 1); write it again with compress --report\n")


@pytest.mark.parametrize("text, fragment", [("{", "is not valid JSON"), ("[1]", "is not an onnx-admm report")])
def test_report_command_refuses_what_is_not_a_report(tmp_path, text, fragment):
    path = tmp_path / "r.json"
    path.write_text(text)
    result = _run("report", path)
    assert result.exit_code == 1 and fragment in result.output and len(result.output.splitlines()) == 1


def test_report_command_writes_beside_the_report_by_default(run, tmp_path):
    path = tmp_path / "run.report.json"
    shutil.copy(run["report"], path)
    result = _run("report", path)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run.report.html").read_text() == run["html"].read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.report.html", "run.report.json"]


def test_report_command_refuses_to_overwrite_the_report(run, tmp_path):
    path = tmp_path / "r.json"
    shutil.copy(run["report"], path)
    before = path.read_bytes()
    link = tmp_path / "link.html"
    link.symlink_to(path)
    for target in (path, link, tmp_path / "sub" / ".." / "r.json"):
        result = _run("report", path, "-o", target)
        assert result.exit_code == 1
        assert result.output.startswith(f"Error: the HTML report {target} is the same file as the report {path}")
        assert len(result.output.splitlines()) == 1
    assert path.read_bytes() == before


def test_report_command_writes_atomically(run, tmp_path, monkeypatch):
    """The page is written under a temporary name beside its target and renamed: a failed rename leaves
    the older page whole and no temporary file behind."""
    target = tmp_path / "page.html"
    target.write_text("older page")
    renamed = []

    def failing_replace(src, dst):
        renamed.append((Path(src), Path(dst)))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    result = _run("report", run["report"], "-o", target)
    assert result.exit_code == 1
    assert result.output == f"Error: cannot write {target}: No space left on device; nothing was written there, " \
                            "choose a writable location\n"
    assert target.read_text() == "older page"
    assert [dst for _, dst in renamed] == [target]
    (src, _), = renamed
    assert src.parent.parent == tmp_path and src.parent.name.startswith(TEMP_PREFIX) and src.name == target.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html"]


@pytest.mark.parametrize("which", ["data", "report", "model"])
def test_compress_html_path_checked_before_training(digits_sample, tmp_path, which):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    html = {"data": digits_sample.train, "report": report, "model": out}[which]
    result = _run("compress", digits_sample.model, "-o", out, "--data", digits_sample.train, "--report", report,
                  "--html", html, "--epochs", "1")
    assert result.exit_code == 1 and len(result.output.splitlines()) == 1, result.output
    assert f"the HTML report {html}" in result.output
    assert list(tmp_path.iterdir()) == []


def test_chromium_draws_the_page(run, tmp_path):
    """The page as a real browser draws it (skipped where Debian's chromium is not installed, as in CI)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "samples" / "report"))
    try:
        import screenshot
    finally:
        sys.path.pop(0)
    if screenshot.find_chromium() is None:
        pytest.skip("chromium is not installed")
    try:
        png = screenshot.screenshot(run["html"], tmp_path / "page.png", height=800, timeout=60)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        pytest.fail(str(exc))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_compress_html_is_written_when_the_gate_fails(digits_sample, tmp_path):
    """Like the JSON report, the page is written for a run that fails the gate, and says so."""
    out, html = tmp_path / "out.onnx", tmp_path / "page.html"
    result = _run("compress", digits_sample.model, "-o", out, "--data", digits_sample.train, "--sparsity", "0.995",
                  "--stages", "1", "--admm-epochs", "0", "--retrain-epochs", "1", "--threads", "1",
                  "--metric-floor", "0.999", "--html", html, "-q")
    assert result.exit_code == 3, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gate-failed.onnx", "page.html"]
    gate = _section(html.read_text(), "gate")
    assert '<b class="fail">failed</b>' in gate and "out.gate-failed.onnx" in gate and "99.9%" in gate


def test_a_second_heads_figure_is_shown_beside_the_task_metric(report):
    report["metrics"]["task"] = {**report["metrics"]["task"], "others": {"det_prob": 0.25}}
    page = render(report)
    assert ('beside it: positive-set F1 on &#x27;det_prob&#x27;</td><td class="n">100.00%</td><td class="n">25.00%'
            in page)
