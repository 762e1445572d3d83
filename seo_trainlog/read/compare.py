"""Several runs side by side (``seo-trainlog compare``, the report's comparison): the
hyperparameters that differ, the final and best value of each metric with its direction,
throughput, duration, status and anomalies; and the ``--fail-if`` regression gate."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .analysis import RunAnalysis
from ..record.format import flatten

RUN_ID = re.compile(r"\d{8}_\d{6}(?:_\d+)?\Z")  # a run stamp: YYYYMMDD_HHMMSS[_n]


class FinalValues:
    """The last value each key of a run's ``train`` and ``eval`` records was logged with, fed the
    records in order (:meth:`add`): a ``null`` (the writer's NaN or infinity) included, where the
    run's summary statistics skip it. :func:`compare` takes a run's final value from here, so that a
    loss that ended as NaN is not reported as its last finite value."""

    def __init__(self) -> None:
        self.train: dict[str, Any] = {}
        self.eval: dict[str, Any] = {}

    def add(self, record: Mapping[str, Any]) -> None:
        event = record.get("event")
        if event == "train":
            self.train.update(record)
        elif event == "eval":
            self.eval.update(record)

    def tee(self, records: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """``records``, each also :meth:`add`-ed here."""
        for record in records:
            self.add(record)
            yield record


def compare(analyses: Sequence[RunAnalysis], log_dirs: Sequence[str] | None = None,
            finals: Sequence[FinalValues | None] | None = None) -> dict[str, Any]:
    """The comparison of ``analyses`` (in that order; the first is the baseline of the gate, the
    last its candidate). ``finals`` (one per run, from the same records; default: each analysis's
    ``final_values``): the last logged values, NaN included; without them a metric's final value is
    its last finite one.

    ``runs``: per run ``{"run_id", "log_dir", "status", "started", "global_step", "epoch",
    "duration_s"`` (training, else first to last record), ``"samples_per_second", "steps_per_second",
    "tokens_per_second", "mfu_pct"`` (over the run, ``None`` without token counts or a known peak),
    ``"errors", "warnings", "anomaly_count"}``; ``differences``: ``{dotted hyperparameter name: [value
    per run]}`` for the names whose values differ (``None`` where a run lacks it or logged ``None``), e.g.
    ``training_args.learning_rate``; ``metrics``: ``{name: {"direction": "min"|"max"|None,
    "final": [value per run], "best": [value per run]}}`` (``best`` only with a direction) for the
    training ``loss``, the ``eval_*`` metrics, the train records' other metrics and the last values
    of other prefixes (``test_*``: no best). ``None`` where a run did not log the metric; NaN (``null``
    in JSON) where its last logged value was not finite, and then the entry also has
    ``"final_non_finite": [bool per run]``.
    """
    summaries = [analysis.summary() for analysis in analyses]
    dirs = list(log_dirs) if log_dirs is not None else [None] * len(analyses)
    runs = [{"run_id": s["run_id"], "log_dir": directory, "status": s["status"], "started": s["started"],
             "global_step": s["global_step"], "epoch": s["epoch"],
             "duration_s": s["training_duration_s"] if s["training_duration_s"] is not None else s["wall_time_s"],
             "samples_per_second": s["samples_per_second"], "steps_per_second": s["steps_per_second"],
             "tokens_per_second": (s.get("tokens") or {}).get("tokens_per_second"),
             "mfu_pct": (s.get("tokens") or {}).get("mfu_pct"),
             "errors": s["errors"], "warnings": s["warnings"], "anomaly_count": s["anomaly_count"]}
            for s, directory in zip(summaries, dirs)]
    return {"runs": runs, "differences": differences([a.hyperparameters for a in analyses]),
            "metrics": _metrics(analyses, summaries, finals or [a.final_values for a in analyses])}


def differences(hyperparameters: Sequence[Mapping[str, Any] | None]) -> dict[str, list[Any]]:
    """``{dotted name: [value per run]}`` of the names whose values are not the same in every run
    (a run without the name, or without hyperparameters, has ``None``: the same as a ``None``
    logged), in first-seen order."""
    flat = [flatten(h) if isinstance(h, Mapping) else {} for h in hyperparameters]
    names: dict[str, None] = {}
    for values in flat:
        names.update(dict.fromkeys(values))
    out = {}
    for name in names:
        column = [values.get(name) for values in flat]
        if any(value != column[0] or type(value) is not type(column[0]) for value in column[1:]):
            out[name] = column
    return out


def _metrics(analyses: Sequence[RunAnalysis], summaries: Sequence[Mapping[str, Any]],
             finals: Sequence[FinalValues | None]) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    count = len(analyses)

    def entry(name: str, direction: Any) -> dict[str, Any]:
        if name not in table:
            table[name] = {"direction": direction, "final": [None] * count}
            if direction is not None:
                table[name]["best"] = [None] * count
        return table[name]

    for index, (analysis, summary) in enumerate(zip(analyses, summaries)):
        if summary["final_loss"] is not None or summary["best_loss"] is not None:
            loss = entry("loss", "min")
            loss["final"][index], loss["best"][index] = summary["final_loss"], summary["best_loss"]
        for section in ("eval_metrics", "train_metrics"):
            for name, stats in summary[section].items():
                row = entry(name, stats["direction"])
                row["final"][index] = stats["last"]
                if "best" in row and "best" in stats:
                    row["best"][index] = stats["best"]["value"]
        for name, best in summary["best_eval"].items():  # from the manifest when records were deleted
            row = entry(name, analysis.directions.of(name))
            if "best" in row and row["best"][index] is None:
                row["best"][index] = best["value"]
        for prefix, values in summary["last_eval"].items():  # other prefixes; eval's from the manifest
            for name, value in values.items():
                if name != "global_step" and _finite(value):
                    row = entry(name, analysis.directions.of(name, prefix))
                    if row["final"][index] is None:
                        row["final"][index] = value
        last = finals[index]
        if last is not None:  # the last value logged, when it was not finite (null in the file)
            for name, row in table.items():
                logged = last.eval if name in last.eval else last.train  # eval names have their prefix
                if name in logged and not _finite(logged[name]) and not isinstance(logged[name], (str, bool)):
                    row["final"][index] = math.nan
                    row.setdefault("final_non_finite", [False] * count)[index] = True
    return table


@dataclass(frozen=True)
class Condition:
    """One ``--fail-if`` condition: ``metric`` (``eval_loss``), ``above`` (``>+N``: fails when the
    candidate's value rose by more than ``threshold``; else ``<-N``: fell by more), ``threshold``
    (signed: >= 0 for ``>``, <= 0 for ``<``; in the metric's units, or in percent of the baseline's
    value when ``relative``)."""

    text: str
    metric: str
    above: bool
    threshold: float
    relative: bool


_NUMBER = r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_CONDITION = re.compile(rf"\s*(?P<metric>[^<>=!\s]+)\s*(?:(?P<rise>>\s*\+)|(?P<fall><\s*-))\s*(?P<value>{_NUMBER})"
                        r"\s*(?P<pct>%)?\s*\Z")
GRAMMAR = ("METRIC>+N (fails when the candidate's value rose by more than N), METRIC<-N (fell by more than N), "
           "N a number, with % for percent of the baseline's value: e.g. 'eval_loss>+2%', 'eval_accuracy<-1%', "
           "'loss>+0.05'")


def parse_conditions(texts: str | Sequence[str]) -> list[Condition]:
    """``'eval_loss>+2%,eval_accuracy<-1%,loss>+0.05'`` (or several such texts, one per
    ``--fail-if``) -> every condition, in order. The sign is part of the syntax: ``>`` with ``+``
    (a rise), ``<`` with ``-`` (a fall); ``eval_loss<+2%``, ``eval_loss>-2%`` or an unsigned
    ``eval_loss>2%`` would read the other way round than they look, so they are refused.

    Raises:
        ValueError: a condition that does not read ``METRIC>+N[%]`` or ``METRIC<-N[%]`` (the message
            shows the accepted forms), an empty one between commas (``'eval_loss>+2%,'``), or no
            condition at all.
    """
    conditions = []
    for text in [texts] if isinstance(texts, str) else texts:
        parts = text.split(",")
        if text.strip() and not all(part.strip() for part in parts):
            raise ValueError(f"--fail-if {text!r}: an empty condition between commas; accepted: {GRAMMAR}")
        for part in parts:
            if not part.strip():
                continue
            match = _CONDITION.match(part)
            if match is None:
                raise ValueError(f"--fail-if {part.strip()!r}: not a condition; accepted: {GRAMMAR}")
            value = float(match["value"])
            conditions.append(Condition(part.strip(), match["metric"], match["rise"] is not None,
                                        value if match["rise"] else -value, match["pct"] is not None))
    if not conditions:
        raise ValueError(f"--fail-if {', '.join(map(repr, [texts] if isinstance(texts, str) else texts))}: "
                         f"no condition given; accepted: {GRAMMAR}")
    return conditions


def direction_warnings(result: Mapping[str, Any], conditions: Sequence[Condition]) -> list[str]:
    """One line per condition that watches the way a metric improves (``eval_accuracy>+1%`` on a
    higher-is-better metric, ``eval_loss<-1%`` on a lower-is-better one): legal, but likely meant
    the other way."""
    out = []
    for condition in conditions:
        direction = (result["metrics"].get(condition.metric) or {}).get("direction")
        if (direction, condition.above) in (("max", True), ("min", False)):
            better = "higher" if direction == "max" else "lower"
            meant = f"{condition.metric}<-N" if direction == "max" else f"{condition.metric}>+N"
            out.append(f"--fail-if {condition.text!r}: {condition.metric} is {better}-is-better, so this fails "
                       f"when it improves (a regression reads {meant!r})")
    return out


COMPLETED = "completed"


def check(result: Mapping[str, Any], conditions: Sequence[Condition],
          allow_incomplete: bool = False) -> list[dict[str, Any]]:
    """Each condition on the final values of the first (baseline) and the last (candidate) run of
    ``result`` (:func:`compare`): ``{"condition", "metric", "first", "last", "change", "change_pct",
    "failed"}``; ``change`` is ``last - first``, ``change_pct`` that in percent of ``|first|``
    (``None`` when ``first`` is 0). A condition fails when the change (relative for ``%``
    thresholds) is above the threshold for ``>``, below it for ``<``, and when the candidate's final
    value is not finite (NaN: ``change`` is then NaN). Before them, when the candidate's status is
    not ``completed`` (``failed``, ``no_summary``...): ``{"condition": "status", "metric": "status",
    "first": baseline status, "last": candidate status, "change": None, "change_pct": None,
    "failed": not allow_incomplete}``.

    Raises:
        ValueError: fewer than two runs; a metric that the baseline or the candidate did not log
            (the message names the run and the metrics there are); a baseline value that is not
            finite; a relative threshold on a baseline value of 0.
    """
    runs = result["runs"]
    if len(runs) < 2:
        raise ValueError(f"--fail-if needs two runs or more to compare, got {len(runs)}")
    outcomes = []
    if runs[-1]["status"] != COMPLETED:
        outcomes.append({"condition": "status", "metric": "status", "first": runs[0]["status"],
                         "last": runs[-1]["status"], "change": None, "change_pct": None,
                         "failed": not allow_incomplete})
    for condition in conditions:
        row = result["metrics"].get(condition.metric)
        values = row["final"] if row else [None] * len(runs)
        for index in (0, -1):
            if values[index] is None:
                logged = sorted(name for name, entry in result["metrics"].items() if _finite(entry["final"][index]))
                raise ValueError(f"--fail-if {condition.text!r}: run {runs[index]['run_id']} has no "
                                 f"{condition.metric} (its metrics: {', '.join(logged) or 'none'})")
        first, last = values[0], values[-1]
        if not _finite(first):
            raise ValueError(f"--fail-if {condition.text!r}: the baseline run {runs[0]['run_id']} ended with a "
                             f"{condition.metric} that is not a finite number ({first}): nothing to compare with")
        change = last - first
        change_pct = 100 * change / abs(first) if first else None
        if condition.relative and change_pct is None:
            raise ValueError(f"--fail-if {condition.text!r}: {condition.metric} is 0 in run {runs[0]['run_id']}: "
                             "a change in percent of it is undefined; give an absolute threshold")
        measured = change_pct if condition.relative else change
        failed = not math.isfinite(change) or (measured > condition.threshold if condition.above
                                               else measured < condition.threshold)
        outcomes.append({"condition": condition.text, "metric": condition.metric, "first": first, "last": last,
                         "change": change, "change_pct": change_pct, "failed": failed})
    return outcomes


def outcome_text(outcome: Mapping[str, Any], first_run: str, last_run: str) -> str:
    """``eval_loss: 0.5 (20261201_120000) -> 0.53 (20261202_120000), +0.03 (+6%): FAILS 'eval_loss>+2%'``;
    ``eval_loss: 0.5 (...) -> nan (...), not finite: FAILS ...``; ``status: completed (...) -> failed
    (...), not completed: FAILS (--allow-incomplete to compare it anyway)``."""
    verdict = "FAILS" if outcome["failed"] else "passes"
    if outcome["metric"] == "status" and outcome["condition"] == "status":
        advice = "--allow-incomplete to compare it anyway" if outcome["failed"] else "--allow-incomplete"
        return (f"status: {outcome['first']} ({first_run}) -> {outcome['last']} ({last_run}), the candidate did not "
                f"complete: {verdict} ({advice})")
    if not _finite(outcome["last"]):
        return (f"{outcome['metric']}: {outcome['first']:.6g} ({first_run}) -> nan ({last_run}), not finite: "
                f"{verdict} {outcome['condition']!r}")
    pct = f" ({outcome['change_pct']:+.4g}%)" if outcome["change_pct"] is not None else ""
    return (f"{outcome['metric']}: {outcome['first']:.6g} ({first_run}) -> {outcome['last']:.6g} ({last_run}), "
            f"{outcome['change']:+.4g}{pct}: {verdict} {outcome['condition']!r}")


DIRECTION_MARK = {"min": "best (lower)", "max": "best (higher)"}


def run_labels(result: Mapping[str, Any]) -> list[str]:
    """The run ids, with the log directory when two runs share an id."""
    ids = [run["run_id"] for run in result["runs"]]
    return [f"{run['run_id']} ({run['log_dir']})" if ids.count(run["run_id"]) > 1 else run["run_id"]
            for run in result["runs"]]


def letters(count: int) -> list[str]:
    """Short column labels of ``count`` runs: ``A`` ... ``Z``, then ``AA``, ``AB`` ..."""
    out = []
    for index in range(count):
        label, index = "", index + 1
        while index:
            index, rest = divmod(index - 1, 26)
            label = chr(ord("A") + rest) + label
        out.append(label)
    return out


def legend(result: Mapping[str, Any]) -> list[str]:
    """``A = 20261201_120000 (logs)`` per run, then which run is the baseline and which the
    candidate of ``--fail-if``: the lines that name the short labels of :func:`tables`."""
    runs = result["runs"]
    labels = letters(len(runs))
    lines = [f"{label} = {run['run_id']}" + (f" ({run['log_dir']})" if run["log_dir"] is not None else "")
             for label, run in zip(labels, runs)]
    if len(runs) > 1:
        lines.append(f"baseline {labels[0]}, candidate {labels[-1]} (--fail-if compares {labels[-1]} with "
                     f"{labels[0]})")
    return lines


def tables(result: Mapping[str, Any], number, duration, status_text,
           labels: Sequence[str] | None = None) -> list[tuple[str, list[str], list[list[str]]]]:
    """``(title, headers, rows)`` of the comparison as text, shared by the terminal and the report:
    runs, hyperparameter differences, metrics (``final`` and, with a direction, ``best``).
    ``number``, ``duration``, ``status_text`` format cells (:mod:`~seo_trainlog.read.present`);
    ``labels`` name the runs (default :func:`run_labels`; the terminal gives :func:`letters`)."""
    labels = list(labels) if labels is not None else run_labels(result)
    # tokens/s and MFU only when some run has them (no empty columns in an 80-column table)
    optional = [(key, header, digits) for key, header, digits in (("tokens_per_second", "tokens/s", 4),
                                                                  ("mfu_pct", "MFU %", 3))
                if any(run[key] is not None for run in result["runs"])]
    runs = [[label, status_text(run["status"]), number(run["global_step"]), duration(run["duration_s"]),
             number(run["samples_per_second"]), *(number(run[key], digits) for key, _, digits in optional),
             str(run["errors"]), str(run["anomaly_count"])]
            for label, run in zip(labels, result["runs"])]
    out = [("Runs", ["run", "status", "steps", "duration", "samples/s", *(header for _, header, _ in optional),
                     "errors", "anomalies"], runs)]
    differing = [[name, *(_value(value, number) for value in values)]
                 for name, values in result["differences"].items()]
    out.append(("Hyperparameters that differ", ["hyperparameter", *labels], differing))
    rows = []
    for name, entry in result["metrics"].items():
        for kind in ("final", "best"):
            if kind in entry:
                label = DIRECTION_MARK[entry["direction"]] if kind == "best" else \
                    "final" if entry["direction"] else "final (no best)"
                rows.append([name if kind == "final" else "", label, *(number(value) for value in entry[kind])])
    out.append(("Metrics", ["metric", "value", *labels], rows))
    return out


def _value(value: Any, number) -> str:
    if isinstance(value, float):
        return number(value, 6)
    return "n/a" if value is None else str(value)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
