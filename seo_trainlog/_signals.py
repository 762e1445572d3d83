"""SIGTERM as a cluster scheduler sends it: record it, flush, then let it do what it would have done."""

from __future__ import annotations

import os
import signal
import threading
import types
from collections.abc import Callable


class TerminatedBySignal(BaseException):
    """Stands for the signal in the error logs: its traceback is where the process was when the
    signal arrived. It is never raised."""


def exception_at(frame: types.FrameType | None, signum: int) -> TerminatedBySignal:
    """A :class:`TerminatedBySignal` whose traceback is the stack of ``frame``."""
    error = TerminatedBySignal(f"received {signal.Signals(signum).name} (signal {signum})")
    tb = None
    while frame is not None:
        tb = types.TracebackType(tb, frame, frame.f_lasti, frame.f_lineno)
        frame = frame.f_back
    return error.with_traceback(tb)


class SigtermHook:
    """Installs a SIGTERM handler for the duration of a run (main thread only; elsewhere it does
    nothing, as Python allows signal handlers only there).

    On SIGTERM, ``on_signal(error, final)`` is called first. With a handler of the user's installed
    before us, ``final`` is False and that handler then runs as usual (it may stop training
    gracefully or raise). Otherwise ``final`` is True: the run is finished and flushed, our hook is
    removed and the signal is sent again, so that its default action terminates the process.
    """

    def __init__(self, on_signal: Callable[[TerminatedBySignal, bool], None], signum: int = signal.SIGTERM) -> None:
        self._on_signal = on_signal
        self._signum = signum
        self._previous: object = None
        self.installed = False
        self.received = False
        if threading.current_thread() is threading.main_thread():
            try:
                self._previous = signal.getsignal(signum)
                signal.signal(signum, self._handle)
                self.installed = True
            except (ValueError, OSError):
                pass

    def remove(self) -> None:
        if self.installed:
            self.installed = False
            try:
                if signal.getsignal(self._signum) == self._handle:
                    signal.signal(self._signum, self._previous if self._previous is not None else signal.SIG_DFL)
            except (ValueError, OSError):
                pass

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self.received = True
        previous = self._previous
        final = not callable(previous)
        try:
            self._on_signal(exception_at(frame, signum), final)
        finally:
            if final:
                self.remove()
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            os.kill(os.getpid(), signum)
