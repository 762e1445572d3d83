"""``seo-trainlog watch``: a live terminal view (rich ``Live``) of a run as training writes its JSON
metrics. :class:`WatchState` takes the records, :func:`render_frame` draws one frame from it (pure),
:func:`watch` follows the files and redraws."""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .analysis import NO_TRAINING, SPEED_SUFFIXES, is_gpu_util_key
from ..watch.anomaly import AnomalyDetector, eval_prefix
from .._config import LogConfig
from .present import coverage_notice, duration, number, print_warning, status_text
from .reader import LogReadError, RunFollower, find_runs, load_manifest, select_run

SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
SPARK_POINTS = 60  # losses in the sparkline
MAX_ALERTS = 6  # latest anomalies shown
LATEST_KEYS = ("loss", "learning_rate", "grad_norm", "samples_per_second", "step_time_s", "data_wait_pct")


class WatchState:
    """What the live view shows, updated by :meth:`add` with each record of one run (bounded memory):
    progress (``global_step`` of the latest record, ``run.max_steps`` of the ``hyperparameters``
    record), the latest ``train`` and ``eval`` values, the last :data:`SPARK_POINTS` losses, the
    latest anomalies (from an :class:`AnomalyDetector` and from ``anomaly`` records, once each), and
    the ``summary`` status once it is written (a ``segment_start`` record, a resumed run, clears it).
    ``manifest`` and ``rotated`` as for :class:`~seo_trainlog.read.analysis.RunAnalysis`: when retention
    deleted the run's first records, ``max_steps`` and the latest ``eval_*`` values (until an
    ``eval`` record is read) come from the manifest and :meth:`coverage` says
    which steps the records cover. Every structure is of bounded length whatever the run's length."""

    def __init__(self, run_id: str, config: LogConfig | None = None, *, manifest: Mapping[str, Any] | None = None,
                 rotated: bool = False, manifest_problem: str | None = None) -> None:
        self.run_id = run_id
        self.manifest = manifest if isinstance(manifest, Mapping) else None
        self.manifest_problem = manifest_problem
        self.resumed_here = False  # run_start "resumed": the earlier records are in another log_dir
        self._rotated = rotated or self.manifest is not None
        self._head: bool | None = None
        self._train_steps: list[int | None] = [None, None]
        self.segment = 1
        self.detector = AnomalyDetector(config or LogConfig())
        self.records = 0
        self.global_step: int | None = None
        self.epoch: float | None = None
        self.max_steps: int | None = None
        self.latest_train: dict[str, Any] = {}
        self.latest_eval: dict[str, Any] = {}
        self.losses: deque[float] = deque(maxlen=SPARK_POINTS)
        self.alerts: deque[tuple[str, Any, str]] = deque(maxlen=MAX_ALERTS)
        self.anomaly_count = 0
        self.status: str | None = None
        self._first_train: tuple[datetime, int] | None = None
        self._last_train: tuple[datetime, int] | None = None

    @property
    def finished(self) -> bool:
        """True once the run's ``summary`` record was read."""
        return self.status is not None

    def add(self, record: Mapping[str, Any]) -> None:
        self.records += 1
        event, step = record.get("event"), record.get("global_step")
        if self._head is None:
            self._head = event == "run_start"
            if self.head_deleted and self.manifest is not None and type(self.manifest.get("max_steps")) is int:
                self.max_steps = self.manifest["max_steps"] or None
            if self.head_deleted and self.manifest is not None:  # until a remaining eval record is read
                section = self.manifest.get("eval")
                last = section.get("last") if isinstance(section, Mapping) else None
                last = last.get("eval") if isinstance(last, Mapping) else None
                if isinstance(last, Mapping):
                    self.latest_eval = {key: value for key, value in last.items() if key.startswith("eval_")
                                        and not key.endswith(SPEED_SUFFIXES) and isinstance(value, (int, float))}
        if isinstance(step, int):
            self.global_step = step
        if isinstance(record.get("epoch"), (int, float)):
            self.epoch = record["epoch"]
        for anomaly in self.detector.update(str(event), record, step):
            self._alert(anomaly.kind, anomaly.global_step, anomaly.message)
        if event == "train":
            if self.status == NO_TRAINING:  # evaluated first, now trains
                self.status = None
            self.latest_train = dict(record)
            if isinstance(record.get("loss"), (int, float)):
                self.losses.append(record["loss"])
            if isinstance(step, int):
                self._train_steps = [step if self._train_steps[0] is None else self._train_steps[0], step]
            stamp = _time(record.get("time"))
            if stamp is not None and isinstance(step, int):
                self._first_train = self._first_train or (stamp, step)
                self._last_train = (stamp, step)
        elif event == "eval" and eval_prefix(record) == "eval":
            self.latest_eval = {key: value for key, value in record.items() if key.startswith("eval_")
                                and not key.endswith(SPEED_SUFFIXES) and isinstance(value, (int, float))}
        elif event == "hyperparameters":
            run = (record.get("hyperparameters") or {}).get("run")
            if isinstance(run, dict) and isinstance(run.get("max_steps"), int) and run["max_steps"] > 0:
                self.max_steps = run["max_steps"]
        elif event == "anomaly":
            self._alert(record.get("kind"), record.get("user_global_step", step), record.get("message"))
        elif event in ("summary", "status"):
            self.status = record.get("status") or "unknown"
        elif event == "run_start" and record.get("resumed") is True:
            self.resumed_here = True
        elif event == "segment_start":  # the run was resumed: it goes on, the ETA from its new pace
            self.status = None
            self._first_train = None
            self.segment = record["segment"] if isinstance(record.get("segment"), int) else self.segment + 1

    @property
    def head_deleted(self) -> bool:
        """True when retention deleted the run's oldest records (see ``RunAnalysis.head_deleted``)."""
        return self._rotated and self._head is False

    def coverage(self) -> str | None:
        """The line saying which steps the records cover when older ones were deleted (or are in
        another log directory: a run resumed into this one), else ``None``."""
        return coverage_notice({"run_id": self.run_id, "manifest_used": self.manifest is not None,
                                "manifest_problem": self.manifest_problem, "resumed_here": self.resumed_here,
                                "records_cover": {"first_global_step": self._train_steps[0],
                                                  "last_global_step": self._train_steps[1],
                                                  "complete": not self.head_deleted and not self.resumed_here}})

    @property
    def anomalies_removed(self) -> int:
        """Anomalies the run's manifest counted beyond those read here: their records were deleted by
        retention (0 when no file was deleted or there is no manifest)."""
        if not self.head_deleted or self.manifest is None:
            return 0
        counts = self.manifest.get("counts")
        counted = counts.get("anomaly") if isinstance(counts, Mapping) else None
        return max(0, counted - self.anomaly_count) if type(counted) is int else 0

    def eta_s(self) -> float | None:
        """Seconds to ``max_steps`` at the mean pace (steps per second of record time) since the first
        ``train`` record; ``None`` when unknown or finished."""
        if self.finished or self.max_steps is None or self._first_train is None or self._last_train is None:
            return None
        (start, first_step), (now, last_step) = self._first_train, self._last_train
        elapsed = (now - start).total_seconds()
        if last_step <= first_step or elapsed <= 0:
            return None
        return max(0, self.max_steps - last_step) * elapsed / (last_step - first_step)

    def _alert(self, kind: Any, step: Any, message: Any) -> None:
        if any(kind == seen_kind and step == seen_step for seen_kind, seen_step, _ in self.alerts):
            return  # found by the detector here and logged by the callback: once
        self.anomaly_count += 1
        self.alerts.append((kind, step, str(message)))


def sparkline(values: list[float] | deque[float]) -> str:
    """One block character per value, ``▁`` for the lowest to ``█`` for the highest."""
    if not values:
        return ""
    low, high = min(values), max(values)
    if high == low:
        return SPARK_BLOCKS[0] * len(values)
    return "".join(SPARK_BLOCKS[round((value - low) / (high - low) * (len(SPARK_BLOCKS) - 1))] for value in values)


def render_frame(state: WatchState) -> RenderableType:
    """One frame of the live view: progress and ETA, latest metrics with a loss sparkline, resource
    gauges, alerts."""
    status = status_text(state.status) if state.finished else "running"
    progress = Table.grid(padding=(0, 1))
    step_text = f"global_step {number(state.global_step)}"
    if state.max_steps:
        done = min(state.global_step or 0, state.max_steps)
        progress.add_row(ProgressBar(total=state.max_steps, completed=done, width=40),
                         Text(f"{step_text} / {state.max_steps} ({100 * done / state.max_steps:.1f}%)"))
    else:
        progress.add_row(Text(f"{step_text} (max_steps not logged yet)"))
    eta = state.eta_s()
    progress.add_row(Text(f"epoch {number(state.epoch, 3)}"), Text(f"ETA {duration(eta)}" if eta is not None else ""))
    notice = state.coverage()  # under the grid: the panel's whole width, not the progress bar's column
    head = Group(progress, Text(notice, style="yellow")) if notice else progress

    metrics = Table(show_header=False, box=None, padding=(0, 1))
    for key in LATEST_KEYS:
        if key in state.latest_train:
            metrics.add_row(Text(key), Text(number(state.latest_train[key], 5)))
    for key, value in state.latest_eval.items():
        metrics.add_row(Text(key), Text(number(value, 5)))
    metrics.add_row(Text("loss trend"), Text(sparkline(state.losses), style="cyan"))

    return Group(
        Panel(head, title=f"run {state.run_id}: {status}" + (f" (segment {state.segment})" if state.segment > 1
                                                                   else ""), title_align="left"),
        Panel(metrics, title="latest metrics", title_align="left"),
        Panel(_gauges(state.latest_train), title="resources", title_align="left"),
        Panel(_alerts(state), title=f"alerts ({state.anomaly_count + state.anomalies_removed})", title_align="left"),
    )


def watch(log_dir: str | os.PathLike[str], run_id: str | None, config: LogConfig, console: Console, *,
          interval_s: float = 1.0, timeout_s: float | None = None,
          sleep: Callable[[float], None] = time.sleep) -> int:
    """Follow a run (``run_id``, else the latest one; while the directory is missing or holds no run,
    wait for training to start) and redraw every ``interval_s`` seconds until its summary is read
    (returns 0) or ``timeout_s`` seconds have passed (returns 1).

    Raises:
        LogReadError: ``run_id`` is not in the directory, or a complete line is broken.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    waiting = False
    while True:
        try:
            runs = find_runs(log_dir)
            break
        except LogReadError:  # no directory or no run yet: training has not started
            if _expired(deadline):
                print(f"seo-trainlog: no run appeared in {log_dir} within {timeout_s:g} s", file=sys.stderr)
                return 1
            if not waiting:
                waiting = True
                console.print(f"waiting for a run in {log_dir} (Ctrl-C to stop)")
            sleep(interval_s)
    run = select_run(runs, run_id)
    follower = RunFollower(run, print_warning)
    manifest, problem = load_manifest(run, print_warning)
    state = WatchState(run.run_id, config, manifest=manifest, rotated=len(run.paths) > 1, manifest_problem=problem)
    try:
        with Live(render_frame(state), console=console, auto_refresh=False) as live:
            while True:
                for record in follower.poll():
                    state.add(record)
                live.update(render_frame(state), refresh=True)
                if state.finished:
                    return 0
                if _expired(deadline):
                    return 1
                sleep(interval_s)
    finally:
        follower.close()


def _gauges(train: Mapping[str, Any]) -> RenderableType:
    table = Table.grid(padding=(0, 1))
    total_mb = (train.get("sys_mem_used_mb") or 0) + (train.get("sys_mem_available_mb") or 0)
    rows = [("RSS", train.get("rss_mb"), total_mb or None, "MiB"), ("CPU", train.get("cpu_pct"), None, "% of one core")]
    for key, value in train.items():
        if is_gpu_util_key(key):
            rows.append((f"{key[: -len('_util_pct')]} util", value, 100.0, "%"))
        elif key.startswith("gpu") and key.endswith("_mem_used_mb"):
            device = key[: -len("_mem_used_mb")]
            rows.append((f"{device} memory", value, train.get(f"{device}_mem_total_mb"), "MiB"))
    for label, value, total, unit in rows:
        if not isinstance(value, (int, float)):
            continue
        bar = ProgressBar(total=total, completed=min(value, total), width=30) if total else Text("")
        text = f"{value:,.0f} of {total:,.0f} MiB" if unit == "MiB" and total else f"{value:,.1f} {unit}"
        table.add_row(Text(label), bar, Text(text))
    return table if table.row_count else Text("no resource readings yet")


def _alerts(state: WatchState) -> RenderableType:
    removed = state.anomalies_removed
    lines = [Text(f"step {step}: {message}", style="bold red") for _, step, message in state.alerts]
    if removed:
        total = removed + state.anomaly_count
        lines.insert(0, Text(f"{total} {'anomaly' if total == 1 else 'anomalies'} (details of {removed} removed by "
                             f"retention; {state.anomaly_count} in the remaining records)", style="yellow"))
    return Group(*lines) if lines else Text("none", style="green")


def _expired(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _time(text: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
