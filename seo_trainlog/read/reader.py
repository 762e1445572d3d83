"""Reading a log directory's JSON metrics back: which runs it holds, and each run's records as one
stream over its rotated files, all at once or as training appends them. Nothing here interprets a
record beyond its ``event`` and the ``schema_version`` of ``run_start``."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from ..record.format import SCHEMA_VERSION

# performance_metrics_[<tag>_]<stamp>.log, rotated by loguru to ...<stamp>.<date>[.<n>].log; the tag is
# node<N> (a node leader's file set) or rank<N> (another rank's per-rank metrics), absent on global rank 0
_METRICS_FILE = re.compile(r"^performance_metrics_(?:((?:node|rank)\d+)_)?(\d{8}_\d{6}(?:_\d+)?)"
                           r"(?:\.(\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d{6})(?:\.(\d+))?)?\.log$")


class LogReadError(Exception):
    """A log directory or metrics file that cannot be read. The message is one line, for the user."""


@dataclass(frozen=True)
class MetricsRun:
    """One run's JSON metrics files of one process: ``paths`` holds the rotated files oldest first,
    then the active ``performance_metrics_[<tag>_]<run_id>.log``; together they are one stream of
    records. ``tag`` is ``""`` for global rank 0's files, ``node<N>`` for a node leader's, ``rank<N>``
    for another rank's per-rank metrics."""

    run_id: str
    paths: tuple[Path, ...]
    tag: str = ""

    @property
    def active_path(self) -> Path:
        return self.paths[0].with_name(f"performance_metrics_{self._tag_part}{self.run_id}.log")

    @property
    def manifest_path(self) -> Path:
        """``run_manifest_[<tag>_]<run_id>.json`` beside the metrics files (it may not exist)."""
        return self.paths[0].with_name(f"run_manifest_{self._tag_part}{self.run_id}.json")

    @property
    def _tag_part(self) -> str:
        return f"{self.tag}_" if self.tag else ""


def find_runs(log_dir: str | os.PathLike[str]) -> list[MetricsRun]:
    """The runs of ``log_dir``, oldest first (by stamp ``YYYYMMDD_HHMMSS``, then its ``_1``, ``_2``...):
    each one's ``performance_metrics_<stamp>[.<rotation date>[.<n>]].log`` files (a run's
    ``run_manifest_<stamp>.json`` is not one of them: see :func:`read_manifest`). A run of which the
    directory holds no global rank 0 files but a node leader's (the directory of another node of a
    multi-node run) is read from that node's ``performance_metrics_node<N>_<stamp>.log`` (the lowest
    ``N`` when several). ``rank<N>`` files are never runs of their own (see :func:`find_process_files`).

    Raises:
        LogReadError: the directory is missing or unreadable, or holds no metrics file of a run.
    """
    files = _metrics_files(log_dir)
    runs = []
    for run_id in sorted({run_id for run_id, _ in files}, key=_stamp_order):
        tags = sorted((tag for rid, tag in files if rid == run_id and not tag.startswith("rank")), key=_tag_order)
        if tags:
            runs.append(MetricsRun(run_id, files[(run_id, tags[0])], tags[0]))
    if not runs:
        raise LogReadError(f"{log_dir} holds no performance_metrics_*.log file of a run (no seo_trainlog run was "
                           "logged there)")
    return runs


def find_process_files(log_dirs: list[str | os.PathLike[str]], run_id: str) -> list[MetricsRun]:
    """Every process's metrics files of run ``run_id`` in ``log_dirs`` (e.g. gathered from the nodes
    of a multi-node run): global rank 0's, each node leader's (``node<N>``) and each other rank's
    (``rank<N>``), one :class:`MetricsRun` per process and directory. A directory that cannot be read
    or holds none of the run's files adds nothing.
    """
    found = []
    for log_dir in log_dirs:
        try:
            files = _metrics_files(log_dir)
        except LogReadError:
            continue
        for (rid, tag), paths in sorted(files.items(), key=lambda item: _tag_order(item[0][1])):
            if rid == run_id:
                found.append(MetricsRun(run_id, paths, tag))
    return found


def _metrics_files(log_dir: str | os.PathLike[str]) -> dict[tuple[str, str], tuple[Path, ...]]:
    """``{(run_id, tag): paths oldest first}`` of the metrics files in ``log_dir``."""
    directory = Path(log_dir)
    if not directory.is_dir():
        raise LogReadError(f"{directory} is not a directory (no such log directory)")
    try:
        names = os.listdir(directory)
    except OSError as exc:
        raise LogReadError(f"cannot list {directory}: {exc.strerror}") from None
    files: dict[tuple[str, str], list[tuple[tuple[str, int], Path]]] = {}
    for name in names:
        match = _METRICS_FILE.match(name)
        if match:
            tag, run_id, date, counter = match.groups()
            order = (date, int(counter or 1)) if date else ("~", 0)  # "~" sorts the active file last
            files.setdefault((run_id, tag or ""), []).append((order, directory / name))
    if not files:
        raise LogReadError(f"{directory} holds no performance_metrics_*.log file (no seo_trainlog run was "
                           "logged there)")
    return {key: tuple(path for _, path in sorted(entries)) for key, entries in files.items()}


def _tag_order(tag: str) -> tuple[int, int]:
    """Global rank 0's files first, then node leaders', then other ranks', each by number."""
    if not tag:
        return (0, 0)
    return (1 if tag.startswith("node") else 2, int(tag[4:]))


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
CHUNK_BYTES = 1 << 20  # read this much at a time
MAX_LINE_BYTES = 16 << 20  # a longer line is skipped without being held whole (records are under 1 MiB)
MANIFEST_SCHEMA_VERSION = 1
MAX_MANIFEST_BYTES = 16 << 20


def read_records(run: MetricsRun, warn: Callable[[str], None] = lambda message: None) -> Iterator[dict[str, Any]]:
    """Every record of ``run`` in order, one dict per JSON line, read lazily in chunks of
    :data:`CHUNK_BYTES` (memory stays bounded whatever the files hold).

    Skipped with one call to ``warn`` each (naming the file and line number): a last line of the run
    without its newline that is not complete JSON (the run is still writing it, or was killed while
    writing it); a record cut short anywhere (it begins as every record does but does not end: a
    write that failed, e.g. on a full disk); a line longer than :data:`MAX_LINE_BYTES` (never held
    whole); a line of NUL bytes (a file extended by a crash). NUL bytes before a record are dropped
    with a warning and the record read.

    Raises:
        LogReadError: a file cannot be read; any other line is not a JSON object (names file and
            line number); a ``run_start`` record has a ``schema_version`` newer than this reader's.
    """
    for path in run.paths:
        lines = _Lines(path, warn)
        with _open(path) as handle:
            while True:
                chunk = _read(handle, path)
                if not chunk:
                    break
                yield from _records(*lines.feed(chunk), path, warn)
                if lines.skipping:
                    _skip_hole(handle)
        last = lines.rest()
        if last is not None:
            number, line = last
            record = _record(line, path, number, warn, last=path == run.paths[-1])
            if record is not None:
                yield record


class _Lines:
    """Splits a file's bytes, fed in chunks, into lines without the newline, numbered from 1; a line
    that grows past :data:`MAX_LINE_BYTES` is dropped as it comes (one warning), never held whole."""

    def __init__(self, path: Path, warn: Callable[[str], None]) -> None:
        self.path, self.warn = path, warn
        self.number = 0
        self._pending = bytearray()
        self.skipping = False  # within a line too long, until its newline

    def feed(self, chunk: bytes) -> tuple[list[bytes], int]:
        """``(lines, number of the first)``: the lines that ``chunk`` completes."""
        start = 0
        if self.skipping:
            start = chunk.find(b"\n") + 1
            if not start:
                return [], 0
            self.skipping = False
        end = chunk.rfind(b"\n")
        if end < start:  # no newline in what is left
            self._pending += chunk[start:] if start else chunk
            self._check_length()
            return [], 0
        pieces = chunk[start:end].split(b"\n")
        if self._pending:
            pieces[0] = bytes(self._pending) + pieces[0]
            self._pending = bytearray()
        self._pending += chunk[end + 1:]
        first = self.number + 1
        self.number += len(pieces)
        self._check_length()
        return pieces, first

    def rest(self) -> tuple[int, bytes] | None:
        """The last line when it has no newline (``None`` when there is none)."""
        if self.skipping or not self._pending:
            return None
        self.number += 1
        return self.number, bytes(self._pending)

    def _check_length(self) -> None:
        if len(self._pending) > MAX_LINE_BYTES:
            self.number += 1
            self.warn(f"{self.path}: line {self.number} is longer than {MAX_LINE_BYTES >> 20} MiB, which no "
                      "record is (a damaged file, e.g. one filled with NUL bytes); it is skipped")
            self._pending = bytearray()
            self.skipping = True


def _records(lines: list[bytes], first: int, path: Path, warn: Callable[[str], None]) -> Iterator[dict[str, Any]]:
    """The records of ``lines`` (complete lines of ``path``, the first one numbered ``first``), as
    :func:`_record` classifies them: a line that is a JSON object other than ``run_start`` (nearly
    every line) costs one parse and one lookup, any other line is left to :func:`_record`."""
    loads, error = orjson.loads, orjson.JSONDecodeError
    for number, line in enumerate(lines, first):
        try:
            record = loads(line)
        except error:
            record = None
        if type(record) is dict and record.get("event") != "run_start":
            yield record
        else:
            record = _record(line, path, number, warn)
            if record is not None:
                yield record


def _record(line: bytes, path: Path, number: int, warn: Callable[[str], None],
            last: bool = False) -> dict[str, Any] | None:
    """The record of one line, or ``None`` for a line skipped (see :func:`read_records`); ``last``:
    the run's last line, without its newline. The one place every reader classifies a line."""
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        record = None
    if type(record) is not dict:
        if b"\x00" in line[:1] or b"\x00" in line[-1:]:
            nuls = len(line) - len(line.strip(b"\x00"))
            line = line.strip(b"\x00")
            warn(f"{path}: line {number} holds {nuls} NUL bytes (a file extended by a crash); they are skipped")
            if not line.strip():
                return None
            return _record(line, path, number, warn, last)
        if not line.strip():
            return None
        if last:
            warn(f"{path}: the last line (line {number}) is incomplete, as when a run is still "
                 "writing it or was killed; it is skipped")
            return None
        if line.startswith(_RECORD_START) and not line.rstrip().endswith(b"}"):
            warn(f"{path}: line {number} is a record cut short (a write that failed, e.g. on a "
                 "full disk); it is skipped")
            return None
        record = _parse(line, path, number)  # raises the error that names the problem
    if record.get("event") == "run_start":
        _check_schema(record, path)
    return record


class RunFollower:
    """A run's records as they are appended, across rotations (like ``tail -F``).

    Each :meth:`poll` yields the records completed since the previous one, lazily (consume them
    before the next poll): the first poll reads the rotated files and what the active file holds;
    later polls read what was appended, in chunks of :data:`CHUNK_BYTES`. A line is taken once it
    ends with a newline, and classified as :func:`read_records` does (a record cut short, a line
    too long or of NUL bytes: skipped, with the same warning through ``warn``). When the active
    file is renamed by rotation, the rest of the renamed file is read before the new active file.

    Raises (from :meth:`poll`):
        LogReadError: a file cannot be read, a complete line that is not a JSON object, or a newer
            ``schema_version``.
    """

    def __init__(self, run: MetricsRun, warn: Callable[[str], None] = lambda message: None) -> None:
        self.run = run
        self.warn = warn
        self._handle: BinaryIO | None = None
        self._lines = _Lines(run.active_path, warn)
        self._started = False

    def poll(self) -> Iterator[dict[str, Any]]:
        if not self._started:
            self._started = True
            rotated = tuple(path for path in self.run.paths if path != self.run.active_path)
            yield from read_records(MetricsRun(self.run.run_id, rotated, self.run.tag), self.warn)
        if self._handle is None:
            self._open_active()
        if self._handle is not None:
            rotated = self._rotated()
            yield from self._drain()
            if rotated:
                rest = self._lines.rest()
                if rest is not None:  # loguru ends its lines before rotating: a write cut short
                    record = _record(rest[1], self.run.active_path, rest[0], self.warn)
                    if record is not None:
                        yield record
                self._handle.close()
                self._handle = None
                self._open_active()
                yield from self._drain()

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
        self._lines = _Lines(self.run.active_path, self.warn)

    def _rotated(self) -> bool:
        try:
            return os.stat(self.run.active_path).st_ino != os.fstat(self._handle.fileno()).st_ino
        except FileNotFoundError:
            return True

    def _drain(self) -> Iterator[dict[str, Any]]:
        path = self.run.active_path
        while self._handle is not None:
            chunk = _read(self._handle, path)
            if not chunk:
                return
            yield from _records(*self._lines.feed(chunk), path, self.warn)


def read_manifest(run: MetricsRun, warn: Callable[[str], None] = lambda message: None) -> dict[str, Any] | None:
    """The run's manifest ``run_manifest_<run_id>.json`` (written by the run outside rotation: its
    start, hyperparameters, ``max_steps``, segments, train totals, eval totals, counts and last
    summary), or ``None`` when there is none. See :func:`load_manifest`."""
    return load_manifest(run, warn)[0]


# the manifest's fields the readers use and the JSON types they must have (null is accepted too)
MANIFEST_FIELDS: dict[str, tuple[type, str]] = {
    "started": (str, "a string"), "max_steps": (int, "an integer"), "status": (str, "a string"),
    "hyperparameters": (dict, "an object"), "segments": (list, "a list"), "train": (dict, "an object"),
    "eval": (dict, "an object"), "counts": (dict, "an object"), "summary": (dict, "an object")}


def load_manifest(run: MetricsRun, warn: Callable[[str], None] = lambda message: None
                  ) -> tuple[dict[str, Any] | None, str | None]:
    """``(manifest, problem)``: the run's manifest (``None`` when there is none or it cannot be
    used) and, for one that exists but cannot be used, why (``is not valid JSON (...)``, ``is not
    a JSON object``, ``cannot be read: Permission denied``, ``is larger than 16 MiB``, ``has
    schema version 2 (...)``, ``is the manifest of run '...'``), said once through ``warn``. A
    field of :data:`MANIFEST_FIELDS` of the wrong JSON type is left out with one call to ``warn``
    each and the rest used; ``problem`` then names them (``its started, max_steps of the wrong type
    not used``). Raises nothing."""
    path = run.manifest_path
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        problem = f"cannot be read: {exc.strerror}"
        warn(f"{path} {problem}; the run's totals in it are not used")
        return None, problem
    problem = None
    try:
        manifest = orjson.loads(data) if len(data) <= MAX_MANIFEST_BYTES else None
    except orjson.JSONDecodeError as exc:
        manifest, problem = None, f"is not valid JSON ({exc}: cut short or damaged)"
    version = manifest.get("schema_version", 1) if type(manifest) is dict else None
    if problem:
        pass
    elif type(manifest) is not dict:
        problem = "is not a JSON object" if len(data) <= MAX_MANIFEST_BYTES else \
            f"is larger than {MAX_MANIFEST_BYTES >> 20} MiB"
    elif type(version) is not int or version > MANIFEST_SCHEMA_VERSION:
        problem = f"has schema version {version!r} (this seo-trainlog reads up to {MANIFEST_SCHEMA_VERSION})"
    elif manifest.get("run_id", run.run_id) != run.run_id:
        problem = f"is the manifest of run {manifest.get('run_id')!r}"
    if problem:
        warn(f"{path} {problem}; the run's totals in it are not used")
        return None, problem
    ignored = []
    for key, (kind, name) in MANIFEST_FIELDS.items():
        value = manifest.get(key)
        if value is not None and type(value) is not kind:
            warn(f"{path}: its {key!r} is {_json_type(value)}, not {name}; that field is not used")
            del manifest[key]
            ignored.append(key)
    return manifest, f"its {', '.join(ignored)} of the wrong type not used" if ignored else None


def _json_type(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _open(path: Path) -> BinaryIO:
    try:
        return open(path, "rb", buffering=0)  # reads of CHUNK_BYTES need no buffer
    except OSError as exc:
        raise LogReadError(f"cannot read {path}: {exc.strerror}") from None


def _skip_hole(handle: BinaryIO) -> None:
    """Move past a hole of a sparse file (NUL bytes that take no disk: a file extended by ``truncate``
    or a crash), which holds no newline; a file system without ``SEEK_DATA`` is read through."""
    try:
        handle.seek(os.lseek(handle.fileno(), handle.tell(), os.SEEK_DATA))
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # nothing but a hole up to the end
            handle.seek(0, os.SEEK_END)


def _read(handle: BinaryIO, path: Path) -> bytes:
    try:
        return handle.read(CHUNK_BYTES)
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
