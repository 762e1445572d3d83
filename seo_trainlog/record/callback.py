from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import math
import os
import re
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from time import perf_counter
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from . import format as _format
from .facts import dataset_size, gather_hyperparameters, write_hyperparameters
from .guard import TrainerGuard, caller_local, find_trainer
from .logger import TrainLogger, innermost_open_logger
from .rank import TelemetryExchange, launch_store, writes_shared_files
from .run import (Run, await_rank_tokens, drain_workers, exchange_interval, run_resources, speed_prefix,
                  take_step_times, take_tokens, tokens_at_end, trainer_counts, training_loss_key, write_checkpoint,
                  write_epoch, write_interval, write_log, write_remaining_collate, write_speed)
from .signals import SigtermHook, TerminatedBySignal
from .sinks import logging_busy
from .._config import LogConfig
from .._safety import mark_logged, never_raises, safe_warn, was_logged
from .._secrets import remember_secrets, secret_keys
from ..watch import prometheus as _prometheus
from ..watch.alerts import AlertDispatcher, AlertHook
from ..watch.anomaly import KINDS, AnomalyDetector, StragglerDetector, settings_of
from ..watch.collator import TimedDataCollator
from ..watch.monitor import ResourceSampler, cuda_memory, rss_mb
from ..watch.timing import CollateSums, StepTimer, bind_thread
from ..watch.timing import thread_sums as _thread_sums
from ..watch.tokens import device_name, model_shape, peak_tflops_for, training_dtype

_OPEN_RUNS: weakref.WeakSet[TrainLogCallback] = weakref.WeakSet()
_RUN_ID = re.compile(r"^\d{8}_\d{6}(?:_\d+)?$")
_STATE_NAME = "TrainLogCallback"


class TrainLogCallback(TrainerCallback, ExportableState):
    """A ``TrainerCallback`` that writes every Trainer run to seo_trainlog's categorised log files.

    Use either ``trainer.add_callback(TrainLogCallback())`` or, after ``import seo_trainlog``,
    ``TrainingArguments(report_to="seo_trainlog")``. When several are present on one Trainer only one
    of them writes: the one given an explicit ``config``, else the first; the same instance added
    twice counts once.

    What each Trainer event writes (files described in :class:`~seo_trainlog.TrainLogger`):

    - ``on_train_begin``: opens the run (or joins an open :class:`TrainLogger` when this callback has
      no explicit config); hyperparameters: ``TrainingArguments`` (secrets masked), model class,
      parameter counts and config, dataset sizes, world size, max_steps.
    - ``on_step_begin``/``on_step_end``: only timestamps (``time.perf_counter``) and sums.
    - ``on_log``: training progress (epoch, global_step, loss, learning_rate, grad_norm and any other
      value; nested mappings flattened with ``/``) with the interval's step time, data wait share
      (of step + wait time) and samples/s; ``<prefix>_*`` evaluation values as validation loss and metrics; collate timings of
      :class:`TimedDataCollator`; ``num_input_tokens_seen``, ``tokens_per_second`` and ``mfu_pct``
      (README "Tokens and MFU"); a WARNING for each non-finite value; one JSON line per event.
    - ``on_evaluate``/``on_predict``: runtime, throughput and RSS memory in the model-performance log.
    - ``on_epoch_begin``/``on_epoch_end``: epoch wall time. ``on_save``: the checkpoint path.
    - ``on_train_end``: the training summary (``early_stopping_triggered`` is true when training
      stopped before ``max_steps`` because a callback such as ``EarlyStoppingCallback`` asked it to),
      then the run's handlers are removed.
    - An exception escaping ``trainer.train()`` (``KeyboardInterrupt`` included), for which the
      Trainer calls no event: the error with traceback, global_step and epoch, a summary with status
      ``failed``/``interrupted``/``terminated``, handlers removed; the exception then propagates
      unchanged. With ``auto_find_batch_size``, an out-of-memory error the Trainer retries is a
      WARNING and the run goes on.
    - SIGTERM during training: the error and a ``terminated`` summary are written and flushed; then a
      SIGTERM handler you installed before runs as usual, or else the process terminates as it
      would have.

    Prometheus (``LogConfig.prometheus_port``, ``prometheus_textfile``, ``pushgateway_url``; needs
    ``prometheus-client``): every process exports its own series (see :mod:`seo_trainlog.watch.prometheus`)
    from train begin on; a logging step only sets gauges, the exposition is formatted when scraped,
    when the textfile is written (with the deferred records) and at the end (push).

    In a distributed run the world-process-zero writes the shared files, each other node's local rank 0
    a node file set of its own, every other rank its errors and, at each logging step, a ``rank_step``
    record of its own ``step_time_s``, ``data_wait_s``, ``data_wait_pct``, ``samples_per_second``,
    collate sums and ``rss_mb`` (see :class:`~seo_trainlog.TrainLogger`). Anomalies and alerts come from
    the world-process-zero only; with ``detect_anomalies`` it also compares the ranks' pace through the
    launcher's store (a ``straggler`` anomaly, see :class:`~seo_trainlog.watch.anomaly.StragglerDetector`).
    ``evaluate()``/``predict()`` after training append to the last run's files. A failure inside this callback is reported once and never stops training;
    only a bad configuration (``ValueError``) or an unwritable log directory (``OSError``) is
    raised, at train begin, before any step.

    Anomalies (``LogConfig.detect_anomalies``): every logged ``train``/``eval`` record goes through
    the same :class:`~seo_trainlog.watch.anomaly.AnomalyDetector` that ``seo-trainlog`` runs afterwards;
    each anomaly is written once (a WARNING in the error logs and a JSON ``anomaly`` event) and
    handed to the alert hooks and ``LogConfig.alert_cmd`` in a background thread.

    Args:
        config: settings; ``None`` (as ``report_to`` builds it) reads the environment at train begin.
        alert_hooks: callables, each called with every anomaly as a dict (``kind``, ``global_step``,
            ``message``, ``value``, ``threshold``), in a background thread; one that raises is
            reported once.

    Environment (read only when ``config`` is ``None``, see :meth:`LogConfig.from_env`):
        SEO_TRAINLOG_DIR, SEO_TRAINLOG_LEVEL, SEO_TRAINLOG_DEBUG, SEO_TRAINLOG_CONSOLE,
        SEO_TRAINLOG_ROTATION, SEO_TRAINLOG_RETENTION, SEO_TRAINLOG_SAMPLE_INTERVAL,
        SEO_TRAINLOG_DATA_WAIT_WARN_PCT, SEO_TRAINLOG_DETECT_ANOMALIES, SEO_TRAINLOG_ANOMALY_WINDOW,
        SEO_TRAINLOG_LOSS_SPIKE_Z, SEO_TRAINLOG_GRAD_NORM_JUMP, SEO_TRAINLOG_THROUGHPUT_DROP_PCT,
        SEO_TRAINLOG_MEMORY_CREEP_MB, SEO_TRAINLOG_PLATEAU_EVALS, SEO_TRAINLOG_PLATEAU_MIN_DELTA,
        SEO_TRAINLOG_STRAGGLER_PCT, SEO_TRAINLOG_STRAGGLER_WINDOW, SEO_TRAINLOG_ALERT_CMD,
        SEO_TRAINLOG_ALERT_TIMEOUT, SEO_TRAINLOG_PROMETHEUS_PORT, SEO_TRAINLOG_PROMETHEUS_ADDR,
        SEO_TRAINLOG_PROMETHEUS_LINGER, SEO_TRAINLOG_PROMETHEUS_TEXTFILE, SEO_TRAINLOG_PUSHGATEWAY,
        SEO_TRAINLOG_PEAK_TFLOPS.

    Raises:
        TypeError: at once, for a ``config`` that is not a :class:`LogConfig` or an alert hook that
            is not callable.
        ValueError: at train begin, for a bad environment variable.
        OSError: at train begin, when the log directory cannot be written.
    """

    def __new__(cls, *args: Any, restored: bool = False, **kwargs: Any) -> TrainLogCallback:
        # With ``restore_callback_states_from_checkpoint=True`` transformers rebuilds each stateful
        # callback from its saved args and puts the new one in place of the one you gave: here that
        # "new" one is yours (the instance it replaces), so your config and alert hooks stay.
        replaced = _replaced_callback(cls) if restored else None
        return replaced if replaced is not None else super().__new__(cls)

    def __init__(self, config: LogConfig | None = None, alert_hooks: Sequence[AlertHook] = (), *,
                 restored: bool = False) -> None:
        if restored and "_run" in vars(self):  # the instance __new__ kept: as it was
            return
        if config is not None and not isinstance(config, LogConfig):
            raise TypeError(f"config must be a seo_trainlog.LogConfig or None, got {type(config).__name__}; "
                            "for example TrainLogCallback(LogConfig(log_dir='logs'))")
        for hook in alert_hooks:
            if not callable(hook):
                raise TypeError(f"alert_hooks must be callables, got {type(hook).__name__}")
        self.config = config
        self.alert_hooks = list(alert_hooks)
        self._run: Run | None = None
        self._marks: list[float] | None = None  # the open run's StepTimer.marks (the hot path appends)
        self._last_run: tuple[LogConfig, str] | None = None
        self._failed_events: set[str] = set()
        self._collate = CollateSums()  # the timings of our Trainer's TimedDataCollator
        self._begin_lock = threading.Lock()
        self.run_id: str | None = None  # the run this callback writes or wrote last (restored on resume)

    # ------------------------------------------------------------------ state in checkpoints

    def state(self) -> dict[str, Any]:
        """Saved by the Trainer in each checkpoint's ``trainer_state.json``: the run id, so that
        ``train(resume_from_checkpoint=...)`` continues the same run (see :meth:`on_train_begin`), and
        in one process ``tokens_seen_at_save`` (``[global_step, num_input_tokens_seen]``) when the
        checkpoint is saved at a logging step, so that a resumed run's token count goes on from it."""
        attributes: dict[str, Any] = {"run_id": self.run_id}
        run = self._run
        if run is not None and run.logger.role.world_size == 1 and run.token_step is not None \
                and run.token_step == run.state.global_step:  # saved at a logging step: the count is exact
            attributes["tokens_seen_at_save"] = [run.token_step, run.meter.seen]
        return {"args": {"restored": True}, "attributes": attributes}

    def __copy__(self) -> TrainLogCallback:
        return TrainLogCallback(self.config, self.alert_hooks)

    def __deepcopy__(self, memo: dict[int, Any]) -> TrainLogCallback:
        """A copy with the same settings and alert hooks and no open run (a copied Trainer then opens
        its own run if it trains)."""
        return TrainLogCallback(self.config, self.alert_hooks)

    # ------------------------------------------------------------------ run lifecycle

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, eval_dataloader=None,
                       **kwargs):
        with self._begin_lock:  # two Trainers sharing this instance may begin at once in two threads
            return self._train_begin(args, state, control, model, train_dataloader, eval_dataloader, **kwargs)

    def _train_begin(self, args, state, control, model, train_dataloader, eval_dataloader, **kwargs):
        trainer = find_trainer()
        if self._run is not None:
            if self._run.retrying:
                return self._resume_after_retry(args, state)
            if self._run.state is state:  # the same instance twice in the callback list
                return None
            if self._run.thread != threading.get_ident() and self._run.pid == os.getpid() and trainer is not None \
                    and self in trainer.callback_handler.callbacks:
                # this instance was given to another Trainer that trains in another thread now: this
                # Trainer gets a twin of its own (same settings and hooks), so each run keeps its state
                callbacks = trainer.callback_handler.callbacks
                twin = copy.copy(self)
                callbacks[callbacks.index(self)] = twin
                return twin.on_train_begin(args, state, control, model=model, train_dataloader=train_dataloader,
                                           eval_dataloader=eval_dataloader, **kwargs)
            self._finish("abandoned")  # the previous train() ended without any event we could see
        if not self._elected(trainer):
            return None
        tlog, owns = self._open_logger(self._resumed_run_id(state))  # ValueError/OSError: before any step
        try:
            self._start_run(tlog, owns, trainer, args, state, model, train_dataloader, eval_dataloader)
        except Exception as exc:
            self._internal_error("on_train_begin", exc)
        return None

    def _start_run(self, tlog, owns, trainer, args, state, model, train_dataloader, eval_dataloader) -> None:
        per_device = int(args.per_device_train_batch_size)
        run = Run(
            logger=tlog, owns_logger=owns, state=state, args=args,
            samples_per_step=(state.train_batch_size or per_device) * args.gradient_accumulation_steps
            * max(1, args.world_size),
            train_examples=dataset_size(train_dataloader), per_device_batch_size=per_device,
            per_step_detail=tlog.config.level == "DEBUG" or tlog.config.debug, collate=self._collate,
            interval_first_step=state.global_step + 1, detail_next_step=state.global_step + 1,
        )
        self._run = run
        self._watch_steps(run)
        _OPEN_RUNS.add(self)
        # to_dict() blanks hub_token: the value itself is learnt, first of the recorder thread's jobs
        # after the opening (anything written from this thread waits for them; the nested values are
        # masked, and learnt, with the hyperparameters)
        tlog.defer("on_train_begin", functools.partial(_remember_argument_secrets, args))
        tlog.hold_others()  # (another thread's record, a library warning, waits for them too)
        if trainer is not None:
            self._guard(run, trainer)
        run.sigterm = SigtermHook(functools.partial(self._on_sigterm, run), busy=logging_busy)
        config = tlog.config
        primary = tlog.role.is_world_process_zero  # anomalies and alerts: global rank 0 only, never twice
        if primary and config.detect_anomalies:
            run.detector = AnomalyDetector(config)
            tlog.defer("on_train_begin", functools.partial(tlog.log_metrics, "detector",
                                                           {"settings": settings_of(config)}))
            if self.alert_hooks or config.alert_cmd:
                run.alerts = AlertDispatcher(self.alert_hooks, config.alert_cmd, config.alert_timeout_s,
                                             report_failure=tlog._warn)
        counting = isinstance(getattr(trainer, "data_collator", None), TimedDataCollator)  # tokens to sum
        if (config.detect_anomalies or counting) and tlog.role.world_size > 1 and tlog.agreement.key is not None:
            store = launch_store()
            if store is not None:
                run.exchange = TelemetryExchange(store, tlog.agreement.key, tlog.role, tlog._warn)
                if primary and config.detect_anomalies:
                    run.straggler = StragglerDetector(config.straggler_pct, config.straggler_window)
        self._measure(run, tlog, args, state, model)
        if tlog.writes:  # rank 0 and node leaders; other ranks record their errors and rank_step numbers
            role = tlog.role
            run.sampler = ResourceSampler(tlog.config.sample_interval_s,
                                          notice=functools.partial(tlog.log_message, category="model"),
                                          local_rank=role.local_rank if role.world_size > 1 else None)
            # its thread started by the recorder thread (the first drain, at the first logging step,
            # waits for its first reading either way)
            run.sampler.start_in(functools.partial(tlog.defer, "on_train_begin", wake=True))
        if _prometheus.configured(config):  # on every rank: each exports its own series
            self._open_exporter(run, tlog, state)
        self.run_id = tlog.run_id
        # what follows is written by the recorder thread, in this order, after the run's files are open
        tlog.defer("on_train_begin", functools.partial(tlog.mark, state.global_step, state.epoch))
        tlog.defer("on_train_begin", functools.partial(tlog.start_segment, state.global_step,
                                                       _resumed_from(state)))
        hyperparameters = gather_hyperparameters(args, state, model, train_dataloader, eval_dataloader, trainer)
        resumed = f", resuming at global_step {state.global_step}" if state.global_step else ""
        trial = ", hyperparameter search trial " + " ".join(
            str(part) for part in (state.trial_name, state.trial_params) if part) \
            if state.is_hyper_param_search or state.trial_params else ""
        started = (f"Training started: max_steps={state.max_steps}, num_train_epochs={state.num_train_epochs}, "
                   f"world_size={args.world_size}{resumed}{trial}")
        # the run's values are taken now; the arguments and the model's facts, which a train() does not
        # change, are read (to_dict, a pass over the parameters), masked, formatted and written with
        # the first batch of deferred records (TrainLogger.defer), as the logging steps' are, stamped
        # with this time
        tlog.defer("on_train_begin",
                   functools.partial(write_hyperparameters, tlog, hyperparameters, args, model, started))
        collator = getattr(trainer, "data_collator", None)
        if isinstance(collator, TimedDataCollator):
            run.collator = collator
            collator.attach(self._collate)
            if args.dataloader_num_workers > 0:
                collator.enable_worker_timings(args.dataloader_multiprocessing_context)
            collator.drain_worker_timings()
        self._collate.discard()  # calls from before this run are not this run's
        self._collate.phase, self._collate.logger = "train", tlog
        bind_thread(self._collate)  # collations in this (the training) thread are this run's
        run.timer.mark(perf_counter())

    @staticmethod
    def _measure(run: Run, tlog: TrainLogger, args, state, model) -> None:
        """What ``mfu_pct`` needs: trainable parameters, layers and hidden size of the model's config,
        the peak FLOP/s of the run's devices (``LogConfig.peak_tflops``, else the table by the NVML
        name of this rank's GPU and the dtype of ``args``; none on CPU) times the world size. Without
        a peak there is no MFU, and the parameters are not counted here (the hyperparameters' record
        counts them, in the recorder thread)."""
        meter = run.meter
        meter.workers = max(1, int(args.dataloader_num_workers or 0))
        meter.trainer_seen = getattr(state, "num_input_tokens_seen", None) or 0
        if state.global_step and not trainer_counts(args):
            # resumed without the Trainer's count: go on from the checkpoint's count, else say where ours began
            saved = _saved_tokens(state)
            if saved is not None and saved[0] == state.global_step and tlog.role.world_size == 1:
                meter.seen = saved[1]
            else:
                meter.counted_from = state.global_step
        peak = tlog.config.peak_tflops
        device = getattr(getattr(args, "device", None), "type", None)
        if peak is None and device == "cuda":
            name = device_name(tlog.role.local_rank if tlog.role.world_size > 1 else 0)
            peak = peak_tflops_for(name, training_dtype(args)) if name else None
        if peak is not None:
            meter.peak_flops = peak * 1e12 * max(1, tlog.role.world_size)
            if model is not None:  # (a pass over the parameters: only where MFU is computed)
                meter.trainable_parameters, meter.num_layers, meter.hidden_size = model_shape(model)

    @staticmethod
    def _open_exporter(run: Run, tlog: TrainLogger, state) -> None:
        trial = (state.trial_name or "") if state.is_hyper_param_search or state.trial_params else None
        exporter = _prometheus.open_exporter(tlog.config, tlog.role, tlog.run_id, trial, tlog._warn,
                                             anomaly_kinds=KINDS if run.detector is not None else ())
        if exporter is not None:
            if run.sampler is None:  # no sampler on this rank: the resident memory is read when scraped
                exporter.scrape_rss(rss_mb)
            tlog.error_hooks.append(exporter.count_error)
            run.exporter = exporter

    def _guard(self, run: Run, trainer) -> None:
        callbacks = trainer.callback_handler.callbacks
        later = callbacks[callbacks.index(self) + 1:] if self in callbacks else []
        run.guard = TrainerGuard(trainer, functools.partial(self._on_exception, run), later_callbacks=later,
                                 on_finalized=functools.partial(self._after_training, run),
                                 on_evaluation=self._evaluating)

    def _evaluating(self, active: bool) -> None:
        """The Trainer's evaluation loop starts (``True``) or ends: collations in between are the
        evaluation's, not the training interval's."""
        self._collate.phase = "eval" if active else "train"

    def _after_training(self, run: Run) -> None:
        """``_finalize_training`` returned: normally our ``on_train_end`` has finished the run already;
        if this callback was removed from the trainer mid-run, finish it now."""
        if run is self._run:
            self._finish("completed")

    def _resume_after_retry(self, args, state) -> None:
        run = self._run
        run.retrying = False
        trainer = find_trainer()
        if trainer is not None:
            self._guard(run, trainer)
        run.state, run.args = state, args
        run.samples_per_step = (state.train_batch_size or run.per_device_batch_size) \
            * args.gradient_accumulation_steps * max(1, args.world_size)
        run.timer = StepTimer()
        run.detail_next_step = state.global_step + 1
        self._watch_steps(run)
        run.meter.substeps = run.meter.owed = run.meter.epoch_batches = run.meter.credit_steps = 0
        self._collate.train.pending.clear()  # batches read ahead for the failed attempt
        run.logger.log_message(f"Training restarted by auto_find_batch_size with train_batch_size="
                               f"{state.train_batch_size}")
        run.timer.mark(perf_counter())

    def _watch_steps(self, run: Run | None) -> None:
        """The list on_step_begin/on_step_end append to: ``run``'s timer's marks (None: no run). With
        per-step detail (a DEBUG line per step) the timer keeps each step's end and time."""
        if run is None:
            self._marks = None
            return
        if run.per_step_detail:
            run.timer.ended = []
        self._marks = run.timer.marks

    @never_raises
    def on_train_end(self, args, state, control, **kwargs):
        if self._run is not None and self._run.state is state:
            self._finish("completed")

    def _on_exception(self, run: Run, error: BaseException) -> None:
        if os.getpid() != run.pid:  # a forked child's exception is not this run's
            return
        if run is not self._run:  # raised after this run's summary, e.g. by another callback's on_train_end
            if not was_logged(error):
                self._log_late_error(run, error)
            return
        if run.retrying:  # the out-of-memory error, seen again by an outer wrapper
            return
        state, tlog = run.state, run.logger
        tlog.mark(state.global_step, state.epoch)
        if run.args.auto_find_batch_size and not was_logged(error) and _is_out_of_memory(error):
            tlog._warn(f"Out of memory at train_batch_size={state.train_batch_size}; auto_find_batch_size "
                       f"retries with a smaller batch: {type(error).__name__}: {_format.safe_str(error)}")
            mark_logged(error)
            run.retrying = True
            if run.guard is not None:
                run.guard.remove()
                run.guard = None
            return
        status = _status_of(error, run)
        tlog.log_error(
            error, operation="training",
            context=f"trainer.train() stopped at global_step {state.global_step}, "
                    f"epoch {_format.fmt_epoch(state.epoch)}",
            additional_info={"global_step": state.global_step, "epoch": state.epoch, "max_steps": state.max_steps,
                             "status": status})
        self._finish(status)
        if isinstance(error, TerminatedBySignal) and run.sigterm is not None and run.sigterm.final:
            run.sigterm.resend()  # the signal came while we were writing: now it may do its work

    def _on_sigterm(self, run: Run, error: TerminatedBySignal, final: bool) -> None:
        if run is not self._run:
            return
        if not final:
            run.logger.mark(run.state.global_step, run.state.epoch)
            what = ("passing it to the SIGTERM handler installed before seo_trainlog" if run.sigterm is None
                    or callable(run.sigterm._previous) else "it stays ignored (SIG_IGN was set before)")
            run.logger._warn(f"SIGTERM received at global_step {run.state.global_step}; {what}")
            return
        self._on_exception(run, error)

    def _log_late_error(self, run: Run, error: BaseException) -> None:
        if self._last_run is None or run.logger.run_id != self._last_run[1]:
            return
        with self._logger_for_last_run() as tlog:
            tlog.log_error(error, operation="training",
                           context="raised after the training summary was written (e.g. in another "
                                   "callback's on_train_end); the run's status is failed")
            tlog.log_metrics("status", {"status": _status_of(error, run)})

    def _finish(self, status: str) -> None:
        run = self._run
        if run is None or os.getpid() != run.pid:  # a forked child never closes its parent's run
            return
        self._run = None
        self._watch_steps(None)
        _OPEN_RUNS.discard(self)
        tlog = run.logger
        # the summary is written, and the run's threads stopped, by the recorder thread (the training
        # thread waits for it below, in flush() or close(): a wait, not work)
        tlog.defer("on_train_end", functools.partial(self._write_end, run, status, perf_counter() - run.started_s))
        try:
            if run.alerts is not None:
                tlog.flush()  # the summary on disk before any wait for alerts: a second Ctrl-C loses nothing
                try:
                    run.alerts.close(wait_s=tlog.config.alert_timeout_s, completed=status == "completed")
                except BaseException as exc:  # a second Ctrl-C during the wait: the run is recorded already
                    mark_logged(exc)
                    raise
        finally:
            try:
                if run.owns_logger:
                    tlog.close()
                else:
                    tlog.release_training()
                    tlog.flush()
            finally:
                if run.sigterm is not None:  # (from the main thread: signal handlers are set there only)
                    run.sigterm.remove()
                self._last_run = (tlog.config, tlog.run_id)
                self._collate.logger = None
                self._collate.phase = "train"
                if _thread_sums() is self._collate:  # (a thread-local binding: the training thread's)
                    bind_thread(None)

    def _write_end(self, run: Run, status: str, duration_s: float) -> None:
        """The run's last records (the remaining interval, collate timings, the training summary with
        status ``status``), then its guard, sampler and exporter stopped."""
        state, tlog = run.state, run.logger
        try:
            losses = [_format.to_number(entry[key]) for entry in state.log_history or ()
                      if (key := training_loss_key(entry)) is not None and _format.is_finite_number(entry[key])]
            extra = run_resources(run)
            if state.trial_params:
                extra["trial_name"] = state.trial_name
                extra["trial_params"] = state.trial_params
            if state.best_metric is not None:
                extra["best_metric"] = state.best_metric
                extra["best_model_checkpoint"] = state.best_model_checkpoint
            await_rank_tokens(run)
            seen = tokens_at_end(run)
            if seen is not None:
                extra["num_input_tokens_seen"] = seen
                if run.meter.counted_from is not None and not trainer_counts(run.args):
                    extra["tokens_counted_from_global_step"] = run.meter.counted_from
            tlog.mark(state.global_step, state.epoch)
            steps = take_step_times(run)
            if steps:
                tlog.write_step_times(steps)
            if not run.pending.empty:
                write_interval(run, *run.pending.take(), run.sampler.drain() if run.sampler else {})
            write_remaining_collate(run)
            self._collate.eval.drain()  # an evaluation that logged nothing
            tlog.log_training_summary(
                total_epochs=state.epoch or 0, total_steps=state.global_step,
                final_loss=losses[-1] if losses else None, best_loss=min(losses) if losses else None,
                training_duration=duration_s,
                early_stopping_triggered=status == "completed" and 0 < state.global_step < state.max_steps,
                status=status, extra=extra)
            tlog.log_message(f"Training {status}: global_step={state.global_step}")
        finally:
            if run.guard is not None:
                run.guard.remove()
            if run.sampler is not None:
                run.sampler.stop()
            if run.exporter is not None:
                if run.exporter.count_error in tlog.error_hooks:
                    tlog.error_hooks.remove(run.exporter.count_error)
                run.exporter.finish(status)

    # ------------------------------------------------------------------ per step (hot path)

    # A step costs the training loop two appends of a perf_counter() reading to the run's StepTimer
    # marks (begin positive, end negative), folded into the interval's sums at the next logging step.

    def on_step_begin(self, args, state, control, **kwargs):
        marks = self._marks
        if marks is not None:
            marks.append(perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        marks = self._marks
        if marks is not None:
            marks.append(-perf_counter())

    def on_substep_end(self, args, state, control, **kwargs):
        run = self._run
        if run is not None:  # a micro-batch of gradient accumulation used (its tokens: at the logging step)
            run.meter.substeps += 1

    # ------------------------------------------------------------------ logging events

    @never_raises
    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        run = self._run
        if run is None or run.state is not state:
            with self._logger_outside_run(state) as tlog:
                if tlog is not None:
                    drain_workers(None, settle=True)
                    collate = self._collate.drain_all()
                    write_log(tlog, None, state.global_step, state.epoch, dict(logs), {}, collate)
            return
        loss_key = training_loss_key(logs)
        training = loss_key is not None
        timing = run.timer.drain(run.samples_per_step) if training else {}
        evaluation = not training and speed_prefix(logs) not in (None, "train")
        drain_workers(run, settle=evaluation)
        collate = self._collate.train.drain() if training else self._collate.eval.drain() if evaluation else {}
        steps = take_step_times(run)
        if steps:
            if not training:
                run.logger.defer("on_step_end", functools.partial(run.logger.write_step_times, steps))
        tokens = take_tokens(run, timing) if training and timing else None
        if training:
            # the step's numbers are taken now; the run's recorder thread formats and writes them
            # (TrainLogger.defer), out of the training loop's way
            resources = {**run.sampler.drain(), **cuda_memory()} if run.sampler else \
                {"rss_mb": rss_mb(), **cuda_memory()}
            if run.exporter is not None:  # gauges set now; the textfile written with the deferred records
                run.exporter.observe_train(state.global_step, state.epoch, logs, loss_key, timing, resources,
                                           collate)
                run.exporter.schedule_textfile(run.logger.defer)
            run.logger.defer("on_log", functools.partial(write_log, run.logger, run, state.global_step, state.epoch,
                                                         dict(logs), timing, collate, resources, tokens, steps))
            if run.exchange is not None and timing:
                exchange_interval(run, state.global_step, {**timing, **collate}, tokens)
        else:
            if evaluation and run.exporter is not None:
                run.exporter.observe_eval(logs)
            write_log(run.logger, run, state.global_step, state.epoch, logs, timing, collate)
        run.timer.mark(perf_counter())

    @never_raises
    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self._write_speed("evaluation", state, metrics or {})

    @never_raises
    def on_predict(self, args, state, control, metrics=None, **kwargs):
        self._write_speed("prediction", state, metrics or {})

    @never_raises
    def on_epoch_begin(self, args, state, control, **kwargs):
        run = self._run
        if run is not None:
            run.epoch_started_s = perf_counter()
            run.logger.defer("on_epoch_begin", functools.partial(
                run.logger.log_message, f"Epoch {math.floor(state.epoch or 0) + 1} started at global_step "
                                        f"{state.global_step}", category="training_detailed"))
            run.timer.new_epoch()
            if run.collator is not None:  # the previous epoch's last batches: their index restarts now
                if run.args.dataloader_num_workers > 0:
                    drain_workers(run, settle=run.meter.wanted(run.timer.steps) > 0)
                run.meter.new_epoch(self._collate.train, run.timer.steps)

    @never_raises
    def on_epoch_end(self, args, state, control, **kwargs):
        run = self._run
        if run is None or run.epoch_started_s is None:
            return
        epoch_number = max(1, math.ceil((state.epoch or 0) - 1e-9))
        run.logger.defer("on_epoch_end", functools.partial(
            write_epoch, run.logger, epoch_number, perf_counter() - run.epoch_started_s,
            state.global_step, state.epoch, rss_mb))
        run.timer.mark(perf_counter())

    @never_raises
    def on_save(self, args, state, control, **kwargs):
        run = self._run
        if run is None:
            return
        # at the save's step (not the last logging step's), written by the recorder thread in order
        run.logger.defer("on_save", functools.partial(write_checkpoint, run.logger,
                                                      f"{args.output_dir}/checkpoint-{state.global_step}",
                                                      state.global_step, state.epoch))
        run.timer.mark(perf_counter())

    # ------------------------------------------------------------------ helpers

    def _write_speed(self, operation: str, state, metrics: Mapping[Any, Any]) -> None:
        run = self._run
        if run is not None:
            write_speed(run.logger, operation, state.global_step, state.epoch, metrics)
            run.timer.mark(perf_counter())
            return
        with self._logger_outside_run(state) as tlog:
            if tlog is not None:
                write_speed(tlog, operation, state.global_step, state.epoch, metrics)

    def _elected(self, trainer) -> bool:
        """Of several TrainLogCallbacks on one Trainer, only one writes: explicit config first. The
        same instance added twice is removed from the list once (with a warning)."""
        if trainer is None:
            return True
        callbacks = trainer.callback_handler.callbacks
        peers = [cb for cb in callbacks if isinstance(cb, TrainLogCallback)]
        if len(peers) <= 1:
            return True
        if peers.count(self) > 1:
            first = callbacks.index(self)
            callbacks[first + 1:] = [cb for cb in callbacks[first + 1:] if cb is not self]
            safe_warn("The same TrainLogCallback was added twice to this Trainer; it is kept once.")
            peers = [cb for cb in callbacks if isinstance(cb, TrainLogCallback)]
        winner = next((cb for cb in peers if cb.config is not None), peers[0])
        return winner is self

    def _open_logger(self, resumed_run_id: str | None = None) -> tuple[TrainLogger, bool]:
        """Join the innermost open, joinable TrainLogger (if this callback has no config of its own,
        or an equal one), else open a run of our own, which no other callback joins: the run
        ``resumed_run_id`` continued, or a new one."""
        active = innermost_open_logger()
        if active is not None and (self.config is None or self.config == active.config) \
                and active.claim_training():  # not while a Trainer in another thread trains in it
            return active, False
        config = self.config or (active.config if active is not None else None) or LogConfig.from_env()
        return TrainLogger(config, run_id=resumed_run_id, joinable=False, resume=resumed_run_id is not None,
                           open_in_background=True), True

    def _resumed_run_id(self, state) -> str | None:
        """The run a resumed ``train()`` continues: the run id our state in the checkpoint's
        ``trainer_state.json`` holds (or transformers restored on this instance); None for a new run."""
        if not state.global_step:
            return None
        stored = (state.stateful_callbacks or {}).get(_STATE_NAME) if isinstance(state.stateful_callbacks, dict) \
            else None
        for entry in stored if isinstance(stored, list) else [stored]:
            run_id = (entry.get("attributes") or {}).get("run_id") if isinstance(entry, dict) else None
            if isinstance(run_id, str) and _RUN_ID.match(run_id):
                return run_id
        return None

    @contextlib.contextmanager
    def _logger_outside_run(self, state) -> Iterator[TrainLogger | None]:
        """A logger for events outside train(): an open joinable TrainLogger, else the last run's files."""
        if not writes_shared_files(state) or not self._elected(find_trainer()):
            yield None
            return
        active = innermost_open_logger()
        if active is not None and (self.config is None or self.config == active.config):
            yield active
            return
        with self._logger_for_last_run() as tlog:
            yield tlog

    @contextlib.contextmanager
    def _logger_for_last_run(self) -> Iterator[TrainLogger]:
        if self._last_run is not None:
            tlog = TrainLogger(self._last_run[0], run_id=self._last_run[1], joinable=False)
        else:  # evaluate()/predict() before any training: a run of its own, that says it did not train
            tlog = TrainLogger(self.config or LogConfig.from_env(), joinable=False)
            self._last_run = (tlog.config, tlog.run_id)
            tlog.log_message("Evaluation without training: this run holds evaluation and prediction records only")
            tlog.log_metrics("status", {"status": "no_training"})
        try:
            yield tlog
        finally:
            tlog.close()

    def _internal_error(self, event: str, exc: Exception) -> None:
        if event in self._failed_events:
            return
        self._failed_events.add(event)
        message = f"seo_trainlog {event} failed (training goes on): {type(exc).__name__}: {_format.safe_str(exc)}"
        run = self._run
        if run is not None:
            try:
                run.logger._warn(message)
            except Exception:
                pass
        safe_warn(message)


def _remember_argument_secrets(args) -> None:
    """Teach the redactor the values of ``args``' secret-looking attributes (``hub_token``...)."""
    arguments = vars(args)
    remember_secrets({key: arguments[key] for key in secret_keys(arguments)})


def _replaced_callback(cls: type) -> TrainLogCallback | None:
    """The instance of ``cls`` transformers' ``Trainer._load_callback_state`` is replacing (its loop
    variable ``callback``), if that is who calls."""
    return caller_local("callback", lambda value: isinstance(value, cls), ("_load_callback_state",), max_depth=4)


def _finish_runs_at_exit() -> None:
    for callback in list(_OPEN_RUNS):
        run = callback._run
        status = "terminated" if run is not None and run.sigterm is not None and run.sigterm.received else "abandoned"
        try:
            callback._finish(status)
        except Exception:
            pass


atexit.register(_finish_runs_at_exit)


def _status_of(error: BaseException, run: Run) -> str:
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    if isinstance(error, (SystemExit, TerminatedBySignal)) or (run.sigterm is not None and run.sigterm.received):
        return "terminated"
    return "failed"


def _is_out_of_memory(error: BaseException) -> bool:
    try:
        from accelerate.utils.memory import should_reduce_batch_size
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return False
    return isinstance(error, Exception) and bool(should_reduce_batch_size(error))


def _saved_tokens(state) -> tuple[int, int] | None:
    """``(global_step, num_input_tokens_seen)`` our state in the resumed checkpoint holds
    (:meth:`TrainLogCallback.state`), None when it holds none."""
    stored = (state.stateful_callbacks or {}).get(_STATE_NAME) if isinstance(state.stateful_callbacks, dict) \
        else None
    for entry in stored if isinstance(stored, list) else [stored]:
        saved = (entry.get("attributes") or {}).get("tokens_seen_at_save") if isinstance(entry, dict) else None
        if isinstance(saved, list) and len(saved) == 2 and all(type(v) is int for v in saved):
            return saved[0], saved[1]
    return None


def _resumed_from(state) -> str | None:
    """The checkpoint ``train(resume_from_checkpoint=...)`` resumes from (read from the caller's frame),
    when resuming."""
    if not state.global_step:
        return None
    checkpoint = caller_local("resume_from_checkpoint", lambda value: isinstance(value, (str, os.PathLike)),
                              ("_inner_training_loop", "train"))
    return os.fspath(checkpoint) if checkpoint is not None else None


