"""The recorder thread: runs a run's deferred jobs (format and write its records) out of the
training loop's way, oldest first, each stamped with the time of its event."""
from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from datetime import datetime
from threading import get_ident
from time import thread_time
from time import time as _time
from typing import Any


class Recorder:
    """The thread that runs a :class:`~seo_trainlog.TrainLogger`'s deferred jobs, oldest first (what TensorBoard's
    ``SummaryWriter`` and Trackio do: the training thread enqueues, one thread formats and writes).

    ``submit`` is an append (no lock, no wake-up): the thread wakes every ``interval_s`` seconds, or
    when :meth:`drain` asks. :meth:`drain` returns once every job submitted before it has run;
    where the thread is gone (interpreter shutdown) the caller runs them itself. In a forked child
    (a DataLoader worker) :meth:`drain` and :meth:`stop` do nothing: the jobs are the parent's, and
    its thread, absent from the child, may have held their lock at the fork.
    """

    def __init__(self, report_failure: Callable[[str, Exception], None], interval_s: float) -> None:
        self._report_failure = report_failure  # (job name, exception): each failed job, reported by its owner
        self._interval_s = interval_s
        self._jobs: deque[tuple[str, Callable[[], Any], float]] = deque()
        self._cond = threading.Condition(threading.RLock())  # RLock: a signal handler may drain again
        self._run_lock = threading.RLock()  # one runner at a time (the thread, or a caller after it)
        self._wake = False
        self._stopping = False
        self.submitted = 0
        self.done = 0
        self.running_in: int | None = None  # the thread running a job, while it does
        self.event_time: datetime | None = None  # while a job runs: when its event happened
        self.cpu_s = 0.0
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._loop, name="seo_trainlog-recorder", daemon=True)
        self._thread.start()

    def submit(self, name: str, job: Callable[[], Any], wake: bool = False) -> None:
        """Queue ``job``; with ``wake`` the thread runs the queue now rather than at its next interval."""
        self._jobs.append((name, job, _time()))
        self.submitted += 1  # (one submitting thread: the deferring one)
        if wake:
            with self._cond:
                self._wake = True
                self._cond.notify_all()

    def idle(self) -> bool:
        return self.done >= self.submitted

    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._wake and not self._stopping:
                    self._cond.wait(self._interval_s)
                self._wake = False
                if self._stopping and not self._jobs:
                    return
            try:
                self._run_queued()
            except Exception:  # (each job's failure is reported by _run) the recorder must go on
                pass

    def _run_queued(self) -> None:
        with self._run_lock:
            started_s = thread_time()
            ran = 0
            try:
                while self._jobs:
                    name, job, at_s = self._jobs.popleft()
                    self._run(name, job, at_s)
                    ran += 1
            finally:
                self.cpu_s += thread_time() - started_s
                with self._cond:
                    self.done += ran
                    self._cond.notify_all()

    def _run(self, name: str, job: Callable[[], Any], at_s: float) -> None:
        self.running_in = get_ident()
        self.event_time = datetime.fromtimestamp(at_s).astimezone()
        try:
            job()
        except Exception as exc:
            self._report_failure(name, exc)
        finally:
            self.running_in = self.event_time = None

    def alive(self) -> bool:
        """The thread runs (in this process: a forked child has none)."""
        return not self.forked() and self._thread.is_alive()

    def forked(self) -> bool:
        """This is a forked child of the process that made the recorder."""
        return self._pid != os.getpid()

    def drain(self) -> None:
        if self.forked():
            return
        target = self.submitted
        with self._cond:
            self._wake = True
            self._cond.notify_all()
            while self.done < target and self.alive():
                self._cond.wait(0.05)
        if self.done < target:  # the thread is gone: run what is left here
            self._run_queued()

    def stop(self) -> None:
        """Run every job left, then end the thread (joined, unless called from it)."""
        if self.forked():
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread() and self.alive():
            self._thread.join()
        if self._jobs:
            self._run_queued()
