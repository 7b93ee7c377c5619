"""Interrupts: SIGTERM handled like Ctrl-C, and file writes a signal cannot cut in half.

CI runners, Kubernetes and ``timeout`` stop a process with SIGTERM, whose default action kills it at
once: no stage saved, temporary files left behind. While ``sigterm_interrupts`` is active SIGTERM
raises ``Terminated``, a KeyboardInterrupt, so every ``except KeyboardInterrupt`` and ``finally``
that serves Ctrl-C serves it too. ``deferred`` holds SIGINT and SIGTERM back while a file is written,
so the write finishes and the signal lands right after it. The command line runs inside ``interrupts``,
which raises on SIGINT and SIGTERM alike and remembers each signal, so that one whose exception an
extension's C code swallowed or turned into another error is still known (``pending_interrupt``).

Handlers can only be installed from the main thread: elsewhere both are no-ops.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

_HELD = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt."""


def exit_status(interrupt: BaseException | None) -> int:
    """The shell's status for a process stopped by this signal: 128 + its number (130 Ctrl-C, 143 SIGTERM)."""
    return 128 + int(signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)


def signal_name(interrupt: BaseException | None) -> str:
    return "SIGTERM" if isinstance(interrupt, Terminated) else "Ctrl-C (SIGINT)"


# Signals received inside ``interrupts`` (or ``sigterm_interrupts``), first first; ``pending_interrupt`` takes them.
_received: list[int] = []


def _interrupt(signum, frame) -> None:
    _received.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def _raising(signums: tuple[int, ...]) -> Iterator[None]:
    """Each of ``signums`` raises its interrupt inside the block, unless someone already handles (or ignores) it."""
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    previous = {}
    try:
        # Inside the try: a signal landing between two installations still finds the first one restored.
        for signum in signums if _main_thread() else ():
            if signal.getsignal(signum) is defaults[signum]:
                previous[signum] = signal.signal(signum, _interrupt)
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def sigterm_interrupts() -> contextlib.AbstractContextManager[None]:
    """SIGTERM raises Terminated inside the block, unless someone already handles (or ignores) it."""
    return _raising((signal.SIGTERM,))


@contextmanager
def interrupts() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt and SIGTERM Terminated inside the block, and each is remembered.

    An interrupt raised inside an import can be swallowed, or turned into another error, by the C code of
    the extension being imported (numpy's, ml_dtypes'): ``pending_interrupt`` still knows it arrived. What
    Python or that C code would print about it (an ignored exception, the error it was turned into) is not
    shown once an interrupt arrived, so the command still ends with its one line.
    """
    _received.clear()
    previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

    def unraisable(info) -> None:
        # An interrupt raised inside a callback Python cannot propagate from (importlib's module-lock weakref
        # callback, a __del__) is printed as "Exception ignored in ..." with a traceback. It is already in
        # ``_received``, so the run still stops with its one line; the traceback would only be noise.
        if not (isinstance(info.exc_value, KeyboardInterrupt) and _received):
            previous_unraisable(info)

    def excepthook(kind, value, traceback) -> None:
        # An extension whose import an interrupt cut prints the error it turned it into with PyErr_Print, which
        # lands here ("ImportError: _multiarray_umath failed to import": numpy's import_umath in another
        # extension's module init). Inside the block every other exception is caught before it could reach here.
        if not _received:
            previous_except(kind, value, traceback)

    sys.unraisablehook, sys.excepthook = unraisable, excepthook
    try:
        with _raising(_HELD):
            yield
    finally:
        sys.unraisablehook, sys.excepthook = previous_unraisable, previous_except


def pending_interrupt() -> KeyboardInterrupt | None:
    """The interrupt of the first signal received since ``interrupts`` began (then forgotten), or None."""
    if not _received:
        return None
    signum = _received[0]
    _received.clear()
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def raise_swallowed_interrupt() -> None:
    """Raise the interrupt of a signal received since ``interrupts`` began whose exception never reached us.

    Called where a run can stop cleanly (after the import, at each progress event): an extension's C code,
    imported lazily in the middle of a run, can catch the exception the handler raised, and the run would
    otherwise finish, write its output and only then report the interrupt. An interrupt that propagated
    is taken off the list by whoever turned it into its result (``CompressInterrupted``), so a run started
    after one that was interrupted does not stop at once.
    """
    interrupt = pending_interrupt()
    if interrupt is not None:
        raise interrupt


def ignore_signals() -> None:
    """Ignore SIGINT and SIGTERM from now on (in the main thread; elsewhere signals cannot be set)."""
    if _main_thread():
        for signum in _HELD:
            signal.signal(signum, signal.SIG_IGN)


@contextmanager
def deferred(deliver: bool = True) -> Iterator[None]:
    """SIGINT and SIGTERM received inside the block take effect when it ends.

    With ``deliver`` the first one is then raised again through the handler it would have met (so
    Ctrl-C still raises KeyboardInterrupt, a default SIGTERM still ends the process); without it the
    caller is already handling an interrupt and later ones are dropped. Ignored signals stay ignored.
    """
    if not _main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum, frame) -> None:
        received.append(signum)

    previous = {}
    for signum in _HELD:
        handler = signal.getsignal(signum)
        if handler is not signal.SIG_IGN and handler is not None:
            previous[signum] = signal.signal(signum, hold)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            logger.info("a signal (%d) arrived during a file write; it takes effect now that the write is done",
                        received[0])
            if deliver:
                signal.raise_signal(received[0])
