"""Anomaly detection on logged training values: pure and streaming, the same code during training
(fed by the callback) and afterwards (fed by ``seo-trainlog`` from the JSON metrics)."""

from __future__ import annotations

import math
import statistics
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .._config import LogConfig

KINDS = ("non_finite", "loss_spike", "grad_explosion", "throughput_drop", "memory_creep", "data_wait", "plateau",
         "straggler")
# The LogConfig fields that define what the detector finds: a run records them (JSON ``detector``
# event) when it detects online, so that a reader with the same settings can use its findings.
SETTINGS = ("anomaly_window", "loss_spike_z", "grad_norm_jump", "throughput_drop_pct", "memory_creep_mb",
            "plateau_evals", "plateau_min_delta", "data_wait_warn_pct")
MAD_TO_SIGMA = 1.4826  # MAD x this estimates the standard deviation of normally distributed values
MIN_RELATIVE_SCALE = 0.01  # the spread of a loss window is taken as at least 1% of its median
CREEP_RISING_SHARE = 0.8  # share of a window's changes that must be increases for memory creep
_ABSENT = object()


@dataclass(frozen=True)
class Anomaly:
    """One anomaly: ``kind`` (one of :data:`KINDS`), the ``global_step`` of the record that showed it,
    a one-line human ``message``, the measured ``value`` and the ``threshold`` it crossed, both in
    the unit of the detector (see :class:`AnomalyDetector`; ``None`` where there is none); ``details``:
    further values of the kind (a ``straggler``'s ``straggler_rank``, ``pace_s``... see
    :class:`StragglerDetector`)."""

    kind: str
    global_step: int | None
    message: str
    value: float | None
    threshold: float | None
    details: Mapping[str, Any] | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """``{"kind", "global_step", "message", "value", "threshold"}`` and the ``details``, if any."""
        values = {"kind": self.kind, "global_step": self.global_step, "message": self.message, "value": self.value,
                  "threshold": self.threshold}
        if self.details:
            values.update(self.details)
        return values


def settings_of(config: LogConfig) -> dict[str, float]:
    """The detector's settings in ``config`` (see :data:`SETTINGS`)."""
    return {name: getattr(config, name) for name in SETTINGS}


class AnomalyDetector:
    """Finds anomalies in the values of logged records, one record at a time, in constant memory.

    Feed every ``train`` and ``eval`` record in order to :meth:`update`; other events are ignored.
    A window is the last ``config.anomaly_window`` values of one key from ``train`` records (one
    per ``logging_steps``); the median-based detectors start once a window holds half that many.
    Each record's value is compared with the window *before* it joins it.

    ======================  ================================================================  =================================
    kind                    fires when                                                        re-arms when
    ======================  ================================================================  =================================
    ``non_finite``          ``loss`` or ``grad_norm`` of ``train``, or ``<prefix>_loss`` of    a finite value of that key
                            ``eval``, is null (NaN/inf in JSON), NaN or infinite; per key
                            (value: the value, threshold: None)
    ``loss_spike``          ``(loss - median) / max(1.4826 * MAD, 0.01 * |median|)`` >          ``loss`` <= median
                            ``config.loss_spike_z`` (value: loss; threshold: the loss at
                            which that happens)
    ``grad_explosion``      ``grad_norm > config.grad_norm_jump * median``                     ``grad_norm`` <= median
    ``throughput_drop``     ``samples_per_second < (1 - config.throughput_drop_pct/100) *``    ``samples_per_second`` >= median
                            ``median``
    ``data_wait``           ``data_wait_pct > config.data_wait_warn_pct``                      ``data_wait_pct`` <= half of that
    ``memory_creep``        over a full window of ``rss_mb``, ``gpu<i>_mem_used_mb`` or        a full new window has been seen
                            ``cuda<i>_allocated_mb`` (MiB, means of each interval): growth       (the window is emptied when it
                            last - first >= ``config.memory_creep_mb``, positive                fires)
                            least-squares slope, >= 80% of the changes increases, and no
                            single change above half the growth (a one-off allocation such
                            as the optimizer state is not creep); per key (value: growth)
    ``plateau``             ``config.plateau_evals`` evaluations in a row (``metric_prefix``    a new best ``eval_loss``
                            ``eval``) without an ``eval_loss`` below best -
                            ``config.plateau_min_delta`` (value: eval_loss; threshold: that
                            bound)
    ======================  ================================================================  =================================

    So one incident gives one anomaly, not one per following record.
    """

    def __init__(self, config: LogConfig) -> None:
        self.config = config
        min_count = max(3, config.anomaly_window // 2)
        self._losses = _Window(config.anomaly_window, min_count)
        self._grad_norms = _Window(config.anomaly_window, min_count)
        self._throughputs = _Window(config.anomaly_window, min_count)
        self._memory: dict[str, _Trend] = {}
        self._keys: frozenset[str] = frozenset()
        self._memory_keys: list[str] = []  # of the records with the keys ``_keys``
        self._disarmed: set[str] = set()  # kinds (non_finite: kind/key) that fired and wait to re-arm
        self._best_eval_loss: float | None = None
        self._evals_since_best = 0

    def update(self, event: str, values: Mapping[str, Any], global_step: int | None) -> list[Anomaly]:
        """The anomalies that ``values`` (the dict of one JSON metrics line) shows; usually ``[]``.

        Args:
            event: the record's ``event``: ``train`` and ``eval`` are examined, others ignored.
            values: the record's values (``loss``, ``grad_norm``, ``samples_per_second``,
                ``data_wait_pct``, ``rss_mb``...; for ``eval``: ``metric_prefix``, ``<prefix>_loss``).
            global_step: the optimizer step of the record (carried into each :class:`Anomaly`).
        """
        if event == "train":
            return self._train(values, global_step)
        if event == "eval":
            return self._eval(values, global_step)
        return []

    def _train(self, values: Mapping[str, Any], step: int | None) -> list[Anomaly]:
        found: list[Anomaly] = []
        loss = values.get("loss")
        if type(loss) is not float or self._disarmed or not math.isfinite(loss):  # else: _finite's common case
            loss = self._finite("loss", values, step, found)
        if loss is not None:
            self._loss_spike(loss, step, found)
        grad_norm = values.get("grad_norm")
        if type(grad_norm) is not float or self._disarmed or not math.isfinite(grad_norm):
            grad_norm = self._finite("grad_norm", values, step, found)
        if grad_norm is not None:
            self._grad_explosion(grad_norm, step, found)
        throughput = values.get("samples_per_second")
        if type(throughput) is float or type(throughput) is int:
            self._throughput_drop(throughput, step, found)
        wait = values.get("data_wait_pct")
        if type(wait) is float or type(wait) is int:
            limit = self.config.data_wait_warn_pct
            if (wait > limit or self._disarmed) and self._latch("data_wait", wait > limit, wait <= limit / 2):
                found.append(Anomaly("data_wait", step, f"Data-loading bottleneck at global_step {step}: "
                                     f"{wait:.1f}% of step + wait time was spent waiting for data (threshold {limit:g}%)",
                                     wait, limit))
        if values.keys() != self._keys:
            self._keys = frozenset(values)
            self._memory_keys = [key for key in values if _is_memory_key(key)]
        for key in self._memory_keys:
            value = values[key]
            if type(value) is float or type(value) is int:
                self._memory_creep(key, value, step, found)
        return found

    def _eval(self, values: Mapping[str, Any], step: int | None) -> list[Anomaly]:
        found: list[Anomaly] = []
        prefix = eval_prefix(values)
        loss = self._finite(f"{prefix}_loss", values, step, found)
        if prefix != "eval" or loss is None:
            return found
        best, delta = self._best_eval_loss, self.config.plateau_min_delta
        improved = best is None or loss < best - delta
        if improved:
            self._best_eval_loss, self._evals_since_best = loss, 0
        else:
            self._evals_since_best += 1
        if self._latch("plateau", self._evals_since_best >= self.config.plateau_evals, improved):
            found.append(Anomaly("plateau", step, f"Plateau at global_step {step}: eval_loss has not improved "
                                 f"on its best {best:.6g} for {self._evals_since_best} evaluation{'' if self._evals_since_best == 1 else 's'} (min delta "
                                 f"{delta:g})", loss, best - delta))
        return found

    def _finite(self, key: str, values: Mapping[str, Any], step: int | None, found: list[Anomaly]) -> float | None:
        """The value of ``key`` as a finite float; a present non-finite one is a ``non_finite`` anomaly."""
        value = values.get(key, _ABSENT)
        if type(value) is float and not self._disarmed and math.isfinite(value):
            return value  # the common case, first
        if value is _ABSENT:
            return None
        number = _number(value)
        bad = value is None or (isinstance(value, float) and not math.isfinite(value))
        if self._latch(f"non_finite/{key}", bad, number is not None):
            shown = "null (NaN or infinity)" if value is None else repr(value)
            found.append(Anomaly("non_finite", step, f"Non-finite {key} at global_step {step}: {shown}",
                                 value, None))
        return number

    def _loss_spike(self, loss: float, step: int | None, found: list[Anomaly]) -> None:
        window = self._losses
        median = window.median
        if median is not None:
            limit = self.config.loss_spike_z
            floor = MIN_RELATIVE_SCALE * abs(median)
            # the scale is at least ``floor``: a loss within limit * floor of the median is no spike,
            # and needs no MAD (most records)
            if loss - median > limit * floor or "loss_spike" in self._disarmed:
                scale = max(MAD_TO_SIGMA * window.mad(), floor) or 1e-12
                z_score = (loss - median) / scale
                if self._latch("loss_spike", z_score > limit, loss <= median):
                    found.append(Anomaly("loss_spike", step, f"Loss spike at global_step {step}: loss {loss:.6g} "
                                         f"is {z_score:.1f} robust z above the median {median:.6g} of the last "
                                         f"{len(window.values)} (threshold {limit:g})", loss, median + limit * scale))
        window.add(loss)

    def _grad_explosion(self, grad_norm: float, step: int | None, found: list[Anomaly]) -> None:
        window = self._grad_norms
        median = window.median
        if median is not None:
            jump = self.config.grad_norm_jump
            bad = grad_norm > jump * median
            if (bad or self._disarmed) and self._latch("grad_explosion", bad, grad_norm <= median):
                found.append(Anomaly("grad_explosion", step, f"Gradient explosion at global_step {step}: grad_norm "
                                     f"{grad_norm:.6g} against the median {median:.6g} of the last "
                                     f"{len(window.values)} (threshold {jump:g}x the median)", grad_norm, jump * median))
        window.add(grad_norm)

    def _throughput_drop(self, throughput: float, step: int | None, found: list[Anomaly]) -> None:
        window = self._throughputs
        median = window.median
        if median is not None:
            drop = self.config.throughput_drop_pct
            limit = (1 - drop / 100) * median
            bad = throughput < limit
            if (bad or self._disarmed) and self._latch("throughput_drop", bad, throughput >= median):
                found.append(Anomaly("throughput_drop", step, f"Throughput drop at global_step {step}: "
                                     f"{throughput:.4g} samples/s against the median {median:.4g} of the last "
                                     f"{len(window.values)} (threshold {drop:g}% below the median)", throughput, limit))
        window.add(throughput)

    def _memory_creep(self, key: str, value: float, step: int | None, found: list[Anomaly]) -> None:
        trend = self._memory.get(key)
        if trend is None:
            trend = self._memory[key] = _Trend(self.config.anomaly_window)
        if not trend.add(value):
            return
        growth = trend.creep(self.config.memory_creep_mb)
        if growth is not None:
            changes = len(trend.values) - 1
            found.append(Anomaly("memory_creep", step, f"Memory creep in {key} up to global_step {step}: "
                                 f"+{growth:.0f} MiB over the last {changes + 1} records, rising in {trend.rises} "
                                 f"of {changes} (threshold {self.config.memory_creep_mb:g} MiB)",
                                 growth, self.config.memory_creep_mb))
            trend.reset()

    def _latch(self, name: str, bad: bool, clear: bool) -> bool:
        """True once when ``bad`` first holds; again only after ``clear`` has held since."""
        if not self._disarmed:
            if bad:
                self._disarmed.add(name)
            return bad
        if name in self._disarmed:
            if clear:
                self._disarmed.discard(name)
            return False
        if bad:
            self._disarmed.add(name)
        return bad


class _Window:
    """The last ``size`` values, also kept sorted. ``median`` is their median once they are at least
    ``min_count``, else ``None``; an update costs O(log size) plus a short copy."""

    __slots__ = ("values", "ordered", "min_count", "median")

    def __init__(self, size: int, min_count: int) -> None:
        self.values: deque[float] = deque(maxlen=size)
        self.ordered: list[float] = []
        self.min_count = min_count
        self.median: float | None = None

    def add(self, value: float) -> None:
        values, ordered = self.values, self.ordered
        if len(values) == values.maxlen:
            del ordered[bisect_left(ordered, values[0])]
        values.append(value)
        insort(ordered, value)
        count = len(ordered)
        if count >= self.min_count:  # _median, inlined: this runs for three keys of every record
            half = count // 2
            self.median = ordered[half] if count % 2 else (ordered[half - 1] + ordered[half]) / 2

    def mad(self) -> float:
        """Median absolute deviation from the median."""
        median = self.median
        return _median(sorted([abs(value - median) for value in self.ordered]))  # two sorted runs: one merge


def _median(ordered: list[float]) -> float:
    half = len(ordered) // 2
    return ordered[half] if len(ordered) % 2 else (ordered[half - 1] + ordered[half]) / 2


class _Trend:
    """The last ``size`` values of one memory key, with the count of increases between them."""

    __slots__ = ("values", "rises")

    def __init__(self, size: int) -> None:
        self.values: deque[float] = deque(maxlen=size)
        self.rises = 0

    def add(self, value: float) -> bool:
        """Append ``value``; true when the window is full and rises often enough to be examined."""
        values = self.values
        full = len(values) == values.maxlen
        if full and values[1] > values[0]:
            self.rises -= 1
        if values and value > values[-1]:
            self.rises += 1
        values.append(value)
        return (full or len(values) == values.maxlen) and self.rises >= CREEP_RISING_SHARE * (len(values) - 1)

    def creep(self, min_growth_mb: float) -> float | None:
        """After :meth:`add` returned true: the growth (MiB) when the window shows creep (see
        :class:`AnomalyDetector`), else None."""
        values = self.values
        growth = values[-1] - values[0]
        if growth < min_growth_mb:
            return None
        largest = max(later - earlier for earlier, later in zip(values, list(values)[1:]))
        return growth if largest <= growth / 2 and _slope(values) > 0 else None

    def reset(self) -> None:
        self.values.clear()
        self.rises = 0


def _slope(values: deque[float]) -> float:
    """Least-squares slope of ``values`` against their index."""
    count = len(values)
    mean_x, mean_y = (count - 1) / 2, sum(values) / count
    spread = sum((index - mean_x) ** 2 for index in range(count))
    return sum((index - mean_x) * (value - mean_y) for index, value in enumerate(values)) / spread


def eval_prefix(values: Mapping[str, Any]) -> str:
    """The ``metric_prefix`` of an ``eval`` record (``eval``, ``test``...); for files written before that
    key existed, the prefix of its ``<prefix>_runtime`` key; else ``eval``."""
    prefix = values.get("metric_prefix")
    if isinstance(prefix, str):
        return prefix
    runtime = next((key for key in values if key.endswith("_runtime")), None)
    return runtime[: -len("_runtime")] if runtime else "eval"


def _number(value: Any) -> float | None:
    if type(value) is float:
        return value if math.isfinite(value) else None
    if type(value) is int:
        return float(value)
    return None


def _is_memory_key(key: str) -> bool:
    """``rss_mb``, ``gpu<i>_mem_used_mb``, ``cuda<i>_allocated_mb`` (interval means, not ``_min``/``_max``)."""
    if key == "rss_mb":
        return True
    for prefix, suffix in (("gpu", "_mem_used_mb"), ("cuda", "_allocated_mb")):
        if key.startswith(prefix) and key.endswith(suffix) and key[len(prefix):-len(suffix)].isdecimal():
            return True
    return False


# ---------------------------------------------------------------------------------------- stragglers

STRAGGLER_MIN_EXCESS_S = 0.005  # a pace within 5 ms of the median is scheduling noise, never a straggler


def rank_sample(values: Mapping[str, Any]) -> dict[str, float] | None:
    """One rank's numbers for one logging interval, from a ``train`` or ``rank_step`` record (or the
    values the callback puts in one): ``step_time_s`` and ``data_wait_s`` (means per optimizer step,
    seconds), ``data_wait_pct``, and ``own_data_s``, the time per optimizer step this rank spent on
    its own data: its :class:`~seo_trainlog.TimedDataCollator` time (``collate_time_s`` /
    ``steps``) when the record has one, else its data wait. None without step timing."""
    step_time, wait, steps = values.get("step_time_s"), values.get("data_wait_s"), values.get("steps")
    if _number(step_time) is None or _number(wait) is None:
        return None
    collate = _number(values.get("collate_time_s"))
    own = collate / steps if collate is not None and type(steps) is int and steps > 0 else float(wait)
    pct = _number(values.get("data_wait_pct"))
    return {"step_time_s": float(step_time), "data_wait_s": float(wait), "own_data_s": own,
            "data_wait_pct": pct if pct is not None else 0.0}


def pace_times(samples: Mapping[int, Mapping[str, float]]) -> dict[int, float]:
    """The pace of each rank at one logging step (seconds per optimizer step): its own data time
    (``own_data_s`` of :func:`rank_sample`) plus the shortest ``step_time_s`` of all ranks at that step.

    Why not the step time itself: in DDP every rank's step ends at the same gradient all-reduce, so a
    rank slowed in its data pipeline shows a normal step time and a long data wait, while the ranks
    that wait for it in the all-reduce show the long step times. The shortest step time is the
    compute and communication every rank needs; the data time is what each rank adds on its own.
    """
    shortest = min(sample["step_time_s"] for sample in samples.values())
    return {rank: sample["own_data_s"] + shortest for rank, sample in samples.items()}


class StragglerDetector:
    """Finds the rank that holds the others back, from the ranks' numbers at the same logging steps.

    Feed :meth:`update` each logging step's ``{rank: rank_sample(...)}``, in step order (the callback
    on global rank 0 during training, ``seo-trainlog summarize`` afterwards from the per-rank files).
    A rank whose pace (:func:`pace_times`) is above ``median * (1 + straggler_pct / 100)`` and more
    than 5 ms above the median of the ranks' paces at ``window`` compared logging steps in a row is a
    ``straggler`` anomaly (value: its pace in seconds, threshold: that bound; ``global_step``: the
    step the ranks were compared at; details: ``straggler_rank``, ``straggler_node_rank`` and
    ``straggler_host`` when known, ``pace_s``, ``median_pace_s``, ``share_pct`` (how far above the
    median, percent), ``straggler_pct``, ``straggler_window``; never ``rank``, ``node_rank`` or
    ``host``: those name the process that writes the record), once per episode: it re-arms once the rank's pace has
    been at or below the bound for ``window`` compared steps in a row (a single normal step, such as
    the first of an epoch, does not end the episode).

    Limit: the pace tells apart a rank slow in its own data loading or collation (or in anything
    between two steps). A rank slow in its forward/backward alone cannot be told apart, since every
    rank's step time then ends at the same all-reduce: that needs communication timings, which the
    Trainer does not give. Without a TimedDataCollator the data wait is used, which for models whose
    loss takes ``num_items_in_batch`` may include the wait in transformers' gather of that count.
    """

    def __init__(self, straggler_pct: float, window: int) -> None:
        self.straggler_pct = straggler_pct
        self.window = window
        self._above: dict[int, int] = {}  # consecutive steps above the bound, per rank
        self._below: dict[int, int] = {}  # consecutive steps at or below it, per rank that fired
        self._fired: set[int] = set()

    def update(self, global_step: int | None, samples: Mapping[int, Mapping[str, float]],
               identities: Mapping[int, Mapping[str, Any]] | None = None) -> list[Anomaly]:
        """The ``straggler`` anomalies at this logging step (usually ``[]``).

        Args:
            global_step: the optimizer step every sample was taken at.
            samples: ``{rank: rank_sample(record)}``; fewer than two ranks compare nothing.
            identities: ``{rank: {"node_rank": int, "host": str}}`` where known: a straggler's are
                given as ``straggler_node_rank`` and ``straggler_host``.
        """
        if len(samples) < 2:
            return []
        paces = pace_times(samples)
        median = statistics.median(paces.values())
        bound = max(median * (1 + self.straggler_pct / 100), median + STRAGGLER_MIN_EXCESS_S)
        found = []
        for rank, pace in sorted(paces.items()):
            if pace <= bound:
                self._above[rank] = 0
                if rank in self._fired:
                    self._below[rank] = self._below.get(rank, 0) + 1
                    if self._below[rank] >= self.window:
                        self._fired.discard(rank)
                continue
            self._below[rank] = 0
            count = self._above[rank] = self._above.get(rank, 0) + 1
            if count >= self.window and rank not in self._fired:
                self._fired.add(rank)
                share = 100.0 * (pace / median - 1) if median > 0 else math.inf
                who = (identities or {}).get(rank) or {}
                where = {f"straggler_{key}": who[key] for key in ("node_rank", "host") if who.get(key) is not None}
                found.append(Anomaly(
                    "straggler", global_step,
                    f"Straggler at global_step {global_step}: rank {rank}'s pace {pace:.4f}s per step is "
                    f"{share:.0f}% above the median {median:.4f}s of {len(paces)} ranks for {count} logging "
                    f"steps (threshold {self.straggler_pct:g}% over {self.window}); every rank waits for it",
                    pace, bound, {"straggler_rank": rank, **where, "pace_s": pace, "median_pace_s": median,
                                  "share_pct": share, "straggler_pct": self.straggler_pct,
                                  "straggler_window": self.window}))
        return found
