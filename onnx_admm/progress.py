"""Progress of a compress run for people: a tqdm bar per phase on a terminal, one log line per epoch elsewhere.

``compress`` reports its progress as events, dicts with a ``kind``, to a callback (``compress(progress=)``):

- ``run``: ``stages``, ``steps`` (batches of the whole run; None for a loader plugin, whose epochs have no
  known length), ``batches`` (per epoch, or None).
- ``stage``: ``stage`` (from 0), ``stages``, ``target`` (the stage's global sparsity, or None).
- ``phase``: ``stage``, ``stages``, ``phase`` (admm | retrain), ``epochs``, ``steps`` (or None), ``batches``.
- ``epoch``: ``stage``, ``phase``, ``epoch`` (from 0), ``epochs``, ``batches`` (this epoch's, or None).
- ``batch``: ``stage``, ``phase``, ``epoch``, ``batch`` (from 0), ``loss``, ``acc`` (the batch's top-1 against
  the labels or the teacher, or None).
- ``epoch_end``: ``stage``, ``stages``, ``phase``, ``epoch``, ``epochs`` and the epoch's record, the one the
  report keeps in ``stages[].history``: ``loss`` (mean over the epoch), ``train_metric``, ``metric`` (on the
  selection split, which picks the retraining state), ``residual`` (the mean ADMM primal residual
  ||W - Z|| / ||W|| over the weights at the last Z/U update; None in retraining), ``samples``, ``seconds``.
- ``phase_end``: ``stage``, ``phase``, ``stopped`` (the rollback note when a non-finite loss stopped it).
- ``validate``: ``samples``, before the onnxruntime validation of the written model.
- ``measure_start``: ``total`` (probes), before a sensitivity measurement (``onnx-admm analyze``, or compress
  with ``allocation = "sensitivity"``): each layer pruned (or quantized) alone and the model evaluated.
- ``measure``: ``layer``, ``done``, ``total``, ``metric`` (the model's with that layer alone changed), ``keep``
  (weights the layer kept) or ``bits``, ``last`` (the layer's last probe).

A callable gets them all; a mode string makes ``compress`` show them with ``console``: ``"bars"`` (tqdm,
one bar per phase: stage, epoch and batch totals, batches per second, ETA, the loss, the metric and the
residual), ``"lines"`` (a log line per stage, epoch and the validation: CI logs), ``"auto"`` (bars when
the stream is a terminal, else lines) or ``"off"``. Both write to stderr, so stdout stays for results.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from onnx_admm.converters.errors import UserError

# The lines go through logging, so a program embedding compress can route them like any other log.
LOGGER = logging.getLogger(__name__)

MODES = ("auto", "bars", "lines", "off")

Progress = Callable[[dict[str, Any]], None]


def number(value: float | None) -> str:
    """Three significant digits, scientific where small or large: a distillation loss of 1e-5 stays visible."""
    return "n/a" if value is None else f"{value:.3g}"


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def measures(event: dict[str, Any]) -> dict[str, str]:
    """``loss ...``, ``val ...``, ``residual ...`` of an event, those it has: what a person reads at an epoch's end."""
    out = {}
    if event.get("loss") is not None:
        out["loss"] = f"loss {number(event['loss'])}"
    if event.get("metric") is not None:
        out["metric"] = f"val {percent(event['metric'])}"
    if event.get("residual") is not None:
        out["residual"] = f"residual {number(event['residual'])}"
    return out


def stage_line(event: dict[str, Any]) -> str:
    target = event.get("target")
    line = f"stage {event['stage'] + 1}/{event['stages']}"
    return line + (f": target sparsity {target:.4g} ({1 / (1 - target):.1f}x)" if target is not None else "")


class _Display:
    """Dispatches each event to ``on_<kind>``; stage headers and the validation are log lines in every mode."""

    def __call__(self, event: dict[str, Any]) -> None:
        handler = getattr(self, f"on_{event['kind']}", None)
        if handler is not None:
            handler(event)

    def on_run(self, event: dict[str, Any]) -> None:
        self.started = time.perf_counter()

    def on_stage(self, event: dict[str, Any]) -> None:
        LOGGER.info("%s", stage_line(event))

    def on_validate(self, event: dict[str, Any]) -> None:
        elapsed = time.perf_counter() - getattr(self, "started", time.perf_counter())
        LOGGER.info("trained in %s; validating in onnxruntime on %d held-out samples",
                    tqdm.format_interval(elapsed), event["samples"])

    def close(self) -> None:
        """Nothing left on screen half-drawn (called on success, errors and Ctrl-C alike)."""


class EpochLog(_Display):
    """One plain line per epoch (and per stage): for logs, where a redrawn bar would be noise."""

    def __init__(self) -> None:
        self.steps: int | None = None
        self.done = 0
        self.phase_seconds = 0.0

    def on_run(self, event: dict[str, Any]) -> None:
        super().on_run(event)
        self.steps = event.get("steps")

    def on_phase(self, event: dict[str, Any]) -> None:
        self.phase_seconds = 0.0

    def on_batch(self, event: dict[str, Any]) -> None:
        self.done += 1

    def on_measure(self, event: dict[str, Any]) -> None:
        if event["last"]:
            LOGGER.info("sensitivity %d/%d: %s measured, metric %s at its deepest probe", event["done"], event["total"],
                        event["layer"], percent(event["metric"]))

    def on_epoch_end(self, event: dict[str, Any]) -> None:
        seconds, samples = event["seconds"], event["samples"]
        self.phase_seconds += seconds
        left = event["epochs"] - event["epoch"] - 1
        eta = [f"phase {tqdm.format_interval(self.phase_seconds / (event['epoch'] + 1) * left)}"]
        if self.steps and self.done:
            elapsed = time.perf_counter() - self.started
            eta.append(f"run {tqdm.format_interval(elapsed / self.done * max(self.steps - self.done, 0))}")
        rate = f"{samples / seconds:.0f} samples/s" if seconds > 0 else "-"
        LOGGER.info("stage %d/%d %s epoch %d/%d: %s; %d samples in %.1f s (%s); ETA %s",
                    event["stage"] + 1, event["stages"], event["phase"], event["epoch"] + 1, event["epochs"],
                    ", ".join(measures(event).values()), samples, seconds, rate, ", ".join(eta))


class Bars(_Display):
    """A tqdm bar per phase: ``stage 1/3 admm  40%|####  | 48/120 [00:05<00:07, 9.1batch/s, epoch 3/6, ...]``."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.bar: tqdm | None = None
        self.fields: dict[str, str] = {}
        self.epochs = 0

    def on_phase(self, event: dict[str, Any]) -> None:
        self.close()
        self.epochs = event["epochs"]
        self.fields = {}
        self.bar = tqdm(total=event["steps"], desc=f"stage {event['stage'] + 1}/{event['stages']} {event['phase']:<7}",
                        unit="batch", file=self.stream, dynamic_ncols=True, leave=True)

    def on_epoch(self, event: dict[str, Any]) -> None:
        self.fields["epoch"] = f"epoch {event['epoch'] + 1}/{event['epochs']}"
        self._show()

    def on_batch(self, event: dict[str, Any]) -> None:
        self.fields["loss"] = f"loss {number(event['loss'])}"
        if self.bar is not None:
            self.bar.set_postfix_str(self._postfix(), refresh=False)  # update() redraws, at most 10 times a second
            self.bar.update()

    def on_epoch_end(self, event: dict[str, Any]) -> None:
        # The epoch's mean loss replaces the last batch's; the metric and residual stay until the next epoch ends.
        self.fields.update(measures(event))
        if self.bar is not None and self.bar.total is None and event["epoch"] == 0:
            self.bar.total = self.bar.n * self.epochs  # a loader plugin: its first epoch gives the length
        self._show()

    def on_phase_end(self, event: dict[str, Any]) -> None:
        self.close()

    def on_measure_start(self, event: dict[str, Any]) -> None:
        self.close()
        self.bar = tqdm(total=event["total"], desc="sensitivity", unit="probe", file=self.stream, dynamic_ncols=True,
                        leave=True)

    def on_measure(self, event: dict[str, Any]) -> None:
        if self.bar is not None:
            probe = f"{event['bits']}-bit" if event["bits"] is not None else f"keep {event['keep']}"
            self.bar.set_postfix_str(f"{event['layer']} {probe}: {percent(event['metric'])}", refresh=False)
            self.bar.update()
        if event["done"] == event["total"]:
            self.close()

    def _postfix(self) -> str:
        return ", ".join(self.fields.values())

    def _show(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(self._postfix())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


@contextmanager
def console(mode: str = "auto", stream: TextIO | None = None) -> Iterator[Progress | None]:
    """The display of ``mode`` (``MODES``) on ``stream`` (default stderr), for the length of a run.

    Lines go to ``stream`` through ``LOGGER`` (its own handler, not propagated, so ``-v`` does not print
    them twice); with bars, console log records are written above the bar instead of through it.
    """
    _check_mode(mode)
    if mode == "off":
        yield None
        return
    stream = stream if stream is not None else sys.stderr
    if mode == "auto":
        mode = "bars" if _is_terminal(stream) else "lines"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = LOGGER.level, LOGGER.propagate
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False
    display = Bars(stream) if mode == "bars" else EpochLog()
    try:
        with logging_redirect_tqdm([logging.root, LOGGER]) if mode == "bars" else nullcontext():
            yield display
    finally:
        display.close()
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(saved[0])
        LOGGER.propagate = saved[1]


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise UserError(f"progress must be one of {', '.join(MODES)} or a callable, got {mode!r}")


def display(progress: Progress | str | None):
    """The context giving the callback for ``compress(progress=)``: a mode string opens ``console`` (checked
    now, so a typo fails before the model is even loaded); a callable or None is passed through."""
    if not isinstance(progress, str):
        return nullcontext(progress)
    _check_mode(progress)
    return console(progress)
