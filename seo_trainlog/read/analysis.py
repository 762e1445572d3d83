"""One run's records, aggregated into what ``seo-trainlog`` shows: the summary, bounded series for the
plots, the hyperparameters, errors and anomalies. Fed one record at a time; memory stays bounded."""

from __future__ import annotations

import itertools
import math
import operator
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

from ..watch.anomaly import AnomalyDetector, StragglerDetector, eval_prefix, pace_times, rank_sample, settings_of
from .._config import LogConfig
from .._directions import Directions, better, check_overrides, directions
from .metric_stats import MetricStats, is_train_metric

MAX_POINTS = 2000  # per plotted series (a run with more train records keeps every k-th)
MAX_KEPT = 50  # errors and warnings kept for the report (all are counted)
MAX_ANOMALIES = 200  # anomalies kept (all are counted)
MAX_SEGMENTS = 1000  # segments (resumed parts of a run) kept
MAX_KEYS = 4096  # distinct keys of train records classified at once (see RunAnalysis._plan_train_keys)
TOKEN_COLUMNS = ("tokens_per_second", "mfu_pct", "num_input_tokens_seen")
TRAIN_COLUMNS = ("loss", "learning_rate", "grad_norm", "samples_per_second", "rss_mb", "gpu_util_pct",
                 "gpu_mem_used_mb")
SPEED_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second", "_model_preparation_time")  # timings
_TRAIN_VALUES = operator.itemgetter("global_step", "epoch", "world_size", "time", "loss", "interval_s",
                                    "samples_per_second", "steps", "data_wait_pct")
_PEAK_KEY = re.compile(r"rss_mb_max$|gpu\d+_mem_used_mb_max$|cuda\d+_max_allocated_mb$")  # psutil, NVML, torch.cuda
NO_SUMMARY = "no_summary"
NO_TRAINING = "no_training"  # the writer's ``status`` event for a run that only evaluated


class Series:
    """Rows ``(global_step, *columns)`` built from a stream of records, at most ``2 * max_points``:
    every ``stride``-th record offered is kept, and when the rows fill up every other one is dropped
    and the stride doubles (so a run of any length is covered evenly). The last record offered is
    always included. ``build(record)`` makes a row; it is called only for the records kept."""

    def __init__(self, columns: tuple[str, ...], build: Callable[[dict[str, Any]], tuple[Any, ...]],
                 max_points: int = MAX_POINTS) -> None:
        self.columns = columns
        self.max_points = max_points
        self.stride = 1
        self._build = build
        self._kept = 0  # index (among the records offered) of the next record kept
        self._skip = 0  # records to pass over before it (RunAnalysis reads it to skip the call)
        self._rows: list[tuple[Any, ...]] = []
        self._last: dict[str, Any] | None = None

    def offer(self, record: dict[str, Any]) -> None:
        if self._skip:
            self._skip -= 1
            self._last = record
        else:
            self.keep(record)

    def keep(self, record: dict[str, Any]) -> None:
        """Add the row of ``record``, which :meth:`offer` keeps (no record to skip is left)."""
        self._last = None
        self._rows.append(self._build(record))
        if len(self._rows) >= 2 * self.max_points:
            del self._rows[1::2]
            self.stride *= 2
        kept, following = self._kept, (self._kept // self.stride + 1) * self.stride
        self._skip, self._kept = following - kept - 1, following

    def rows(self) -> list[tuple[Any, ...]]:
        return self._rows + ([self._build(self._last)] if self._last is not None else [])

    def column(self, name: str) -> tuple[list[Any], list[Any]]:
        """``(global_steps, values)`` of one column, rows without a finite value left out."""
        index = self.columns.index(name) + 1
        pairs = [(row[0], row[index]) for row in self.rows() if _is_number(row[index]) and row[0] is not None]
        return [step for step, _ in pairs], [value for _, value in pairs]


class RunAnalysis:
    """What ``seo-trainlog`` reports about one run, built by :meth:`add`-ing its records in order.

    Sources: ``train`` records give the losses, throughput, data wait and resource readings;
    ``eval`` records the evaluation metrics; ``hyperparameters`` the hyperparameters (and
    ``run.max_steps``); ``summary`` the status, duration, early stopping and the run totals the
    callback measured; ``error`` records are counted as errors, ``warning`` records and
    ``anomaly`` records other than ``non_finite`` (which has its own ``warning`` record) as warnings;
    anomalies come from an :class:`AnomalyDetector` run over the records plus the ``anomaly``
    records already in the file (one found both ways counts once).

    A resumed run holds several segments: ``run_start`` then, for each later segment, a
    ``segment_start`` record, and a ``summary`` per segment (``segment``: its number).

    ``manifest`` (:func:`~seo_trainlog.read.reader.read_manifest`) gives the run's facts when retention
    deleted its oldest metrics files (the first record is not ``run_start`` while ``rotated``: the
    run's files were rotated, or a manifest exists): start, hyperparameters, ``max_steps``,
    segments, best and final loss, counts. Throughput and data wait then cover the remaining
    records only, and :meth:`summary` says which steps they cover (``records_cover``).
    """

    def __init__(self, run_id: str, config: LogConfig | None = None, max_points: int = MAX_POINTS, *,
                 manifest: Mapping[str, Any] | None = None, rotated: bool = False,
                 manifest_problem: str | None = None) -> None:
        self.run_id = run_id
        self.config = config or LogConfig()
        self.directions: Directions = directions(self.config.metric_directions)
        self.train_metrics = MetricStats(self.directions, max_points)  # train-side metrics beside the loss
        self.eval_metrics = MetricStats(self.directions, max_points)  # the ``eval`` prefix's, loss included
        self._metric_keys: list[str] = []  # train metrics that MetricStats follows (see _plan_train_keys)
        self._new_metric_keys: list[str] = []  # train metrics seen, not yet followed (no number so far)
        self.manifest = manifest if isinstance(manifest, Mapping) else None
        self.manifest_problem = manifest_problem  # why a manifest that exists was not used (or partly)
        self._rotated = rotated or self.manifest is not None
        self._head: bool | None = None  # the first record is run_start: no file was deleted
        self._resumed_here = False  # run_start "resumed": the run's earlier records are in another log_dir
        self._trainer_totals: dict[str, Any] = {}  # the model record of operation "training" (Trainer's)
        self._segments: dict[int, dict[str, Any]] = {}
        self._segment = 1
        self._train_steps: list[Any] = [None, None]  # global_step of the first and last train record
        self.detector: AnomalyDetector | None = AnomalyDetector(self.config)
        self.train = Series(("epoch",) + TRAIN_COLUMNS, self._train_row, max_points)
        self.evals = Series(("eval_loss",), _eval_row, max_points)
        self.tokens = Series(TOKEN_COLUMNS, _token_row, max_points)  # train records with tokens_per_second
        self._token_sums = [0.0, 0.0, 0.0, 0.0]  # tokens, seconds; MFU x seconds, seconds (records with MFU)
        self._token_last: dict[str, Any] = {}
        self._hyperparameters: dict[str, Any] | None = None
        self.errors: list[dict[str, Any]] = []
        self.warnings: list[str] = []
        self.anomalies: list[dict[str, Any]] = []
        self.records = 0
        self.final_values = None  # the last logged values (_compare.FinalValues), when a reader keeps them
        self._first_time: str | None = None
        self._last_time: str | None = None
        self._global_step: int = -1
        self._epoch: float = -math.inf
        self._summary: dict[str, Any] = {}
        self._status: str | None = None
        self._final_loss: float | None = None
        self._final_loss_step: Any = None
        self._best_loss: tuple[float, Any] | None = None
        self._best_eval: dict[str, tuple[float, Any]] = {}
        self._last_eval: dict[str, dict[str, Any]] = {}
        self._evaluations = 0
        self._interval_s = self._samples = self._steps = self._wait_s = 0.0
        self._peaks: dict[str, float] = {}
        self._gpu_util_sum = 0.0
        self._gpu_util_count = 0
        self._keys: set[str] = set()  # every key of the train records (up to MAX_KEYS), classified below
        self._gpu_util_keys: list[str] = []  # the ones of _keys that are GPU utilisations, in order seen
        self._gpu_memory_keys: list[str] = []
        self._peak_keys: list[str] = []
        self._new_peaks = False  # a key of _peak_keys has no peak yet
        self._counts = {"error": 0, "warning": 0, "anomaly": 0}
        self._recent: dict[str, OrderedDict[tuple[str, Any], None]] = {"found": OrderedDict(),
                                                                         "logged": OrderedDict()}
        self.ranks = RankAnalysis(self.config)  # fed the records of a distributed run (world_size > 1)

    def add_all(self, records: Iterable[dict[str, Any]]) -> RunAnalysis:
        """:meth:`add` each of ``records`` in order; returns ``self``."""
        rest = iter(records)
        record = next(rest, None)
        while record is not None:
            if record.get("event") == "train":
                record = self._add_train(record, rest)
            else:
                self.add(record)
                record = next(rest, None)
        return self

    def add(self, record: dict[str, Any]) -> None:
        event = record.get("event")
        if event == "train":
            self._add_train(record, iter(()))
            return
        self.records += 1
        step, epoch = record.get("global_step"), record.get("epoch")
        world_size = record.get("world_size")
        if type(world_size) is int and world_size > 1:
            self.ranks.add(record)
        if self._head is None:
            self._head = event == "run_start"
        if self._first_time is None:
            self._first_time = record.get("time")
        self._last_time = record.get("time", self._last_time)
        if type(step) is int and step > self._global_step:
            self._global_step = step
        if (type(epoch) is float or type(epoch) is int) and epoch > self._epoch:
            self._epoch = epoch
        if event == "eval":
            self._add_eval(record, step)
        elif event == "summary":
            self._summary = record
            self._status = record.get("status")
            segment = self._segment_entry(record.get("segment") if type(record.get("segment")) is int
                                          else self._segment)
            if segment is not None:
                duration = record.get("training_duration_s")
                segment.update(status=self._status, training_duration_s=duration if _is_number(duration) else None)
        elif event in ("run_start", "segment_start"):
            if isinstance(record.get("metric_directions"), Mapping):
                self._use_run_directions(record["metric_directions"])
            number = record.get("segment") if event == "segment_start" else 1
            self._segment = number if type(number) is int else self._segment + 1
            self._status = None  # the run goes on
            resumed = event == "run_start" and record.get("resumed") is True
            self._resumed_here = self._resumed_here or resumed
            segment = self._segment_entry(self._segment)
            if segment is not None:
                start = record.get("start_global_step", step) if event == "segment_start" or resumed else 0
                segment.update(started=record.get("time"), start_global_step=start)
        elif event == "status":
            self._status = record.get("status", self._status)
        elif event == "model" and record.get("operation") == "training":
            self._trainer_totals = {key: record.get(key) for key in
                                    ("train_loss", "train_samples_per_second", "train_steps_per_second")}
        elif event == "hyperparameters":
            self._hyperparameters = record.get("hyperparameters")
        elif event == "error":
            self._counts["error"] += 1
            if len(self.errors) < MAX_KEPT:
                self.errors.append(record)
        elif event == "warning":
            self._counts["warning"] += 1
            if len(self.warnings) < MAX_KEPT:
                source = record.get("source")
                self.warnings.append(f"[{source}] {record.get('message')}" if source else str(record.get("message")))
        elif event == "anomaly":
            if record.get("kind") != "non_finite":  # a non-finite value has its own warning record
                self._counts["warning"] += 1
                if len(self.warnings) < MAX_KEPT:
                    self.warnings.append(str(record.get("message")))
            self._note_anomaly("logged", record.get("kind"), record.get("user_global_step", step), record)
        elif event == "detector" and _same_settings(record, self.config):
            # the run already fed every record to the same detector with these settings: its anomaly
            # records are what detection here would find, so they are used as they are
            self.detector = None

    def _use_run_directions(self, recorded: Mapping[str, Any]) -> None:
        """The run's own ``LogConfig.metric_directions`` (its ``run_start``/``segment_start`` record),
        under this reader's (``config.metric_directions``, e.g. from SEO_TRAINLOG_METRIC_DIRECTIONS),
        which win; over the table. Metrics already followed keep the direction they had. A bad record
        is left out, with a warning."""
        try:
            merged = {**check_overrides(recorded, "metric_directions of the run"),
                      **(self.config.metric_directions or {})}
        except ValueError as exc:
            if len(self.warnings) < MAX_KEPT:
                self.warnings.append(f"{exc}: not used")
            return
        self.directions = self.train_metrics.directions = self.eval_metrics.directions = directions(merged)

    def _segment_entry(self, number: int) -> dict[str, Any] | None:
        segment = self._segments.get(number)
        if segment is None and len(self._segments) < MAX_SEGMENTS:
            segment = self._segments[number] = {"segment": number, "started": None, "start_global_step": None,
                                                "status": None, "training_duration_s": None}
        return segment

    def _add_train(self, record: dict[str, Any], rest: Iterator[dict[str, Any]]) -> dict[str, Any] | None:
        """``record`` (a ``train`` record) and the ``train`` records that follow it in ``rest``: what
        :meth:`add` does for every record, then the train figures; returns the first record of
        ``rest`` that is not a ``train`` record (``None`` at the end). The path of nearly every record:
        the figures live in local variables while it runs, each value is read once, and a key is
        classified once (:meth:`_plan_train_keys`), not at every record."""
        count, head, first_time, last_time = self.records, self._head, self._first_time, self._last_time
        global_step, epoch_max, status = self._global_step, self._epoch, self._status
        first_step, last_step = self._train_steps
        detector, ranks, keys, peaks = self.detector, self.ranks, self._keys, self._peaks
        final_loss, final_loss_step, best_loss = self._final_loss, self._final_loss_step, self._best_loss
        interval_sum, samples, steps_sum, wait_s = self._interval_s, self._samples, self._steps, self._wait_s
        series = self.train
        skip = series._skip
        peak_keys, extras = self._peak_keys, self._has_extras()
        following: dict[str, Any] | None = None
        try:  # what was read is kept, whatever the records that follow raise
            for record in itertools.chain((record,), rest):
                if record.get("event") != "train":
                    following = record
                    break
                get = record.get
                count += 1
                try:  # the values every train record of the writer has, in one lookup
                    step, epoch, world_size, time, loss, interval, per_second, steps, wait_pct = _TRAIN_VALUES(record)
                    if first_time is None:
                        first_time = time
                    last_time = time
                except KeyError:
                    step, epoch, world_size, loss, interval = (get("global_step"), get("epoch"), get("world_size"),
                                                               get("loss"), get("interval_s"))
                    per_second, steps, wait_pct = get("samples_per_second"), get("steps"), get("data_wait_pct")
                    if first_time is None:
                        first_time = get("time")
                    last_time = get("time", last_time)
                if type(world_size) is int and world_size > 1:
                    ranks.add(record)
                if head is None:
                    head = False
                if type(step) is int:
                    if step > global_step:
                        global_step = step
                    if first_step is None:
                        first_step = step
                    last_step = step
                if (type(epoch) is float or type(epoch) is int) and epoch > epoch_max:
                    epoch_max = epoch
                if status == NO_TRAINING:  # evaluated first, now trains
                    status = None
                if detector is not None:
                    for anomaly in detector.update("train", record, step):
                        self._note_anomaly("found", anomaly.kind, step, anomaly.to_dict())
                if type(loss) is float or type(loss) is int:  # parsed JSON: a float is finite (NaN is null)
                    final_loss, final_loss_step = loss, step
                    if best_loss is None or loss < best_loss[0]:
                        best_loss = (loss, step)
                if type(interval) is float:
                    interval_sum += interval
                    samples += (per_second or 0.0) * interval
                    steps_sum += steps or 0
                    wait_s += (wait_pct or 0.0) * interval / 100
                known = len(keys)
                keys.update(record)  # no new key: one pass in C over the record's keys
                if len(keys) != known:
                    self._plan_train_keys(record)
                    keys, peak_keys, extras = self._keys, self._peak_keys, self._has_extras()
                if extras:
                    extras = self._add_extras(record, step, interval)
                else:
                    for key in peak_keys:
                        value = get(key)
                        if (type(value) is float or type(value) is int) and value > peaks[key]:
                            peaks[key] = value
                if skip:
                    skip -= 1
                    series._last = record
                else:
                    series.keep(record)
                    skip = series._skip
        finally:
            self.records, self._head, self._first_time, self._last_time = count, head, first_time, last_time
            self._global_step, self._epoch, self._status = global_step, epoch_max, status
            self._train_steps = [first_step, last_step]
            self._final_loss, self._final_loss_step, self._best_loss = final_loss, final_loss_step, best_loss
            self._interval_s, self._samples, self._steps, self._wait_s = interval_sum, samples, steps_sum, wait_s
            series._skip = skip
        return following

    def _has_extras(self) -> bool:
        """The train records read so far need :meth:`_add_extras`: they hold metrics, GPU readings or
        token counts, or a key of ``_peak_keys`` has no peak yet."""
        return bool(self._metric_keys or self._new_metric_keys or self._new_peaks or self._gpu_util_keys
                    or "tokens_per_second" in self._keys)

    def _add_extras(self, record: dict[str, Any], step: Any, interval: Any) -> bool:
        """The train metrics, peaks, GPU utilisation and token counts of ``record``; returns
        :meth:`_has_extras`."""
        get = record.get
        if self._metric_keys:
            add = self.train_metrics.add
            for key in self._metric_keys:
                add(key, get(key), step)
        if self._new_metric_keys:
            self._follow_metrics(record, step)
        if self._new_peaks:
            self._add_new_peaks(record)
        else:
            peaks = self._peaks
            for key in self._peak_keys:
                value = get(key)
                if (type(value) is float or type(value) is int) and value > peaks[key]:
                    peaks[key] = value
        if self._gpu_util_keys:
            utils = [value for value in map(get, self._gpu_util_keys) if _is_number(value)]
            if utils:
                self._gpu_util_sum += sum(utils) / len(utils)
                self._gpu_util_count += 1
        rate = get("tokens_per_second")
        if type(rate) is float or type(rate) is int:
            self._add_tokens(record, rate, interval)
        return self._has_extras()

    def _plan_train_keys(self, record: dict[str, Any]) -> None:
        """Classify the keys of ``record`` not seen before in a train record (``_keys``): GPU
        utilisations and memory, peaks (:data:`_PEAK_KEY`), train metrics (:func:`is_train_metric`).
        A key a record lacks reads as ``None`` and adds nothing. Past :data:`MAX_KEYS` keys (a file
        whose records each bring new ones) the lists start again from this record's keys."""
        if len(self._keys) > MAX_KEYS:
            self._keys = set(record)
            self._gpu_util_keys, self._gpu_memory_keys, self._peak_keys = [], [], []
            self._metric_keys, self._new_metric_keys = [], []
        planned = set(self._gpu_util_keys + self._gpu_memory_keys + self._peak_keys + self._metric_keys
                      + self._new_metric_keys)
        for key in record:
            if key in planned:
                continue
            if is_gpu_util_key(key):
                self._gpu_util_keys.append(key)
            if key.startswith("gpu") and key.endswith("_mem_used_mb"):
                self._gpu_memory_keys.append(key)
            if _PEAK_KEY.match(key):
                self._peak_keys.append(key)
                self._new_peaks = True
            if is_train_metric(key):
                (self._metric_keys if self.train_metrics.follows(key) else self._new_metric_keys).append(key)

    def _add_new_peaks(self, record: dict[str, Any]) -> None:
        """The peaks of a record while a key of ``_peak_keys`` has none yet, in the record's order (the
        order the peaks are listed in)."""
        peaks = self._peaks
        for key in [key for key in record if key in self._peak_keys]:
            value = record[key]
            if (type(value) is float or type(value) is int) and value > peaks.get(key, -math.inf):
                peaks[key] = value
        self._new_peaks = any(key not in peaks for key in self._peak_keys)

    def _follow_metrics(self, record: dict[str, Any], step: Any) -> None:
        """Add the values of the train metrics not followed yet (``_new_metric_keys``) in the order of
        ``record``'s keys, which is the order :class:`MetricStats` lists them in; those it now
        follows join ``_metric_keys``."""
        stats, get = self.train_metrics, record.get
        numbers = [key for key in self._new_metric_keys if _is_number(get(key))]
        if not numbers:
            return
        if len(numbers) > 1:
            position = {key: index for index, key in enumerate(record)}
            numbers.sort(key=position.__getitem__)
        for key in numbers:
            stats.add(key, record[key], step)
        followed = [key for key in numbers if stats.follows(key)]
        self._metric_keys += followed
        self._new_metric_keys = [key for key in self._new_metric_keys if key not in followed]

    def _add_tokens(self, record: dict[str, Any], rate: float, interval: Any) -> None:
        sums, mfu = self._token_sums, record.get("mfu_pct")
        if type(interval) is float and interval > 0:
            sums[0] += rate * interval
            sums[1] += interval
            if _is_number(mfu):
                sums[2] += mfu * interval
                sums[3] += interval
        self._token_last = {"tokens_per_second": rate, "mfu_pct": mfu if _is_number(mfu) else None,
                            "num_input_tokens_seen": record.get("num_input_tokens_seen"),
                            "tokens_counted_from_global_step": record.get("tokens_counted_from_global_step"),
                            "global_step": record.get("global_step")}
        self.tokens.offer(record)

    def token_summary(self) -> dict[str, Any] | None:
        """Over the train records with ``tokens_per_second`` (None when there is none):
        ``tokens_per_second`` (all tokens over all their intervals' time), ``last_tokens_per_second``,
        ``num_input_tokens_seen`` (the last record's), ``mfu_pct`` (time-weighted mean of the records
        with one; None when none has), ``last_mfu_pct`` and ``tokens_counted_from_global_step`` (the
        last record's: a resumed run whose count restarted at that step, None when counted from the start)."""
        if not self._token_last:
            return None
        tokens, seconds, mfu, mfu_seconds = self._token_sums
        last = self._token_last
        return {"tokens_per_second": tokens / seconds if seconds else last["tokens_per_second"],
                "last_tokens_per_second": last["tokens_per_second"],
                "num_input_tokens_seen": last["num_input_tokens_seen"],
                "mfu_pct": mfu / mfu_seconds if mfu_seconds else None, "last_mfu_pct": last["mfu_pct"],
                "last_global_step": last["global_step"],
                "tokens_counted_from_global_step": last["tokens_counted_from_global_step"]}

    def _train_row(self, record: dict[str, Any]) -> tuple[Any, ...]:
        """``global_step``, ``epoch``, then :data:`TRAIN_COLUMNS`: ``gpu_util_pct`` is the mean over the
        record's GPUs, ``gpu_mem_used_mb`` their sum (MiB, NVML). Built for kept rows only, and for the
        last one, whose keys are those of the latest train record (``_gpu_*_keys``)."""
        utils = [record[key] for key in self._gpu_util_keys if _is_number(record.get(key))]
        used = [record[key] for key in self._gpu_memory_keys if _is_number(record.get(key))]
        return (record.get("global_step"), record.get("epoch"), record.get("loss"), record.get("learning_rate"),
                record.get("grad_norm"), record.get("samples_per_second"), record.get("rss_mb"),
                sum(utils) / len(utils) if utils else None, sum(used) if used else None)

    def _add_eval(self, record: dict[str, Any], step: Any) -> None:
        if self.detector is not None:
            for anomaly in self.detector.update("eval", record, step):
                self._note_anomaly("found", anomaly.kind, step, anomaly.to_dict())
        prefix, metrics = eval_metrics(record)
        self._last_eval[prefix] = {"global_step": step, **metrics}
        if prefix != "eval":
            return
        self._evaluations += 1
        self.evals.offer(record)
        for key, value in metrics.items():
            if _is_number(value):
                self.eval_metrics.add(key, value, step, prefix)
                direction = self.directions.of(key, prefix)
                best = self._best_eval.get(key)
                if direction is not None and (best is None or better(direction, value, best[0])):
                    self._best_eval[key] = (value, step)

    def _note_anomaly(self, source: str, kind: Any, step: Any, details: Mapping[str, Any]) -> None:
        """Count an anomaly once, whether the detector found it here, the file holds it, or both
        (matched on kind and global_step among the recent ones of the other source)."""
        key = (kind, step)
        other = self._recent["logged" if source == "found" else "found"]
        if key in other:
            del other[key]
            return
        recent = self._recent[source]
        recent[key] = None
        if len(recent) > 256:
            recent.popitem(last=False)
        self._counts["anomaly"] += 1
        if len(self.anomalies) < MAX_ANOMALIES:
            self.anomalies.append({"kind": kind, "global_step": step, "message": details.get("message"),
                                   "value": details.get("value"), "threshold": details.get("threshold"),
                                   "source": "logged" if source == "logged" else "detected"})

    @property
    def hyperparameters(self) -> dict[str, Any] | None:
        """The ``hyperparameters`` record's nested values; the manifest's when that record was deleted."""
        if self._hyperparameters is None and self.head_deleted and self.manifest is not None \
                and isinstance(self.manifest.get("hyperparameters"), dict):
            return self.manifest["hyperparameters"]
        return self._hyperparameters

    @property
    def head_deleted(self) -> bool:
        """True when the run's oldest metrics files are gone (deleted by retention): its first record
        read is not ``run_start`` although its files were rotated or it has a manifest."""
        return self._rotated and self._head is False

    def segments(self) -> list[dict[str, Any]]:
        """The run's segments, oldest first: ``{"segment", "started" (ISO), "start_global_step",
        "status" (``no_summary`` until its summary), "training_duration_s"}``; from the records,
        completed by the manifest's where the records lack a value (their files deleted)."""
        merged: dict[int, dict[str, Any]] = {}
        listed = self.manifest.get("segments") if self.manifest else None
        for entry in listed if isinstance(listed, list) else ():
            if isinstance(entry, Mapping) and type(entry.get("segment")) is int and len(merged) < MAX_SEGMENTS:
                merged[entry["segment"]] = {key: entry.get(key) for key in _SEGMENT_KEYS}
        for number, entry in self._segments.items():
            known = merged.setdefault(number, dict.fromkeys(_SEGMENT_KEYS))
            known.update({key: value for key, value in entry.items() if value is not None})
        segments = [merged[number] for number in sorted(merged)]
        for segment in segments:
            if segment["status"] in (None, "running"):  # no summary yet, or never (killed)
                segment["status"] = (self._status if segment is segments[-1] else None) or NO_SUMMARY
        return segments

    def summary(self) -> dict[str, Any]:
        """The run in one JSON-ready dict (units in the key names; ``None`` where unknown):

        ``run_id``, ``status`` (the last segment's summary: ``completed``/``failed``/
        ``interrupted``/``terminated``/``abandoned``, or ``no_summary`` while a run is still writing
        or when it ended without one), ``started``/``last_record`` (ISO times), ``wall_time_s``
        (between them), ``training_duration_s`` (summed over the segments), ``segments`` (see
        :meth:`segments`), ``global_step``, ``max_steps``, ``epoch``, ``final_loss``, ``best_loss``
        with ``best_loss_step``, ``evaluations``, ``best_eval`` (``{metric: {"value",
        "global_step"}}``: only metrics with a direction (:mod:`~seo_trainlog._directions`, extended by
        ``LogConfig.metric_directions``), lowest for losses and errors, highest for accuracies...),
        ``eval_metrics`` and ``train_metrics`` (``{metric: {"last", "last_global_step", "min", "max",
        "direction"}}`` and ``"best"`` for a metric with a direction: the ``eval`` evaluation metrics,
        and the train records' metrics other than the loss, learning rate, gradient norm, timings and
        resource readings, e.g. TRL's ``mean_token_accuracy``, ``rewards/margins``; over the records
        read), ``last_eval``
        (``{prefix: {metric: value, "global_step"}}``, e.g. ``eval``, ``test``), ``best_metric`` and
        ``best_model_checkpoint`` (Trainer's), ``samples_per_second`` and ``steps_per_second`` (over
        the logged step intervals of the records read, data wait included, evaluation excluded),
        ``tokens`` (see :meth:`token_summary`; None without token counts),
        ``data_wait_pct``, ``peak_rss_mb``, ``peak_gpu_mem_mb`` (``{key: MiB}``),
        ``mean_gpu_util_pct``, ``early_stopping_triggered``, ``errors``, ``warnings``,
        ``anomaly_count``, ``anomalies``, ``records_cover`` (``{"first_global_step",
        "last_global_step", "complete"}``: the train records read; ``complete`` is false when
        retention deleted older ones) and ``manifest_used`` (the run's manifest filled in what
        the deleted records held; ``manifest_problem``: why a manifest that exists was not used, or
        which of its fields were not).
        ``status`` is ``no_training`` for a run that only evaluated. ``evaluations``, ``best_eval``
        and ``last_eval`` merge the manifest's ``eval`` section (its evaluations whose records were
        deleted) with the records'. ``counts_in_records`` (``errors``, ``warnings``, ``anomalies``)
        counts what the remaining records hold (the totals may come from the manifest).
        ``resumed_here``: the run was resumed into this log directory (its ``run_start`` says
        ``resumed``): its earlier records are in another one and ``records_cover.complete`` is false.
        Without train records (``logging_steps`` longer than the run) ``samples_per_second`` and
        ``steps_per_second`` are the Trainer's own over ``train()`` (``throughput_source``:
        ``trainer``, else ``records`` or ``None``); ``mean_train_loss`` is the Trainer's mean training
        loss (``train_loss`` of its ``training`` model record), never a final or best loss.
        """
        busy = self._interval_s
        lost = self.head_deleted
        manifest = self.manifest if lost else None
        summary = self._summary or (_mapping(manifest, "summary") if manifest else {})
        hyperparameters = self.hyperparameters
        run = hyperparameters.get("run") if isinstance(hyperparameters, dict) else None
        max_steps = run.get("max_steps") if isinstance(run, dict) else None
        started, global_step = self._first_time, self._global_step if self._global_step >= 0 else None
        best, final = self._best_loss, (self._final_loss, self._final_loss_step)
        counts = dict(self._counts)
        status = self._status
        evaluations, best_eval = self._evaluations, dict(self._best_eval)
        last_eval = {prefix: dict(values) for prefix, values in self._last_eval.items()}
        if manifest is not None:
            train = _mapping(manifest, "train")
            if isinstance(manifest.get("started"), str):
                started = manifest["started"]
            if max_steps is None and type(manifest.get("max_steps")) is int:
                max_steps = manifest["max_steps"]
            last = train.get("last_global_step")
            if type(last) is int and (global_step is None or last > global_step):
                global_step = last
            if _is_number(train.get("best_loss")) and (best is None or train["best_loss"] < best[0]):
                best = (train["best_loss"], train.get("best_loss_step"))
            if _is_number(train.get("final_loss")) and (final[0] is None or (
                    type(last) is int and type(final[1]) is int and last > final[1])):
                final = (train["final_loss"], last)
            for key, value in _mapping(manifest, "counts").items():
                if key in counts and type(value) is int and value > counts[key]:
                    counts[key] = value
            if status is None and manifest.get("status") not in (None, "running"):
                status = manifest["status"]
            evaluations = self._merge_eval(_mapping(manifest, "eval"), evaluations, best_eval, last_eval,
                                           self.directions)
        segments = self.segments()
        durations = [s["training_duration_s"] for s in segments if _is_number(s["training_duration_s"])]
        whole = not lost and len(segments) <= 1  # the summary's own figures cover the records read
        peaks = {key.removesuffix("_max"): value for key, value in self._peaks.items()}
        peak_rss = max((v for v in (peaks.pop("rss_mb", None), summary.get("peak_rss_mb")) if _is_number(v)),
                       default=None)
        computed_wait = 100 * self._wait_s / busy if busy else None
        computed_util = self._gpu_util_sum / self._gpu_util_count if self._gpu_util_count else None
        throughput_source = "records" if busy else None
        samples_per_second = self._samples / busy if busy else None
        steps_per_second = self._steps / busy if busy else None
        trainer = self._trainer_totals
        if not busy and self._train_steps[0] is None and _is_number(trainer.get("train_samples_per_second")):
            throughput_source = "trainer"
            samples_per_second = trainer["train_samples_per_second"]
            steps_per_second = trainer.get("train_steps_per_second") if _is_number(
                trainer.get("train_steps_per_second")) else None
        return {
            "run_id": self.run_id,
            "status": status or NO_SUMMARY,
            "started": started,
            "last_record": self._last_time,
            "wall_time_s": _seconds_between(started, self._last_time),
            "training_duration_s": sum(durations) if durations else summary.get("training_duration_s"),
            "segments": segments,
            "global_step": global_step,
            "max_steps": max_steps,
            "epoch": self._epoch if self._epoch > -math.inf else None,
            "final_loss": final[0],
            "best_loss": best[0] if best else None,
            "best_loss_step": best[1] if best else None,
            "mean_train_loss": trainer.get("train_loss") if _is_number(trainer.get("train_loss")) else None,
            "evaluations": evaluations,
            "best_eval": {key: {"value": value, "global_step": step} for key, (value, step) in best_eval.items()},
            "eval_metrics": self.eval_metrics.summary(),
            "train_metrics": self.train_metrics.summary(),
            "last_eval": last_eval,
            "best_metric": summary.get("best_metric"),
            "best_model_checkpoint": summary.get("best_model_checkpoint"),
            "samples_per_second": samples_per_second,
            "steps_per_second": steps_per_second,
            "throughput_source": throughput_source,
            "tokens": self.token_summary(),
            "data_wait_pct": summary.get("data_wait_pct", computed_wait) if whole else computed_wait,
            "peak_rss_mb": peak_rss,
            "peak_gpu_mem_mb": peaks,
            "mean_gpu_util_pct": summary.get("mean_gpu_util_pct", computed_util) if whole else computed_util,
            "early_stopping_triggered": summary.get("early_stopping_triggered"),
            "errors": counts["error"],
            "warnings": counts["warning"],
            "anomaly_count": counts["anomaly"],
            "anomalies": self.anomalies,
            "counts_in_records": {"errors": self._counts["error"], "warnings": self._counts["warning"],
                                  "anomalies": self._counts["anomaly"]},
            "records_cover": {"first_global_step": self._train_steps[0], "last_global_step": self._train_steps[1],
                              "complete": not lost and not self._resumed_here},
            "resumed_here": self._resumed_here,
            "manifest_used": manifest is not None,
            "manifest_problem": self.manifest_problem,
        }

    @staticmethod
    def _merge_eval(section: Mapping[str, Any], evaluations: int, best_eval: dict[str, tuple[float, Any]],
                    last_eval: dict[str, dict[str, Any]], table: Directions | None = None) -> int:
        """Merge the manifest's ``eval`` section (``records``, ``best``, ``last``; see
        :func:`eval_metrics`) into ``best_eval`` (the better value per metric; the manifest's, of
        earlier steps, on a tie) and ``last_eval`` (per prefix, the later ``global_step``); returns
        the number of evaluations (the larger count). Values of the wrong type are left out."""
        records = section.get("records")
        if type(records) is int and records > evaluations:
            evaluations = records
        for metric, entry in _mapping(section, "best").items():
            if not isinstance(entry, Mapping) or not _is_number(entry.get("value")):
                continue
            value, known, direction = entry["value"], best_eval.get(metric), (table or directions()).of(metric)
            if direction is not None and (known is None or not better(direction, known[0], value)):
                best_eval[metric] = (value, entry.get("global_step"))
        for prefix, entry in _mapping(section, "last").items():
            if not isinstance(entry, Mapping) or type(entry.get("global_step")) is not int:
                continue
            known = last_eval.get(prefix)
            if known is None or type(known.get("global_step")) is not int or entry["global_step"] > known["global_step"]:
                last_eval[prefix] = {"global_step": entry["global_step"],
                                     **{k: v for k, v in entry.items() if k != "global_step"}}
        return evaluations


def eval_metrics(record: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(prefix, metrics)`` of an ``eval`` record: the prefix its metric keys share (``eval``,
    ``test``... see :func:`~seo_trainlog.watch.anomaly.eval_prefix`) and its keys starting with
    ``f"{prefix}_"``, timings (:data:`SPEED_SUFFIXES`: runtime, samples/steps per second, model
    preparation time) left out, values as they are. Raises nothing."""
    prefix = eval_prefix(record)
    return prefix, {key: value for key, value in record.items()
                    if key.startswith(f"{prefix}_") and not key.endswith(SPEED_SUFFIXES)}


def is_gpu_util_key(key: str) -> bool:
    """``gpu<i>_util_pct`` (NVML), not ``gpu<i>_mem_util_pct``."""
    return key.startswith("gpu") and key.endswith("_util_pct") and "_mem_" not in key


_SEGMENT_KEYS = ("segment", "started", "start_global_step", "status", "training_duration_s")


def _mapping(parent: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = parent.get(key)
    return value if isinstance(value, Mapping) else {}


def _token_row(record: dict[str, Any]) -> tuple[Any, ...]:
    return (record.get("global_step"), *(record.get(name) for name in TOKEN_COLUMNS))


def _eval_row(record: dict[str, Any]) -> tuple[Any, ...]:
    return record.get("global_step"), record.get("eval_loss")


def _is_number(value: Any) -> bool:
    return (type(value) is float and math.isfinite(value)) or type(value) is int


def _seconds_between(first: str | None, last: str | None) -> float | None:
    try:
        return (datetime.fromisoformat(last) - datetime.fromisoformat(first)).total_seconds()  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _same_settings(record: Mapping[str, Any], config: LogConfig) -> bool:
    settings = record.get("settings")
    return isinstance(settings, Mapping) and dict(settings) == settings_of(config)


class RankAnalysis:
    """The ranks of one distributed run side by side, from the metrics files of all its processes
    (global rank 0's ``train`` records, each node leader's ``train`` records, the other ranks'
    ``rank_step`` records; several directories when the nodes shared no disk). Fed one record at a
    time (:meth:`add`); the same :class:`~seo_trainlog.watch.anomaly.StragglerDetector` as during
    training compares the ranks at every logging step that all of them recorded, in step order.

    Memory grows with ranks x logging steps (a few numbers each).
    """

    def __init__(self, config: LogConfig | None = None) -> None:
        self.config = config or LogConfig()
        self._identity: dict[int, dict[str, Any]] = {}
        self._samples: dict[int, dict[int, dict[str, float]]] = {}  # global_step -> rank -> rank_sample
        self.logged: list[dict[str, Any]] = []  # straggler anomalies the run wrote during training
        self.world_size: int | None = None  # the largest any record of the run names

    def add(self, record: Mapping[str, Any]) -> None:
        rank, event = record.get("rank"), record.get("event")
        if type(rank) is not int:
            return
        world_size = record.get("world_size")
        if type(world_size) is int and world_size > (self.world_size or 0):
            self.world_size = world_size
        if event == "anomaly":  # rank, node_rank, host: the writer's; the slow rank's are straggler_*
            if record.get("kind") == "straggler":
                logged = dict(record)
                if "straggler_rank" not in logged:  # an older file: its rank was the slow one
                    logged["straggler_rank"] = rank
                    for key in ("node_rank", "host", "user_global_step"):
                        logged.pop(key, None)
                    if type(record.get("user_global_step")) is int:
                        logged["global_step"] = record["user_global_step"]
                self.logged.append(logged)
            return
        identity = self._identity.setdefault(rank, {"rank": rank, "node_rank": None, "host": None})
        for key in ("node_rank", "host"):
            if record.get(key) is not None:
                identity[key] = record[key]
        step = record.get("global_step")
        if event in ("train", "rank_step") and type(step) is int:
            sample = rank_sample(record)
            if sample is not None:
                self._samples.setdefault(step, {})[rank] = sample

    @property
    def ranks(self) -> list[int]:
        return sorted(self._identity)

    def summary(self) -> dict[str, Any]:
        """``{"ranks": [...], "stragglers": [...]}``: per rank (ascending) ``rank``, ``node_rank``,
        ``host``, ``records`` (logging steps it recorded), the means over them of ``step_time_s``,
        ``data_wait_s``, ``data_wait_pct``, ``own_data_s`` (collate time per step, else data wait), the
        mean ``pace_s`` over the compared steps (see :func:`~seo_trainlog.watch.anomaly.pace_times`),
        ``compared_steps`` and ``straggler`` (true when found here or logged during training); the
        ``straggler`` anomalies found here (those logged during training when none is found here), each
        naming the slow rank as ``straggler_rank`` (``straggler_node_rank``, ``straggler_host``); and
        ``world_size`` with ``ranks_without_records``: the ranks of ``range(world_size)`` that recorded
        no logging step in the files read (no file, or a process that ended before its first one).
        """
        detector = StragglerDetector(self.config.straggler_pct, self.config.straggler_window)
        ranks = self.ranks
        found: list[dict[str, Any]] = []
        paces: dict[int, list[float]] = {rank: [] for rank in ranks}
        for step in sorted(self._samples):
            samples = self._samples[step]
            if len(ranks) < 2 or len(samples) < len(ranks):
                continue
            for rank, pace in pace_times(samples).items():
                paces[rank].append(pace)
            found += [anomaly.to_dict() for anomaly in detector.update(step, samples, self._identity)]
        stragglers = found or self.logged
        slow = {anomaly.get("straggler_rank") for anomaly in stragglers}
        rows = []
        for rank in ranks:
            series = [samples[rank] for samples in self._samples.values() if rank in samples]
            row = dict(self._identity[rank], records=len(series))
            for key in ("step_time_s", "data_wait_s", "data_wait_pct", "own_data_s"):
                row[key] = sum(sample[key] for sample in series) / len(series) if series else None
            row["pace_s"] = sum(paces[rank]) / len(paces[rank]) if paces[rank] else None
            row["compared_steps"] = len(paces[rank])
            row["straggler"] = rank in slow
            rows.append(row)
        recorded = {row["rank"] for row in rows if row["records"]}
        missing = [rank for rank in range(self.world_size or 0) if rank not in recorded]
        return {"ranks": rows, "stragglers": stragglers, "world_size": self.world_size,
                "ranks_without_records": missing}
