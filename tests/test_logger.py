"""TrainLogger on its own: the six methods as a user reads them back from the files."""

from __future__ import annotations

import json
import logging
import os
import re

import pytest
from conftest import LINE, RunFiles, quiet
from loguru import logger as loguru_logger

import seo_trainlog
from seo_trainlog import LogConfig, TrainLogCallback, TrainLogger

STAMP = re.compile(r"^[a-z_]+?_(\d{8}_\d{6}(?:_\d+)?)\.log$")



def our_handler_count() -> int:
    return len(seo_trainlog.logger._core.handlers)


def test_six_methods_write_the_spec_lines(log_dir):
    with TrainLogger(quiet(log_dir)) as tlog:
        tlog.log_training_progress(epoch=1, step=100, loss=0.456789, learning_rate=1e-4, validation_loss=0.567890,
                                   metrics={"accuracy": 0.85, "f1_score": 0.82})
        tlog.log_model_performance("forward_pass", 0.05, memory_usage=128.5, gpu_utilization=45.2,
                                   additional_metrics={"batch_size": 32, "sequence_length": 512})
        tlog.log_data_loading("dataset_creation", dataset_size=1000, batch_size=32, duration=0.5, memory_usage=128.0)
        tlog.log_error(ValueError("Invalid input format"), context="Data validation", operation="forward_pass",
                       additional_info={"input_type": "text", "expected_format": "json"})
        tlog.log_training_summary(10, 1000, 0.123456, 0.098765, 3600.0, early_stopping_triggered=False)
        tlog.log_hyperparameters({"learning_rate": 1e-4, "hub_token": "hf_secretvalue", "model": {"layers": 6}})
    run = RunFiles(log_dir, tlog.run_id)

    # every line of every text file has the spec's prefix
    for prefix in ("seo_engine", "training_progress", "training_detailed", "model_performance", "data_loading",
                   "errors", "error_tracking"):
        for line in run.lines(prefix):
            assert LINE.match(line), (prefix, line)

    def labelled(prefix):
        return [f"{m.group(2)} - {m.group(3)} - {m.group(4)}" for m in map(LINE.match, run.lines(prefix)) if m]

    assert labelled("training_progress")[:3] == [
        "TRAINING - INFO - Epoch 1, Step 100: Loss=0.456789, LR=1.00e-04",
        "TRAINING - INFO - Validation Loss: 0.567890",
        "TRAINING - INFO - Metrics: accuracy=0.850000, f1_score=0.820000",
    ]
    assert labelled("model_performance") == [
        "MODEL - INFO - forward_pass completed in 0.0500s",
        "MODEL - INFO - Memory usage: 128.50MB",
        "MODEL - INFO - GPU utilization: 45.20%",
        "MODEL - INFO - Additional metrics: batch_size=32, sequence_length=512",
    ]
    assert labelled("data_loading") == [
        "DATA - INFO - dataset_creation: Dataset size=1000, Batch size=32, Duration=0.5000s",
        "DATA - INFO - Memory usage: 128.00MB",
    ]
    assert labelled("errors") == [
        "ERROR - ERROR - Error in forward_pass: ValueError: Invalid input format",
        "ERROR - ERROR - Context: Data validation",
        "ERROR - ERROR - Additional info: input_type=text, expected_format=json",
    ]
    assert labelled("error_tracking")[:4] == labelled("errors") + [
        "ERROR - ERROR - Training state: global_step=100, epoch=1"]
    assert labelled("training_progress")[3:14] == ["TRAINING - INFO - " + line for line in [
        "=" * 80, "TRAINING SUMMARY", "=" * 80, "Total epochs: 10", "Total steps: 1000", "Final loss: 0.123456",
        "Best loss: 0.098765", "Training duration: 3600.00s", "Early stopping triggered: False",
        "Status: completed", "=" * 80]]
    hyper = run.messages("training_progress")[14:]
    assert hyper == ["=" * 80, "HYPERPARAMETERS", "=" * 80, "learning_rate: 0.0001", "hub_token: <redacted>",
                     "model.layers: 6", "=" * 80]
    assert "hf_secretvalue" not in "".join(p.read_text() for p in log_dir.iterdir())

    # the general log holds every category's INFO+ lines
    general = run.messages("seo_engine")
    assert general[0] == f"Run {tlog.run_id} started: log directory {log_dir.resolve()}"
    for prefix in ("training_progress", "model_performance", "data_loading", "errors"):
        assert set(run.messages(prefix)) <= set(general)

    events = [row["event"] for row in run.records()]
    assert events == ["run_start", "train", "model", "data", "error", "summary", "hyperparameters"]
    train = run.records("train")[0]
    assert (train["global_step"], train["epoch"], train["loss"], train["validation_loss"], train["accuracy"]) == (
        100, 1, 0.456789, 0.56789, 0.85)


def test_all_files_of_a_run_share_one_stamp_and_runs_never_share_files(log_dir):
    first = TrainLogger(quiet(log_dir))
    second = TrainLogger(quiet(log_dir))  # same second: gets a suffixed stamp
    first.close()
    second.close()
    assert first.run_id != second.run_id
    stamps = {}
    manifests = sorted(path.name for path in log_dir.glob("run_manifest_*.json"))
    assert manifests == sorted(f"run_manifest_{run.run_id}.json" for run in (first, second))
    for path in log_dir.glob("*.log"):
        stamps.setdefault(STAMP.match(path.name).group(1), []).append(path.name.split("_2")[0])
    assert sorted(stamps) == sorted([first.run_id, second.run_id])
    for files in stamps.values():
        assert sorted(files) == sorted(["seo_engine", "training_progress", "training_detailed", "model_performance",
                                        "data_loading", "errors", "error_tracking", "performance_metrics"])


def test_debug_file_only_when_enabled(log_dir):
    with TrainLogger(quiet(log_dir, debug=True)) as tlog:
        tlog.log_message("a debug detail", "DEBUG", "training_detailed")
        tlog.log_training_progress(1, 1, 0.5, 1e-3)
    run = RunFiles(log_dir, tlog.run_id)
    assert run.messages("debug")[-2:] == ["a debug detail", "Epoch 1, Step 1: Loss=0.500000, LR=1.00e-03"]
    # at level INFO the detailed file does not take DEBUG records
    assert "a debug detail" not in run.messages("training_detailed")


def test_level_debug_lets_debug_records_into_the_detailed_file(log_dir):
    with TrainLogger(quiet(log_dir, level="debug")) as tlog:
        tlog.log_message("a debug detail", "DEBUG", "training_detailed")
    assert RunFiles(log_dir, tlog.run_id).messages("training_detailed") == ["a debug detail"]


def test_close_removes_exactly_our_handlers_and_leaves_the_users_loguru_alone(log_dir):
    received = []
    user_id = loguru_logger.add(received.append, format="{message}", level="DEBUG")
    try:
        global_before = len(loguru_logger._core.handlers)
        ours_before = our_handler_count()
        loguru_logger.info("user before")
        tlog = TrainLogger(quiet(log_dir, debug=True))
        assert our_handler_count() == ours_before + 1  # one handler routes to the nine files
        tlog.log_training_progress(1, 1, 0.5, 1e-3)
        tlog.log_error(RuntimeError("boom"))
        tlog.close()
        tlog.close()  # idempotent
        loguru_logger.info("user after")
        assert our_handler_count() == ours_before
        assert len(loguru_logger._core.handlers) == global_before
        assert [str(m).strip() for m in received] == ["user before", "user after"]
    finally:
        loguru_logger.remove(user_id)


def test_stdlib_warnings_of_hf_libraries_reach_our_logs_only_while_open(log_dir):
    hf_logger = logging.getLogger("transformers.modeling_utils")
    handlers_before = list(logging.getLogger("transformers").handlers)
    level_before = logging.getLogger("transformers").level
    with TrainLogger(quiet(log_dir)) as tlog:
        hf_logger.warning("\x1b[1mLOAD REPORT\x1b[0m: checkpoint weights were not used")
        hf_logger.info("an info line that is not bridged")
        logging.getLogger("datasets.builder").error("a datasets error")
    hf_logger.warning("after close")
    run = RunFiles(log_dir, tlog.run_id)
    expected = ["TRANSFORMERS - WARNING - LOAD REPORT: checkpoint weights were not used",
                "DATASETS - ERROR - a datasets error"]
    for prefix in ("seo_engine", "errors"):
        assert [line.split("] ", 1)[1] for line in run.lines(prefix) if "TRANSFORMERS" in line or "DATASETS" in line] \
            == expected
    assert logging.getLogger("transformers").handlers == handlers_before
    assert logging.getLogger("transformers").level == level_before


def test_context_manager_records_an_escaping_exception(log_dir):
    with pytest.raises(ZeroDivisionError):
        with TrainLogger(quiet(log_dir)) as tlog:
            1 / 0
    run = RunFiles(log_dir, tlog.run_id)
    assert run.messages("errors") == ["Error in run: ZeroDivisionError: division by zero",
                                      "Context: inside the TrainLogger block"]
    tracking = run.path("error_tracking").read_text()
    assert "Traceback (most recent call last):" in tracking and "1 / 0" in tracking
    assert tlog.closed


def test_error_is_on_disk_when_log_error_returns(log_dir):
    tlog = TrainLogger(quiet(log_dir))
    try:
        raise KeyError("missing column")
    except KeyError as error:
        tlog.log_error(error, operation="preprocess")
    # read through a separate file descriptor before close(): the line must already be there
    with open(tlog.files["errors"], encoding="utf-8") as handle:
        assert "Error in preprocess: KeyError: 'missing column'" in handle.read()
    record = json.loads(tlog.files["metrics"].read_text().splitlines()[-1])
    assert record["event"] == "error" and record["traceback"].startswith("Traceback (most recent call last):")
    tlog.close()


def test_console_prints_one_concise_line_per_event(log_dir, capsys):
    with TrainLogger(LogConfig(log_dir=log_dir)) as tlog:
        tlog.log_training_progress(1, 10, 0.25, 1e-4, metrics={"grad_norm": 1.5})
        tlog.log_data_loading("dataset_creation", 10, 2, 0.1)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" | ", 2)[2] for line in lines] == [
        f"run {tlog.run_id} started, logs in {log_dir.resolve()}",
        "Epoch 1, Step 10: Loss=0.250000, LR=1.00e-04, grad_norm=1.5",
        "dataset_creation: Dataset size=10, Batch size=2, Duration=0.1000s",
    ]


def test_unwritable_log_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the directory should be")
    with pytest.raises(OSError, match=re.escape(str(blocker / "logs"))):
        TrainLogger(quiet(blocker / "logs"))


def test_the_write_check_never_follows_a_link_left_at_its_name(tmp_path):
    """The directory's write check creates a file of a predictable name (process and thread ids): a
    link placed there (a shared log directory) is removed, never followed, and its target is not
    truncated; a leftover of a process killed mid-check does not stop a run either."""
    import threading

    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    probe = log_dir / f".seo_trainlog-write-check-{os.getpid()}-{threading.get_ident()}"
    probe.symlink_to(victim)
    with TrainLogger(quiet(log_dir)) as tlog:
        tlog.log_message("written")
    assert victim.read_text() == "precious"
    assert not probe.is_symlink() and not probe.exists()
    probe.write_text("")  # a leftover plain file
    with TrainLogger(quiet(log_dir)) as second:
        second.log_message("written too")
    assert not probe.exists()
    assert RunFiles(log_dir, second.run_id).messages("seo_engine")[-1] == "written too"


def test_rotation_keeps_each_category_to_its_own_files(log_dir):
    log_dir.mkdir()
    unrelated = log_dir / "notes.txt"
    unrelated.write_text("keep me")
    with TrainLogger(quiet(log_dir)) as other_run:
        other_run.log_error(RuntimeError("from another run"))
    with TrainLogger(quiet(log_dir, rotation="2 KB", retention=2)) as tlog:
        for step in range(1, 401):
            tlog.log_training_progress(0.01 * step, step, 1.0 / step, 1e-4)
            if step % 2 == 0:
                tlog.log_error(RuntimeError(f"error at {step}"), operation="step")
                tlog.log_data_loading("batch", 400, 8, 0.001)
    names = sorted(os.listdir(log_dir))
    assert unrelated.read_text() == "keep me"
    assert all(name in names for name in (f"{p}_{other_run.run_id}.log" for p in ("errors", "error_tracking")))
    by_prefix = {}
    for name in names:
        if tlog.run_id in name and name.endswith(".log"):
            prefix = name.split(f"_{tlog.run_id}")[0]
            by_prefix.setdefault(prefix, []).append(name)
    for prefix, files in by_prefix.items():
        rotated = [f for f in files if f != f"{prefix}_{tlog.run_id}.log"]
        assert f"{prefix}_{tlog.run_id}.log" in files
        assert len(rotated) <= 2, (prefix, files)
    # the big categories did rotate, and each file holds only its own category's records
    for prefix, label in (("training_progress", "TRAINING"), ("errors", "ERROR"), ("data_loading", "DATA")):
        assert len(by_prefix[prefix]) == 3, by_prefix[prefix]
        for name in by_prefix[prefix]:
            lines = (log_dir / name).read_text().splitlines()
            assert lines and all(LINE.match(line).group(2) == label for line in lines)
    for name in by_prefix["performance_metrics"]:
        assert all(json.loads(line)["run_id"] == tlog.run_id for line in (log_dir / name).read_text().splitlines())
    # retention deleted the run's first records; its manifest, outside rotation, still has the facts
    remaining = [json.loads(line) for name in by_prefix["performance_metrics"]
                 for line in (log_dir / name).read_text().splitlines()]
    assert "run_start" not in {row["event"] for row in remaining}
    manifest = json.loads((log_dir / f"run_manifest_{tlog.run_id}.json").read_text())
    assert manifest["run_id"] == tlog.run_id and manifest["started"] is not None
    assert manifest["train"] == {"records": 400, "first_global_step": 1, "last_global_step": 400,
                                 "first_time": manifest["train"]["first_time"],
                                 "last_time": manifest["train"]["last_time"], "final_loss": 1.0 / 400,
                                 "best_loss": 1.0 / 400, "best_loss_step": 400}
    assert manifest["counts"] == {"error": 200, "warning": 0, "anomaly": 0}


def test_from_env_reads_every_variable():
    config = LogConfig.from_env({"SEO_TRAINLOG_DIR": "/tmp/x", "SEO_TRAINLOG_LEVEL": "debug",
                                 "SEO_TRAINLOG_DEBUG": "1", "SEO_TRAINLOG_CONSOLE": "off",
                                 "SEO_TRAINLOG_ROTATION": "5 MB", "SEO_TRAINLOG_RETENTION": "3"})
    assert config == LogConfig(log_dir="/tmp/x", level="DEBUG", debug=True, console=False, rotation="5 MB",
                               retention=3)
    assert LogConfig.from_env({}) == LogConfig()
    assert LogConfig() == LogConfig(log_dir="logs", level="INFO", console=True, debug=False, rotation="10 MB",
                                    retention=5, encoding="utf-8")


@pytest.mark.parametrize(("variable", "value", "accepted"), [
    ("SEO_TRAINLOG_LEVEL", "verbose", "DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ("SEO_TRAINLOG_DEBUG", "maybe", "1, true, yes, on, 0, false, no, off"),
    ("SEO_TRAINLOG_CONSOLE", "2", "1, true, yes, on, 0, false, no, off"),
    ("SEO_TRAINLOG_ROTATION", "often", "a positive size such as '10 MB'"),
    ("SEO_TRAINLOG_ROTATION", "0 B", "a positive size such as '10 MB'"),
    ("SEO_TRAINLOG_RETENTION", "0", "an integer >= 1"),
    ("SEO_TRAINLOG_RETENTION", "forever", "an integer >= 1"),
])
def test_from_env_rejects_bad_values_naming_the_variable(variable, value, accepted):
    with pytest.raises(ValueError) as info:
        LogConfig.from_env({variable: value})
    message = str(info.value)
    assert message.startswith(f"{variable}={value!r} is not valid") and accepted in message


def test_programming_mistakes_are_said_at_once(log_dir):
    with pytest.raises(TypeError, match="config must be a seo_trainlog.LogConfig or None, got str"):
        TrainLogCallback("mylogs")
    with pytest.raises(TypeError, match="config must be a seo_trainlog.LogConfig or None, got dict"):
        TrainLogger({"log_dir": str(log_dir)})
    for encoding in ("ascii", "latin-1", "cp1252", "hex", "utf-16", "idna"):
        with pytest.raises(ValueError, match=f"encoding='{encoding}' is not valid; accepted values: 'utf-8'"):
            LogConfig(encoding=encoding)
    with TrainLogger(quiet(log_dir)) as tlog:
        with pytest.raises(TypeError, match="missing 1 required positional argument: 'values'"):
            tlog.log_metrics({"a": 1})
        tlog.log_message("lower-case level", level="warning")  # levels are case-insensitive
        tlog.log_metrics("custom", "not a mapping")  # a bad value: a warning, not an exception
    run = RunFiles(log_dir)
    assert any(line.endswith("GENERAL - WARNING - lower-case level") for line in run.lines("seo_engine"))
    assert any("values should be a mapping, got str" in m for m in run.messages("errors"))
