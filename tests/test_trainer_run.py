from __future__ import annotations

import threading
import time
from datetime import datetime

import pytest
from conftest import LINE, RunFiles, StepHook, quiet
from transformers import DataCollatorWithPadding, EarlyStoppingCallback, TrainerCallback

from seo_trainlog import TimedDataCollator, TrainLogCallback, TrainLogger

SPEC_FILES = ("seo_engine", "training_progress", "training_detailed", "model_performance", "data_loading",
              "errors", "error_tracking", "performance_metrics")


def test_add_callback_run_writes_every_file(make_trainer, log_dir, tokenizer):
    trainer = make_trainer(max_steps=6, data_collator=TimedDataCollator(DataCollatorWithPadding(tokenizer)))
    trainer.add_callback(TrainLogCallback(quiet(log_dir)))
    trainer.train()

    run = RunFiles(log_dir)
    for prefix in SPEC_FILES:
        assert run.path(prefix).exists(), prefix
    assert not run.path("debug").exists()

    progress = [m for m in run.messages("training_progress") if m.startswith("Epoch ")]
    assert len(progress) == 6
    train_losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    for step, (message, loss) in enumerate(zip(progress, train_losses), start=1):
        assert f", Step {step}: Loss={loss:.6f}, LR=" in message

    records = run.records("train")
    assert [row["global_step"] for row in records] == [1, 2, 3, 4, 5, 6]
    assert all(row["run_id"] == run.run_id for row in run.records())
    # accelerate's data loader fetches one batch ahead, so 6 steps collate 6 or 7 batches of 8.
    calls = sum(row.get("collate_calls", 0) for row in records)
    assert calls in (6, 7)
    assert sum(row.get("collate_samples", 0) for row in records) == 8 * calls
    assert records[-1]["samples_per_second"] > 0

    summary = run.messages("training_progress")
    start = summary.index("TRAINING SUMMARY")
    assert summary[start - 1] == summary[start + 1] == "=" * 80
    assert summary[start + 2:start + 6] == [
        f"Total epochs: {trainer.state.epoch:.2f}".rstrip("0").rstrip("."),
        f"Total steps: {trainer.state.global_step}",
        f"Final loss: {train_losses[-1]:.6f}",
        f"Best loss: {min(train_losses):.6f}",
    ]
    assert summary[start + 7:start + 9] == ["Early stopping triggered: False", "Status: completed"]
    assert summary[start + 9].startswith("peak_rss_mb: ") and summary[start + 10].startswith("data_wait_pct: ")
    # TimedDataCollator counted the tokens of the batches trained on: the last record's count
    assert summary[start + 11] == f"num_input_tokens_seen: {records[-1]['num_input_tokens_seen']}"
    assert summary[start + 12] == "=" * 80
    duration = float(summary[start + 6].removeprefix("Training duration: ").removesuffix("s"))
    assert 0 < duration < 60
    assert [m for m in run.messages("data_loading") if m.startswith("Collate: ")]
    print("\n".join(run.lines("seo_engine")[:5]))


def progress_steps(run: RunFiles) -> list[int]:
    return [int(m.split("Step ")[1].split(":")[0]) for m in run.messages("training_progress") if m.startswith("Epoch ")]


def our_handler_count() -> int:
    import seo_trainlog

    return len(seo_trainlog.logger._core.handlers)


def test_report_to_builds_the_callback_from_the_environment(make_trainer, log_dir, monkeypatch):
    monkeypatch.setenv("SEO_TRAINLOG_DIR", str(log_dir))
    monkeypatch.setenv("SEO_TRAINLOG_CONSOLE", "0")
    trainer = make_trainer(max_steps=4, report_to="seo_trainlog")
    assert sum(isinstance(cb, TrainLogCallback) for cb in trainer.callback_handler.callbacks) == 1
    trainer.train()
    run = RunFiles(log_dir)
    assert progress_steps(run) == [1, 2, 3, 4]
    assert [row["global_step"] for row in run.records("train")] == [1, 2, 3, 4]
    assert len(list(log_dir.glob("seo_engine_*.log"))) == 1


def test_report_to_and_add_callback_together_write_once(make_trainer, log_dir, tmp_path, monkeypatch):
    env_dir = tmp_path / "env_logs"
    monkeypatch.setenv("SEO_TRAINLOG_DIR", str(env_dir))
    trainer = make_trainer(max_steps=3, report_to="seo_trainlog")
    trainer.add_callback(TrainLogCallback(quiet(log_dir)))
    handlers_before = our_handler_count()
    trainer.train()
    assert not env_dir.exists()  # the explicitly configured callback is the one that writes
    run = RunFiles(log_dir)
    assert progress_steps(run) == [1, 2, 3]
    assert [row["event"] for row in run.records()].count("summary") == 1
    assert run.messages("training_progress").count("TRAINING SUMMARY") == 1
    assert our_handler_count() == handlers_before


def test_users_loguru_handlers_survive_a_run(make_trainer, log_dir):
    from loguru import logger

    received = []
    sink_id = logger.add(received.append, format="{message}")
    try:
        count = len(logger._core.handlers)
        logger.info("mine before")
        trainer = make_trainer(max_steps=2)
        trainer.add_callback(TrainLogCallback(quiet(log_dir)))
        trainer.train()
        logger.info("mine after")
        assert [str(m).strip() for m in received] == ["mine before", "mine after"]
        assert len(logger._core.handlers) == count
    finally:
        logger.remove(sink_id)


class FailOnCall:
    """A forward pre-hook that raises on the n-th forward call."""

    def __init__(self, n: int, error: BaseException):
        self.n, self.error, self.calls = n, error, 0

    def __call__(self, module, args):
        self.calls += 1
        if self.calls == self.n:
            raise self.error


def test_exception_at_step_3_is_logged_and_the_next_train_works(make_trainer, log_dir):
    trainer = make_trainer(max_steps=5)
    trainer.add_callback(TrainLogCallback(quiet(log_dir)))
    handlers_before = our_handler_count()
    hook = trainer.model.register_forward_pre_hook(
        FailOnCall(3, RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")))
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        trainer.train()
    assert our_handler_count() == handlers_before
    assert "_run_epoch" not in vars(trainer)  # the guard is gone from the trainer

    failed = RunFiles(log_dir)
    assert failed.messages("errors") == [
        "Error in training: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB",
        "Context: trainer.train() stopped at global_step 2, epoch 0.25",
        "Additional info: global_step=2, epoch=0.250000, max_steps=5, status=failed",
    ]
    tracking = failed.path("error_tracking").read_text()
    assert "Training state: global_step=2, epoch=0.25" in tracking
    assert "Traceback (most recent call last):" in tracking and "raise self.error" in tracking
    assert "_guard.py" not in tracking  # our wrapper frame is left out
    assert "Status: failed" in failed.messages("training_progress")
    assert failed.records("summary")[0]["status"] == "failed"
    assert progress_steps(failed) == [1, 2]

    hook.remove()
    trainer.train()
    second = RunFiles(log_dir)
    assert second.run_id != failed.run_id
    assert progress_steps(second) == [1, 2, 3, 4, 5]
    assert second.messages("errors") == []
    assert progress_steps(failed) == [1, 2]  # nothing appended to the failed run
    assert our_handler_count() == handlers_before


def test_keyboard_interrupt_marks_the_run_interrupted(make_trainer, log_dir):
    trainer = make_trainer(max_steps=5)
    trainer.add_callback(TrainLogCallback(quiet(log_dir)))
    trainer.model.register_forward_pre_hook(FailOnCall(2, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    run = RunFiles(log_dir)
    assert run.messages("errors")[0] == "Error in training: KeyboardInterrupt: "
    assert run.records("summary")[0]["status"] == "interrupted"


def accuracy(eval_pred):
    logits, labels = eval_pred
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def test_each_evaluation_is_recorded_once(make_trainer, log_dir, tiny_dataset):
    trainer = make_trainer(max_steps=6, eval_strategy="steps", eval_steps=3, eval_dataset=tiny_dataset.select(range(16)),
                           compute_metrics=accuracy)
    trainer.add_callback(TrainLogCallback(quiet(log_dir)))
    trainer.train()
    run = RunFiles(log_dir)
    evals = [row for row in trainer.state.log_history if "eval_loss" in row]
    assert len(evals) == 2
    validation = [m for m in run.messages("training_progress") if m.startswith("Validation Loss: ")]
    assert validation == [f"Validation Loss: {row['eval_loss']:.6f}" for row in evals]
    metrics = [m for m in run.messages("training_progress") if m.startswith("Metrics: eval_")]
    assert metrics == [f"Metrics: eval_accuracy={row['eval_accuracy']:.6f}" for row in evals]
    assert [(row["global_step"], row["metric_prefix"]) for row in run.records("eval")] == [(3, "eval"), (6, "eval")]
    assert [row["validation_loss"] for row in run.records("eval")] == [row["eval_loss"] for row in evals]
    performance = [m for m in run.messages("model_performance") if m.startswith("evaluation completed in ")]
    assert performance == [f"evaluation completed in {row['eval_runtime']:.4f}s" for row in evals]


def test_early_stopping_is_detected(make_trainer, log_dir, tiny_dataset, monkeypatch):
    def constant_metric(eval_pred):
        return {"score": 0.5}

    monkeypatch.setenv("SEO_TRAINLOG_DIR", str(log_dir))
    monkeypatch.setenv("SEO_TRAINLOG_CONSOLE", "0")
    # report_to callbacks come before user callbacks, so the run is open when EarlyStoppingCallback warns
    trainer = make_trainer(max_steps=20, eval_strategy="steps", eval_steps=2, metric_for_best_model="score",
                           greater_is_better=True, eval_dataset=tiny_dataset.select(range(8)),
                           compute_metrics=constant_metric, report_to="seo_trainlog",
                           callbacks=[EarlyStoppingCallback(early_stopping_patience=1)])
    trainer.train()
    assert trainer.state.global_step == 4
    run = RunFiles(log_dir)
    messages = run.messages("training_progress")
    assert "Early stopping triggered: True" in messages and "Total steps: 4" in messages
    assert run.records("summary")[0]["early_stopping_triggered"] is True
    # EarlyStoppingCallback's stdlib warning reached the general log
    assert any("Using EarlyStoppingCallback without load_best_model_at_end" in m for m in run.messages("seo_engine"))


def test_evaluate_after_training_appends_to_the_same_run(make_trainer, log_dir, tiny_dataset):
    trainer = make_trainer(max_steps=2, compute_metrics=accuracy)
    trainer.add_callback(TrainLogCallback(quiet(log_dir)))
    handlers_before = our_handler_count()
    trainer.train()
    metrics = trainer.evaluate(tiny_dataset.select(range(8)), metric_key_prefix="test")
    assert our_handler_count() == handlers_before
    assert len(list(log_dir.glob("seo_engine_*.log"))) == 1
    run = RunFiles(log_dir)
    messages = run.messages("training_progress")
    assert messages[-2:] == [f"Test Loss: {metrics['test_loss']:.6f}",
                             f"Metrics: test_accuracy={metrics['test_accuracy']:.6f}"]
    assert run.messages("model_performance")[-3] == f"evaluation completed in {metrics['test_runtime']:.4f}s"
    assert run.records()[-1]["event"] == "model" and run.records()[-1]["operation"] == "evaluation"


def test_callback_joins_an_open_train_logger(make_trainer, log_dir, monkeypatch):
    from seo_trainlog import TrainLogger

    monkeypatch.setenv("SEO_TRAINLOG_DIR", str(log_dir / "unused"))
    with TrainLogger(quiet(log_dir)) as tlog:
        tlog.log_data_loading("dataset_creation", 64, 8, 0.01)
        make_trainer(max_steps=2, report_to="seo_trainlog").train()
        tlog.log_message("after training")
    assert not (log_dir / "unused").exists()
    run = RunFiles(log_dir, tlog.run_id)
    assert len(list(log_dir.glob("seo_engine_*.log"))) == 1
    assert run.messages("data_loading")[0] == "dataset_creation: Dataset size=64, Batch size=8, Duration=0.0100s"
    assert progress_steps(run) == [1, 2]
    assert run.messages("seo_engine")[-1] == "after training"


def test_debug_level_writes_a_line_per_step(make_trainer, log_dir):
    trainer = make_trainer(max_steps=4, logging_steps=2)
    trainer.add_callback(TrainLogCallback(quiet(log_dir, level="DEBUG")))
    trainer.train()
    run = RunFiles(log_dir)
    per_step = [m.split(":")[0] for m in run.messages("training_detailed") if m.startswith("Step ")]
    assert per_step == ["Step 1", "Step 2", "Step 3", "Step 4"]
    intervals = [m.split(":")[0] for m in run.messages("training_detailed") if m.startswith("Steps ")]
    assert intervals == ["Steps 1-2", "Steps 3-4"]
    assert [row["steps"] for row in run.records("train")] == [2, 2]


def test_the_debug_file_gets_a_line_per_step_at_level_info(make_trainer, log_dir):
    trainer = make_trainer(max_steps=4, logging_steps=2)
    trainer.add_callback(TrainLogCallback(quiet(log_dir, debug=True)))
    trainer.train()
    run = RunFiles(log_dir)
    debug_lines = [line for line in run.lines("debug") if " - DEBUG - Step " in line]
    assert [line.split(" - DEBUG - ")[1].split(":")[0] for line in debug_lines] == ["Step 1", "Step 2", "Step 3", "Step 4"]
    assert not any(m.startswith("Step ") for m in run.messages("training_detailed"))  # that file stays at INFO
    stamps = [LINE.match(line).group(1) for line in debug_lines]
    assert stamps == sorted(stamps)


def test_per_step_lines_keep_their_step_numbers_when_a_callback_before_ours_logs_or_raises(make_trainer, log_dir):
    """A callback listed before ours that calls trainer.log() in on_step_end (an on_log before our
    on_step_end of that step), or raises there: each DEBUG line still names its own step, once."""

    def per_step(run):
        return [line.split(" - DEBUG - ")[1].split(":")[0] for line in run.lines("debug") if " - DEBUG - Step " in line]

    logging_dir, failing_dir = log_dir / "logs", log_dir / "fails"
    logs = StepHook(3, lambda trainer, state: trainer.log({"custom_metric": 1.0}))
    trainer = make_trainer(max_steps=5, logging_steps=10,
                           callbacks=[logs.callback, TrainLogCallback(quiet(logging_dir, debug=True))])
    logs.trainer = trainer
    trainer.train()
    assert per_step(RunFiles(logging_dir)) == ["Step 1", "Step 2", "Step 3", "Step 4", "Step 5"]

    def boom(trainer, state):
        raise RuntimeError("a user callback failed")

    trainer = make_trainer(max_steps=5, logging_steps=10,
                           callbacks=[StepHook(3, boom).callback, TrainLogCallback(quiet(failing_dir, debug=True))])
    with pytest.raises(RuntimeError, match="a user callback failed"):
        trainer.train()
    run = RunFiles(failing_dir)
    assert per_step(run) == ["Step 1", "Step 2"]  # step 3's on_step_end never reached ours
    assert [row["status"] for row in run.records("summary")] == ["failed"]


def test_logging_steps_are_written_in_batches_stamped_with_their_own_time(make_trainer, log_dir):
    """Training log records wait for a batch (``flush_interval_s``) but carry the time of their step."""
    logged_at = {}

    class Witness(TrainerCallback):  # runs in the same on_log call as ours
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                logged_at[state.global_step] = time.time()

    trainer = make_trainer(max_steps=6, callbacks=[Witness(), StepHook(3, lambda t, s: time.sleep(1.0)).callback])
    trainer.add_callback(TrainLogCallback(quiet(log_dir, flush_interval_s=60)))
    trainer.train()

    run = RunFiles(log_dir)
    train = run.records("train")
    assert [row["global_step"] for row in train] == [1, 2, 3, 4, 5, 6]
    times = [datetime.fromisoformat(row["time"]) for row in train]
    # each record holds the moment of its own logging step, not that of the batch (after the 1 s pause)
    for step, when in zip(range(1, 7), times):
        assert abs(when.timestamp() - logged_at[step]) < 0.2, step
    assert (times[2] - times[1]).total_seconds() >= 0.95
    stamps = [LINE.match(line).group(1) for line in run.lines("training_progress") if "Step " in line]
    assert stamps == [f"{t:%Y-%m-%d %H:%M:%S}" for t in times]
    # the summary comes after every step's record
    events = [row["event"] for row in run.records()]
    assert events.index("summary") > max(i for i, event in enumerate(events) if event == "train")


def test_a_failing_deferred_record_is_reported_once_and_the_rest_are_written(log_dir):
    def broken():
        raise ValueError("bad record")

    with TrainLogger(quiet(log_dir, flush_interval_s=60)) as tlog:
        tlog.defer("on_log", broken)
        tlog.defer("on_log", lambda: tlog.log_training_progress(1, 1, 0.5, 1e-4))
        tlog.defer("on_log", broken)
        tlog.log_message("after the batch")
    run = RunFiles(log_dir)
    failures = [m for m in run.messages("errors") if "on_log() failed" in m]
    assert failures == ["seo_trainlog on_log() failed and skipped this record: ValueError: bad record"]
    assert run.messages("training_progress") == ["Epoch 1, Step 1: Loss=0.500000, LR=1.00e-04"]
    general = run.messages("seo_engine")
    assert general.index("Epoch 1, Step 1: Loss=0.500000, LR=1.00e-04") < general.index("after the batch")


def test_other_threads_write_at_once_and_never_run_the_loops_deferred_records(log_dir):
    ran_on = []

    def job():
        ran_on.append(threading.current_thread().name)
        tlog.log_message("deferred step record")

    with TrainLogger(quiet(log_dir, flush_interval_s=60)) as tlog:
        tlog.defer("on_log", job)
        helper = threading.Thread(target=tlog.log_message, args=("from a sampler-like thread",))
        helper.start()
        helper.join()
        assert ran_on == []  # the recorder waits (flush_interval_s) and the helper does not wait for it
        tlog.log_message("next record of the training thread")
        # the training thread's own write waited for the job, run in the recorder thread
        assert ran_on == ["seo_trainlog-recorder"]
    assert not [t for t in threading.enumerate() if t.name == "seo_trainlog-recorder"]  # ended at close
    messages = RunFiles(log_dir).messages("seo_engine")
    order = [messages.index(m) for m in ("from a sampler-like thread", "deferred step record",
                                         "next record of the training thread")]
    assert order == sorted(order)


def test_train_begin_records_keep_their_order_and_content_when_written_with_the_first_batch(make_trainer, log_dir):
    """The hyperparameters record and 'Training started' are formatted and written with the first batch of
    deferred records (TrainLogger.defer): still before the first step's, with the model's config, stamped
    no later than it."""
    trainer = make_trainer(max_steps=2, callbacks=[TrainLogCallback(quiet(log_dir))])
    trainer.train()
    run = RunFiles(log_dir)
    messages = run.messages("seo_engine")  # the general log: every text record, in order
    started = next(index for index, message in enumerate(messages) if message.startswith("Training started: "))
    first_step = next(index for index, message in enumerate(messages) if message.startswith("Epoch "))
    assert messages[started] == "Training started: max_steps=2, num_train_epochs=1, world_size=1"
    assert any(message.startswith("HYPERPARAMETERS") for message in messages[:started])
    assert started < first_step
    events = [row["event"] for row in run.records()]
    assert events.index("run_start") < events.index("hyperparameters") < events.index("train")
    hyper = run.records("hyperparameters")[0]
    assert hyper["global_step"] == 0
    assert hyper["hyperparameters"]["model"]["config"]["hidden_size"] == 16
    assert hyper["hyperparameters"]["run"]["max_steps"] == 2
    assert hyper["time"] <= run.records("train")[0]["time"]


def test_opening_a_run_leaves_loguru_as_it_was_with_its_own_library_directories(log_dir):
    from loguru._better_exceptions import ExceptionFormatter

    import seo_trainlog

    lookup = ExceptionFormatter.__dict__["_get_lib_dirs"]
    expected = sorted(lookup.__func__())
    with TrainLogger(quiet(log_dir)) as tlog:
        handler = seo_trainlog.logger._core.handlers[tlog._sinks.handler_ids[0]]
        assert sorted(handler._exception_formatter._lib_dirs) == expected
    assert ExceptionFormatter.__dict__["_get_lib_dirs"] is lookup


def test_a_logging_step_is_one_record_written_in_the_recorder_thread(make_trainer, log_dir, capsys):
    """The training loop only hands its numbers over: the recorder thread formats and writes each logging
    step as one loguru record carrying its text, JSON line, per-step DEBUG lines and console line."""
    from seo_trainlog.record.sinks import logger as own_logger

    seen = []  # (thread name, category, first line) of every record of ours
    handler = own_logger.add(lambda message: seen.append((message.record["thread"].name,
                                                          message.record["extra"].get("seo_cat"),
                                                          message.record["message"].split("\n")[0])),
                             format="{message}")
    try:
        trainer = make_trainer(max_steps=4, callbacks=[TrainLogCallback(quiet(log_dir, debug=True, level="DEBUG",
                                                                              console=True, flush_interval_s=60))])
        trainer.train()
    finally:
        own_logger.remove(handler)
    assert not [t for t in threading.enumerate() if t.name == "seo_trainlog-recorder"]  # ended at close
    training = [(thread, message) for thread, category, message in seen
                if category == "training" and ", Step " in message]
    assert [message.split(": Loss")[0][-6:] for _, message in training] == [
        "Step 1", "Step 2", "Step 3", "Step 4"]
    assert {thread for thread, _ in training} == {"seo_trainlog-recorder"}
    # no record of its own for the console line or the step times of a logging step
    assert not [m for _, category, m in seen if category == "console" and "Epoch " in m]
    assert not [m for _, category, m in seen if category == "training_detailed" and " - Step " in m]

    run = RunFiles(log_dir)
    assert [row["global_step"] for row in run.records("train")] == [1, 2, 3, 4]
    for prefix in ("training_detailed", "debug"):
        step_lines = [m for m in run.messages(prefix) if m.startswith("Step ") or ": Loss=" in m]
        assert [m.split(":")[0] if "step time" in m else m.split(", ")[1].split(":")[0] for m in step_lines] == [
            "Step 1", "Step 1", "Step 2", "Step 2", "Step 3", "Step 3", "Step 4", "Step 4"], prefix
        assert all("step time" in m for m in step_lines[::2]), prefix  # each step's time before its record
    console = [line for line in capsys.readouterr().err.splitlines() if "| seo_trainlog | Epoch " in line]
    assert [line.split(", ")[1].split(":")[0] for line in console] == ["Step 1", "Step 2", "Step 3", "Step 4"]


def test_a_checkpoint_record_carries_the_step_it_was_saved_at(make_trainer, log_dir):
    """Saves between logging steps: each checkpoint record and line is at its own global_step, not the
    last logging step's."""
    trainer = make_trainer(max_steps=4, logging_steps=3, save_strategy="steps", save_steps=2,
                           callbacks=[TrainLogCallback(quiet(log_dir))])
    trainer.train()
    run = RunFiles(log_dir)
    checkpoints = run.records("checkpoint")
    assert [(row["global_step"], row["path"].rsplit("/", 1)[-1]) for row in checkpoints] == [
        (2, "checkpoint-2"), (4, "checkpoint-4")]
    assert [row["global_step"] for row in run.records("train")] == [3]
    saved = [m for m in run.messages("seo_engine") if m.startswith("Checkpoint saved: ")]
    assert [m.rsplit("-", 1)[-1] for m in saved] == ["2", "4"]
