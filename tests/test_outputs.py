"""No run destroys a user's file: outputs that are inputs or each other are refused before any work,
every output location is checked, temporary files live beside their target under one prefix and go
away (stale ones of dead processes included), and a write that fails after training says what was kept.

Every model here is a tiny Gemm graph (``test_cli_hostile``), so a run that gets as far as training
takes about a second; most cases are refused before it.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from onnx_admm.converters import modelio
from onnx_admm.converters.errors import UserError
from onnx_admm.converters.modelio import TEMP_PREFIX, save_json, temp_prefix
from exporter_models import op_model
from onnx_admm import api, preflight
from onnx_admm.api import compress
from onnx_admm.cli import main
from onnx_admm.recipe import CompressConfig
from test_cli import _assert_one_line_error
from test_cli_hostile import QUICK, B, W, X, _gemm, _npz

QUICK_CONFIG = CompressConfig().replace(prune={"sparsity": 0.5}, admm={"epochs": 1, "retrain_epochs": 1},
                                        train={"threads": 1})


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _snapshot(folder: Path) -> dict[str, bytes | str]:
    return {p.name: os.readlink(p) if p.is_symlink() else p.read_bytes() for p in sorted(folder.iterdir())
            if p.is_symlink() or p.is_file()}


@pytest.fixture
def files(tmp_path):
    """model.onnx, ext.onnx (weights in ext.weights), train.npz, val.npz, recipe.toml, a symlink, a hard link,
    models named like a stage file and like a gate-failed model, and a FIFO."""
    _gemm(tmp_path)
    onnx.save(op_model("(float[N, 4] x) => (float[N, 10] y)", "y = Gemm (x, W, B)", 17, {"W": W, "B": B}),
              str(tmp_path / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.weights", size_threshold=0)
    _npz(tmp_path, "train.npz", x=X)
    _npz(tmp_path, "val.npz", x=X)
    (tmp_path / "recipe.toml").write_text("[train]\nseed = 1\n")
    (tmp_path / "link.onnx").symlink_to("model.onnx")
    os.link(tmp_path / "model.onnx", tmp_path / "hard.onnx")
    _gemm(tmp_path, "o.stage1.onnx")
    _gemm(tmp_path, "o.gate-failed.onnx")
    os.mkfifo(tmp_path / "fifo")
    return tmp_path


# (model, arguments, fragment of the one-line error); {d} is the folder; -o {d}/o.onnx unless given.
COLLISIONS = [
    ("model.onnx", ["-o", "{d}/model.onnx"], "the output {d}/model.onnx is the same file as the model {d}/model.onnx"),
    ("model.onnx", ["-o", "{d}/sub/../model.onnx"], "is the same file as the model"),
    ("model.onnx", ["-o", "{d}/link.onnx"], "is the same file as the model"),  # a symlink to the model
    ("hard.onnx", ["-o", "{d}/model.onnx"], "is the same file as the model {d}/hard.onnx"),  # a hard link
    ("link.onnx", ["-o", "{d}/model.onnx"], "is the same file as the model {d}/link.onnx"),
    ("model.onnx", ["-o", "{d}/train.npz"], "the output {d}/train.npz is the same file as the training data"),
    ("model.onnx", ["--val-data", "{d}/val.npz", "-o", "{d}/val.npz"], "is the same file as the validation data"),
    ("model.onnx", ["--recipe", "{d}/recipe.toml", "--report", "{d}/recipe.toml"],
     "the report {d}/recipe.toml is the same file as the recipe"),
    ("ext.onnx", ["-o", "{d}/ext.weights"], "is the same file as the model's external data {d}/ext.weights"),
    ("model.onnx", ["--report", "{d}/train.npz"], "the report {d}/train.npz is the same file as the training data"),
    ("model.onnx", ["--report", "{d}/o.onnx"], "the output {d}/o.onnx and the report {d}/o.onnx are the same path"),
    ("model.onnx", ["--report", "{d}/o.onnx.data"], "the output's external data {d}/o.onnx.data and the report"),
    ("model.onnx", ["--save-stages", "{d}/o.onnx"], "and the --save-stages folder {d}/o.onnx are the same path"),
    ("o.stage1.onnx", ["--save-stages", "{d}"], "would write a stage file named like the model {d}/o.stage1.onnx"),
    ("model.onnx", ["--save-stages", "{d}", "--report", "{d}/o.stage2.onnx"], "named like the report"),
    ("o.gate-failed.onnx", ["--max-accuracy-drop", "0.1"],
     "the gate-failed model {d}/o.gate-failed.onnx is the same file as the model"),
    ("model.onnx", ["--report", "{d}/reports/"], "the report path {d}/reports/ ends in '/', which names a folder"),
    ("model.onnx", ["--report", "{d}/fifo"], "the report {d}/fifo exists and is not a regular file"),
    ("model.onnx", ["-o", "{d}/fifo"], "the output {d}/fifo exists and is not a regular file"),
]


@pytest.mark.parametrize("model, args, fragment", COLLISIONS, ids=[f"{m}{' '.join(a)}" for m, a, _ in COLLISIONS])
def test_outputs_that_would_overwrite_an_input_or_each_other_are_refused(files, model, args, fragment):
    before = _snapshot(files)
    args = [a.format(d=files) for a in args]
    if "-o" not in args:
        args = ["-o", files / "o.onnx", *args]
    result = _run("compress", files / model, "--data", files / "train.npz", *QUICK, *args)
    _assert_one_line_error(result, fragment.format(d=files))
    assert _snapshot(files) == before  # nothing written, nothing changed


@pytest.mark.parametrize("report", ["data", "compressed"])
def test_validate_refuses_a_report_over_its_inputs(files, report):
    before = _snapshot(files)
    target = {"data": files / "val.npz", "compressed": files / "ext.onnx"}[report]
    result = _run("validate", files / "model.onnx", files / "ext.onnx", "--data", files / "val.npz", "--report", target)
    label = {"data": "the data", "compressed": "the compressed model"}[report]
    _assert_one_line_error(result, f"the report {target} is the same file as {label} {target}")
    assert _snapshot(files) == before


def test_validate_report_path_ending_in_a_slash_is_refused(files):
    result = _run("validate", files / "model.onnx", files / "model.onnx", "--data", files / "val.npz",
                  "--report", f"{files}/r/")
    _assert_one_line_error(result, "ends in '/', which names a folder")
    assert not (files / "r").exists()


def test_read_only_report_file_is_refused_before_training(files, monkeypatch):
    # As root every file is writable whatever its mode, so the refusal is simulated.
    report = files / "r.json"
    report.write_text("{}")
    real = os.access
    monkeypatch.setattr(preflight.os, "access",
                        lambda path, mode: real(path, mode) and not (Path(path) == report and mode == os.W_OK))
    result = _run("compress", files / "model.onnx", "-o", files / "o.onnx", "--data", files / "train.npz", *QUICK,
                  "--report", report)
    _assert_one_line_error(result, f"the report {report} is read-only")
    assert not (files / "o.onnx").exists() and report.read_text() == "{}"


def test_report_that_cannot_be_written_after_training_keeps_the_model_and_says_so(tmp_path, monkeypatch):
    real = modelio.Staged.json

    def refuse(self, data, target):
        if target.name == "r.json":
            raise PermissionError(errno.EACCES, "Permission denied", str(target))
        return real(self, data, target)

    monkeypatch.setattr(modelio.Staged, "json", refuse)
    model, data, out = _gemm(tmp_path), _npz(tmp_path, x=X), tmp_path / "out" / "o.onnx"
    result = _run("compress", model, "-o", out, "--data", data, *QUICK, "--report", tmp_path / "r.json")
    _assert_one_line_error(result, f"the compressed model is saved to {out}, but writing {tmp_path / 'r.json'} "
                                   "failed: Permission denied")
    assert out.is_file() and not (tmp_path / "r.json").exists()
    assert [p.name for p in out.parent.iterdir()] == ["o.onnx"]  # no temporary left


def test_run_validates_beside_the_output_and_leaves_no_temporary(tmp_path, monkeypatch, system_temp):
    seen = []
    from onnx_admm.pipeline import report as report_step

    real = report_step.validate

    def recording(original, compressed, *args, **kwargs):
        seen.append((Path(compressed), system_temp()))
        return real(original, compressed, *args, **kwargs)

    monkeypatch.setattr(report_step, "validate", recording)
    model, data, out = _gemm(tmp_path), _npz(tmp_path, x=X), tmp_path / "out" / "o.onnx"
    result = _run("compress", model, "-o", out, "--data", data, *QUICK, "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    (staged, in_system), = seen
    assert staged.name == "o.onnx" and staged.parent.name.startswith(temp_prefix())
    assert staged.parent.parent == out.parent and in_system == []
    assert [p.name for p in out.parent.iterdir()] == ["o.onnx"] and system_temp() == []


def _pid_that_cannot_exist() -> int:
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    except OSError:
        return 2**31 - 1


def test_stale_temporaries_of_dead_processes_are_removed_by_a_later_write(tmp_path):
    host = temp_prefix()[len(TEMP_PREFIX):].rsplit("-", 2)[0]
    dead = tmp_path / f"{TEMP_PREFIX}{host}-{_pid_that_cannot_exist()}-abc123"
    kept = [tmp_path / f"{TEMP_PREFIX}{host}-{os.getpid()}-live1", tmp_path / f"{TEMP_PREFIX}otherhost-1-xyz",
            tmp_path / ".onnx-admm-unrelated", tmp_path / f"{TEMP_PREFIX}garbage"]
    for folder in (dead, *kept):
        folder.mkdir()
        (folder / "out.onnx").write_bytes(b"half a model")
    save_json({"a": 1}, tmp_path / "x.json")
    assert not dead.exists() and all(p.exists() for p in kept)
    assert (tmp_path / "x.json").read_text() == '{\n  "a": 1\n}\n'


# --- the Python API ---


def test_api_refuses_an_output_that_is_an_input(files):
    before = _snapshot(files)
    for output, label in ((files / "model.onnx", "the model"), (files / "train.npz", "the training data"),
                          (files / "ext.weights", "the model's external data")):
        model = files / ("ext.onnx" if output.name == "ext.weights" else "model.onnx")
        with pytest.raises(UserError, match=f"is the same file as {label}"):
            compress(model, files / "train.npz", QUICK_CONFIG, output=output)
    assert _snapshot(files) == before


def test_api_output_folder_and_save_follow_the_cli_rules(files):
    result = compress(files / "model.onnx", files / "train.npz", QUICK_CONFIG, output=f"{files}/newdir/")
    assert result.files == [files / "newdir" / "model.admm.onnx"] and result.files[0].is_file()
    assert result.report["output"] == str(files / "newdir" / "model.admm.onnx")
    assert result.save(f"{files}/other/") == [files / "other" / "model.admm.onnx"]
    before = _snapshot(files)
    with pytest.raises(UserError, match="is the same file as the training data"):
        result.save(files / "train.npz")
    with pytest.raises(UserError, match="is the same file as the model"):
        result.save(files / "link.onnx")
    assert _snapshot(files) == before


def test_api_gate_failure_raises_after_writing_the_failing_name(files):
    with pytest.raises(api.AccuracyGateFailed) as info:
        compress(files / "model.onnx", files / "train.npz", QUICK_CONFIG.replace(prune={"sparsity": 0.95}),
                 output=files / "g.onnx", max_accuracy_drop=0.0)
    assert info.value.saved == files / "g.gate-failed.onnx" and info.value.saved.is_file()
    assert not (files / "g.onnx").exists() and info.value.result.report["gate"]["passed"] is False


def test_reports_are_strict_json_without_nan_or_infinity(tmp_path):
    from onnx_admm.converters.modelio import save_json

    path = save_json({"loss": float("nan"), "ratio": float("inf"), "ok": 1.5,
                      "history": [{"residual": float("-inf")}, (2.0, float("nan"))]}, tmp_path / "r.json")
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"loss": None, "ratio": None, "ok": 1.5, "history": [{"residual": None}, [2.0, None]]}
