from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

from transformers import TrainerCallback

from . import _format
from ._config import LogConfig
from ._guard import TrainerGuard, find_trainer
from ._logger import TrainLogger, innermost_open_logger
from ._monitor import rss_mb
from ._rank import writes_shared_files
from ._timing import COLLATE_STATS, StepTimer

_SPEED_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second")


@dataclass
class _Run:
    logger: TrainLogger
    owns_logger: bool
    state: Any
    samples_per_step: int
    train_examples: int | None
    per_device_batch_size: int
    per_step_detail: bool
    started_s: float = field(default_factory=perf_counter)
    timer: StepTimer = field(default_factory=StepTimer)
    interval_first_step: int = 1
    epoch_started_s: float | None = None
    guard: TrainerGuard | None = None


class TrainLogCallback(TrainerCallback):
    """A ``TrainerCallback`` that writes every Trainer run to seo_trainlog's categorised log files.

    Use either ``trainer.add_callback(TrainLogCallback())`` or, after ``import seo_trainlog``,
    ``TrainingArguments(report_to="seo_trainlog")``. When both are present on one Trainer only one
    of them writes: the one given an explicit ``config``, else the first.

    What each Trainer event writes (files described in :class:`~seo_trainlog.TrainLogger`):

    - ``on_train_begin``: opens the run (or joins an open :class:`TrainLogger` when this callback has
      no explicit config); hyperparameters: ``TrainingArguments`` (secrets masked), model class,
      parameter counts and config, dataset sizes, world size, max_steps.
    - ``on_step_begin``/``on_step_end``: only timestamps (``time.perf_counter``) and sums.
    - ``on_log``: training progress (epoch, global_step, loss, learning_rate, grad_norm and any other
      value) with the interval's step time, data wait share and samples/s; ``<prefix>_*`` evaluation
      values as validation loss and metrics; collate timings of :class:`TimedDataCollator`; one JSON
      line per event.
    - ``on_evaluate``/``on_predict``: runtime, throughput and RSS memory in the model-performance log.
    - ``on_epoch_begin``/``on_epoch_end``: epoch wall time. ``on_save``: the checkpoint path.
    - ``on_train_end``: the training summary (``early_stopping_triggered`` is true when training
      stopped before ``max_steps`` because a callback such as ``EarlyStoppingCallback`` asked it to),
      then the run's handlers are removed.
    - An exception escaping ``trainer.train()`` (``KeyboardInterrupt`` included), for which the
      Trainer calls no event: the error with traceback, global_step and epoch, a summary with status
      ``failed``/``interrupted``, handlers removed; the exception then propagates unchanged.

    Only the world-process-zero writes. ``evaluate()``/``predict()`` after training append to the
    last run's files.

    Args:
        config: settings; ``None`` (as ``report_to`` builds it) reads the environment at train begin.

    Environment (read only when ``config`` is ``None``, see :meth:`LogConfig.from_env`):
        SEO_TRAINLOG_DIR, SEO_TRAINLOG_LEVEL, SEO_TRAINLOG_DEBUG, SEO_TRAINLOG_CONSOLE,
        SEO_TRAINLOG_ROTATION, SEO_TRAINLOG_RETENTION.

    Raises:
        ValueError: at train begin, for a bad environment variable.
        OSError: at train begin, when the log directory cannot be written.
    """

    def __init__(self, config: LogConfig | None = None) -> None:
        self.config = config
        self._run: _Run | None = None
        self._last_run: tuple[LogConfig, str] | None = None

    # ------------------------------------------------------------------ run lifecycle

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, eval_dataloader=None,
                       **kwargs):
        if self._run is not None:  # a previous train() ended without any event (e.g. a batch-size retry)
            self._finish("abandoned")
        if not writes_shared_files(state):
            return
        trainer = find_trainer()
        if not self._elected(trainer):
            return
        tlog, owns = self._open_logger()
        per_device = int(args.per_device_train_batch_size)
        run = _Run(
            logger=tlog, owns_logger=owns, state=state,
            samples_per_step=(state.train_batch_size or per_device) * args.gradient_accumulation_steps
            * max(1, args.world_size),
            train_examples=_dataset_size(train_dataloader), per_device_batch_size=per_device,
            per_step_detail=tlog.config.level == "DEBUG" or tlog.config.debug,
            interval_first_step=state.global_step + 1,
        )
        self._run = run
        COLLATE_STATS.drain()  # calls from before this run are not this run's
        if trainer is not None:
            run.guard = TrainerGuard(trainer, self._on_exception)
        tlog.mark(state.global_step, state.epoch)
        tlog.log_hyperparameters(_hyperparameters(args, state, model, train_dataloader, eval_dataloader))
        resumed = f", resuming at global_step {state.global_step}" if state.global_step else ""
        tlog.log_message(f"Training started: max_steps={state.max_steps}, num_train_epochs="
                         f"{state.num_train_epochs}, world_size={args.world_size}{resumed}")
        run.timer.mark(perf_counter())

    def on_train_end(self, args, state, control, **kwargs):
        if self._run is not None:
            self._finish("completed")

    def _on_exception(self, error: BaseException) -> None:
        run = self._run
        if run is None:
            return
        state = run.state
        status = ("interrupted" if isinstance(error, KeyboardInterrupt)
                  else "terminated" if isinstance(error, SystemExit) else "failed")
        run.logger.mark(state.global_step, state.epoch)
        run.logger.log_error(
            error, operation="training",
            context=f"trainer.train() stopped at global_step {state.global_step}, "
                    f"epoch {_format.fmt_epoch(state.epoch)}",
            additional_info={"global_step": state.global_step, "epoch": state.epoch, "max_steps": state.max_steps,
                             "status": status})
        self._finish(status)

    def _finish(self, status: str) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        state, tlog = run.state, run.logger
        try:
            losses = [entry["loss"] for entry in state.log_history or ()
                      if "loss" in entry and _format.is_finite_number(entry["loss"])]
            extra: dict[str, Any] = {}
            if state.best_metric is not None:
                extra["best_metric"] = state.best_metric
                extra["best_model_checkpoint"] = state.best_model_checkpoint
            tlog.mark(state.global_step, state.epoch)
            tlog.log_training_summary(
                total_epochs=state.epoch or 0, total_steps=state.global_step,
                final_loss=_format.to_number(losses[-1]) if losses else None,
                best_loss=min(_format.to_number(loss) for loss in losses) if losses else None,
                training_duration=perf_counter() - run.started_s,
                early_stopping_triggered=status == "completed" and 0 < state.global_step < state.max_steps,
                status=status, extra=extra)
            tlog.log_message(f"Training {status}: global_step={state.global_step}")
        finally:
            if run.guard is not None:
                run.guard.remove()
            self._last_run = (tlog.config, tlog.run_id)
            if run.owns_logger:
                tlog.close()

    # ------------------------------------------------------------------ per step (hot path)

    def on_step_begin(self, args, state, control, **kwargs):
        run = self._run
        if run is not None:
            run.timer.step_begin(perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        run = self._run
        if run is not None:
            elapsed = run.timer.step_end(perf_counter())
            if run.per_step_detail:
                run.logger.log_message(f"Step {state.global_step}: step time {elapsed:.4f}s", "DEBUG",
                                       "training_detailed")

    # ------------------------------------------------------------------ logging events

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        run = self._run
        if run is None:
            with self._outside_run(state) as tlog:
                if tlog is not None:
                    self._write_log(tlog, None, state, logs)
            return
        self._write_log(run.logger, run, state, logs)
        run.timer.mark(perf_counter())

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self._write_speed("evaluation", state, metrics or {})

    def on_predict(self, args, state, control, metrics=None, **kwargs):
        self._write_speed("prediction", state, metrics or {})

    def on_epoch_begin(self, args, state, control, **kwargs):
        run = self._run
        if run is not None:
            run.epoch_started_s = perf_counter()
            run.logger.log_message(f"Epoch {math.floor(state.epoch or 0) + 1} started at global_step "
                                   f"{state.global_step}", category="training_detailed")
            run.timer.mark(run.epoch_started_s)

    def on_epoch_end(self, args, state, control, **kwargs):
        run = self._run
        if run is None or run.epoch_started_s is None:
            return
        now = perf_counter()
        epoch_number = max(1, math.ceil((state.epoch or 0) - 1e-9))
        run.logger.mark(state.global_step, state.epoch)
        run.logger.log_model_performance(f"epoch_{epoch_number}", now - run.epoch_started_s, memory_usage=rss_mb(),
                                         additional_metrics={"global_step": state.global_step,
                                                             "epoch": state.epoch})
        run.timer.mark(perf_counter())

    def on_save(self, args, state, control, **kwargs):
        run = self._run
        if run is None:
            return
        checkpoint = f"{args.output_dir}/checkpoint-{state.global_step}"
        run.logger.log_message(f"Checkpoint saved: {checkpoint}")
        run.logger.log_metrics("checkpoint", {"path": checkpoint})
        run.timer.mark(perf_counter())

    # ------------------------------------------------------------------ helpers

    def _write_log(self, tlog: TrainLogger, run: _Run | None, state, logs: Mapping[str, Any]) -> None:
        tlog.mark(state.global_step, state.epoch)
        epoch = logs.get("epoch", state.epoch)
        if "loss" in logs:
            timing = run.timer.drain(run.samples_per_step) if run is not None else {}
            collate = COLLATE_STATS.drain()
            metrics = {key: value for key, value in logs.items() if key not in ("loss", "learning_rate", "epoch")}
            tlog._progress(epoch, state.global_step, logs["loss"], logs.get("learning_rate"), None, metrics,
                           timing={**timing, **collate})
            if run is not None:
                self._write_interval(run, state.global_step, timing, collate)
            return
        prefix = _speed_prefix(logs)
        if prefix == "train":
            tlog.log_model_performance("training", logs.get("train_runtime"), memory_usage=rss_mb(),
                                       additional_metrics={k: v for k, v in logs.items()
                                                           if k not in ("train_runtime", "epoch")})
        elif prefix is not None:
            metrics = {key: value for key, value in logs.items()
                       if key.startswith(f"{prefix}_") and key != f"{prefix}_loss" and not key.endswith(_SPEED_SUFFIXES)}
            tlog.log_evaluation(state.global_step, epoch, logs.get(f"{prefix}_loss"), metrics, metric_prefix=prefix,
                                values=logs)
        else:
            tlog.log_message(f"Logged: {_format.fmt_pairs(logs)}", category="training_detailed")
            tlog.log_metrics("log", logs)

    def _write_interval(self, run: _Run, global_step: int, timing: Mapping[str, Any],
                        collate: Mapping[str, Any]) -> None:
        tlog, first = run.logger, run.interval_first_step
        run.interval_first_step = global_step + 1
        if timing:
            tlog.log_message(
                f"Steps {first}-{global_step}: step time {timing['step_time_s']:.4f}s, "
                f"data wait {timing['data_wait_s']:.4f}s ({timing['data_wait_pct']:.2f}%), "
                f"{timing['samples_per_second']:.2f} samples/s", category="training_detailed")
            tlog._write("data", "INFO", _format.data_loading_lines(
                "dataloader", run.train_examples if run.train_examples is not None else "n/a",
                run.per_device_batch_size, timing["data_wait_s"] * timing["steps"]))
        if collate:
            tlog.log_message(
                f"Collate: batches={collate['collate_calls']}, total {collate['collate_time_s']:.4f}s, "
                f"mean {collate['collate_mean_ms']:.3f} ms, max {collate['collate_max_ms']:.3f} ms",
                category="data")

    def _write_speed(self, operation: str, state, metrics: Mapping[str, Any]) -> None:
        prefix = _speed_prefix(metrics)
        with self._outside_run(state) if self._run is None else contextlib.nullcontext(self._run.logger) as tlog:
            if tlog is None:
                return
            tlog.mark(state.global_step, state.epoch)
            runtime = metrics.get(f"{prefix}_runtime") if prefix else None
            additional = {key: value for key, value in metrics.items() if key != f"{prefix}_runtime"}
            tlog.log_model_performance(operation, runtime, memory_usage=rss_mb(),
                                       additional_metrics={**additional, "global_step": state.global_step})
        if self._run is not None:
            self._run.timer.mark(perf_counter())

    def _elected(self, trainer) -> bool:
        """Of several TrainLogCallbacks on one Trainer, only one writes: explicit config first."""
        if trainer is None:
            return True
        peers = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TrainLogCallback)]
        if len(peers) <= 1:
            return True
        winner = next((cb for cb in peers if cb.config is not None), peers[0])
        return winner is self

    def _open_logger(self) -> tuple[TrainLogger, bool]:
        """Join the innermost open TrainLogger (if this callback has no config of its own, or the
        same one), else open a run of our own."""
        active = innermost_open_logger()
        if active is not None and (self.config is None or self.config == active.config):
            return active, False
        return TrainLogger(self.config or LogConfig.from_env()), True

    @contextlib.contextmanager
    def _outside_run(self, state) -> Iterator[TrainLogger | None]:
        """A logger for events outside train(): an open TrainLogger, else the last run's files."""
        if not writes_shared_files(state) or not self._elected(find_trainer()):
            yield None
            return
        active = innermost_open_logger()
        if active is not None and (self.config is None or self.config == active.config):
            yield active
            return
        if self._last_run is not None:
            tlog = TrainLogger(self._last_run[0], run_id=self._last_run[1])
        else:
            tlog = TrainLogger(self.config or LogConfig.from_env())
            self._last_run = (tlog.config, tlog.run_id)
        try:
            yield tlog
        finally:
            tlog.close()


def _speed_prefix(metrics: Mapping[str, Any]) -> str | None:
    """``eval`` for ``eval_runtime``, ``test`` for ``test_runtime``...; None without a runtime key."""
    for key in metrics:
        if key.endswith("_runtime"):
            return key[: -len("_runtime")]
    return None


def _dataset_size(dataloader) -> int | None:
    try:
        return len(dataloader.dataset)
    except (AttributeError, TypeError, NotImplementedError):
        return None


def _hyperparameters(args, state, model, train_dataloader, eval_dataloader) -> dict[str, Any]:
    """TrainingArguments (``to_dict`` blanks ``*_token`` fields), model facts, dataset sizes, run shape."""
    try:
        training_args = args.to_dict()
    except Exception:  # a broken field must not stop training; fall back to the raw values
        training_args = {key: value for key, value in vars(args).items() if not key.startswith("_")}
    values: dict[str, Any] = {"training_args": training_args}
    if model is not None:
        parameters = list(model.parameters())
        values["model"] = {
            "class": type(model).__name__,
            "parameters": sum(p.numel() for p in parameters),
            "trainable_parameters": sum(p.numel() for p in parameters if p.requires_grad),
        }
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            try:
                values["model"]["config"] = config.to_dict()
            except Exception:
                values["model"]["config"] = str(config)
    values["data"] = {"train_examples": _dataset_size(train_dataloader),
                      "eval_examples": _dataset_size(eval_dataloader)}
    values["run"] = {
        "world_size": args.world_size,
        "max_steps": state.max_steps,
        "num_train_epochs": state.num_train_epochs,
        "train_batch_size": state.train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "start_global_step": state.global_step,
        "trial_name": state.trial_name,
        "trial_params": state.trial_params,
    }
    return values
