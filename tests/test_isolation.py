"""A run is one identity and owns its state: runs open at once in one process, collate timings,
evaluation batches, persistent workers, copies of a Trainer, resume after preemption."""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import RunFiles, json_rows, quiet, tiny_model
from transformers import DataCollatorWithPadding, Trainer, TrainerCallback

from seo_trainlog import TimedDataCollator, TrainLogCallback, TrainLogger
from seo_trainlog.record import sinks as _sinks
from seo_trainlog.cli import main

HERE = Path(__file__).resolve().parent
FIXED_STAMP = "20260101_000000"


@pytest.fixture
def same_second(monkeypatch):
    """Every run claims its stamp in the same second (the case where stamps collide across dirs)."""
    real = time.strftime

    def strftime(fmt, *args):
        return FIXED_STAMP if fmt == "%Y%m%d_%H%M%S" and not args else real(fmt, *args)

    monkeypatch.setattr(_sinks.time, "strftime", strftime)


class Meet(TrainerCallback):
    """Holds each trainer at step 1 until every run is open, then emits a library warning naming its run."""

    def __init__(self, barrier: threading.Barrier, name: str):
        self.barrier, self.name = barrier, name

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self.barrier.wait(timeout=60)
        if state.global_step == 2:
            logging.getLogger("transformers.trainer").warning("library warning from run %s", self.name)


def train_in_threads(*jobs):
    """Run each ``job()`` in its own thread; return the exceptions they raised (None for success)."""
    errors = [None] * len(jobs)

    def run(index, job):
        try:
            job()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors[index] = exc

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return errors


def collate_totals(run: RunFiles) -> tuple[int, int]:
    """Calls and samples of every training-phase collate record of a run (train records plus the
    'after the last logging step' data record)."""
    rows = run.records("train") + [row for row in run.records("data") if row.get("operation") == "collate"]
    return (sum(row.get("collate_calls", 0) for row in rows), sum(row.get("collate_samples", 0) for row in rows))


def test_two_trainers_training_in_two_threads_write_only_their_own_files(
        make_trainer, tmp_path, tokenizer, same_second):
    barrier = threading.Barrier(2)
    setups = {"a": (8, 8), "b": (4, 16)}  # batch size, max_steps: one epoch of the 64 rows each
    trainers = {}
    for name, (batch, steps) in setups.items():
        trainer = make_trainer(per_device_train_batch_size=batch, max_steps=steps, output_dir=str(tmp_path / name),
                               data_collator=TimedDataCollator(DataCollatorWithPadding(tokenizer)),
                               callbacks=[Meet(barrier, name)])
        trainer.add_callback(TrainLogCallback(quiet(tmp_path / f"logs_{name}")))
        trainers[name] = trainer
    assert train_in_threads(*(trainer.train for trainer in trainers.values())) == [None, None]

    for name, (batch, steps) in setups.items():
        run = RunFiles(tmp_path / f"logs_{name}")
        assert run.run_id == FIXED_STAMP  # the same stamp in both directories...
        rows = json_rows(tmp_path / f"logs_{name}")
        # ...and still each directory holds exactly its own run
        assert [row["event"] for row in rows].count("run_start") == 1
        assert [row["global_step"] for row in rows if row["event"] == "train"] == list(range(1, steps + 1))
        assert [row["status"] for row in rows if row["event"] == "summary"] == ["completed"]
        assert collate_totals(run) == (steps, steps * batch)  # its own collator's calls, its own batch size
        warnings_ = [row["message"] for row in rows if row["event"] == "warning"]
        assert warnings_ == [f"library warning from run {name}"]
        assert [row["source"] for row in rows if row["event"] == "warning"] == ["transformers"]
        assert f"TRANSFORMERS - WARNING - library warning from run {name}" in "\n".join(run.lines("errors"))


def test_a_trainlogger_on_one_dir_while_a_callback_with_its_own_config_trains_on_another(
        make_trainer, tmp_path, same_second):
    outer_dir, inner_dir = tmp_path / "outer", tmp_path / "inner"
    with TrainLogger(quiet(outer_dir)) as outer:
        outer.log_message("the user's own run")
        trainer = make_trainer(max_steps=5)
        trainer.add_callback(TrainLogCallback(quiet(inner_dir)))
        trainer.train()
        outer.log_message("still the user's own run")
    assert outer.run_id == FIXED_STAMP and RunFiles(inner_dir).run_id == FIXED_STAMP
    outer_rows = json_rows(outer_dir)
    assert [row["event"] for row in outer_rows] == ["run_start"]
    assert RunFiles(outer_dir).messages("seo_engine")[1:] == ["the user's own run", "still the user's own run"]
    inner_rows = json_rows(inner_dir)
    assert [row["event"] for row in inner_rows].count("run_start") == 1
    assert [row["global_step"] for row in inner_rows if row["event"] == "train"] == [1, 2, 3, 4, 5]


def test_a_collator_error_in_one_thread_is_an_error_of_that_threads_run_only(
        make_trainer, tmp_path, tokenizer, same_second):
    barrier = threading.Barrier(2)
    pad = DataCollatorWithPadding(tokenizer)
    calls = {"n": 0}

    def failing(features):
        calls["n"] += 1
        if calls["n"] == 4:
            raise ValueError("broken batch in run a")
        return pad(features)

    trainer_a = make_trainer(max_steps=8, output_dir=str(tmp_path / "a"), data_collator=TimedDataCollator(failing),
                             callbacks=[Meet(barrier, "a")])
    trainer_a.add_callback(TrainLogCallback(quiet(tmp_path / "logs_a")))
    trainer_b = make_trainer(max_steps=8, output_dir=str(tmp_path / "b"), callbacks=[Meet(barrier, "b")],
                             data_collator=TimedDataCollator(pad))
    trainer_b.add_callback(TrainLogCallback(quiet(tmp_path / "logs_b")))
    errors = train_in_threads(trainer_a.train, trainer_b.train)
    assert isinstance(errors[0], ValueError) and errors[1] is None

    run_a, run_b = RunFiles(tmp_path / "logs_a"), RunFiles(tmp_path / "logs_b")
    assert [m for m in run_a.messages("errors") if m.startswith("Error in collate")] == \
        ["Error in collate: ValueError: broken batch in run a"]
    assert "broken batch" not in "\n".join(run_b.lines("errors") + run_b.lines("error_tracking"))
    assert [row["status"] for row in run_a.records("summary")] == ["failed"]
    assert [row["status"] for row in run_b.records("summary")] == ["completed"]


def eval_setup(make_trainer, tokenizer, tiny_dataset, **overrides):
    values = dict(max_steps=8, logging_steps=4, eval_strategy="steps", eval_steps=4, per_device_eval_batch_size=16,
                  eval_dataset=tiny_dataset.select(range(48)),
                  data_collator=TimedDataCollator(DataCollatorWithPadding(tokenizer)))
    values.update(overrides)
    return make_trainer(**values)


def test_evaluation_batches_are_counted_in_the_evaluation_record_only(make_trainer, log_dir, tokenizer, tiny_dataset):
    trainer = eval_setup(make_trainer, tokenizer, tiny_dataset)
    trainer.add_callback(TrainLogCallback(quiet(log_dir)))
    trainer.train()
    run = RunFiles(log_dir)
    evals = run.records("eval")
    assert [(row["global_step"], row["collate_calls"], row["collate_samples"]) for row in evals] == \
        [(4, 3, 48), (8, 3, 48)]  # 3 batches of 16 rows each time
    assert collate_totals(run) == (8, 64)  # the 8 training batches of 8, none lost, none from evaluation
    hyper = run.records("hyperparameters")[0]["hyperparameters"]
    assert hyper["data"] == {"train_examples": 64, "eval_examples": 48}


def test_persistent_workers_count_every_batch_once_over_two_train_calls(make_trainer, log_dir, tokenizer,
                                                                         tiny_dataset):
    trainer = eval_setup(make_trainer, tokenizer, tiny_dataset, dataloader_num_workers=2,
                         dataloader_persistent_workers=True)
    trainer.add_callback(TrainLogCallback(quiet(log_dir)))
    trainer.train()
    trainer.train()
    runs = sorted({row["run_id"] for row in json_rows(log_dir)})
    assert len(runs) == 2
    for run_id in runs:
        run = RunFiles(log_dir, run_id)
        assert collate_totals(run) == (8, 64)
        assert [(row["collate_calls"], row["collate_samples"]) for row in run.records("eval")] == [(3, 48), (3, 48)]


def test_copies_of_a_trainer_mid_run_behave_as_without_the_package(make_trainer, log_dir, tiny_dataset):
    copies = {}

    class Copier(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                copies["shallow"] = copy.copy(trainer)
                copies["deep"] = copy.deepcopy(trainer)

    trainer = make_trainer(max_steps=4, callbacks=[Copier()])
    trainer.add_callback(TrainLogCallback(quiet(log_dir)))
    trainer.train()
    deep = copies["deep"]
    # the copy has the plain methods, bound to itself, and a callback with no open run
    for owner, name in ((deep, "_evaluate"), (deep, "_run_epoch"), (deep.callback_handler, "call_event")):
        method = getattr(owner, name)
        assert not getattr(method, "_seo_trainlog_guard", False) and method.__self__ is owner
    [copied] = [cb for cb in deep.callback_handler.callbacks if isinstance(cb, TrainLogCallback)]
    assert copied._run is None and copied.config == quiet(log_dir)
    # the original run is whole and its guards are gone
    run = RunFiles(log_dir)
    assert [row["global_step"] for row in run.records("train")] == [1, 2, 3, 4]
    assert "_evaluate" not in vars(trainer) and "call_event" not in vars(trainer.callback_handler)
    metrics = deep.evaluate(eval_dataset=tiny_dataset.select(range(16)))
    assert "eval_loss" in metrics
    # the shallow copy trained afterwards trains itself (its loop calls the wrappers it shares)
    shallow = copies["shallow"]
    shallow.train()
    assert (trainer.state.global_step, shallow.state.global_step) == (4, 4) and shallow.state is not trainer.state
    runs = sorted({row["run_id"] for row in json_rows(log_dir)})
    statuses = [[row["status"] for row in RunFiles(log_dir, run_id).records("summary")] for run_id in runs]
    assert statuses.count(["completed"]) == 2 and [row["global_step"] for row in run.records("train")] == [1, 2, 3, 4]


def test_a_setfit_style_loss_key_is_training_progress(make_trainer, log_dir):
    class EmbeddingLossTrainer(Trainer):
        def log(self, logs, *args, **kwargs):
            if "loss" in logs:
                logs = {("embedding_loss" if key == "loss" else key): value for key, value in logs.items()}
            return super().log(logs, *args, **kwargs)

    trainer = make_trainer(max_steps=3)
    trainer.__class__ = EmbeddingLossTrainer
    trainer.add_callback(TrainLogCallback(quiet(log_dir)))
    trainer.train()
    run = RunFiles(log_dir)
    train = run.records("train")
    assert [row["global_step"] for row in train] == [1, 2, 3]
    assert all(isinstance(row["loss"], float) and row["loss_name"] == "embedding_loss" for row in train)
    assert len([m for m in run.messages("training_progress") if m.startswith("Epoch ") and "Loss=" in m]) == 3
    assert not run.records("log")
    [summary] = run.records("summary")
    assert summary["final_loss"] == train[-1]["loss"] and summary["best_loss"] == min(row["loss"] for row in train)


def test_an_epoch_cut_short_by_max_steps_is_logged_as_partial(make_trainer, log_dir):
    trainer = make_trainer(max_steps=3)  # 8 batches of 8 per epoch: stops at 0.375 epochs
    trainer.add_callback(TrainLogCallback(quiet(log_dir)))
    trainer.train()
    run = RunFiles(log_dir)
    messages = run.messages("model_performance")
    assert any(m.startswith("epoch_1_partial completed in ") for m in messages)
    assert not any(m.startswith("epoch_1 completed") for m in messages)
    [epoch] = [row for row in run.records("model") if row["operation"].startswith("epoch_")]
    assert (epoch["operation"], epoch["epoch_fraction"]) == ("epoch_1_partial", 0.375)


def cli_json(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("resume", ["resume", "resume_restore"])
def test_a_run_preempted_by_sigterm_and_resumed_ends_completed(log_dir, capsys, resume, tmp_path):
    """resume_restore: with restore_callback_states_from_checkpoint=True transformers rebuilds the
    callback in the new process; the callback given there (its config) is kept."""
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
    preempted = subprocess.run([sys.executable, str(HERE / "sigterm_child.py"), str(log_dir), "preempt"],
                               capture_output=True, text=True, timeout=300, env=env)
    assert preempted.returncode == -15, preempted.stderr[-3000:]
    resumed = subprocess.run([sys.executable, str(HERE / "sigterm_child.py"), str(log_dir), resume],
                             capture_output=True, text=True, timeout=300, env=env, cwd=elsewhere)
    assert not (elsewhere / "logs").exists()  # nothing went to a default directory
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    assert len(list(log_dir.glob("seo_engine_*.log"))) == 1
    run = RunFiles(log_dir)
    assert [row["global_step"] for row in run.records("train")] == list(range(1, 9))
    assert [(row["segment"], row["status"]) for row in run.records("summary")] == \
        [(1, "terminated"), (2, "completed")]
    manifest = json.loads((log_dir / f"run_manifest_{run.run_id}.json").read_text())
    assert manifest["status"] == "completed"
    assert [(s["status"], s["start_global_step"]) for s in manifest["segments"]] == [("terminated", 0), ("completed", 3)]
    # seo-trainlog shows one run: steps 1..8, the time of both segments, each segment's start and status
    summary = cli_json(capsys, "summarize", str(log_dir), "--json")
    summaries = run.records("summary")
    assert (summary["run_id"], summary["status"], summary["global_step"]) == (run.run_id, "completed", 8)
    assert summary["training_duration_s"] == pytest.approx(sum(row["training_duration_s"] for row in summaries))
    assert [(s["segment"], s["start_global_step"], s["status"]) for s in summary["segments"]] == \
        [(1, 0, "terminated"), (2, 3, "completed")]
    assert summary["records_cover"]["complete"] is True
    assert main(["summarize", str(log_dir), "--list"]) == 0
    listed = capsys.readouterr().out
    assert listed.count(run.run_id) == 1


def test_a_run_continued_in_a_directory_without_its_files_starts_them(tmp_path):
    with TrainLogger(quiet(tmp_path / "first")) as first:
        first.start_segment(0)
    with TrainLogger(quiet(tmp_path / "elsewhere"), run_id=first.run_id, resume=True) as moved:
        assert moved.start_segment(20, "out/checkpoint-20") == 1
    with TrainLogger(quiet(tmp_path / "first"), run_id=first.run_id, resume=True) as same:
        assert same.start_segment(20, "out/checkpoint-20") == 2
    moved_rows = json_rows(tmp_path / "elsewhere")
    assert [(row["event"], row.get("resumed")) for row in moved_rows] == [("run_start", True), ("segment_start", None)]
    assert (moved_rows[1]["segment"], moved_rows[1]["start_global_step"]) == (1, 20)  # this directory's first
    rows = json_rows(tmp_path / "first")
    assert [row["event"] for row in rows] == ["run_start", "segment_start"]
    assert (rows[1]["segment"], rows[1]["start_global_step"], rows[1]["resumed_from_checkpoint"]) == \
        (2, 20, "out/checkpoint-20")
    manifest = json.loads((tmp_path / "first" / f"run_manifest_{first.run_id}.json").read_text())
    # neither segment wrote a summary: each closed "abandoned"
    assert [(s["segment"], s["status"]) for s in manifest["segments"]] == [(1, "abandoned"), (2, "abandoned")]
    assert manifest["status"] == "abandoned"


def test_one_callback_given_to_two_trainers_training_at_once_keeps_two_runs(make_trainer, tmp_path, log_dir,
                                                                             tokenizer):
    barrier = threading.Barrier(2)
    shared = TrainLogCallback(quiet(log_dir))
    trainers = []
    for name, (batch, steps) in {"a": (8, 8), "b": (4, 16)}.items():
        trainer = make_trainer(per_device_train_batch_size=batch, max_steps=steps, output_dir=str(tmp_path / name),
                               data_collator=TimedDataCollator(DataCollatorWithPadding(tokenizer)),
                               callbacks=[Meet(barrier, name)])
        trainer.add_callback(shared)
        trainers.append(trainer)
    assert train_in_threads(*(trainer.train for trainer in trainers)) == [None, None]
    rows = json_rows(log_dir)
    runs = sorted({row["run_id"] for row in rows})
    assert len(runs) == 2
    by_steps = {}
    for run_id in runs:
        run = RunFiles(log_dir, run_id)
        steps = [row["global_step"] for row in run.records("train")]
        assert [row["status"] for row in run.records("summary")] == ["completed"]
        by_steps[len(steps)] = (steps, collate_totals(run))
    assert by_steps == {8: (list(range(1, 9)), (8, 64)), 16: (list(range(1, 17)), (16, 64))}


def test_retention_never_makes_the_summary_wrong(make_trainer, log_dir, monkeypatch, capsys, tiny_dataset):
    monkeypatch.setenv("SEO_TRAINLOG_ROTATION", "2 KB")
    monkeypatch.setenv("SEO_TRAINLOG_RETENTION", "2")
    monkeypatch.setenv("SEO_TRAINLOG_DIR", str(log_dir))
    monkeypatch.setenv("SEO_TRAINLOG_CONSOLE", "0")
    trainer = make_trainer(max_steps=120, learning_rate=1e-2, eval_strategy="steps", eval_steps=20,
                           eval_dataset=tiny_dataset.select(range(16)))
    trainer.add_callback(TrainLogCallback())
    trainer.train()
    losses = [(row["step"], row["loss"]) for row in trainer.state.log_history if "loss" in row]
    evals = [(row["step"], row["eval_loss"]) for row in trainer.state.log_history if "eval_loss" in row]
    assert len(evals) == 6
    assert len(losses) == 120
    remaining = json_rows(log_dir)
    [run_id] = {row["run_id"] for row in remaining}
    assert "run_start" not in {row["event"] for row in remaining}  # retention deleted the head
    first_left = min(row["global_step"] for row in remaining if row["event"] == "train")
    assert first_left > 1

    manifest = json.loads((log_dir / f"run_manifest_{run_id}.json").read_text())
    summary = cli_json(capsys, "summarize", str(log_dir), "--json")
    best_step, best = min(losses, key=lambda pair: (pair[1], pair[0]))
    assert summary["best_loss"] == pytest.approx(best) and summary["best_loss_step"] == best_step
    assert summary["final_loss"] == pytest.approx(losses[-1][1])
    assert (summary["max_steps"], summary["global_step"], summary["status"]) == (120, 120, "completed")
    assert summary["started"] == manifest["started"] and summary["started"] < remaining[0]["time"]
    best_eval_step, best_eval = min(evals, key=lambda pair: (pair[1], pair[0]))
    assert manifest["eval"]["records"] == 6
    assert manifest["eval"]["best"]["eval_loss"] == {"value": pytest.approx(best_eval), "global_step": best_eval_step}
    assert summary["records_cover"] == {"first_global_step": first_left, "last_global_step": 120, "complete": False}
    assert summary["best_eval"]["eval_loss"] == {"value": pytest.approx(best_eval), "global_step": best_eval_step}
    assert summary["evaluations"] == 6
    capsys.readouterr()
    assert main(["summarize", str(log_dir)]) == 0
    text = capsys.readouterr().out
    assert f"records cover global_step {first_left}-120 only" in " ".join(text.split())


def test_two_trainers_training_at_once_inside_one_trainlogger_keep_two_runs(make_trainer, tmp_path, log_dir):
    barrier = threading.Barrier(2)
    trainers = [make_trainer(max_steps=steps, output_dir=str(tmp_path / name), callbacks=[Meet(barrier, name)])
                for name, steps in (("a", 6), ("b", 12))]
    for trainer in trainers:
        trainer.add_callback(TrainLogCallback())  # no config: joins the open TrainLogger if it is free
    with TrainLogger(quiet(log_dir)) as outer:
        assert train_in_threads(*(trainer.train for trainer in trainers)) == [None, None]
    rows = json_rows(log_dir)
    runs = sorted({row["run_id"] for row in rows})
    assert len(runs) == 2 and outer.run_id in runs  # one joined the user's run, the other opened its own there
    steps = {}
    for run_id in runs:
        run = RunFiles(log_dir, run_id)
        train = [row["global_step"] for row in run.records("train")]
        assert [(row["segment"], row["status"]) for row in run.records("summary")] == [(1, "completed")]
        assert not run.records("segment_start")
        steps[len(train)] = train
    assert steps == {6: list(range(1, 7)), 12: list(range(1, 13))}


def test_an_evaluation_before_any_training_is_a_run_that_says_so(make_trainer, log_dir, tiny_dataset):
    trainer = make_trainer(max_steps=2)
    trainer.add_callback(TrainLogCallback(quiet(log_dir)))
    metrics = trainer.evaluate(eval_dataset=tiny_dataset.select(range(16)))
    trainer.train()
    runs = sorted({row["run_id"] for row in json_rows(log_dir)})
    assert len(runs) == 2
    baseline, trained = (RunFiles(log_dir, run_id) for run_id in runs)
    assert [row["status"] for row in baseline.records("status")] == ["no_training"]
    [evaluation] = baseline.records("eval")
    assert evaluation["eval_loss"] == pytest.approx(metrics["eval_loss"])
    assert "model_preparation_time" not in "\n".join(baseline.lines("training_progress"))  # a timing
    assert any(m.startswith("Validation Loss: ") for m in baseline.messages("training_progress"))
    assert [row["status"] for row in trained.records("summary")] == ["completed"]


def always_fails(features):
    raise ValueError("bad batch in a worker")


def test_a_collator_failing_in_dataloader_workers_is_one_error_written_by_the_main_process(make_trainer, log_dir):
    trainer = make_trainer(max_steps=4, dataloader_num_workers=2, data_collator=TimedDataCollator(always_fails))
    trainer.add_callback(TrainLogCallback(quiet(log_dir)))
    with pytest.raises(ValueError, match="bad batch in a worker"):
        trainer.train()
    run = RunFiles(log_dir)
    collate_errors = [row for row in run.records("error") if row["operation"] == "collate"]
    assert len(collate_errors) == 1  # one failure, however many prefetched batches it hit
    [error] = collate_errors
    assert (error["error_type"], error["message"]) == ("ValueError", "bad batch in a worker")
    info = error["additional_info"]
    assert info["batch_size"] == 8 and info["feature_keys"] == ["attention_mask", "input_ids", "labels",
                                                                "token_type_ids"]
    assert info["batches_failed"] >= 1 and info["worker_id"] in (0, 1)
    errors = [m for m in run.messages("errors") if m.startswith("Error in ")]
    assert len(errors) == 2
    assert errors[0].startswith("Error in training: ValueError: Caught ValueError in DataLoader worker process")
    assert errors[1] == "Error in collate: ValueError: bad batch in a worker"


def test_predict_metrics_are_written_as_an_evaluation_with_their_prefix(make_trainer, log_dir, tiny_dataset):
    trainer = make_trainer(max_steps=2)
    trainer.add_callback(TrainLogCallback(quiet(log_dir)))
    trainer.train()
    output = trainer.predict(tiny_dataset.select(range(16)))
    run = RunFiles(log_dir)
    [test] = [row for row in run.records("eval") if row["metric_prefix"] == "test"]
    assert test["test_loss"] == pytest.approx(output.metrics["test_loss"]) and test["global_step"] == 2
    assert any(m.startswith("Test Loss: ") for m in run.messages("training_progress"))
    assert [row["operation"] for row in run.records("model") if row["operation"] == "prediction"] == ["prediction"]
