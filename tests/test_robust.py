"""Bad values, crashes, signals, secrets and disk trouble: keep training, lose nothing, leak nothing."""

from __future__ import annotations

import enum
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LINE, RunFiles, StepHook, all_text, json_rows, quiet, tiny_model
from loguru._file_sink import FileSink
from transformers import DataCollatorWithPadding, TrainerCallback

import seo_trainlog
from seo_trainlog import TimedDataCollator, TrainLogCallback, TrainLogger

HERE = Path(__file__).resolve().parent



def with_callback(trainer, log_dir, **config):
    trainer.add_callback(TrainLogCallback(quiet(log_dir, **config)))
    return trainer


def our_handler_count() -> int:
    return len(seo_trainlog.logger._core.handlers)


def progress_steps(run: RunFiles) -> list[int]:
    return [int(m.split("Step ")[1].split(":")[0]) for m in run.messages("training_progress") if m.startswith("Epoch ")]


# ---------------------------------------------------------------------------------------- values


def test_logged_values_of_every_kind_become_strict_json(make_trainer, log_dir, tiny_dataset):
    def odd_metrics(eval_pred):
        return {"per_class": {"commercial": np.float64(0.5), "navigational": torch.tensor(0.25)},
                "confusion": np.array([[1, 2], [3, 4]]), "note": "fine", "missing": None}

    hook = StepHook(2, lambda trainer, state: trainer.log({
        "grad_scale": torch.tensor(2.0), "np_scalar": np.float32(1.5), "array": np.arange(3), "text": "héllo",
        "nothing": None, 7: "int key", "nested": {"a": {"b": torch.tensor(3)}}, "event": "mine",
        "huge": 10**400, "big": 2**100, "forged": "ok\n[2026-01-01 00:00:00] TRAINING - INFO - fake\x00\x1b[31m"}))
    trainer = make_trainer(max_steps=4, eval_strategy="steps", eval_steps=4, eval_dataset=tiny_dataset.select(range(8)),
                           compute_metrics=odd_metrics, callbacks=[hook.callback])
    hook.trainer = with_callback(trainer, log_dir)
    trainer.train()

    text = all_text(log_dir)
    assert "tensor(" not in text and "NaN" not in text
    rows = json_rows(log_dir)
    custom = next(row for row in rows if row["event"] == "log")
    assert custom["grad_scale"] == 2.0 and custom["np_scalar"] == 1.5 and custom["array"] == [0, 1, 2]
    assert custom["text"] == "héllo" and custom["nothing"] is None and custom["7"] == "int key"
    assert custom["nested/a/b"] == 3 and custom["user_event"] == "mine" and custom["event"] == "log"
    assert custom["huge"] == str(10**400) and custom["big"] == float(2**100)
    assert custom["forged"] == "ok\n[2026-01-01 00:00:00] TRAINING - INFO - fake\x00\x1b[31m"  # JSON keeps it exactly
    assert "\x00" not in text and "\x1b" not in text  # the text files escape control characters
    detailed = RunFiles(log_dir).lines("training_detailed")
    assert not any(line.endswith("TRAINING - INFO - fake") for line in detailed)  # no forged line
    assert any("forged=ok\\n[2026-01-01 00:00:00] TRAINING - INFO - fake\\x00\\x1b[31m" in line for line in detailed)
    evaluation = next(row for row in rows if row["event"] == "eval")
    assert "user_epoch" not in evaluation and evaluation["epoch"] is not None
    assert evaluation["eval_per_class/commercial"] == 0.5 and evaluation["eval_per_class/navigational"] == 0.25
    assert evaluation["eval_confusion"] == [[1, 2], [3, 4]] and evaluation["eval_note"] == "fine"
    metrics_line = next(m for m in RunFiles(log_dir).messages("training_progress") if m.startswith("Metrics: eval_"))
    assert "eval_per_class/commercial=0.500000" in metrics_line and "eval_confusion=[[1, 2], [3, 4]]" in metrics_line


def test_non_finite_values_warn_once_per_key_and_are_null_in_json(make_trainer, log_dir):
    def nan_logits(module, args, output):
        return output * float("nan")

    trainer = with_callback(make_trainer(max_steps=4, logging_nan_inf_filter=False), log_dir)
    hook = StepHook(2, lambda t, state: t.model.classifier.register_forward_hook(nan_logits))
    trainer.add_callback(hook.callback)
    hook.trainer = trainer
    trainer.train()

    run = RunFiles(log_dir)
    warnings_ = [m for m in run.messages("errors") if m.startswith("Non-finite value: ")]
    assert "Non-finite value: loss=nan at global_step 3" in warnings_
    assert "Non-finite value: grad_norm=nan at global_step 3" in warnings_
    assert len(warnings_) == len(set(warnings_))
    assert set(warnings_) <= set(run.messages("error_tracking"))
    train = run.records("train")
    assert train[2]["loss"] is None and train[0]["loss"] is not None
    finite = [row["loss"] for row in trainer.state.log_history if "loss" in row and np.isfinite(row["loss"])]
    assert f"Best loss: {min(finite):.6f}" in run.messages("training_progress")


class Colour(enum.Enum):
    RED = "red"


@dataclass
class Extra:
    depth: int
    where: Path


def test_hyperparameters_json_cannot_take_are_written_readably(make_trainer, log_dir):
    from transformers import BitsAndBytesConfig

    model = tiny_model()
    model.config.colour = Colour.RED
    model.config.cache_dir = Path("/tmp/cache")
    model.config.compute_dtype = torch.bfloat16
    model.config.extra = Extra(3, Path("/x"))
    model.config.labels_seen = {"a"}
    model.config.nothing = None
    model.config.quantization_config = BitsAndBytesConfig(load_in_8bit=True)
    trainer = with_callback(make_trainer(max_steps=1, model=model), log_dir)
    trainer.train()
    hyper = RunFiles(log_dir).records("hyperparameters")[0]["hyperparameters"]
    config = hyper["model"]["config"]
    assert config["colour"] == "red" and config["cache_dir"] == "/tmp/cache"
    assert config["compute_dtype"] == "torch.bfloat16"
    assert config["extra"] == {"depth": 3, "where": "/x"} and config["labels_seen"] == ["a"]
    assert config["nothing"] is None and config["quantization_config"]["load_in_8bit"] is True
    assert isinstance(hyper["training_args"]["accelerator_config"], dict)


def test_unicode_round_trips_through_every_file(make_trainer, log_dir):
    names = {"精度": 0.5, "🚀_speed": 1.0, "דיוק": 0.25}
    hook = StepHook(1, lambda trainer, state: trainer.log(dict(names)))
    trainer = make_trainer(max_steps=2, run_name="実験-🚀-ניסוי", callbacks=[hook.callback])
    hook.trainer = with_callback(trainer, log_dir)
    hook2 = StepHook(2, lambda t, s: (_ for _ in ()).throw(ValueError("失敗 💥 כישלון")))
    trainer.add_callback(hook2.callback)
    with pytest.raises(ValueError):
        trainer.train()
    text = all_text(log_dir)
    for fragment in ("精度=0.500000", "🚀_speed=1.000000", "דיוק=0.250000", "実験-🚀-ניסוי", "失敗 💥 כישלון"):
        assert fragment in text
    assert any(row.get("精度") == 0.5 for row in json_rows(log_dir))


# ---------------------------------------------------------------------------------------- secrets


def test_secrets_never_reach_any_file(make_trainer, log_dir, monkeypatch):
    hub_token = "hf_SECRETabc123456"
    monkeypatch.setenv("WANDB_API_KEY", "wandbSECRET9876")
    monkeypatch.setenv("HF_TOKEN", "hfenvSECRET5555")
    monkeypatch.setenv("DB_PWD", "dbpwdSECRET31")
    monkeypatch.setenv("PWD", str(log_dir.parent))  # the shell's working directory is no password
    model = tiny_model()
    model.config.db_password = "pw-SECRET-777"
    model.config.sessionToken = "sessionSECRET42"
    model.config.credentials = {"user": "bob", "pass": "nested-SECRET-1"}
    model.config.owner = "alice"

    def leak(trainer, state):
        trainer.log({"api_key": "logged-SECRET-2"})
        raise RuntimeError(f"upload failed with token {hub_token} and {os.environ['HF_TOKEN']}")

    hook = StepHook(2, leak)
    trainer = make_trainer(max_steps=4, hub_token=hub_token, model=model, callbacks=[hook.callback])
    hook.trainer = with_callback(trainer, log_dir, debug=True, level="DEBUG")
    with pytest.raises(RuntimeError, match="upload failed"):
        trainer.train()
    text = all_text(log_dir)
    for secret in (hub_token, "wandbSECRET9876", "hfenvSECRET5555", "pw-SECRET-777", "sessionSECRET42",
                   "nested-SECRET-1", "logged-SECRET-2", "dbpwdSECRET31"):
        assert secret not in text, secret
    assert "upload failed with token <redacted> and <redacted>" in text
    assert f"log directory {log_dir}" in text
    assert "owner: alice" in text  # only what sits under a secret key is masked


def test_tracebacks_carry_no_local_variables(make_trainer, log_dir):
    def fail(trainer, state):
        local_value = "LOCAL-VALUE-1234"  # noqa: F841 - must not show up in the logs
        raise KeyError("missing")

    hook = StepHook(1, fail)
    trainer = make_trainer(max_steps=2, callbacks=[hook.callback])
    hook.trainer = with_callback(trainer, log_dir)
    with pytest.raises(KeyError):
        trainer.train()
    text = all_text(log_dir)
    assert "raise KeyError(\"missing\")" in text and "LOCAL-VALUE-1234" not in text


# ---------------------------------------------------------------------------------------- crashes and signals


def run_child(log_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE.parent)}
    return subprocess.run([sys.executable, str(HERE / "sigterm_child.py"), str(log_dir), *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_sigterm_is_recorded_and_still_terminates(log_dir):
    result = run_child(log_dir, "default")
    assert result.returncode == -signal.SIGTERM, result.stderr[-2000:]
    assert "training finished" not in result.stdout
    run = RunFiles(log_dir)
    assert run.messages("errors")[0] == "Error in training: TerminatedBySignal: received SIGTERM (signal 15)"
    assert "global_step=3" in run.messages("errors")[2]
    tracking = run.path("error_tracking").read_text()
    assert "Training state: global_step=3, epoch=" in tracking and "os.kill(os.getpid(), signal.SIGTERM)" in tracking
    assert run.records("summary")[0]["status"] == "terminated"
    assert "Status: terminated" in run.messages("training_progress")


def test_sigterm_runs_the_users_own_handler(log_dir, tmp_path):
    flag = tmp_path / "flag"
    result = run_child(log_dir, "user", str(flag))
    assert result.returncode == 3, result.stderr[-2000:]
    assert flag.read_text() == "user handler ran"
    run = RunFiles(log_dir)
    assert any(m.startswith("SIGTERM received at global_step 3") for m in run.messages("errors"))
    assert run.records("summary")[0]["status"] == "terminated"
    assert run.messages("errors")[-3] == "Error in training: SystemExit: 3"


def test_failing_collator_is_logged_with_context_and_reraised(make_trainer, log_dir, tokenizer):
    error = ValueError("cannot pad a feature")
    calls = []

    def flaky(features):
        calls.append(1)
        if len(calls) == 3:
            raise error
        return DataCollatorWithPadding(tokenizer)(features)

    trainer = with_callback(make_trainer(max_steps=5, data_collator=TimedDataCollator(flaky)), log_dir)
    with pytest.raises(ValueError) as info:
        trainer.train()
    assert info.value is error
    run = RunFiles(log_dir)
    assert run.messages("errors") == [
        "Error in collate: ValueError: cannot pad a feature",
        "Context: the data collator failed on a batch",
        "Additional info: batch_size=8, feature_keys=['attention_mask', 'input_ids', 'labels', 'token_type_ids']",
    ]
    assert run.records("summary")[0]["status"] == "failed"
    assert "input_ids=" not in all_text(log_dir)


# ---------------------------------------------------------------------------------------- disk trouble


def test_a_failing_disk_is_reported_once_and_logging_resumes(log_dir, monkeypatch):
    real_write = FileSink.write
    disk = {"full": True}

    def disk_full(self, message):
        if "training_progress" in self._path and disk["full"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, message)

    tlog = TrainLogger(quiet(log_dir))
    monkeypatch.setattr(FileSink, "write", disk_full)
    for step in range(1, 6):
        tlog.log_training_progress(0.1, step, 0.5, 1e-4)  # returns normally: training would go on
    disk["full"] = False
    for step in range(6, 9):
        tlog.log_training_progress(0.2, step, 0.4, 1e-4)
    tlog.close()
    run = RunFiles(log_dir, tlog.run_id)
    assert progress_steps(run) == [6, 7, 8]
    notices = [m for m in run.messages("errors") if m.startswith("seo_trainlog: ")]
    assert len(notices) == 2
    assert notices[0].startswith(f"seo_trainlog: cannot write to {tlog.files['training']}: OSError: [Errno 28]")
    assert notices[1] == f"seo_trainlog: writing to {tlog.files['training']} works again after 5 lost records"
    assert [row["global_step"] for row in run.records("train")] == list(range(1, 9))  # other files kept all


def test_a_refused_rotation_keeps_every_record(log_dir, monkeypatch):
    def refuse(source, target):
        raise PermissionError(errno.EACCES, "Permission denied", source)

    tlog = TrainLogger(quiet(log_dir, rotation="1 KB"))
    monkeypatch.setattr(os, "rename", refuse)
    for step in range(1, 101):
        tlog.log_training_progress(0.01 * step, step, 1.0 / step, 1e-4)
    tlog.close()
    run = RunFiles(log_dir, tlog.run_id)
    assert progress_steps(run) == list(range(1, 101))
    notices = [m for m in run.messages("errors") if "rotation of" in m and "training_progress" in m]
    assert len(notices) == 1 and "PermissionError" in notices[0]


def test_a_removed_file_is_recreated(log_dir):
    import time

    tlog = TrainLogger(quiet(log_dir))
    tlog.log_training_progress(1, 1, 0.5, 1e-4)
    tlog.files["training"].unlink()
    time.sleep(1.1)  # the path is checked at most once a second
    tlog.log_training_progress(1, 2, 0.4, 1e-4)
    tlog.close()
    assert progress_steps(RunFiles(log_dir, tlog.run_id)) == [2]


def test_a_full_disk_under_a_buffered_file_is_reported_and_the_file_stays_readable(log_dir, monkeypatch):
    from seo_trainlog.read.reader import find_runs, read_records

    real_write = FileSink.write
    disk = {"full": False}

    def write(self, message):
        if "performance_metrics" in self._path and disk["full"]:
            real_write(self, message[:25])  # part of the record reached the file, then the disk was full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, message)

    tlog = TrainLogger(quiet(log_dir))
    monkeypatch.setattr(FileSink, "write", write)
    for index in range(1, 4):
        tlog.log_metrics("mine", {"index": index})
    disk["full"] = True
    tlog.log_metrics("mine", {"index": 4})
    disk["full"] = False
    for index in range(5, 7):
        tlog.log_metrics("mine", {"index": index})
    tlog.close()
    notices = [m for m in RunFiles(log_dir, tlog.run_id).messages("errors") if m.startswith("seo_trainlog: ")]
    path = tlog.files["metrics"]
    assert notices[0].startswith(f"seo_trainlog: cannot write to {path}: OSError: [Errno 28] No space left")
    assert notices[1] == f"seo_trainlog: writing to {path} works again after 1 lost record"
    warnings_ = []
    rows = list(read_records(find_runs(log_dir)[0], warnings_.append))
    assert [row["index"] for row in rows if row["event"] == "mine"] == [1, 2, 3, 5, 6]  # 4 met the full disk
    assert len(warnings_) == 2 and all("is a record cut short" in w for w in warnings_)  # write and retry


def test_a_disk_that_stays_full_is_never_said_to_work_again(log_dir):
    tlog = TrainLogger(quiet(log_dir))
    sink = next(sink for sink in tlog._sinks.router._sinks if getattr(sink, "path", None) == tlog.files["training"])

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    sink._sink._file.flush = full  # the buffered file cannot reach the disk
    for step in range(1, 4):
        tlog.log_training_progress(0.1, step, 0.5, 1e-4)
        tlog.flush()
    tlog.close()
    notices = [m for m in RunFiles(log_dir, tlog.run_id).messages("errors") if m.startswith("seo_trainlog: ")]
    assert len(notices) == 1 and notices[0].startswith(f"seo_trainlog: cannot write to {tlog.files['training']}: "
                                                       "OSError: [Errno 28]")


def test_a_recreated_file_rotates_at_its_own_size(log_dir):
    import time

    tlog = TrainLogger(quiet(log_dir, rotation="4 KB"))
    for step in range(1, 31):  # about 3 KB
        tlog.log_message(f"record {step:04d} " + "x" * 80, category="training")
    tlog.flush()
    tlog.files["training"].unlink()
    time.sleep(1.1)  # the path is checked at most once a second
    for step in range(31, 61):  # about 3 KB more, into the new file
        tlog.log_message(f"record {step:04d} " + "x" * 80, category="training")
    tlog.close()
    assert sorted(p.name for p in log_dir.glob(f"training_progress_{tlog.run_id}*")) == \
        [f"training_progress_{tlog.run_id}.log"]  # not rotated: the new file is under 4 KB
    assert len(tlog.files["training"].read_text().splitlines()) == 30


def test_rotation_under_load_keeps_every_line_in_order(log_dir):
    log_dir.mkdir()
    (log_dir / "unrelated.log").write_text("keep")
    with TrainLogger(quiet(log_dir, rotation="3 MB", retention=5)) as tlog:
        for index in range(200_000):
            tlog.log_message(f"progress record {index:06d}", category="training")
    for prefix in ("training_progress", "training_detailed", "seo_engine"):
        files = sorted(log_dir.glob(f"{prefix}_{tlog.run_id}.*.log"))
        assert 1 <= len(files) <= 5, (prefix, files)
        files.append(log_dir / f"{prefix}_{tlog.run_id}.log")
        lines = [line for path in files for line in path.read_text(encoding="utf-8").split("\n") if line]
        records = [LINE.match(line).group(4) for line in lines]
        records = [r for r in records if r.startswith("progress record ")]
        assert records == [f"progress record {index:06d}" for index in range(200_000)], prefix
    assert (log_dir / "unrelated.log").read_text() == "keep"
    assert sorted(p.name for p in log_dir.glob(f"errors_{tlog.run_id}*")) == [f"errors_{tlog.run_id}.log"]


# ---------------------------------------------------------------------------------------- exceptions anywhere


def test_exceptions_outside_the_epoch_loop_are_logged_and_cleaned_up(make_trainer, log_dir, tiny_dataset):
    def broken_metric(eval_pred):
        raise ValueError("metric boom")

    trainer = with_callback(make_trainer(max_steps=2, eval_on_start=True, eval_strategy="steps", eval_steps=1,
                                         eval_dataset=tiny_dataset.select(range(8)), compute_metrics=broken_metric),
                            log_dir)
    before = our_handler_count()
    with pytest.raises(ValueError, match="metric boom"):
        trainer.train()
    assert our_handler_count() == before
    assert "_evaluate" not in vars(trainer) and "call_event" not in vars(trainer.callback_handler)
    run = RunFiles(log_dir)
    assert run.messages("errors")[0] == "Error in training: ValueError: metric boom"
    assert run.records("summary")[0]["status"] == "failed"


def RaiseIn(event: str) -> TrainerCallback:  # noqa: N802 - reads like the class it builds
    """A user's callback whose ``event`` method raises."""

    def fail(self, *args, **kwargs):
        raise RuntimeError(f"user callback failed in {event}")

    return type("RaiseIn", (TrainerCallback,), {event: fail})()


@pytest.mark.parametrize("route", ["report_to", "add_callback"])
@pytest.mark.parametrize("event", ["on_epoch_begin", "on_step_end", "on_train_begin"])
def test_a_failing_user_callback_is_logged(make_trainer, log_dir, monkeypatch, event, route):
    monkeypatch.setenv("SEO_TRAINLOG_DIR", str(log_dir))
    monkeypatch.setenv("SEO_TRAINLOG_CONSOLE", "0")
    # our callback runs before the user's: even its on_train_begin in the same event loop is seen
    if route == "report_to":
        trainer = make_trainer(max_steps=2, report_to="seo_trainlog", callbacks=[RaiseIn(event)])
    else:
        trainer = make_trainer(max_steps=2)
        trainer.add_callback(TrainLogCallback())
        trainer.add_callback(RaiseIn(event))
    before = our_handler_count()
    with pytest.raises(RuntimeError, match=f"user callback failed in {event}"):
        trainer.train()
    assert our_handler_count() == before
    run = RunFiles(log_dir)
    assert run.messages("errors")[0] == f"Error in training: RuntimeError: user callback failed in {event}"
    assert run.records("summary")[0]["status"] == "failed"
    assert all(not getattr(value, "_seo_trainlog_guard", False)
               for owner in (trainer, trainer.callback_handler, *trainer.callback_handler.callbacks)
               for value in vars(owner).values())  # every wrapper removed again


def test_an_exception_after_the_summary_is_still_recorded(make_trainer, log_dir):
    trainer = with_callback(make_trainer(max_steps=2), log_dir)
    trainer.add_callback(RaiseIn("on_train_end"))
    with pytest.raises(RuntimeError, match="on_train_end"):
        trainer.train()
    run = RunFiles(log_dir)
    assert "Status: completed" in run.messages("training_progress")
    assert run.messages("errors")[0] == "Error in training: RuntimeError: user callback failed in on_train_end"
    assert run.records()[-1] == {**run.records()[-1], "event": "status", "status": "failed"}


def test_an_out_of_memory_retry_stays_one_run(make_trainer, log_dir):
    trainer = with_callback(make_trainer(max_steps=3, auto_find_batch_size=True, per_device_train_batch_size=8), log_dir)

    def oom_at_batch_8(module, args, kwargs):
        if kwargs["input_ids"].shape[0] == 8:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    trainer.model.register_forward_pre_hook(oom_at_batch_8, with_kwargs=True)
    trainer.train()
    assert len(list(log_dir.glob("seo_engine_*.log"))) == 1
    run = RunFiles(log_dir)
    assert [m for m in run.messages("errors") if m.startswith("Out of memory")][0].startswith(
        "Out of memory at train_batch_size=8; auto_find_batch_size retries")
    # accelerate retries with 90 % of the batch size
    assert "Training restarted by auto_find_batch_size with train_batch_size=7" in run.messages("seo_engine")
    assert progress_steps(run) == [1, 2, 3]
    assert run.records("summary")[0]["status"] == "completed"


def test_the_same_callback_added_twice_writes_once(make_trainer, log_dir):
    callback = TrainLogCallback(quiet(log_dir))
    trainer = make_trainer(max_steps=3, callbacks=[callback])
    trainer.add_callback(callback)
    with pytest.warns(RuntimeWarning, match="added twice"):
        trainer.train()
    assert len(list(log_dir.glob("seo_engine_*.log"))) == 1
    assert progress_steps(RunFiles(log_dir)) == [1, 2, 3]


def test_two_trainers_at_once_keep_their_own_runs(make_trainer, tmp_path, log_dir):
    config = quiet(log_dir)
    trainers = [make_trainer(max_steps=8, output_dir=str(tmp_path / f"out{i}")) for i in range(2)]
    for trainer in trainers:
        trainer.add_callback(TrainLogCallback(config))
    threads = [threading.Thread(target=trainer.train) for trainer in trainers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stamps = sorted(p.name[len("seo_engine_"):-4] for p in log_dir.glob("seo_engine_*.log"))
    assert len(stamps) == 2
    for stamp in stamps:
        run = RunFiles(log_dir, stamp)
        assert progress_steps(run) == list(range(1, 9))
        assert run.messages("training_progress").count("TRAINING SUMMARY") == 1


def test_an_unreadable_model_config_does_not_stop_training(make_trainer, log_dir):
    model = tiny_model()
    model.config.lock = threading.Lock()
    trainer = with_callback(make_trainer(max_steps=2, model=model), log_dir)
    trainer.train()
    run = RunFiles(log_dir)
    assert progress_steps(run) == [1, 2]
    assert run.records("hyperparameters")[0]["hyperparameters"]["model"]["config"].startswith("<unavailable: TypeError")


def test_a_metric_named_runtime_does_not_hijack_evaluation(make_trainer, log_dir, tiny_dataset):
    def metrics(eval_pred):
        return {"decode_runtime": 0.5, "accuracy": 0.75}

    trainer = with_callback(make_trainer(max_steps=2, eval_strategy="steps", eval_steps=2, compute_metrics=metrics,
                                         eval_dataset=tiny_dataset.select(range(8))), log_dir)
    trainer.train()
    run = RunFiles(log_dir)
    assert "Metrics: eval_decode_runtime=0.500000, eval_accuracy=0.750000" in run.messages("training_progress")
    runtime = next(row["eval_runtime"] for row in trainer.state.log_history if "eval_runtime" in row)
    assert f"evaluation completed in {runtime:.4f}s" in run.messages("model_performance")


def test_a_broken_stderr_switches_the_console_off(make_trainer, log_dir, monkeypatch):
    class Closed:
        def write(self, text):
            raise ValueError("I/O operation on closed file")

    trainer = make_trainer(max_steps=3)
    trainer.add_callback(TrainLogCallback(quiet(log_dir, console=True)))
    monkeypatch.setattr(sys, "stderr", Closed())
    trainer.train()
    run = RunFiles(log_dir)
    assert progress_steps(run) == [1, 2, 3]
    assert [m for m in run.messages("errors") if "console output switched off" in m]


def test_accelerate_warnings_still_reach_stderr_while_a_run_is_open(log_dir, capsys):
    accelerate_logger = logging.getLogger("accelerate.test_module")
    root_handlers = logging.getLogger().handlers[:]
    logging.getLogger().handlers.clear()  # no logging configured, as in a plain script
    try:
        with TrainLogger(quiet(log_dir)):
            accelerate_logger.warning("during the run")
    finally:
        logging.getLogger().handlers[:] = root_handlers
    assert "during the run" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- TrainLogger misuse


def test_train_logger_methods_survive_bad_values(log_dir):
    with TrainLogger(quiet(log_dir)) as tlog, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tlog.log_training_progress("epoch-one", 1, 0.5, 1e-3)
        tlog.log_training_progress(1, 2, 0.5, 1e-3, metrics=[1, 2])
        tlog.log_error("oops")
        tlog.log_error(ValueError)
        tlog.log_hyperparameters(None)
        tlog.log_metrics("e", None)
        tlog.log_model_performance("op", 1.0, additional_metrics={"huge": 10**5000})
        loop: dict = {}
        loop["self"] = loop
        tlog.log_hyperparameters({"loop": loop, "api_key": np.array([1, 2])})
        tlog.log_error(RuntimeError("after the bad calls"))
    run = RunFiles(log_dir, tlog.run_id)
    assert run.messages("training_progress")[0] == "Epoch epoch-one, Step 1: Loss=0.500000, LR=1.00e-03"
    assert "Metrics: metrics=[1, 2]" in run.messages("training_progress")
    errors = run.messages("errors")
    assert "Error: str: oops" in errors and "Error: type: <class 'ValueError'>" in errors
    assert "Error: RuntimeError: after the bad calls" in errors
    assert "Additional metrics: huge=<int of 16610 bits>" in run.messages("model_performance")
    for row in json_rows(log_dir):
        assert row["run_id"] == tlog.run_id
    assert "Training state: global_step=2, epoch=1" in run.path("error_tracking").read_text()


def test_an_exception_logged_inside_the_block_does_not_hide_the_one_escaping_it(log_dir):
    with pytest.raises(ValueError, match="FATAL"):
        with TrainLogger(quiet(log_dir)) as tlog:
            for attempt in range(3):
                try:
                    raise ValueError(f"transient {attempt}")
                except ValueError as error:
                    tlog.log_error(error)
            raise ValueError("FATAL escaping the block")
    errors = [m for m in RunFiles(log_dir, tlog.run_id).messages("errors") if m.startswith("Error")]
    assert errors == ["Error: ValueError: transient 0", "Error: ValueError: transient 1",
                      "Error: ValueError: transient 2", "Error in run: ValueError: FATAL escaping the block"]


def test_log_message_refuses_the_json_category(log_dir):
    with TrainLogger(quiet(log_dir)) as tlog:
        with pytest.raises(ValueError, match="category='metrics' is not valid"):
            tlog.log_message("text", category="metrics")
    assert all(json.loads(line) for line in tlog.files["metrics"].read_text().split("\n") if line)


def test_writing_after_close_warns(log_dir):
    tlog = TrainLogger(quiet(log_dir))
    tlog.close()
    with pytest.warns(RuntimeWarning, match="is closed"):
        tlog.log_training_progress(1, 1, 0.5, 1e-3)


def test_line_separators_never_split_a_json_line(log_dir):
    with TrainLogger(quiet(log_dir)) as tlog:
        tlog.log_error(ValueError("first\u2028second\x85third\u2029"))
    lines = tlog.files["metrics"].read_text(encoding="utf-8").splitlines()
    assert all(json.loads(line) for line in lines)
    assert json.loads(lines[-1])["message"] == "first\u2028second\x85third\u2029"


def test_braces_in_the_log_directory_are_literal(tmp_path):
    log_dir = tmp_path / "exp_{lr}_{time}"
    with TrainLogger(quiet(log_dir)) as tlog:
        tlog.log_training_progress(1, 1, 0.5, 1e-3)
    assert tlog.files["training"].parent == log_dir.resolve()
    assert progress_steps(RunFiles(log_dir, tlog.run_id)) == [1]


# ---------------------------------------------------------------------------------------- collator edges


def test_collator_passes_arguments_and_attributes_through(tokenizer):
    from transformers import default_data_collator

    features = [{"input_ids": [1, 2], "labels": 0}, {"input_ids": [3, 4], "labels": 1}]
    wrapped = TimedDataCollator(default_data_collator)
    assert type(wrapped(features, return_tensors="np")["input_ids"]).__name__ == "ndarray"
    inner = DataCollatorWithPadding(tokenizer)
    TimedDataCollator(inner).padding = "max_length"
    assert inner.padding == "max_length"


# ---------------------------------------------------------------------------------------- second round


def test_sigterm_while_writing_still_terminates(log_dir):
    result = run_child(log_dir, "busy")
    assert result.returncode == -signal.SIGTERM, result.stderr[-2000:]
    run = RunFiles(log_dir)
    assert run.records("summary")[-1]["status"] == "terminated"
    assert run.messages("errors")[0] == "Error in training: TerminatedBySignal: received SIGTERM (signal 15)"


def test_an_ignored_sigterm_stays_ignored(log_dir):
    result = run_child(log_dir, "ignore")
    assert result.returncode == 0, result.stderr[-2000:]
    run = RunFiles(log_dir)
    assert run.records("summary")[0]["status"] == "completed" and progress_steps(run) == list(range(1, 9))
    assert [m for m in run.messages("errors") if m.startswith("SIGTERM received at global_step 3; it stays ignored")]


def test_a_forked_child_never_writes_the_parents_summary(log_dir):
    result = run_child(log_dir, "fork")
    assert result.returncode == 0, result.stderr[-2000:]
    run = RunFiles(log_dir)
    assert [row["status"] for row in run.records("summary")] == ["completed"]
    assert run.messages("errors") == []


def test_a_child_forked_while_the_recorder_runs_a_job_writes_without_waiting_for_it(log_dir):
    """A DataLoader worker forked while the parent's recorder thread runs a job (and holds its lock),
    that then writes (a tokenizer warning through the stdlib bridge, a record of its own), goes on:
    it neither waits for nor runs the parent's jobs (it hung there, and so did the training)."""
    import time

    started, release = threading.Event(), threading.Event()
    with TrainLogger(quiet(log_dir, flush_interval_s=0.05)) as tlog:
        tlog.defer("held", lambda: (started.set(), release.wait(30)))
        assert started.wait(30)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # (a fork of a process with threads)
            child = os.fork()
        if child == 0:
            try:
                logging.getLogger("transformers.tokenization_utils_base").warning("sequence too long")
                tlog.log_message("from the forked child")
                tlog.flush()
            finally:
                os._exit(0)
        deadline = time.monotonic() + 30
        while (ended := os.waitpid(child, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        hung = ended[0] == 0
        if hung:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
        release.set()
        tlog.log_message("from the parent")
    assert not hung, "the forked child waited for the parent's recorder thread"
    assert os.waitstatus_to_exitcode(ended[1]) == 0
    messages = RunFiles(log_dir, tlog.run_id).messages("seo_engine")
    assert messages.count("from the parent") == 1


def test_an_error_after_an_out_of_memory_retry_is_still_logged(make_trainer, log_dir):
    trainer = with_callback(make_trainer(max_steps=6, auto_find_batch_size=True), log_dir)
    seen = []

    def oom_then_fail(module, args, kwargs):
        seen.append(kwargs["input_ids"].shape[0])
        if len(seen) == 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if len(seen) == 4:
            raise ValueError("broken batch after the retry")

    trainer.model.register_forward_pre_hook(oom_then_fail, with_kwargs=True)
    before = our_handler_count()
    with pytest.raises(ValueError, match="broken batch"):
        trainer.train()
    assert our_handler_count() == before
    run = RunFiles(log_dir)
    assert len(list(log_dir.glob("seo_engine_*.log"))) == 1
    assert "Error in training: ValueError: broken batch after the retry" in run.messages("errors")
    assert run.records("summary")[0]["status"] == "failed"


def test_an_out_of_memory_error_from_a_callback_is_retried_in_one_run(make_trainer, log_dir):
    class OomOnce(TrainerCallback):
        raised = False

        def on_step_begin(self, args, state, control, **kwargs):
            if not OomOnce.raised:
                OomOnce.raised = True
                raise RuntimeError("CUDA out of memory.")

    trainer = with_callback(make_trainer(max_steps=3, auto_find_batch_size=True), log_dir)
    trainer.add_callback(OomOnce())
    trainer.train()
    assert len(list(log_dir.glob("seo_engine_*.log"))) == 1
    assert RunFiles(log_dir).records("summary")[0]["status"] == "completed"


def test_secrets_in_every_shape_are_masked(log_dir, monkeypatch):
    @dataclass
    class Service:
        endpoint: str
        api_key: str

    class Settings:
        def to_dict(self):
            return {"password": "todict-SECRET-88"}

    nasty = "hf_Abc\\Def'Gh\"ij1234"
    monkeypatch.setenv("HF_TOKEN", nasty)
    url_password = "p@ss/word#2024"
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", url_password)
    deep: dict = {"password": "deep-SECRET-99"}
    for _ in range(40):
        deep = {"level": deep}
    with TrainLogger(quiet(log_dir)) as tlog:
        from transformers import TrainingArguments

        monkeypatch.setenv("OPENAI_API_KEY", "late-SECRET-5555")  # exported after the logger opened
        tlog.log_hyperparameters({
            "args": TrainingArguments(output_dir=str(log_dir / "out"), hub_token="hub-SECRET-ABCDEF"),
            "svc": Service("https://x", "sk-dataclass-123456"), "settings": Settings(),
            "api_keys": ["key-SECRET-1111"], "access_tokens": ["tok-SECRET-2222"], "passwords": "pw-SECRET-3333",
            "Authorization": "Bearer auth-SECRET-4444", "HFToken": "hftok-SECRET-6666", "db_pwd": "dbpwd-SECRET-7",
            "pin_secret": 4242, "deep": deep})
        tlog.log_error(KeyError(nasty), context=f"https://user:{__import__('urllib.parse').parse.quote(url_password, safe='')}@mlflow")
        tlog.log_error(RuntimeError("calling the API with late-SECRET-5555"))
    text = all_text(log_dir)
    for secret in ("hub-SECRET-ABCDEF", "sk-dataclass-123456", "todict-SECRET-88", "key-SECRET-1111",
                   "tok-SECRET-2222", "pw-SECRET-3333", "auth-SECRET-4444", "hftok-SECRET-6666", "dbpwd-SECRET-7",
                   "4242", "deep-SECRET-99", "hf_Abc", "p%40ss", "late-SECRET-5555"):
        assert secret not in text, secret


def test_secrets_known_by_their_shape_are_masked_under_any_name(log_dir):
    shaped = {
        "url": "https://alice:urlpass-SECRET-11@host/x?access_token=query-SECRET-22&page=2",
        "header": "Authorization: Bearer bearer-SECRET-33",
        "github": "ghp_" + "G" * 36, "aws": "AKIA" + "A1B2C3D4E5F6G7H8", "openai": "sk-proj-" + "O" * 30,
        "hub": "hf_" + "H" * 34, "slack": "xoxb-" + "1234567890-abcdef", "jwt": "eyJ" + "a" * 12 + ".b" + "b" * 12 + ".c" + "c" * 12,
        "upper": "PASSWORD=upper-SECRET-55", "colon": "password: colon-SECRET-66", "at": "https://bob:p@ss-SECRET-77@host/",
        "lower": "bearer lower-SECRET-88",
    }
    with TrainLogger(quiet(log_dir)) as tlog:
        tlog.log_metrics("custom", shaped)
        tlog.log_message(f"connecting to {shaped['url']} with {shaped['header']}")
        tlog.log_error(RuntimeError(f"upload refused: db_password=dbpass-SECRET-44 token {shaped['github']}"))
    text = all_text(log_dir)
    for secret in ("urlpass-SECRET-11", "query-SECRET-22", "bearer-SECRET-33", "dbpass-SECRET-44", "G" * 36,
                   "A1B2C3D4E5F6G7H8", "O" * 30, "H" * 34, "abcdef", "a" * 12, "upper-SECRET-55", "colon-SECRET-66",
                   "ss-SECRET-77", "lower-SECRET-88"):
        assert secret not in text, secret
    row = RunFiles(log_dir).records("custom")[0]  # still valid JSON, the rest of each value kept
    assert row["url"] == "https://alice:<redacted>@host/x?access_token=<redacted>&page=2"
    assert row["header"] == "Authorization: Bearer <redacted>"
    with TrainLogger(quiet(log_dir / "plain")) as tlog:
        tlog.log_training_progress(1, 2, 0.5, 1e-4, metrics={"num_tokens": 123456789, "mean_token_accuracy": 0.5})
    assert "num_tokens=123456789, mean_token_accuracy=0.500000" in all_text(log_dir / "plain")


def test_an_exception_message_cannot_forge_a_log_line(log_dir):
    forged = "[2026-11-30 15:17:31] TRAINING - INFO - Epoch 9, Step 999: Loss=0.000001"
    with TrainLogger(quiet(log_dir)) as tlog:
        tlog.log_error(RuntimeError(f"x\n{forged}"), context=f"c\n{forged}")
    run = RunFiles(log_dir)
    for prefix in ("errors", "seo_engine", "training_progress"):
        assert not any(line.startswith(forged) for line in run.lines(prefix)), prefix
    assert run.messages("errors")[0] == f"Error: RuntimeError: x\\n{forged}"


def test_metric_names_mentioning_tokens_keep_their_numbers(log_dir):
    with TrainLogger(quiet(log_dir)) as tlog:
        tlog.log_training_progress(1, 1, 0.5, 1e-3, metrics={"mean_token_accuracy": 0.75, "num_tokens": 1024,
                                                             "image_token_index": 7})
    run = RunFiles(log_dir, tlog.run_id)
    assert "Metrics: mean_token_accuracy=0.750000, num_tokens=1024, image_token_index=7" in run.messages(
        "training_progress")


def test_retention_never_deletes_the_run_itself(log_dir):
    import time

    with TrainLogger(quiet(log_dir, rotation=None, retention="1 second")) as tlog:
        tlog.log_error(ValueError("kept"))
        tlog.log_data_loading("kept", 1, 1, 0.1)
        time.sleep(1.5)
    assert "kept" in tlog.files["errors"].read_text() and tlog.files["data"].exists()


@pytest.mark.parametrize("bad", [{"rotation": __import__("datetime").timedelta(0)},
                                 {"retention": __import__("datetime").timedelta(seconds=-1)},
                                 {"encoding": "hex"}, {"encoding": "rot13"}])
def test_config_refuses_values_that_would_hang_or_fail_later(bad, log_dir):
    with pytest.raises(ValueError, match="is not valid"):
        quiet(log_dir, **bad)


def test_a_trainer_can_be_copied_and_pickled_after_a_run(make_trainer, log_dir, monkeypatch):
    import copy
    import pickle

    monkeypatch.setenv("SEO_TRAINLOG_DIR", str(log_dir))
    trainer = make_trainer(max_steps=2, report_to="seo_trainlog")
    trainer.train()
    twin = copy.copy(trainer)
    twin.state = type(trainer.state)()
    twin.train()
    assert twin.state.global_step == 2 and trainer.state.global_step == 2
    pickle.dumps(trainer.state)
    assert not [name for name, value in vars(trainer).items() if getattr(value, "_seo_trainlog_guard", False)]


def test_warnings_as_errors_never_stop_training(make_trainer, log_dir):
    callback = TrainLogCallback(quiet(log_dir))
    trainer = make_trainer(max_steps=2, callbacks=[callback])
    trainer.add_callback(callback)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.train()
    assert progress_steps(RunFiles(log_dir)) == [1, 2]


def test_exceptions_that_fight_back_are_logged_once(make_trainer, log_dir):
    class Delegating(Exception):
        def __getattr__(self, name):
            raise KeyError(name)

    @dataclass(frozen=True)
    class Frozen(Exception):
        code: int

    for index, error in enumerate((Delegating("delegating"), Frozen(7))):
        trainer = with_callback(make_trainer(max_steps=3, output_dir=str(log_dir / f"o{index}")), log_dir)
        hook = StepHook(1, lambda t, s, e=error: (_ for _ in ()).throw(e))
        trainer.add_callback(hook.callback)
        hook.trainer = trainer
        with pytest.raises(type(error)):
            trainer.train()
    texts = [p.read_text() for p in sorted(log_dir.glob("errors_*.log"))]
    assert sum(t.count("Error in training: Delegating: delegating") for t in texts) == 1
    assert sum(t.count("Error in training: Frozen: ") for t in texts) == 1


def test_removing_the_callback_mid_run_still_writes_the_summary(make_trainer, log_dir):
    callback = TrainLogCallback(quiet(log_dir))
    trainer = with_callback(make_trainer(max_steps=4), log_dir)
    trainer.callback_handler.callbacks[-1] = callback
    hook = StepHook(2, lambda t, s: t.remove_callback(callback))
    trainer.add_callback(hook.callback)
    hook.trainer = trainer
    before = our_handler_count()
    trainer.train()
    assert our_handler_count() == before
    assert RunFiles(log_dir).records("summary")[0]["status"] == "completed"


def test_a_meta_tensor_is_described_not_printed(log_dir):
    with TrainLogger(quiet(log_dir)) as tlog:
        tlog.log_metrics("log", {"weird": torch.empty(2, device="meta")})
        tlog.log_training_progress(1, 1, 0.5, 1e-3, metrics={"weird": torch.empty(2, device="meta")})
    text = all_text(log_dir)
    assert "tensor(" not in text and "<Tensor shape=(2,) dtype=torch.float32 device=meta>" in text


def test_custom_logs_do_not_repeat_the_epoch(make_trainer, log_dir):
    hook = StepHook(1, lambda trainer, state: trainer.log({"custom": 1}))
    trainer = with_callback(make_trainer(max_steps=2, callbacks=[hook.callback]), log_dir)
    hook.trainer = trainer
    trainer.train()
    row = RunFiles(log_dir).records("log")[0]
    assert row["custom"] == 1 and "user_epoch" not in row and row["epoch"] is not None


def test_a_secret_value_in_a_training_log_is_masked_in_the_json_too(make_trainer, log_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_progressSECRET123")
    hook = StepHook(1, lambda trainer, state: trainer.log({"loss": 0.5, "note": "token hf_progressSECRET123"}))
    trainer = with_callback(make_trainer(max_steps=2, callbacks=[hook.callback]), log_dir)
    hook.trainer = trainer
    trainer.train()
    assert "hf_progressSECRET123" not in all_text(log_dir)
    assert any(row.get("note") == "token <redacted>" for row in json_rows(log_dir))
