"""One run as a single self-contained HTML file: inline CSS, the figure as a base64 PNG, no script and
nothing fetched from the network. Every value from the logs is HTML-escaped."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from html import escape
from typing import Any

from . import present as _present
from .analysis import MAX_ANOMALIES, MAX_KEPT, RunAnalysis
from ..record.format import flatten, fmt_value
from .plots import figure_png

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } tr.current { background: #fff6d6; }
pre { background: #f6f6f6; padding: 0.6rem; overflow-x: auto; font-size: 0.8rem; }
img { max-width: 100%; border: 1px solid #ddd; }
.status-completed { color: #17752b; font-weight: bold; } .status-other { color: #b00020; font-weight: bold; }
"""


def render_report(analysis: RunAnalysis, all_runs: Sequence[RunAnalysis] = ()) -> str:
    """The HTML document of ``analysis``: summary, figure, anomalies, errors with tracebacks, warnings,
    hyperparameters (as logged: already masked), and a comparison of ``all_runs`` when there are two
    or more."""
    summary = analysis.summary()
    status_class = "status-completed" if summary["status"] == "completed" else "status-other"
    parts = [f"<h1>Training run {escape(analysis.run_id)}: <span class=\"{status_class}\">"
             f"{escape(_present.status_text(summary['status']))}</span></h1>",
             f"<p>Report written {escape(datetime.now().astimezone().isoformat(timespec='seconds'))} by "
             f"seo-trainlog from {_present.plural(analysis.records, 'JSON metrics record')}.</p>",
             "<h2>Summary</h2>", _table(None, _present.summary_rows(summary)),
             "<h2>Plots</h2>",
             f"<img alt=\"loss, learning rate, throughput and memory of run {escape(analysis.run_id)}\" "
             f"src=\"data:image/png;base64,{base64.b64encode(figure_png(analysis)).decode('ascii')}\">"]
    if len(all_runs) > 1:
        rows = [_present.comparison_row(run.summary()) for run in all_runs]
        current = {index for index, run in enumerate(all_runs) if run.run_id == analysis.run_id}
        parts += [f"<h2>All {len(all_runs)} runs in this directory</h2>",
                  _table(_present.COMPARISON_HEADERS, rows, current)]
        parts += _comparison(all_runs)
    parts += [f"<h2>Anomalies ({summary['anomaly_count']})</h2>",
              _table(("global_step", "kind", "source", "message"),
                     [(a["global_step"], a["kind"], a["source"], a["message"]) for a in summary["anomalies"]])
              if summary["anomalies"] else "" if summary["anomaly_count"] else "<p>None found.</p>"]
    parts += _not_listed(summary, "anomalies", len(summary["anomalies"]))
    parts += [f"<h2>Errors ({summary['errors']})</h2>", *map(_error, analysis.errors)]
    if not summary["errors"]:
        parts.append("<p>None logged.</p>")
    parts += _not_listed(summary, "errors", len(analysis.errors))
    parts += [f"<h2>Warnings ({summary['warnings']})</h2>",
              "<ul>" + "".join(f"<li>{escape(text)}</li>" for text in analysis.warnings) + "</ul>"
              if analysis.warnings else "" if summary["warnings"] else "<p>None logged.</p>"]
    parts += _not_listed(summary, "warnings", len(analysis.warnings))
    hyperparameters = flatten(analysis.hyperparameters) if isinstance(analysis.hyperparameters, dict) else {}
    parts += [f"<h2>Hyperparameters ({len(hyperparameters)})</h2>",
              _table(("name", "value"), [(key, fmt_value(value, "g")) for key, value in hyperparameters.items()])
              if hyperparameters else "<p>None logged.</p>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>seo_trainlog run {escape(analysis.run_id)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def write_report(path: str | os.PathLike[str], analysis: RunAnalysis, all_runs: Sequence[RunAnalysis] = ()) -> None:
    """Write :func:`render_report` to ``path`` (UTF-8).

    Raises:
        OSError: the file cannot be written.
    """
    text = render_report(analysis, all_runs)
    with open(path, "w", encoding="utf-8") as out:
        out.write(text)


def _table(headers: Sequence[str] | None, rows: Iterable[Sequence[Any]], highlight: set[int] = frozenset()) -> str:
    """A table of escaped cells; without ``headers`` the first cell of each row is its header."""
    lines = ["<table>"]
    if headers:
        lines.append("<tr>" + "".join(f"<th>{escape(header)}</th>" for header in headers) + "</tr>")
    for index, row in enumerate(rows):
        first_tag = "td" if headers else "th"
        cells = [f"<{first_tag}>{escape(str(row[0]))}</{first_tag}>"] + [f"<td>{escape(str(cell))}</td>"
                                                                         for cell in row[1:]]
        attributes = ' class="current"' if index in highlight else ""
        lines.append(f"<tr{attributes}>{''.join(cells)}</tr>")
    return "".join(lines) + "</table>"


def _comparison(all_runs: Sequence[RunAnalysis]) -> list[str]:
    """The hyperparameters that differ and the metrics' final/best values of ``all_runs``, the
    tables of ``seo-trainlog compare`` (:func:`~seo_trainlog.read.compare.tables`)."""
    from .compare import compare, tables

    parts = []
    for title, headers, rows in tables(compare(all_runs), _present.number, _present.duration,
                                       _present.status_text)[1:]:
        parts += [f"<h3>{escape(title)}</h3>", _table(headers, rows) if rows else "<p>None.</p>"]
    return parts


def _not_listed(summary: dict[str, Any], key: str, listed: int) -> list[str]:
    """Why fewer ``key`` (``errors``, ``warnings``, ``anomalies``) are listed than counted: records
    removed by retention (counted by the run's manifest), and beyond the first ones kept."""
    count = summary["anomaly_count"] if key == "anomalies" else summary[key]
    in_records = min(count, summary["counts_in_records"][key])
    parts = []
    removed = _present.removed_text(summary, key)
    if removed:
        parts.append(f"<p>{escape(removed)}.</p>")
    if in_records > listed:
        kept = MAX_ANOMALIES if key == "anomalies" else MAX_KEPT
        parts.append(f"<p>{in_records - listed} more in the records not listed (the first {kept} are kept).</p>")
    return parts


def _error(record: dict[str, Any]) -> str:
    title = f"{record.get('error_type', 'Error')}: {record.get('message', '')}"
    facts = [("global_step", record.get("global_step")), ("epoch", record.get("epoch")),
             ("operation", record.get("operation")), ("context", record.get("context")), ("time", record.get("time"))]
    trace = record.get("traceback")
    return (f"<h3>{escape(str(title))}</h3>" + _table(None, [(k, v) for k, v in facts if v not in (None, "")])
            + (f"<pre>{escape(str(trace))}</pre>" if trace else ""))
