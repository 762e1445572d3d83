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
    nothing, as Python allows signal handlers only there), and only in the process that made it (a
    forked child inherits the handler but leaves the signal alone).

    On SIGTERM ``on_signal(error, final)`` is called:

    - a handler of the user's was installed before us: ``final`` is False (note it); that handler then
      runs as usual (it may stop training gracefully or raise);
    - ``SIG_IGN`` was installed before us: the signal stays ignored, only noted (``final`` False);
    - otherwise (the default action): ``final`` is True, the run is finished and flushed, our hook is
      removed and the signal is sent again, so that it terminates the process as it would have. If
      the signal arrives while our logger is in the middle of writing (loguru is not re-entrant),
      the error is raised instead; the guards around the training loop then finish the run and
      :meth:`resend` the signal.
    """

    def __init__(self, on_signal: Callable[[TerminatedBySignal, bool], None], signum: int = signal.SIGTERM,
                 busy: Callable[[], bool] = lambda: False) -> None:
        self._on_signal = on_signal
        self._signum = signum
        self._busy = busy
        self._pid = os.getpid()
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

    @property
    def final(self) -> bool:
        """Whether the signal ends the process once recorded (no handler of the user's, not ignored)."""
        return not callable(self._previous) and self._previous != signal.SIG_IGN

    def remove(self) -> None:
        if self.installed:
            self.installed = False
            try:
                if signal.getsignal(self._signum) == self._handle:
                    signal.signal(self._signum, self._previous if self._previous is not None else signal.SIG_DFL)
            except (ValueError, OSError):
                pass

    def resend(self) -> None:
        """After the run is recorded: the default action of the signal, now."""
        self.remove()
        os.kill(os.getpid(), self._signum)

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        previous = self._previous
        if os.getpid() != self._pid:  # a forked child: behave as if we were not there
            if callable(previous):
                previous(signum, frame)
            elif previous != signal.SIG_IGN:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        self.received = True
        error = exception_at(frame, signum)
        if self.final and self._busy():
            raise error
        try:
            self._on_signal(error, self.final)
        except Exception:
            pass  # recording must never stop the signal from doing its work
        if callable(previous):
            previous(signum, frame)
        elif self.final:
            self.resend()
