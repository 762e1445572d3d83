"""``seo-trainlog``: summaries, plots, reports and the live view, read from real runs' log files (and
from metrics files written with the real JSON writer where a run cannot easily produce the case)."""

from __future__ import annotations

import base64
import io
import json
import shutil
import struct
import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import RunFiles, quiet, tiny_model
from matplotlib.image import imread
from rich.console import Console
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from seo_trainlog import LogConfig, TrainLogCallback, TrainLogger
from seo_trainlog.read.analysis import Series
from seo_trainlog.record.format import json_line
from seo_trainlog.read.reader import find_runs, read_records
from seo_trainlog.read.live import WatchState, render_frame, watch
from seo_trainlog.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN = "20261130_120000"
ERROR_MESSAGE = "<script>alert('x')</script> & bad input"


def train(log_dir: Path, tokenizer, dataset, evaluate: bool = False, **config):
    extra = {"eval_strategy": "steps", "eval_steps": 2} if evaluate else {}
    args = TrainingArguments(output_dir=str(log_dir.parent / "out"), per_device_train_batch_size=8, max_steps=6,
                             logging_steps=1, learning_rate=1e-3, report_to="none", use_cpu=True, save_strategy="no",
                             disable_tqdm=True, seed=0, dataloader_num_workers=0, **extra)
    trainer = Trainer(model=tiny_model(), args=args, train_dataset=dataset, eval_dataset=dataset if evaluate else None,
                      data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer)
    trainer.add_callback(TrainLogCallback(quiet(log_dir, **config)))
    trainer.train()
    return trainer.state


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer, tiny_dataset):
    """Two real runs in one directory: a plain one, then one with evaluations, to which an error whose
    message needs HTML escaping is appended afterwards (with its traceback)."""
    log_dir = tmp_path_factory.mktemp("insight") / "logs"
    states = [train(log_dir, tokenizer, tiny_dataset), train(log_dir, tokenizer, tiny_dataset, evaluate=True)]
    ids = sorted({p.name[len("seo_engine_"):-len(".log")] for p in log_dir.glob("seo_engine_*.log")})
    with TrainLogger(quiet(log_dir), run_id=ids[1]) as tlog:
        try:
            raise ValueError(ERROR_MESSAGE)
        except ValueError as exc:
            tlog.log_error(exc, context="Data validation", operation="forward_pass")
    return SimpleNamespace(log_dir=log_dir, states=states, ids=ids)


def run_json(capsys, *args: str) -> dict:
    capsys.readouterr()  # drop what came before (Trainer prints its logs without tqdm)
    assert main(["summarize", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_summarize_json_matches_the_trainer(runs, capsys):
    out = run_json(capsys, str(runs.log_dir))  # the latest run by default
    state = runs.states[1]
    losses = [(entry["loss"], entry["step"]) for entry in state.log_history if "loss" in entry]
    evals = [(entry["eval_loss"], entry["step"]) for entry in state.log_history if "eval_loss" in entry]
    assert (out["run_id"], out["status"]) == (runs.ids[1], "completed")
    assert (out["global_step"], out["max_steps"], out["epoch"]) == (state.global_step, state.max_steps, state.epoch)
    assert out["final_loss"] == losses[-1][0]
    assert (out["best_loss"], out["best_loss_step"]) == min(losses)
    assert out["evaluations"] == len(evals) == 3
    assert out["best_eval"]["eval_loss"] == dict(zip(("value", "global_step"), min(evals)))
    assert out["last_eval"]["eval"]["eval_loss"] == evals[-1][0]

    records = RunFiles(runs.log_dir, runs.ids[1]).records()
    steps = [r for r in records if r["event"] == "train"]
    busy_s = sum(r["interval_s"] for r in steps)
    assert out["samples_per_second"] == pytest.approx(sum(r["samples_per_second"] * r["interval_s"] for r in steps)
                                                      / busy_s)
    assert out["steps_per_second"] == pytest.approx(6 / busy_s)
    summary = next(r for r in records if r["event"] == "summary")
    assert out["training_duration_s"] == summary["training_duration_s"]
    assert out["data_wait_pct"] == summary["data_wait_pct"]
    assert out["peak_rss_mb"] == max([summary["peak_rss_mb"]] + [r["rss_mb_max"] for r in steps])
    assert out["early_stopping_triggered"] is False
    assert out["errors"] == 1
    assert out["warnings"] == sum(r["event"] == "warning" or (r["event"] == "anomaly" and r["kind"] != "non_finite")
                                  for r in records)
    assert (out["anomaly_count"], out["anomalies"]) == (0, [])


def test_summarize_tables_and_the_run_list(runs, capsys):
    assert main(["summarize", str(runs.log_dir), "--run", runs.ids[0]]) == 0
    text = capsys.readouterr().out
    assert f"Run {runs.ids[0]}" in text
    for row in ("status               │ completed", "steps                │ 6 / 6", "anomalies            │ none"):
        assert row in text

    listed = run_json(capsys, str(runs.log_dir), "--list")
    assert [run["run_id"] for run in listed["runs"]] == runs.ids
    assert [run["global_step"] for run in listed["runs"]] == [6, 6]
    assert main(["summarize", str(runs.log_dir), "--list"]) == 0
    table = capsys.readouterr().out
    assert all(run_id in table for run_id in runs.ids)


def test_plot_writes_a_readable_png(runs, tmp_path, capsys):
    out = tmp_path / "run.png"
    assert main(["plot", str(runs.log_dir), "-o", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert struct.unpack(">II", data[16:24]) == (1400, 900)  # IHDR width, height
    image = imread(out)
    assert image.std() > 0.05
    colours = {tuple(pixel) for pixel in (image[::5, ::5, :3] * 255).astype(int).reshape(-1, 3)}
    assert len(colours) > 50  # lines, text and legends, not a blank canvas


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_report_is_self_contained_and_escaped(runs, tmp_path):
    out = tmp_path / "report.html"
    assert main(["report", str(runs.log_dir), "-o", str(out)]) == 0
    html = out.read_text(encoding="utf-8")
    page = Page()
    page.feed(html)
    text = "".join(page.text)
    names = [tag for tag, _ in page.tags]
    assert "script" not in names and "link" not in names
    sources = [attrs.get("src") or attrs.get("href") for tag, attrs in page.tags if "src" in attrs or "href" in attrs]
    assert len(sources) == 1 and sources[0].startswith("data:image/png;base64,")
    assert base64.b64decode(sources[0].split(",", 1)[1])[:8] == PNG_SIGNATURE
    assert ERROR_MESSAGE in text and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; bad input" in html
    assert "Traceback (most recent call last):" in text and "Data validation" in text
    assert f"Training run {runs.ids[1]}: completed" in text
    assert "All 2 runs in this directory" in text and runs.ids[0] in text
    best = min(entry["eval_loss"] for entry in runs.states[1].log_history if "eval_loss" in entry)
    assert f"best eval_loss{best:.6g} at step" in text
    assert "training_args.learning_rate0.001" in text  # hyperparameters: name cell, value cell


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium is not installed")
def test_report_renders_in_headless_chromium(runs, tmp_path):
    out, shot = tmp_path / "report.html", tmp_path / "shot.png"
    assert main(["report", str(runs.log_dir), "-o", str(out)]) == 0
    subprocess.run([shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                    "--window-size=1280,2000", out.as_uri()], capture_output=True, timeout=120, check=True)
    image = imread(shot)
    assert image.shape[:2] == (2000, 1280)
    ink = (image[..., :3] < 0.9).any(axis=-1).mean()
    assert 0.02 < ink < 0.9 and image.std() > 0.05
    colours = {tuple(pixel) for pixel in (image[::4, ::4, :3] * 255).astype(int).reshape(-1, 3)}
    assert len(colours) > 100  # the embedded figure rendered, not only black text on white


def test_rotated_files_are_read_in_order_as_one_stream(tmp_path, tokenizer, tiny_dataset, capsys):
    log_dir = tmp_path / "logs"
    state = train(log_dir, tokenizer, tiny_dataset, rotation="1 KB", retention=1000)
    (run,) = find_runs(log_dir)
    assert len(run.paths) >= 4 and run.paths[-1].name == f"performance_metrics_{run.run_id}.log"
    records = list(read_records(run))
    assert len(records) == sum(len(path.read_bytes().splitlines()) for path in run.paths)
    assert [r["global_step"] for r in records if r["event"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert (records[0]["event"], records[-1]["event"]) == ("run_start", "summary")
    out = run_json(capsys, str(log_dir))
    assert out["final_loss"] == [entry["loss"] for entry in state.log_history if "loss" in entry][-1]


def write_run(log_dir: Path, rows: list[tuple[str, int | None, dict]], run_id: str = RUN) -> Path:
    """A metrics file written with the callback's own JSON writer, one second per record."""
    log_dir.mkdir(parents=True, exist_ok=True)
    start = datetime(2026, 11, 30, 12, tzinfo=timezone.utc)
    path = log_dir / f"performance_metrics_{run_id}.log"
    path.write_text("".join(json_line(event, run_id, step, None if step is None else step / 100, values,
                                      time=start + timedelta(seconds=index)) + "\n"
                            for index, (event, step, values) in enumerate(rows)), encoding="utf-8")
    return path


def synthetic_rows(steps: int = 40, spike_at: int | None = None, summary: bool = True) -> list:
    rows = [("run_start", None, {"schema_version": 1}), ("hyperparameters", 0, {"hyperparameters": {
        "run": {"max_steps": steps}}})]
    for step in range(1, steps + 1):
        loss = 2.0 / (1 + step / 10) + 0.01 * (step % 3)
        rows.append(("train", step, {"loss": loss * (5 if step == spike_at else 1), "learning_rate": 1e-3,
                                     "grad_norm": 1.0 + 0.05 * (step % 4), "samples_per_second": 100.0 + step % 5,
                                     "rss_mb": 800.0 + step % 2, "cpu_pct": 90.0}))
    if summary:
        rows.append(("summary", steps, {"status": "completed", "training_duration_s": float(steps)}))
    return rows


def cli_error(capsys, *args: str) -> str:
    assert main(list(args)) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("seo-trainlog: error: "), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    return lines[0]


def test_clear_one_line_errors(tmp_path, capsys):
    assert "no such log directory" in cli_error(capsys, "summarize", str(tmp_path / "missing"))
    assert "no such log directory" in cli_error(capsys, "report", str(tmp_path / "missing"), "-o", "x.html")
    (tmp_path / "empty").mkdir()
    assert "holds no performance_metrics_*.log file" in cli_error(capsys, "plot", str(tmp_path / "empty"), "-o", "x.png")

    path = write_run(tmp_path / "broken", synthetic_rows(5))
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3] + ['{"time": "2026-11-30T12:00:03', *lines[3:]]) + "\n")
    assert main(["summarize", str(tmp_path / "broken")]) == 0  # a record cut short (a failed write): skipped
    assert f"{path}: line 4 is a record cut short" in capsys.readouterr().err
    path.write_text("\n".join(lines[:3] + ['garbage', *lines[3:]]) + "\n")
    assert f"{path}: line 4 is not valid JSON" in cli_error(capsys, "summarize", str(tmp_path / "broken"))

    write_run(tmp_path / "newer", [("run_start", None, {"schema_version": 2})] + synthetic_rows(5)[1:])
    assert "schema version 2" in cli_error(capsys, "summarize", str(tmp_path / "newer"))
    assert f"no run 'nope' in {tmp_path / 'newer'}; runs: {RUN}" in cli_error(
        capsys, "summarize", str(tmp_path / "newer"), "--run", "nope")
    write_run(tmp_path / "good", synthetic_rows(5))
    assert "give a file name ending in .png" in cli_error(capsys, "plot", str(tmp_path / "good"), "-o",
                                                          str(tmp_path / "x.xyz"))
    assert not (tmp_path / "x.xyz").exists()
    assert "No such file or directory" in cli_error(capsys, "plot", str(tmp_path / "good"), "-o",
                                                    str(tmp_path / "no" / "x.png"))


def test_truncated_last_line_is_skipped_with_a_warning(tmp_path, capsys):
    path = write_run(tmp_path / "logs", synthetic_rows(12, summary=False))
    with open(path, "a", encoding="utf-8") as out:
        out.write('{"time": "2026-11-30T12:00:14.000+00:00", "run_id": "2026')  # killed mid-write
    out = run_json(capsys, str(tmp_path / "logs"))
    assert out["global_step"] == 12 and out["status"] == "no_summary"
    assert main(["summarize", str(tmp_path / "logs")]) == 0
    captured = capsys.readouterr()
    assert captured.err == (f"seo-trainlog: warning: {path}: the last line (line 15) is incomplete, as when a run is "
                            "still writing it or was killed; it is skipped\n")
    assert "no summary: still running, or ended without one" in captured.out


def test_a_complete_broken_last_line_is_an_error(tmp_path, capsys):
    path = write_run(tmp_path / "logs", synthetic_rows(3, summary=False))
    with open(path, "a", encoding="utf-8") as out:
        out.write("not json at all\n")  # ended by its newline: written whole, and wrong
    message = cli_error(capsys, "summarize", str(tmp_path / "logs"))
    assert "line 6 is not valid JSON" in message and path.name in message


def test_anomalies_found_offline_and_logged_online_count_once(tmp_path, capsys):
    rows = synthetic_rows(40, spike_at=30)
    online = {"kind": "loss_spike", "global_step": 30, "message": "Loss spike at global_step 30: ...",
              "value": 1.0, "threshold": 0.5}
    rows.insert(rows.index(next(r for r in rows if r[1] == 30)) + 1, ("anomaly", 30, online))
    rows.insert(-1, ("anomaly", 35, {**online, "kind": "memory_creep", "global_step": 35, "message": "creep"}))
    write_run(tmp_path / "logs", rows)
    out = run_json(capsys, str(tmp_path / "logs"))
    assert out["anomaly_count"] == 2
    assert [(a["kind"], a["global_step"], a["source"]) for a in out["anomalies"]] == [
        ("loss_spike", 30, "detected"), ("memory_creep", 35, "logged")]
    assert main(["plot", str(tmp_path / "logs"), "-o", str(tmp_path / "a.png")]) == 0
    assert (tmp_path / "a.png").read_bytes()[:8] == PNG_SIGNATURE


def test_gpu_readings_in_the_summary(tmp_path, capsys):
    rows = synthetic_rows(4, summary=False)
    for event, step, values in rows:
        if event == "train":
            values.update(gpu0_util_pct=40.0 + 10 * step, gpu1_util_pct=20.0, gpu0_mem_used_mb=5000.0 + step,
                          gpu0_mem_used_mb_max=5100.0 + step, cuda0_max_allocated_mb=3000.0 - step,
                          sys_mem_used_mb_max=9000.0, rss_mb_max=801.0 + step)
    write_run(tmp_path / "logs", rows)
    out = run_json(capsys, str(tmp_path / "logs"))
    # per record the mean over devices ((40 + 10 step + 20) / 2), then over the records
    assert out["mean_gpu_util_pct"] == pytest.approx(sum((60 + 10 * step) / 2 for step in range(1, 5)) / 4)
    assert out["peak_gpu_mem_mb"] == {"gpu0_mem_used_mb": 5104.0, "cuda0_max_allocated_mb": 2999.0}
    assert out["peak_rss_mb"] == 805.0


def test_series_stay_bounded_and_cover_the_run_evenly():
    series = Series(("value",), lambda record: (record["global_step"], record["value"]), max_points=10)
    for step in range(1, 1001):
        series.offer({"global_step": step, "value": 2 * step})
    rows = series.rows()
    steps = [row[0] for row in rows]
    assert len(rows) <= 21 and (steps[0], steps[-1]) == (1, 1000)
    assert {later - earlier for earlier, later in zip(steps[:-2], steps[1:-1])} == {series.stride}
    assert series.column("value") == (steps, [2 * step for step in steps])


def test_render_frame_shows_progress_eta_metrics_and_alerts():
    state = WatchState(RUN, LogConfig())
    start = datetime(2026, 11, 30, 12, tzinfo=timezone.utc)
    state.add({"event": "hyperparameters", "global_step": 0, "hyperparameters": {"run": {"max_steps": 100}}})
    for step in range(1, 31):
        state.add({"event": "train", "global_step": step, "epoch": step / 50,
                   "time": (start + timedelta(seconds=step)).isoformat(), "loss": 1.0 / step,
                   "grad_norm": 40.0 if step == 25 else 1.0 + 0.01 * (step % 3), "rss_mb": 900.0,
                   "sys_mem_used_mb": 3000.0, "sys_mem_available_mb": 9000.0, "gpu0_util_pct": 87.5})
        if step == 25:  # the callback's own record of the same anomaly
            state.add({"event": "anomaly", "global_step": 25, "kind": "grad_explosion", "user_global_step": 25,
                       "message": "Gradient explosion at global_step 25"})
    state.add({"event": "eval", "global_step": 30, "metric_prefix": "eval", "eval_loss": 0.25, "eval_runtime": 1.0})
    console = Console(file=io.StringIO(), width=110)
    console.print(render_frame(state))
    text = console.file.getvalue()
    assert f"run {RUN}: running" in text
    assert "global_step 30 / 100 (30.0%)" in text and "epoch 0.6" in text
    assert "ETA 1 min 10 s" in text  # 70 steps left at the one step per second of the records
    assert "eval_loss" in text and "0.25" in text and "eval_runtime" not in text
    assert "alerts (1)" in text and "step 25: Gradient explosion at global_step 25" in text
    assert "900 of 12,000 MiB" in text and "gpu0 util" in text and "87.5 %" in text
    assert "█" in text and "▁" in text  # the loss sparkline


def test_watch_follows_a_growing_rotating_file_until_the_summary(tmp_path):
    log_dir = tmp_path / "logs"
    lines = [json_line(event, RUN, step, None, values) + "\n" for event, step, values in synthetic_rows(30, spike_at=20)]
    active = log_dir / f"performance_metrics_{RUN}.log"

    def training():
        time.sleep(0.2)  # watch starts before the directory exists, and waits for the run
        log_dir.mkdir()
        time.sleep(0.2)
        for index, line in enumerate(lines):
            if index == 15:  # loguru's rotation: rename, then a new active file
                active.rename(log_dir / f"performance_metrics_{RUN}.2026-11-30_12-00-00_000000.log")
            with open(active, "a", encoding="utf-8") as out:
                out.write(line[:25])  # a line in two writes: read only once complete
                out.flush()
                time.sleep(0.01)
                out.write(line[25:])

    writer = threading.Thread(target=training)
    writer.start()
    console = Console(file=io.StringIO(), width=110)
    started = time.monotonic()
    code = watch(log_dir, None, LogConfig(), console, interval_s=0.05, timeout_s=30)
    writer.join()
    assert code == 0 and time.monotonic() - started < 30
    text = console.file.getvalue()
    assert text.startswith(f"waiting for a run in {log_dir} (Ctrl-C to stop)\n")
    assert f"run {RUN}: completed" in text and "global_step 30 / 30 (100.0%)" in text
    assert "alerts (1)" in text and "Loss spike at global_step 20" in text


def test_watch_times_out_on_a_run_without_summary(tmp_path):
    write_run(tmp_path / "logs", synthetic_rows(5, summary=False))
    console = Console(file=io.StringIO(), width=110)
    assert watch(tmp_path / "logs", None, LogConfig(), console, interval_s=0.05, timeout_s=0.3) == 1
    assert f"run {RUN}: running" in console.file.getvalue()
    assert watch(tmp_path / "none", None, LogConfig(), console, interval_s=0.05, timeout_s=0.2) == 1
