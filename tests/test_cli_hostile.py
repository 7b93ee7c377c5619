"""Hostile and odd inputs from real models in the wild: each gives a one-line error and exit 1, or works.

Every model and data file is generated here (tiny Gemm graphs, so a compress run takes about a second):
batch dims written as -1 (paddle2onnx), a fixed batch of 1 that the batch rules cannot follow (a
Concat or a Reshape carrying the batch), non-finite data, hyper-parameters and weights, labels out of
range, external data outside the model's folder, unwritable output paths, loader plugins that raise,
binary recipes, bad devices and seeds, ops onnx2torch cannot convert.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from exporter_models import op_model
from onnx_admm.cli import main
from test_cli import _assert_one_line_error

RNG = np.random.default_rng(0)
W = RNG.normal(size=(4, 10)).astype(np.float32)
B = RNG.normal(size=10).astype(np.float32)
X = RNG.normal(size=(90, 4)).astype(np.float32)
LABELS = RNG.integers(0, 10, 90)
QUICK = ("--sparsity", "0.5", "--admm-epochs", "1", "--retrain-epochs", "1", "--threads", "1", "-q")


def _run(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def _gemm(tmp_path, name="model.onnx", signature="(float[N, 4] x) => (float[N, 10] y)", body="y = Gemm (x, W, B)"):
    path = tmp_path / name
    onnx.save(op_model(signature, body, 17, {"W": W, "B": B}), str(path))
    return path


def _npz(tmp_path, name="train.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _compress(model, data, out, *args):
    return _run("compress", model, "-o", out, "--data", data, *QUICK, *args)


def _external_data_model(path, location: str):
    """The Gemm model saved at ``path`` with its weight W pointing at external data ``location``."""
    model = op_model("(float[N, 4] x) => (float[N, 10] y)", "y = Gemm (x, W, B)", 17, {"W": W, "B": B})
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    onnx.save(model, str(path))
    return path


# ----------------------------------------------------------------------------------------------
# Batch conventions
# ----------------------------------------------------------------------------------------------


def _negative_batch_model(tmp_path):
    model = op_model("(float[N, 4] x) => (float[N, 10] y)", "y = Gemm (x, W, B)", 17, {"W": W, "B": B})
    for value in (model.graph.input[0], model.graph.output[0]):
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = -1  # how paddle2onnx writes a dynamic batch
    path = tmp_path / "neg.onnx"
    onnx.save(model, str(path))
    return path


def test_minus_one_batch_checks_compresses_and_validates(tmp_path):
    model, data = _negative_batch_model(tmp_path), _npz(tmp_path, x=X, labels=LABELS)
    assert _run("check", model).exit_code == 0
    assert _run("check", model, "--data", data).exit_code == 0
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    result = _compress(model, data, out, "--report", report)
    assert result.exit_code == 0, result.output
    batch = json.loads(report.read_text())["batch"]
    assert batch["mode"] == "dynamic" and batch["validation_batch"] == 64
    assert onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == -1  # graph I/O kept
    result = _run("validate", model, out, "--data", data)
    assert result.exit_code == 0 and "validation on 90 samples, batch 64" in result.output, result.output


def test_fixed_batch_through_a_concat_trains_at_that_batch(tmp_path):
    # The batch of 1 is concatenated on: no rule can follow it, so the graph keeps batch 1.
    model = _gemm(tmp_path, "concat.onnx", "(float[1, 4] x) => (float[2, 10] y)",
                  "h = Gemm (x, W, B)\n y = Concat <axis = 0> (h, h)")
    data = _npz(tmp_path, x=X)
    check = _run("check", model)
    assert check.exit_code == 0, check.output
    assert "runs only at its fixed batch 1 (the batch axis cannot be followed through node 'Concat_1_unnamed'" in check.output
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    result = _compress(model, data, out, "--report", report, "--batch-size", "16")
    assert result.exit_code == 0, result.output
    batch = json.loads(report.read_text())["batch"]
    assert batch["mode"] == "fixed" and batch["graph_batch"] == 1 and batch["validation_batch"] == 1
    assert "accumulating the gradients of 16 samples in chunks of 1" in batch["note"]
    assert "Concat_1_unnamed" in batch["note"]


def test_batch_one_with_seq_first_output_checks_on_given_data(tmp_path):
    # A CRNN exported with batch 1: the Reshape merges the batch away, the output is seq-first [T, 1, C].
    model = _gemm(tmp_path, "crnn.onnx", "(float[1, T, 4] x) => (float[T, 1, 10] y)", """
        t = Transpose <perm = [1, 0, 2]> (x)
        s = Constant <value = int64[2] {-1, 4}> ()
        r = Reshape (t, s)
        h = MatMul (r, W)
        h2 = Add (h, B)
        a = Constant <value = int64[1] {1}> ()
        y = Unsqueeze (h2, a)""")
    data = _npz(tmp_path, x=RNG.normal(size=(8, 5, 4)).astype(np.float32))
    result = _run("check", model, "--data", data)
    assert result.exit_code == 0, result.output
    assert "torch and onnxruntime run in chunks of 1, checked on the given inputs" in result.output


def test_check_refuses_to_synthesize_inputs_of_an_absurd_declared_shape(tmp_path):
    # [N, 1, 1e6, 1e6] floats at batch 2: 7,450 GiB that numpy would try to allocate.
    kernel = RNG.normal(size=(1, 1, 3, 3)).astype(np.float32)
    model = op_model("(float[N, 1, 1000000, 1000000] x) => (float[N, 1, 999998, 999998] y)", "y = Conv (x, K)", 17,
                     {"K": kernel})
    path = tmp_path / "huge.onnx"
    onnx.save(model, str(path))
    _assert_one_line_error(_run("check", path), "graph input 'x' [N, 1, 1000000, 1000000] would be synthesized as "
                           "[2, 1, 1000000, 1000000] float32 (7,450.6 GiB", "pass real inputs with --data",
                           "or fix the declared shape")


def test_fixed_batch_two_pads_the_last_chunk():
    from onnx_admm.converters.importer import import_model

    # Einsum has no batch rule: the graph keeps batch 2, and its output has the batch on axis 0.
    model = op_model("(float[2, 4] x) => (float[2, 10] y)", 'h = Gemm (x, W, B)\n y = Einsum <equation = "ij->ij"> (h)',
                     17, {"W": W, "B": B})
    imported = import_model(model)
    assert imported.fixed_batch == 2 and imported.batch_axes == {"x": 0, "y": 0}
    # Chunks [0:2], [2:4] and [4:5] padded to 2 with a copy of sample 4, whose output is dropped.
    got = imported.run({"x": X[:5]})[0]
    np.testing.assert_allclose(got, X[:5] @ W + B, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# No lost work: output written before anything that can fail after training
# ----------------------------------------------------------------------------------------------


def test_failure_after_training_keeps_the_saved_model_and_names_it(tmp_path, monkeypatch):
    from onnx_admm.pipeline import commit

    def broken(*args, **kwargs):
        raise RuntimeError("validation exploded")

    monkeypatch.setattr(commit, "build_report", broken)
    model, data = _gemm(tmp_path), _npz(tmp_path, x=X)
    out = tmp_path / "sub" / "out.onnx"
    result = _compress(model, data, out)
    _assert_one_line_error(result, f"the compressed model is saved to {out}", "RuntimeError: validation exploded")
    assert out.is_file()
    onnx.checker.check_model(str(out))


def test_output_folder_with_trailing_slash_gets_the_model_name(tmp_path):
    model, data = _gemm(tmp_path), _npz(tmp_path, x=X)
    result = _compress(model, data, f"{tmp_path / 'newdir'}/")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "newdir" / "model.admm.onnx").is_file()


@pytest.mark.parametrize("flag", ["-o", "--report", "--save-stages"])
def test_unwritable_paths_fail_before_training(tmp_path, flag):
    model, data = _gemm(tmp_path), _npz(tmp_path, x=X)
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    out = tmp_path / "out.onnx"
    args = {"-o": ["-o", blocker / "out.onnx"], "--report": ["-o", out, "--report", blocker / "r.json"],
            "--save-stages": ["-o", out, "--save-stages", blocker / "stages"]}[flag]
    result = _run("compress", model, "--data", data, *QUICK, *args)
    _assert_one_line_error(result, f"{blocker} is a file, not a folder")
    assert not out.exists()


def test_report_path_that_is_a_folder_fails_before_training(tmp_path):
    model, data, out = _gemm(tmp_path), _npz(tmp_path, x=X), tmp_path / "out.onnx"
    (tmp_path / "rdir").mkdir()
    result = _compress(model, data, out, "--report", tmp_path / "rdir")
    assert result.exit_code == 2 and "Invalid value for '--report'" in result.output  # click's usage error
    assert "is a directory" in result.output and not out.exists()


def test_read_only_folder_fails_before_training(tmp_path, monkeypatch):
    # As root no folder is read-only by its mode bits, so the refusal of the file system is simulated.
    from onnx_admm import preflight

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(preflight.tempfile, "mkstemp", refuse)
    model, data = _gemm(tmp_path), _npz(tmp_path, x=X)
    result = _compress(model, data, tmp_path / "ro" / "out.onnx")
    _assert_one_line_error(result, f"cannot write the output {tmp_path / 'ro' / 'out.onnx'}: folder {tmp_path} is not "
                                   "writable (Read-only file system)")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder whatever its mode")
def test_read_only_folder_by_mode_fails_before_training(tmp_path):
    model, data = _gemm(tmp_path), _npz(tmp_path, x=X)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        _assert_one_line_error(_compress(model, data, ro / "out.onnx"), f"folder {ro} is not writable")
    finally:
        ro.chmod(0o700)


@pytest.fixture
def fifo(tmp_path):
    """A named pipe. Opening it to read blocks until a writer comes: should onnx-admm ever open it, a writer
    comes after 30 s so the test fails instead of hanging."""
    path = tmp_path / "fifo"
    os.mkfifo(path)
    done = threading.Event()

    def unblock():
        if not done.wait(30):
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # nobody is reading it
                pass

    threading.Thread(target=unblock, daemon=True).start()
    yield path
    done.set()


FIFO_INPUTS = {
    "compress MODEL": lambda m, d, f, o: ["compress", f, "-o", o, "--data", d, *QUICK],
    "compress --recipe": lambda m, d, f, o: ["compress", m, "-o", o, "--data", d, "--recipe", f, *QUICK],
    "compress --data": lambda m, d, f, o: ["compress", m, "-o", o, "--data", f, *QUICK],
    "compress --val-data": lambda m, d, f, o: ["compress", m, "-o", o, "--data", d, "--val-data", f, *QUICK],
    "check MODEL": lambda m, d, f, o: ["check", f],
    "check --data": lambda m, d, f, o: ["check", m, "--data", f],
    "inspect MODEL": lambda m, d, f, o: ["inspect", f],
    "validate ORIGINAL": lambda m, d, f, o: ["validate", f, m, "--data", d, "--report", o.with_suffix(".json")],
    "validate COMPRESSED": lambda m, d, f, o: ["validate", m, f, "--data", d],
    "validate --data": lambda m, d, f, o: ["validate", m, m, "--data", f],
}


@pytest.mark.parametrize("where", list(FIFO_INPUTS))
def test_fifo_as_an_input_is_refused_without_opening_it(tmp_path, fifo, where):
    model, data, out = _gemm(tmp_path), _npz(tmp_path, x=X), tmp_path / "out.onnx"
    result = _run(*FIFO_INPUTS[where](model, data, fifo, out))
    _assert_one_line_error(result, f"{fifo} is a FIFO (named pipe), not a regular file; pass ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "model.onnx", "train.npz"]


def test_fifo_as_external_data_is_refused_without_opening_it(tmp_path, fifo):
    path = _external_data_model(tmp_path / "piped.onnx", "fifo")
    _assert_one_line_error(_run("check", path), f"external data file {fifo} is a FIFO (named pipe), not a regular file")


@pytest.mark.parametrize("flag", ["-o", "--report", "validate --report"])
def test_read_only_file_by_mode_is_refused_even_for_root(tmp_path, flag):
    # os.access says every file is writable for root (the suite runs as root here): the mode bits decide.
    model, data, out = _gemm(tmp_path), _npz(tmp_path, x=X), tmp_path / "out.onnx"
    target = tmp_path / ("ro.onnx" if flag == "-o" else "ro.json")
    target.write_text("keep me")
    target.chmod(0o444)
    if flag == "validate --report":
        result = _run("validate", model, model, "--data", data, "--report", target)
    else:
        result = _run("compress", model, "--data", data, *QUICK, *(["-o", target] if flag == "-o" else
                                                                    ["-o", out, "--report", target]))
    label = "the output" if flag == "-o" else "the report"
    _assert_one_line_error(result, f"{label} {target} is read-only; make it writable or choose another path")
    assert target.read_text() == "keep me" and target.stat().st_mode & 0o777 == 0o444
    assert not out.exists()


@pytest.mark.parametrize("flag", ["-o", "--report", "--save-stages", "validate --report"])
def test_file_name_too_long_is_one_line(tmp_path, flag):
    model, data, out = _gemm(tmp_path), _npz(tmp_path, x=X), tmp_path / "out.onnx"
    long = tmp_path / ("a" * 256 + ".onnx")  # one name over the 255 bytes of most file systems
    if flag == "validate --report":
        result = _run("validate", model, model, "--data", data, "--report", long)
    else:
        result = _run("compress", model, "--data", data, *QUICK, *(["-o", long] if flag == "-o" else
                                                                    ["-o", out, flag, long]))
    label = {"-o": "the output", "--save-stages": "the --save-stages folder"}.get(flag, "the report")
    _assert_one_line_error(result, f"cannot write {label} {long}: File name too long; choose a shorter name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "train.npz"]


@pytest.mark.parametrize("flag", ["MODEL", "--data", "--recipe"])
def test_input_name_too_long_is_one_line(tmp_path, flag):
    model, data, out = _gemm(tmp_path), _npz(tmp_path, x=X), tmp_path / "out.onnx"
    long = tmp_path / ("a" * 256 + ".npz")
    args = {"MODEL": [long, "--data", data], "--data": [model, "--data", long],
            "--recipe": [model, "--data", data, "--recipe", long]}[flag]
    what = {"MODEL": "model", "--data": "data file", "--recipe": "recipe"}[flag]
    _assert_one_line_error(_run("compress", *args, "-o", out, *QUICK), f"cannot read {what} {long}: File name too long")
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# Non-finite values, labels out of range, rollbacks
# ----------------------------------------------------------------------------------------------


def _with_nan(array):
    bad = array.copy()
    bad[3, 1] = np.nan
    return bad


@pytest.mark.parametrize("where", ["--data", "--val-data"])
def test_nan_in_data_is_an_input_error(tmp_path, where):
    model, out = _gemm(tmp_path), tmp_path / "out.onnx"
    good, bad = _npz(tmp_path, "good.npz", x=X), _npz(tmp_path, "bad.npz", x=_with_nan(X))
    train, val = (bad, good) if where == "--data" else (good, bad)
    result = _compress(model, train, out, "--val-data", val)
    _assert_one_line_error(result, f"{bad}: input 'x' holds 1 NaN or infinite value(s)")
    assert not out.exists()


def test_inf_in_a_plugin_batch_is_an_input_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "x.npy", X)
    (tmp_path / "inf_plugin.py").write_text(textwrap.dedent("""
        import numpy as np
        def batches():
            x = np.load("x.npy")
            yield {"x": x[:40]}
            x[50, 0] = np.inf
            yield {"x": x[40:]}
    """))
    model, out = _gemm(tmp_path), tmp_path / "out.onnx"
    result = _compress(model, "inf_plugin:batches", out)
    _assert_one_line_error(result, "loader plugin 'inf_plugin:batches' (item 2): input 'x' holds 1 NaN or infinite")
    assert not out.exists()


@pytest.mark.parametrize("flags, recipe, message", [
    (["--lr", "inf"], "", "train.lr must be a finite number, got inf"),
    ([], "[train]\nweight_decay = nan\n", "train.weight_decay must be a finite number, got nan"),
    ([], "[admm]\nrho_max = inf\n", "admm.rho_max must be a finite number, got inf"),
    ([], "[admm]\nperiod = inf\n", "admm.period must be a whole number of epochs, or a fraction below 1"),
    ([], "[admm]\nperiod = nan\n", "admm.period must be a whole number of epochs, or a fraction below 1"),
    ([], "[admm]\nperiod = -inf\n", "got -inf"),
    ([], '[train]\ndevice = "gpu0"\n', "train.device must be 'cpu' or 'cuda[:N]', got 'gpu0'"),
    (["--seed", "-1"], "", "train.seed must be an integer in [0, 4294967295], got -1"),
    (["--seed", str(2**70)], "", f"train.seed must be an integer in [0, 4294967295], got {2**70}"),
    (["--max-accuracy-drop", "nan"], "", "max_accuracy_drop must be a finite fraction >= 0 (0.01 = 1 point), got nan"),
    (["--max-accuracy-drop", "inf"], "", "max_accuracy_drop must be a finite fraction >= 0 (0.01 = 1 point), got inf"),
    (["--threads", "100000"], "", f"train.threads must be an integer from 1 to {4 * os.cpu_count()} (4 per CPU"),
    ([], "[train]\nthreads = 100000\n", "got 100000; one per core is usually fastest"),
])
def test_bad_hyper_parameters_fail_before_training(tmp_path, flags, recipe, message):
    model, data, out = _gemm(tmp_path), _npz(tmp_path, x=X), tmp_path / "out.onnx"
    path = tmp_path / "r.toml"
    path.write_text(recipe)
    _assert_one_line_error(_compress(model, data, out, "--recipe", path, *flags), message)
    assert not out.exists()


def test_validate_refuses_absurd_thread_counts(tmp_path):
    model, data = _gemm(tmp_path), _npz(tmp_path, x=X)
    _assert_one_line_error(_run("validate", model, model, "--data", data, "--threads", 100000),
                           f"threads (--threads) must be an integer from 1 to {4 * os.cpu_count()}")


def _assert_usage_error(result, option: str, *fragments: str) -> None:
    """Click's usage error: exit 2, no traceback, one ``Error:`` line naming the option and the fix."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and f"Invalid value for {option}:" in errors[0], result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def _gpus(monkeypatch, count: int) -> None:
    """Pretend this machine has ``count`` GPUs (none: CUDA unavailable); nothing here touches a GPU."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("gpus, device, message", [
    (0, "cudax", "device 'cudax' is not 'cpu', 'cuda' or 'cuda:N'"),
    (0, "cuda", "device 'cuda' requested but CUDA is not available ("),
    (0, "cuda:0", "; use --device cpu"),
    (1, "cuda:1", "device 'cuda:1' requested but this machine has 1 CUDA device(s) (cuda:0 to cuda:0); pick one"),
])
def test_a_device_the_machine_lacks_is_a_usage_error_before_anything_runs(tmp_path, monkeypatch, gpus, device, message):
    _gpus(monkeypatch, gpus)
    model, data, out = _gemm(tmp_path), _npz(tmp_path, x=X), tmp_path / "out.onnx"
    _assert_usage_error(_compress(model, data, out, "--device", device), "--device", message)
    assert not out.exists()


def test_the_cuda_message_tells_a_cpu_only_torch_from_a_missing_gpu(monkeypatch):
    import torch

    from onnx_admm.converters.errors import UserError
    from onnx_admm.preflight import check_device

    _gpus(monkeypatch, 0)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(UserError, match=r"\(this torch is a CPU-only build\); use --device cpu"):
        check_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(UserError, match=r"torch \(CUDA 12.8\) finds no GPU: check the driver and CUDA_VISIBLE_DEVICES"):
        check_device("cuda")
    check_device("cpu")  # always there


@pytest.mark.parametrize("device, local_rank, message", [
    ("cuda:0", 0, "device 'cuda:0' would put all 2 processes on one GPU; pass --device cuda"),
    ("cuda", 1, "process LOCAL_RANK 1 needs cuda:1 but this machine has 1 CUDA device(s); start at most 1"),
])
def test_under_torchrun_each_process_needs_a_gpu_of_its_own(tmp_path, monkeypatch, device, local_rank, message):
    _gpus(monkeypatch, 1)
    for key, value in {"WORLD_SIZE": "2", "RANK": str(local_rank), "LOCAL_RANK": str(local_rank)}.items():
        monkeypatch.setenv(key, value)
    model, data, out = _gemm(tmp_path), _npz(tmp_path, x=X), tmp_path / "out.onnx"
    _assert_usage_error(_compress(model, data, out, "--device", device), "--device", message)
    assert not out.exists()


def test_a_recipe_device_the_machine_lacks_fails_in_one_line_before_training(tmp_path, monkeypatch):
    # The recipe is an input file, not an option: exit 1, from the API's own check (the same one).
    _gpus(monkeypatch, 0)
    model, data, out = _gemm(tmp_path), _npz(tmp_path, x=X), tmp_path / "out.onnx"
    recipe = tmp_path / "r.toml"
    recipe.write_text('[train]\ndevice = "cuda"\n')
    _assert_one_line_error(_compress(model, data, out, "--recipe", recipe),
                           "device 'cuda' requested but CUDA is not available (", "use --device cpu")
    assert not out.exists()


def test_binary_recipe_is_one_line(tmp_path):
    model, data, out = _gemm(tmp_path), _npz(tmp_path, x=X), tmp_path / "out.onnx"
    recipe = tmp_path / "bin.toml"
    recipe.write_bytes(b"\xff\xfe\x00\x81\x9c binary")
    _assert_one_line_error(_compress(model, data, out, "--recipe", recipe), f"recipe {recipe} is not UTF-8 text")


def test_nan_weight_is_an_input_error(tmp_path):
    bad = W.copy()
    bad[0, 0] = np.nan
    path = tmp_path / "nanw.onnx"
    onnx.save(op_model("(float[N, 4] x) => (float[N, 10] y)", "y = Gemm (x, W, B)", 17, {"W": bad, "B": B}), str(path))
    out = tmp_path / "out.onnx"
    _assert_one_line_error(_compress(path, _npz(tmp_path, x=X), out), "the model's tensor 'W' holds 1 NaN or infinite")
    assert not out.exists()


def test_every_phase_diverging_is_a_failure(tmp_path):
    # A finite but absurd learning rate: the second batch of each phase has a NaN loss.
    model, data, out = _gemm(tmp_path), _npz(tmp_path, x=X), tmp_path / "out.onnx"
    result = _compress(model, data, out, "--lr", "3e38", "--batch-size", "8")
    _assert_one_line_error(result, "training diverged in every phase", "nothing was written", "lower train.lr (now 3e+38)")
    assert not out.exists()


@pytest.mark.parametrize("label", [107, -1])
@pytest.mark.parametrize("where", ["--data", "--val-data", "validate"])
def test_labels_out_of_range(tmp_path, label, where):
    model, out = _gemm(tmp_path), tmp_path / "out.onnx"
    labels = LABELS.copy()
    labels[5] = label
    good, bad = _npz(tmp_path, "good.npz", x=X, labels=LABELS), _npz(tmp_path, "bad.npz", x=X, labels=labels)
    if where == "validate":
        result = _run("validate", model, model, "--data", bad)
    else:
        train, val = (bad, good) if where == "--data" else (good, bad)
        result = _compress(model, train, out, "--val-data", val)
    fragment = ("but the model's score output has 10 classes (ids 0 to 9)" if label == 107
                else "'labels' holds -1, but class ids start at 0")
    _assert_one_line_error(result, fragment)
    assert not out.exists()


@pytest.mark.parametrize("label", [2**63 + 5, 2**64 - 1, 2**63 - 1])
def test_uint64_labels_above_any_class_id(tmp_path, label):
    # Above 2^63 a uint64 label would wrap to a negative int64 after a check in the signed domain.
    labels = LABELS.astype(np.uint64)
    labels[5] = label
    out = tmp_path / "out.onnx"
    result = _compress(_gemm(tmp_path), _npz(tmp_path, x=X, labels=labels), out)
    fragment = ("but the model's score output has 10 classes" if label < 2**63
                else f"'labels' holds {label}, too large for any class id")
    _assert_one_line_error(result, fragment)
    assert not out.exists()


def test_labels_out_of_range_in_a_plugin_batch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "label_plugin.py").write_text(textwrap.dedent("""
        import numpy as np
        def batches():
            rng = np.random.default_rng(0)
            yield {"x": rng.normal(size=(70, 4)).astype(np.float32), "labels": np.full(70, 3)}
            yield {"x": rng.normal(size=(20, 4)).astype(np.float32), "labels": np.full(20, 107)}
    """))
    val = _npz(tmp_path, "val.npz", x=X, labels=LABELS)
    result = _compress(_gemm(tmp_path), "label_plugin:batches", tmp_path / "out.onnx", "--val-data", val)
    _assert_one_line_error(result, "loader plugin 'label_plugin:batches' (item 2): 'labels' holds 107")


# ----------------------------------------------------------------------------------------------
# Loader plugins that raise, external data outside the folder, unconvertible ops
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("when, where", [("at_once", "--data"), ("midway", "--data"), ("midway", "--val-data")])
def test_raising_plugin_is_one_line(tmp_path, monkeypatch, when, where):
    monkeypatch.chdir(tmp_path)
    module = f"raising_{when}_{where.strip('-').replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent("""
        import numpy as np
        def at_once():
            raise ValueError("no such bucket")
        def midway():
            yield {"x": np.ones((70, 4), np.float32)}
            raise ValueError("no such bucket")
    """))
    sys.modules.pop(module, None)
    plugin = f"{module}:{when}"
    data = plugin if where == "--data" else _npz(tmp_path, x=X)
    extra = ["--val-data", plugin] if where == "--val-data" else []
    result = _compress(_gemm(tmp_path), data, tmp_path / "out.onnx", *extra)
    after = "when called" if when == "at_once" else "after yielding 1 item(s)"
    _assert_one_line_error(result, f"loader plugin {plugin!r} raised ValueError: no such bucket {after}")


@pytest.mark.parametrize("when, code", [("at_import", 0), ("at_once", 0), ("midway", 0), ("midway", 3),
                                        ("midway", None), ("midway", "'bye'")])
def test_plugin_that_exits_is_the_plugins_error(tmp_path, monkeypatch, when, code):
    # SystemExit is no Exception: sys.exit(0) inside a plugin used to end the run with status 0, nothing written.
    monkeypatch.chdir(tmp_path)
    module = f"exiting_{when}_{abs(hash(str(code)))}"
    exit_call = f"sys.exit({'' if code is None else code})"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(f"""
        import sys
        import numpy as np
        {exit_call if when == "at_import" else ""}
        def at_import():
            yield {{"x": np.ones((70, 4), np.float32)}}
        def at_once():
            {exit_call}
        def midway():
            yield {{"x": np.ones((70, 4), np.float32)}}
            {exit_call}
    """))
    sys.modules.pop(module, None)
    out = tmp_path / "out.onnx"
    result = _compress(_gemm(tmp_path), f"{module}:{when}", out)
    shown = "None" if code is None else str(code)
    where = {"at_import": "when imported", "at_once": "when called", "midway": "after yielding 1 item(s)"}[when]
    _assert_one_line_error(result, f"loader plugin '{module}:{when}'", f"called sys.exit({shown}) {where}",
                           "must return or yield its batches, never exit the process")
    assert not out.exists()


@pytest.mark.parametrize("command", ["inspect", "check", "compress"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path, command):
    path = _external_data_model(tmp_path / "evil.onnx", "../../../../etc/passwd")
    args = [command, path] + (["-o", tmp_path / "o.onnx", "--data", _npz(tmp_path, x=X)] if command == "compress" else [])
    _assert_one_line_error(_run(*args), "external data location '../../../../etc/passwd' points outside the model's folder")


def test_unconvertible_op_is_passed_through_and_said_so(tmp_path):
    model = _gemm(tmp_path, "hardmax.onnx", body="h = Gemm (x, W, B)\n y = Hardmax (h)")
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    result = _run("compress", model, "-o", out, "--data", _npz(tmp_path, x=X), "--sparsity", "0.5",
                  "--admm-epochs", "1", "--retrain-epochs", "1", "--report", report)
    assert result.exit_code == 0, result.output
    assert ("trained: h; passed through unchanged: y (computed by nodes onnx-admm does not convert: node "
            "'Hardmax_1_unnamed': Hardmax (opset 17) has no converter)") in result.output
    data = json.loads(report.read_text())
    assert data["trained_outputs"] == ["h"] and data["passed_through"] == ["y"]


def test_graph_without_outputs_is_refused(tmp_path):
    model = op_model("(float[N, 4] x) => (float[N, 10] y)", "y = Gemm (x, W, B)", 17, {"W": W, "B": B})
    del model.graph.output[:]
    path, out = tmp_path / "no_outputs.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(path))
    _assert_one_line_error(_compress(path, _npz(tmp_path, x=X), out), "the model's graph declares no outputs",
                           "re-export the model with its outputs")
    assert not out.exists()


def test_nothing_compressible_left_fails(tmp_path):
    # The converted part trains only a bias: there is no weight to compress.
    model = op_model("(float[N, 4] x) => (float[N, 4] y)", "h = Add (x, bias)\n y = Hardmax (h)", 17,
                     {"bias": B[:4].copy()})
    path = tmp_path / "bias.onnx"
    onnx.save(model, str(path))
    out = tmp_path / "out.onnx"
    result = _compress(path, _npz(tmp_path, x=X), out)
    _assert_one_line_error(result, "the model has no compressible weight that onnx-admm can train",
                           "passes y through unconverted nodes")
    assert not out.exists()


# Runs the CLI with import_model patched to warn, as onnx2torch's converters and torch do (a UserWarning from
# the Slice converter, for one).
_WARNING_ENTRY = """
import sys, warnings
from onnx_admm import api
from onnx_admm.cli import main
real = api.import_model
def warning_import(*args, **kwargs):
    warnings.warn("a library's word of caution", UserWarning)
    return real(*args, **kwargs)
api.import_model = warning_import
main()
"""


def test_library_warnings_go_to_the_log_not_over_the_progress(tmp_path):
    # Printed raw ("file.py:12: UserWarning: ..."), such a line lands in the middle of the progress bars.
    out = tmp_path / "out.onnx"
    proc = subprocess.run([sys.executable, "-c", _WARNING_ENTRY, "-v", "compress", _gemm(tmp_path), "-o", out,
                           "--data", _npz(tmp_path, x=X), *QUICK], env=_child_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stderr.splitlines() if "UserWarning" in line]
    assert len(warned) == 1 and warned[0].startswith("INFO py.warnings: UserWarning: a library's word of caution ("), \
        proc.stderr


def _child_env() -> dict[str, str]:
    """The environment of a CLI child process: this checkout first on its path."""
    root = Path(__file__).resolve().parents[1]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}

# ----------------------------------------------------------------------------------------------
# Signals during start-up
# ----------------------------------------------------------------------------------------------

# The CLI's entry point, marking on stderr the moment it is called (what the console script runs).
_ENTRY = "import sys; from onnx_admm.cli import main; print('STARTED', file=sys.stderr, flush=True); main()"


@pytest.mark.parametrize("signum, code, line", [(signal.SIGINT, 130, "interrupted by Ctrl-C (SIGINT)"),
                                                (signal.SIGTERM, 143, "interrupted by SIGTERM")])
def test_signal_during_start_up_exits_with_the_documented_status_and_line(tmp_path, signum, code, line):
    # Click parses the arguments first, and an option callback imported torch there (seconds): a signal then
    # used to print click's "Aborted!" with status 1 (SIGINT) or kill the process without a word (SIGTERM).
    # Raised inside an extension's import, an interrupt could also abort the process from C++ or end in a
    # RecursionError. Each delay after the entry point is called must give the same status and line,
    # whatever it lands in: parsing, the libraries' import, the run.
    model, data = _gemm(tmp_path), _npz(tmp_path, x=X)
    env = _child_env()
    procs = {}
    for delay in (0.05, 0.3, 1.0):
        out = tmp_path / f"out{delay}.onnx"
        # A shell that starts the suite in the background ignores SIGINT in its children: undo that.
        procs[delay] = subprocess.Popen(
            [sys.executable, "-c", _ENTRY, "compress", model, "-o", out, "--data", data, *QUICK], env=env,
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for delay, proc in procs.items():
        assert proc.stderr.readline() == "STARTED\n"
    started = time.monotonic()
    for delay, proc in sorted(procs.items()):
        time.sleep(max(0.0, started + delay - time.monotonic()))
        proc.send_signal(signum)
    for delay, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        lines = [text for text in err.splitlines() if text.strip()]
        assert proc.returncode == code, (delay, err)
        assert len(lines) == 1 and lines[0].startswith(line), (delay, err)
        # The line says what was written: on a loaded machine a child can get past training before its
        # signal lands (it started before the others printed STARTED), and then it saves its completed stage.
        out = tmp_path / f"out{delay}.onnx"
        if ": saved stage 1" in lines[0]:
            assert lines[0].endswith(str(out)) and onnx.load(str(out)).graph.node, (delay, err)
        else:
            assert not out.exists(), (delay, err)


@pytest.mark.parametrize("swallowed_into", [RecursionError, None])
def test_interrupt_swallowed_by_library_code_still_ends_the_run(tmp_path, monkeypatch, swallowed_into):
    # The C code of an extension being imported can turn a KeyboardInterrupt into another error (numpy's
    # import machinery: a RecursionError), or drop it: the run still ends as interrupted.
    from onnx_admm import api

    def swallowing_import(*args, **kwargs):
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            if swallowed_into is not None:
                raise swallowed_into("maximum recursion depth exceeded") from None

    monkeypatch.setattr(api, "import_model", swallowing_import)
    out = tmp_path / "out.onnx"
    result = _compress(_gemm(tmp_path), _npz(tmp_path, x=X), out)
    assert result.exit_code == 130, result.output
    # Dropped, it is raised where the run can stop (right after the import) and the line says so; turned
    # into another error, that error ends the run and the interrupt is named all the same.
    expected = "interrupted by Ctrl-C (SIGINT)" + ("" if swallowed_into else
                                                   " before the first stage completed; nothing was written")
    assert [line for line in result.output.splitlines() if line.strip()] == [expected]
    assert not out.exists()


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_the_options_are_read_lands_after_them(tmp_path, monkeypatch, signum, code):
    # --device's check imports torch and onnx while click reads the options: an interrupt raised inside an
    # extension's module init there segfaulted or aborted the process (3 children in 300 under load). The
    # options are read to their end, and the signal then ends the run with its status and line.
    from onnx_admm import cli

    real, finished = cli._check_device, []

    def signalled_check(value):
        signal.raise_signal(signum)
        finished.append(real(value))
        return finished[-1]

    monkeypatch.setattr(cli, "_check_device", signalled_check)
    out = tmp_path / "out.onnx"
    result = _compress(_gemm(tmp_path), _npz(tmp_path, x=X), out, "--device", "cpu")
    assert finished == ["cpu"]
    assert result.exit_code == code, result.output
    assert [line for line in result.output.splitlines() if line.strip()] == [
        f"interrupted by {'Ctrl-C (SIGINT)' if signum == signal.SIGINT else 'SIGTERM'}"]
    assert not out.exists()
    # The signal ended that run only: a compress called next in this process runs to its end.
    from onnx_admm.api import compress
    from onnx_admm.recipe import CompressConfig

    config = CompressConfig.from_dict({"train": {"threads": 1}, "admm": {"epochs": 1, "retrain_epochs": 1},
                                       "prune": {"sparsity": 0.5}})
    assert compress(_gemm(tmp_path), _npz(tmp_path, x=X), config).report["params"]["nonzero"] == 20


# A signal that lands after the command has ended, during the interpreter's teardown (an atexit callback).
_TEARDOWN_ENTRY = """
import atexit, os, signal, sys
from onnx_admm import cli
atexit.register(lambda: os.kill(os.getpid(), signal.{signum}))
cli.{entry}()
"""


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_signal_after_the_command_ended_leaves_its_status(tmp_path, signum):
    # The run is complete and its status decided: a signal in the teardown that follows (a second with torch
    # loaded) killed the executable without the "interrupted" line (1 child in 120). The executable's entry
    # point (console) now exits with the command's status, and the output is whole.
    out = tmp_path / "out.onnx"
    args = ["compress", _gemm(tmp_path), "-o", out, "--data", _npz(tmp_path, x=X), *QUICK]
    proc = subprocess.run([sys.executable, "-c", _TEARDOWN_ENTRY.format(signum=signum, entry="console"), *args],
                          env=_child_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert onnx.load(str(out)).graph.node
    # What the entry point was before: the same signal at the same moment is not ignored.
    proc = subprocess.run([sys.executable, "-c", _TEARDOWN_ENTRY.format(signum=signum, entry="main"), "--version"],
                          env=_child_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert (proc.returncode, proc.stderr) != (0, ""), proc.stderr


def test_the_executable_and_python_m_run_the_console_entry_point():
    # pyproject's script and ``python -m onnx_admm.cli`` both end through console, not main.
    import tomllib

    root = Path(__file__).resolve().parents[1]
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"onnx-admm": "onnx_admm.cli:console"}
    assert (root / "onnx_admm" / "cli.py").read_text().rstrip().endswith("console()")


def test_a_model_whose_outputs_do_not_depend_on_its_weights_fails_in_one_line(tmp_path):
    # The Gemm's scores reach the output only through ArgMax: no gradient reaches W. check's backward step
    # and compress both raised torch's "element 0 of tensors does not require grad" with a traceback.
    model = _gemm(tmp_path, signature="(float[N, 4] x) => (float[N, 1] y)",
                  body="h = Gemm (x, W, B)\n a = ArgMax <axis = 1> (h)\n y = Cast <to = 1> (a)")
    data = _npz(tmp_path, x=X)
    checked = _run("check", model, "--data", data)
    assert checked.exit_code == 1
    assert "FAIL  backward               no output the model trains on depends on a trainable tensor" in checked.output
    out = tmp_path / "out.onnx"
    result = _compress(model, data, out)
    assert result.exit_code == 1
    assert [line for line in result.output.splitlines() if line.strip()] == [
        "Error: no output the model trains on (y) depends on its weights: nothing to train; run `onnx-admm check` "
        "on the model"]
    assert not out.exists()


@pytest.mark.parametrize("verbose", [False, True])
def test_an_internal_error_is_one_line_and_exit_4(tmp_path, monkeypatch, verbose):
    # A bug (an IR 3 graph's input used to end check in a KeyError) is not bad input: a pipeline sees 4, not 1,
    # and one line naming it; -v logs the traceback for the report.
    import onnx_admm.check

    def broken(*args, **kwargs):
        raise KeyError("OC2_DUMMY_3")

    monkeypatch.setattr(onnx_admm.check, "import_model", broken)
    result = _run(*(["-v"] if verbose else []), "check", _gemm(tmp_path))
    assert result.exit_code == 4, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert ("internal error: KeyError: 'OC2_DUMMY_3' (a bug in onnx-admm, not in the input: rerun with -v for the "
            "traceback and report it with the command)") in lines
    if verbose:
        assert "Traceback" in result.output and "in broken" in result.output
    else:
        assert lines == [lines[-1]] and "Traceback" not in result.output
