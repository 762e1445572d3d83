"""The figure of chosen metrics of one run (``seo-trainlog plot DIR --metrics 'rewards/*,mean_token_accuracy'``):
one panel per metric matched, its train values and, on the same panel, its ``eval_`` counterpart."""

from __future__ import annotations

import fnmatch
import io
import math
import os
from collections.abc import Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .analysis import RunAnalysis
from ..record.format import fmt_epoch
from .metric_stats import DIRECTION_TEXT
from .plots import _line, _mark_anomalies, _panel
from .present import status_text

MAX_PANELS = 24
_STYLES = {"train": ("-", "tab:blue"), "eval": ("o-", "tab:orange")}


class NoMetricMatched(ValueError):
    """A ``--metrics`` pattern matched no metric of the run (the message names it and the metrics logged)."""


def parse_patterns(text: str) -> list[str]:
    """``'rewards/*, mean_token_accuracy'`` -> ``['rewards/*', 'mean_token_accuracy']``.

    Raises:
        ValueError: no pattern in ``text``.
    """
    patterns = [part.strip() for part in text.split(",") if part.strip()]
    if not patterns:
        raise ValueError(f"--metrics {text!r}: give one or more metric names or globs, comma-separated")
    return patterns


def metric_panels(analysis: RunAnalysis, patterns: Sequence[str]) -> list[dict[str, Any]]:
    """The panels for ``patterns`` (:mod:`fnmatch` globs, case-sensitive) in the order matched:
    ``{"title", "direction", "lines": [(label, global_steps, values)]}``. A pattern is matched
    against the train records' metrics (``mean_token_accuracy``), whose panel also holds the
    ``eval_<name>`` values when evaluated, then against the evaluation metrics (``eval_rewards/*``).
    Every panel matched (the figure draws the first :data:`MAX_PANELS`).

    Raises:
        NoMetricMatched: a pattern matched no metric (every pattern is checked).
    """
    train, evals = analysis.train_metrics, analysis.eval_metrics
    train_names, eval_names = train.names(), evals.names()
    chosen: list[str] = []
    unmatched = []
    for pattern in patterns:
        found = [name for name in train_names + eval_names if fnmatch.fnmatchcase(name, pattern)]
        if not found:
            unmatched.append(pattern)
        chosen += [name for name in found if name not in chosen]
    if unmatched:
        logged = ", ".join(train_names + eval_names) or "none"
        raise NoMetricMatched(f"--metrics: {', '.join(map(repr, unmatched))} matched no metric of run "
                              f"{analysis.run_id} (its metrics: {logged})")
    panels: list[dict[str, Any]] = []
    grouped: set[str] = set()
    for name in chosen:
        if name in grouped:
            continue
        if name in train_names:
            lines = [("train", *train.series(name))]
            if f"eval_{name}" in eval_names:
                grouped.add(f"eval_{name}")
                lines.append(("eval", *evals.series(f"eval_{name}")))
            panels.append({"title": name, "direction": train.directions.of(name), "lines": lines})
        else:
            panels.append({"title": name, "direction": evals.directions.of(name),
                           "lines": [("eval", *evals.series(name))]})
    return panels


def build_metrics_figure(analysis: RunAnalysis, patterns: Sequence[str],
                         panels: list[dict[str, Any]] | None = None) -> Figure:
    """One panel per metric of :func:`metric_panels` (``panels`` when given), the first
    :data:`MAX_PANELS` of them (3 columns, 4.7 x 3.4 inches each), against global_step, titled with
    the metric's name, anomalies marked. The run's line above them is on two lines when the figure
    has fewer than 3 columns, so that it fits.

    Raises:
        NoMetricMatched: a pattern matched no metric.
    """
    if panels is None:
        panels = metric_panels(analysis, patterns)
    panels = panels[:MAX_PANELS]
    summary = analysis.summary()
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.7 * columns, 3.4 * rows + 0.6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    state = (f"{status_text(summary['status'])}, global_step {summary['global_step']}, "
             f"epoch {fmt_epoch(summary['epoch'])}")
    figure.suptitle(f"Run {analysis.run_id}" + (": " if columns >= 3 else "\n") + state, fontsize=12,
                    wrap=True)
    grid = figure.subplots(rows, columns, squeeze=False).flat
    anomalies = [a for a in summary["anomalies"] if isinstance(a["global_step"], (int, float))]
    for panel, axes in zip(panels, grid):
        for label, steps, values in panel["lines"]:
            style, color = _STYLES[label]
            _line(axes, steps, values, style, color=color, label=label, markersize=4)
        _panel(axes, panel["title"], DIRECTION_TEXT[panel["direction"]])
        _mark_anomalies(axes, anomalies, label_them=False)
        axes.set_xlabel("global_step")
    for axes in list(grid):
        axes.set_visible(False)  # the empty cells of the last row
    return figure


def save_metrics_figure(analysis: RunAnalysis, patterns: Sequence[str],
                        path: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
    """Write :func:`build_metrics_figure` to ``path`` as PNG; returns ``(drawn, left_out)``: the
    titles of the panels drawn and the metrics matched but left out (beyond :data:`MAX_PANELS`).

    Raises:
        NoMetricMatched: a pattern matched no metric (nothing is written).
        OSError: the file cannot be written.
    """
    panels = metric_panels(analysis, patterns)
    figure = build_metrics_figure(analysis, patterns, panels)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    with open(path, "wb") as out:
        out.write(buffer.getvalue())
    return ([axes.get_title(loc="left") for axes in figure.axes if axes.get_visible()],
            [panel["title"] for panel in panels[MAX_PANELS:]])


def left_out_text(left_out: Sequence[str], drawn: int) -> str:
    """The stderr line of ``plot --metrics`` when metrics were left out, e.g. ``plot --metrics: 26
    metrics matched, the figure shows the first 24; left out: m24, m25. Narrow the globs (or plot the
    rest in a second figure, e.g. --metrics 'm24,m25')``."""
    shown = ", ".join(left_out[:10]) + (f" and {len(left_out) - 10} more" if len(left_out) > 10 else "")
    rest = ",".join(left_out[:MAX_PANELS])
    which = "the rest" if len(left_out) <= MAX_PANELS else f"the next {MAX_PANELS}"
    return (f"plot --metrics: {drawn + len(left_out)} metrics matched, the figure shows the first {drawn} "
            f"(at most {MAX_PANELS} panels); left out: {shown}. Narrow the globs, or plot {which} in another "
            f"figure: --metrics '{rest}'")
