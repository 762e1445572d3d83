"""Opening a run cheaply (issue 14): the version without importlib.metadata, the secret detector's
fast path, the run's files created by the flusher thread without losing or reordering a record."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

from conftest import RunFiles, quiet

import seo_trainlog
from seo_trainlog import TrainLogger
from seo_trainlog import _secrets
from seo_trainlog._categories import CATEGORIES
from seo_trainlog.record.sinks import CategoryRouter, logger

REPO = Path(__file__).resolve().parent.parent


def test_package_version_is_pyprojects_and_is_what_a_run_records(log_dir):
    declared = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    assert seo_trainlog.__version__ == declared
    with TrainLogger(quiet(log_dir)) as tlog:
        pass
    run = RunFiles(log_dir, tlog.run_id)
    assert run.records("run_start")[0]["seo_trainlog_version"] == declared
    manifest = json.loads((log_dir / f"run_manifest_{tlog.run_id}.json").read_text(encoding="utf-8"))
    assert manifest["seo_trainlog_version"] == declared


def test_every_secret_word_holds_a_trigger_of_the_fast_path():
    words = _secrets._STRONG_WORDS | _secrets._TOKEN_WORDS | {"key", "keys"}
    assert [word for word in sorted(words) if _secrets._TRIGGER.search(word) is None] == []


def test_secret_kinds_through_the_fast_path():
    assert {key: _secrets.secret_kind(key) for key in (
        "learning_rate", "output_dir", "hub_token", "HFToken", "sessionToken", "WANDB_API_KEY", "x-api-key",
        "db_pwd", "PWD", "Authorization", "password_length", "pad_token", "tokenizer_class", "credit_score",
        "keyword", "monkey")} == {
        "learning_rate": None, "output_dir": None, "hub_token": "token", "HFToken": "token",
        "sessionToken": "token", "WANDB_API_KEY": "strong", "x-api-key": "strong", "db_pwd": "strong",
        "PWD": None, "Authorization": "strong", "password_length": "token", "pad_token": None,
        "tokenizer_class": None, "credit_score": None, "keyword": None, "monkey": None}


def test_enum_values_stay_and_secrets_inside_are_still_masked():
    from transformers.trainer_utils import SchedulerType

    masked = _secrets.mask_mapping({"lr_scheduler_type": SchedulerType.LINEAR, "nested": {"api_key": "k3y-abcdef"},
                                    "hub_token": "hf_abcdefgh"})
    assert masked == {"lr_scheduler_type": SchedulerType.LINEAR, "nested": {"api_key": "<redacted>"},
                      "hub_token": "<redacted>"}


def test_a_record_written_before_its_file_is_created_lands_in_it_in_order(log_dir):
    log_dir.mkdir(parents=True)
    config = quiet(log_dir, debug=True)
    router = CategoryRouter(config, "20260101_000000", log_dir, "", key="begin-test", delay=True)
    handler_id = logger.add(router, level="DEBUG", format="{message}", filter=router.accepts)
    data_path = router.files["data"]
    try:
        assert not any(log_dir.iterdir())  # delayed: no file created yet
        log = logger.bind(seo_key="begin-test", seo_cat="data", seo_label="DATA")
        log.info("first, before the file exists")
        assert data_path.exists()  # created by the record itself
        router.open_files()  # what the flusher thread does as it starts: creates the others, keeps this one
        log.info("second")
        router.flush_buffers()
        assert sorted(path.name for path in log_dir.iterdir()) == sorted(
            path.name for path in router.files.values())
    finally:
        logger.remove(handler_id)
    router.stop()
    for category in ("data", "general", "debug"):  # data records go to the general and debug files too
        assert router.files[category].read_text(encoding="utf-8").splitlines() == [
            "first, before the file exists", "second"]
    assert router.files["training"].read_text(encoding="utf-8") == ""


def test_every_file_of_a_run_closed_at_once_exists(log_dir):
    with TrainLogger(quiet(log_dir, debug=True)) as tlog:
        pass
    names = {path.name for path in log_dir.glob("*.log")}
    assert {path.name for path in tlog.files.values()} <= names
    assert len(tlog.files) == len(CATEGORIES)


def test_a_file_that_cannot_be_created_is_a_warning_not_a_crash(log_dir):
    stamp = "20260101_000000"
    log_dir.mkdir(parents=True)
    blocked = log_dir / f"data_loading_{stamp}.log"
    blocked.mkdir()  # a directory where the data-loading file should be
    with TrainLogger(quiet(log_dir), run_id=stamp) as tlog:
        tlog.log_data_loading("dataset_creation", dataset_size=10, batch_size=2, duration=0.5)
        tlog.log_message("after the failure")
    run = RunFiles(log_dir, stamp)
    warnings = [m for m in run.messages("errors") if str(blocked) in m]
    assert len(warnings) == 1
    assert re.match(rf"seo_trainlog: cannot write to {re.escape(str(blocked))}: IsADirectoryError", warnings[0])
    assert "after the failure" in run.messages("seo_engine")
    assert [row["operation"] for row in run.records("data")] == ["dataset_creation"]  # the other files go on


def test_the_sampler_opens_nvml_in_its_thread_and_the_first_drain_waits_for_it():
    import threading

    from seo_trainlog.watch.monitor import ResourceSampler

    calls, notices = [], []

    def no_gpu():
        calls.append(threading.get_ident())
        raise RuntimeError("NVML could not start (no NVIDIA driver?): test")

    sampler = ResourceSampler(60.0, notice=notices.append, gpu_reader_factory=no_gpu)
    assert calls == [] and notices == []  # the constructor calls neither NVML nor psutil
    sampler.start()
    try:
        summary = sampler.drain()  # waits for the thread's first reading
    finally:
        sampler.stop()
    assert len(calls) == 1 and calls[0] != threading.get_ident()
    assert notices == ["GPU monitoring is off: NVML could not start (no NVIDIA driver?): test"]
    assert summary["rss_mb_min"] <= summary["rss_mb"] <= summary["rss_mb_max"] and summary["rss_mb"] > 0


def test_the_manifest_of_a_new_segment_is_written_by_the_flusher_at_once(log_dir):
    import time

    with TrainLogger(quiet(log_dir, flush_interval_s=3600.0)) as tlog:  # no periodic flush during the test
        tlog.start_segment(0)
        path = log_dir / f"run_manifest_{tlog.run_id}.json"
        deadline = time.monotonic() + 30.0  # generous: written by the flusher thread when it runs
        while time.monotonic() < deadline:
            manifest = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
            if manifest.get("segments"):
                break
            time.sleep(0.01)
        assert manifest["status"] == "running"
        assert [(s["segment"], s["status"], s["start_global_step"]) for s in manifest["segments"]] == [(1, "running", 0)]
    manifest = json.loads(path.read_text(encoding="utf-8"))
    assert [(s["segment"], s["status"]) for s in manifest["segments"]] == [(1, "abandoned")]
