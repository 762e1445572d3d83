"""Last value, range and (with a direction) best of every metric a run logs beside its loss: the
train-side metrics of TRL and other trainers (``mean_token_accuracy``, ``rewards/margins``,
``num_tokens``...) and the evaluation metrics; with a bounded series of each for the plots."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from .._directions import Directions, better

MAX_METRICS = 200  # metrics followed per run (more are counted in ``dropped`` and left out)
# keys of a train record that are not the trainer's metrics: the record's own fields, the loss,
# learning rate and gradient norm (shown apart), and seo_trainlog's own readings: timings, token counts
# (``rank_*``: one rank's own counts in a distributed run), MFU; resource and collation readings: _READINGS
NOT_METRICS = frozenset({
    "time", "run_id", "event", "global_step", "epoch", "rank", "local_rank", "world_size", "host", "node_rank",
    "segment", "loss", "loss_name", "learning_rate", "grad_norm", "validation_loss", "steps", "step_time_s",
    "data_wait_s", "data_wait_pct", "samples_per_second", "interval_s", "tokens_per_second", "mfu_pct",
    "num_input_tokens_seen", "rank_input_tokens", "rank_num_input_tokens_seen",
    "tokens_counted_from_global_step"})
_READINGS = re.compile(r"(?:(?:rss_mb|cpu_pct)(?:_min|_max)?|sys_mem_\w+|gpu\d+_\w+|cuda\d+_\w+|collate_\w+)\Z")


def is_train_metric(key: str) -> bool:
    """True for a train record's ``key`` that may be a metric the trainer logged: not among
    :data:`NOT_METRICS` nor a resource reading such as ``rss_mb``, ``gpu0_util_pct``, ``collate_time_s``
    (decided by the name alone: a value that is not a finite number is skipped by :meth:`MetricStats.add`)."""
    return key not in NOT_METRICS and not _READINGS.match(key)


class MetricStats:
    """Per metric name, fed ``(name, value, global_step)`` in order: the last value and its step, the
    minimum, the maximum and, when :class:`~seo_trainlog._directions.Directions` gives the metric a
    direction, the best value and its step (the first one reached on a tie). Values that are not
    finite numbers are skipped. Keeps at most ``max_points`` to ``2 * max_points`` points of each
    metric, evenly thinned (:meth:`series`)."""

    def __init__(self, directions: Directions, max_points: int = 2000, max_metrics: int = MAX_METRICS) -> None:
        self.directions = directions
        self.max_points = max_points
        self.max_metrics = max_metrics
        self.dropped: set[str] = set()
        self._entries: dict[str, list[Any]] = {}  # [last, last_step, min, max, direction, best, best_step, points]

    def add(self, name: str, value: Any, step: Any, prefix: str | None = None) -> None:
        if not _is_number(value):
            return
        entry = self._entries.get(name)
        if entry is None:
            if len(self._entries) >= self.max_metrics:
                if len(self.dropped) < 1000:
                    self.dropped.add(name)
                return
            direction = self.directions.of(name, prefix)
            entry = self._entries[name] = [value, step, value, value, direction, None, None, _Points(self.max_points)]
        entry[0], entry[1] = value, step
        if value < entry[2]:
            entry[2] = value
        if value > entry[3]:
            entry[3] = value
        if entry[4] is not None and (entry[5] is None or better(entry[4], value, entry[5])):
            entry[5], entry[6] = value, step
        entry[7].offer(step, value)

    def names(self) -> list[str]:
        return list(self._entries)

    def follows(self, name: str) -> bool:
        """True once ``name`` has an entry (a finite value was added under the :data:`MAX_METRICS` limit)."""
        return name in self._entries

    def summary(self) -> dict[str, dict[str, Any]]:
        """``{name: {"last", "last_global_step", "min", "max", "direction"}}`` plus ``"best":
        {"value", "global_step"}`` for a metric with a direction (``"min"``/``"max"``); none without."""
        out = {}
        for name, (last, step, low, high, direction, best, best_step, _) in self._entries.items():
            out[name] = {"last": last, "last_global_step": step, "min": low, "max": high, "direction": direction}
            if direction is not None:
                out[name]["best"] = {"value": best, "global_step": best_step}
        return out

    def series(self, name: str) -> tuple[list[Any], list[float]]:
        """``(global_steps, values)`` of ``name`` (empty lists for a name never logged)."""
        entry = self._entries.get(name)
        return entry[7].points() if entry is not None else ([], [])


class _Points:
    """Every ``stride``-th point, the stride doubling when ``2 * max_points`` are kept; the last
    point offered always included (as :class:`~seo_trainlog.read.analysis.Series`)."""

    __slots__ = ("max_points", "stride", "offered", "steps", "values", "last")

    def __init__(self, max_points: int) -> None:
        self.max_points, self.stride, self.offered = max_points, 1, 0
        self.steps: list[Any] = []
        self.values: list[float] = []
        self.last: tuple[Any, float] | None = None

    def offer(self, step: Any, value: float) -> None:
        self.offered += 1
        if (self.offered - 1) % self.stride:
            self.last = (step, value)
            return
        self.last = None
        self.steps.append(step)
        self.values.append(value)
        if len(self.steps) >= 2 * self.max_points:
            del self.steps[1::2], self.values[1::2]
            self.stride *= 2

    def points(self) -> tuple[list[Any], list[float]]:
        steps, values = list(self.steps), list(self.values)
        if self.last is not None:
            steps.append(self.last[0])
            values.append(self.last[1])
        keep = [index for index, step in enumerate(steps) if step is not None]
        return [steps[i] for i in keep], [values[i] for i in keep]


DIRECTION_TEXT = {"min": "lower is better", "max": "higher is better", None: "no direction: no best"}


def stats_text(entry: Mapping[str, Any], number) -> str:
    """``last 0.75 at step 6, range 0.0625-0.8125, best 0.8125 at step 5 (higher is better)``;
    ``number`` formats a value (``_present.number``)."""
    text = (f"last {number(entry['last'])} at step {entry['last_global_step']}, "
            f"range {number(entry['min'])} to {number(entry['max'])}")
    best = entry.get("best")
    if best is not None:
        text += f", best {number(best['value'])} at step {best['global_step']}"
    return f"{text} ({DIRECTION_TEXT[entry['direction']]})"


def _is_number(value: Any) -> bool:
    return (type(value) is float and math.isfinite(value)) or type(value) is int
