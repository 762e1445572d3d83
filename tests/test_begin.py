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


def test_a_logger_opened_in_the_background_opens_its_files_in_the_recorder_thread(log_dir, monkeypatch):
    """The callback's way of opening a run: the constructor returns before the files are open, and
    a record written meanwhile, from the opening thread or another one, waits and lands after run_start."""
    import threading
    import time

    from seo_trainlog.record import logger as logger_module

    opened_in, release = [], threading.Event()
    real_open_sinks = logger_module.open_sinks

    def slow_open_sinks(*args, **kwargs):
        opened_in.append(threading.current_thread().name)
        release.wait(30)  # held open until the records below are on their way
        return real_open_sinks(*args, **kwargs)

    monkeypatch.setattr(logger_module, "open_sinks", slow_open_sinks)
    tlog = TrainLogger(quiet(log_dir), open_in_background=True)
    try:
        # not opened yet: only the file that claimed the run id exists
        assert [name for name, path in tlog.files.items() if path.exists()] == [CATEGORIES[0].name]
        other = threading.Thread(target=tlog.log_message, args=("from another thread",))
        other.start()
        time.sleep(0.05)
        assert other.is_alive()  # waiting for the files, not written into the void
        release.set()
        tlog.log_message("from the opening thread")
        other.join(30)
    finally:
        release.set()
        tlog.close()
    assert opened_in == ["seo_trainlog-recorder"]
    run = RunFiles(log_dir, tlog.run_id)
    messages = run.messages("seo_engine")
    assert messages[0].startswith(f"Run {tlog.run_id} started")
    assert set(messages[1:]) == {"from another thread", "from the opening thread"}
    assert [row["event"] for row in run.records()][0] == "run_start"


def test_the_callback_writes_begin_and_end_in_the_recorder_thread_and_train_returns_with_them_on_disk(
        log_dir, monkeypatch, make_trainer):
    import threading

    from seo_trainlog import TrainLogCallback
    from seo_trainlog.record import logger as logger_module

    threads = {}
    for name in ("log_training_summary", "log_hyperparameters", "_open"):
        real = getattr(logger_module.TrainLogger, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            threads.setdefault(_name, threading.current_thread().name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(logger_module.TrainLogger, name, spy)
    trainer = make_trainer(max_steps=3, callbacks=[TrainLogCallback(quiet(log_dir))])
    before = set(threading.enumerate())
    trainer.train()
    assert threads == {"_open": "seo_trainlog-recorder", "log_hyperparameters": "seo_trainlog-recorder",
                       "log_training_summary": "seo_trainlog-recorder"}
    run = RunFiles(log_dir)
    assert [row["status"] for row in run.records("summary")] == ["completed"]  # on disk when train() returned
    assert "TRAINING SUMMARY" in run.path("training_progress").read_text(encoding="utf-8")
    assert [t.name for t in set(threading.enumerate()) - before if t.name.startswith("seo_trainlog-")] == []


def test_secret_keys_finds_what_is_secret_key_finds():
    from transformers import TrainingArguments

    names = list(vars(TrainingArguments(output_dir="x", hub_token="hf_abcdefghij", use_cpu=True))) + [
        "HFToken", "sessionToken", "WANDB_API_KEY", "x-api-key", "db_pwd", "PWD", "Authorization",
        "password_length", "pad_token", "tokenizer_class", "credit_score", "keyword", "monkey", "İ_token", "",
        "a\nb_token"]
    expected = [name for name in names if _secrets.is_secret_key(name)]
    assert "hub_token" in expected and "WANDB_API_KEY" in expected
    assert "a\nb_token" in expected
    assert _secrets.secret_keys(names) == expected


def test_the_default_rotation_taken_without_loguru_is_one_loguru_accepts():
    import pytest

    from seo_trainlog import LogConfig
    from seo_trainlog._config import _ACCEPTED_ROTATIONS
    from seo_trainlog.record.sinks import probe_file_options

    assert LogConfig().rotation in _ACCEPTED_ROTATIONS
    for rotation in sorted(_ACCEPTED_ROTATIONS):
        probe_file_options(rotation=rotation)  # raises for a value loguru refuses
    with pytest.raises(ValueError, match="rotation"):
        LogConfig(rotation="ten megabytes")
    assert "ten megabytes" not in _ACCEPTED_ROTATIONS


def test_step_marks_folded_at_a_logging_step_give_what_the_step_methods_give():
    """The hot path appends perf_counter readings (begin +, end -); folding them in order is the
    same arithmetic as step_begin/step_end, marks and epoch starts included."""
    from seo_trainlog.watch.timing import StepTimer, step_times

    events = [("begin", 1.0), ("end", 1.5), ("begin", 1.75), ("end", 2.5), ("mark", 3.0), ("begin", 3.5),
              ("end", 4.0), ("epoch", None), ("begin", 10.0), ("end", 10.25), ("begin", 10.5)]
    by_methods, by_marks = StepTimer(), StepTimer()
    by_marks.ended = []
    elapsed = []
    for kind, at in events:
        if kind == "begin":
            by_methods.step_begin(at)
            by_marks.marks.append(at)
        elif kind == "end":
            elapsed.append(by_methods.step_end(at))
            by_marks.marks.append(-at)
        elif kind == "mark":
            by_methods.mark(at)
            by_marks.mark(at)
        else:
            by_methods.new_epoch()
            by_marks.new_epoch()
    assert by_marks.steps == by_methods.steps == 4
    assert by_marks.drain(8) == by_methods.drain(8) == {
        "steps": 4, "step_time_s": 2.0 / 4, "data_wait_s": 1.0 / 4, "data_wait_pct": 100 * 1.0 / 3.0,
        "samples_per_second": 4 * 8 / 3.0, "interval_s": 3.0}
    assert elapsed == [0.5, 0.75, 0.5, 0.25]
    assert by_marks.ended == [1.0, -1.5, 1.75, -2.5, 3.5, -4.0, 10.0, -10.25]  # (begin, -end) of each step
    kept = by_marks.take_ended()
    assert by_marks.ended == [] and by_marks.take_ended() == []
    assert step_times(kept, 7, wall_s=1000.0, now_s=20.0) == [  # a step's end on the wall clock: 1000 - (20 - end)
        (4, 0.5, 981.5), (5, 0.75, 982.5), (6, 0.5, 984.0), (7, 0.25, 990.25)]
    by_methods.step_end(11.0)
    by_marks.marks.append(-11.0)  # the step begun before the drain ends after it
    assert by_marks.drain(8) == by_methods.drain(8) == {
        "steps": 1, "step_time_s": 0.5, "data_wait_s": 0.0, "data_wait_pct": 0.0, "samples_per_second": 16.0,
        "interval_s": 0.5}


def test_a_sampler_started_by_another_thread_is_waited_for_by_the_first_drain():
    """The callback hands the sampler's start to its recorder thread: a drain that comes first waits
    for the first reading instead of taking one itself in the training thread."""
    import threading

    from seo_trainlog.watch.monitor import ResourceSampler

    opened_in = []

    def no_gpu():
        opened_in.append(threading.current_thread().name)
        raise RuntimeError("NVML could not start (no NVIDIA driver?): test")

    sampler = ResourceSampler(60.0, notice=lambda message: None, gpu_reader_factory=no_gpu)
    later = []
    sampler.start_in(later.append)  # scheduled, not started: nothing read yet
    assert opened_in == [] and len(later) == 1
    starter = threading.Timer(0.2, later[0])
    starter.start()
    try:
        summary = sampler.drain()  # waits for the thread the timer starts, and its first reading
    finally:
        starter.join()
        sampler.stop()
    assert opened_in == ["seo_trainlog-sampler"]
    assert summary["rss_mb"] > 0


def test_a_record_from_another_thread_while_run_start_is_written_lands_after_it(log_dir, monkeypatch):
    """The opening job is done once its run_start records are written: a record of another thread
    made while they are being written waits for them (it never comes first in the run's files)."""
    import threading

    from seo_trainlog.record import logger as logger_module

    real_log_message = logger_module.TrainLogger.log_message
    others = []

    def log_message(self, message, *args, **kwargs):
        in_recorder = threading.current_thread().name == "seo_trainlog-recorder"
        if message.startswith(f"Run {self.run_id} started") and in_recorder:
            other = threading.Thread(target=self.log_metrics, args=("probe", {"from": "another thread"}))
            other.start()
            other.join(1.0)  # it waits for the opening (that is this job): not joined, but not written first
            others.append(other)
        return real_log_message(self, message, *args, **kwargs)

    monkeypatch.setattr(logger_module.TrainLogger, "log_message", log_message)
    tlog = TrainLogger(quiet(log_dir), open_in_background=True)
    tlog.log_message("from the opening thread")
    others[0].join(30)
    tlog.close()
    run = RunFiles(log_dir, tlog.run_id)
    assert [row["event"] for row in run.records()] == ["run_start", "probe"]
    assert run.messages("seo_engine")[0] == f"Run {tlog.run_id} started: log directory {tlog.log_dir}"


def test_a_library_warning_of_another_thread_waits_for_the_hub_token_to_be_learnt(log_dir, monkeypatch,
                                                                                   make_trainer):
    """hub_token is learnt by a job of the recorder thread after the opening: a library warning made
    in another thread before that job has run waits for it, so the token is never written."""
    import logging
    import threading

    from seo_trainlog import TrainLogCallback
    from seo_trainlog.record import callback as callback_module

    token = "hf_QuiteSecretTokenValue12345"
    real_remember = callback_module._remember_argument_secrets
    others = []

    def remember(args):
        other = threading.Thread(target=logging.getLogger("transformers.trainer").warning,
                                 args=(f"push failed for token {token}",))
        other.start()
        other.join(1.0)  # it waits for this job: not joined, and not written before the token is known
        others.append(other)
        real_remember(args)

    monkeypatch.setattr(callback_module, "_remember_argument_secrets", remember)
    trainer = make_trainer(max_steps=2, hub_token=token, callbacks=[TrainLogCallback(quiet(log_dir))])
    trainer.train()
    others[0].join(30)
    run = RunFiles(log_dir)
    assert [row["message"] for row in run.records("warning")] == ["push failed for token <redacted>"]
    text = "".join(path.read_text(encoding="utf-8") for path in sorted(log_dir.iterdir()) if path.is_file())
    assert token not in text
