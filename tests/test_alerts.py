"""Anomalies found during training: written once, handed to alert hooks and the alert command."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import psutil
import pytest
from conftest import RunFiles, quiet

from seo_trainlog import TrainLogCallback, cli
from seo_trainlog.watch.alerts import AlertDispatcher

HERE = Path(__file__).parent

ANOMALY = {"kind": "loss_spike", "global_step": 3, "message": "Loss spike at global_step 3", "value": 9.0,
           "threshold": 1.0}


def spike_at(trainer, call: int, factor: float = 100.0):
    calls = []

    def scale_loss(module, args, output):
        calls.append(1)
        if len(calls) == call:
            output.loss = output.loss * factor
        return output

    trainer.model.register_forward_hook(scale_loss)


def test_a_loss_spike_is_written_once_and_alerted(make_trainer, log_dir, tmp_path, capsys, monkeypatch):
    received = []
    stdin_copy = tmp_path / "alert.json"
    command = f"{sys.executable} -c \"import sys; open({str(stdin_copy)!r}, 'a').write(sys.stdin.read() + '\\n')\""
    trainer = make_trainer(max_steps=24)
    spike_at(trainer, 16)
    # a tiny CPU model's throughput is too noisy for the drop detector: only the spike (and the
    # gradient explosion it causes, since the loss was scaled) are of interest here
    config = quiet(log_dir, alert_cmd=command, throughput_drop_pct=99)
    trainer.add_callback(TrainLogCallback(config, alert_hooks=[received.append]))
    trainer.train()

    run = RunFiles(log_dir)
    events = [(e["kind"], e["global_step"]) for e in run.records("anomaly")]
    assert all("user_global_step" not in e for e in run.records("anomaly"))  # the record's own step, said once
    assert events == [("loss_spike", 16), ("grad_explosion", 16)]
    warnings = [m for m in run.messages("errors") if m.startswith("Anomaly: ")]
    assert len(warnings) == 2 and warnings[0].startswith("Anomaly: Loss spike at global_step 16: loss ")
    assert [(a["kind"], a["global_step"]) for a in received] == events
    from_command = [json.loads(line) for line in stdin_copy.read_text().splitlines()]
    assert from_command == received

    capsys.readouterr()  # training's own output
    monkeypatch.setenv("SEO_TRAINLOG_THROUGHPUT_DROP_PCT", "99")  # the offline detector: the run's thresholds
    assert cli.main(["summarize", str(log_dir), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)["anomalies"]
    assert [(a["kind"], a["global_step"]) for a in found] == events  # found online and offline: once


def seconds_since_summary(run: RunFiles) -> float:
    """Seconds from the run's summary record (written before the wait for alerts) to now: how long
    the end of the run waited (training itself is slow on a loaded machine, and not timed)."""
    return time.time() - datetime.fromisoformat(run.records("summary")[0]["time"]).timestamp()


def test_failing_and_slow_alerts_never_hold_training_back(make_trainer, log_dir):
    calls = []

    threads = set()

    def broken(anomaly):
        calls.append(anomaly["kind"])
        threads.add(threading.get_ident())
        raise ConnectionError("pager unreachable")

    trainer = make_trainer(max_steps=30)
    spike_at(trainer, 16)
    spike_at(trainer, 27)
    config = quiet(log_dir, alert_cmd="sleep 5", alert_timeout_s=0.5, throughput_drop_pct=99, grad_norm_jump=1e6)
    trainer.add_callback(TrainLogCallback(config, alert_hooks=[broken]))
    trainer.train()
    # two 5 s commands: killed after their 0.5 s, beside training; at its end train() waits for the
    # queued alerts (at most 0.5 s each) and returns, however long the commands would have run
    run = RunFiles(log_dir)
    assert seconds_since_summary(run) < 10
    assert calls == ["loss_spike", "loss_spike"]
    assert threading.get_ident() not in threads  # hooks never run on the training thread
    failures = [m for m in run.messages("errors") if m.startswith("alert hook ")]
    assert len(failures) == 2  # one per hook, not one per anomaly
    assert any("broken failed (reported once" in m and "ConnectionError: pager unreachable" in m for m in failures)
    assert any("command 'sleep 5' failed" in m and "TimeoutExpired" in m for m in failures)


def test_no_detection_when_turned_off(make_trainer, log_dir):
    trainer = make_trainer(max_steps=24)
    spike_at(trainer, 16)
    trainer.add_callback(TrainLogCallback(quiet(log_dir, detect_anomalies=False)))
    trainer.train()
    assert RunFiles(log_dir).records("anomaly") == []


def test_alert_hooks_must_be_callable():
    with pytest.raises(TypeError, match="alert_hooks must be callables, got str"):
        TrainLogCallback(alert_hooks=["echo"])


# ---------------------------------------------------------------------------------------- alert commands


def alive(pid: int) -> bool:
    """A process that has not ended (a zombie waiting to be reaped by PID 1 has ended)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def still_running(pids: list[int], within_s: float = 10.0) -> list[int]:
    """Those of ``pids`` still running after ``within_s`` seconds at most (polled)."""
    deadline = time.monotonic() + within_s
    while any(map(alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if alive(pid)]


def wait_for(condition, within_s: float = 20.0):
    deadline = time.monotonic() + within_s
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


@pytest.fixture
def pid_file(tmp_path):
    """A file the alert command writes its processes' ids to; those still running at the end of the
    test (the defect) are killed, so that a failing test leaves nothing behind."""
    path = tmp_path / "pids"
    yield path
    for pid in read_pids(path):
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def read_pids(path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def test_a_command_past_its_timeout_is_killed_with_all_it_started(pid_file):
    reports = []
    command = f"echo $$ >> {pid_file}; sleep 1000 & echo $! >> {pid_file}; exec sleep 1000"
    alerts = AlertDispatcher([], command, timeout_s=0.5, report_failure=reports.append)
    alerts.send(ANOMALY)
    assert wait_for(lambda: reports)
    started = read_pids(pid_file)
    assert len(started) == 2  # the shell and the sleep it put in the background
    assert still_running(started) == []  # killed at the timeout, before the dispatcher closes
    assert reports == [f"alert hook command {command!r} failed (reported once; it keeps being called): "
                       f"TimeoutExpired: Command {command!r} timed out after 0.5 seconds"]
    assert alerts.close(wait_s=0.5) == 0
    assert reports[1:] == []


def test_what_a_command_leaves_in_the_background_is_killed_at_its_timeout(pid_file):
    reports = []
    alerts = AlertDispatcher([], f"sleep 1000 & echo $! >> {pid_file}", timeout_s=0.5, report_failure=reports.append)
    alerts.send(ANOMALY)
    started = wait_for(lambda: read_pids(pid_file))
    assert len(started) == 1
    assert still_running(started) == []  # the shell exited at once; its group was killed 0.5 s after it started
    assert alerts.close(wait_s=0.5) == 0
    assert reports == []  # exit status 0: delivered


def test_what_a_command_leaves_in_the_background_is_killed_at_run_end(make_trainer, log_dir, pid_file):
    trainer = make_trainer(max_steps=24)
    spike_at(trainer, 16)
    config = quiet(log_dir, alert_cmd=f"sleep 1000 & echo $! >> {pid_file}", alert_timeout_s=300,
                   throughput_drop_pct=99, flush_interval_s=0)
    trainer.add_callback(TrainLogCallback(config))
    trainer.train()
    run = RunFiles(log_dir)
    assert seconds_since_summary(run) < 10  # the commands exited at once: nothing to wait for
    anomalies = run.records("anomaly")
    pids = wait_for(lambda: len(read_pids(pid_file)) == len(anomalies) and read_pids(pid_file))
    assert len(anomalies) == 2 and len(pids) == 2
    assert still_running(pids) == []  # within 300 s of their start, but the run has ended
    assert [m for m in run.messages("errors") if m.startswith("alert")] == []


def test_a_commands_output_is_never_held_in_memory():
    reports = []
    # 200 MB on stdout and 100 MB on stderr; then the last line, the failure the report shows
    command = ("head -c 200000000 /dev/zero; yes noise | head -c 100000002 >&2; "
               "echo the last line >&2; exit 3")
    process, peak_mb = psutil.Process(), []
    baseline_mb = process.memory_info().rss / 2**20
    alerts = AlertDispatcher([], command, timeout_s=120, report_failure=reports.append)
    alerts.send(ANOMALY)
    while not reports and len(peak_mb) < 60_000:  # at most about 5 minutes
        peak_mb.append(process.memory_info().rss / 2**20)
        time.sleep(0.005)
    assert max(peak_mb) - baseline_mb < 64, (baseline_mb, max(peak_mb))  # the old capture_output: > 300 MB
    assert alerts.close(wait_s=0.5) == 0
    prefix = (f"alert hook command {command!r} failed (reported once; it keeps being called): "
              "RuntimeError: exit status 3: ")
    assert len(reports) == 1 and reports[0].startswith(prefix)
    tail = reports[0][len(prefix):]
    assert len(tail) == 300 and tail.endswith("noise\nnoise\nthe last line")
    assert set(tail.split()[1:-3]) == {"noise"}  # (the first word may be cut)


# ---------------------------------------------------------------------------------------- the end of a run


def run_child(log_dir, mode: str, work_dir) -> tuple[subprocess.CompletedProcess, float]:
    """alerts_child.py in MODE; the result and the seconds from its signal (if any) to its exit."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE.parent)}
    result = subprocess.run([sys.executable, str(HERE / "alerts_child.py"), str(log_dir), mode, str(work_dir)],
                            env=env, capture_output=True, text=True, timeout=300)
    ended = time.time()
    signalled = work_dir / "signalled"
    return result, ended - float(signalled.read_text()) if signalled.exists() else float("nan")


def undelivered(run: RunFiles) -> tuple[list[str], list[str]]:
    """The "not delivered" warnings: the error log's, the JSON warning events'."""
    return ([m for m in run.messages("errors") if "alerts not delivered" in m],
            [r["message"] for r in run.records("warning") if "alerts not delivered" in r["message"]])


def test_sigterm_with_alerts_pending_ends_the_process_at_once(log_dir, tmp_path, pid_file):
    # the first alert's command (sleep 1000, and one in the background) runs, the second is queued:
    # the summary is written and flushed, the alerts get at most 1 s, then SIGTERM does its work
    result, shutdown_s = run_child(log_dir, "sigterm", tmp_path)
    assert result.returncode == -signal.SIGTERM, result.stderr[-3000:]
    assert shutdown_s < 10, shutdown_s  # 1.1 s measured (the 1 s grace, then SIGTERM); 60 s before
    run = RunFiles(log_dir)
    assert [r["status"] for r in run.records("summary")] == ["terminated"]
    assert "Status: terminated" in run.messages("training_progress")
    anomalies = [(a["kind"], a["global_step"]) for a in run.records("anomaly")]
    assert anomalies == [("loss_spike", 16), ("grad_explosion", 16)]
    in_errors, in_json = undelivered(run)
    command = f"echo $$ >> {pid_file}; sleep 1000 & echo $! >> {pid_file}; exec sleep 1000"
    assert len(in_errors) == 1 and in_json == in_errors
    assert re.fullmatch(rf"2 alerts not delivered: alert hook command {re.escape(repr(command))} was still "
                        r"running 1\.\d s after the run ended; its process group was killed", in_errors[0])
    started = read_pids(pid_file)
    assert len(started) == 2 and still_running(started) == []


def test_a_second_ctrl_c_while_alerts_are_pending_loses_nothing(log_dir, tmp_path, pid_file):
    # Ctrl-C at step 20; the alert command presses Ctrl-C again as soon as the summary is on disk
    # (the metrics file is otherwise flushed every 60 s): the summary was flushed before the wait
    result, shutdown_s = run_child(log_dir, "interrupt_twice", tmp_path)
    assert result.returncode == -signal.SIGINT, result.stderr[-3000:]
    assert (tmp_path / "second").read_text() == "sent\n"
    assert result.stderr.count("KeyboardInterrupt") >= 2  # the second one interrupted the wait
    assert shutdown_s < 10, shutdown_s
    run = RunFiles(log_dir)
    assert [r["status"] for r in run.records("summary")] == ["interrupted"]
    assert "Status: interrupted" in run.messages("training_progress")
    assert [r["error_type"] for r in run.records("error")] == ["KeyboardInterrupt"]  # the second: not a new error
    in_errors, in_json = undelivered(run)
    assert len(in_errors) == 1 and in_json == in_errors
    assert in_errors[0].startswith("2 alerts not delivered: alert hook command ")
    assert in_errors[0].endswith("; its process group was killed")
    started = read_pids(pid_file)
    assert len(started) == 1 and still_running(started) == []  # the second alert's command never started


def test_a_hook_that_never_returns_does_not_hold_the_process(log_dir, tmp_path):
    result, _ = run_child(log_dir, "blocking_hook", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == "training finished"  # and the process ended: its thread is a daemon
    run = RunFiles(log_dir)
    assert [r["status"] for r in run.records("summary")] == ["completed"]
    in_errors, in_json = undelivered(run)
    assert len(in_errors) == 1 and in_json == in_errors
    assert re.fullmatch(r"2 alerts not delivered: alert hook <lambda> was still running \d+\.\d s after the run ended",
                        in_errors[0])


def test_a_blocked_hook_ends_the_run_on_time_and_never_writes_into_it_later(make_trainer, log_dir):
    release, returned = threading.Event(), threading.Event()

    def blocked(anomaly):
        release.wait()
        returned.set()
        raise ConnectionError("too late")  # would be reported, were the run still open

    trainer = make_trainer(max_steps=24)
    spike_at(trainer, 16)
    config = quiet(log_dir, alert_timeout_s=0.5, throughput_drop_pct=99, flush_interval_s=0)
    trainer.add_callback(TrainLogCallback(config, alert_hooks=[blocked]))
    trainer.train()
    run = RunFiles(log_dir)
    assert seconds_since_summary(run) < 10  # the wait at the end: 1.5 s at most after the hook was called
    files = {path: path.read_bytes() for path in log_dir.glob("*.log")}
    in_errors, in_json = undelivered(run)
    assert len(in_errors) == 1 and in_json == in_errors
    assert re.fullmatch(r"2 alerts not delivered: alert hook test_a_blocked_hook_ends_the_run_on_time_and_never_"
                        r"writes_into_it_later\.<locals>\.blocked was still running \d+\.\d s after the run ended",
                        in_errors[0])
    assert all(thread.daemon for thread in threading.enumerate() if thread.name.startswith("seo_trainlog-alert"))

    release.set()
    assert returned.wait(10)
    time.sleep(0.5)
    assert {path: path.read_bytes() for path in log_dir.glob("*.log")} == files  # nothing written after close


def test_alerts_queued_at_a_completed_run_end_are_delivered(make_trainer, log_dir):
    received = []

    def slow(anomaly):
        time.sleep(0.3)
        received.append(anomaly["kind"])

    trainer = make_trainer(max_steps=24)
    spike_at(trainer, 16)
    # the records (and so the anomalies) are written only at the end of the run: both alerts queued then
    config = quiet(log_dir, alert_timeout_s=5, throughput_drop_pct=99, flush_interval_s=60)
    trainer.add_callback(TrainLogCallback(config, alert_hooks=[slow]))
    trainer.train()
    assert received == ["loss_spike", "grad_explosion"]
    assert undelivered(RunFiles(log_dir)) == ([], [])
