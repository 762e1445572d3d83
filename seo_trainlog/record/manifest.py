"""A run's facts outside rotation: ``run_manifest_<stamp>.json``, rewritten atomically.

Retention deletes a long run's oldest files, and with them ``run_start``, the hyperparameters and
the first losses. The manifest keeps what a reader needs to stay right about the whole run: when it
started, its hyperparameters and ``max_steps``, its segments (one per ``train()`` call, resumed
ones included), running totals of the training records (count, first/last step, final and best
loss), the evaluations (count, best value of each ``eval_*`` metric that has a direction
(:mod:`~seo_trainlog._directions`, with ``LogConfig.metric_directions``), last values per prefix), the
error/warning/anomaly counts (``warning``: every WARNING line of the error log, anomalies'
included, as ``seo-trainlog`` counts them) and the last summary.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from .._directions import Directions, better, directions
from .format import iso_time, to_jsonable

MANIFEST_PREFIX = "run_manifest"
# the JSON events whose facts the manifest keeps (``train`` records are noted apart, from their numbers)
MANIFEST_EVENTS = frozenset({"run_start", "hyperparameters", "error", "warning", "anomaly", "summary", "status",
                             "eval"})
SCHEMA_VERSION = 1


def manifest_path(log_dir: Path, run_id: str, tag: str = "") -> Path:
    """``<log_dir>/run_manifest_<run_id>.json``; a node leader's (``tag`` ``node<N>``)
    ``run_manifest_node<N>_<run_id>.json``."""
    return log_dir / f"{MANIFEST_PREFIX}{f'_{tag}' if tag else ''}_{run_id}.json"


def _number(value: Any) -> float | None:
    value = to_jsonable(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


class RunManifest:
    """The manifest of one run, updated in memory by the run's :class:`~seo_trainlog.TrainLogger` (a
    few assignments per record) and written (``write``) by its flusher thread when changed, at each
    segment start and end, and at close. A write goes to a temporary file first and replaces the
    manifest with ``os.replace``, so a reader never sees half a manifest. A failed write is returned
    as the exception (the logger reports it once) and retried at the next write.
    """

    def __init__(self, path: Path, run_id: str, version: str,
                 metric_directions: Directions | None = None) -> None:
        self.path = path
        self.directions = metric_directions or directions()
        self._lock = threading.Lock()
        self._dirty = False
        self.data: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION, "run_id": run_id, "seo_trainlog_version": version,
            "updated": None, "started": None, "hyperparameters": None, "max_steps": None, "status": "running",
            "segments": [],
            "train": {"records": 0, "first_global_step": None, "last_global_step": None, "first_time": None,
                      "last_time": None, "final_loss": None, "best_loss": None, "best_loss_step": None},
            "counts": {"error": 0, "warning": 0, "anomaly": 0},
            "eval": {"records": 0, "best": {}, "last": {}},
            "summary": None,
        }

    @classmethod
    def open(cls, path: Path, run_id: str, version: str,
             metric_directions: Directions | None = None) -> RunManifest:
        """The manifest at ``path`` as written before (a run continued), else a new one;
        ``metric_directions`` decides which eval metrics have a best, and which way (default: the table)."""
        manifest = cls(path, run_id, version, metric_directions)
        try:
            stored = orjson.loads(path.read_bytes())
        except (OSError, ValueError):
            return manifest
        if isinstance(stored, dict) and stored.get("run_id") == run_id:
            for key, value in stored.items():
                if isinstance(manifest.data.get(key), dict) and isinstance(value, dict):
                    manifest.data[key].update(value)
                elif key in manifest.data and key != "seo_trainlog_version":
                    manifest.data[key] = value
        return manifest

    @property
    def segment(self) -> int:
        """The number of the current segment (1 for a run never resumed; 0 before any)."""
        return len(self.data["segments"])

    def note(self, event: str, values: dict[str, Any], global_step: Any, at: datetime | None) -> None:
        """Take one JSON event's facts (called for every metrics record)."""
        with self._lock:
            data = self.data
            if event == "train":
                self._note_train(values.get("loss"), global_step, at)
                return
            if event == "run_start":
                data["started"] = iso_time(at)
            elif event == "hyperparameters":
                hyperparameters = values.get("hyperparameters")
                data["hyperparameters"] = to_jsonable(hyperparameters)
                run = hyperparameters.get("run") if isinstance(hyperparameters, dict) else None
                if isinstance(run, dict) and run.get("max_steps") is not None:
                    data["max_steps"] = to_jsonable(run.get("max_steps"))
            elif event in ("error", "warning", "anomaly"):
                data["counts"][event] += 1
                if event == "anomaly" and values.get("kind") != "non_finite":
                    data["counts"]["warning"] += 1  # its WARNING line (a non-finite value has a warning record)
            elif event == "summary":
                data["summary"] = to_jsonable(dict(values, time=iso_time(at), global_step=global_step))
                data["status"] = values.get("status")
                if data["segments"]:
                    data["segments"][-1].update(
                        status=values.get("status"), ended=iso_time(at), end_global_step=to_jsonable(global_step),
                        training_duration_s=_number(values.get("training_duration_s")))
            elif event == "eval":
                self._note_eval(values, global_step)
            elif event == "status":
                data["status"] = values.get("status", data["status"])
                if data["segments"]:
                    data["segments"][-1]["status"] = data["status"]
            else:
                return
            self._dirty = True

    def _note_train(self, loss: Any, global_step: Any, at: datetime | None) -> None:
        train = self.data["train"]
        train["records"] += 1
        step = to_jsonable(global_step)
        when = iso_time(at)
        if train["first_global_step"] is None:
            train["first_global_step"], train["first_time"] = step, when
        train["last_global_step"], train["last_time"] = step, when
        loss = _number(loss)
        if loss is not None:
            train["final_loss"] = loss
            if train["best_loss"] is None or loss < train["best_loss"]:
                train["best_loss"], train["best_loss_step"] = loss, step
        self._dirty = True

    def _note_eval(self, record: dict[str, Any], global_step: Any) -> None:
        """Evaluation facts as ``seo-trainlog`` computes them (``_analysis.eval_metrics``): the last
        values per metric prefix, and for ``eval`` the count and the best value of each metric."""
        from ..read.analysis import eval_metrics

        section = self.data["eval"]
        prefix, metrics = eval_metrics(record)
        step = to_jsonable(global_step)
        section["last"][prefix] = to_jsonable({"global_step": step, **metrics})
        if prefix != "eval":
            return
        section["records"] += 1
        for key, value in metrics.items():
            value, direction = _number(value), self.directions.of(key, prefix)
            if value is None or direction is None:
                continue
            best = section["best"].get(key)
            if best is None or better(direction, value, best["value"]):
                section["best"][key] = {"value": value, "global_step": step}

    def start_segment(self, start_global_step: int, at: datetime | None,
                      resumed_from_checkpoint: str | None = None) -> int:
        """A ``train()`` call begins (the first, or a resumed one): returns its segment number."""
        with self._lock:
            segments = self.data["segments"]
            for earlier in segments:  # one that never said how it ended did not end well
                if earlier.get("status") == "running":
                    earlier["status"] = "abandoned"
            segments.append({"segment": len(segments) + 1, "started": iso_time(at),
                             "start_global_step": start_global_step, "status": "running", "ended": None,
                             "end_global_step": None, "training_duration_s": None,
                             "resumed_from_checkpoint": resumed_from_checkpoint})
            self.data["status"] = "running"
            self._dirty = True
            return len(segments)

    def end_open_segment(self, status: str) -> None:
        """The logger that started the last segment closes without its summary: say how it ended."""
        with self._lock:
            segments = self.data["segments"]
            if segments and segments[-1].get("status") == "running":
                segments[-1]["status"] = status
                self.data["status"] = status
                self._dirty = True

    def write(self, force: bool = False) -> OSError | None:
        """Replace the manifest file with the current facts, when they changed (or ``force``)."""
        with self._lock:
            if not (self._dirty or force):
                return None
            self.data["updated"] = iso_time(None)
            payload = orjson.dumps(self.data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS,
                                   default=str)
            self._dirty = False
        try:
            handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
            try:
                with os.fdopen(handle, "wb") as file:
                    file.write(payload)
                os.replace(temporary, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise
        except OSError as error:
            self._dirty = True
            return error
        return None

