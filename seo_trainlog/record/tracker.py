"""``Accelerator(log_with="seo_trainlog")``: the same files for a hand-written accelerate loop."""

from __future__ import annotations

import os
from collections.abc import Mapping
from time import perf_counter
from typing import Any

from accelerate.tracking import GeneralTracker, on_main_process, register_tracker_class

from . import format as _format
from .._config import LogConfig
from .logger import TrainLogger


class SeoTrainlogTracker(GeneralTracker):
    """An accelerate tracker writing seo_trainlog's categorised files (main process only).

    ``Accelerator(log_with="seo_trainlog", project_dir=DIR)`` writes to ``DIR`` (accelerate's
    ``logging_dir``); ``accelerator.init_trackers(name, config={...})`` logs the config as
    hyperparameters; ``accelerator.log(values, step=global_step)`` writes a training-progress record
    when ``values`` holds ``loss`` (``learning_rate``/``lr`` and ``epoch`` are used when present, the
    rest go to ``Metrics:``), an evaluation record when it holds ``eval_*``/``val_*`` keys, and a JSON
    ``log`` event otherwise; ``accelerator.end_training()`` writes the training summary and closes
    the files. Settings other than the directory come from :meth:`LogConfig.from_env`, or pass
    ``init_kwargs={"seo_trainlog": {"config": LogConfig(...)}}``.
    """

    name = "seo_trainlog"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, run_name: str, logging_dir: str | os.PathLike, config: LogConfig | None = None,
                 **kwargs: Any) -> None:
        super().__init__()
        self.run_name = run_name
        self._config = (config or LogConfig.from_env()).replace(log_dir=logging_dir)
        self._logger: TrainLogger | None = None
        self._losses: list[float] = []
        self._started_s = perf_counter()
        self._last_step: int | None = None
        self._last_epoch: Any = None

    @on_main_process
    def start(self) -> None:
        self._logger = TrainLogger(self._config)
        self._started_s = perf_counter()
        self._logger.log_message(f"accelerate run {self.run_name!r} started")

    @property
    def tracker(self) -> TrainLogger | None:
        """The run's :class:`~seo_trainlog.TrainLogger` (None before ``start``, off the main process)."""
        return self._logger

    @on_main_process
    def store_init_configuration(self, values: dict) -> None:
        if self._logger is not None:
            self._logger.log_hyperparameters(values)

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        tlog = self._logger
        if tlog is None:
            return
        values = _format.metric_values(values)
        epoch = values.get("epoch", self._last_epoch)
        self._last_step, self._last_epoch = step if step is not None else self._last_step, epoch
        tlog.mark(step, epoch)
        if "loss" in values:
            loss = values["loss"]
            if _format.is_finite_number(loss):
                self._losses.append(_format.to_number(loss))
            learning_rate = values.get("learning_rate", values.get("lr"))
            metrics = {key: value for key, value in values.items()
                       if key not in ("loss", "learning_rate", "lr", "epoch")}
            tlog.log_training_progress(epoch, step, loss, learning_rate, metrics=metrics)
            return
        evaluation = _evaluation_prefix(values)
        if evaluation is not None:
            metrics = {key: value for key, value in values.items()
                       if key.startswith(f"{evaluation}_") and key != f"{evaluation}_loss"}
            tlog.log_evaluation(step, epoch, values.get(f"{evaluation}_loss"), metrics,
                                metric_prefix="eval" if evaluation in ("eval", "val") else evaluation,
                                values=values)
            return
        tlog.log_message(f"Logged: {_format.fmt_pairs(values)}", category="training_detailed")
        tlog.log_metrics("log", values)

    @on_main_process
    def finish(self) -> None:
        tlog, self._logger = self._logger, None
        if tlog is None:
            return
        tlog.log_training_summary(
            total_epochs=self._last_epoch or 0, total_steps=self._last_step or 0,
            final_loss=self._losses[-1] if self._losses else None,
            best_loss=min(self._losses) if self._losses else None,
            training_duration=perf_counter() - self._started_s)
        tlog.close()


def _evaluation_prefix(values: Mapping[str, Any]) -> str | None:
    for prefix in ("eval", "val", "validation", "test"):
        if any(key.startswith(f"{prefix}_") for key in values):
            return prefix
    return None


def register_accelerate_tracker() -> None:
    """Make ``Accelerator(log_with="seo_trainlog")`` known to accelerate (idempotent)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    if LOGGER_TYPE_TO_CLASS.get(SeoTrainlogTracker.name) is not SeoTrainlogTracker:
        register_tracker_class(SeoTrainlogTracker)
