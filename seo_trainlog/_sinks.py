"""The loguru side: seo_trainlog's own logger, and the sinks (files, console, stdlib bridge) of one run."""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loguru._file_sink import FileSink
from loguru._logger import Core, Logger
from loguru._string_parsers import parse_size

from ._categories import CATEGORIES, Category, accepted_names
from ._format import text_block
from ._secrets import REDACTOR

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


def probe_file_options(rotation: object = None, retention: object = None, encoding: str = "utf-8") -> None:
    """Let loguru validate ``rotation``/``retention`` without creating any file (``delay=True``).

    Raises:
        ValueError, TypeError: as loguru raises them for a value it cannot parse.
    """
    path = os.path.join(tempfile.gettempdir(), "seo_trainlog-option-probe.log")
    FileSink(path, rotation=rotation, retention=retention, encoding=encoding, delay=True)


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
        with tempfile.NamedTemporaryFile(dir=log_dir, prefix=".seo_trainlog-write-check-"):
            pass
    except OSError as exc:
        raise OSError(exc.errno, f"seo_trainlog cannot write log files to {str(log_dir)!r}: "
                                 f"{exc.strerror or exc}") from None
    return log_dir.resolve()


def file_path(log_dir: Path, category: Category, stamp: str, rank: int = 0) -> Path:
    """``<prefix>_<stamp>.log``; on another rank than 0 ``<prefix>_rank<N>_<stamp>.log``."""
    rank_part = f"_rank{rank}" if rank else ""
    return log_dir / f"{category.prefix}{rank_part}_{stamp}.log"


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


class GuardedFileSink:
    """A loguru ``FileSink`` (rotation, retention, UTF-8) that survives write trouble.

    ``durable`` files are line-buffered: a record is on disk (in the OS) when its write returns.
    The others are block-buffered and flushed by :meth:`flush` (the run's flusher thread calls it
    every ``flush_interval_s``, and closing flushes): far fewer system calls in the training loop.

    A failed write (disk full, file system gone) or rotation (rename refused) never reaches the
    training: it is reported once through :data:`SINK_FAILURES`, the record is retried once, and
    the sink keeps trying on later records; a rotation that keeps failing is switched off so that
    records go on being appended to the current file. A file someone removed or moved away is
    reopened at its path (checked at most once a second, not at every record as loguru's
    ``watch=True`` does).
    """

    WATCH_INTERVAL_S = 1.0

    def __init__(self, path: Path, rotation: object, retention: object, encoding: str, durable: bool) -> None:
        self.path = path
        self.durable = durable
        self.dirty = False
        if rotation is not None and not callable(rotation):
            size = rotation if isinstance(rotation, (int, float)) and not isinstance(rotation, bool) else \
                _parse_size(rotation)
            if size is not None:
                rotation = SizeRotation(size, path, encoding)
        self._sink = FileSink(_escape_braces(str(path)), rotation=rotation, retention=retention, encoding=encoding,
                              errors="backslashreplace", buffering=1 if durable else -1)
        self._failing = False
        self._flush_failed = False
        self._new_line = False  # after a failed buffered write: the file may end in a partial line
        self._watched_at = time.monotonic()
        self.failed_writes = 0

    def write(self, message: str) -> None:
        now = time.monotonic()
        if now - self._watched_at >= self.WATCH_INTERVAL_S:
            self._watched_at = now
            self._reopen_if_removed()
        try:
            self._put(message)
            self.dirty = not self.durable
        except Exception as error:
            self._recover(message, error)
            return
        if self._failing and self.durable:  # line-buffered: the record reached the file
            self._recovered()

    def _put(self, message: str) -> None:
        self._sink.write("\n" + message if self._new_line else message)
        self._new_line = False

    def _fail(self, error: Exception) -> None:
        if not self._failing:
            self._failing = True
            SINK_FAILURES.add(f"cannot write to {self.path}: {type(error).__name__}: {error}; "
                              "training goes on and the file is retried with every record")

    def _lost_buffer(self, error: Exception) -> None:
        """A buffered write or flush failed (disk full): what the buffer held is gone and the file may
        end in a partial line; report it, and start the next record on a line of its own."""
        self._flush_failed = True
        self._new_line = True
        self._fail(error)

    def _recovered(self) -> None:
        self._failing = False
        buffered = "; records buffered when a write or flush failed may be lost too" if self._flush_failed else ""
        self._flush_failed = False
        SINK_FAILURES.add(f"writing to {self.path} works again after {self.failed_writes} lost records{buffered}")

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
            self._sink._close_file()
            self._sink._create_dirs(path)
            self._sink._create_file(path)
            if isinstance(self._sink._rotation_function, SizeRotation):
                self._sink._rotation_function.size = 0  # a new, empty file

    def _recover(self, message: str, error: Exception) -> None:
        rotation_failed = self._sink._rotation_function is not None and _raised_in_rotation(error)
        if rotation_failed:
            self._sink._rotation_function = None  # keep appending to the current file instead
        elif not self.durable:
            self._lost_buffer(error)
        try:
            self._put(message)
        except Exception as retry_error:
            self.failed_writes += 1
            self._fail(retry_error)
            return
        if rotation_failed:
            SINK_FAILURES.add(f"rotation of {self.path} failed ({type(error).__name__}: {error}); rotation is "
                              "off for this file and records are appended to it")

    def flush(self) -> None:
        handle = self._sink._file
        self.dirty = False
        if handle is not None:
            try:
                handle.flush()
            except Exception as exc:
                self._lost_buffer(exc)
                return
            if self._failing and not self.durable:  # block-buffered: only a flush shows the file takes data
                self._recovered()

    def stop(self) -> None:
        try:
            self._sink.stop()
        except Exception as exc:
            SINK_FAILURES.add(f"closing {self.path} failed: {type(exc).__name__}: {exc}")


def _parse_size(text: object) -> float | None:
    try:
        return parse_size(str(text))
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

    def __init__(self) -> None:
        self.enabled = True

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        try:
            stream = sys.stderr
            if stream is not None:
                stream.write(message)
        except Exception as exc:
            self.enabled = False
            SINK_FAILURES.add(f"console output switched off: sys.stderr failed ({type(exc).__name__}: {exc})")


class CategoryRouter:
    """A run's one loguru handler: each record goes to the sinks of the categories that take it.

    The category table decides: a file sink per enabled category (its own loguru ``FileSink``, with
    the run's rotation and retention), fed the records of its own category and of those it
    ``includes`` at or above its level; the console sink takes the ``console`` records. One loguru
    handler instead of one per file: loguru evaluates one filter per record, and builds one
    exception formatter per run (its costliest start-up step) rather than nine.
    """

    def __init__(self, config, run_id: str, log_dir: Path, rank: int, key: str | None = None) -> None:
        self.run_id = run_id
        self.key = key if key is not None else run_id
        self.files: dict[str, Path] = {}
        self._lock = threading.Lock()  # writes (from loguru's handler) against flushes (the flusher thread)
        self._sinks: list[GuardedFileSink | ConsoleSink] = []
        self._routes: dict[str, list[tuple[int, GuardedFileSink | ConsoleSink]]] = {}
        try:
            for category in CATEGORIES:
                if (category.debug_only and not config.debug) or (rank and not category.per_rank):
                    continue
                path = file_path(log_dir, category, run_id, rank)
                level = category.level
                if category.follows_config_level and LEVEL_NO[config.level] > LEVEL_NO[level]:
                    level = config.level
                # loguru applies retention at close when there is no rotation: it would delete the run
                retention = config.retention if config.rotation is not None else None
                sink = GuardedFileSink(path, config.rotation, retention, config.encoding,
                                       durable=category.durable or config.flush_interval_s <= 0)
                self._add(sink, LEVEL_NO[level], accepted_names(category))
                self.files[category.name] = path
            if config.console and not rank:
                self._add(ConsoleSink(), LEVEL_NO["INFO"], frozenset({"console"}))
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
            for minimum, sink in self._routes.get(extra.get("seo_cat"), ()):
                if levelno >= minimum:
                    sink.write(message)
            attached = extra.get("seo_json")  # a JSON line riding along with a text record
            if attached is not None:
                attached = REDACTOR(attached)  # the patcher only sees the message
                for _, sink in self._routes.get("metrics", ()):
                    sink.write(f"{attached}\n")

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
        self._thread = threading.Thread(target=self._run, name="seo_trainlog-flush", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._router.flush_buffers()
            if self._on_flush is not None:
                try:
                    self._on_flush()
                except Exception:  # reported by the callable itself; the flusher must go on
                    pass

    def stop(self) -> None:
        self._stop.set()
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

    def flush(self) -> None:
        if self.router is not None:
            self.router.flush_buffers()

    def close(self) -> None:
        if self.flusher is not None:
            self.flusher.stop()
            self.flusher = None
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


def open_sinks(config, run_id: str, log_dir: Path, rank: int = 0, *, key: str | None = None,
               on_flush: Callable[[], None] | None = None,
               on_library_record: Callable[[str, str, str], None] | None = None) -> RunSinks:
    """Open a file per enabled category (on a rank other than 0 only the ``per_rank`` categories'
    own files, and no console) behind one loguru handler, and add the stdlib bridge.

    Args:
        key: the records this handler takes (``extra["seo_key"]``): unique to the open run, so that
            runs open at once in one process never write into each other's files.
        on_flush: called by the flusher thread after each periodic flush (the run manifest).
        on_library_record: ``(label, level, message)`` for each library record the bridge takes;
            None: written to the error logs as a plain record.

    Raises:
        OSError: when a file cannot be opened (nothing stays added).
    """
    sinks = RunSinks()
    key = key if key is not None else run_id
    router = CategoryRouter(config, run_id, log_dir, rank, key)
    sinks.files, sinks.router = dict(router.files), router
    try:
        if config.flush_interval_s > 0:
            sinks.flusher = Flusher(router, config.flush_interval_s, on_flush)
        sinks.handler_ids.append(logger.add(router, level="DEBUG", format="{message}", filter=router.accepts,
                                            colorize=False, backtrace=False, diagnose=False))
        run_logger = logger.bind(seo_run=run_id, seo_key=key, seo_cat="errors")
        bridge = StdlibBridge(on_library_record or functools.partial(_plain_library_record, run_logger))
        for name in BRIDGED_LIBRARIES:
            target = logging.getLogger(name)
            target.addHandler(bridge)
            sinks.bridges.append((target, bridge))
    except BaseException:
        router.stop()
        sinks.close()
        raise
    return sinks


def _plain_library_record(run_logger, label: str, level: str, message: str) -> None:
    run_logger.log(level, text_block(label, level, [message]))


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

    def __init__(self, on_record: Callable[[str, str, str], None]) -> None:
        super().__init__(level=logging.WARNING)
        self._on_record = on_record
        self.thread = threading.get_ident()  # the run's thread (where its Trainer trains)
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
