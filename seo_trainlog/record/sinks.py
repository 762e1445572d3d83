"""The loguru side: seo_trainlog's own logger, and the sinks (files, console, stdlib bridge) of one run."""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import sysconfig
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loguru._better_exceptions import ExceptionFormatter
from loguru._file_sink import FileSink
from loguru._logger import Core, Logger
from loguru._string_parsers import parse_size

from .._categories import CATEGORIES, Category, accepted_names
from .._secrets import REDACTOR

# An independent loguru logger: a Core of its own, so that our records never reach the user's
# handlers on ``loguru.logger`` (its default stderr handler included), and the user's
# ``logger.remove()`` never removes ours. This is what ``loguru.logger`` itself is built from.
# Every record's message passes the secret redactor first.
logger = Logger(core=Core(), exception=None, depth=0, record=False, lazy=False, colors=False, raw=False,
                capture=True, patchers=[REDACTOR.redact_record], extra={})

# Records arrive fully formatted (_format.text_block, _format.json_line, the console line); loguru
# appends the newline. One text record can carry the several lines of one event.
LEVEL_NO = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}
BRIDGED_LIBRARIES = ("transformers", "datasets", "accelerate")
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def logging_busy() -> bool:
    """True while this thread is inside one of our loguru handlers or loguru's core lock is held: a
    signal handler must not write through the logger then (loguru's handlers are not re-entrant)."""
    core = logger._core
    if core.lock.locked():
        return True
    return any(getattr(handler._lock_acquired, "acquired", False) for handler in list(core.handlers.values()))


_LIB_DIRS: dict[tuple[str, ...], list[str]] = {}  # sys.path -> loguru's library directories in it
_ADD_LOCK = threading.Lock()


def _lib_dirs() -> list[str]:
    """What loguru's ``ExceptionFormatter._get_lib_dirs`` returns (the stdlib and site-packages
    directories of every ``sysconfig`` scheme that are on ``sys.path``, lower-cased, with a trailing
    separator), with one ``sysconfig.get_paths`` per scheme instead of one per scheme and name, and
    computed once per ``sys.path``."""
    key = tuple(sys.path)
    if key not in _LIB_DIRS:
        names = ("stdlib", "platstdlib", "platlib", "purelib")
        paths = {path for scheme in sysconfig.get_scheme_names()
                 for name, path in sysconfig.get_paths(scheme).items() if name in names}
        _LIB_DIRS[key] = [os.path.abspath(path).lower() + os.sep for path in paths if path in sys.path]
    return list(_LIB_DIRS[key])


_lib_dirs()  # at import: the first run's handler is added without these 36 sysconfig look-ups (1.5 ms)


def _add_handler(sink: Callable[..., object], **options: object) -> int:
    """``logger.add(sink, **options)`` without recomputing, at every run, the library directories
    loguru's exception formatter finds through ``sysconfig`` (36 ``sysconfig.get_path`` calls, about
    5 ms, then the larger part of opening a run): :func:`_lib_dirs` is swapped in for the duration of
    this call only, and gives any caller the same list as loguru's own; with a loguru that has no
    such lookup the add is loguru's own."""
    compute = ExceptionFormatter.__dict__.get("_get_lib_dirs")
    if not isinstance(compute, staticmethod):
        return logger.add(sink, **options)
    with _ADD_LOCK:
        ExceptionFormatter._get_lib_dirs = staticmethod(_lib_dirs)
        try:
            return logger.add(sink, **options)
        finally:
            ExceptionFormatter._get_lib_dirs = compute


def probe_file_options(rotation: object = None, retention: object = None, encoding: str = "utf-8") -> None:
    """Let loguru validate ``rotation``/``retention`` without creating any file (``delay=True``).

    Raises:
        ValueError, TypeError: as loguru raises them for a value it cannot parse.
    """
    try:
        _probe_cached(rotation, retention, encoding)  # the same settings at every run: checked once
    except TypeError as error:
        if "unhashable" not in str(error):
            raise
        _probe(rotation, retention, encoding)


def _probe(rotation: object, retention: object, encoding: str) -> None:
    path = os.path.join(tempfile.gettempdir(), "seo_trainlog-option-probe.log")
    FileSink(path, rotation=rotation, retention=retention, encoding=encoding, delay=True)


_probe_cached = functools.lru_cache(maxsize=32)(_probe)  # lru_cache keeps no exception: a bad value raises each time


def claim_stamp(log_dir: Path, first_prefix: str) -> str:
    """A ``YYYYMMDD_HHMMSS`` run stamp unique in ``log_dir``.

    The stamp is claimed by creating ``<first_prefix>_<stamp>.log`` exclusively; when another run
    already holds this second, ``_1``, ``_2``... are appended.
    """
    base = time.strftime("%Y%m%d_%H%M%S")
    for attempt in range(10_000):
        stamp = base if attempt == 0 else f"{base}_{attempt}"
        try:
            with open(log_dir / f"{first_prefix}_{stamp}.log", "x", encoding="utf-8"):
                return stamp
        except FileExistsError:
            continue
    raise OSError(f"seo_trainlog: no free run stamp left in {log_dir} for {base}")


def prepare_log_dir(log_dir: Path) -> Path:
    """Create ``log_dir`` and check that files can be written there.

    Raises:
        OSError: naming the directory and the reason (not a directory, permission denied, ...).
    """
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        # a file of this process and thread (never another's), created, closed and removed; created
        # exclusively: what is already at that name (a link placed there, a file left by a process
        # killed mid-check) is removed, never followed or truncated
        probe = os.path.join(log_dir, f".seo_trainlog-write-check-{os.getpid()}-{threading.get_ident()}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            descriptor = os.open(probe, flags, 0o600)
        except FileExistsError:
            os.unlink(probe)
            descriptor = os.open(probe, flags, 0o600)
        os.close(descriptor)
        os.unlink(probe)
    except OSError as exc:
        raise OSError(exc.errno, f"seo_trainlog cannot write log files to {str(log_dir)!r}: "
                                 f"{exc.strerror or exc}") from None
    return log_dir.resolve()


def run_categories(config, full_set: bool = True) -> list[Category]:
    """The categories a run writes a file for: every enabled one (``debug`` only with
    ``config.debug``) or, where ``full_set`` is false, only the ``per_rank`` ones."""
    return [category for category in CATEGORIES
            if not (category.debug_only and not config.debug) and (full_set or category.per_rank)]


def run_files(config, run_id: str, log_dir: Path, tag: str, full_set: bool = True) -> dict[str, Path]:
    """``{category name: path}`` of the files :func:`open_sinks` opens for these arguments."""
    return {category.name: file_path(log_dir, category, run_id, tag) for category in run_categories(config, full_set)}


def file_path(log_dir: Path, category: Category, stamp: str, tag: str = "") -> Path:
    """``<prefix>_<stamp>.log`` (global rank 0); with the process's file ``tag``
    (:attr:`~seo_trainlog.record.rank.ProcessRole.file_tag`) ``<prefix>_node<N>_<stamp>.log`` on a node
    leader, ``<prefix>_rank<N>_<stamp>.log`` on any other rank."""
    return log_dir / f"{category.prefix}{f'_{tag}' if tag else ''}_{stamp}.log"


class SinkFailures:
    """Write failures of our sinks, reported once per sink by the next record written elsewhere.

    A sink cannot log from inside its own ``write`` (loguru holds the handler's lock), so failures
    are queued here and :class:`~seo_trainlog.TrainLogger` turns them into WARNING records.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[str] = []

    def add(self, message: str) -> None:
        with self._lock:
            self._pending.append(message)

    def take(self) -> list[str]:
        if not self._pending:
            return []
        with self._lock:
            pending, self._pending = self._pending, []
        return pending


SINK_FAILURES = SinkFailures()


class SizeRotation:
    """loguru's size rotation without its ``seek``/``tell`` per record (on a text file, ``seek``
    flushes the buffer, which would make every record a write to disk): the bytes written are
    counted instead."""

    def __init__(self, limit_bytes: float, path: Path, encoding: str) -> None:
        self.limit_bytes = limit_bytes
        self.encoding = encoding
        try:
            self.size = path.stat().st_size  # appending to an existing file
        except OSError:
            self.size = 0

    def __call__(self, message: str, file) -> bool:
        size = len(message.encode(self.encoding, errors="backslashreplace"))
        if self.size + size > self.limit_bytes and self.size > 0:
            self.size = size
            return True
        self.size += size
        return False


@dataclass
class _WriteState:
    """What the files of one :class:`GuardedFileSink` (the current one and those before a rotation)
    tell it: the disk's last refusal (None once a write got through), how many writes got through,
    how many records were lost."""

    error: Exception | None = None
    drains: int = 0
    lost_records: int = 0


class RecordFile:
    """The file object a :class:`GuardedFileSink` writes through, in place of loguru's text file.

    Records are encoded (``errors`` as :func:`open`'s) and held in memory, then written with one
    system call per batch: a durable file at every record, the others once ``BLOCK_BYTES`` are held
    and at :meth:`flush`. What the disk refuses (full, gone) stays held from the first byte it did
    not take, and goes with the next attempt: no byte is written twice, and a record cut short by a
    full disk is completed when space returns. While the disk refuses, at most ``HOLD_BYTES`` are
    held; a record beyond is dropped whole. Records dropped, and those still held when the file is
    closed, are counted in ``state.lost_records``. ``write`` and ``flush`` never raise for the disk:
    ``state.error`` says it refused.
    """

    BLOCK_BYTES = 64 * 1024
    HOLD_BYTES = 4 * 1024 * 1024

    def __init__(self, path: str, encoding: str, errors: str, durable: bool, state: _WriteState) -> None:
        self.name = path
        self.encoding = encoding
        self._errors = errors
        self._durable = durable
        self._state = state
        self._held: list[bytes] = []  # records not written yet (the first may be the tail of one)
        self._held_bytes = 0
        self._pid = os.getpid()
        self._raw = open(path, "ab", buffering=0)  # noqa: SIM115 - closed by close()

    @property
    def closed(self) -> bool:
        return self._raw.closed

    def fileno(self) -> int:
        return self._raw.fileno()

    def tell(self) -> int:
        """The size the file will have once what is held is written (rotation functions ask it)."""
        return os.fstat(self._raw.fileno()).st_size + self._held_bytes

    def seek(self, offset: int, whence: int = 0) -> int:  # appended to only: where it would be
        return self.tell()

    def write(self, text: str) -> int:
        data = text.encode(self.encoding, self._errors)
        if self._state.error is not None and self._held_bytes + len(data) > self.HOLD_BYTES and not self._drain():
            self._state.lost_records += 1  # the disk still refuses and enough is held: this record is lost
            return 0
        self._held.append(data)
        self._held_bytes += len(data)
        if self._durable or self._held_bytes >= self.BLOCK_BYTES:
            self._drain()
        return len(text)

    def flush(self) -> None:
        self._drain()

    def _drain(self) -> bool:
        held = self._held
        if not held:
            return True
        data = held[0] if len(held) == 1 else b"".join(held)
        written = 0
        try:
            with memoryview(data) as view:
                while written < len(data):
                    count = self._raw.write(view[written:])
                    if not count:
                        raise OSError(f"{self.name}: the file took no bytes")
                    written += count
        except OSError as error:
            self._keep_unwritten(written)
            self._state.error = error
            return False
        held.clear()
        self._held_bytes = 0
        self._state.error = None
        self._state.drains += 1
        return True

    def _keep_unwritten(self, written: int) -> None:
        for index, record in enumerate(self._held):
            if written < len(record):
                self._held = [record[written:], *self._held[index + 1:]]
                self._held_bytes = sum(map(len, self._held))
                return
            written -= len(record)

    def close(self) -> None:
        """Write what is held (what the disk still refuses is lost and counted), close the file."""
        if self._raw.closed:
            return
        try:
            self._drain()
        finally:
            self._state.lost_records += len(self._held)
            self._held, self._held_bytes = [], 0
            self._raw.close()

    def __del__(self) -> None:  # as a text file would, at exit; never in a forked child
        try:
            if self._pid == os.getpid():
                self.close()
        except Exception:
            pass


class _RecordFileSink(FileSink):
    """loguru's ``FileSink`` (path template, rotation, retention) writing through a :class:`RecordFile`."""

    def __init__(self, path: str, *, durable: bool, state: _WriteState, **kwargs) -> None:
        self._durable = durable
        self._state = state
        super().__init__(path, **kwargs)

    def _create_file(self, path: str) -> None:
        self._file = RecordFile(path, self.encoding, self._kwargs.get("errors") or "strict", self._durable,
                                self._state)
        self._file_path = path


class GuardedFileSink:
    """A loguru ``FileSink`` (rotation, retention, UTF-8) that survives write trouble.

    ``durable`` files are written at every record: a record is on disk (in the OS) when its write
    returns. The others hold records up to 64 KiB and are written by :meth:`flush` (the run's
    flusher thread calls it every ``flush_interval_s``, and closing flushes): far fewer system
    calls in the training loop.

    A failed write (disk full, file system gone) never reaches the training: it is reported once
    through ``failures`` (the run's own :class:`SinkFailures`); what the disk refused is kept (up to 4 MiB) and written with the
    next attempt from the byte where it stopped, so that no record is written twice and a record cut
    short is completed; "works again after N lost records" is said once a write gets through, N
    counting exactly the records that never reached the file (see :class:`RecordFile`). A rotation
    that fails (rename refused) is switched off so that records go on being appended to the current
    file. A file someone removed or moved away is reopened at its path (checked at most once a
    second, not at every record as loguru's ``watch=True`` does).
    """

    WATCH_INTERVAL_S = 1.0

    def __init__(self, path: Path, rotation: object, retention: object, encoding: str, durable: bool,
                 failures: SinkFailures | None = None, delay: bool = False) -> None:
        self.failures = failures if failures is not None else SINK_FAILURES  # where trouble is reported
        self.path = path
        self.durable = durable
        self.dirty = False
        if rotation is not None and not callable(rotation):
            size = rotation if isinstance(rotation, (int, float)) and not isinstance(rotation, bool) else \
                _parse_size(rotation)
            if size is not None:
                rotation = SizeRotation(size, path, encoding)
        self._state = _WriteState()
        self._sink = _RecordFileSink(_escape_braces(str(path)), durable=durable, state=self._state, rotation=rotation,
                                     retention=retention, encoding=encoding, errors="backslashreplace",
                                     delay=delay)
        self._failing = False
        self._new_line = False  # after a write that raised: the file may end in a partial line
        self._watched_at = time.monotonic()
        self.failed_writes = 0  # records whose write raised, twice
        self._lost_reported = 0

    @property
    def lost_records(self) -> int:
        """Records that never reached the file: writes that raised twice, and records the disk refused
        that could not be kept (see :class:`RecordFile`)."""
        return self.failed_writes + self._state.lost_records

    @property
    def opened(self) -> bool:
        return self._sink._file is not None

    def open(self) -> None:
        """Create the file of a sink made with ``delay`` (a record written first creates it itself).

        Raises:
            OSError: as :func:`open` raises it (the next record retries, and reports a failure).
        """
        if self._sink._file is None:
            path = self._sink._create_path()
            self._sink._create_dirs(path)
            self._sink._create_file(path)

    def write(self, message: str) -> None:
        now = time.monotonic()
        if now - self._watched_at >= self.WATCH_INTERVAL_S:
            self._watched_at = now
            self._reopen_if_removed()
        drains = self._state.drains
        try:
            self._put(message)
            self.dirty = not self.durable
        except Exception as error:
            self._recover(message, error)
            return
        self._settle(drains)

    def _put(self, message: str) -> None:
        self._sink.write("\n" + message if self._new_line else message)
        self._new_line = False

    def _settle(self, drains: int) -> None:
        """After a write or flush: report the disk refusing, or taking records again."""
        if self._state.error is not None:
            self._fail(self._state.error)
        elif self._failing and self._state.drains > drains:
            self._recovered()

    def _fail(self, error: Exception) -> None:
        if not self._failing:
            self._failing = True
            self.failures.add(f"cannot write to {self.path}: {type(error).__name__}: {error}; "
                              "training goes on and the file is retried with every record")

    def _recovered(self) -> None:
        self._failing = False
        lost = self.lost_records - self._lost_reported
        self._lost_reported += lost
        self.failures.add(f"writing to {self.path} works again after {lost} lost record{'' if lost == 1 else 's'}")

    def _reopen_if_removed(self) -> None:
        handle, path = self._sink._file, self._sink._file_path
        if handle is None or path is None:
            return
        try:
            on_disk, opened = os.stat(path), os.fstat(handle.fileno())
            removed = (on_disk.st_dev, on_disk.st_ino) != (opened.st_dev, opened.st_ino)
        except FileNotFoundError:
            removed = True
        except (OSError, ValueError):
            return
        if removed:
            try:
                self._sink._close_file()
                self._sink._create_dirs(path)
                self._sink._create_file(path)
            except OSError as error:  # the next write creates the file
                self._sink._file = self._sink._file_path = None
                self._fail(error)
                return
            if isinstance(self._sink._rotation_function, SizeRotation):
                self._sink._rotation_function.size = 0  # a new, empty file

    def _recover(self, message: str, error: Exception) -> None:
        """The write raised before the record reached the file (rotation, creating the file) or
        while writing it: retry once, on a line of its own."""
        rotation_failed = self._sink._rotation_function is not None and _raised_in_rotation(error)
        if rotation_failed:
            self._sink._rotation_function = None  # keep appending to the current file instead
        else:
            self._new_line = True
            self._fail(error)
        drains = self._state.drains
        try:
            self._put(message)
            self.dirty = not self.durable
        except Exception as retry_error:
            self.failed_writes += 1
            self._fail(retry_error)
            return
        if rotation_failed:
            self.failures.add(f"rotation of {self.path} failed ({type(error).__name__}: {error}); rotation is "
                              "off for this file and records are appended to it")
        self._settle(drains)

    def flush(self) -> None:
        handle = self._sink._file
        self.dirty = False
        if handle is not None:
            drains = self._state.drains
            try:
                handle.flush()
            except Exception as exc:
                self._fail(exc)
                return
            self.dirty = self._state.error is not None  # what the disk refused: retried at the next flush
            self._settle(drains)

    def stop(self) -> None:
        lost = self.lost_records
        try:
            self._sink.stop()
        except Exception as exc:
            self.failures.add(f"closing {self.path} failed: {type(exc).__name__}: {exc}")
        if self.lost_records > lost:
            unwritten = self.lost_records - lost
            self.failures.add(f"closing {self.path}: {unwritten} record{'' if unwritten == 1 else 's'} the disk "
                              "refused could not be written")


def _parse_size(value: object) -> float | None:
    return _parse_size_text(str(value))


@functools.lru_cache(maxsize=64)  # the same rotation setting for each file of each run
def _parse_size_text(text: str) -> float | None:
    try:
        return parse_size(text)
    except ValueError:
        return None


def _raised_in_rotation(error: Exception) -> bool:
    return any(frame.name == "_terminate_file" for frame in traceback.extract_tb(error.__traceback__))


def _escape_braces(path: str) -> str:
    # loguru formats a file path with ``{time}``; a directory named "exp_{lr}" must stay literal.
    return path.replace("{", "{{").replace("}", "}}")


class ConsoleSink:
    """Writes to the ``sys.stderr`` of the moment (notebooks and pytest replace it); a stderr that
    fails (closed, binary) switches the console off instead of failing the training."""

    def __init__(self, failures: SinkFailures | None = None) -> None:
        self.enabled = True
        self.failures = failures if failures is not None else SINK_FAILURES

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        try:
            stream = sys.stderr
            if stream is not None:
                stream.write(message)
        except Exception as exc:
            self.enabled = False
            self.failures.add(f"console output switched off: sys.stderr failed ({type(exc).__name__}: {exc})")


class CategoryRouter:
    """A run's one loguru handler: each record goes to the sinks of the categories that take it.

    The category table decides: a file sink per enabled category (its own loguru ``FileSink``, with
    the run's rotation and retention), fed the records of its own category and of those it
    ``includes`` at or above its level; the console sink takes the ``console`` records. One loguru
    handler instead of one per file: loguru evaluates one filter per record, and builds one
    exception formatter per run (its costliest start-up step) rather than nine.
    """

    def __init__(self, config, run_id: str, log_dir: Path, tag: str, key: str,
                 failures: SinkFailures | None = None, full_set: bool = True, delay: bool = False) -> None:
        self.run_id = run_id
        self.failures = failures if failures is not None else SinkFailures()  # this run's sinks' trouble
        self.key = key
        self.files: dict[str, Path] = {}
        self._lock = threading.Lock()  # writes (from loguru's handler) against flushes (the flusher thread)
        self._sinks: list[GuardedFileSink | ConsoleSink] = []
        self._routes: dict[str, list[tuple[int, GuardedFileSink | ConsoleSink]]] = {}
        try:
            for category in run_categories(config, full_set):
                path = file_path(log_dir, category, run_id, tag)
                level = category.level
                if category.follows_config_level and LEVEL_NO[config.level] > LEVEL_NO[level]:
                    level = config.level
                # loguru applies retention at close when there is no rotation: it would delete the run
                retention = config.retention if config.rotation is not None else None
                sink = GuardedFileSink(path, config.rotation, retention, config.encoding, failures=self.failures,
                                       durable=category.durable or config.flush_interval_s <= 0, delay=delay)
                self._add(sink, LEVEL_NO[level], accepted_names(category))
                self.files[category.name] = path
            if config.console and not tag:
                self._add(ConsoleSink(self.failures), LEVEL_NO["INFO"], frozenset({"console"}))
        except BaseException:
            self.stop()
            raise

    def _add(self, sink, levelno: int, names: frozenset[str]) -> None:
        self._sinks.append(sink)
        for name in names:
            self._routes.setdefault(name, []).append((levelno, sink))

    def accepts(self, record) -> bool:
        return record["extra"].get("seo_key") == self.key

    def write(self, message) -> None:
        record = message.record
        levelno = record["level"].no
        extra = record["extra"]
        with self._lock:
            # parts of the same event riding along (category, level number, text already masked): a
            # logging step's per-step DEBUG lines (before its text, as they happened), its console line
            for name, part_levelno, text in extra.get("seo_parts", ()):
                for minimum, sink in self._routes.get(name, ()):
                    if part_levelno >= minimum:
                        sink.write(f"{text}\n")
            for minimum, sink in self._routes.get(extra.get("seo_cat"), ()):
                if levelno >= minimum:
                    sink.write(message)
            attached = extra.get("seo_json")  # a JSON line riding along with a text record
            if attached is not None:
                attached = REDACTOR(attached)  # the patcher only sees the message
                for _, sink in self._routes.get("metrics", ()):
                    sink.write(f"{attached}\n")

    def open_files(self) -> None:
        """Create the files not created yet (``delay``: the flusher thread does it as it starts, and
        closing does it for a run too short for that). A record written before its file is created
        creates it itself, in the writing thread: nothing is lost and the order stays. A file that
        cannot be created is reported through ``failures`` (and retried by the next record)."""
        for sink in list(self._sinks):
            if isinstance(sink, GuardedFileSink) and not sink.opened:
                with self._lock:
                    try:
                        sink.open()
                    except Exception as error:
                        sink._fail(error)

    def flush_buffers(self) -> None:
        """Put every buffered record on disk. (Not ``flush``: loguru calls a sink's ``flush`` after
        every record, which is exactly what the buffering avoids.)"""
        with self._lock:
            for sink in self._sinks:
                if isinstance(sink, GuardedFileSink) and sink.dirty:
                    sink.flush()

    def stop(self) -> None:
        with self._lock:
            for sink in self._sinks:
                if isinstance(sink, GuardedFileSink):
                    sink.stop()
            self._sinks.clear()


class Flusher:
    """A daemon thread that flushes a router's buffered files every ``interval_s`` seconds."""

    def __init__(self, router: CategoryRouter, interval_s: float, on_flush: Callable[[], None] | None = None) -> None:
        self._router = router
        self._on_flush = on_flush
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by stop() and poke()
        self._thread = threading.Thread(target=self._run, name="seo_trainlog-flush", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """Flush (and call ``on_flush``) now, in the thread, rather than at the next interval."""
        self._wake.set()

    def _run(self) -> None:
        self._router.open_files()  # the run's files, out of the training thread
        while True:
            self._wake.wait(self._interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            self._router.flush_buffers()
            if self._on_flush is not None:
                try:
                    self._on_flush()
                except Exception:  # reported by the callable itself; the flusher must go on
                    pass

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)


@dataclass
class RunSinks:
    """The handler and stdlib bridges one run added, so that exactly these are removed at close."""

    files: dict[str, Path] = field(default_factory=dict)
    handler_ids: list[int] = field(default_factory=list)
    bridges: list[tuple[logging.Logger, logging.Handler]] = field(default_factory=list)
    router: CategoryRouter | None = None
    flusher: Flusher | None = None

    @property
    def failures(self) -> SinkFailures:
        """Where this run's sinks report trouble (each run its own: never reported in another run)."""
        return self.router.failures if self.router is not None else SINK_FAILURES

    def flush(self) -> None:
        if self.router is not None:
            self.router.flush_buffers()

    def close(self) -> None:
        if self.flusher is not None:
            self.flusher.stop()
            self.flusher = None
        if self.router is not None:
            self.router.open_files()  # a run closed before the flusher created them all: every file exists
        for target, handler in self.bridges:
            target.removeHandler(handler)
            handler.close()
        self.bridges.clear()
        for handler_id in self.handler_ids:
            try:
                logger.remove(handler_id)  # loguru stops the router, which closes every file
            except ValueError:
                pass
        self.handler_ids.clear()


def open_sinks(config, run_id: str, log_dir: Path, tag: str, *, key: str,
               on_library_record: Callable[[str, str, str], None],
               on_flush: Callable[[], None] | None = None, full_set: bool = True,
               thread: int | None = None, bridge: bool = True) -> RunSinks:
    """Open a file per enabled category behind one loguru handler, and add the stdlib bridge.

    Args:
        tag: the process's file tag (``""`` on global rank 0, ``node<N>``, ``rank<N>``; see
            :func:`file_path`); the console only where it is ``""``.
        full_set: every category's file (global rank 0, node leaders), else only the ``per_rank``
            categories' (errors, error tracking, the per-rank metrics).
        key: the records this handler takes (``extra["seo_key"]``): unique to the open run, so that
            runs open at once in one process never write into each other's files.
        on_flush: called by the flusher thread after each periodic flush (the run manifest).
        on_library_record: ``(label, level, message)`` for each library record the bridge takes.
        thread: the run's thread (``threading.get_ident()``; default: the calling one): a library
            record made there belongs to this run only (see :class:`StdlibBridge`).
        bridge: add the stdlib bridge (false where the caller added it already: :func:`add_bridge`).

    Raises:
        OSError: when a file cannot be opened (nothing stays added). With ``flush_interval_s > 0`` the
            flusher thread creates the files as the run starts (a record written before creates its
            file itself); one that cannot be created is then reported as a write failure (a WARNING
            in the errors files and on stderr), not raised.
    """
    sinks = RunSinks()
    # with a flusher thread, it creates the files (9 opens, about 3 ms) while the training starts
    router = CategoryRouter(config, run_id, log_dir, tag, key, full_set=full_set, delay=config.flush_interval_s > 0)
    sinks.files, sinks.router = dict(router.files), router
    try:
        if config.flush_interval_s > 0:
            sinks.flusher = Flusher(router, config.flush_interval_s, on_flush)
        sinks.handler_ids.append(_add_handler(router, level="DEBUG", format="{message}", filter=router.accepts,
                                            colorize=False, backtrace=False, diagnose=False))
        if bridge:
            add_bridge(sinks, on_library_record, thread)
    except BaseException:
        router.stop()
        sinks.close()
        raise
    return sinks


def add_bridge(sinks: RunSinks, on_library_record: Callable[[str, str, str], None],
               thread: int | None = None) -> None:
    """Add a run's stdlib bridge (:class:`StdlibBridge`) to the ``transformers``, ``datasets`` and
    ``accelerate`` loggers; ``sinks.close()`` removes it."""
    bridge = StdlibBridge(on_library_record, thread)
    for name in BRIDGED_LIBRARIES:
        target = logging.getLogger(name)
        target.addHandler(bridge)
        sinks.bridges.append((target, bridge))


_BRIDGES: list[StdlibBridge] = []  # of the open runs, to tell which run a library record belongs to
_BRIDGES_LOCK = threading.Lock()


class StdlibBridge(logging.Handler):
    """Forwards WARNING+ records of the ``transformers``/``datasets``/``accelerate`` stdlib loggers
    into the run's error logs (and so the general log) while the run is open, labelled with the
    library's name and stripped of terminal colour codes.

    It changes no logger's level or propagation, and when it is the only handler a record meets
    (accelerate without any logging configured), the record still goes to ``logging.lastResort``
    (stderr) as it would without us.
    """

    def __init__(self, on_record: Callable[[str, str, str], None], thread: int | None = None) -> None:
        super().__init__(level=logging.WARNING)
        self._on_record = on_record
        self.thread = thread if thread is not None else threading.get_ident()  # the run's (where its Trainer trains)
        with _BRIDGES_LOCK:
            _BRIDGES.append(self)

    def close(self) -> None:
        with _BRIDGES_LOCK:
            if self in _BRIDGES:
                _BRIDGES.remove(self)
        super().close()

    def _takes(self, record: logging.LogRecord) -> bool:
        """A record made in the thread of an open run belongs to that run only; one made in any other
        thread goes to every open run."""
        with _BRIDGES_LOCK:
            owners = [bridge for bridge in _BRIDGES if bridge.thread == record.thread]
        return not owners or self in owners

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if not self._takes(record):
                return
            level = record.levelname if record.levelname in LEVEL_NO else "WARNING"
            label = record.name.split(".", 1)[0].upper()
            self._on_record(label, level, _ANSI_ESCAPE.sub("", record.getMessage()))
            if not self._others_handle(record):
                last_resort = logging.lastResort
                if last_resort is not None and record.levelno >= last_resort.level:
                    last_resort.handle(record)
        except Exception:
            self.handleError(record)

    def _others_handle(self, record: logging.LogRecord) -> bool:
        current: logging.Logger | None = logging.getLogger(record.name)
        while current is not None:
            if any(handler is not self and not isinstance(handler, StdlibBridge) for handler in current.handlers):
                return True
            current = current.parent if current.propagate else None
        return False
