"""``seo-trainlog`` on the inputs real runs leave behind: resumed runs (segments), metrics files deleted
by retention (with and without the run's manifest), library and anomaly warnings, a bad run among
good ones, huge or damaged files, and a narrow terminal. Metrics files are written with the
library's own JSON writer under the names loguru gives them; the manifest in the shape the writer
keeps it."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from html import escape
from pathlib import Path

import pytest
from conftest import quiet
from rich.console import Console

from seo_trainlog import LogConfig, TrainLogger
from seo_trainlog.record.format import json_line
from seo_trainlog.read.reader import RunFollower, find_runs, read_records
from seo_trainlog.read.live import MAX_ALERTS, SPARK_POINTS, WatchState, render_frame
from seo_trainlog.cli import main

RUN = "20261130_120000"
START = datetime(2026, 11, 30, 12, tzinfo=timezone.utc)
ROOT = Path(__file__).resolve().parent.parent


def at(seconds: float) -> str:
    return (START + timedelta(seconds=seconds)).isoformat(timespec="milliseconds")


def lines(rows: list[tuple[str, int | None, dict]], first_second: int = 0, run_id: str = RUN) -> list[str]:
    """JSON lines of ``rows`` (event, global_step, values), one second apart from ``first_second``."""
    return [json_line(event, run_id, step, None if step is None else step / 100, values,
                      time=START + timedelta(seconds=first_second + index)) + "\n"
            for index, (event, step, values) in enumerate(rows)]


def train_row(step: int, loss: float, samples_per_second: float = 100.0) -> tuple[str, int, dict]:
    return ("train", step, {"loss": loss, "learning_rate": 1e-3, "grad_norm": 1.0, "interval_s": 1.0, "steps": 1,
                            "samples_per_second": samples_per_second, "data_wait_pct": 10.0, "rss_mb": 800.0})


def run_json(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(["summarize", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def table_rows(text: str) -> dict[str, str]:
    """``{label: value}`` of the summary table rich printed, a value wrapped over lines joined again."""
    rows: dict[str, str] = {}
    label = None
    for line in text.splitlines():
        cells = line.split("│")
        if len(cells) != 4:
            continue
        if cells[1].strip():
            label = cells[1].strip()
            rows[label] = cells[2].strip()
        elif label is not None:
            rows[label] += " " + cells[2].strip()
    return rows


def summarize_text(capsys, *args: str) -> tuple[str, str]:
    capsys.readouterr()
    assert main(["summarize", *args]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


# ---------------------------------------------------------------- resumed runs: segments


def resumed_run(log_dir: Path) -> Path:
    """Segment 1: steps 1-25, terminated (preempted); resumed from checkpoint-20: steps 21-40, completed."""
    rows = [("run_start", None, {"schema_version": 1}),
            ("hyperparameters", 0, {"hyperparameters": {"run": {"max_steps": 40}}})]
    rows += [train_row(step, 2.0 - step / 100) for step in range(1, 26)]
    rows += [("summary", 25, {"segment": 1, "status": "terminated", "training_duration_s": 25.5})]
    rows += [("segment_start", 20, {"segment": 2, "start_global_step": 20,
                                    "resumed_from_checkpoint": "out/checkpoint-20"})]
    rows += [train_row(step, 2.2 - step / 100) for step in range(21, 41)]  # higher after resuming
    rows += [("summary", 40, {"segment": 2, "status": "completed", "training_duration_s": 20.25})]
    log_dir.mkdir(parents=True)
    path = log_dir / f"performance_metrics_{RUN}.log"
    path.write_text("".join(lines(rows)), encoding="utf-8")
    return path


def test_a_resumed_run_is_one_run_with_its_segments(tmp_path, capsys):
    log_dir = tmp_path / "logs"
    resumed_run(log_dir)
    out = run_json(capsys, str(log_dir))
    assert (out["status"], out["global_step"], out["max_steps"]) == ("completed", 40, 40)
    assert out["training_duration_s"] == 25.5 + 20.25
    assert out["segments"] == [
        {"segment": 1, "started": at(0), "start_global_step": 0, "status": "terminated", "training_duration_s": 25.5},
        {"segment": 2, "started": at(28), "start_global_step": 20, "status": "completed",
         "training_duration_s": 20.25}]
    assert (out["best_loss"], out["best_loss_step"]) == (pytest.approx(2.0 - 0.25), 25)  # segment 1's 2.0-25/100
    assert out["final_loss"] == pytest.approx(2.2 - 0.40)
    assert out["records_cover"] == {"first_global_step": 1, "last_global_step": 40, "complete": True}

    text, err = summarize_text(capsys, str(log_dir))
    rows = table_rows(text)
    assert err == "" and rows["status"] == "completed"
    assert rows["segment 1"] == "started 2026-11-30 12:00:00 at global_step 0, terminated, 25.5 s"
    assert rows["segment 2"] == "started 2026-11-30 12:00:28 at global_step 20, completed, 20.2 s"
    assert rows["duration"] == "45.8 s (2 segments)"
    listed = run_json(capsys, str(log_dir), "--list")
    assert [run["run_id"] for run in listed["runs"]] == [RUN]


def test_a_run_resumed_and_still_running(tmp_path, capsys):
    path = resumed_run(tmp_path / "logs")
    kept = path.read_text().splitlines(keepends=True)[:-10]  # segment 2 has not ended yet
    path.write_text("".join(kept))
    out = run_json(capsys, str(tmp_path / "logs"))
    assert out["status"] == "no_summary" and out["global_step"] == 31
    assert [(s["segment"], s["status"], s["training_duration_s"]) for s in out["segments"]] == [
        (1, "terminated", 25.5), (2, "no_summary", None)]
    assert out["training_duration_s"] == 25.5
    state = WatchState(RUN, LogConfig())
    for record in read_records(find_runs(tmp_path / "logs")[0]):
        state.add(record)
    assert not state.finished and state.segment == 2  # the first segment's summary did not end the watch


# ---------------------------------------------------------------- retention


def retained_run(log_dir: Path, manifest: bool) -> list[Path]:
    """A 60-step run in 4 metrics files as loguru rotates them; the first (run_start, hyperparameters,
    steps 1-15, when the loss was lowest and throughput half) deleted by retention."""
    rows = [("run_start", None, {"schema_version": 1}),
            ("hyperparameters", 0, {"hyperparameters": {"run": {"max_steps": 60}, "optimizer": {"lr": 1e-3}}})]
    rows += [train_row(step, 0.5 + step / 100, 100.0) for step in range(1, 16)]  # best loss: step 1
    rows += [("error", 10, {"error_type": "ValueError", "message": "bad batch"})]
    rows += [train_row(step, 0.5 + step / 100, 200.0) for step in range(16, 61)]
    rows += [("warning", 50, {"message": "a library warning", "source": "transformers"})]
    rows += [("summary", 60, {"segment": 1, "status": "completed", "training_duration_s": 61.0,
                              "data_wait_pct": 99.0})]
    text = lines(rows)
    cuts = [0, 18, 33, 48, len(text)]  # the first file: run_start, hyperparameters, steps 1-15, the error
    names = [f"performance_metrics_{RUN}.2026-11-30_12-00-{second:02d}_000000.log" for second in (17, 32, 47)]
    names.append(f"performance_metrics_{RUN}.log")
    log_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, start, end in zip(names, cuts, cuts[1:]):
        (log_dir / name).write_text("".join(text[start:end]), encoding="utf-8")
        paths.append(log_dir / name)
    paths[0].unlink()  # retention
    if manifest:
        (log_dir / f"run_manifest_{RUN}.json").write_text(json.dumps({
            "schema_version": 1, "run_id": RUN, "seo_trainlog_version": "0.1.0", "updated": at(60),
            "started": at(0), "hyperparameters": {"run": {"max_steps": 60}, "optimizer": {"lr": 1e-3}},
            "max_steps": 60, "status": "completed",
            "segments": [{"segment": 1, "started": at(0), "start_global_step": 0, "status": "completed",
                          "ended": at(64), "end_global_step": 60, "training_duration_s": 61.0}],
            "train": {"records": 60, "first_global_step": 1, "last_global_step": 58, "first_time": at(2),
                      "last_time": at(60), "final_loss": 1.08, "best_loss": 0.51, "best_loss_step": 1},
            "counts": {"error": 1, "warning": 0, "anomaly": 0}, "summary": None}))  # a few seconds behind
    return paths[1:]


COVER_WITH_MANIFEST = (f"records cover global_step 16-60 only: older records were removed by retention "
                       f"(run_manifest_{RUN}.json gives the run's totals)")
COVER_WITHOUT_MANIFEST = (f"WARNING: records cover global_step 16-60 only: older records were removed by "
                          f"retention and there is no run_manifest_{RUN}.json: start time, hyperparameters, "
                          "best loss and best eval metrics may be incomplete")


def test_retention_with_a_manifest_gives_the_true_totals(tmp_path, capsys):
    log_dir = tmp_path / "logs"
    retained_run(log_dir, manifest=True)
    (run,) = find_runs(log_dir)  # the manifest is not a metrics file
    assert [path.name.split(".")[1] for path in run.paths] == ["2026-11-30_12-00-32_000000",
                                                               "2026-11-30_12-00-47_000000", "log"]
    out = run_json(capsys, str(log_dir))
    assert (out["started"], out["max_steps"], out["global_step"], out["status"]) == (at(0), 60, 60, "completed")
    assert (out["best_loss"], out["best_loss_step"]) == (0.51, 1)  # from the manifest: its file is gone
    assert out["final_loss"] == pytest.approx(1.1)  # step 60, later than the manifest's 58
    assert (out["errors"], out["warnings"]) == (1, 1)  # the error's record is gone, the manifest counted it
    assert out["training_duration_s"] == 61.0
    assert out["samples_per_second"] == 200.0  # over the remaining records only, as records_cover says
    assert out["data_wait_pct"] == 10.0  # computed over them too, not the summary's whole-run 99
    assert out["records_cover"] == {"first_global_step": 16, "last_global_step": 60, "complete": False}
    assert out["manifest_used"] is True
    text, err = summarize_text(capsys, str(log_dir))
    rows = table_rows(text)
    assert err == ""
    assert (rows["records"], rows["steps"], rows["started"]) == (COVER_WITH_MANIFEST, "60 / 60", at(0))
    assert rows["best loss"] == "0.51 at step 1" and rows["errors / warnings"] == "1 error, 1 warning"

    report = tmp_path / "r.html"
    assert main(["report", str(log_dir), "-o", str(report)]) == 0
    html = report.read_text()
    assert escape(COVER_WITH_MANIFEST) in html and "<td>optimizer.lr</td>" in html


def test_retention_without_a_manifest_is_never_silently_wrong(tmp_path, capsys):
    log_dir = tmp_path / "logs"
    retained_run(log_dir, manifest=False)
    out = run_json(capsys, str(log_dir))
    assert out["records_cover"] == {"first_global_step": 16, "last_global_step": 60, "complete": False}
    assert out["manifest_used"] is False
    assert out["started"] == at(18) and out["max_steps"] is None  # what the records say, flagged below
    text, err = summarize_text(capsys, str(log_dir))
    assert table_rows(text)["records"] == COVER_WITHOUT_MANIFEST
    assert err == (f"seo-trainlog: warning: run {RUN}: its oldest metrics files were deleted by retention (the "
                   f"oldest left, performance_metrics_{RUN}.2026-11-30_12-00-32_000000.log, does not begin with "
                   f"run_start) and there is no run_manifest_{RUN}.json: start time, hyperparameters, best "
                   "loss and best eval metrics may be incomplete\n")
    assert main(["summarize", str(log_dir), "--list"]) == 0
    assert f"{RUN} completed*" in capsys.readouterr().out


def test_watch_shows_the_coverage_line(tmp_path):
    from seo_trainlog.read.reader import read_manifest

    for manifest, expected in ((True, COVER_WITH_MANIFEST), (False, COVER_WITHOUT_MANIFEST)):
        log_dir = tmp_path / str(manifest)
        retained_run(log_dir, manifest)
        (run,) = find_runs(log_dir)
        state = WatchState(RUN, LogConfig(), manifest=read_manifest(run), rotated=len(run.paths) > 1)
        follower = RunFollower(run)
        for record in follower.poll():
            state.add(record)
        follower.close()
        console = Console(file=io.StringIO(), width=100)
        console.print(render_frame(state))
        frame = console.file.getvalue()
        assert " ".join(expected.split()) in " ".join(frame.replace("│", " ").split())
        assert ("global_step 60 / 60" in frame) is manifest  # max_steps from the manifest


def test_a_complete_rotated_run_has_no_coverage_line(tmp_path, capsys):
    log_dir = tmp_path / "logs"
    retained_run(log_dir, manifest=False)
    first = log_dir / f"performance_metrics_{RUN}.2026-11-30_12-00-17_000000.log"
    first.write_text("".join(lines([("run_start", None, {"schema_version": 1})])))
    out = run_json(capsys, str(log_dir))
    assert out["records_cover"]["complete"] is True and out["started"] == at(0)
    text, err = summarize_text(capsys, str(log_dir))
    assert "records cover" not in text and err == ""


def test_real_retention_is_reported_not_hidden(tmp_path, capsys):
    log_dir = tmp_path / "logs"
    with TrainLogger(quiet(log_dir, rotation="2 KB", retention=2)) as tlog:
        tlog.log_hyperparameters({"run": {"max_steps": 200}})
        for step in range(1, 201):
            tlog.log_training_progress(step / 100, step, 1.0 / step, 1e-4)
    for manifest in log_dir.glob("run_manifest_*.json"):
        manifest.unlink()  # the behaviour without one (a writer that keeps one is tested with it)
    (run,) = find_runs(log_dir)
    assert len(run.paths) == 3  # the active file and the 2 rotated files retention keeps
    out = run_json(capsys, str(log_dir))
    cover = out["records_cover"]
    assert cover["complete"] is False and 1 < cover["first_global_step"] < cover["last_global_step"] == 200
    text, err = summarize_text(capsys, str(log_dir))
    assert table_rows(text)["records"].startswith(f"WARNING: records cover global_step {cover['first_global_step']}"
                                                  "-200 only: older records were removed by retention")
    assert "start time, hyperparameters, best loss and best eval metrics may be incomplete" in err


# ---------------------------------------------------------------- warnings counted, in plain English


def test_library_and_anomaly_warnings_are_counted(tmp_path, capsys):
    rows = [("run_start", None, {"schema_version": 1})] + [train_row(step, 1.0) for step in range(1, 8)]
    rows += [("warning", 3, {"message": "Some weights of the model were not initialized", "source": "transformers"}),
             ("warning", 5, {"message": "Non-finite loss at global_step 5: nan"}),
             ("anomaly", 5, {"kind": "non_finite", "message": "Non-finite loss at global_step 5: nan"}),  # counted once
             ("anomaly", 7, {"kind": "loss_spike", "message": "Loss spike at global_step 7"}),
             ("error", 7, {"error_type": "ValueError", "message": "bad batch"}),
             ("summary", 7, {"status": "completed", "training_duration_s": 7.0})]
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    (log_dir / f"performance_metrics_{RUN}.log").write_text("".join(lines(rows)))
    out = run_json(capsys, str(log_dir))
    assert (out["errors"], out["warnings"], out["anomaly_count"]) == (1, 3, 2)
    text, _ = summarize_text(capsys, str(log_dir))
    assert table_rows(text)["errors / warnings"] == "1 error, 3 warnings"
    report = tmp_path / "r.html"
    assert main(["report", str(log_dir), "-o", str(report)]) == 0
    html = report.read_text()
    assert "<h2>Warnings (3)</h2>\n<ul><li>[transformers] Some weights of the model were not initialized</li>" \
           "<li>Non-finite loss at global_step 5: nan</li><li>Loss spike at global_step 7</li></ul>" in html
    assert f"from {len(rows)} JSON metrics records." in html

    (log_dir / f"performance_metrics_{RUN}.log").write_text("".join(lines(rows[:9] + rows[-1:])))
    text, _ = summarize_text(capsys, str(log_dir))
    assert table_rows(text)["errors / warnings"] == "0 errors, 1 warning"


# ---------------------------------------------------------------- one bad run among good ones


def good_run(log_dir: Path, run_id: str, steps: int) -> None:
    rows = [("run_start", None, {"schema_version": 1})] + [train_row(step, 1.0 / step) for step in range(1, steps + 1)]
    rows.append(("summary", steps, {"status": "completed", "training_duration_s": float(steps)}))
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / f"performance_metrics_{run_id}.log").write_text("".join(lines(rows, run_id=run_id)))


def test_one_bad_run_is_reported_and_the_others_still_read(tmp_path, capsys):
    log_dir = tmp_path / "logs"
    good_run(log_dir, "20261130_110000", 4)
    good_run(log_dir, "20261130_120000", 6)
    newer = log_dir / "performance_metrics_20261130_130000.log"
    newer.write_text("".join(lines([("run_start", None, {"schema_version": 99})], run_id="20261130_130000")))
    (log_dir / "performance_metrics_20261130_140000.log").mkdir()  # cannot be read as a file
    corrupt = log_dir / "performance_metrics_20261130_150000.log"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary\n")  # not a metrics file at all
    expected_err = [
        f"seo-trainlog: warning: run 20261130_130000 skipped: {newer} was written with metrics schema version 99; "
        "this seo-trainlog reads versions up to 1: upgrade seo_trainlog to read it",
        f"seo-trainlog: warning: run 20261130_140000 skipped: cannot read {log_dir}/performance_metrics_20261130_"
        "140000.log: Is a directory",
        f"seo-trainlog: warning: run 20261130_150000 skipped: {corrupt}: line 1 is not valid JSON"]

    listed = run_json(capsys, str(log_dir), "--list")
    assert [(run["run_id"], run["global_step"]) for run in listed["runs"]] == [("20261130_110000", 4),
                                                                                ("20261130_120000", 6)]
    capsys.readouterr()
    assert main(["summarize", str(log_dir), "--list"]) == 0
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert len(err) == 3 and [line[:len(start)] for line, start in zip(err, expected_err)] == expected_err
    assert "20261130_110000" in captured.out and "20261130_120000" in captured.out

    report = tmp_path / "r.html"
    assert main(["report", str(log_dir), "-o", str(report)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"wrote {report}\n" and len(captured.err.splitlines()) == 3
    html = report.read_text()
    assert "<h1>Training run 20261130_120000:" in html and "<h2>All 2 runs in this directory</h2>" in html

    out = run_json(capsys, str(log_dir))  # the latest run that can be read
    assert out["run_id"] == "20261130_120000"
    assert main(["summarize", str(log_dir), "--run", "20261130_130000"]) == 2  # asked for by name: an error
    assert "schema version 99" in capsys.readouterr().err
    assert main(["report", str(log_dir), "--run", "20261130_150000", "-o", str(report)]) == 2


# ---------------------------------------------------------------- bounded memory on damaged files

# the child's own peak (VmHWM: ru_maxrss would include the test process it was forked from)
PEAK_RSS = ("import re, sys; from seo_trainlog.cli import main; code = main(sys.argv[1:]); "
            "print(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())[1], file=sys.stderr); "
            "sys.exit(code)")


def summarize_child(log_dir: Path) -> tuple[dict, list[str], float]:
    """``seo-trainlog summarize --json`` in a child process: its JSON, its warnings, its peak RSS in MiB."""
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, "summarize", str(log_dir), "--json"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    *warnings_, peak_kib = done.stderr.splitlines()
    return json.loads(done.stdout), warnings_, int(peak_kib) / 1024


def metrics_file(log_dir: Path) -> Path:
    log_dir.mkdir(parents=True)
    return log_dir / f"performance_metrics_{RUN}.log"


def test_memory_stays_bounded_on_a_2_gb_sparse_file(tmp_path):
    path = metrics_file(tmp_path / "sparse")
    path.write_text("".join(lines([("run_start", None, {"schema_version": 1})]
                                  + [train_row(step, 1.0 / step) for step in range(1, 11)])))
    with open(path, "r+b") as out:
        out.truncate(2 << 30)  # what a crash or a copy can leave: 2 GB of NUL bytes, no newline
    out, warnings_, peak_mb = summarize_child(tmp_path / "sparse")
    assert (out["global_step"], out["records_cover"]["last_global_step"]) == (10, 10)
    assert warnings_ == [f"seo-trainlog: warning: {path}: line 12 is longer than 16 MiB, which no record is (a "
                         "damaged file, e.g. one filled with NUL bytes); it is skipped"]
    assert peak_mb < 400

    path = metrics_file(tmp_path / "nul")
    with open(path, "wb") as out:
        out.truncate(2 << 30)  # nothing but NUL bytes
    out, warnings_, peak_mb = summarize_child(tmp_path / "nul")
    assert out["global_step"] is None and len(warnings_) == 1 and "line 1 is longer than 16 MiB" in warnings_[0]
    assert peak_mb < 400


def test_a_100_mb_line_is_skipped_without_being_held(tmp_path):
    path = metrics_file(tmp_path / "logs")
    before = lines([("run_start", None, {"schema_version": 1})] + [train_row(step, 1.0 / step) for step in range(1, 6)])
    after = lines([train_row(step, 1.0 / step) for step in range(6, 11)], 10)
    with open(path, "w", encoding="utf-8") as out:
        out.write("".join(before))
        out.write(json_line("train", RUN, 99, None, {"loss": 0.0001, "blob": "x" * (100 << 20)}) + "\n")
        out.write("".join(after))
    out, warnings_, peak_mb = summarize_child(tmp_path / "logs")
    assert (out["global_step"], out["best_loss"], out["final_loss"]) == (10, 0.1, 0.1)  # step 99 never read
    assert warnings_ == [f"seo-trainlog: warning: {path}: line 7 is longer than 16 MiB, which no record is (a "
                         "damaged file, e.g. one filled with NUL bytes); it is skipped"]
    assert peak_mb < 400


def test_nul_bytes_before_a_record_are_dropped_with_a_warning(tmp_path, capsys):
    path = metrics_file(tmp_path / "logs")
    text = lines([("run_start", None, {"schema_version": 1})] + [train_row(step, 1.0 / step) for step in range(1, 5)])
    path.write_bytes("".join(text[:3]).encode() + b"\x00" * 4096 + "".join(text[3:]).encode() + b"\x00" * 100 + b"\n")
    out = run_json(capsys, str(tmp_path / "logs"))
    assert out["global_step"] == 4
    assert capsys.readouterr().err == ""  # run_json read it: the warnings went with the JSON
    assert main(["summarize", str(tmp_path / "logs"), "--json"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"seo-trainlog: warning: {path}: line 4 holds 4096 NUL bytes (a file extended by a crash); they are skipped",
        f"seo-trainlog: warning: {path}: line 6 holds 100 NUL bytes (a file extended by a crash); they are skipped"]


# ---------------------------------------------------------------- watch reads as summarize does


def test_watch_skips_a_record_cut_short_as_summarize_does(tmp_path, capsys):
    from seo_trainlog.read.live import watch

    path = metrics_file(tmp_path / "logs")
    text = lines([("run_start", None, {"schema_version": 1})] + [train_row(step, 1.0 / step) for step in range(1, 9)]
                 + [("summary", 8, {"status": "completed", "training_duration_s": 8.0})])
    path.write_text("".join(text[:4]) + text[4][:40] + "\n" + "".join(text[4:]))  # a write that failed at step 4
    (run,) = find_runs(tmp_path / "logs")
    from_summarize, from_watch = [], []
    read = list(read_records(run, from_summarize.append))
    follower = RunFollower(run, from_watch.append)
    followed = list(follower.poll())
    follower.close()
    assert followed == read and len(read) == 10
    assert from_watch == from_summarize == [f"{path}: line 5 is a record cut short (a write that failed, e.g. on a "
                                            "full disk); it is skipped"]

    capsys.readouterr()
    console = Console(file=io.StringIO(), width=100)
    assert watch(tmp_path / "logs", None, LogConfig(), console, interval_s=0.05, timeout_s=10) == 0
    assert capsys.readouterr().err == f"seo-trainlog: warning: {from_summarize[0]}\n"
    assert f"run {RUN}: completed" in console.file.getvalue()


# ---------------------------------------------------------------- watch in bounded memory


def test_watch_state_stays_bounded_over_200k_records():
    config = LogConfig()
    state = WatchState(RUN, config)
    state.add({"event": "run_start", "global_step": None})
    record = {"event": "train", "time": at(0), "loss": 0.5, "grad_norm": 1.0, "samples_per_second": 100.0,
              "rss_mb": 800.0}
    for step in range(1, 200_001):
        record["global_step"], record["loss"] = step, 0.5 + (step % 7) / 100
        state.add(record)
        if step % 1000 == 0:
            state.add({"event": "anomaly", "global_step": step, "kind": "loss_spike", "message": f"spike {step}"})
    assert (state.records, state.global_step, state.anomaly_count) == (200_201, 200_000, 200)
    assert len(state.losses) == SPARK_POINTS and len(state.alerts) == MAX_ALERTS
    assert [message for _, _, message in state.alerts] == [f"spike {step}" for step in range(195_000, 200_001, 1000)]
    detector = state.detector
    assert all(len(window.values) <= config.anomaly_window and len(window.ordered) <= config.anomaly_window
               for window in (detector._losses, detector._grad_norms, detector._throughputs))
    assert set(vars(state)) == {"run_id", "manifest", "_rotated", "_head", "_train_steps", "segment", "detector",
                                "records", "global_step", "epoch", "max_steps", "latest_train", "latest_eval", "losses",
                                "alerts", "anomaly_count", "status", "_first_train", "_last_train", "manifest_problem",
                                "resumed_here"}  # nothing grows


def test_watch_reads_200k_lines_in_as_little_memory_as_summarize(tmp_path):
    path = metrics_file(tmp_path / "logs")
    template = lines([train_row(1, 0.5)])[0]
    before, after = template.split('"global_step":1,', 1)
    with open(path, "w", encoding="utf-8") as out:
        out.write(lines([("run_start", None, {"schema_version": 1})])[0])
        out.write("".join(f'{before}"global_step":{step},{after}' for step in range(1, 200_001)))
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, "watch", str(tmp_path / "logs"), "--timeout", "0.5"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"})
    assert done.returncode == 1  # no summary: the timeout ended it, after the first read of every line
    assert "global_step 200000" in done.stdout
    assert int(done.stderr.splitlines()[-1]) / 1024 < 150  # summarize: about 35 MiB; before: 306 MiB


# ---------------------------------------------------------------- the run list at 80 columns


def test_the_run_list_is_readable_at_80_columns(tmp_path, capsys, monkeypatch):
    log_dir = tmp_path / "a-rather-long-directory-name-for-the-logs-of-this-experiment" / "logs"
    good_run(log_dir, "20261130_110000", 4)
    good_run(log_dir, "20261130_110000_1", 12000)
    retained_run(log_dir, manifest=False)  # 20261130_120000, completed, its first file deleted
    rows = [("run_start", None, {"schema_version": 1}), ("hyperparameters", 0, {"hyperparameters": {
        "run": {"max_steps": 100000}}})] + [train_row(step, 0.123456789) for step in range(1, 4)]
    (log_dir / "performance_metrics_20261201_080000.log").write_text("".join(lines(rows, run_id="20261201_080000")))
    monkeypatch.setenv("COLUMNS", "80")
    capsys.readouterr()
    assert main(["summarize", str(log_dir), "--list"]) == 0
    text = capsys.readouterr().out
    assert max(map(len, text.splitlines())) <= 80, text
    by_run = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("2026")}
    assert by_run["20261130_110000"] == ["20261130_110000", "completed", "4", "0.25", "n/a", "4.0", "s", "0/0"]
    assert by_run["20261130_110000_1"][:3] == ["20261130_110000_1", "completed", "12000"]
    assert by_run["20261130_110000_1"][-5:] == ["3", "h", "20", "min", "0/0"]
    assert by_run["20261130_120000"][:3] == ["20261130_120000", "completed*", "60"]
    assert by_run["20261201_080000"][:5] == ["20261201_080000", "no", "summary", "3/100000", "0.1235"]
    assert text.splitlines()[-2:] == [  # the footnote on its own lines, not wrapped within the table's width
        "* older records are not in this directory (removed by retention, or the run",
        "  was resumed from another one): seo-trainlog summarize --run <run> says which"]


def test_the_figure_and_the_eta_know_about_retention_and_resumption(tmp_path):
    from seo_trainlog.read.analysis import RunAnalysis
    from seo_trainlog.read.plots import build_figure

    retained_run(tmp_path / "logs", manifest=False)
    (run,) = find_runs(tmp_path / "logs")
    analysis = RunAnalysis(RUN, LogConfig(), rotated=True).add_all(read_records(run))
    assert build_figure(analysis).get_suptitle() == (
        "Run 20261130_120000: completed, global_step 60, epoch 0.6\n"
        "WARNING: records cover global_step 16-60 only (older records removed by retention)")

    state = WatchState(RUN, LogConfig())
    state.add({"event": "hyperparameters", "hyperparameters": {"run": {"max_steps": 40}}})
    for step in range(1, 11):  # one step a second
        state.add({"event": "train", "global_step": step, "time": at(step), "loss": 1.0})
    state.add({"event": "summary", "global_step": 10, "status": "terminated"})
    state.add({"event": "segment_start", "global_step": 10, "segment": 2, "time": at(3600)})  # an hour later
    for step in range(11, 21):  # two steps a second
        state.add({"event": "train", "global_step": step, "time": at(3600 + (step - 10) / 2), "loss": 1.0})
    assert state.eta_s() == pytest.approx(20 * 0.5)  # 20 steps left at the pace since resuming, not the hour


def test_a_manifest_that_cannot_be_used_is_said_and_ignored(tmp_path, capsys):
    log_dir = tmp_path / "logs"
    retained_run(log_dir, manifest=True)
    manifest = log_dir / f"run_manifest_{RUN}.json"
    good = json.loads(manifest.read_text())
    for content, problem in (('{"schema_version": 1, "run_id": "2026', "is not valid JSON (unexpected end of "
                              "data: line 1 column 38 (char 37): cut short or damaged)"),
                             ('[1, 2]', "is not a JSON object"),
                             (json.dumps({**good, "schema_version": 2}),
                              "has schema version 2 (this seo-trainlog reads up to 1)"),
                             (json.dumps({**good, "run_id": "20261130_130000"}),
                              "is the manifest of run '20261130_130000'")):
        manifest.write_text(content)
        out = run_json(capsys, str(log_dir))
        assert out["manifest_used"] is False and out["best_loss"] == pytest.approx(0.66)  # the records' best
        text, err = summarize_text(capsys, str(log_dir))
        assert err.splitlines()[0] == (f"seo-trainlog: warning: {manifest} {problem}; the run's totals in it are "
                                       "not used")
        assert table_rows(text)["records"] == COVER_WITHOUT_MANIFEST.replace(
            f"there is no run_manifest_{RUN}.json", f"run_manifest_{RUN}.json could not be used ({problem})")
        assert err.splitlines()[1].endswith(f"and run_manifest_{RUN}.json could not be used ({problem}): start "
                                            "time, hyperparameters, best loss and best eval metrics may be incomplete")
        assert "there is no" not in text + err  # the file exists


# ---------------------------------------------------------------- evaluation metrics


def test_model_preparation_time_is_a_timing_not_a_metric(tmp_path, capsys):
    from seo_trainlog.read.analysis import eval_metrics

    record = {"event": "eval", "global_step": 4, "metric_prefix": "eval", "eval_loss": 1.5,
              "eval_model_preparation_time": 0.0006, "eval_runtime": 0.1, "eval_samples_per_second": 900.0,
              "eval_steps_per_second": 30.0, "eval_accuracy": 0.5}
    assert eval_metrics(record) == ("eval", {"eval_loss": 1.5, "eval_accuracy": 0.5})
    rows = [("run_start", None, {"schema_version": 1}), train_row(4, 1.0),
            ("eval", 4, {key: value for key, value in record.items() if key not in ("event", "global_step")})]
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    (log_dir / f"performance_metrics_{RUN}.log").write_text("".join(lines(rows)))
    out = run_json(capsys, str(log_dir))
    assert out["best_eval"] == {"eval_loss": {"value": 1.5, "global_step": 4},
                                "eval_accuracy": {"value": 0.5, "global_step": 4}}
    assert out["last_eval"] == {"eval": {"global_step": 4, "eval_loss": 1.5, "eval_accuracy": 0.5}}
    text, _ = summarize_text(capsys, str(log_dir))
    assert "model_preparation_time" not in text


def test_manifest_fields_of_the_wrong_type_are_said_and_ignored(tmp_path, capsys):
    log_dir = tmp_path / "logs"
    retained_run(log_dir, manifest=True)
    manifest = log_dir / f"run_manifest_{RUN}.json"
    good = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**good, "started": 12, "train": "x", "segments": 7, "counts": [1],
                                    "max_steps": "abc", "hyperparameters": 3, "eval": True}))
    out = run_json(capsys, str(log_dir))
    assert out["manifest_used"] is True and out["status"] == "completed"  # the fields of the right type
    assert (out["started"], out["max_steps"], out["best_loss"]) == (at(18), None, pytest.approx(0.66))
    _, err = summarize_text(capsys, str(log_dir))
    assert err.splitlines() == [f"seo-trainlog: warning: {manifest}: its {key!r} is {kind}, not {name}; that field "
                                "is not used" for key, kind, name in (
                                    ("started", "an integer", "a string"), ("max_steps", "a string", "an integer"),
                                    ("hyperparameters", "an integer", "an object"), ("segments", "an integer", "a list"),
                                    ("train", "a string", "an object"), ("eval", "a boolean", "an object"),
                                    ("counts", "a list", "an object"))]
    assert table_rows(summarize_text(capsys, str(log_dir))[0])["records"] == COVER_WITH_MANIFEST.replace(
        "totals)", "totals; its started, max_steps, hyperparameters, segments, train, eval, counts of the wrong type "
                   "not used)")


def eval_row(step: int, loss: float, accuracy: float, prefix: str = "eval") -> tuple[str, int, dict]:
    return ("eval", step, {"metric_prefix": prefix, f"{prefix}_loss": loss, f"{prefix}_accuracy": accuracy,
                           f"{prefix}_runtime": 0.1, f"{prefix}_model_preparation_time": 0.0006})


def write_rotated(log_dir: Path, rows: list[tuple[str, int | None, dict]], deleted: int,
                  manifest: dict | None) -> None:
    """``rows`` as a run's metrics files, the first ``deleted`` rows' file removed by retention; the
    rest in a rotated file and the active one; ``manifest`` (if any) beside them."""
    text = lines(rows)
    middle = (deleted + len(text)) // 2
    log_dir.mkdir(parents=True)
    (log_dir / f"performance_metrics_{RUN}.2026-11-30_12-00-30_000000.log").write_text("".join(text[deleted:middle]))
    (log_dir / f"performance_metrics_{RUN}.log").write_text("".join(text[middle:]))
    if manifest is not None:
        (log_dir / f"run_manifest_{RUN}.json").write_text(json.dumps(
            {"schema_version": 1, "run_id": RUN, "started": at(0), "max_steps": 60, "status": "completed", **manifest}))


def test_best_eval_and_evaluations_survive_retention(tmp_path, capsys):
    rows = [("run_start", None, {"schema_version": 1})]
    rows += [train_row(step, 1.0) for step in range(1, 21)] + [eval_row(20, 0.30, 0.90)]  # the best: deleted
    deleted = len(rows)
    rows += [train_row(step, 1.0) for step in range(21, 41)] + [eval_row(40, 0.50, 0.80)]
    rows += [train_row(step, 1.0) for step in range(41, 61)] + [eval_row(60, 0.45, 0.85), eval_row(60, 0.7, 0.6, "test")]
    rows += [("summary", 60, {"status": "completed", "training_duration_s": 60.0})]
    section = {"records": 2, "best": {"eval_loss": {"value": 0.30, "global_step": 20},
                                      "eval_accuracy": {"value": 0.90, "global_step": 20}},
               "last": {"eval": {"global_step": 40, "eval_loss": 0.50, "eval_accuracy": 0.80}}}  # written at step 40
    write_rotated(tmp_path / "with", rows, deleted, {"eval": section})
    out = run_json(capsys, str(tmp_path / "with"))
    assert out["manifest_used"] is True and out["evaluations"] == 2  # max(manifest's 2, the records' 2)
    assert out["best_eval"] == {"eval_loss": {"value": 0.30, "global_step": 20},
                                "eval_accuracy": {"value": 0.90, "global_step": 20}}
    assert out["last_eval"] == {"eval": {"global_step": 60, "eval_loss": 0.45, "eval_accuracy": 0.85},
                                "test": {"global_step": 60, "test_loss": 0.7, "test_accuracy": 0.6}}
    rows_text = table_rows(summarize_text(capsys, str(tmp_path / "with"))[0])
    assert (rows_text["best eval_loss"], rows_text["best eval_accuracy"]) == ("0.3 at step 20", "0.9 at step 20")

    section["records"] = 5  # the manifest counted more than the records hold
    write_rotated(tmp_path / "more", rows, deleted, {"eval": section})
    assert run_json(capsys, str(tmp_path / "more"))["evaluations"] == 5

    write_rotated(tmp_path / "older", rows, deleted, {})  # a manifest written before the eval section
    out = run_json(capsys, str(tmp_path / "older"))
    assert out["manifest_used"] is True and out["evaluations"] == 2
    assert out["best_eval"] == {"eval_loss": {"value": 0.45, "global_step": 60},
                                "eval_accuracy": {"value": 0.85, "global_step": 60}}  # the records' best


def test_counts_whose_records_retention_deleted_are_said_plainly(tmp_path, capsys):
    rows = [("run_start", None, {"schema_version": 1})] + [train_row(step, 1.0) for step in range(1, 11)]
    rows += [("warning", 3, {"message": "old warning"})]
    deleted = len(rows)
    rows += [train_row(step, 1.0) for step in range(11, 31)]
    rows += [("warning", 25, {"message": "a library warning", "source": "transformers"})]
    rows += [("summary", 30, {"status": "completed", "training_duration_s": 30.0})]
    write_rotated(tmp_path / "logs", rows, deleted, {"counts": {"error": 0, "warning": 10, "anomaly": 7}})
    out = run_json(capsys, str(tmp_path / "logs"))
    assert (out["anomaly_count"], out["warnings"], out["anomalies"]) == (7, 10, [])
    assert out["counts_in_records"] == {"errors": 0, "warnings": 1, "anomalies": 0}
    text, _ = summarize_text(capsys, str(tmp_path / "logs"))
    assert table_rows(text)["anomalies"] == "7 anomalies (details removed by retention; 0 in the remaining records)"

    report = tmp_path / "r.html"
    assert main(["report", str(tmp_path / "logs"), "-o", str(report)]) == 0
    html = report.read_text()
    assert ("<h2>Anomalies (7)</h2>\n\n<p>7 of the 7 anomalies were in records removed by retention (their details "
            "are lost); 0 are in the remaining records.</p>") in html
    assert ("<h2>Warnings (10)</h2>\n<ul><li>[transformers] a library warning</li></ul>\n<p>9 of the 10 warnings "
            "were in records removed by retention (their details are lost); 1 is in the remaining records.</p>") in html
    assert "None found" not in html and "more not listed" not in html and "more in the records" not in html

    frame = watch_frame(tmp_path / "logs", width=120)
    assert "alerts (7)" in frame and "none" not in frame
    assert "7 anomalies (details of 7 removed by retention; 0 in the remaining records)" in frame


def test_an_evaluation_only_run_is_not_still_running(tmp_path, capsys):
    rows = [("run_start", None, {"schema_version": 1}), eval_row(0, 1.4, 0.25),
            ("status", 0, {"status": "no_training"})]
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    (log_dir / f"performance_metrics_{RUN}.log").write_text("".join(lines(rows)))
    out = run_json(capsys, str(log_dir))
    assert out["status"] == "no_training" and out["segments"][0]["status"] == "no_training"
    assert out["last_eval"] == {"eval": {"global_step": 0, "eval_loss": 1.4, "eval_accuracy": 0.25}}
    text, _ = summarize_text(capsys, str(log_dir))
    assert table_rows(text)["status"] == "no_training: evaluation only, no training"
    assert "still running" not in text
    capsys.readouterr()
    assert main(["summarize", str(log_dir), "--list"]) == 0
    listed = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(RUN)]
    assert listed == [[RUN, "eval", "only", "0", "n/a", "1.4", "2.0", "s", "0/0"]]
    report = tmp_path / "r.html"
    assert main(["report", str(log_dir), "-o", str(report)]) == 0
    assert "no_training: evaluation only, no training</span></h1>" in report.read_text()
    state = WatchState(RUN, LogConfig())
    for record in read_records(find_runs(log_dir)[0]):
        state.add(record)
    console = Console(file=io.StringIO(), width=100)
    console.print(render_frame(state))
    assert state.finished and f"run {RUN}: no_training: evaluation only, no training" in console.file.getvalue()

    # evaluated first, then trained: the run goes on and ends with its summary
    rows += [train_row(1, 1.0), ("summary", 1, {"status": "completed", "training_duration_s": 1.0})]
    (log_dir / f"performance_metrics_{RUN}.log").write_text("".join(lines(rows[:-1])))
    assert run_json(capsys, str(log_dir))["status"] == "no_summary"
    (log_dir / f"performance_metrics_{RUN}.log").write_text("".join(lines(rows)))
    assert run_json(capsys, str(log_dir))["status"] == "completed"


def test_a_run_resumed_into_another_directory_says_its_records_start_later(tmp_path, capsys):
    rows = [("run_start", None, {"schema_version": 1, "resumed": True}),  # as the writer starts a new directory
            ("segment_start", 5, {"segment": 1, "start_global_step": 5, "resumed_from_checkpoint": "out/checkpoint-5"}),
            ("hyperparameters", 0, {"hyperparameters": {"run": {"max_steps": 10}}})]
    rows += [train_row(step, 1.0) for step in range(6, 11)]
    rows += [("summary", 10, {"segment": 1, "status": "completed", "training_duration_s": 5.0})]
    log_dir = tmp_path / "logs2"
    log_dir.mkdir()
    (log_dir / f"performance_metrics_{RUN}.log").write_text("".join(lines(rows)))
    out = run_json(capsys, str(log_dir))
    assert out["records_cover"] == {"first_global_step": 6, "last_global_step": 10, "complete": False}
    assert out["resumed_here"] is True and out["status"] == "completed"
    assert out["segments"] == [{"segment": 1, "started": at(1), "start_global_step": 5, "status": "completed",
                                "training_duration_s": 5.0}]
    text, err = summarize_text(capsys, str(log_dir))
    assert table_rows(text)["records"] == ("records cover global_step 6-10 only: the run was resumed into this log "
                                           "directory; its earlier records are in the log directory it was first "
                                           "logged to")
    assert err == ""
    capsys.readouterr()
    assert main(["summarize", str(log_dir), "--list"]) == 0
    listed = capsys.readouterr().out
    assert f"{RUN} completed* 10/10" in " ".join(listed.split())
    assert "resumed from another one" in listed


def test_a_run_without_train_records_shows_the_trainers_totals(tmp_path, capsys):
    rows = [("run_start", None, {"schema_version": 1}),
            ("model", 8, {"operation": "epoch_1", "duration_s": 0.05}),
            ("model", 20, {"operation": "training", "duration_s": 0.1194, "train_samples_per_second": 1340.156,
                           "train_steps_per_second": 167.52, "total_flos": 19438848.0,
                           "train_loss": 1.3863951683044433}),
            ("summary", 20, {"status": "completed", "final_loss": None, "best_loss": None,
                             "training_duration_s": 0.1129})]
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    (log_dir / f"performance_metrics_{RUN}.log").write_text("".join(lines(rows)))
    out = run_json(capsys, str(log_dir))
    assert (out["samples_per_second"], out["steps_per_second"], out["throughput_source"]) == (1340.156, 167.52,
                                                                                             "trainer")
    assert (out["final_loss"], out["best_loss"], out["mean_train_loss"]) == (None, None, 1.3863951683044433)
    rows_text = table_rows(summarize_text(capsys, str(log_dir))[0])
    assert (rows_text["final loss"], rows_text["best loss"]) == ("n/a", "n/a")
    assert rows_text["mean train loss"] == ("1.3864 (Trainer's train_loss, the mean over train(); no train record "
                                            "was logged: logging_steps longer than the run?)")
    assert rows_text["throughput"] == "1340 samples/s, 167.5 steps/s (Trainer's, over the whole train())"


def watch_frame(log_dir, width: int) -> str:
    """What ``watch`` draws for the one run in ``log_dir`` (its manifest used, its files read once)."""
    from seo_trainlog.read.reader import read_manifest

    (run,) = find_runs(log_dir)
    state = WatchState(RUN, LogConfig(), manifest=read_manifest(run), rotated=True)
    follower = RunFollower(run)
    for record in follower.poll():
        state.add(record)
    follower.close()
    console = Console(file=io.StringIO(), width=width)
    console.print(render_frame(state))
    return console.file.getvalue()


def test_watch_coverage_line_uses_the_panels_width(tmp_path):
    retained_run(tmp_path / "logs", manifest=True)
    frame = watch_frame(tmp_path / "logs", width=80).splitlines()
    assert frame[3:5] == [  # wrapped at the panel's edge, not within the progress bar's 40 columns
        f"│ {line:<76} │" for line in ("records cover global_step 16-60 only: older records were removed by",
                                        f"retention (run_manifest_{RUN}.json gives the run's totals)")]


def test_watch_shows_the_manifests_last_evaluation_when_its_record_was_deleted(tmp_path):
    from seo_trainlog.read.reader import read_manifest

    rows = [("run_start", None, {"schema_version": 1})] + [train_row(step, 1.0) for step in range(1, 21)]
    rows += [eval_row(20, 0.30, 0.90)]
    deleted = len(rows)
    rows += [train_row(step, 1.0) for step in range(21, 41)]
    write_rotated(tmp_path / "logs", rows, deleted, {"eval": {"records": 1, "best": {}, "last": {
        "eval": {"global_step": 20, "eval_loss": 0.30, "eval_accuracy": 0.90}}}})
    (run,) = find_runs(tmp_path / "logs")
    state = WatchState(RUN, LogConfig(), manifest=read_manifest(run), rotated=True)
    follower = RunFollower(run)
    for record in follower.poll():
        state.add(record)
    assert state.latest_eval == {"eval_loss": 0.30, "eval_accuracy": 0.90}
    state.add({"event": "eval", "global_step": 40, "metric_prefix": "eval", "eval_loss": 0.25, "eval_runtime": 0.1})
    assert state.latest_eval == {"eval_loss": 0.25}  # a remaining record's, once read
    follower.close()


def test_the_data_wait_row_names_what_its_percentage_is_of(tmp_path, capsys):
    """``data_wait_pct`` is 100 x wait / (step time + wait) (``StepTimer.drain``): the summary's row says so."""
    rows = [("run_start", None, {"schema_version": 1}),
            ("train", 10, {"loss": 0.5, "interval_s": 1.0, "steps": 10, "samples_per_second": 80.0,
                           "step_time_s": 0.08, "data_wait_s": 0.02, "data_wait_pct": 20.0}),
            ("summary", 10, {"status": "completed", "final_loss": 0.5, "training_duration_s": 1.0,
                             "data_wait_pct": 20.0})]
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    (log_dir / f"performance_metrics_{RUN}.log").write_text("".join(lines(rows)))
    assert run_json(capsys, str(log_dir))["data_wait_pct"] == 20.0
    assert table_rows(summarize_text(capsys, str(log_dir))[0])["data wait"] == "20% of step + wait time"
