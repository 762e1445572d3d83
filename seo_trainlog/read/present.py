"""A run summary (:meth:`RunAnalysis.summary`) as text: label/value rows and comparison rows, shared
by the terminal tables and the HTML report; and the rich tables built from them."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

from .analysis import NO_SUMMARY, NO_TRAINING
from ..record.format import fmt_epoch

STATUS_TEXT = {NO_SUMMARY: "no summary: still running, or ended without one",
               NO_TRAINING: "no_training: evaluation only, no training"}
COMPARISON_HEADERS = ("run", "status", "started", "steps", "epochs", "final loss", "best eval_loss",
                      "duration", "samples/s", "peak RSS", "errors", "anomalies")


def number(value: Any, digits: int = 4) -> str:
    """``value`` with ``digits`` significant digits (``1.235``, ``0.0001235``); ``n/a`` when unknown."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a" if value is None else str(value)
    return str(value) if isinstance(value, int) else f"{value:.{digits}g}"


def print_warning(message: str) -> None:
    """``seo-trainlog: warning: <message on one line>`` on stderr: how every command reports a line
    skipped, a run skipped, a manifest not used."""
    print(f"seo-trainlog: warning: {' '.join(str(message).split())}", file=sys.stderr)


def plural(count: int, noun: str) -> str:
    """``1 error``, ``2 errors``, ``0 warnings``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def coverage_notice(summary: Mapping[str, Any]) -> str | None:
    """The line saying which steps a run's remaining records cover when older ones are not here
    (``records_cover.complete`` false: retention deleted them, or the run was resumed into this
    directory from another one), prefixed ``WARNING:`` when no manifest gave the run's totals
    after retention; ``None`` for a run whose records are all there."""
    cover = summary.get("records_cover") or {}
    if cover.get("complete", True):
        return None
    first, last = cover.get("first_global_step"), cover.get("last_global_step")
    span = f"records cover global_step {first}-{last} only" if first is not None else \
        "the remaining records hold no train record"
    if summary.get("resumed_here"):
        return (f"{span}: the run was resumed into this log directory; its earlier records are in the "
                "log directory it was first logged to")
    manifest = f"run_manifest_{summary['run_id']}.json"
    if summary.get("manifest_used"):
        partly = f"; {summary['manifest_problem']}" if summary.get("manifest_problem") else ""
        return f"{span}: older records were removed by retention ({manifest} gives the run's totals{partly})"
    missing = f"{manifest} could not be used ({summary['manifest_problem']})" if summary.get("manifest_problem") \
        else f"there is no {manifest}"
    return (f"WARNING: {span}: older records were removed by retention and {missing}: start time, "
            "hyperparameters, best loss and best eval metrics may be incomplete")


def segment_text(segment: Mapping[str, Any]) -> str:
    """One segment of a resumed run: ``started 2026-11-30 12:00:00 at global_step 20, completed, 41.2 s``."""
    started = str(segment["started"])[:19].replace("T", " ") if segment["started"] else "n/a"
    return (f"started {started} at global_step {number(segment['start_global_step'])}, "
            f"{status_text(segment['status'])}, {duration(segment['training_duration_s'])}")


def duration(seconds: Any) -> str:
    """``42.3 s``, ``12 min 5 s``, ``3 h 02 min``; ``n/a`` when unknown."""
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "n/a"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def status_text(status: str) -> str:
    return STATUS_TEXT.get(status, status)


def summary_rows(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(label, value)`` rows of one run, in reading order."""
    rows = [("run", summary["run_id"]), ("status", status_text(summary["status"])),
            ("started", str(summary["started"] or "n/a"))]
    notice = coverage_notice(summary)
    if notice:
        rows.append(("records", notice))
    segments = summary.get("segments") or []
    if len(segments) > 1:
        rows += [(f"segment {segment['segment']}", segment_text(segment)) for segment in segments]
    if summary["training_duration_s"] is not None:
        parts = len(segments)
        rows.append(("duration", duration(summary["training_duration_s"])
                     + (f" ({parts} segments)" if parts > 1 else "")))
    else:
        rows.append(("duration", f"{duration(summary['wall_time_s'])} (first to last record)"))
    max_steps = summary["max_steps"]
    steps = number(summary["global_step"]) + (f" / {max_steps}" if isinstance(max_steps, int) and max_steps > 0 else "")
    rows += [("steps", steps), ("epochs", fmt_epoch(summary["epoch"])),
             ("final loss", number(summary["final_loss"], 6)),
             ("best loss", _at(summary["best_loss"], summary["best_loss_step"]))]
    mean_loss = summary.get("mean_train_loss")
    if mean_loss is not None and summary["final_loss"] is None:
        rows.append(("mean train loss", f"{number(mean_loss, 6)} (Trainer's train_loss, the mean over train(); "
                                        "no train record was logged: logging_steps longer than the run?)"))
    for metric, best in summary["best_eval"].items():
        rows.append((f"best {metric}", _at(best["value"], best["global_step"])))
    rows += metric_rows(summary)
    for prefix, values in summary["last_eval"].items():
        if prefix != "eval":
            pairs = ", ".join(f"{k}={number(v)}" for k, v in values.items() if k != "global_step")
            rows.append((f"{prefix} metrics", f"{pairs} (step {values['global_step']})"))
    if summary["best_metric"] is not None:
        rows.append(("Trainer best_metric", f"{number(summary['best_metric'], 6)} "
                                            f"({summary['best_model_checkpoint'] or 'no checkpoint'})"))
    rows += [
        ("throughput", f"{number(summary['samples_per_second'])} samples/s, "
                       f"{number(summary['steps_per_second'])} steps/s"
                       + (" (Trainer's, over the whole train())" if summary.get("throughput_source") == "trainer"
                          else "")),
        *_token_rows(summary.get("tokens")),
        ("data wait", _unit(summary["data_wait_pct"], "% of step + wait time", 3)),
        ("peak memory", ", ".join([f"RSS {_unit(summary['peak_rss_mb'], ' MiB', 5)}"]
                                  + [f"{key} {_unit(v, ' MiB', 5)}" for key, v in summary["peak_gpu_mem_mb"].items()])),
        ("mean GPU utilisation", _unit(summary["mean_gpu_util_pct"], "%", 3)),
        ("early stopping", {True: "yes", False: "no"}.get(summary["early_stopping_triggered"], "n/a")),
        ("errors / warnings", f"{plural(summary['errors'], 'error')}, {plural(summary['warnings'], 'warning')}"),
        ("anomalies", anomalies_text(summary)),
    ]
    return rows


def metric_rows(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The rows of the eval metrics without a direction (no best: last and range) and of the train
    records' other metrics (``train mean_token_accuracy``: last, range, best with a direction)."""
    from .metric_stats import stats_text

    rows = [(metric, stats_text(entry, number)) for metric, entry in (summary.get("eval_metrics") or {}).items()
            if entry["direction"] is None]
    rows += [(f"train {metric}", stats_text(entry, number))
             for metric, entry in (summary.get("train_metrics") or {}).items()]
    return rows


def _token_rows(tokens: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """``tokens/s`` and ``MFU`` rows when the run counted tokens (``RunAnalysis.token_summary``)."""
    if not tokens:
        return []
    seen, since = tokens["num_input_tokens_seen"], tokens.get("tokens_counted_from_global_step")
    seen_text = ""
    if isinstance(seen, int):
        seen_text = f"; {seen} tokens seen" + (
            f" since global_step {since} (resumed run: the steps before were not counted)" if since else "")
    rows = [("tokens/s", f"{number(tokens['tokens_per_second'])} mean, {number(tokens['last_tokens_per_second'])} "
                         f"last{seen_text}")]
    if tokens["mfu_pct"] is not None or tokens["last_mfu_pct"] is not None:
        rows.append(("MFU", f"{_unit(tokens['mfu_pct'], '%', 3)} mean, {_unit(tokens['last_mfu_pct'], '%', 3)} last"))
    else:
        rows.append(("MFU", "n/a (peak FLOPs unknown: set LogConfig.peak_tflops or SEO_TRAINLOG_PEAK_TFLOPS "
                             "(the variable is read only by a callback without a config))"))
    return rows


def anomalies_text(summary: Mapping[str, Any], most: int = 5) -> str:
    """``none``; ``3: loss_spike at step 7, ... and 1 more``; when the manifest counted anomalies
    whose records retention deleted: ``7 anomalies (details removed by retention; 0 in the remaining
    records)``, or the remaining ones listed then ``(4 more removed by retention with their details)``."""
    found, count = summary["anomalies"], summary["anomaly_count"]
    if not count:
        return "none"
    in_records = min(count, (summary.get("counts_in_records") or {}).get("anomalies", count))
    removed = count - in_records
    if not in_records:
        return (f"{count} {'anomaly' if count == 1 else 'anomalies'} (details removed by retention; "
                "0 in the remaining records)")
    listed = ", ".join(f"{a['kind']} at step {a['global_step']}" for a in found[:most])
    more = in_records - min(most, len(found))
    return (f"{count}: {listed}" + (f" and {more} more" if more else "")
            + (f" ({removed} more removed by retention with their details)" if removed else ""))


def removed_text(summary: Mapping[str, Any], key: str) -> str | None:
    """For ``key`` (``errors``, ``warnings`` or ``anomalies``) counted by the run's manifest beyond
    what the remaining records hold: ``7 of the 10 warnings were in records removed by retention
    (their details are lost); 3 are in the remaining records``; ``None`` when the records hold them all."""
    count = summary["anomaly_count"] if key == "anomalies" else summary[key]
    in_records = (summary.get("counts_in_records") or {}).get(key, count)
    if count <= in_records:
        return None
    removed = count - in_records
    return (f"{removed} of the {count} {key} {'was' if removed == 1 else 'were'} in records removed by retention "
            f"(their details are lost); {in_records} {'is' if in_records == 1 else 'are'} in the remaining records")


def comparison_row(summary: Mapping[str, Any]) -> tuple[str, ...]:
    """One run's cells under :data:`COMPARISON_HEADERS`."""
    best_eval = summary["best_eval"].get("eval_loss")
    started = summary["started"][:19].replace("T", " ") if summary["started"] else "n/a"
    return (summary["run_id"], status_text(summary["status"]), started,
            number(summary["global_step"]), fmt_epoch(summary["epoch"]), number(summary["final_loss"], 6),
            _at(best_eval["value"], best_eval["global_step"]) if best_eval else "n/a",
            duration(summary["training_duration_s"] if summary["training_duration_s"] is not None
                     else summary["wall_time_s"]),
            number(summary["samples_per_second"]), _unit(summary["peak_rss_mb"], " MiB", 5),
            str(summary["errors"]), str(summary["anomaly_count"]))


def run_list_table(summaries: Sequence[Mapping[str, Any]], title: str) -> Table:
    """One line per run, readable at 80 columns: run, status, steps, final loss, best eval_loss,
    duration, errors/warnings (``seo-trainlog summarize --list``; the report has the full table)."""
    table = Table(title=title, title_justify="left", box=None, padding=(0, 1, 0, 0), header_style="bold")
    for header, justify in (("run", "left"), ("status", "left"), ("steps", "right"), ("final\nloss", "right"),
                            ("best\neval_loss", "right"), ("duration", "right"), ("errors/\nwarnings", "right")):
        table.add_column(header, justify=justify, no_wrap=header in ("run", "status", "steps", "duration"))
    for summary in summaries:
        best_eval = summary["best_eval"].get("eval_loss")
        max_steps = summary["max_steps"]
        steps = number(summary["global_step"]) + (f"/{max_steps}" if isinstance(max_steps, int) and max_steps > 0
                                                  else "")
        status = "no summary" if summary["status"] == NO_SUMMARY else str(summary["status"])
        if summary["status"] == NO_TRAINING:
            status = "eval only"
        if not (summary.get("records_cover") or {}).get("complete", True):
            status += "*"
        table.add_row(summary["run_id"], status, steps, number(summary["final_loss"]),
                      number(best_eval["value"]) if best_eval else "n/a",
                      duration(summary["training_duration_s"] if summary["training_duration_s"] is not None
                               else summary["wall_time_s"]),
                      f"{summary['errors']}/{summary['warnings']}")
    return table


def run_list_footnote(summaries: Sequence[Mapping[str, Any]]) -> str | None:
    """The footnote of :func:`run_list_table`'s ``*``, lines under 80 columns; ``None`` without one."""
    if all((s.get("records_cover") or {}).get("complete", True) for s in summaries):
        return None
    return ("* older records are not in this directory (removed by retention, or the run\n"
            "  was resumed from another one): seo-trainlog summarize --run <run> says which")


def summary_table(summary: Mapping[str, Any]) -> Table:
    table = Table(title=f"Run {summary['run_id']}", show_header=False, title_justify="left")
    table.add_column("", style="bold")
    table.add_column("")
    for label, value in summary_rows(summary):
        table.add_row(Text(label), Text(value))
    return table


def anomaly_table(anomalies: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(title="Anomalies", title_justify="left")
    for header in ("global_step", "kind", "source", "message"):
        table.add_column(header)
    for anomaly in anomalies:
        table.add_row(*(Text("" if anomaly[key] is None else str(anomaly[key]))
                        for key in ("global_step", "kind", "source", "message")))
    return table


def comparison_table(summaries: Sequence[Mapping[str, Any]], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for header in COMPARISON_HEADERS:
        table.add_column(header, no_wrap=header == "run")
    for summary in summaries:
        table.add_row(*map(Text, comparison_row(summary)))
    return table


def short_status(status: str) -> str:
    """A run's status in one short word or two (``completed``, ``failed``, ``no summary``, ``eval only``)."""
    return "no summary" if status == NO_SUMMARY else "eval only" if status == NO_TRAINING else str(status)


def text_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], width: int | None = None) -> Table:
    """A rich table of plain-text cells (``seo-trainlog compare``) that loses no character at any
    width: ``run``, ``status`` and ``value`` are never wrapped; a name keeps 24 characters on a line
    and a value 12 when the table still fits ``width`` (the terminal's columns) so, and what does not
    fit folds onto more lines rather than end in an ellipsis."""
    longest = [max([len(header), *(len(row[index]) for row in rows)]) for index, header in enumerate(headers)]
    whole = [header in ("run", "status", "value") for header in headers]
    least = [size if keep else min(size, 24 if index == 0 else 12)
             for index, (size, keep) in enumerate(zip(longest, whole))]
    if width is not None and sum(least) + 3 * len(headers) + 1 > width:
        least = [size if keep else None for size, keep in zip(least, whole)]
    table = Table(title=title, title_justify="left")
    for header, keep, size in zip(headers, whole, least):
        table.add_column(header, no_wrap=keep, min_width=size, overflow="fold")
    for row in rows:
        table.add_row(*map(Text, row))
    return table


def _at(value: Any, step: Any) -> str:
    return "n/a" if value is None else f"{number(value, 6)} at step {step}"


def _unit(value: Any, unit: str, digits: int) -> str:
    return "n/a" if value is None else f"{number(value, digits)}{unit}"


RANK_HEADERS = ("rank", "node", "host", "step s", "data wait", "data s", "pace s", "straggler")


def rank_table(ranks: Sequence[Mapping[str, Any]]) -> Table:
    """The per-rank rows of :meth:`~seo_trainlog.read.analysis.RankAnalysis.summary`: mean step time, data
    wait share, own data time and pace (seconds per optimizer step), and the straggler mark. Fits 80
    columns whole: the numbers and the mark are never cut; a long host name folds onto more lines."""
    table = Table(title="Ranks", title_justify="left")
    for header in RANK_HEADERS:
        table.add_column(header, no_wrap=header != "host", overflow="fold")
    for row in ranks:
        table.add_row(*map(Text, (str(row["rank"]), "n/a" if row["node_rank"] is None else str(row["node_rank"]),
                                  str(row["host"] or "n/a"), number(row["step_time_s"]),
                                  _unit(row["data_wait_pct"], "%", 3), number(row["own_data_s"]),
                                  number(row["pace_s"]), "STRAGGLER" if row["straggler"] else "")))
    return table


def missing_ranks_line(ranks: Sequence[int], world_size: int | None) -> str:
    """``ranks without records: 1, 3 (of world_size 4): ...``: the ranks whose files were not read or
    hold no logging step."""
    return (f"ranks without records: {', '.join(map(str, ranks))} (of world_size {world_size}): no metrics file "
            "with a logging step of theirs in the directories read (not gathered, or the process ended early)")
