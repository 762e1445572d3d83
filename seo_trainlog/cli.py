"""``seo-trainlog``: read a log directory's JSON metrics back.

Commands (``seo-trainlog COMMAND --help`` for each)::

    seo-trainlog summarize LOG_DIR [LOG_DIR ...] [--run RUN_ID] [--list] [--json]
    seo-trainlog plot LOG_DIR -o FILE.png [--run RUN_ID] [--metrics 'rewards/*,mean_token_accuracy']
    seo-trainlog compare LOG_DIR [LOG_DIR ...] [RUN_ID ...] [--run RUN_ID ...] [--json] [--fail-if 'eval_loss>+2%']
    seo-trainlog report LOG_DIR -o FILE.html [--run RUN_ID]
    seo-trainlog watch LOG_DIR [--run RUN_ID] [--interval S] [--timeout S]

Exit status: 0 on success; 2 for a usage error or a log directory that cannot be read (a missing or
empty directory, an unknown run, a broken line, metrics of a newer schema: one line on stderr,
never a traceback). Without ``--run``, a run that cannot be read is skipped with a warning on stderr
naming its file, and the others are listed and reported (status 0 when at least one was read).
``watch`` waits for a missing directory or a first run, and exits 1 when ``--timeout`` ends it
before the run's summary, 130 on Ctrl-C. ``compare --fail-if`` exits 1 when the last run (the
candidate) regresses against the first (the baseline) by more than a condition allows, ended with a
NaN value of a metric it checks, or did not complete (unless ``--allow-incomplete``).
Anomaly thresholds come from the ``SEO_TRAINLOG_*`` variables (:meth:`LogConfig.from_env`).

``summarize`` of a distributed run, or with several directories (e.g. the log directories gathered
from the nodes of a multi-node run, same run id), adds a per-rank table (rank, node, host, mean step
time, data wait share, own data time, pace, straggler) read from every process's metrics files of the
run in all the directories, and the ``straggler`` anomalies (``--json``: ``ranks`` and ``stragglers``).
The run is chosen in the first directory; a directory holding only a node's files is read as that run,
from its node leader's ``performance_metrics_node<N>_<stamp>.log``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.text import Text

from .read import present as _present
from .read.analysis import RankAnalysis, RunAnalysis
from ._config import LogConfig
from .record.format import to_jsonable
from .read.reader import LogReadError, MetricsRun, find_process_files, find_runs, load_manifest, read_records, select_run
from .read.reader import _stamp_order as stamp_order


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``seo-trainlog`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except (LogReadError, OSError) as exc:
        print(f"seo-trainlog: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seo-trainlog", description="Summaries, plots, reports and a live view "
                                     "of seo_trainlog's JSON metrics (performance_metrics_<run>.log).")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, handler, help_text: str, several: bool = False) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if several:
            sub.add_argument("log_dirs", metavar="LOG_DIR", type=Path, nargs="+",
                             help="the log directory; more than one: the directories of one run's nodes "
                                  "(the run is chosen in the first)")
        else:
            sub.add_argument("log_dir", metavar="LOG_DIR", type=Path, help="the log directory")
        sub.add_argument("--run", metavar="RUN_ID", help="the run stamp (default: the latest run)")
        sub.set_defaults(handler=handler)
        return sub

    summarize = command("summarize", _summarize, "a table of one run: status, losses, evaluation, throughput, "
                        "memory, errors and anomalies; per rank (step time, data wait, pace, straggler) for a "
                        "distributed run", several=True)
    summarize.add_argument("--list", action="store_true", help="one line per run instead")
    summarize.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    plot = command("plot", _plot, "a PNG figure of loss, eval loss, learning rate, throughput and memory")
    plot.add_argument("-o", "--output", type=Path, required=True, metavar="FILE.png")
    plot.add_argument("--metrics", metavar="GLOBS", help="instead, one panel per metric matching these "
                      "comma-separated globs, e.g. 'rewards/*,mean_token_accuracy' (train values, and eval_<name>)")
    report = command("report", _report, "one self-contained HTML file: summary, plots, hyperparameters, errors, "
                     "anomalies, and a comparison of the directory's runs")
    report.add_argument("-o", "--output", type=Path, required=True, metavar="FILE.html")
    compare = commands.add_parser(
        "compare", help="runs side by side: differing hyperparameters, final/best metrics, throughput, status",
        description="Runs side by side: the hyperparameters that differ, the final and best value of each "
                    "metric with its direction, throughput, duration, status and anomalies. Positional "
                    "arguments are log directories and run ids (YYYYMMDD_HHMMSS[_n]); run ids are compared "
                    "in the order given, without them every run of the directories, oldest first (by stamp, "
                    "across the directories). A directory named twice is read once; a run in several "
                    "directories is one run (the copy with global rank 0's files, else the first "
                    "directory's). The first run is the baseline of --fail-if, the last the candidate.")
    compare.add_argument("paths", nargs="+", metavar="LOG_DIR_OR_RUN_ID", help="log directories, then run ids")
    compare.add_argument("--run", action="extend", nargs="+", default=[], metavar="RUN_ID",
                         help="runs to compare (after the log directories; '--run A B' or '--run A --run B'; "
                              "the order given is the order compared: the first is the baseline, the last "
                              "the candidate)")
    compare.add_argument("--json", action="store_true", help='print {"runs", "differences", "metrics"} as JSON')
    compare.add_argument("--fail-if", action="append", default=[], metavar="CONDITIONS",
                         help="exit 1 when the candidate (last run) regresses against the baseline (first): "
                              "METRIC>+N (rose by more than N) or METRIC<-N (fell by more than N), N with %% "
                              "for percent of the baseline's value, e.g. 'eval_loss>+2%%', 'eval_accuracy<-1%%', "
                              "'loss>+0.05'; comma-separated or repeated, every one is checked; also exit 1 "
                              "when the candidate did not complete or its final value is NaN")
    compare.add_argument("--allow-incomplete", action="store_true",
                         help="let --fail-if pass a candidate whose status is not completed (failed, no summary)")
    compare.set_defaults(handler=_compare)
    watch = command("watch", _watch, "follow a run live as training writes it (Ctrl-C to stop)")
    watch.add_argument("--interval", type=_positive, default=1.0, metavar="S", help="seconds between refreshes")
    watch.add_argument("--timeout", type=_positive, default=None, metavar="S", help="stop after S seconds")
    return parser


def _summarize(args: argparse.Namespace) -> int:
    args.log_dir = args.log_dirs[0]
    runs = find_runs(args.log_dir)
    config = _config()
    console = Console()
    if args.list:
        if len(args.log_dirs) > 1:
            raise LogReadError("--list reads one LOG_DIR")
        summaries = [analysis.summary() for analysis in _analyse_all(runs, config)]
        if args.json:
            _print_json({"log_dir": str(args.log_dir), "runs": summaries})
        else:
            console.print(_present.run_list_table(summaries, f"Runs in {args.log_dir}"))
            footnote = _present.run_list_footnote(summaries)
            if footnote:
                console.print(footnote, markup=False, highlight=False)
        return 0
    analysis = _analyse_chosen(runs, args.run, config)
    summary = analysis.summary()
    if analysis.ranks.ranks or len(args.log_dirs) > 1:  # a distributed run, or the directories of its nodes
        summary.update(_ranks(analysis, select_run(runs, analysis.run_id), args.log_dirs))
    if args.json:
        _print_json(summary)
        return 0
    console.print(_present.summary_table(summary))
    if summary["anomalies"]:
        console.print(_present.anomaly_table(summary["anomalies"]))
    if "ranks" in summary:
        console.print(_present.rank_table(summary["ranks"]))
        if summary.get("ranks_without_records"):
            console.print(_present.missing_ranks_line(summary["ranks_without_records"], summary["world_size"]),
                          markup=False, highlight=False)
        for anomaly in summary["stragglers"]:
            console.print(str(anomaly.get("message")), markup=False, highlight=False)
    return 0


def _ranks(analysis: RunAnalysis, chosen: MetricsRun, log_dirs: list[Path]) -> dict:
    """:meth:`RankAnalysis.summary` of the run over every process's files in ``log_dirs`` (the chosen
    files were read already); a directory without any of the run's files is named in a warning."""
    ranks: RankAnalysis = analysis.ranks
    for log_dir in log_dirs:
        files = find_process_files([log_dir], analysis.run_id)
        if not files:
            _warn(f"{log_dir} holds no metrics file of run {analysis.run_id}")
        for process in files:
            if [path.resolve() for path in process.paths] == [path.resolve() for path in chosen.paths]:
                continue
            try:
                for record in read_records(process, _warn):
                    ranks.add(record)
            except LogReadError as exc:
                _warn(f"{process.active_path.name} skipped: {exc}")
    return ranks.summary()


def _plot(args: argparse.Namespace) -> int:
    from .read.plots import save_figure

    if args.output.suffix.lower() != ".png":
        raise LogReadError(f"{args.output}: the figure is written as PNG; give a file name ending in .png")
    analysis = _analyse_chosen(find_runs(args.log_dir), args.run, _config())
    if args.metrics is not None:
        from .read.metric_plots import NoMetricMatched, left_out_text, parse_patterns, save_metrics_figure

        try:
            titles, left_out = save_metrics_figure(analysis, parse_patterns(args.metrics), args.output)
        except (NoMetricMatched, ValueError) as exc:
            raise LogReadError(str(exc)) from None
        print(f"wrote {args.output} ({', '.join(titles)})")
        if left_out:
            _warn(left_out_text(left_out, len(titles)))
        return 0
    save_figure(analysis, args.output)
    print(f"wrote {args.output}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .read import compare as comparing

    directories: dict[Path, Path] = {}  # resolved path -> as given: a directory named twice is read once
    for text in args.paths:
        if Path(text).is_dir():
            directories.setdefault(Path(text).resolve(), Path(text))
    for text in args.run:
        if not comparing.RUN_ID.match(text):
            raise LogReadError(f"--run {text!r} is not a run id (YYYYMMDD_HHMMSS[_n]); give the log directories "
                               "before --run")
    run_ids = list(dict.fromkeys([p for p in args.paths if not Path(p).is_dir()] + list(args.run)))
    for text in run_ids:
        if not comparing.RUN_ID.match(text):
            raise LogReadError(f"{text!r} is neither a log directory nor a run id (YYYYMMDD_HHMMSS[_n])")
    if not directories:
        raise LogReadError(f"no log directory among {' '.join(args.paths)}")
    try:
        conditions = comparing.parse_conditions(args.fail_if) if args.fail_if else []
    except ValueError as exc:
        raise LogReadError(str(exc)) from None
    config = _config()
    copies: dict[str, tuple[Path, MetricsRun]] = {}  # run id -> the copy read: rank 0's files, else a node's
    for directory in directories.values():
        for run in find_runs(directory):
            if run.run_id not in copies or (copies[run.run_id][1].tag and not run.tag):
                copies[run.run_id] = (directory, run)
    for run_id in run_ids:
        if run_id not in copies:
            raise LogReadError(f"no run {run_id!r} in {', '.join(map(str, directories.values()))}")
    chosen = []  # (directory, analysis): the runs named must be read; of all, the unreadable are skipped
    for run_id in run_ids or sorted(copies, key=stamp_order):
        directory, run = copies[run_id]
        try:
            chosen.append((directory, _analyse(run, config, finals=True)))
        except LogReadError as exc:
            if run_ids or (not chosen and run_id == max(copies, key=stamp_order)):
                raise
            _warn(f"run {run_id} skipped: {exc}")
    result = comparing.compare([analysis for _, analysis in chosen], [str(d) for d, _ in chosen])
    try:
        outcomes = comparing.check(result, conditions, args.allow_incomplete) if conditions else []
    except ValueError as exc:
        raise LogReadError(str(exc)) from None
    for line in comparing.direction_warnings(result, conditions):
        _warn(line)
    if args.json:
        _print_json({**result, **({"fail_if": outcomes} if conditions else {})})
    else:
        console = Console()
        for line in comparing.legend(result):
            console.print(Text(line), soft_wrap=True)  # a long directory is not broken up
        labels = comparing.letters(len(result["runs"]))
        for title, headers, rows in comparing.tables(result, _present.number, _present.duration,
                                                     _present.short_status, labels):
            console.print(_present.text_table(title, headers, rows, console.width) if rows else f"{title}: none")
    first, last = result["runs"][0]["run_id"], result["runs"][-1]["run_id"]
    for outcome in outcomes:
        print(f"seo-trainlog: {comparing.outcome_text(outcome, first, last)}", file=sys.stderr)
    return 1 if any(outcome["failed"] for outcome in outcomes) else 0


def _report(args: argparse.Namespace) -> int:
    from .read.report import write_report

    runs = find_runs(args.log_dir)
    chosen = select_run(runs, args.run) if args.run is not None else None
    analyses = _analyse_all(runs, _config(), required=chosen, finals=True)
    current = next(a for a in reversed(analyses) if chosen is None or a.run_id == chosen.run_id)
    write_report(args.output, current, analyses)
    print(f"wrote {args.output}")
    return 0


def _watch(args: argparse.Namespace) -> int:
    from .read.live import watch

    return watch(args.log_dir, args.run, _config(), Console(), interval_s=args.interval, timeout_s=args.timeout)


def _analyse(run: MetricsRun, config: LogConfig, finals: bool = False) -> RunAnalysis:
    """``run`` read; with ``finals`` its ``final_values`` kept too (the last logged values, NaN
    included: ``compare`` and the report's comparison)."""
    manifest, problem = load_manifest(run, _warn)
    analysis = RunAnalysis(run.run_id, config, manifest=manifest, rotated=len(run.paths) > 1,
                           manifest_problem=problem)
    records = read_records(run, _warn)
    if finals:
        from .read.compare import FinalValues

        analysis.final_values = FinalValues()
        records = analysis.final_values.tee(records)
    analysis.add_all(records)
    if analysis.head_deleted and analysis.manifest is None:
        missing = f"{run.manifest_path.name} could not be used ({problem})" if problem else \
            f"there is no {run.manifest_path.name}"
        _warn(f"run {run.run_id}: its oldest metrics files were deleted by retention (the oldest left, "
              f"{run.paths[0].name}, does not begin with run_start) and {missing}: "
              "start time, hyperparameters, best loss and best eval metrics may be incomplete")
    return analysis


def _analyse_all(runs: list[MetricsRun], config: LogConfig, required: MetricsRun | None = None,
                 finals: bool = False) -> list[RunAnalysis]:
    """Every run that can be read (``finals``: see :func:`_analyse`); one that cannot is skipped with a
    warning naming its file (the ``required`` one raises). Raises LogReadError when none can be read
    (the last run's error)."""
    analyses, failed = [], []
    for run in runs:
        try:
            analyses.append(_analyse(run, config, finals))
        except LogReadError as exc:
            if run is required:
                raise
            failed.append((run, exc))
    if not analyses:
        *failed, (_, error) = failed
    for run, exc in failed:
        _warn(f"run {run.run_id} skipped: {exc}")
    if not analyses:
        raise error
    return analyses


def _analyse_chosen(runs: list[MetricsRun], run_id: str | None, config: LogConfig) -> RunAnalysis:
    """The run ``run_id``; without one, the latest run that can be read (a later one that cannot is
    skipped with a warning naming its file)."""
    if run_id is not None:
        return _analyse(select_run(runs, run_id), config)
    for index in range(len(runs) - 1, -1, -1):
        try:
            return _analyse(runs[index], config)
        except LogReadError as exc:
            if index == 0:
                raise
            _warn(f"run {runs[index].run_id} skipped: {exc}")
    raise AssertionError("find_runs returns at least one run")


def _config() -> LogConfig:
    try:
        return LogConfig.from_env()
    except ValueError as exc:
        raise LogReadError(str(exc)) from None


_warn = _present.print_warning


def _print_json(value: object) -> None:
    sys.stdout.write(json.dumps(to_jsonable(value), ensure_ascii=False) + "\n")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _one_line(error: object) -> str:
    return " ".join(str(error).split())


if __name__ == "__main__":
    sys.exit(main())
