from __future__ import annotations

import functools
import itertools
import os
import sys
import threading
from collections.abc import Callable, Mapping
from datetime import datetime
from threading import get_ident
from time import perf_counter
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson

from . import format as _format
from .format import SCHEMA_VERSION

from . import guard as _guard
from .. import __version__  # not importlib.metadata: 1.5 ms of parsing at a process's first run
from .._categories import BY_NAME, CATEGORIES, TEXT_NAMES
from .._config import LogConfig
from .._directions import directions
from .rank import agree_on_run_id, process_role
from .._safety import mark_logged, never_raises, safe_warn, was_logged
from .._secrets import REDACTOR, mask_mapping
from .manifest import MANIFEST_EVENTS, RunManifest, manifest_path
from .recorder import Recorder
from .sinks import (SINK_FAILURES, RunSinks, add_bridge, claim_stamp, file_path, logger, open_sinks,
                    prepare_log_dir, run_files)

# what a rank without a file set of its own (a ``rank<N>`` file tag) writes to its per-rank metrics file
PER_RANK_EVENTS = frozenset({"run_start", "rank_step", "error", "warning"})
_OPEN: list[TrainLogger] = []
_KEYS = itertools.count(1)
_OWN_WRAPPERS = (_guard.__file__,)

def innermost_open_logger(joinable_only: bool = True, this_thread: bool = False) -> TrainLogger | None:
    """The most recently opened, still open (and joinable) :class:`TrainLogger` of this process:
    one opened in the calling thread first; with ``this_thread`` only such a one."""
    candidates = [tlog for tlog in reversed(_OPEN) if tlog.joinable or not joinable_only]
    ident = get_ident()
    for tlog in candidates:
        if tlog.thread == ident:
            return tlog
    return None if this_thread or not candidates else candidates[0]


class TrainLogger:
    """One run's categorised log files, and the spec's six logging methods.

    Opening a ``TrainLogger`` claims a run stamp ``YYYYMMDD_HHMMSS`` (``_1``, ``_2``... appended when
    another run in the same directory holds that second) and opens one file per category (a loguru
    ``FileSink`` each, behind one loguru handler that routes records by category)::

        logs/seo_engine_<stamp>.log           general: run start/end and every category's INFO+ lines
        logs/training_progress_<stamp>.log    epoch/step/loss/LR, validation loss, metrics, summary
        logs/training_detailed_<stamp>.log    progress plus step timing (per logging step; per step at DEBUG)
        logs/model_performance_<stamp>.log    operation timings, memory, GPU utilisation
        logs/data_loading_<stamp>.log         dataset creation, data-loader wait, collate timings
        logs/errors_<stamp>.log               the three error lines of each error; warnings (non-finite
                                              values, write failures, WARNING+ of transformers/datasets/
                                              accelerate while the run is open)
        logs/error_tracking_<stamp>.log       errors and warnings with traceback, global_step and epoch
        logs/performance_metrics_<stamp>.log  one strict JSON object per line (see below)
        logs/debug_<stamp>.log                everything at DEBUG (only with ``LogConfig.debug``)

    Each file rotates at ``config.rotation`` and keeps ``config.retention`` rotated files of its own
    category and run. The error files are line-buffered (an error is on disk when :meth:`log_error`
    returns, with everything written before it); the others are flushed every
    ``config.flush_interval_s`` seconds, on an error and at :meth:`close` (or call :meth:`flush`).
    Events handed to :meth:`defer` (the callback's logging steps) are formatted and written by the
    run's recorder thread (``seo_trainlog-recorder``, a daemon ended by :meth:`close`), in order,
    stamped with their own time; anything written directly from the training thread waits for them.
    Text lines read ``[2024-01-15 14:30:25] TRAINING - INFO - <message>``; a traceback continues on
    the following lines.

    Every JSON line holds ``time`` (ISO 8601), ``run_id`` (the stamp), ``event``, ``global_step``,
    ``epoch`` and the event's values: NaN and infinities are written as ``null``, tensors and numpy
    values as numbers or lists, nested mappings of logged values are flattened with ``/``
    (``eval_f1/commercial``), a value named like one of the five keys is kept as ``user_<key>``.
    ``pandas.read_json(path, lines=True)`` loads the file.

    Values never make a method raise: a value that cannot be written as given is written as text
    and a WARNING says so. Secrets are masked everywhere: values under secret-looking keys (token,
    secret, password, api_key, credential...) and the values of such environment variables
    (``HF_TOKEN``, ``WANDB_API_KEY``...), wherever they would appear, exception messages included.
    In a distributed run every process uses rank 0's stamp (see ``agree_on_run_id``: through the
    launcher's rendezvous store, else a pointer file in a shared log directory; never a collective
    operation). The world-process-zero writes the shared files above. The local rank 0 of each other
    node (a *node leader*) writes the same file set in its own log directory with the node rank in the
    names (``training_progress_node1_<stamp>.log``, ``performance_metrics_node1_<stamp>.log``,
    ``run_manifest_node1_<stamp>.json``...): the run as that process sees it, so a node's directory
    makes sense alone. Every other rank writes ``errors_rank<N>_<stamp>.log``,
    ``error_tracking_rank<N>_<stamp>.log`` (:meth:`log_error`, warnings) and
    ``performance_metrics_rank<N>_<stamp>.log`` (``run_start``, ``rank_step``, ``error``, ``warning``
    records). Every JSON line carries ``rank``, ``local_rank``, ``world_size`` and ``host`` (in a
    distributed run also ``node_rank``), and in a distributed run so do the errors. ``agreement``
    (:class:`~seo_trainlog.record.rank.RunAgreement`) says how the stamp was agreed; ``run_start`` records
    it as ``run_id_source`` (``store``, ``file``, ``own``) in a distributed run.

    Args:
        config: the settings; ``None`` reads :meth:`LogConfig.from_env`.
        run_id: append to the files of this existing run stamp instead of starting a new run.
        resume: with ``run_id``: the run is continued (``train(resume_from_checkpoint=...)``); in a
            directory without its files it starts them with a ``run_start`` record (``resumed: true``).
        joinable: while this logger is open, a :class:`~seo_trainlog.TrainLogCallback` without an
            explicit config (or with an equal one) writes into this run instead of opening its own.
        open_in_background: return once the directory is checked and the run id chosen, and open
            the files (the manifest, the loguru handler, the ``run_start`` records) in the run's
            recorder thread (see :meth:`defer`); every record written waits for that. The callback
            opens its runs so (about 1 ms of the training thread instead of 3). Ignored with
            ``config.flush_interval_s == 0``.

    Raises:
        OSError: when the log directory cannot be created or written (names the path and reason).
        ValueError: from :meth:`LogConfig.from_env` for a bad environment variable.
        TypeError: for a ``config`` that is not a :class:`LogConfig`; from any method called with
            arguments its signature does not take (the values themselves never make a method raise).

    Use as a context manager, or call :meth:`close` (it removes exactly the handlers it added).
    """

    _recorder: Recorder | None = None  # the thread writing deferred events, from the first one on

    def __init__(self, config: LogConfig | None = None, *, run_id: str | None = None,
                 joinable: bool = True, resume: bool = False, open_in_background: bool = False) -> None:
        if config is not None and not isinstance(config, LogConfig):
            raise TypeError(f"config must be a seo_trainlog.LogConfig or None, got {type(config).__name__}")
        self.config = config if config is not None else LogConfig.from_env()
        self.role = process_role()
        self.thread = get_ident()  # the thread that opened it (a callback there joins it first)
        self.key = f"{os.getpid()}-{next(_KEYS)}"  # routes this logger's records to its own files
        self.writes = self.role.writes_file_set  # a full file set: global rank 0, node leaders
        self.tag = self.role.file_tag  # in the file names: "", "node<N>", "rank<N>"
        self.joinable = joinable
        self._trained_by: int | None = None  # the thread whose Trainer trains in this run now (joined)
        self._claim_lock = threading.Lock()
        self.global_step: int | None = None
        self.epoch: float | None = None
        self.closed = False
        self._sinks = RunSinks()
        self._failed_methods: set[str] = set()
        self._defer_thread: int | None = None  # the thread whose events are deferred (the training loop)
        self.error_hooks: list[Callable[[], Any]] = []  # called after each error written (e.g. a counter)
        self.manifest: RunManifest | None = None
        self._manifest_written_s = perf_counter()
        self._manifest_failed = False
        self._started_segment = False  # this logger began the manifest's last segment
        self.log_dir = prepare_log_dir(self.config.log_dir)  # OSError here, in the caller
        self.agreement = agree_on_run_id(self.log_dir, lambda: claim_stamp(self.log_dir, CATEGORIES[0].prefix),
                                         self.role, given=run_id,
                                         notice=_stderr_notice if self.config.console else None)
        self.run_id = self.agreement.stamp
        self.files: dict[str, Path] = run_files(self.config, self.run_id, self.log_dir, self.tag, self.writes)
        self._identity = self.role.identity()
        self._log = {category.name: logger.bind(seo_run=self.run_id, seo_key=self.key, seo_cat=category.name,
                                                seo_label=category.label) for category in CATEGORIES}
        self._console_log = logger.bind(seo_run=self.run_id, seo_key=self.key, seo_cat="console", seo_label="")
        self._held = 0  # a record of another thread waits until the recorder has run this many jobs
        _OPEN.append(self)
        background = open_in_background and self.config.flush_interval_s > 0
        opening = functools.partial(self._open, run_id, resume, bridge=not background)
        if background:
            # the manifest, the loguru handler, the run_start records: in the recorder thread, first of
            # its jobs; any write waits for it (_settle), so nothing is written before the files exist.
            # The libraries' warnings are taken from now on (written once the files are open).
            add_bridge(self._sinks, self._library_record, self.thread)
            self._defer_thread = self.thread
            self._recorder = Recorder(self._internal_error, self.config.flush_interval_s)
            self._recorder.submit("open", opening, wake=True)
            self._held = self._recorder.submitted
        else:
            try:
                opening()
            except BaseException:
                _OPEN.remove(self)
                raise

    def _open(self, run_id: str | None, resume: bool, bridge: bool = True) -> None:
        """Open the run's files (the manifest, the handler of its file sinks, the stdlib bridge) and,
        for a run new to this directory, write its ``run_start`` records. In the background, a
        record of any thread waits until this job has run (``_settle``): nothing comes before
        ``run_start``."""
        REDACTOR.add_environment(os.environ)
        # a run continued in a directory that has none of its files yet starts them with run_start
        fresh = run_id is None or (resume and not file_path(self.log_dir, CATEGORIES[0], self.run_id,
                                                            self.tag).exists())
        if self.writes:
            self.manifest = RunManifest.open(manifest_path(self.log_dir, self.run_id, self.tag), self.run_id,
                                             __version__, directions(self.config.metric_directions))
        opened = open_sinks(self.config, self.run_id, self.log_dir, self.tag, key=self.key,
                            on_flush=self._write_manifest, on_library_record=self._library_record,
                            full_set=self.writes, thread=self.thread, bridge=bridge)
        opened.bridges[:0] = self._sinks.bridges  # (added before, by the constructor)
        self._sinks = opened
        if fresh:
            self.log_message(f"Run {self.run_id} started: log directory {self.log_dir}")
            self.log_metrics("run_start", {"log_dir": str(self.log_dir), "schema_version": SCHEMA_VERSION,
                                           "seo_trainlog_version": __version__,
                                           **({"resumed": True} if run_id is not None else {}),
                                           **self._directions_field(),
                                           **({"run_id_source": self.agreement.source}
                                              if self.role.world_size > 1 else {})})
            self._console(f"run {self.run_id} started, logs in {self.log_dir}")
        if self.agreement.source == "own":
            self._own_stamp_warning()
        if not self.writes:  # a rank that dies early still leaves its run_start (the rest: every flush_interval_s)
            self._sinks.flush()

    # ------------------------------------------------------------------ the spec's six methods

    @never_raises
    def log_training_progress(self, epoch: float, step: int, loss: float, learning_rate: float,
                              validation_loss: float | None = None,
                              metrics: Mapping[str, float] | None = None) -> None:
        """Write ``Epoch 1, Step 100: Loss=0.456789, LR=1.00e-04``, then ``Validation Loss: 0.567890``
        and ``Metrics: accuracy=0.850000, ...`` when given, to the training logs, and one JSON
        ``train`` event with every value.

        Args:
            epoch: epoch as a float (``Trainer`` reports fractions, e.g. 0.52).
            step: the optimizer step (``global_step``).
            loss: the training loss averaged since the last logging step.
            learning_rate: the learning rate in effect.
            validation_loss: evaluation loss, if one was computed at this step.
            metrics: further numbers (e.g. ``grad_norm``, ``accuracy``).
        """
        self._progress(epoch, step, loss, learning_rate, validation_loss, self._mapping("metrics", metrics), None)

    @never_raises
    def log_model_performance(self, operation: str, duration: float, memory_usage: float | None = None,
                              gpu_utilization: float | None = None,
                              additional_metrics: Mapping[str, Any] | None = None) -> None:
        """Write ``<operation> completed in 0.0500s`` and, when given, ``Memory usage: 128.50MB``,
        ``GPU utilization: 45.20%``, ``Additional metrics: k=v, ...``, plus a JSON ``model`` event.

        Args:
            operation: what was timed (``forward_pass``, ``evaluation``, ``epoch_1``...).
            duration: seconds.
            memory_usage: megabytes (MiB, 2**20 bytes).
            gpu_utilization: percent, 0-100.
            additional_metrics: further values, written as ``k=v``.
        """
        if not self.writes:
            return
        additional = self._mapping("additional_metrics", additional_metrics)
        lines = _format.performance_lines(operation, duration, memory_usage, gpu_utilization, additional)
        self._write("model", "INFO", lines)
        self.log_metrics("model", {"operation": operation, "duration_s": duration, "memory_mb": memory_usage,
                                   "gpu_util_pct": gpu_utilization, **_format.metric_values(additional)})
        self._console(lines[0])

    @never_raises
    def log_data_loading(self, operation: str, dataset_size: int, batch_size: int, duration: float,
                         memory_usage: float | None = None) -> None:
        """Write ``<operation>: Dataset size=1000, Batch size=32, Duration=0.5000s`` and, when given,
        ``Memory usage: 128.00MB`` to the data-loading log, plus a JSON ``data`` event.

        Args:
            operation: what was done (``dataset_creation``, ``tokenization``, ``dataloader``...).
            dataset_size: number of examples.
            batch_size: examples per batch.
            duration: seconds.
            memory_usage: megabytes (MiB).
        """
        if not self.writes:
            return
        lines = _format.data_loading_lines(operation, dataset_size, batch_size, duration, memory_usage)
        self._write("data", "INFO", lines)
        self.log_metrics("data", {"operation": operation, "dataset_size": dataset_size, "batch_size": batch_size,
                                  "duration_s": duration, "memory_mb": memory_usage})
        self._console(lines[0])

    @never_raises
    def log_error(self, error: BaseException, context: str = "", operation: str = "",
                  additional_info: Mapping[str, Any] | None = None) -> None:
        """Write ``Error in <operation>: <Type>: <message>``, ``Context: ...``, ``Additional info: k=v``
        at ERROR to the error logs; ``error_tracking`` also gets ``global_step``/``epoch`` and the
        traceback (standard format, never local variable values); plus a JSON ``error`` event.

        Args:
            error: the exception (anything else is written as text, with a warning).

        The lines are on disk (the files are line-buffered) when this returns. An exception is
        written once: logging the same exception object again does nothing. Every rank writes its
        errors (ranks other than 0 to their own files).
        """
        if self.closed:
            self._closed_warning("log_error")
            return
        REDACTOR.add_environment(os.environ)  # secrets exported since the run opened
        if isinstance(error, BaseException):
            if was_logged(error):
                return
            mark_logged(error)
        else:
            self._warn(f"log_error() expects an exception instance, got {type(error).__name__}; "
                       "written as text")
        info = self._mapping("additional_info", additional_info)
        if self.role.world_size > 1:
            info = {**info, **self._identity}
        lines = _format.error_lines(error, context, operation, info)
        self._write("errors", "ERROR", lines)
        trace = _format.traceback_text(error, _OWN_WRAPPERS)
        detail = [f"Training state: global_step={_format.fmt_value(self.global_step)}, "
                  f"epoch={_format.fmt_epoch(self.epoch)}"]
        if trace is not None:
            detail.append(trace)
        self._write("error_tracking", "ERROR", detail)
        self.log_metrics("error", {"error_type": type(error).__name__, "message": _format.safe_str(error),
                                   "operation": operation, "context": context,
                                   "additional_info": _format.metric_values(info), "traceback": trace})
        self._console(lines[0])
        self._sinks.flush()  # what led up to the error is on disk with it
        for hook in self.error_hooks:
            hook()

    @never_raises
    def log_training_summary(self, total_epochs: float, total_steps: int, final_loss: float | None,
                             best_loss: float | None, training_duration: float,
                             early_stopping_triggered: bool = False, *, status: str = "completed",
                             extra: Mapping[str, Any] | None = None) -> None:
        """Write the spec's ``TRAINING SUMMARY`` block (80 ``=`` rules; total epochs and steps,
        final and best loss, duration in seconds, early stopping), then ``Status: <status>`` and any
        ``extra`` lines, plus a JSON ``summary`` event.

        Args:
            status: ``completed``, ``failed``, ``interrupted`` or ``terminated``.
            extra: further ``key: value`` lines (e.g. best eval metric).
        """
        if not self.writes:
            return
        extra = {"Status": status, **self._mapping("extra", extra)}
        lines = _format.summary_lines(total_epochs, total_steps, final_loss, best_loss, training_duration,
                                      early_stopping_triggered, extra)
        self._write("training", "INFO", lines)
        self.log_metrics("summary", {"status": status, "total_epochs": total_epochs, "total_steps": total_steps,
                                     "final_loss": final_loss, "best_loss": best_loss,
                                     "training_duration_s": training_duration,
                                     "early_stopping_triggered": bool(early_stopping_triggered),
                                     **({"segment": self.manifest.segment} if self.manifest and self.manifest.segment
                                        else {}),
                                     **{key: value for key, value in extra.items() if key != "Status"}})
        self._started_segment = False  # the segment's end is said
        self._write_manifest(force=True)  # the run's end is in the manifest at once
        epochs = _format.fmt_epoch(total_epochs)
        self._console(f"training {status}: {_format.plural(total_steps, 'step')}, "
                      f"{epochs} epoch{'' if epochs == '1' else 's'}, final loss {_format.fmt_loss(final_loss)}, "
                      f"best loss {_format.fmt_loss(best_loss)}, {_format.fmt_value(training_duration, '.2f')}s")

    @never_raises
    def log_hyperparameters(self, config: Mapping[str, Any]) -> None:
        """Write a ``HYPERPARAMETERS`` block (one ``key: value`` line per flattened key) to the
        training logs and a JSON ``hyperparameters`` event with the nested values. Values under
        secret-looking keys are replaced by ``<redacted>``."""
        if not self.writes:
            return
        masked = mask_mapping(self._mapping("config", config))
        self._write("training", "INFO", _format.hyperparameter_lines(masked))
        self.log_metrics("hyperparameters", {"hyperparameters": masked})
        self._console(f"hyperparameters: {_format.plural(len(_format.flatten(masked)), 'value')} logged")

    # ------------------------------------------------------------------ further public methods

    @never_raises
    def log_evaluation(self, global_step: int | None, epoch: float | None, loss: float | None,
                       metrics: Mapping[str, Any], *, metric_prefix: str = "eval",
                       values: Mapping[str, Any] | None = None, time: datetime | None = None) -> str | None:
        """Write ``Validation Loss: ...`` (``Test Loss: ...`` for ``metric_prefix="test"``) and
        ``Metrics: ...`` to the training logs, and a JSON ``eval`` event holding ``values`` (default:
        the metrics), ``metric_prefix`` and, for the ``eval`` prefix, ``validation_loss``; returns
        that JSON line."""
        if not self.writes:
            return None
        self.mark(global_step, epoch)
        metrics = self._mapping("metrics", metrics)
        label = "Validation Loss" if metric_prefix == "eval" else f"{metric_prefix.capitalize()} Loss"
        lines = _format.evaluation_lines(loss, metrics, label)
        self._write("training", "INFO", lines)
        json_values = {"metric_prefix": metric_prefix,
                       **_format.metric_values(self._mapping("values", values) if values is not None else metrics)}
        if metric_prefix == "eval" and loss is not None:
            json_values.setdefault("validation_loss", loss)
        line = self.log_metrics("eval", json_values, time=time)
        if lines:
            self._console(f"step {_format.fmt_value(global_step)}: " + "; ".join(lines))
        return line

    @never_raises
    def log_metrics(self, event: str, values: Mapping[str, Any], *, time: datetime | None = None,
                    global_step: int | None = None) -> str | None:
        """Write one JSON line ``{"time", "run_id", "event", "global_step", "epoch", **values}`` to
        ``performance_metrics_<stamp>.log`` (``global_step``/``epoch``: the latest known, or the
        optimizer step ``global_step`` the event belongs to when given, e.g. an anomaly found later
        than the step it is about; ``time``: when the event happened, default now). On a rank without a
        file set of its own only the events of :data:`PER_RANK_EVENTS` are written (to
        ``performance_metrics_rank<N>_<stamp>.log``).

        Returns:
            the line written (without its newline), or None where nothing was written.
        """
        if self.closed:
            self._closed_warning("log_metrics")
            return None
        if not self.writes and event not in PER_RANK_EVENTS:
            return None
        self._settle()
        values = self._mapping("values", values)
        at = time or self._when()
        step = global_step if type(global_step) is int else self.global_step
        line = _format.json_line(_format.safe_str(event), self.run_id, step, self.epoch,
                                 {**self._identity, **values}, at)
        self._log["metrics"].info(line)
        if self.manifest is not None and event in MANIFEST_EVENTS:
            # the record as the file has it (secrets masked): the manifest must hold no more than the logs
            self.manifest.note(event, orjson.loads(REDACTOR(line)), step, at)
            self._manifest_due()
        return line

    def log_message(self, message: str, level: str = "INFO", category: str = "general") -> None:
        """Write one free text line to a text category's log: ``general``, ``training``,
        ``training_detailed``, ``model``, ``data``, ``errors``, ``error_tracking`` (``debug`` gets
        every category's records when it is on).

        Raises:
            ValueError: for another category (``metrics`` holds JSON only: use :meth:`log_metrics`)
                or a level loguru does not know.
        """
        if category not in TEXT_NAMES or category == "debug":
            names = ", ".join(sorted(TEXT_NAMES - {"debug"}))
            raise ValueError(f"category={category!r} is not valid; accepted values: {names}")
        level = level.upper() if isinstance(level, str) else level
        if level not in ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"level={level!r} is not valid; accepted values: DEBUG, INFO, WARNING, ERROR, CRITICAL")
        if self.writes or BY_NAME[category].per_rank:
            self._write(category, level, [_format.safe_str(message)])

    def mark(self, global_step: int | None, epoch: float | None) -> None:
        """Record the latest ``global_step``/``epoch``; later JSON lines and errors carry them.
        Values that are not finite numbers are ignored."""
        self._settle()
        if _format.is_finite_number(global_step):
            self.global_step = int(_format.to_number(global_step))
        if _format.is_finite_number(epoch):
            self.epoch = _format.to_number(epoch)

    def start_segment(self, start_global_step: int, resumed_from_checkpoint: str | None = None) -> int:
        """Note that a ``train()`` call begins in this run (the callback calls it at train begin):
        segment 1 for the first, then a ``segment_start`` record (text and JSON: ``segment``,
        ``start_global_step``, ``resumed_from_checkpoint``) for each later one, e.g. a resumed run,
        and for a resumed one that is the first in this directory.

        Returns:
            the segment's number (1, 2, ...; 0 on a rank that does not write the shared files).
        """
        self._settle()
        if self.manifest is None:
            return 0
        number = self.manifest.start_segment(start_global_step, self._when(), resumed_from_checkpoint)
        self._started_segment = True
        if number > 1 or resumed_from_checkpoint:  # (a run resumed into a directory new to it: its segment 1)
            source = f" from {resumed_from_checkpoint}" if resumed_from_checkpoint else ""
            self.log_message(f"Run {self.run_id} continues{source} at global_step {start_global_step} "
                             f"(segment {number})")
            self.log_metrics("segment_start", {"segment": number, "start_global_step": start_global_step,
                                               "resumed_from_checkpoint": resumed_from_checkpoint,
                                               **self._directions_field()})
        if self._sinks.flusher is not None:
            self._sinks.flusher.poke()  # the flusher thread writes the manifest (changed: the new segment) now
        else:
            self._write_manifest(force=True)
        return number

    def _directions_field(self) -> dict[str, Any]:
        """``{"metric_directions": {name-or-glob: "min"|"max"|None}}`` when the config has some (the
        readers then pick "best" as this run did), else nothing."""
        chosen = self.config.metric_directions
        return {"metric_directions": dict(chosen)} if chosen else {}

    def claim_training(self) -> bool:
        """A callback joins this run for a ``train()`` in the calling thread: False while a Trainer in
        another thread trains in it (that callback then opens a run of its own)."""
        ident = get_ident()
        with self._claim_lock:
            if self._trained_by not in (None, ident):
                return False
            self._trained_by = ident
            return True

    def release_training(self) -> None:
        """The joined ``train()`` ended: another thread's Trainer may join now."""
        with self._claim_lock:
            self._trained_by = None

    def _manifest_due(self) -> None:
        """Without a flusher thread (``flush_interval_s == 0``) the manifest is written from here, at
        most once a second."""
        if self._sinks.flusher is None and perf_counter() - self._manifest_written_s >= 1.0:
            self._write_manifest()

    def _write_manifest(self, force: bool = False) -> None:
        manifest = self.manifest
        if manifest is None:
            return
        self._manifest_written_s = perf_counter()
        error = manifest.write(force)
        if error is not None and not self._manifest_failed:
            self._manifest_failed = True
            self._sinks.failures.add(f"cannot write the run manifest {manifest.path}: {type(error).__name__}: {error}; "
                              "it is retried at every flush")
        elif error is None and force:
            self._manifest_failed = False

    def _library_record(self, label: str, level: str, message: str) -> None:
        """A WARNING+ record of transformers/datasets/accelerate (the stdlib bridge): a line in the
        error logs and a JSON ``warning`` event with its ``source``."""
        self._write_text("errors", level, _format.text_block(label, level, [message], self._when()))
        self.log_metrics("warning", {"message": message, "source": label.lower(), "level": level})

    def flush(self) -> None:
        """Put every record written so far on disk (the non-error files are otherwise flushed every
        ``config.flush_interval_s`` seconds)."""
        self._settle(force=True)
        self._sinks.flush()

    def close(self) -> None:
        """Flush and remove exactly the handlers this logger added. Safe to call twice.

        Called from the deferring thread (the training loop) while the recorder thread runs, the
        closing (the last flush, the manifest, the files) is that thread's last job, and this call
        waits for it."""
        if self.closed:
            return
        recorder = self._recorder
        if recorder is not None and get_ident() == self._defer_thread and recorder.running_in != get_ident() \
                and recorder.alive():
            recorder.submit("close", self._close, wake=True)
            recorder.drain()  # (runs what is left itself if the thread is gone)
            recorder.stop()  # the thread has ended: a join
        self._close()

    def _close(self) -> None:
        if self.closed:
            return
        self._settle(force=True)
        if self._recorder is not None:
            self._recorder.stop()  # every deferred job run, the thread ended (unless this is it)
        if self.manifest is not None and self._started_segment:
            self.manifest.end_open_segment("abandoned")  # started here, and no summary said how it ended
        self._write_manifest(force=True)
        self._sinks.flush()  # a file that failed and works again says so in this run's errors
        self._report_sink_failures()
        self.closed = True
        if self in _OPEN:
            _OPEN.remove(self)
        self._sinks.close()
        for notice in self._sinks.failures.take():  # said while closing: no file of the run is open now
            _stderr_notice(notice)

    def __enter__(self) -> TrainLogger:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None and not self.closed:
            self.log_error(exc, context="inside the TrainLogger block", operation="run")
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<TrainLogger run_id={self.run_id!r} log_dir={str(self.log_dir)!r} {state}>"

    # ------------------------------------------------------------------ internals

    def defer(self, name: str, job: Callable[[], Any], wake: bool = False) -> None:
        """Run ``job`` (the formatting and writing of one event, named ``name`` in error reports)
        in this run's recorder thread (``seo_trainlog-recorder``, a daemon), after every job deferred
        before it.

        A logging step then costs the training loop one append: the recorder runs the jobs queued so
        far every ``config.flush_interval_s`` seconds, and at once when anything else is written from
        the deferring thread (an error, an evaluation, a warning: that thread waits until the jobs
        deferred before are written, so the order of records is kept), at :meth:`flush` and at
        :meth:`close` (which end with every job run). Every record a job writes is stamped with the
        time of this call (the event), not the time it is written. Events are deferred for one
        thread, the first to call this (the training loop); on any other thread, and with
        ``flush_interval_s == 0`` (every file written through), ``job`` runs at once in the caller.
        A job that raises is reported once per ``name`` (a WARNING) and the others still run.
        ``wake``: the recorder runs the queue now, not at its next interval (a job the training loop
        will soon wait for).
        """
        ident = get_ident()
        if self._defer_thread is None:
            self._defer_thread = ident
        recorder = self._recorder
        if self.config.flush_interval_s <= 0 or self.closed or ident != self._defer_thread \
                or (recorder is not None and recorder.forked()):  # (a forked child: no thread runs its jobs)
            try:
                job()
            except Exception as exc:
                self._internal_error(name, exc)
            return
        if recorder is None:
            recorder = self._recorder = Recorder(self._internal_error, self.config.flush_interval_s)
        recorder.submit(name, job, wake)

    def _settle(self, force: bool = False) -> None:
        """Wait until the recorder has written every job deferred so far (a no-op inside a job, and,
        unless ``force`` or the files are still being opened, or a job :meth:`hold_others` named has
        not run, on any thread but the deferring one)."""
        recorder = self._recorder
        if recorder is None or recorder.idle():
            return
        ident = get_ident()
        if recorder.running_in == ident or (not force and ident != self._defer_thread
                                            and recorder.done >= self._held):
            return
        recorder.drain()

    def hold_others(self) -> None:
        """A record written from any thread but the deferring one waits until every job deferred so
        far has run (the callback's train begin: the secret argument values learnt in the recorder
        thread are known before another thread's record, a library warning, is masked)."""
        recorder = self._recorder
        if recorder is not None:
            self._held = recorder.submitted

    def _when(self) -> datetime | None:
        """The time to stamp on a record written now: its event's, inside a deferred job; else None (now)."""
        recorder = self._recorder
        if recorder is None or recorder.running_in != get_ident():
            return None
        return recorder.event_time

    @property
    def recorder_cpu_s(self) -> float:
        """CPU seconds (``time.thread_time`` inside the thread) the recorder thread has spent running
        deferred jobs: the logging steps' formatting and writing, off the training thread."""
        recorder = self._recorder
        return recorder.cpu_s if recorder is not None else 0.0

    def _progress(self, epoch, step, loss, learning_rate, validation_loss, metrics, timing,
                  step_times: list[tuple[int, float, float]] | None = None) -> str | None:
        """One logging step's records (training text, JSON line, console line, the per-step DEBUG
        lines of ``step_times``) as one loguru record: the router hands each part to its sinks."""
        if not self.writes:
            return None
        self.mark(step, epoch)  # (settles deferred records first)
        at = self._when()
        metrics = _format.metric_values(metrics or {})
        lines = _format.progress_lines(epoch, step, loss, learning_rate, validation_loss, metrics)
        values = {"loss": loss, "learning_rate": learning_rate, **metrics}
        for key, value in (timing or {}).items():
            values.setdefault(key, value)
        if validation_loss is not None:
            values["validation_loss"] = validation_loss
        line = _format.json_line("train", self.run_id, self.global_step, self.epoch, {**self._identity, **values}, at)
        if self.closed:
            self._closed_warning("training")
            return None
        parts = []  # (category, level number, text) riding along with the training text
        if step_times:
            parts.append(("training_detailed", 10, self._step_times_text(step_times)))
        if self.config.console:
            console = self._console_line(lines[0] + (f", {_format.fmt_pairs(metrics, '.4g')}" if metrics else ""))
            parts.append(("console", 20, REDACTOR(console) if metrics else console))  # (numbers carry no secret)
        self._log["training"].bind(seo_json=line, seo_parts=parts).info(_format.text_block("TRAINING", "INFO", lines, at))
        if self.manifest is not None:
            self.manifest.note("train", values, self.global_step, at)
            self._manifest_due()
        self._report_sink_failures()
        return line

    def _own_stamp_warning(self) -> None:
        """Say (WARNING in the files, the console's stderr when on) why this rank uses a stamp of its own."""
        message = (f"Run id: rank {self.role.rank} of {self.role.world_size} uses a stamp of its own, {self.run_id}: "
                   f"{self.agreement.reason or 'rank 0 was not heard from'}. Its files will not share rank 0's run "
                   "id: gather them by directory and time, not by run id")
        self._warn(message, run_id_source="own")
        if self.config.console:
            _stderr_notice(message)

    def _warn(self, message: str, **values: Any) -> None:
        """A WARNING in the error logs (and the general log) plus a JSON ``warning`` event."""
        self._write("errors", "WARNING", [message])
        self.log_metrics("warning", {"message": message, **values})

    def _mapping(self, name: str, value: Any) -> Mapping[Any, Any]:
        if value is None:
            return {}
        if isinstance(value, Mapping):
            return value
        self._warn(f"{name} should be a mapping, got {type(value).__name__}; written as {name}=<value>")
        return {name: value}

    def _write(self, category: str, level: str, lines: list[str]) -> None:
        self._write_text(category, level, None, lines)

    def _write_text(self, category: str, level: str, text: str | None, lines: list[str] = ()) -> None:
        """One record: ``lines`` with the spec's prefix, or ``text`` already in the file's format
        (``text_block`` lines, each with its own time)."""
        self._settle()
        if self.closed:
            self._closed_warning(category)
            return
        if text is None:
            text = _format.text_block(BY_NAME[category].label, level, lines, self._when())
        self._log[category].log(level, text)
        self._report_sink_failures()

    def write_step_times(self, steps: list[tuple[int, float, float]] | Callable[[], list] | None) -> None:
        """The per-step DEBUG lines ``Step N: step time 0.1306s`` of ``steps`` (``(global_step,
        step_time_s, time.time() at the step's end)``, or a callable returning them), as one record,
        each line with its step's time."""
        if not steps or not self.writes:
            return
        if callable(steps):
            steps = steps()
        self._write_text("training_detailed", "DEBUG", self._step_times_text(steps))

    @staticmethod
    def _step_times_text(steps: list[tuple[int, float, float]]) -> str:
        label = BY_NAME["training_detailed"].label
        return "\n".join(_format.text_block(label, "DEBUG", [f"Step {step}: step time {elapsed:.4f}s"],
                                             datetime.fromtimestamp(at_s))
                          for step, elapsed, at_s in steps)

    def _report_sink_failures(self) -> None:
        for notice in self._sinks.failures.take() + SINK_FAILURES.take():
            self._write("errors", "WARNING", [f"seo_trainlog: {notice}"])
            _stderr_notice(notice)

    def _console(self, text: str) -> None:
        self._settle()
        if self.writes and self.config.console:
            self._console_log.info(self._console_line(text))

    def _console_line(self, text: str) -> str:
        return f"{self._when() or datetime.now():%H:%M:%S} | seo_trainlog | {_format.escape_controls(text)}"

    def _internal_error(self, method: str, exc: Exception) -> None:
        if method in self._failed_methods:
            return
        self._failed_methods.add(method)
        message = (f"seo_trainlog {method}() failed and skipped this record: {type(exc).__name__}: "
                   f"{_format.safe_str(exc)}")
        try:
            self._write("errors", "WARNING", [message])
        except Exception:
            pass
        safe_warn(message)

    def _closed_warning(self, where: str) -> None:
        if "closed" not in self._failed_methods:
            self._failed_methods.add("closed")
            safe_warn(f"TrainLogger run {self.run_id} is closed; a {where} record was not written")


def _stderr_notice(notice: str) -> None:
    try:
        if sys.stderr is not None:
            sys.stderr.write(f"seo_trainlog: {notice}\n")
    except Exception:
        pass
