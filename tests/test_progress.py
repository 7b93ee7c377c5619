"""The progress display (onnx_admm.progress): readable numbers, a tqdm bar per phase on a terminal, one
line per epoch elsewhere, nothing when off; and what compress reports to it."""

from __future__ import annotations

import io
import logging

import pytest

from onnx_admm.converters.errors import UserError
from onnx_admm import progress
from onnx_admm.progress import Bars, EpochLog, console, number


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _events(batches: int | None = 3, epochs: int = 2):
    """The events of a one-stage run: an ADMM phase of ``epochs`` epochs (a tiny distillation loss)."""
    where = {"stage": 0, "stages": 1, "phase": "admm"}
    yield {"kind": "run", "stages": 1, "steps": None if batches is None else batches * epochs, "batches": batches}
    yield {"kind": "stage", "stage": 0, "stages": 1, "target": 0.9}
    yield {"kind": "phase", **where, "epochs": epochs, "steps": None if batches is None else batches * epochs,
           "batches": batches}
    for epoch in range(epochs):
        yield {"kind": "epoch", **where, "epoch": epoch, "epochs": epochs, "batches": batches}
        for i in range(batches or 3):
            yield {"kind": "batch", **where, "epoch": epoch, "batch": i, "loss": 2.5e-5, "acc": None}
        yield {"kind": "epoch_end", **where, "epoch": epoch, "epochs": epochs, "loss": 1.234e-5, "train_metric": 0.9,
               "metric": 0.953, "residual": 0.3125, "samples": 192, "seconds": 0.5}
    yield {"kind": "phase_end", **where, "stopped": None}
    yield {"kind": "validate", "samples": 64}


def test_numbers_stay_readable_when_small():
    assert number(1.234e-5) == "1.23e-05"  # not 0.0000
    assert number(0.1234) == "0.123" and number(2.0) == "2" and number(None) == "n/a"


def test_lines_when_the_stream_is_no_terminal():
    stream = io.StringIO()
    with console("auto", stream) as show:
        assert isinstance(show, EpochLog)
        for event in _events():
            show(event)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines[0] == "stage 1/1: target sparsity 0.9 (10.0x)"
    assert lines[1].startswith("stage 1/1 admm epoch 1/2: loss 1.23e-05, val 95.30%, residual 0.312; 192 samples in "
                               "0.5 s (384 samples/s); ETA phase 00:00, run 00:")
    assert lines[2].startswith("stage 1/1 admm epoch 2/2: loss 1.23e-05")
    assert lines[3].startswith("trained in ") and lines[3].endswith("validating in onnxruntime on 64 held-out samples")
    assert len(lines) == 4  # one per stage, one per epoch, the validation: nothing per batch


def test_bars_on_a_terminal_show_totals_rate_loss_metric_and_residual():
    stream = _Terminal()
    with console("auto", stream) as show:
        assert isinstance(show, Bars)
        for event in _events():
            show(event)
    final = stream.getvalue().split("\r")[-2]  # the phase bar as it was left
    assert "stage 1/1 admm" in final and "100%" in final and "6/6" in final and "batch/s" in final
    assert "epoch 2/2, loss 1.23e-05, val 95.30%, residual 0.312" in final
    assert "stage 1/1: target sparsity 0.9 (10.0x)" in stream.getvalue()


def test_bars_learn_a_plugin_epoch_length_from_the_first_epoch():
    bars = Bars(_Terminal())
    for event in _events(batches=None, epochs=3):
        bars(event)
        if event["kind"] == "epoch_end" and event["epoch"] == 0:
            assert bars.bar.total == 9  # 3 batches in the first epoch, 3 epochs
    bars.close()


def test_off_shows_nothing_and_the_logger_is_left_as_found():
    before = (progress.LOGGER.handlers[:], progress.LOGGER.level, progress.LOGGER.propagate)
    with console("off") as show:
        assert show is None
    stream = io.StringIO()
    with pytest.raises(KeyboardInterrupt), console("lines", stream) as show:
        show({"kind": "stage", "stage": 0, "stages": 2, "target": None})
        raise KeyboardInterrupt
    assert stream.getvalue() == "stage 1/2\n"
    assert (progress.LOGGER.handlers, progress.LOGGER.level, progress.LOGGER.propagate) == before
    logging.getLogger("onnx_admm.progress").info("not shown")  # no handler left behind
    assert stream.getvalue() == "stage 1/2\n"


def test_an_unknown_mode_is_a_user_error():
    with pytest.raises(UserError, match="progress must be one of auto, bars, lines, off or a callable, got 'bar'"):
        progress.display("bar")


def _measure_events():
    """A sensitivity measurement of two layers, two probes each (onnx_admm.sensitivity.measure)."""
    yield {"kind": "measure_start", "total": 4}
    for done, (layer, keep, last) in enumerate([("a", 10, False), ("a", 2, True), ("b", 5, False), ("b", 1, True)], 1):
        yield {"kind": "measure", "layer": layer, "done": done, "total": 4, "metric": 0.5, "keep": keep, "bits": None,
               "last": last}


def test_a_sensitivity_measurement_is_one_bar_or_one_line_per_layer():
    stream = _Terminal()
    with console("auto", stream) as show:
        for event in _measure_events():
            show(event)
        assert show.bar is None  # closed at the last probe
    final = stream.getvalue().split("\r")[-1]  # the bar as it was left
    assert "sensitivity" in final and "4/4" in final and "probe/s" in final and "b keep 1: 50.00%" in final
    stream = io.StringIO()
    with console("auto", stream) as show:
        for event in _measure_events():
            show(event)
    assert stream.getvalue().splitlines() == ["sensitivity 2/4: a measured, metric 50.00% at its deepest probe",
                                              "sensitivity 4/4: b measured, metric 50.00% at its deepest probe"]
