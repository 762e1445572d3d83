"""Anomalies found during training: written once, handed to alert hooks and the alert command."""

from __future__ import annotations

import json
import sys
import threading
import time

import pytest
from conftest import RunFiles, quiet

from seo_trainlog import TrainLogCallback, cli


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
    started = time.perf_counter()
    trainer.train()
    # two 5 s commands: killed after their 0.5 s, beside training; at its end train() waits for the
    # queued alerts (at most 0.5 s each) and returns, however long the commands would have run
    assert time.perf_counter() - started < 10
    run = RunFiles(log_dir)
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
