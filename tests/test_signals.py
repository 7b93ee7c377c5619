"""Signals sent to real ``onnx-admm compress`` processes: SIGTERM saves the last completed stage
(exit 143), Ctrl-C during the final save lets it finish (exit 130), SIGKILL leaves only a prefixed
temporary folder beside the output that the next run removes.

The processes run side by side (each pays ~5 s of imports; one after another they would take three
times that): ``_drive`` starts them all, watches each one's stderr for its marker and sends its signal
then. The slow points (the start of stage 2, the final save, the validation) come from a wrapper that patches them to print
a marker and wait for a ``go`` file, so a signal lands inside them without any blind sleep.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnx_admm.converters.graphinfo import constant_sources, tensor_value
from onnx_admm.converters.modelio import TEMP_PREFIX
from onnx_admm.cli import EXIT_INTERRUPTED, EXIT_TERMINATED, main
from onnx_admm.projections import keep_count
from onnx_admm.schedule import cubic_stages
from onnx_admm.signals import Terminated, deferred, sigterm_interrupts
from test_cli_hostile import QUICK, X, _gemm, _npz

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "samples" / "digits"
WEIGHTS = ("0.weight", "2.weight", "5.weight", "7.weight")
TOTAL = 38160
TWO_STAGES = ("--sparsity", "0.9", "--stages", "2", "--admm-epochs", "1", "--retrain-epochs", "1")
ONE_STAGE = ("--sparsity", "0.9", "--admm-epochs", "0", "--retrain-epochs", "1")

# Patches the start of stage 2, the final save (after the staged file is written, before its rename) or the
# validation (ONNX_ADMM_TEST_HOLD = stage2 | save | validate) to print a marker and wait until the test has sent
# its signal: a blind signal on a busy machine can land after stage 2 has already finished.
WRAPPER = r"""
import os, sys, time
from pathlib import Path
import onnx_admm.converters.modelio as modelio
import onnx_admm.pipeline.report as report_step
import onnx_admm.progress as progress

GO = Path(os.environ["ONNX_ADMM_TEST_GO"])

def hold(what):
    if what != os.environ["ONNX_ADMM_TEST_HOLD"]:
        return
    print(f"SLOW {what}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + 60
    while not GO.exists() and time.monotonic() < deadline:
        time.sleep(0.02)

real_model, real_validate = modelio.Staged.model, report_step.validate

def slow_model(self, model, target, external_data=False):
    staged = real_model(self, model, target, external_data)
    if target.name == "out.onnx":
        hold("save")
    return staged

def slow_validate(*args, **kwargs):
    hold("validate")
    return real_validate(*args, **kwargs)

real_on_stage = progress._Display.on_stage

def slow_on_stage(self, event):
    real_on_stage(self, event)
    if event["stage"] == 1:
        hold("stage2")

modelio.Staged.model = slow_model
progress._Display.on_stage = slow_on_stage
report_step.validate = slow_validate
from onnx_admm.cli import main
main(sys.argv[1:], prog_name="onnx-admm")
"""


@dataclass
class Run:
    """One compress process, the marker on its stderr at which it gets ``signum``."""

    folder: Path
    args: tuple[str, ...]
    marker: str
    signum: int
    hold: str | None = None  # run through WRAPPER, held at this point
    proc: subprocess.Popen | None = None
    lines: list[str] = field(default_factory=list)
    signalled: bool = False

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    @property
    def out(self) -> Path:
        return self.folder / "out.onnx"

    def start(self) -> None:
        (self.folder / "systmp").mkdir(parents=True)
        entry = ["-c", WRAPPER] if self.hold else ["-m", "onnx_admm.cli"]
        argv = [sys.executable, *entry, "compress", str(DIGITS / "model.onnx"), "-o", str(self.out), "--data",
                str(DIGITS / "train.npz"), "--report", str(self.folder / "r.json"), "--threads", "1", *self.args]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(self.folder / "systmp"),
               "ONNX_ADMM_TEST_GO": str(self.folder / "go"), "ONNX_ADMM_TEST_HOLD": self.hold or ""}
        # A shell that starts the suite in the background ignores SIGINT in its children: undo that.
        self.proc = subprocess.Popen(argv, cwd=self.folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stderr.readline, "")), daemon=True).start()

    def poll(self) -> None:
        if not self.signalled and self.proc.poll() is None and self.marker in self.stderr:
            self.proc.send_signal(self.signum)
            self.signalled = True
            time.sleep(0.1)  # let the handler run before the held save may go on
            (self.folder / "go").touch()

    def temps(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.name.startswith(TEMP_PREFIX))

    def system_temps(self) -> list[Path]:
        return sorted(p for p in (self.folder / "systmp").iterdir() if "onnx-admm" in p.name)


def _drive(runs: dict[str, Run], timeout: float = 150) -> None:
    for run in runs.values():
        run.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(run.proc.poll() is None for run in runs.values()):
        for run in runs.values():
            run.poll()
        time.sleep(0.02)
    for run in runs.values():
        if run.proc.poll() is None:
            run.proc.kill()
        run.proc.wait()
        time.sleep(0.05)  # the reader thread drains the pipe


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    root = tmp_path_factory.mktemp("signals")
    runs = {
        # Ctrl-C mid-training is also covered in process (test_cli_compress, test_api).
        "sigterm_mid_training": Run(root / "term", TWO_STAGES, "SLOW stage2", signal.SIGTERM, hold="stage2"),
        "sigint_during_final_save": Run(root / "save", ONE_STAGE, "SLOW save", signal.SIGINT, hold="save"),
        "sigkill_during_validation": Run(root / "kill", ONE_STAGE, "SLOW validate", signal.SIGKILL, hold="validate"),
    }
    _drive(runs)
    return runs


def _nonzero(path: Path) -> int:
    model = onnx.load(str(path))
    sources = constant_sources(model)
    return sum(int(np.count_nonzero(tensor_value(model, sources[w]))) for w in WEIGHTS)


def test_sigterm_mid_training_saves_the_last_completed_stage_and_exits_143(runs):
    run = runs["sigterm_mid_training"]
    assert run.signalled and run.proc.returncode == EXIT_TERMINATED, run.stderr
    assert "interrupted by SIGTERM during stage 2: saved stage 1 (sparsity " in run.stderr
    assert f"to {run.out}; not written: {run.folder / 'r.json'}" in run.stderr
    assert "Traceback" not in run.stderr and "Aborted" not in run.stderr
    assert _nonzero(run.out) == keep_count(TOTAL, cubic_stages(0.9, 2)[0])
    assert not (run.folder / "r.json").exists() and run.temps() == [] and run.system_temps() == []


def test_sigint_during_the_final_save_finishes_it(runs):
    run = runs["sigint_during_final_save"]
    assert run.signalled and run.proc.returncode == EXIT_INTERRUPTED, run.stderr
    assert "interrupted by Ctrl-C (SIGINT) after training: saved stage 1 (sparsity 0.9000) to" in run.stderr
    assert "Traceback" not in run.stderr and "Aborted" not in run.stderr
    onnx.checker.check_model(str(run.out))
    assert _nonzero(run.out) == keep_count(TOTAL, 0.9)  # the whole final model, not a stage of it
    assert run.temps() == [] and run.system_temps() == []


def test_sigkill_leaves_one_prefixed_folder_beside_the_output_and_the_next_run_removes_it(runs):
    run = runs["sigkill_during_validation"]
    assert run.signalled and run.proc.returncode == -signal.SIGKILL, run.stderr
    # The validation reads the staged model beside the output: nothing in the system's temporary folder.
    assert not run.out.exists() and run.system_temps() == []
    (temp,) = run.temps()
    assert temp.name.startswith(f"{TEMP_PREFIX}") and f"-{run.proc.pid}-" in temp.name
    assert [p.name for p in temp.iterdir()] == ["out.onnx"]
    # A later run writing into the same folder (a tiny Gemm model: the cleanup is the point).
    model, data = _gemm(run.folder), _npz(run.folder, x=X)
    result = CliRunner().invoke(main, ["compress", str(model), "-o", str(run.folder / "next.onnx"), "--data", str(data),
                                       *QUICK])
    assert result.exit_code == 0, result.output
    assert run.temps() == [] and (run.folder / "next.onnx").is_file()


# --- the signal helpers themselves, with real signals to this process ---


def test_deferred_holds_ctrl_c_until_the_write_is_done():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred():
            signal.raise_signal(signal.SIGINT)
            done.append("write finished")
    assert done == ["write finished"]
    with deferred(deliver=False):  # already handling an interrupt: a second one is dropped
        signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_raises_terminated_only_inside_the_block():
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with pytest.raises(Terminated):
        with sigterm_interrupts():
            signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with sigterm_interrupts(), pytest.raises(Terminated), deferred():
        signal.raise_signal(signal.SIGTERM)  # held, then raised as Terminated when the block ends


def test_sigterm_during_validate_exits_143_and_removes_its_temporaries(tmp_path, monkeypatch, system_temp):
    # A real SIGTERM to this process, from inside the validation's temporary folder: the CLI's handler
    # turns it into an interrupt, so the folder goes away and the command exits 143 in one line.
    from onnx_admm import validate

    seen = []
    real = validate.run_session

    def terminated(*args, **kwargs):
        seen.append(system_temp())
        signal.raise_signal(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(validate, "run_session", terminated)
    model = _gemm(tmp_path)
    result = CliRunner().invoke(main, ["validate", str(model), str(model), "--data", str(_npz(tmp_path, x=X))])
    assert result.exit_code == EXIT_TERMINATED and result.output.strip() == "interrupted by SIGTERM", result.output
    assert len(seen) == 1 and len(seen[0]) == 1 and seen[0][0].startswith(TEMP_PREFIX) and system_temp() == []


def test_an_interrupt_swallowed_during_the_run_stops_it_at_the_next_progress_event(tmp_path, monkeypatch):
    # An extension imported lazily in the middle of a run can catch the exception the signal handler raised
    # (here: a progress display that swallows it). The run stops at its next progress event, writes
    # nothing, and the interrupt is then accounted for: the next run in this process goes through.
    from onnx_admm.api import compress
    from onnx_admm.data import Dataset
    from onnx_admm.pipeline.results import CompressInterrupted
    from onnx_admm.recipe import CompressConfig
    from onnx_admm.signals import interrupts

    model, out = _gemm(tmp_path), tmp_path / "out.onnx"
    data = Dataset({"x": X}, None, {"x"})
    config = CompressConfig.from_dict({"train": {"threads": 1}, "admm": {"epochs": 1, "retrain_epochs": 1},
                                       "prune": {"sparsity": 0.5}})
    events = []

    def swallowing(event):
        events.append(event["kind"])
        if len(events) == 1:
            try:
                signal.raise_signal(signal.SIGTERM)
            except KeyboardInterrupt:
                pass

    with interrupts():
        with pytest.raises(CompressInterrupted) as caught:
            compress(model, data, config, output=out, progress=swallowing)
        assert caught.value.result is None and caught.value.exit_status == EXIT_TERMINATED
        assert len(events) == 1 and not out.exists()
        assert compress(model, data, config, output=out).report["params"]["nonzero"] > 0 and out.exists()


def test_an_interrupt_raised_where_python_cannot_propagate_it_prints_no_traceback(monkeypatch):
    # A signal landing in importlib's module-lock weakref callback (or any __del__) raises there, and Python
    # prints "Exception ignored in ..." with a traceback: a run interrupted at start-up showed seven lines in
    # place of one. The interrupt is remembered all the same, so the run still stops with its one line.
    import gc

    from onnx_admm.signals import interrupts, pending_interrupt

    class Finalized:
        def __del__(self):
            signal.raise_signal(signal.SIGTERM)

    class Broken:
        def __del__(self):
            raise ValueError("a real bug in a finalizer")

    printed = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: printed.append(unraisable.exc_type))
    with interrupts():
        Finalized()
        gc.collect()
        assert isinstance(pending_interrupt(), Terminated)
        Broken()  # anything else still reaches the hook that was there before
        gc.collect()
    assert printed == [ValueError]
    Finalized.__del__ = lambda self: None


def test_an_error_an_extension_prints_after_an_interrupt_cut_its_import_is_not_shown(monkeypatch):
    # A signal landing inside numpy's import from another extension's module init: numpy turns the interrupt
    # into "ImportError: _multiarray_umath failed to import" and PyErr_Print prints it through sys.excepthook
    # (PyRun_SimpleString prints an error the same way). Once an interrupt arrived that line is noise.
    import ctypes

    from onnx_admm.signals import interrupts, pending_interrupt

    printed = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, value, tb: printed.append(str(value)))
    with interrupts():
        ctypes.pythonapi.PyRun_SimpleString(b"raise ImportError('before any signal')")
        try:
            signal.raise_signal(signal.SIGTERM)
        except Terminated:
            pass  # what the extension's C code does with it
        ctypes.pythonapi.PyRun_SimpleString(b"raise ImportError('_multiarray_umath failed to import')")
        assert isinstance(pending_interrupt(), Terminated)
    ctypes.pythonapi.PyRun_SimpleString(b"raise ImportError('after the block')")
    assert printed == ["before any signal", "after the block"]
