"""scripts/bench_peers.py end to end at its smallest: one round, 5 steps, `none` and `seo_trainlog`.
Only the shape and the plain facts of the JSON are checked, never a time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
METRICS = {"callback_cpu_share", "wall_ratio", "start_ms", "exit_ms", "exit_added_ms", "peak_rss_added_mb",
           "threads_started", "python_threads_started", "bytes_per_logged_step", "on_train_begin_ms", "import_ms",
           "train_s", "train_cpu_s", "callback_cpu_s", "callback_cpu_ms_per_log",
           "helper_processes_cpu_s", "background_cpu_s", "background_cpu_ms_per_log", "recorder_cpu_s",
           "logger_cpu_share"}


def test_bench_peers_writes_one_row_per_configuration(tmp_path):
    output = tmp_path / "peers.json"
    completed = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_peers.py"), "--configs", "none", "seo_trainlog",
         "--models", "tiny", "--logging-steps", "1", "--repeats", "1", "--steps", "5", "--no-warm-up",
         "--output", str(output)], capture_output=True, text=True, timeout=600, check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    results = json.loads(output.read_text(encoding="utf-8"))
    assert results["repeats"] == 1 and results["steps"] == {"tiny": 5}
    assert results["configs"] == ["none", "seo_trainlog"]
    assert list(results["runs"]) == ["tiny, logging_steps=1"]
    table = results["runs"]["tiny, logging_steps=1"]
    assert list(table) == ["none", "seo_trainlog"]
    for config, row in table.items():
        assert set(row) == METRICS | {"runs"}, config
        for metric in METRICS:
            assert set(row[metric]) == {"min", "median", "max"}, (config, metric)
            assert row[metric]["min"] <= row[metric]["median"] <= row[metric]["max"], (config, metric)
        (run,) = row["runs"]
        assert run["logged_steps"] == 6, config  # on_log events: 5 steps at logging_steps=1, the closing summary
    none, ours = table["none"], table["seo_trainlog"]
    # no reporting callback: nothing inside one, nothing written, a ratio of exactly 1 to itself
    assert none["callback_cpu_share"]["median"] == 0 and none["bytes_per_logged_step"]["median"] == 0
    assert none["wall_ratio"]["median"] == 1 and none["start_ms"]["median"] == 0
    assert none["background_cpu_s"]["median"] == 0  # no logger: no thread started after the Trainer was built
    assert none["recorder_cpu_s"]["median"] == 0 and none["logger_cpu_share"]["median"] == 0
    # ours: its callback's events took CPU, its import and on_train_begin took time, its files were written
    assert 0 < ours["callback_cpu_share"]["median"] < 1
    assert ours["import_ms"]["median"] > 0 and ours["on_train_begin_ms"]["median"] > 0
    assert ours["bytes_per_logged_step"]["median"] > 0
    # the logging steps were formatted and written in our recorder thread, and its CPU is counted, with
    # the other threads we start (flusher, sampler), in the threads' CPU
    assert 0 < ours["recorder_cpu_s"]["median"] < ours["background_cpu_s"]["median"]
    assert ours["background_cpu_ms_per_log"]["median"] == ours["background_cpu_s"]["median"] * 1e3 / 6
    (run,) = ours["runs"]
    assert run["logger_cpu_share"] == pytest.approx(
        (run["callback_cpu_s"] + run["background_cpu_s"] + run["helper_processes_cpu_s"]) / run["train_cpu_s"])
    assert "seo_trainlog" in completed.stdout and "CPU in callback" in completed.stdout
    table_md = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_peers.py"), "--markdown", str(output)],
                              capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    assert len(table_md) == 4 and table_md[1] == "|" + "---|" * 13
    assert table_md[2].startswith("| tiny, logging_steps=1 | none | 0.00 % (0.00-0.00) | 0.00 | 0.00 | 0.00 % | "
                                  "1.000 (1.000-1.000) | 0 |")
    assert table_md[3].startswith("| tiny, logging_steps=1 | seo_trainlog | ")
