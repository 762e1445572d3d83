"""Alert hooks: every anomaly, handed to the user's callables and shell command off the training thread."""

from __future__ import annotations

import json
import queue
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

AlertHook = Callable[[Mapping[str, Any]], Any]


class AlertDispatcher:
    """Runs ``hooks`` (Python callables) and ``command`` (a shell command that receives the anomaly
    as one JSON object on stdin, killed after ``timeout_s``) for each anomaly, in one daemon thread,
    so that training never waits for them. A hook that fails is reported once through
    ``report_failure(message)``; the others go on."""

    def __init__(self, hooks: Sequence[AlertHook], command: str | None, timeout_s: float,
                 report_failure: Callable[[str], None]) -> None:
        self._hooks = list(hooks)
        self._command = command
        self._timeout_s = timeout_s
        self._report_failure = report_failure
        self._failed: set[str] = set()
        self._queue: queue.Queue[Mapping[str, Any] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="seo_trainlog-alerts", daemon=True)
        self._thread.start()

    def send(self, anomaly: Mapping[str, Any]) -> None:
        self._queue.put(dict(anomaly))

    def close(self, wait_s: float, max_wait_s: float = 60.0) -> None:
        """Stop after the alerts already sent, waiting for them at most ``wait_s`` seconds per alert
        not yet handled (and at most ``max_wait_s`` in all): the last anomalies of a run are still
        delivered, or their hooks' failures reported, before the run's files close."""
        outstanding = self._queue.qsize() + 1  # the queued ones and the one in hand
        self._queue.put(None)
        self._thread.join(timeout=min(max_wait_s, wait_s * outstanding))

    def _work(self) -> None:
        while (anomaly := self._queue.get()) is not None:
            for hook in self._hooks:
                self._run(getattr(hook, "__qualname__", repr(hook)), hook, anomaly)
            if self._command:
                self._run(f"command {self._command!r}", self._call_command, anomaly)

    def _call_command(self, anomaly: Mapping[str, Any]) -> None:
        result = subprocess.run(self._command, shell=True, input=json.dumps(anomaly, ensure_ascii=False),
                                text=True, capture_output=True, timeout=self._timeout_s)
        if result.returncode != 0:
            raise RuntimeError(f"exit status {result.returncode}: {result.stderr.strip()[-300:]}")

    def _run(self, name: str, hook: AlertHook, anomaly: Mapping[str, Any]) -> None:
        try:
            hook(anomaly)
        except Exception as exc:
            if name not in self._failed:
                self._failed.add(name)
                self._report_failure(f"alert hook {name} failed (reported once; it keeps being called): "
                                     f"{type(exc).__name__}: {exc}")
