"""The figure of one run (matplotlib, Agg backend, no pyplot state): loss and eval loss, learning
rate, throughput, memory and GPU against global_step, anomalies marked on every panel."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .analysis import RunAnalysis
from ..record.format import fmt_epoch
from .present import coverage_notice, status_text

ANOMALY_COLOR = "tab:red"
MAX_LABELLED_ANOMALIES = 12


def smooth(values: Sequence[float], span: int | None = None) -> list[float]:
    """Exponential moving average with ``alpha = 2 / (span + 1)``; ``span`` defaults to a twentieth of
    the points (at least 2; 1, no smoothing, below 10 points), so a line of any length is smoothed alike."""
    span = span or (max(2, len(values) // 20) if len(values) >= 10 else 1)
    alpha, out, level = 2 / (span + 1), [], None
    for value in values:
        level = value if level is None else level + alpha * (value - level)
        out.append(level)
    return out


def build_figure(analysis: RunAnalysis) -> Figure:
    """A 2x2 figure, 14 x 9 inches: loss (raw, smoothed, eval loss), learning rate, throughput
    (samples/s, raw and smoothed), memory (RSS and GPU memory in MiB, GPU utilisation in percent);
    with token counts in the records a third row (14 x 13 inches): tokens/s (raw and smoothed) and
    MFU (percent)."""
    summary = analysis.summary()
    tokens = bool(analysis.tokens.rows())  # a third row: tokens/s and MFU
    figure = Figure(figsize=(14, 13 if tokens else 9), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    notice = coverage_notice(summary)  # the plotted records are not the whole run: say which steps
    why = "earlier records in another log directory" if summary["resumed_here"] else "older records removed by retention"
    figure.suptitle(f"Run {analysis.run_id}: {status_text(summary['status'])}, global_step "
                    f"{summary['global_step']}, epoch {fmt_epoch(summary['epoch'])}"
                    + (f"\n{_first_clause(notice)} ({why})" if notice else ""),
                    fontsize=13)
    panels = list(figure.subplots(3 if tokens else 2, 2, sharex=True).flat)
    loss_ax, lr_ax, speed_ax, memory_ax = panels[:4]
    anomalies = [a for a in summary["anomalies"] if isinstance(a["global_step"], (int, float))]

    loss_steps, losses = analysis.train.column("loss")
    _raw_and_smoothed(loss_ax, loss_steps, losses, "train loss", "tab:blue")
    eval_steps, eval_losses = analysis.evals.column("eval_loss")
    _line(loss_ax, eval_steps, eval_losses, "o-", color="tab:orange", label="eval loss", markersize=4)
    every_loss = losses + eval_losses
    if every_loss and min(every_loss) > 0 and max(every_loss) / min(every_loss) > 50:
        loss_ax.set_yscale("log")  # a loss falling by orders of magnitude: keep the late part readable
    _panel(loss_ax, "Loss", "loss")

    _line(lr_ax, *analysis.train.column("learning_rate"), color="tab:green", label="learning rate")
    _panel(lr_ax, "Learning rate", "learning_rate")
    _raw_and_smoothed(speed_ax, *analysis.train.column("samples_per_second"), "samples/s", "tab:purple")
    _panel(speed_ax, "Throughput", "samples_per_second")

    _line(memory_ax, *analysis.train.column("rss_mb"), color="tab:brown", label="process RSS (MiB)")
    _line(memory_ax, *analysis.train.column("gpu_mem_used_mb"), color="tab:gray", label="GPU memory used (MiB)")
    util_steps, utils = analysis.train.column("gpu_util_pct")
    if util_steps:
        util_ax = memory_ax.twinx()
        util_ax.plot(util_steps, utils, color="tab:cyan", alpha=0.7, label="GPU utilisation (%)")
        util_ax.set_ylabel("GPU utilisation (%)")
        util_ax.set_ylim(0, 105)
        util_ax.legend(loc="lower right", fontsize=8)
    _panel(memory_ax, "Memory and GPU", "MiB")

    if tokens:
        _raw_and_smoothed(panels[4], *analysis.tokens.column("tokens_per_second"), "tokens/s", "tab:red")
        _panel(panels[4], "Tokens per second", "tokens_per_second")
        _line(panels[5], *analysis.tokens.column("mfu_pct"), color="tab:olive", label="MFU (%)")
        _panel(panels[5], "Model FLOPs utilisation", "mfu_pct")
    for axes in panels:
        _mark_anomalies(axes, anomalies, label_them=axes is loss_ax)
    for axes in panels[-2:]:
        axes.set_xlabel("global_step")
    return figure


def figure_png(analysis: RunAnalysis) -> bytes:
    """:func:`build_figure` as PNG bytes."""
    buffer = io.BytesIO()
    build_figure(analysis).savefig(buffer, format="png")
    return buffer.getvalue()


def save_figure(analysis: RunAnalysis, path: str | os.PathLike[str]) -> None:
    """Write :func:`build_figure` to ``path`` as PNG.

    Raises:
        OSError: the file cannot be written.
    """
    with open(path, "wb") as out:
        out.write(figure_png(analysis))


def _line(axes: Axes, steps: list, values: list, *style: str, **options: object) -> None:
    if steps:
        axes.plot(steps, values, *style, **options)


def _raw_and_smoothed(axes: Axes, steps: list, values: list, label: str, color: str) -> None:
    _line(axes, steps, values, color=color, alpha=0.3, linewidth=0.8, label=f"{label} (raw)")
    _line(axes, steps, smooth(values), color=color, linewidth=1.8, label=f"{label} (smoothed)")


def _panel(axes: Axes, title: str, ylabel: str) -> None:
    axes.set_title(title, loc="left", fontsize=11)
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    if axes.lines:
        axes.legend(loc="upper right", fontsize=8)
    else:
        axes.text(0.5, 0.5, "no values logged", transform=axes.transAxes, ha="center", va="center", color="gray")


def _mark_anomalies(axes: Axes, anomalies: list[dict], label_them: bool) -> None:
    for index, anomaly in enumerate(anomalies):
        axes.axvline(anomaly["global_step"], color=ANOMALY_COLOR, linestyle="--", linewidth=1, alpha=0.7,
                     label="anomaly" if index == 0 and label_them else None)
        if label_them and index < MAX_LABELLED_ANOMALIES:
            axes.annotate(anomaly["kind"], (anomaly["global_step"], 0.02), xycoords=("data", "axes fraction"),
                          rotation=90, va="bottom", ha="right", fontsize=7, color=ANOMALY_COLOR)
    if anomalies and label_them:
        axes.legend(loc="upper right", fontsize=8)


def _first_clause(notice: str) -> str:
    """``WARNING: records cover global_step 16-60 only`` of a coverage notice (up to its next colon)."""
    prefix = "WARNING: " if notice.startswith("WARNING: ") else ""
    return prefix + notice.removeprefix(prefix).split(": ")[0]
