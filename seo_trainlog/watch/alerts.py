"""Alert hooks: every anomaly, handed to the user's callables and shell command off the training thread."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from time import monotonic, sleep
from typing import Any

AlertHook = Callable[[Mapping[str, Any]], Any]

COMPLETED_WAIT_S = 60.0  # a completed run: the most its queued alerts may hold the end of the run
STOPPED_GRACE_S = 1.0  # a failed, interrupted or terminated run: the most its alerts may hold the process
STDERR_TAIL_BYTES = 4096  # of a command's stderr, the most kept in memory (its end)
REPORTED_STDERR_CHARS = 300  # of that, the most quoted in a failure report
_STOP = object()


class AlertDispatcher:
    """Runs ``hooks`` (Python callables) and ``command`` (a shell command that receives the anomaly
    as one JSON object on stdin) for each anomaly, in one daemon thread, so that training never
    waits for them. A hook that fails is reported once through ``report_failure(message)``; the
    others go on.

    The command runs in a process group of its own (a new session): when it has run ``timeout_s``
    seconds, and at :meth:`close`, the whole group is killed (``SIGKILL``), whatever it started, in
    the background too. Its stdout goes to ``/dev/null``; of its stderr only the last
    ``STDERR_TAIL_BYTES`` are kept, for the failure report. Nothing is reported once the dispatcher
    is closed (a hook still stuck in the thread then writes nothing into the closed run).
    """

    def __init__(self, hooks: Sequence[AlertHook], command: str | None, timeout_s: float,
                 report_failure: Callable[[str], None]) -> None:
        self._hooks = list(hooks)
        self._command = command
        self._timeout_s = timeout_s
        self._report_failure = report_failure
        self._failed: set[str] = set()
        self._lock = threading.Lock()  # closed, delivered, in_hand, commands; reports are made holding it
        self._closed = False
        self._sent = 0
        self._delivered = 0
        self._in_hand: str | None = None  # the hook (or command) being called, since _in_hand_since_s
        self._in_hand_since_s: float | None = None
        self._commands: list[_Command] = []  # started and not yet reaped
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()  # put() is safe in a signal handler
        self._thread = threading.Thread(target=self._work, name="seo_trainlog-alerts", daemon=True)
        self._thread.start()

    def send(self, anomaly: Mapping[str, Any]) -> None:
        if not self._closed:
            self._sent += 1
            self._queue.put(dict(anomaly))

    def close(self, wait_s: float, completed: bool = True) -> int:
        """Stop after the alerts already sent, waiting for them at most ``wait_s`` seconds per alert
        not yet delivered and at most ``COMPLETED_WAIT_S`` in all, or, for a run that did not
        complete (``completed`` False: failed, interrupted, terminated), at most ``STOPPED_GRACE_S``
        in all. A hook (or the command) still running ``wait_s`` + 1 s after it was called holds
        every alert behind it: the wait ends then. Then every alert command's process group still
        alive is killed. Alerts not delivered by then are reported once, ``"N alerts not delivered:
        ..."``. Safe to call from a signal handler; an exception during the wait (a second Ctrl-C)
        still kills and reports.

        Returns:
            int: the number of alerts not delivered.
        """
        started_s = monotonic()
        outstanding = self._sent - self._delivered
        deadline_s = started_s + min(COMPLETED_WAIT_S if completed else STOPPED_GRACE_S, wait_s * outstanding)
        self._queue.put(_STOP)
        try:
            while self._thread.is_alive():
                called_s = self._in_hand_since_s
                until_s = min(deadline_s, called_s + wait_s + 1.0) if called_s is not None else deadline_s
                remaining_s = until_s - monotonic()
                if remaining_s <= 0:
                    break
                self._thread.join(timeout=min(remaining_s, 0.05))
        finally:
            undelivered = self._shut(monotonic() - started_s)
        return undelivered

    # ------------------------------------------------------------------ the dispatching thread

    def _work(self) -> None:
        try:
            while True:
                try:
                    anomaly = self._queue.get(timeout=self._until_next_deadline_s())
                except queue.Empty:
                    anomaly = None
                self._reap_due()
                if anomaly is _STOP or self._closed:
                    return
                if anomaly is not None:
                    self._deliver(anomaly)
        finally:
            self._reap_due()

    def _deliver(self, anomaly: Mapping[str, Any]) -> None:
        calls: list[tuple[str, AlertHook]] = [(getattr(hook, "__qualname__", repr(hook)), hook) for hook in self._hooks]
        if self._command:
            calls.append((f"command {self._command!r}", self._call_command))
        for name, call in calls:
            with self._lock:
                if self._closed:
                    return
                self._in_hand, self._in_hand_since_s = name, monotonic()
            try:
                call(anomaly)
            except Exception as exc:
                self._report_once(name, f"alert hook {name} failed (reported once; it keeps being called): "
                                        f"{type(exc).__name__}: {exc}")
            self._reap_due()
        with self._lock:
            if not self._closed:
                self._in_hand = self._in_hand_since_s = None
                self._delivered += 1

    def _call_command(self, anomaly: Mapping[str, Any]) -> None:
        with self._lock:
            if self._closed:
                return
            command = _Command(self._command, self._timeout_s)
            self._commands.append(command)
        command.write_stdin(json.dumps(anomaly, ensure_ascii=False).encode("utf-8"))
        delay_s = 0.001
        while not command.exited():
            remaining_s = command.deadline_s - monotonic()
            if remaining_s <= 0:
                with self._lock:
                    command.kill_group()
                killed_s = monotonic()
                while not command.exited() and monotonic() - killed_s < 5.0:
                    sleep(0.01)
                self._reap_due()
                raise subprocess.TimeoutExpired(self._command, self._timeout_s)
            sleep(min(delay_s, remaining_s))
            delay_s = min(delay_s * 2, 0.05)
        if command.exit_status != 0:
            raise RuntimeError(f"exit status {command.exit_status}: "
                               f"{command.stderr_tail().strip()[-REPORTED_STDERR_CHARS:]}")
        # exited normally: whatever it left running in the background keeps its group until its deadline

    def _until_next_deadline_s(self) -> float | None:
        with self._lock:
            if not self._commands:
                return None
            return max(0.01, min(command.deadline_s for command in self._commands) - monotonic())

    def _reap_due(self) -> None:
        """Kill and reap the groups of the commands that have exited and whose time is up (all of
        them once closed). A shell is reaped only after its group was killed, holding the lock: its
        group id cannot meanwhile be given to anyone else's processes."""
        with self._lock:
            now_s = monotonic()
            for command in list(self._commands):
                if command.exited() and (self._closed or command.deadline_s <= now_s):
                    command.reap()
                    self._commands.remove(command)

    def _report_once(self, name: str, message: str) -> None:
        with self._lock:
            if self._closed or name in self._failed:
                return
            self._failed.add(name)
            try:
                self._report_failure(message)
            except Exception:
                pass

    # ------------------------------------------------------------------ closing

    def _shut(self, waited_s: float) -> int:
        locked = self._lock.acquire(timeout=1.0)  # held only briefly; never wait long at the end of a run
        try:
            self._closed = True
            undelivered = self._sent - self._delivered
            in_hand = self._in_hand
            for command in list(self._commands):
                command.kill_group()
                if command.exited():
                    command.reap()
                    self._commands.remove(command)
            # a command still being waited for is reaped by the dispatching thread once it is dead
        finally:
            if locked:
                self._lock.release()
        if undelivered:
            after = f"{waited_s:.1f} s after the run ended"
            why = f"alert hook {in_hand} was still running {after}" if in_hand else f"still queued {after}"
            if in_hand and in_hand.startswith("command "):
                why += "; its process group was killed"
            try:
                self._report_failure(f"{undelivered} alert{'s' if undelivered != 1 else ''} not delivered: {why}")
            except Exception:
                pass
        return undelivered


class _Command:
    """One run of the alert command, in a new session (so a new process group led by its shell).
    Its stderr is read by a small thread that keeps only the last ``STDERR_TAIL_BYTES``. The shell,
    once exited, is left unreaped (a zombie) until its group has been killed, so that the group id
    is still ours when it is killed."""

    def __init__(self, command: str, timeout_s: float) -> None:
        self.deadline_s = monotonic() + timeout_s
        self.process = subprocess.Popen(command, shell=True, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, start_new_session=True)
        self.exit_status: int | None = None
        self.reaped = False
        self._tail = bytearray()
        self._reader = threading.Thread(target=self._read_stderr, name="seo_trainlog-alert-stderr", daemon=True)
        self._reader.start()

    def write_stdin(self, data: bytes) -> None:
        try:
            self.process.stdin.write(data)
            self.process.stdin.close()
        except OSError:  # the command exited without reading it
            pass

    def exited(self) -> bool:
        """Whether the shell has exited (its exit status is then in ``exit_status``); never reaps it."""
        if self.exit_status is None and not self.reaped:
            if not hasattr(os, "waitid"):  # no way to wait without reaping: reap, the group is killed first
                if self.process.poll() is not None:
                    self.exit_status = self.process.returncode
                return self.exit_status is not None
            try:
                info = os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:  # reaped by someone else (SIGCHLD ignored or handled): the status is
                self.reaped, self.exit_status = True, 0  # lost (as subprocess assumes: 0), the group id not ours
                return True
            if info is not None:
                self.exit_status = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        return self.exit_status is not None

    def kill_group(self) -> None:
        if self.reaped:
            return
        try:
            if hasattr(os, "killpg"):
                os.killpg(self.process.pid, signal.SIGKILL)
            else:
                self.process.kill()
        except OSError:  # the group is gone already
            pass

    def reap(self) -> None:
        self.kill_group()
        if not self.reaped:
            self.reaped = True
            try:
                self.process.wait(timeout=1.0)
            except (subprocess.TimeoutExpired, ChildProcessError):
                pass

    def stderr_tail(self) -> str:
        """The end of what the command wrote to stderr (until it exited)."""
        self._reader.join(timeout=0.2)  # what it wrote just before exiting
        return bytes(self._tail).decode("utf-8", "replace")

    def _read_stderr(self) -> None:
        stream = self.process.stderr
        try:
            while chunk := stream.read1(65536):
                self._tail += chunk
                del self._tail[:-STDERR_TAIL_BYTES]
        except (OSError, ValueError):
            pass
        finally:
            try:
                stream.close()
            except OSError:
                pass
