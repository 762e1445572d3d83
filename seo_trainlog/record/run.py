"""A run's state and its per-step accounting: the numbers of Trainer events turned into records.

The callback (:mod:`.callback`) owns the run's lifecycle and hands each event's numbers here; the
functions here turn them into :class:`~seo_trainlog.TrainLogger` records (interval timing, tokens and
MFU, resources, the ranks' exchange and stragglers, anomalies), which the logger's sinks write.
Nothing here imports the callback.
"""
from __future__ import annotations

import functools
import math
import os
import threading
import time as _time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import orjson

from . import format as _format
from .guard import TrainerGuard, find_trainer
from .logger import TrainLogger
from .rank import TelemetryExchange
from .signals import SigtermHook
from ..read.analysis import SPEED_SUFFIXES
from ..watch import prometheus as _prometheus
from ..watch.alerts import AlertDispatcher
from ..watch.anomaly import Anomaly, AnomalyDetector, StragglerDetector, rank_sample
from ..watch.collator import TimedDataCollator
from ..watch.monitor import ResourceSampler, cuda_memory, rss_mb
from ..watch.timing import CollateSums, IntervalSums, StepTimer, step_times
from ..watch.tokens import TokenMeter

_WORKER_SETTLE_S = 0.05
_NOT_TRAINING_PREFIXES = ("eval_", "test_", "predict_", "val_", "validation_")


@dataclass
class Run:
    """One ``train()``'s state, from train begin to its summary: the Trainer's ``state``/``args``,
    the interval sums (step timer, collate and token counts), the watchers (sampler, detectors,
    alerts, exporter, rank exchange) and the lifecycle hooks (guard, SIGTERM)."""

    logger: TrainLogger
    owns_logger: bool
    state: Any
    args: Any
    samples_per_step: int
    train_examples: int | None
    per_device_batch_size: int
    per_step_detail: bool
    collate: CollateSums  # the callback's collate timings, this run's from train begin on
    started_s: float = field(default_factory=perf_counter)
    timer: StepTimer = field(default_factory=StepTimer)
    interval_first_step: int = 1
    detail_next_step: int = 1  # global_step of the next step whose per-step DEBUG line is taken
    pending: IntervalSums = field(default_factory=IntervalSums)
    detail_written_s: float = field(default_factory=perf_counter)
    epoch_started_s: float | None = None
    guard: TrainerGuard | None = None
    sigterm: SigtermHook | None = None
    sampler: ResourceSampler | None = None
    collator: TimedDataCollator | None = None
    detector: AnomalyDetector | None = None
    alerts: AlertDispatcher | None = None
    exchange: TelemetryExchange | None = None  # the ranks' interval numbers, through the launcher's store
    straggler: StragglerDetector | None = None  # global rank 0 only
    compared_through: int = -1  # the last global_step the straggler detector compared
    exporter: _prometheus.PrometheusExporter | None = None
    retrying: bool = False
    pid: int = field(default_factory=os.getpid)
    thread: int = field(default_factory=threading.get_ident)  # where its Trainer trains
    meter: TokenMeter = field(default_factory=TokenMeter)  # tokens seen, tokens/s, MFU
    others: dict[int, dict[int, dict[str, Any]]] = field(default_factory=dict)  # other ranks' samples (rank 0)
    token_step: int | None = None  # the last logging step with this rank's token counts


def write_log(tlog: TrainLogger, run: Run | None, global_step: int, state_epoch: float | None,
              logs: Mapping[Any, Any], timing: Mapping[str, Any], collate: Mapping[str, Any],
              resources: Mapping[str, Any] | None = None, tokens: Mapping[str, int] | None = None,
              step_times: list[tuple[int, float, float]] | Callable[[], list] | None = None) -> None:
    """One ``on_log`` event: ``timing`` and ``collate`` are the interval's sums, drained at the
    event; ``resources`` the sampler's aggregate taken at the event (None: take it now); ``tokens``
    this rank's token counts of the interval (:meth:`TokenMeter.take`); ``step_times`` the
    per-step DEBUG lines of its steps, or what makes them (:func:`take_step_times`; written in the
    same record). Run as a deferred job (in the
    recorder thread), its records carry the event's time (``TrainLogger.defer``)."""
    tlog.mark(global_step, state_epoch)
    values = _format.metric_values(logs)
    for key, value in values.items():
        if _format.is_non_finite_float(value):
            tlog._warn(f"Non-finite value: {key}={value} at global_step {global_step}", key=key, value=value)
    epoch = values.get("epoch", state_epoch)
    loss_key = training_loss_key(values)
    if loss_key is not None:
        if resources is None:
            resources = {**run.sampler.drain(), **cuda_memory()} if run is not None and run.sampler else {}
        metrics = {key: value for key, value in values.items() if key not in (loss_key, "learning_rate", "epoch")}
        if loss_key != "loss":
            metrics["loss_name"] = loss_key  # e.g. SetFit's embedding_loss: the JSON keeps "loss"
        counts = _token_fields(run, tlog, global_step, values, timing, tokens) if run is not None else {}
        if not tlog.writes:  # a rank without a file set: its own numbers in its per-rank metrics file
            tlog.log_metrics("rank_step", {**timing, **collate, **resources, **counts})
        line = tlog._progress(epoch, global_step, values[loss_key], values.get("learning_rate"), None,
                              metrics, timing={**timing, **collate, **resources, **counts},
                              step_times=step_times() if callable(step_times) else step_times)
        if run is not None:
            run.pending.add(run.interval_first_step, global_step, timing, collate)
            run.interval_first_step = global_step + 1
            now = perf_counter()
            if now - run.detail_written_s >= tlog.config.detail_interval_s:
                run.detail_written_s = now
                write_interval(run, *run.pending.take(), resources)
            _detect_anomalies(run, "train", line)
        return
    prefix = speed_prefix(values)
    if prefix == "train":
        tlog.log_model_performance("training", values.get("train_runtime"), memory_usage=rss_mb(),
                                   additional_metrics={k: v for k, v in values.items()
                                                       if k not in ("train_runtime", "epoch")})
    elif prefix is not None:
        metrics = _prefixed_metrics(values, prefix)
        # collations since the last training log belong to this evaluation
        line = tlog.log_evaluation(global_step, epoch, values.get(f"{prefix}_loss"), metrics,
                                   metric_prefix=prefix, values={**values, **collate})
        if run is not None:
            _detect_anomalies(run, "eval", line)
    else:
        values.pop("epoch", None)  # every JSON line has its epoch already
        tlog.log_message(f"Logged: {_format.fmt_pairs(values)}", category="training_detailed")
        tlog.log_metrics("log", values)


def exchange_interval(run: Run, global_step: int, values: Mapping[str, Any],
                      tokens: Mapping[str, int] | None = None) -> None:
    """Publish this rank's interval numbers (with its token counts); on global rank 0, compare the
    ranks at every logging step all of them have published (in order, each once) and report the
    stragglers."""
    sample = rank_sample(values)
    if sample is None:
        return
    run.exchange.post(global_step, {**sample, **tokens} if tokens else sample)
    if run.straggler is None:
        return
    others = run.others = run.exchange.collect()
    if len(others) < run.logger.role.world_size - 1:
        return
    found: list[Anomaly] = []
    for step, own in run.exchange.recent:
        if step <= run.compared_through or not all(step in series for series in others.values()):
            continue
        run.compared_through = step
        found += run.straggler.update(step, {0: own, **{rank: series[step] for rank, series in others.items()}},
                                      run.exchange.identities)
    if found:
        run.logger.defer("straggler", functools.partial(_report_anomalies, run, found))


def take_tokens(run: Run, timing: Mapping[str, Any]) -> dict[str, int] | None:
    """This rank's token counts of the batches the interval's steps trained on (see
    :meth:`TokenMeter.take`); None without a counting :class:`TimedDataCollator`. With DataLoader
    workers whose counts are still on their way, waits briefly for them (else they are owed to the
    next logging step). The first interval with a batch that had nothing to count says so once."""
    if run.collator is None:
        return None
    meter, stats = run.meter, run.collate.train
    if run.args.dataloader_num_workers > 0 and stats.pending_batches() < meter.wanted(timing["steps"]):
        drain_workers(run, settle=True)
    if stats.untokenised and not meter.untokenised_noted:
        meter.untokenised_noted = True
        run.logger.defer("tokens", functools.partial(
            run.logger.log_message, "TimedDataCollator: a batch had no 2-D array (tensor or NumPy) under a "
            "key ending in attention_mask and none under a key ending in input_ids (it was not a mapping, or "
            "held lists or only inputs_embeds), so its tokens are not counted (num_input_tokens_seen, "
            "tokens_per_second and mfu_pct come only from batches that have them)", category="data"))
    tokens = meter.take(stats, timing["steps"])
    if tokens is not None:
        run.token_step = run.state.global_step
    return tokens


def _token_fields(run: Run, tlog: TrainLogger, global_step: int, values: Mapping[str, Any],
                 timing: Mapping[str, Any], tokens: Mapping[str, int] | None) -> dict[str, Any]:
    """``num_input_tokens_seen``, ``tokens_per_second``, ``mfu_pct`` of a train record; in a
    distributed run also this rank's ``rank_input_tokens`` and ``rank_num_input_tokens_seen``.
    Global rank 0 sums the ranks' counts of this step from the telemetry exchange, when every rank
    has published it; else the record has no all-rank count of ours."""
    world = tlog.role.world_size
    others = _others_at(run, global_step) if world > 1 and tokens is not None \
        and tlog.role.is_world_process_zero else None
    fields = run.meter.fields(values, timing.get("interval_s"), tokens, others, world)
    if tokens is not None and world > 1:
        fields["rank_input_tokens"] = tokens["tokens"]
        fields["rank_num_input_tokens_seen"] = tokens["tokens_seen"]
    return fields


def _others_at(run: Run, step: int) -> list[dict[str, Any]] | None:
    """The other ranks' token counts at ``step`` (from the exchange; collected again when some
    are missing), or None while any rank has not published that step."""
    exchange = run.exchange
    if exchange is None:
        return None
    world = run.logger.role.world_size

    def complete():
        series = run.others
        if len(series) < world - 1 or not all("tokens" in s.get(step, ()) for s in series.values()):
            return None
        return [series[rank][step] for rank in sorted(series)]

    found = complete()
    if found is None and exchange.enabled:
        run.others = exchange.collect()
        found = complete()
    return found


def tokens_at_end(run: Run) -> int | None:
    """For the summary: the Trainer's ``num_input_tokens_seen`` when it counts, else (one process)
    ours, with the batches of the steps after the last logging step."""
    state = run.state
    if trainer_counts(run.args):
        return state.num_input_tokens_seen
    if run.collator is None or run.logger.role.world_size > 1:
        return None
    if run.args.dataloader_num_workers > 0:
        drain_workers(run, settle=True)
    tokens = run.meter.take(run.collate.train, run.timer.steps)
    return tokens["tokens_seen"] if tokens is not None else None


def take_step_times(run: Run) -> Callable[[], list[tuple[int, float, float]]] | None:
    """The per-step DEBUG lines of the steps ended since the last call, as a callable that makes
    their ``(global_step, step_time_s, time.time() at the step's end)`` (in the recorder thread:
    the training thread only takes the marks); None without per-step detail or new steps.
    Each ended step is the next optimizer step (the Trainer adds one to ``global_step`` before
    every ``on_step_end``): they are numbered on from ``run.detail_next_step``, not back from the
    Trainer's ``global_step`` now (that counts a step whose end is not ours yet when another
    callback logs, or raises, in its ``on_step_end`` before ours)."""
    timer = run.timer
    if timer.ended is None:
        return None
    marks = timer.take_ended()
    if not marks:
        return None
    last = run.detail_next_step + len(marks) // 2 - 1
    run.detail_next_step = last + 1
    return functools.partial(step_times, marks, last, _time.time(), _time.perf_counter())


def await_rank_tokens(run: Run, wait_s: float = 2.0) -> None:
    """At the end of a distributed run, global rank 0 waits (at most ``wait_s``) for every rank's
    counts of the last logging step, so that its last record has the all-rank count."""
    step = run.token_step
    if step is None or run.exchange is None or not run.logger.role.is_world_process_zero \
            or run.logger.role.world_size < 2:
        return
    deadline = _time.monotonic() + wait_s
    while run.exchange.enabled and _others_at(run, step) is None and _time.monotonic() < deadline:
        _time.sleep(0.02)


def _report_anomalies(run: Run, anomalies: list[Anomaly]) -> None:
    """Write each anomaly once (a WARNING in the error logs, a JSON ``anomaly`` event) and hand it
    to the alert hooks."""
    for anomaly in anomalies:
        if anomaly.kind != "non_finite":  # already a WARNING per non-finite value
            run.logger._write("errors", "WARNING", [f"Anomaly: {anomaly.message}"])
        # at the step it is about (a straggler is found at a later logging step than it was compared at)
        run.logger.log_metrics("anomaly", anomaly.to_dict(), global_step=anomaly.global_step)
        if run.exporter is not None:
            run.exporter.count_anomaly(anomaly.kind)
        if run.alerts is not None:
            run.alerts.send(anomaly.to_dict())


def _detect_anomalies(run: Run, event: str, line: str | None) -> None:
    """Feed the record just written, read back exactly as ``seo-trainlog`` reads it, to the
    detector; write each anomaly once and hand it to the alert hooks."""
    if run.detector is None or line is None:
        return
    record = orjson.loads(line)
    _report_anomalies(run, run.detector.update(event, record, record.get("global_step")))


def write_interval(run: Run, first: int, global_step: int, timing: Mapping[str, Any],
                   collate: Mapping[str, Any], resources: Mapping[str, Any]) -> None:
    """The text detail of the logging intervals from step ``first`` to ``global_step``."""
    tlog = run.logger
    if timing:
        tlog.log_message(
            f"Steps {first}-{global_step}: step time {timing['step_time_s']:.4f}s, "
            f"data wait {timing['data_wait_s']:.4f}s ({timing['data_wait_pct']:.2f}%), "
            f"{timing['samples_per_second']:.2f} samples/s", category="training_detailed")
        data_lines = _format.data_loading_lines(
            "dataloader", run.train_examples if run.train_examples is not None else "n/a",
            run.per_device_batch_size, timing["data_wait_s"] * timing["steps"])
        if timing["data_wait_pct"] > tlog.config.data_wait_warn_pct:
            tlog._warn(
                f"Data loading bottleneck: {timing['data_wait_pct']:.1f}% of the time of steps {first}-"
                f"{global_step} was spent waiting for data (threshold {tlog.config.data_wait_warn_pct:g}%). "
                f"Try {_more_workers(run.args.dataloader_num_workers)}, "
                "dataloader_pin_memory=True on GPU, or tokenising and preparing the data ahead of time "
                "(datasets.map) instead of in the collator.",
                data_wait_pct=timing["data_wait_pct"], first_step=first, last_step=global_step)
        _write_resources(run, first, global_step, timing, resources)
    else:
        data_lines = []
    if collate:
        data_lines.append(f"Collate: batches={collate['collate_calls']}, total {collate['collate_time_s']:.4f}s, "
                          f"mean {collate['collate_mean_ms']:.3f} ms, max {collate['collate_max_ms']:.3f} ms")
    if data_lines:
        tlog._write("data", "INFO", data_lines)


def drain_workers(run: Run | None, settle: bool = False) -> None:
    """Take the timings DataLoader workers sent; ``settle``: wait briefly for those still on their
    way (at an evaluation record and at the end of a run, where every batch must be counted)."""
    collator = run.collator if run is not None else None  # (a run's is known from train begin)
    if run is None:
        trainer = find_trainer()
        candidate = getattr(trainer, "data_collator", None)
        collator = candidate if isinstance(candidate, TimedDataCollator) else None
    if collator is not None:
        collator.drain_worker_timings(settle_s=_WORKER_SETTLE_S if settle else 0.0)


def write_remaining_collate(run: Run) -> None:
    """Collations after the last logging step (the last batches, DataLoader workers' final sums)."""
    drain_workers(run, settle=True)
    collate = run.collate.train.drain()
    if collate:
        run.logger.log_message(
            f"Collate after the last logging step: batches={collate['collate_calls']}, total "
            f"{collate['collate_time_s']:.4f}s, max {collate['collate_max_ms']:.3f} ms", category="data")
        run.logger.log_metrics("data", {"operation": "collate", **collate})


def _write_resources(run: Run, first: int, last: int, timing: Mapping[str, Any],
                     resources: Mapping[str, Any]) -> None:
    """The interval in the spec's model-performance lines: wall time, peak RSS, mean GPU
    utilisation, then the mean of every other reading."""
    gpu_util = _gpu_utilisations(resources)
    additional = {key: value for key, value in resources.items() if not key.endswith(("_min", "_max"))}
    additional.update(data_wait_pct=timing["data_wait_pct"], samples_per_second=timing["samples_per_second"])
    run.logger._write("model", "INFO", _format.performance_lines(
        f"steps_{first}-{last}", timing["interval_s"], resources.get("rss_mb_max"),
        sum(gpu_util) / len(gpu_util) if gpu_util else None, additional))


def write_speed(tlog: TrainLogger, operation: str, global_step: int, epoch: float | None,
                metrics: Mapping[Any, Any]) -> None:
    values = _format.metric_values(metrics)
    prefix = speed_prefix(values)
    tlog.mark(global_step, epoch)
    runtime = values.get(f"{prefix}_runtime") if prefix else None
    additional = {key: value for key, value in values.items() if key != f"{prefix}_runtime"}
    tlog.log_model_performance(operation, runtime, memory_usage=rss_mb(),
                               additional_metrics={**additional, "global_step": global_step})
    if operation == "prediction" and prefix is not None:  # predict() logs nothing through on_log
        tlog.log_evaluation(global_step, epoch, values.get(f"{prefix}_loss"), _prefixed_metrics(values, prefix),
                            metric_prefix=prefix, values=values)


def write_epoch(tlog: TrainLogger, number: int, duration_s: float, global_step: int, epoch: float,
                memory_mb: float | Callable[[], float] | None) -> None:
    """``epoch_N completed in ...``; an epoch cut short (``max_steps`` reached, training stopped)
    is ``epoch_N_partial`` with the share of the epoch done (``epoch_fraction``, 0-1).
    ``memory_mb``: MiB, or a callable read now (the callback passes ``rss_mb``: read as the record
    is written, in the recorder thread, at most ``flush_interval_s`` after the epoch's end)."""
    if callable(memory_mb):
        memory_mb = memory_mb()
    tlog.mark(global_step, epoch)
    fraction = (epoch or 0) - math.floor(epoch or 0)
    partial = 1e-6 < fraction < 1 - 1e-6
    extra = {"epoch_fraction": round(fraction, 6)} if partial else {}
    tlog.log_model_performance(f"epoch_{number}_partial" if partial else f"epoch_{number}", duration_s,
                               memory_usage=memory_mb,
                               additional_metrics={"global_step": global_step, "epoch": epoch, **extra})


def write_checkpoint(tlog: TrainLogger, checkpoint: str, global_step: int | None = None,
                     epoch: float | None = None) -> None:
    """``Checkpoint saved: <path>`` and a JSON ``checkpoint`` event, at the save's ``global_step`` and
    ``epoch`` when given (else the latest known)."""
    if global_step is not None:
        tlog.mark(global_step, epoch)
    tlog.log_message(f"Checkpoint saved: {checkpoint}")
    tlog.log_metrics("checkpoint", {"path": checkpoint})


def _more_workers(workers: int) -> str:
    return "dataloader_num_workers > 0 (now 0)" if not workers else \
        f"more dataloader_num_workers (now {workers})"


def _gpu_utilisations(readings: Mapping[str, Any]) -> list[float]:
    """The mean ``gpu{i}_util_pct`` of each device among the readings."""
    return [value for key, value in readings.items()
            if key.startswith("gpu") and key.endswith("_util_pct") and "_mem_" not in key]


def run_resources(run: Run) -> dict[str, Any]:
    """For the summary: peak RSS (MiB), mean GPU utilisation (percent, mean over devices and samples)
    and the share of step + wait time spent waiting for data (percent), over the whole run."""
    extra: dict[str, Any] = {}
    if run.sampler is not None:
        run.sampler.sample()
        totals = run.sampler.stats.totals()
        if "rss_mb_max" in totals:
            extra["peak_rss_mb"] = totals["rss_mb_max"]
        gpu_util = _gpu_utilisations(totals)
        if gpu_util:
            extra["mean_gpu_util_pct"] = sum(gpu_util) / len(gpu_util)
    wait = run.timer.total_data_wait_pct()
    if wait is not None:
        extra["data_wait_pct"] = wait
    return extra


def training_loss_key(logs: Mapping[Any, Any]) -> str | None:
    """The key of a training log's loss: ``loss``, else the first key ending in ``loss`` (SetFit's
    ``embedding_loss``, a multi-loss trainer's ``lm_loss`` beside ``aux_loss``) in a log that is not an
    evaluation's or the end of training's; None for any other log. The other ``*loss`` keys stay
    metrics of the train record."""
    if "loss" in logs:
        return "loss"
    if speed_prefix(logs) is not None:
        return None
    return next((key for key in logs if isinstance(key, str) and key.endswith("loss")
                 and not key.startswith(_NOT_TRAINING_PREFIXES)), None)


def trainer_counts(args) -> bool:
    """The Trainer counts ``num_input_tokens_seen`` itself (``include_num_input_tokens_seen``)."""
    return getattr(args, "include_num_input_tokens_seen", "no") not in ("no", False, None)


def _prefixed_metrics(values: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """An evaluation's metrics: its ``<prefix>_*`` values but the loss and Trainer's own timings
    (``<prefix>_runtime``...; a metric of the user's named ``<prefix>_decode_runtime`` stays)."""
    skipped = {f"{prefix}_loss", *(f"{prefix}{suffix}" for suffix in SPEED_SUFFIXES)}
    return {key: value for key, value in values.items() if key.startswith(f"{prefix}_") and key not in skipped}


def speed_prefix(metrics: Mapping[str, Any]) -> str | None:
    """``eval`` for ``eval_runtime``, ``test`` for ``test_runtime``...: the prefix of the speed metrics
    Trainer adds (``<p>_runtime`` with ``<p>_samples_per_second``); None without them."""
    for key in metrics:
        if isinstance(key, str) and key.endswith("_runtime"):
            prefix = key[: -len("_runtime")]
            if f"{prefix}_samples_per_second" in metrics or f"{prefix}_steps_per_second" in metrics:
                return prefix
    return None
