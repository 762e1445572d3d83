"""Reading a log directory's JSON metrics back: which runs it holds, and each run's records as one
stream over its rotated files, all at once or as training appends them. Nothing here interprets a
record beyond its ``event`` and the ``schema_version`` of ``run_start``."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from ._logger import SCHEMA_VERSION

# performance_metrics_<stamp>.log, rotated by loguru to performance_metrics_<stamp>.<date>[.<n>].log
_METRICS_FILE = re.compile(r"^performance_metrics_(\d{8}_\d{6}(?:_\d+)?)"
                           r"(?:\.(\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d{6})(?:\.(\d+))?)?\.log$")


class LogReadError(Exception):
    """A log directory or metrics file that cannot be read. The message is one line, for the user."""


@dataclass(frozen=True)
class MetricsRun:
    """One run's JSON metrics files: ``paths`` holds the rotated files oldest first, then the active
    ``performance_metrics_<run_id>.log``; together they are one stream of records."""

    run_id: str
    paths: tuple[Path, ...]

    @property
    def active_path(self) -> Path:
        return self.paths[0].with_name(f"performance_metrics_{self.run_id}.log")


def find_runs(log_dir: str | os.PathLike[str]) -> list[MetricsRun]:
    """The runs of ``log_dir``, oldest first (by stamp ``YYYYMMDD_HHMMSS``, then its ``_1``, ``_2``...).

    Raises:
        LogReadError: the directory is missing or unreadable, or holds no metrics file.
    """
    directory = Path(log_dir)
    if not directory.is_dir():
        raise LogReadError(f"{directory} is not a directory (no such log directory)")
    try:
        names = os.listdir(directory)
    except OSError as exc:
        raise LogReadError(f"cannot list {directory}: {exc.strerror}") from None
    files: dict[str, list[tuple[tuple[str, int], Path]]] = {}
    for name in names:
        match = _METRICS_FILE.match(name)
        if match:
            run_id, date, counter = match.groups()
            order = (date, int(counter or 1)) if date else ("~", 0)  # "~" sorts the active file last
            files.setdefault(run_id, []).append((order, directory / name))
    if not files:
        raise LogReadError(f"{directory} holds no performance_metrics_*.log file (no seo_trainlog run was "
                           "logged there)")
    return [MetricsRun(run_id, tuple(path for _, path in sorted(files[run_id])))
            for run_id in sorted(files, key=_stamp_order)]


def select_run(runs: list[MetricsRun], run_id: str | None) -> MetricsRun:
    """The run named ``run_id``, or the latest one when ``run_id`` is ``None``.

    Raises:
        LogReadError: no run of that id (the message lists the ones there are).
    """
    if run_id is None:
        return runs[-1]
    for run in runs:
        if run.run_id == run_id:
            return run
    raise LogReadError(f"no run {run_id!r} in {runs[0].paths[0].parent}; runs: {', '.join(r.run_id for r in runs)}")


_RECORD_START = b'{"time":'  # how every line the library writes begins


def read_records(run: MetricsRun, warn: Callable[[str], None] = lambda message: None) -> Iterator[dict[str, Any]]:
    """Every record of ``run`` in order, one dict per JSON line, read lazily (constant memory).

    A last line of the run without its newline that is not complete JSON (the run is still writing
    it, or was killed while writing it) is skipped with one call to ``warn``; so is a record cut
    short anywhere (it begins as every record does but does not end: a write that failed, e.g. on a
    full disk).

    Raises:
        LogReadError: a file cannot be read; any other line is not a JSON object (names file and
            line number); a ``run_start`` record has a ``schema_version`` newer than this reader's.
    """
    for path in run.paths:
        with _open(path) as handle:
            for number, line in enumerate(handle, 1):
                try:  # _parse, inlined for the common case: this loop is the hot path of every command
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    record = None
                if type(record) is not dict:
                    if not line.strip():
                        continue
                    if path == run.paths[-1] and not line.endswith(b"\n") and not handle.read(1):
                        warn(f"{path}: the last line (line {number}) is incomplete, as when a run is still "
                             "writing it or was killed; it is skipped")
                        return
                    if line.startswith(_RECORD_START) and line.strip() and not line.rstrip().endswith(b"}"):
                        warn(f"{path}: line {number} is a record cut short (a write that failed, e.g. on a "
                             "full disk); it is skipped")
                        continue
                    record = _parse(line, path, number)  # raises the error that names the problem
                if record.get("event") == "run_start":
                    _check_schema(record, path)
                yield record


class RunFollower:
    """A run's records as they are appended, across rotations (like ``tail -F``).

    Each :meth:`poll` returns the records completed since the previous one: the first poll reads the
    rotated files and what the active file holds; later polls read what was appended. A line is
    taken once it ends with a newline. When the active file is renamed by rotation, the rest of the
    renamed file is read before the new active file.

    Raises (from :meth:`poll`):
        LogReadError: a complete line that is not a JSON object, or a newer ``schema_version``.
    """

    def __init__(self, run: MetricsRun) -> None:
        self.run = run
        self._handle: BinaryIO | None = None
        self._pending = b""
        self._line_number = 0
        self._started = False

    def poll(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        if not self._started:
            self._started = True
            for path in self.run.paths:
                if path != self.run.active_path:
                    records += read_records(MetricsRun(self.run.run_id, (path,)))
        if self._handle is None:
            self._open_active()
        if self._handle is not None:
            rotated = self._rotated()
            records += self._drain()
            if rotated:
                self._handle.close()
                self._handle = None
                self._open_active()
                records += self._drain()
        return records

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _open_active(self) -> None:
        try:
            self._handle = open(self.run.active_path, "rb")
        except FileNotFoundError:
            return
        except OSError as exc:
            raise LogReadError(f"cannot read {self.run.active_path}: {exc.strerror}") from None
        self._pending, self._line_number = b"", 0

    def _rotated(self) -> bool:
        try:
            return os.stat(self.run.active_path).st_ino != os.fstat(self._handle.fileno()).st_ino
        except FileNotFoundError:
            return True

    def _drain(self) -> list[dict[str, Any]]:
        if self._handle is None:
            return []
        *lines, self._pending = (self._pending + self._handle.read()).split(b"\n")
        records = []
        for line in lines:
            self._line_number += 1
            if line.strip():
                records.append(_parse(line, self.run.active_path, self._line_number))
        return records


def _open(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise LogReadError(f"cannot read {path}: {exc.strerror}") from None


def _parse(line: bytes, path: Path, number: int) -> dict[str, Any]:
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise LogReadError(f"{path}: line {number} is not valid JSON ({exc}); only a run's last line, "
                           "before its newline is written, may be incomplete") from None
    if type(record) is not dict:
        raise LogReadError(f"{path}: line {number} is not a JSON object")
    if record.get("event") == "run_start":
        _check_schema(record, path)
    return record


def _check_schema(run_start: dict[str, Any], path: Path) -> None:
    version = run_start.get("schema_version", 1)  # files from before the field existed are version 1
    if not isinstance(version, int) or isinstance(version, bool) or version > SCHEMA_VERSION:
        raise LogReadError(f"{path} was written with metrics schema version {version!r}; this seo-trainlog "
                           f"reads versions up to {SCHEMA_VERSION}: upgrade seo_trainlog to read it")


def _stamp_order(run_id: str) -> tuple[str, int]:
    return run_id[:15], int(run_id[16:] or 0)
