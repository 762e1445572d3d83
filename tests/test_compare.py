"""``seo-trainlog compare`` and its ``--fail-if`` CI gate on hand-written metrics files of known
values: every condition of every flag is checked, a condition that reads the other way round than it
looks is refused, the runs are deduplicated and ordered oldest first across directories, run ids and
statuses are never cut at 80 columns, a candidate that did not complete or ended with a NaN fails."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from seo_trainlog.read.compare import GRAMMAR
from seo_trainlog.record.format import json_line
from seo_trainlog.cli import main

START = datetime(2026, 12, 1, 12, tzinfo=timezone.utc)
BASE, CAND = "20261201_120000", "20261202_120000"


def write_run(log_dir: Path, run_id: str, final: dict, losses=(1.0, 0.9, 0.8), status: str | None = "completed",
              tag: str = "", tail: str = "", learning_rate: float = 1e-3) -> Path:
    """A run's metrics file as the library writes it: hyperparameters, train records with ``losses``
    (``None`` is NaN, written as null), one eval record of ``final`` and, with a ``status``, a summary;
    ``tail`` is appended as it is (a line cut short by a crash)."""
    rows = [("run_start", 0, {}), ("hyperparameters", 0, {"hyperparameters": {
        "training_args": {"learning_rate": learning_rate}}})]
    rows += [("train", step, {"loss": loss, "learning_rate": learning_rate, "interval_s": 1.0, "steps": 1,
                              "samples_per_second": 8.0}) for step, loss in enumerate(losses, 1)]
    rows.append(("eval", len(losses), {"metric_prefix": "eval", **final}))
    if status is not None:
        rows.append(("summary", len(losses), {"status": status, "training_duration_s": 3.0}))
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"performance_metrics_{tag + '_' if tag else ''}{run_id}.log"
    with open(path, "w", encoding="utf-8") as out:
        for index, (event, step, values) in enumerate(rows):
            out.write(json_line(event, run_id, step, step / 10, values, time=START + timedelta(seconds=index)) + "\n")
        out.write(tail)
    return path


@pytest.fixture
def gate_dir(tmp_path) -> Path:
    """Baseline: eval_loss 0.50, eval_accuracy 0.80; candidate: 0.575 (+15 %), 0.78 (-2.5 %)."""
    log_dir = tmp_path / "logs"
    write_run(log_dir, BASE, {"eval_loss": 0.5, "eval_accuracy": 0.8, "eval_num_tokens": 100})
    write_run(log_dir, CAND, {"eval_loss": 0.575, "eval_accuracy": 0.78, "eval_num_tokens": 100}, learning_rate=2e-3)
    return log_dir


def gate(capsys, *argv: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    status = main(["compare", *argv])
    return status, capsys.readouterr().err.splitlines()


def cli_json(capsys, *argv: str, status: int = 0) -> dict:
    capsys.readouterr()
    assert main(["compare", *argv, "--json"]) == status
    return json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------ D1: every condition of every --fail-if

def test_a_repeated_fail_if_checks_every_condition(gate_dir, capsys):
    status, err = gate(capsys, str(gate_dir), "--fail-if", "eval_loss>+2%", "--fail-if", "eval_num_tokens>+1000")
    assert status == 1
    assert err == ["seo-trainlog: eval_loss: 0.5 (20261201_120000) -> 0.575 (20261202_120000), +0.075 (+15%): "
                   "FAILS 'eval_loss>+2%'",
                   "seo-trainlog: eval_num_tokens: 100 (20261201_120000) -> 100 (20261202_120000), +0 (+0%): "
                   "passes 'eval_num_tokens>+1000'"]
    # the failing condition last, in a comma-separated flag after another
    status, err = gate(capsys, str(gate_dir), "--fail-if", "eval_num_tokens>+1000",
                       "--fail-if", "eval_loss>+20%,eval_accuracy<-1%")
    assert status == 1
    assert [line.rsplit(": ", 1)[1] for line in err] == ["passes 'eval_num_tokens>+1000'", "passes 'eval_loss>+20%'",
                                                         "FAILS 'eval_accuracy<-1%'"]
    out = cli_json(capsys, str(gate_dir), "--fail-if", "eval_loss>+20%", "--fail-if", "eval_accuracy<-1%", status=1)
    assert [(o["condition"], o["failed"]) for o in out["fail_if"]] == [("eval_loss>+20%", False),
                                                                     ("eval_accuracy<-1%", True)]


# ------------------------------------------------------------------ D2: one grammar, the rest refused

@pytest.mark.parametrize("condition", ["eval_loss<+2%", "eval_loss>-2%", "eval_loss>2%", "eval_loss<2",
                                       "eval_loss>=+2%", "eval_loss rises", "eval_loss>+", ">+2%"])
def test_a_condition_outside_the_grammar_exits_2_showing_the_accepted_forms(gate_dir, capsys, condition):
    status, err = gate(capsys, str(gate_dir), "--fail-if", "eval_loss>+50%", "--fail-if", condition)
    assert status == 2
    assert err == [f"seo-trainlog: error: --fail-if {condition!r}: not a condition; accepted: {GRAMMAR}"]
    assert "METRIC>+N (fails when the candidate's value rose by more than N), METRIC<-N (fell by more " in err[0]


@pytest.mark.parametrize("text", ["eval_loss>+2%,", "eval_loss>+2%,,loss>+1", ",eval_loss>+2%"])
def test_an_empty_condition_between_commas_exits_2(gate_dir, capsys, text):
    status, err = gate(capsys, str(gate_dir), "--fail-if", text)
    assert status == 2
    assert err == [f"seo-trainlog: error: --fail-if {text!r}: an empty condition between commas; accepted: {GRAMMAR}"]


@pytest.mark.parametrize(("condition", "status"), [("eval_loss>+14.9%", 1), ("eval_loss>+15.1%", 0),
                                                   ("eval_loss > +0.07", 1), ("eval_loss>+0.08", 0),
                                                   ("eval_accuracy<-2.4%", 1), ("eval_accuracy<-2.6%", 0),
                                                   ("eval_accuracy<-0.019", 1), ("eval_accuracy<-.021", 0)])
def test_the_accepted_forms_fail_on_a_rise_or_a_fall_beyond_n(gate_dir, capsys, condition, status):
    assert gate(capsys, str(gate_dir), "--fail-if", condition)[0] == status


def test_a_condition_against_the_metrics_direction_is_warned_about(gate_dir, capsys):
    status, err = gate(capsys, str(gate_dir), "--fail-if", "eval_accuracy>+1%,eval_loss<-1%,eval_num_tokens>+1")
    assert status == 0
    assert err[:2] == [
        "seo-trainlog: warning: --fail-if 'eval_accuracy>+1%': eval_accuracy is higher-is-better, so this fails "
        "when it improves (a regression reads 'eval_accuracy<-N')",
        "seo-trainlog: warning: --fail-if 'eval_loss<-1%': eval_loss is lower-is-better, so this fails when it "
        "improves (a regression reads 'eval_loss>+N')"]
    assert len(err) == 5  # no warning for a counter (no direction); one outcome line per condition


# ------------------------------------------------------------------ D3: which runs, in which order

def test_runs_are_deduplicated_and_oldest_first_across_directories(gate_dir, tmp_path, capsys):
    old = tmp_path / "old"
    write_run(old, "20261130_120000", {"eval_loss": 0.9, "eval_accuracy": 0.5})
    write_run(old, BASE, {"eval_loss": 0.5, "eval_accuracy": 0.8})  # a copy of the baseline
    expected = [("20261130_120000", str(old)), (BASE, str(gate_dir)), (CAND, str(gate_dir))]
    for argv in ([gate_dir, old], [old, gate_dir], [gate_dir, old, gate_dir, str(gate_dir) + "/"]):
        out = cli_json(capsys, *map(str, argv), "--fail-if", "eval_loss>+2%")
        assert [(run["run_id"], run["log_dir"]) for run in out["runs"]] == \
            [(run_id, str(old) if run_id == BASE and argv[0] == old else directory) for run_id, directory in expected]
        assert (out["fail_if"][0]["first"], out["fail_if"][0]["last"]) == (0.9, 0.575)  # oldest -> newest
    out = cli_json(capsys, str(gate_dir), str(gate_dir))
    assert [run["run_id"] for run in out["runs"]] == [BASE, CAND]
    # run ids: in the order given, each once
    out = cli_json(capsys, str(gate_dir), str(old), "--run", CAND, "--run", BASE, "--run", CAND)
    assert [(run["run_id"], run["log_dir"]) for run in out["runs"]] == [(CAND, str(gate_dir)), (BASE, str(gate_dir))]


def test_a_run_in_a_nodes_directory_is_read_from_global_rank_0s_copy(tmp_path, capsys):
    node, main_dir = tmp_path / "node1", tmp_path / "node0"
    write_run(node, BASE, {"eval_loss": 0.7}, tag="node1")
    write_run(main_dir, BASE, {"eval_loss": 0.5})
    write_run(main_dir, CAND, {"eval_loss": 0.6})
    out = cli_json(capsys, str(node), str(main_dir))
    assert [(run["run_id"], run["log_dir"]) for run in out["runs"]] == [(BASE, str(main_dir)), (CAND, str(main_dir))]
    assert out["metrics"]["eval_loss"]["final"] == [0.5, 0.6]


# ------------------------------------------------------------------ D14b: several ids after one --run

def test_several_run_ids_after_one_run_flag(gate_dir, capsys):
    out = cli_json(capsys, str(gate_dir), "--run", CAND, BASE)
    assert [run["run_id"] for run in out["runs"]] == [CAND, BASE]
    status, err = gate(capsys, str(gate_dir), "--run", BASE, str(gate_dir))
    assert status == 2
    assert err == [f"seo-trainlog: error: --run {str(gate_dir)!r} is not a run id (YYYYMMDD_HHMMSS[_n]); give the "
                   "log directories before --run"]


# ------------------------------------------------------------------ D4: nothing cut at 80 columns

def test_run_ids_and_statuses_are_whole_at_80_columns(tmp_path, capsys, monkeypatch):
    log_dir = tmp_path / "a-rather-long-directory-name-for-the-logs-of-these-runs"
    ids = ["20261201_120000", "20261201_120000_1", "20261202_080000", "20261203_120000"]
    write_run(log_dir, ids[0], {"eval_loss": 0.5, "eval_accuracy": 0.8})
    write_run(log_dir, ids[1], {"eval_loss": 0.49, "eval_accuracy": 0.81}, learning_rate=2e-3)
    write_run(log_dir, ids[2], {"eval_loss": 0.48, "eval_accuracy": 0.812345}, status="failed", learning_rate=3e-3)
    write_run(log_dir, ids[3], {"eval_loss": 0.47, "eval_accuracy": 0.83}, status=None, learning_rate=4e-3)
    monkeypatch.setenv("COLUMNS", "80")
    capsys.readouterr()
    assert main(["compare", str(log_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(len(line) <= 80 for line in lines[5:]) and "…" not in "".join(lines)  # legend lines: not wrapped
    assert lines[:5] == [f"{label} = {run_id} ({log_dir})" for label, run_id in zip("ABCD", ids)] + \
        ["baseline A, candidate D (--fail-if compares D with A)"]
    runs = [[cell.strip() for cell in line.split("│")[1:-1]] for line in lines if line.startswith("│ ")][:4]
    assert [row[:3] for row in runs] == [["A", "completed", "3"], ["B", "completed", "3"], ["C", "failed", "3"],
                                         ["D", "no summary", "3"]]
    header = next(line for line in lines if "hyperparameter" in line)
    assert [cell.strip() for cell in header.split("┃")[1:-1]] == ["hyperparameter", "A", "B", "C", "D"]
    row = next(line for line in lines if line.startswith("│ eval_accuracy "))
    assert [cell.strip() for cell in row.split("│")[1:-1]] == ["eval_accuracy", "final", "0.8", "0.81", "0.8123",
                                                              "0.83"]


# ------------------------------------------------------------------ D9: a candidate that did not complete

def test_the_gate_fails_a_candidate_that_failed_or_did_not_finish(tmp_path, capsys):
    log_dir = tmp_path / "logs"
    write_run(log_dir, BASE, {"eval_loss": 0.5})
    write_run(log_dir, CAND, {"eval_loss": 0.4}, status="failed")
    status, err = gate(capsys, str(log_dir), "--fail-if", "eval_loss>+2%")
    assert status == 1
    assert err == ["seo-trainlog: status: completed (20261201_120000) -> failed (20261202_120000), the candidate did "
                   "not complete: FAILS (--allow-incomplete to compare it anyway)",
                   "seo-trainlog: eval_loss: 0.5 (20261201_120000) -> 0.4 (20261202_120000), -0.1 (-20%): passes "
                   "'eval_loss>+2%'"]
    status, err = gate(capsys, str(log_dir), "--fail-if", "eval_loss>+2%", "--allow-incomplete")
    assert status == 0 and err[0].endswith("the candidate did not complete: passes (--allow-incomplete)")
    # still being written (or killed): no summary, its last line cut short
    write_run(log_dir, "20261203_120000", {"eval_loss": 0.45}, status=None, tail='{"time": "2026-12-01T12:')
    out = cli_json(capsys, str(log_dir), BASE, "20261203_120000", "--fail-if", "eval_loss>+2%", status=1)
    assert [run["status"] for run in out["runs"]] == ["completed", "no_summary"]
    assert out["fail_if"][0] == {"condition": "status", "metric": "status", "first": "completed",
                                 "last": "no_summary", "change": None, "change_pct": None, "failed": True}
    assert out["fail_if"][1]["failed"] is False
    # a failed baseline does not fail the gate
    assert gate(capsys, str(log_dir), CAND, BASE, "--fail-if", "eval_loss>+30%")[0] == 0


# ------------------------------------------------------------------ D10: a final value that is NaN

def test_a_nan_final_value_is_shown_and_fails_the_gate(tmp_path, capsys, monkeypatch):
    log_dir = tmp_path / "logs"
    write_run(log_dir, BASE, {"eval_loss": 0.5, "eval_accuracy": 0.8})
    write_run(log_dir, CAND, {"eval_loss": math.nan, "eval_accuracy": 0.9}, losses=(1.0, 0.7, None))
    assert '"eval_loss":null' in (log_dir / f"performance_metrics_{CAND}.log").read_text()
    out = cli_json(capsys, str(log_dir), "--fail-if", "loss>+1%,eval_loss>+1%,eval_accuracy<-1%", status=1)
    assert out["metrics"]["loss"] == {"direction": "min", "final": [0.8, None], "best": [0.8, 0.7],
                                      "final_non_finite": [False, True]}
    assert out["metrics"]["eval_loss"] == {"direction": "min", "final": [0.5, None], "best": [0.5, None],
                                           "final_non_finite": [False, True]}
    assert out["metrics"]["eval_accuracy"] == {"direction": "max", "final": [0.8, 0.9], "best": [0.8, 0.9]}
    assert [o["failed"] for o in out["fail_if"]] == [True, True, False]
    status, err = gate(capsys, str(log_dir), "--fail-if", "loss>+1%,eval_loss>+1%")
    assert status == 1
    assert err == ["seo-trainlog: loss: 0.8 (20261201_120000) -> nan (20261202_120000), not finite: FAILS 'loss>+1%'",
                   "seo-trainlog: eval_loss: 0.5 (20261201_120000) -> nan (20261202_120000), not finite: FAILS "
                   "'eval_loss>+1%'"]
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["compare", str(log_dir)]) == 0
    rows = {line.split("│")[1].strip(): [cell.strip() for cell in line.split("│")[2:-1]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("│ ") and "final" in line}
    assert rows["loss"] == ["final", "0.8", "nan"] and rows["eval_loss"] == ["final", "0.5", "nan"]
    # the HTML report's comparison: the same final values
    report = tmp_path / "report.html"
    assert main(["report", str(log_dir), "-o", str(report)]) == 0
    html = report.read_text(encoding="utf-8")
    final_rows = [row for row in html.split("<tr>") if "<td>final</td>" in row]
    assert any(row.startswith("<td>loss</td>") and row.rstrip().endswith("<td>0.8</td><td>nan</td></tr>")
               for row in final_rows), final_rows
    # a NaN in the baseline: nothing to compare with (exit 2, not a pass)
    status, err = gate(capsys, str(log_dir), CAND, BASE, "--fail-if", "loss>+1%")
    assert status == 2
    assert err == ["seo-trainlog: error: --fail-if 'loss>+1%': the baseline run 20261202_120000 ended with a loss "
                   "that is not a finite number (nan): nothing to compare with"]


def test_eight_runs_at_80_columns_fold_instead_of_cutting(tmp_path, capsys, monkeypatch):
    log_dir = tmp_path / "logs"
    ids = [f"2026120{day}_120000" for day in range(1, 9)]
    for index, run_id in enumerate(ids):
        write_run(log_dir, run_id, {"eval_loss": 0.5 - index / 1000, "eval_mean_token_accuracy": 0.123456 + index},
                  status="failed" if index % 2 else None, learning_rate=(index + 1) * 1.2345e-4)
    monkeypatch.setenv("COLUMNS", "80")
    capsys.readouterr()
    assert main(["compare", str(log_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(len(line) <= 80 for line in lines[9:]) and "…" not in "".join(lines)
    assert lines[:9] == [f"{label} = {run_id} ({log_dir})" for label, run_id in zip("ABCDEFGH", ids)] + \
        ["baseline A, candidate H (--fail-if compares H with A)"]
    runs = [[cell.strip() for cell in line.split("│")[1:3]] for line in lines if line.startswith("│ ")][:8]
    assert runs == [[label, "failed" if index % 2 else "no summary"] for index, label in enumerate("ABCDEFGH")]
    # a value folds onto a second line of its cell rather than lose its digits
    table = "\n".join(lines)
    rates = table[table.index("Hyperparameters that differ"):table.index("Metrics")]
    cells = ["".join(parts) for parts in zip(*[[cell.strip() for cell in line.split("│")[1:-1]]
                                                for line in rates.splitlines() if line.startswith("│ ")])]
    assert cells[0] == "training_args.learning_rate"
    assert cells[1:] == [f"{(index + 1) * 1.2345e-4:.6g}" for index in range(8)]
