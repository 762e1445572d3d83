"""The loguru side: seo_trainlog's own logger, and the sinks (files, console, stdlib bridge) of one run."""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from loguru._logger import Core, Logger

from ._categories import CATEGORIES, Category, accepted_names

# An independent loguru logger: a Core of its own, so that our records never reach the user's
# handlers on ``loguru.logger`` (its default stderr handler included), and the user's
# ``logger.remove()`` never removes ours. This is what ``loguru.logger`` itself is built from.
logger = Logger(core=Core(), exception=None, depth=0, record=False, lazy=False, colors=False, raw=False,
                capture=True, patchers=[], extra={})

# loguru appends the newline to a format string itself.
TEXT_FORMAT = "[{time:YYYY-MM-DD HH:mm:ss}] {extra[seo_label]} - {level} - {message}"
JSON_FORMAT = "{message}"
CONSOLE_FORMAT = "{time:HH:mm:ss} | seo_trainlog | {message}"
LEVEL_NO = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}
BRIDGED_LIBRARIES = ("transformers", "datasets", "accelerate")
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def probe_file_options(rotation: object = None, retention: object = None) -> None:
    """Let loguru validate ``rotation``/``retention`` without creating any file (``delay=True``).

    Raises:
        ValueError, TypeError: as loguru raises them for a value it cannot parse.
    """
    path = os.path.join(tempfile.gettempdir(), "seo_trainlog-option-probe.log")
    handler_id = logger.add(path, rotation=rotation, retention=retention, delay=True, catch=False,
                            filter=lambda record: False)
    logger.remove(handler_id)


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


def file_path(log_dir: Path, category: Category, stamp: str) -> Path:
    return log_dir / f"{category.prefix}_{stamp}.log"


@dataclass
class RunSinks:
    """The handlers one run added, so that exactly these are removed at close."""

    files: dict[str, Path] = field(default_factory=dict)
    handler_ids: list[int] = field(default_factory=list)
    bridges: list[tuple[logging.Logger, logging.Handler]] = field(default_factory=list)

    def close(self) -> None:
        for target, handler in self.bridges:
            target.removeHandler(handler)
        self.bridges.clear()
        for handler_id in self.handler_ids:
            try:
                logger.remove(handler_id)
            except ValueError:
                pass
        self.handler_ids.clear()


def open_sinks(config, run_id: str, log_dir: Path) -> RunSinks:
    """Add one filtered file sink per enabled category, the console sink and the stdlib bridge."""
    sinks = RunSinks()
    try:
        for category in CATEGORIES:
            if category.debug_only and not config.debug:
                continue
            path = file_path(log_dir, category, run_id)
            level = category.level
            if category.follows_config_level and LEVEL_NO[config.level] > LEVEL_NO[level]:
                level = config.level
            sinks.handler_ids.append(logger.add(
                str(path),
                level=level,
                format=JSON_FORMAT if category.json else TEXT_FORMAT,
                filter=_category_filter(run_id, accepted_names(category)),
                rotation=config.rotation,
                retention=config.retention,
                encoding=config.encoding,
                backtrace=False,
                diagnose=False,
            ))
            sinks.files[category.name] = path
        if config.console:
            sinks.handler_ids.append(logger.add(
                _write_console, level="INFO", format=CONSOLE_FORMAT, colorize=False,
                filter=_category_filter(run_id, frozenset({"console"})), backtrace=False, diagnose=False,
            ))
        bridge = StdlibBridge(logger.bind(seo_run=run_id, seo_cat="errors"))
        for name in BRIDGED_LIBRARIES:
            target = logging.getLogger(name)
            target.addHandler(bridge)
            sinks.bridges.append((target, bridge))
    except BaseException:
        sinks.close()
        raise
    return sinks


def _category_filter(run_id: str, names: frozenset[str]):
    def accept(record) -> bool:
        extra = record["extra"]
        return extra.get("seo_run") == run_id and extra.get("seo_cat") in names

    return accept


def _write_console(message: str) -> None:
    # Looked up at write time: a replaced sys.stderr (notebooks, pytest) still receives the line.
    sys.stderr.write(message)


class StdlibBridge(logging.Handler):
    """Forwards WARNING+ records of the ``transformers``/``datasets``/``accelerate`` stdlib loggers
    into the run's error logs (and so the general log) while the run is open, labelled with the
    library's name and stripped of terminal colour codes. It changes no logger's level or
    propagation."""

    def __init__(self, run_logger) -> None:
        super().__init__(level=logging.WARNING)
        self._log = run_logger

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = record.levelname if record.levelname in LEVEL_NO else record.levelno
            label = record.name.split(".", 1)[0].upper()
            self._log.bind(seo_label=label).log(level, _ANSI_ESCAPE.sub("", record.getMessage()))
        except Exception:
            self.handleError(record)
